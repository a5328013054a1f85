//! Users and token sessions, kept in Redis so that every backend process and every replica
//! sees the same thing (the keys are in [`crate::keys`], the scripts in `lua/`).
//!
//! Tokens fail closed. A token is accepted only while its `jti` is in its user's live tokens
//! (an allowlist, not a denylist) and its `gen` is Redis's generation. Whatever Redis loses (a
//! `FLUSHALL`, a lost volume, an evicted key) can only refuse tokens, never bring a revoked one
//! back: a denylist that is lost would. The generation says why a token was refused, and its
//! absence is how a backend learns that Redis lost its data: it seeds the users again at once
//! (see [`Accounts::generation`]).
//!
//! Revoking is bounded work: logout removes one entry; a change to a user deletes its live
//! tokens, at most `max_tokens_per_user` of them, so no script runs long enough to hold Redis
//! past a deadline. Past the cap, a new login revokes the user's oldest token.
//!
//! `/api/count` also counts here ([`Accounts::session_counting_visit`]): its token check and
//! its `INCR` share one script, so the busiest protected route costs one round trip.
//!
//! Every change that touches more than one key is one Lua script (or MULTI), so a failure
//! never leaves half of it written.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use redis::{Script, ScriptInvocation};
use serde::Serialize;

use crate::{
    error::{ApiError, StartError},
    keys::{self, GENERATION, USER_PREFIX, USERS},
    metrics::Metrics,
    password::{self, Hashing},
    role::Role,
    store::Store,
    token::{Claims, LEEWAY_SECONDS, now, now_ms},
    users::{SeedUser, valid_name},
};

/// The default of `backend.max_tokens_per_user`.
pub const DEFAULT_MAX_TOKENS_PER_USER: usize = 100;
/// The most `backend.max_tokens_per_user` may be: a change to a user deletes this many
/// entries at worst, well under a millisecond of Redis's time.
pub const MAX_TOKENS_PER_USER: usize = 10_000;

/// A user as the API shows it: never the password or its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct User {
    #[schema(example = "alice")]
    pub username: String,
    pub role: Role,
    /// A disabled user cannot log in, and its tokens stop working.
    pub active: bool,
}

/// A caller whose credential passed every check. For a token: signature and claims,
/// generation, live, and its user, who exists and is active. `role` is the role now (the
/// user's, or the key's), which is what permissions follow.
pub struct Session {
    /// Who: a user name, or `key:NAME` for an API key.
    pub actor: String,
    pub role: Role,
    /// Redis's generation when the credential was checked: a change made on the session's
    /// behalf is refused if Redis lost its data since.
    pub generation: String,
    pub credential: Credential,
}

/// What a [`Session`] was proven with.
pub enum Credential {
    Token(Claims),
    ApiKey {
        id: String,
        name: String,
    },
    /// A client certificate the proxy verified and mapped to this user.
    Certificate,
}

/// A user whose password was just verified, as it was read: the login records the token only
/// if the user is still so.
pub struct Verified {
    hash: String,
    pub role: Role,
}

pub struct Accounts {
    store: Arc<Store>,
    seed: Vec<SeedUser>,
    scripts: Scripts,
    hashing: Hashing,
    /// The generation this backend last saw in Redis: another one (or none) means Redis lost
    /// its data since.
    generation: Mutex<Option<String>>,
    /// When a request last tried to seed Redis again (see [`Accounts::heal`]): milliseconds
    /// since `started`, plus one; 0: never.
    healed_at: AtomicU64,
    /// The last try failed: the next failure is not logged again.
    heal_failing: AtomicBool,
    started: std::time::Instant,
    max_tokens_per_user: usize,
    metrics: Arc<Metrics>,
}

/// How often one backend tries to seed Redis again while its requests find no generation:
/// while Redis refuses writes, every request would otherwise run the seed script.
const HEAL_EVERY_MS: u64 = 1000;

