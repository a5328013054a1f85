//! API keys: long-lived credentials an admin makes for a program, each with a role, sent as
//! `X-API-Key` wherever a bearer token is accepted. Kept in Redis (the keys are in
//! [`crate::keys`], the scripts in `lua/`), so every backend and replica agrees, and a revoked
//! key is refused from the next request.
//!
//! A key is `gk_` + a 16-hex-digit id + `_` + 64 hex digits of secret (244 random bits from
//! the OS's generator, through two v4 UUIDs). Only its SHA-256 is stored: the key is random
//! and long, so a slow password hash would add cost and no safety (nothing short to guess).
//! The id in the key finds its record in one lookup, with no scan over every key.
//!
//! Each check is charged to the login guard ([`crate::guard`]) like a password: in one script
//! with the lookup, the client's counters are read first and a failure is counted in them, so
//! a client past its limit is refused unheard and parallel guesses cannot slip past a count.
//! Only the per-address counters apply, never a per-key ceiling over every address: the secret
//! cannot be guessed, and such a ceiling would let anyone lock a service out of its key.

use std::{net::IpAddr, sync::Arc};

use redis::Script;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{
    error::ApiError,
    guard::Guard,
    keys::{self, API_KEY_NAMES, API_KEY_PREFIX, API_KEYS, GENERATION, VISITS},
    metrics::{GuardLimit, KeyCheck, Metrics},
    role::Role,
    store::Store,
    token::now,
    users::valid_name,
};

/// The most keys there may be: the list is one script over all of them.
pub const MAX_KEYS: u64 = 1000;

const PREFIX: &str = "gk_";
const ID_DIGITS: usize = 16;
const SECRET_DIGITS: usize = 64;

/// A key as the API lists it: never the key, nor its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct KeyInfo {
    #[schema(example = "3f9a0c2e7b1d4e58")]
    pub id: String,
    #[schema(example = "deploy-bot")]
    pub name: String,
    pub role: Role,
    /// Unix seconds.
    #[schema(example = 1_790_000_000)]
    pub created: u64,
    /// Unix seconds of the last request that presented it, to the minute; `null` if none has.
    pub last_used: Option<u64>,
    /// The admin (or admin key) that made it. A key outlives its maker: disabling or deleting
    /// that user leaves the key working until it is revoked.
    #[schema(example = "admin")]
    pub created_by: Option<String>,
}

/// A key just made: the only answer that ever holds the key.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct NewKey {
    pub id: String,
    pub name: String,
    pub role: Role,
    /// Send as `X-API-Key`. Shown this once; only its hash is kept.
    #[schema(example = "gk_3f9a0c2e7b1d4e58_0c1d...")]
    pub key: String,
    pub created: u64,
}

/// An accepted key.
pub struct Accepted {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub generation: String,
    /// The count after this visit, when one was counted.
    pub visits: Option<i64>,
}

pub struct ApiKeys {
    store: Arc<Store>,
    metrics: Arc<Metrics>,
    check: Script,
    create: Script,
    revoke: Script,
    list: Script,
}