impl Accounts {
    /// Hashes the decoy password: call it before serving, not on a request.
    pub fn new(
        store: Arc<Store>,
        seed: Vec<SeedUser>,
        max_tokens_per_user: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, StartError> {
        Ok(Self {
            store,
            seed,
            scripts: Scripts::new(),
            hashing: Hashing::new()?,
            generation: Mutex::new(None),
            healed_at: AtomicU64::new(0),
            heal_failing: AtomicBool::new(false),
            started: std::time::Instant::now(),
            max_tokens_per_user: max_tokens_per_user.clamp(1, MAX_TOKENS_PER_USER),
            metrics,
        })
    }

    /// Redis's generation, made first if Redis has none: a first start, or Redis lost its
    /// data. Whenever Redis has no users, the users file (and the admin password) is copied
    /// in under a fresh generation, whatever generation Redis had: it may have lost only its
    /// users, or have been seeded by a configuration with nobody in it. One script, so of the
    /// backends and replicas that find it missing at once, the first seeds and the others
    /// read it; nobody seeds twice.
    pub async fn generation(&self) -> Result<String, ApiError> {
        let fresh = uuid::Uuid::new_v4().to_string();
        let mut invocation = self.scripts.seed.key(GENERATION);
        invocation.key(USERS).arg(&fresh).arg(now());
        for user in &self.seed {
            invocation
                .key(keys::user(&user.name))
                .arg(&user.name)
                .arg(&user.hash)
                .arg(user.role.as_str());
        }
        let (generation, seeded, had): (String, u64, u64) = self.store.script(invocation).await?;
        if generation == fresh {
            self.metrics.generation_started();
            if seeded == 0 && had == 0 {
                tracing::warn!(
                    generation,
                    "Redis has no users, and there are none to seed (the users file is empty \
                     and no admin password is set): nobody can log in"
                );
            } else if had == 0 {
                tracing::warn!(
                    users = seeded,
                    generation,
                    "seeded the users in Redis from the users file: Redis had no users (a first \
                     start, or Redis lost its data); every token issued before is refused"
                );
            } else {
                tracing::warn!(
                    generation,
                    "Redis had users but no generation marker (it lost part of its data, or \
                     was written by an older version): every token issued before is refused"
                );
            }
        }
        self.saw(Some(&generation));
        Ok(generation)
    }

    /// Notes the generation a Redis call just read. A change from the last one seen is a
    /// loss of Redis's data, said once per loss by each backend that notices.
    fn saw(&self, generation: Option<&str>) {
        let mut last = self
            .generation
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if last.as_deref() == generation {
            return;
        }
        if let Some(previous) = last.as_deref() {
            tracing::error!(
                previous,
                now = generation.unwrap_or("none"),
                "Redis lost its data (its generation marker is gone or replaced): every token \
                 issued before is refused, and the users are seeded again from the users file"
            );
            self.metrics.redis_data_lost();
        }
        *last = generation.map(str::to_owned);
    }

    /// After a token check found no generation in Redis: seeds again now, so the next login
    /// works, rather than waiting for a restart. At most once a second per backend, and
    /// said once per run of failures: while Redis refuses writes (read-only, out of memory),
    /// every request would otherwise run the seed script and log a line.
    async fn heal(&self, generation: &Option<String>) {
        if generation.is_some() {
            return;
        }
        let now = u64::try_from(self.started.elapsed().as_millis())
            .unwrap_or(u64::MAX / 2)
            .saturating_add(1);
        let last = self.healed_at.load(Ordering::Relaxed);
        if last != 0 && now < last.saturating_add(HEAL_EVERY_MS) {
            return;
        }
        // One request of those that arrive at once tries; the others go on.
        if self
            .healed_at
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_err()
        {
            return;
        }
        match self.generation().await {
            Ok(_) => {
                if self.heal_failing.swap(false, Ordering::Relaxed) {
                    tracing::info!("seeded Redis again");
                }
            }
            Err(error) => {
                if !self.heal_failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %error.message,
                        "cannot seed Redis again yet; trying again at most once a second"
                    );
                }
            }
        }
    }

    /// Checks `password` against the user's hash, off the I/O threads. `None` for a wrong
    /// password, an unknown user or a disabled one, all at the same cost.
    pub async fn check_password(
        &self,
        name: &str,
        password: String,
    ) -> Result<Option<Verified>, ApiError> {
        let record = if valid_name(name) {
            let (record, generation, users) = self.read_user(name).await?;
            self.saw(generation.as_deref());
            if generation.is_none() || users == 0 {
                // Redis lost its data (or this is its first start): seed it, then look again.
                self.generation().await?;
                self.read_user(name).await?.0
            } else {
                record
            }
        } else {
            (None, None, None)
        };
        let user = match record {
            (Some(hash), Some(role), Some(active)) if active == "1" => {
                Role::parse(&role).map(|role| Verified { hash, role })
            }
            _ => None,
        };
        let hash = user.as_ref().map(|u| u.hash.clone());
        let matches = self.hashing.verify(hash, password).await?;
        Ok(user.filter(|_| matches))
    }

    /// The user's hash, role and state, Redis's generation and how many users it has, in one
    /// round trip.
    async fn read_user(&self, name: &str) -> Result<(UserRecord, Option<String>, u64), ApiError> {
        let mut conn = self.store.connection();
        let key = keys::user(name);
        let read = self
            .store
            .bounded(async move {
                redis::pipe()
                    .cmd("HMGET")
                    .arg(key)
                    .arg(&["hash", "role", "active"])
                    .get(GENERATION)
                    .scard(USERS)
                    .query_async::<(UserRecord, Option<String>, u64)>(&mut conn)
                    .await
            })
            .await?;
        Ok(read)
    }

    /// Records a new token of `user` and stamps it with Redis's generation, unless the user
    /// changed since its password was checked (then `false`: a token must not outlive a
    /// change made during its login). Past the cap, the user's oldest tokens are revoked:
    /// `Some(how many)`.
    pub async fn open_session(
        &self,
        user: &Verified,
        claims: &mut Claims,
    ) -> Result<Option<u64>, ApiError> {
        let lifetime_ms = (claims.exp.saturating_sub(claims.iat) + KEEP_AFTER_EXP) * 1000;
        let mut invocation = self.scripts.open_session.key(keys::user(&claims.sub));
        invocation
            .key(keys::sessions(&claims.sub))
            .key(GENERATION)
            .arg(&user.hash)
            .arg(user.role.as_str())
            .arg(&claims.jti)
            .arg(now_ms())
            .arg(lifetime_ms)
            .arg(self.max_tokens_per_user);
        let (generation, dropped): (String, u64) = self.store.script(invocation).await?;
        if generation.is_empty() {
            return Ok(None);
        }
        if dropped > 0 {
            self.metrics.tokens_over_cap(dropped);
            tracing::info!(
                user = %claims.sub,
                revoked = dropped,
                cap = self.max_tokens_per_user,
                "the user has too many live tokens: revoked the oldest"
            );
        }
        self.saw(Some(&generation));
        claims.generation = generation;
        Ok(Some(dropped))
    }

    /// The per-request check of a token whose signature and claims are valid: one round trip
    /// for the generation, the user's live tokens and the user's state, read at one instant
    /// (`MULTI`), so a change to the user or a loss of Redis's data cannot land between them.
    pub async fn session(&self, claims: Claims) -> Result<Session, ApiError> {
        let mut conn = self.store.connection();
        let (sessions_key, user_key) = (keys::sessions(&claims.sub), keys::user(&claims.sub));
        let jti = claims.jti.clone();
        type Read = (
            Option<String>,
            Option<String>,
            (Option<String>, Option<String>),
        );
        let (generation, live, (role, active)): Read = self
            .store
            .bounded(async move {
                redis::pipe()
                    .atomic()
                    .get(GENERATION)
                    .zscore(sessions_key, jti)
                    .cmd("HMGET")
                    .arg(user_key)
                    .arg(&["role", "active"])
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        self.saw(generation.as_deref());
        self.heal(&generation).await;
        admit(claims, generation, live.is_some(), role, active)
    }

    /// [`Accounts::session`], and a visit counted if the token passes, in one round trip
    /// instead of two. The script reads what `session` reads and hands it to the same
    /// `admit`, so the two cannot answer a token differently.
    pub async fn session_counting_visit(&self, claims: Claims) -> Result<(Session, i64), ApiError> {
        let mut invocation = self.scripts.count_visit.key(keys::sessions(&claims.sub));
        invocation
            .key(keys::user(&claims.sub))
            .key(keys::VISITS)
            .key(GENERATION)
            .arg(&claims.jti)
            .arg(&claims.generation);
        for role in Role::ALL {
            invocation.arg(role.as_str());
        }
        type Read = (
            Option<String>,
            bool,
            Option<String>,
            Option<String>,
            Option<i64>,
        );
        let (generation, live, role, active, visits): Read = self.store.script(invocation).await?;
        self.saw(generation.as_deref());
        self.heal(&generation).await;
        let session = admit(claims, generation, live, role, active)?;
        // The script counts exactly when `admit` passes; a pass without a count is a bug.
        let visits = visits.ok_or_else(|| ApiError::internal("the visit was not counted"))?;
        Ok((session, visits))
    }

    /// The session of user `name`, whom the proxy vouches for from a client certificate it
    /// verified: the user must exist and be active, and its role now applies. A visit is
    /// counted (in a second round trip) when `count` and the user passes.
    pub async fn certificate_session(
        &self,
        name: &str,
        count: bool,
    ) -> Result<(Session, Option<i64>), ApiError> {
        let refused = || {
            ApiError::invalid_token("the client certificate's user does not exist or is disabled")
        };
        if !valid_name(name) {
            return Err(refused());
        }
        let mut conn = self.store.connection();
        let user_key = keys::user(name);
        let (generation, (role, active)): (Option<String>, (Option<String>, Option<String>)) = self
            .store
            .bounded(async move {
                redis::pipe()
                    .atomic()
                    .get(GENERATION)
                    .cmd("HMGET")
                    .arg(user_key)
                    .arg(&["role", "active"])
                    .query_async(&mut conn)
                    .await
            })
            .await?;
        self.saw(generation.as_deref());
        self.heal(&generation).await;
        let (Some(generation), Some(role), Some("1")) = (generation, role, active.as_deref())
        else {
            return Err(refused());
        };
        let role =
            Role::parse(&role).ok_or_else(|| ApiError::internal("the user's record is damaged"))?;
        let visits = if count {
            Some(self.count_visit().await?)
        } else {
            None
        };
        let session = Session {
            actor: name.to_string(),
            role,
            generation,
            credential: Credential::Certificate,
        };
        Ok((session, visits))
    }

    async fn count_visit(&self) -> Result<i64, ApiError> {
        let mut incr = redis::cmd("INCR");
        incr.arg(keys::VISITS);
        Ok(self.on_visits(incr).await?.unwrap_or(0))
    }

    /// Sets the count back to zero; the count before.
    pub async fn reset_visits(&self) -> Result<i64, ApiError> {
        let mut getset = redis::cmd("GETSET");
        getset.arg(keys::VISITS).arg(0);
        Ok(self.on_visits(getset).await?.unwrap_or(0))
    }

    /// The visits counted so far, without counting one (for `HEAD /api/count`).
    pub async fn visits(&self) -> Result<i64, ApiError> {
        let mut get = redis::cmd("GET");
        get.arg(keys::VISITS);
        Ok(self.on_visits(get).await?.unwrap_or(0))
    }

    /// One command on the visit count, within the store's deadline: its answer.
    async fn on_visits(&self, command: redis::Cmd) -> Result<Option<i64>, ApiError> {
        let mut conn = self.store.connection();
        let answer = self
            .store
            .bounded(async move { command.query_async(&mut conn).await })
            .await?;
        Ok(answer)
    }

    /// Logout: the token leaves its user's live tokens, so every backend of every replica
    /// refuses it from now on.
    pub async fn revoke(&self, claims: &Claims) -> Result<(), ApiError> {
        let mut conn = self.store.connection();
        let (sessions_key, jti) = (keys::sessions(&claims.sub), claims.jti.clone());
        self.store
            .bounded(async move {
                redis::cmd("ZREM")
                    .arg(sessions_key)
                    .arg(jti)
                    .query_async::<()>(&mut conn)
                    .await
            })
            .await?;
        Ok(())
    }

    /// Every user, sorted by name.
    pub async fn list(&self) -> Result<Vec<User>, ApiError> {
        let mut invocation = self.scripts.list.key(USERS);
        invocation.arg(USER_PREFIX);
        let rows: Vec<(String, String, String)> = self.store.script(invocation).await?;
        rows.into_iter()
            .map(|(username, role, active)| {
                let role = Role::parse(&role).ok_or_else(|| {
                    tracing::error!(user = %username, role, "a user in Redis has an unknown role");
                    ApiError::internal("a user's record is damaged")
                })?;
                Ok(User {
                    username,
                    role,
                    active: active == "1",
                })
            })
            .collect()
    }

    /// Creates `user` with `password`, on behalf of a session of `generation`.
    pub async fn create(
        &self,
        user: User,
        password: String,
        generation: &str,
    ) -> Result<User, ApiError> {
        if !valid_name(&user.username) {
            return Err(ApiError::bad_request(
                "username: must be 1-64 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit",
            ));
        }
        password::check_length(&password)?;
        let hash = self.hashing.hash(password).await?;
        let mut invocation = self.scripts.create.key(keys::user(&user.username));
        invocation
            .key(USERS)
            .key(GENERATION)
            .arg(&user.username)
            .arg(hash)
            .arg(user.role.as_str())
            .arg(flag(user.active))
            .arg(now())
            .arg(generation);
        let created: i64 = self.store.script(invocation).await?;
        if created < 0 {
            return Err(self.stale().await);
        }
        if created == 0 {
            return Err(ApiError::conflict(format!(
                "username: a user named {:?} exists already",
                user.username
            )));
        }
        Ok(user)
    }

    /// Applies `change`, on behalf of a session of `generation`; if anything changed, the
    /// user's tokens are revoked.
    pub async fn update(
        &self,
        name: &str,
        role: Option<Role>,
        password: Option<String>,
        active: Option<bool>,
        generation: &str,
    ) -> Result<User, ApiError> {
        if role.is_none() && password.is_none() && active.is_none() {
            return Err(ApiError::bad_request(
                "body: give at least one of role, password, active",
            ));
        }
        if !valid_name(name) {
            return Err(no_such_user(name));
        }
        let hash = match password {
            Some(password) => {
                password::check_length(&password)?;
                Some(self.hashing.hash(password).await?)
            }
            None => None,
        };
        let mut invocation = changing(&self.scripts.update, name);
        invocation
            .arg(role.map_or("", Role::as_str))
            .arg(hash.unwrap_or_default())
            .arg(active.map_or("", flag))
            .arg(generation);
        let outcome: Vec<String> = self.store.script(invocation).await?;
        match outcome.as_slice() {
            [status, role, active] if status == "ok" => Ok(User {
                username: name.to_string(),
                role: Role::parse(role)
                    .ok_or_else(|| ApiError::internal("the user's record is damaged"))?,
                active: active == "1",
            }),
            [status] if status == "missing" => Err(no_such_user(name)),
            [status] if status == "last_admin" => Err(last_admin(name)),
            [status] if status == "stale" => Err(self.stale().await),
            _ => Err(ApiError::internal("unexpected answer from Redis")),
        }
    }

    /// Deletes the user and revokes its tokens, on behalf of a session of `generation`.
    pub async fn delete(&self, name: &str, generation: &str) -> Result<(), ApiError> {
        if !valid_name(name) {
            return Err(no_such_user(name));
        }
        let mut invocation = changing(&self.scripts.delete, name);
        invocation.arg(name).arg(generation);
        let outcome: String = self.store.script(invocation).await?;
        match outcome.as_str() {
            "deleted" => Ok(()),
            "missing" => Err(no_such_user(name)),
            "last_admin" => Err(last_admin(name)),
            "stale" => Err(self.stale().await),
            _ => Err(ApiError::internal("unexpected answer from Redis")),
        }
    }

    /// A change refused because Redis lost its data after the admin's token was checked:
    /// seeds again if it must (the change must not be what stops the seeding), and refuses
    /// the token as the token check would now.
    async fn stale(&self) -> ApiError {
        self.heal(&None).await;
        lost_data()
    }
}

fn lost_data() -> ApiError {
    ApiError::invalid_token("the token was issued before Redis lost its data; log in again")
}

/// An invocation of a script that changes user `name` and revokes its tokens: what the update
/// and delete scripts share (see `lua/changing.lua`).
fn changing<'s>(script: &'s Script, name: &str) -> ScriptInvocation<'s> {
    let mut invocation = script.key(keys::user(name));
    invocation
        .key(USERS)
        .key(keys::sessions(name))
        .key(GENERATION)
        .arg(USER_PREFIX);
    invocation
}

/// The hash, role and state of a user, each `None` when the user does not exist.
type UserRecord = (Option<String>, Option<String>, Option<String>);

/// The verdict on a token from its state in Redis, the same for every protected route: first
/// whether Redis still has the data it was issued against, then whether it is live (a revoked
/// token is called revoked even when its user is gone as well), then its user.
fn admit(
    claims: Claims,
    generation: Option<String>,
    live: bool,
    role: Option<String>,
    active: Option<String>,
) -> Result<Session, ApiError> {
    if generation.as_deref() != Some(claims.generation.as_str()) {
        return Err(lost_data());
    }
    if !live {
        return Err(ApiError::invalid_token("the token has been revoked"));
    }
    let (Some(role), Some(active)) = (role, active) else {
        return Err(ApiError::invalid_token("the token's user no longer exists"));
    };
    if active != "1" {
        return Err(ApiError::invalid_token("the token's user is disabled"));
    }
    let role = Role::parse(&role).ok_or_else(|| {
        tracing::error!(user = %claims.sub, role, "a user in Redis has an unknown role");
        ApiError::internal("the user's record is damaged")
    })?;
    Ok(Session {
        actor: claims.sub.clone(),
        role,
        generation: claims.generation.clone(),
        credential: Credential::Token(claims),
    })
}