impl ApiKeys {
    pub fn new(store: Arc<Store>, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            metrics,
            check: Script::new(include_str!("lua/key_check.lua")),
            create: Script::new(include_str!("lua/key_create.lua")),
            revoke: Script::new(include_str!("lua/key_revoke.lua")),
            list: Script::new(include_str!("lua/key_list.lua")),
        }
    }

    /// Checks `presented` from `client`, counting a visit if `count` and it passes: one round
    /// trip. `401` for a key that is not one of ours (malformed, unknown, revoked), `429` once
    /// the client has failed too often.
    pub async fn check(
        &self,
        guard: &Guard,
        presented: &str,
        client: Option<IpAddr>,
        count: bool,
    ) -> Result<Accepted, ApiError> {
        // A malformed key is still charged, to a record no key can have.
        let id = parse(presented).map_or("-", |(id, _)| id);
        let settings = guard.settings();
        let [pair, address] = guard.key_counters(id, client);
        let mut invocation = self.check.key(keys::api_key(id));
        invocation
            .key(pair)
            .key(address)
            .key(GENERATION)
            .key(VISITS)
            .arg(digest(presented))
            .arg(now())
            .arg(if count { "1" } else { "0" })
            .arg(settings.window_seconds)
            .arg(settings.max_failures_per_user_per_ip)
            .arg(settings.max_failures_per_ip);
        for role in Role::ALL {
            invocation.arg(role.as_str());
        }
        let answer: Vec<redis::Value> = self.store.script(invocation).await?;
        let text = |i: usize| match answer.get(i) {
            Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
            Some(redis::Value::SimpleString(s)) => Some(s.clone()),
            _ => None,
        };
        let number = |i: usize| match answer.get(i) {
            Some(redis::Value::Int(n)) => Some(*n),
            _ => None,
        };
        match text(0).as_deref() {
            Some("ok") => {
                let (Some(name), Some(role), Some(generation)) = (text(1), text(2), text(3)) else {
                    return Err(ApiError::internal("unexpected answer from Redis"));
                };
                let role = Role::parse(&role).ok_or_else(|| {
                    tracing::error!(key = %name, role, "an API key in Redis has an unknown role");
                    ApiError::internal("the key's record is damaged")
                })?;
                self.metrics.key_check(KeyCheck::Accepted);
                Ok(Accepted {
                    id: id.to_string(),
                    name,
                    role,
                    generation,
                    visits: number(4),
                })
            }
            Some("throttled") => {
                self.metrics.key_check(KeyCheck::Throttled);
                let limit = match number(2) {
                    Some(1) => GuardLimit::UserPerIp,
                    _ => GuardLimit::Ip,
                };
                let wait = number(1).and_then(|n| u64::try_from(n).ok()).unwrap_or(1);
                Err(guard.throttled(limit, wait, "API keys"))
            }
            Some("refused") => {
                self.metrics.key_check(KeyCheck::Refused);
                Err(ApiError::invalid_token(
                    "the API key is not valid (unknown, revoked or malformed)",
                ))
            }
            _ => Err(ApiError::internal("unexpected answer from Redis")),
        }
    }

    /// Makes a key named `name` with `role`, on behalf of a session of `generation`.
    pub async fn create(
        &self,
        name: &str,
        role: Role,
        generation: &str,
        created_by: &str,
    ) -> Result<NewKey, ApiError> {
        if !valid_name(name) {
            return Err(ApiError::bad_request(
                "name: must be 1-64 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit",
            ));
        }
        let created = now();
        // A clash of 64-bit ids is all but impossible; a second draw settles one.
        for _ in 0..3 {
            let (id, key) = new_key();
            let mut invocation = self.create.key(keys::api_key(&id));
            invocation
                .key(API_KEYS)
                .key(API_KEY_NAMES)
                .key(GENERATION)
                .arg(&id)
                .arg(name)
                .arg(role.as_str())
                .arg(digest(&key))
                .arg(created)
                .arg(generation)
                .arg(MAX_KEYS)
                .arg(created_by);
            let outcome: String = self.store.script(invocation).await?;
            match outcome.as_str() {
                "ok" => {
                    return Ok(NewKey {
                        id,
                        name: name.to_string(),
                        role,
                        key,
                        created,
                    });
                }
                "taken" => continue,
                "exists" => {
                    return Err(ApiError::conflict(format!(
                        "name: a key named {name:?} exists already"
                    )));
                }
                "full" => {
                    return Err(ApiError::conflict(format!(
                        "there are {MAX_KEYS} keys already: revoke one first"
                    )));
                }
                "stale" => {
                    return Err(ApiError::invalid_token(
                        "the credential was checked before Redis lost its data; sign in again",
                    ));
                }
                _ => break,
            }
        }
        Err(ApiError::internal("unexpected answer from Redis"))
    }

    /// Revokes key `id`; its name (empty for a damaged record), for the audit log.
    pub async fn revoke(&self, id: &str) -> Result<String, ApiError> {
        let missing = || ApiError::not_found(format!("no API key with id {id:?}"));
        if !valid_id(id) {
            return Err(missing());
        }
        let mut invocation = self.revoke.key(keys::api_key(id));
        invocation.key(API_KEYS).key(API_KEY_NAMES).arg(id);
        let name: Option<String> = self.store.script(invocation).await?;
        name.ok_or_else(missing)
    }

    /// Every key, oldest first.
    pub async fn list(&self) -> Result<Vec<KeyInfo>, ApiError> {
        let mut invocation = self.list.key(API_KEYS);
        invocation.arg(API_KEY_PREFIX);
        type Row = (
            String,
            String,
            String,
            Option<u64>,
            Option<u64>,
            Option<String>,
        );
        let rows: Vec<Row> = self.store.script(invocation).await?;
        // A record with a role this build does not know is left out (and logged), not allowed
        // to fail the whole list: the admin needs the others, and can revoke it by id.
        let mut keys: Vec<KeyInfo> = rows
            .into_iter()
            .filter_map(|(id, name, role, created, last_used, created_by)| {
                let Some(role) = Role::parse(&role) else {
                    tracing::error!(key = %name, id, role, "an API key in Redis has an unknown role");
                    return None;
                };
                Some(KeyInfo {
                    id,
                    name,
                    role,
                    created: created.unwrap_or(0),
                    last_used,
                    created_by,
                })
            })
            .collect();
        keys.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(keys)
    }
}

/// A fresh id and key.
fn new_key() -> (String, String) {
    let hex = || uuid::Uuid::new_v4().simple().to_string();
    let id = hex()[..ID_DIGITS].to_string();
    let key = format!("{PREFIX}{id}_{}{}", hex(), hex());
    (id, key)
}

/// The id and secret of a well-formed key.
fn parse(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.strip_prefix(PREFIX)?.split_once('_')?;
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    (hex(id, ID_DIGITS) && hex(secret, SECRET_DIGITS)).then_some((id, secret))
}

fn valid_id(id: &str) -> bool {
    id.len() == ID_DIGITS && id.bytes().all(|b| b.is_ascii_hexdigit())
}

fn digest(key: &str) -> String {
    let mut hex = String::with_capacity(64);
    for byte in Sha256::digest(key.as_bytes()) {
        hex.push_str(&format!("{byte:02x}"));
    }
    hex
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_long_random_and_parse_back() {
        let (id, key) = new_key();
        assert_eq!(parse(&key), Some((id.as_str(), &key[PREFIX.len() + 17..])));
        assert_eq!(key.len(), PREFIX.len() + ID_DIGITS + 1 + SECRET_DIGITS);
        let (_, other) = new_key();
        assert_ne!(key, other);
        for bad in [
            "",
            "gk_",
            "gk_0123456789abcdef",
            "gk_0123456789abcdef_00",
            "xx_0123456789abcdef_0000000000000000000000000000000000000000000000000000000000000000",
            "gk_0123456789abcdeg_0000000000000000000000000000000000000000000000000000000000000000",
            "gk_../../etc/passwd_0000000000000000000000000000000000000000000000000000000000000",
        ] {
            assert_eq!(parse(bad), None, "{bad}");
        }
        assert_eq!(
            digest("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