/// How long past a token's `exp` its entry in the live tokens is kept: the leeway `exp` is
/// checked with, plus a margin for backends (or replicas) whose clocks differ from the one
/// that wrote it. Dropping it early only refuses the token a little early.
const KEEP_AFTER_EXP: u64 = LEEWAY_SECONDS + 30;

fn flag(on: bool) -> &'static str {
    if on { "1" } else { "0" }
}

fn no_such_user(name: &str) -> ApiError {
    ApiError::not_found(format!("no user named {name:?}"))
}

fn last_admin(name: &str) -> ApiError {
    ApiError::conflict(format!(
        "{name:?} is the last active admin: make another admin first"
    ))
}

/// The Lua scripts, each atomic in Redis. `redis::Script` sends the SHA first and the source
/// only when Redis does not know it yet.
struct Scripts {
    seed: Script,
    open_session: Script,
    list: Script,
    create: Script,
    update: Script,
    delete: Script,
    count_visit: Script,
}

impl Scripts {
    fn new() -> Self {
        Self {
            seed: Script::new(include_str!("lua/seed.lua")),
            open_session: Script::new(include_str!("lua/open_session.lua")),
            list: Script::new(include_str!("lua/list.lua")),
            create: Script::new(include_str!("lua/create.lua")),
            update: Script::new(concat!(
                include_str!("lua/changing.lua"),
                include_str!("lua/update.lua")
            )),
            delete: Script::new(concat!(
                include_str!("lua/changing.lua"),
                include_str!("lua/delete.lua")
            )),
            count_visit: Script::new(include_str!("lua/count_visit.lua")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_names_the_first_reason_to_refuse() {
        let claims = || Claims {
            sub: "dora".into(),
            role: Role::Viewer,
            iat: 1,
            nbf: 1,
            exp: 2,
            jti: "j".into(),
            generation: "g1".into(),
        };
        let refused = |generation: Option<&str>, live, role: Option<&str>, active: Option<&str>| {
            let verdict = admit(
                claims(),
                generation.map(Into::into),
                live,
                role.map(Into::into),
                active.map(Into::into),
            );
            let error = verdict.err().expect("refused");
            (error.status.as_u16(), error.message)
        };
        let says = |status, message: &str| (status, message.to_string());
        let lost = says(
            401,
            "the token was issued before Redis lost its data; log in again",
        );
        assert_eq!(refused(None, true, Some("viewer"), Some("1")), lost);
        assert_eq!(refused(Some("g2"), true, Some("viewer"), Some("1")), lost);
        assert_eq!(
            refused(Some("g1"), false, None, None),
            says(401, "the token has been revoked")
        );
        assert_eq!(
            refused(Some("g1"), true, Some("viewer"), None),
            says(401, "the token's user no longer exists")
        );
        assert_eq!(
            refused(Some("g1"), true, Some("root"), Some("0")),
            says(401, "the token's user is disabled")
        );
        assert_eq!(
            refused(Some("g1"), true, Some("root"), Some("1")),
            says(500, "the user's record is damaged")
        );
        let session = admit(
            claims(),
            Some("g1".into()),
            true,
            Some("admin".into()),
            Some("1".into()),
        );
        assert_eq!(session.map(|s| s.role).ok(), Some(Role::Admin));
    }
}
