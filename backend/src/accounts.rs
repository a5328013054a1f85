//! Users, roles and token sessions, kept in Redis so that every backend process and every
//! replica sees the same thing.
//!
//! Keys:
//! - `gatehouse:user:NAME`: a hash of `hash` (argon2id), `role`, `active` (`1`/`0`), `created`;
//! - `gatehouse:users`: the set of names (for the list and the last-admin check);
//! - `gatehouse:generation`: a random id made when the users are seeded, carried by every
//!   token as its `gen` claim;
//! - `gatehouse:sessions:NAME`: the user's live tokens (`jti` scored by the millisecond it
//!   was issued), at most `max_tokens_per_user` of them.
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
//! never leaves half of it written. The scripts name other users' keys from a prefix, which is
//! fine for one Redis (or a primary with replicas), not for Redis Cluster.

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicBool, AtomicU64, Ordering},
};

use redis::{Script, ScriptInvocation};
use serde::{Deserialize, Serialize};

use crate::{
    error::ApiError,
    metrics::Metrics,
    store::{Store, VISITS_KEY},
    token::{Claims, LEEWAY_SECONDS, now, now_ms},
    users::{SeedUser, hash_password, valid_name, verify_password},
};

const USER_PREFIX: &str = "gatehouse:user:";
const USERS: &str = "gatehouse:users";
const GENERATION: &str = "gatehouse:generation";
const SESSIONS_PREFIX: &str = "gatehouse:sessions:";

/// The default of `backend.max_tokens_per_user`.
pub const DEFAULT_MAX_TOKENS_PER_USER: usize = 100;
/// The most `backend.max_tokens_per_user` may be: a change to a user deletes this many
/// entries at worst, well under a millisecond of Redis's time.
pub const MAX_TOKENS_PER_USER: usize = 10_000;

pub const MIN_PASSWORD_CHARS: usize = 8;
pub const MAX_PASSWORD_CHARS: usize = 256;

/// What a user may do. Only `admin` manages users; `maintainer` and `viewer` differ only in
/// name so far, for services behind the proxy to read from `/auth/verify` or `/api/me`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Admin,
    Maintainer,
    Viewer,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Admin, Role::Maintainer, Role::Viewer];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::Maintainer => "maintainer",
            Role::Viewer => "viewer",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// A user as the API shows it: never the password or its hash.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct User {
    #[schema(example = "alice")]
    pub username: String,
    pub role: Role,
    /// A disabled user cannot log in, and its tokens stop working.
    pub active: bool,
}

/// `POST /api/users`.
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    #[schema(pattern = "^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$", example = "alice")]
    pub username: String,
    #[schema(min_length = 8, max_length = 256, format = Password, example = "correct horse battery")]
    pub password: String,
    pub role: Role,
    /// Default `true`.
    #[serde(default = "yes")]
    #[schema(default = true)]
    pub active: bool,
}

fn yes() -> bool {
    true
}

/// `PUT /api/users/{name}`: the fields to change, at least one. Any change ends the user's
/// tokens: a new role, password or state takes effect at once.
///
/// A field is absent or has a value: `null` is refused, as the schema says, rather than read
/// as "unchanged".
#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(min_properties = 1)]
pub struct UserChange {
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub role: Option<Role>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false, min_length = 8, max_length = 256, format = Password)]
    pub password: Option<String>,
    #[serde(default, deserialize_with = "present")]
    #[schema(nullable = false)]
    pub active: Option<bool>,
}

fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    value: D,
) -> Result<Option<T>, D::Error> {
    T::deserialize(value).map(Some)
}

/// A token that passed every check: signature and claims, generation, live, and its user, who
/// exists and is active. `role` is the user's role now, which is what permissions follow.
pub struct Session {
    pub claims: Claims,
    pub role: Role,
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
    /// Checked against when the user is unknown or disabled, so that costs the same time as a
    /// wrong password and does not reveal which names exist.
    decoy: String,
    scripts: Scripts,
    /// Turns at argon2id (about 19 MiB and tens of milliseconds each): a flood of logins
    /// queues here, bounded, instead of piling up on the blocking threads.
    hashing: Arc<tokio::sync::Semaphore>,
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

/// Password hashes computed at once by one backend.
const HASHING_AT_ONCE: usize = 2;
/// How long a login waits for its turn before it is told to come back.
const HASHING_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl Accounts {
    /// Hashes the decoy password: call it before serving, not on a request.
    pub fn new(
        store: Arc<Store>,
        seed: Vec<SeedUser>,
        max_tokens_per_user: usize,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let decoy = hash_password("decoy password, never matches").map_err(|e| e.0)?;
        Ok(Self {
            store,
            seed,
            decoy,
            scripts: Scripts::new(),
            hashing: Arc::new(tokio::sync::Semaphore::new(HASHING_AT_ONCE)),
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
                .key(user_key(&user.name))
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
        let hash = user.as_ref().map_or(&self.decoy, |u| &u.hash).clone();
        // argon2id takes tens of milliseconds of CPU by design.
        let matches = self
            .off_thread(move || verify_password(&hash, &password))
            .await?;
        Ok(user.filter(|_| matches))
    }

    /// The user's hash, role and state, Redis's generation and how many users it has, in one
    /// round trip.
    async fn read_user(&self, name: &str) -> Result<(UserRecord, Option<String>, u64), ApiError> {
        let mut conn = self.store.connection();
        let key = user_key(name);
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
    /// change made during its login). Past the cap, the user's oldest tokens are revoked.
    pub async fn open_session(
        &self,
        user: &Verified,
        claims: &mut Claims,
    ) -> Result<bool, ApiError> {
        let lifetime_ms = (claims.exp.saturating_sub(claims.iat) + KEEP_AFTER_EXP) * 1000;
        let mut invocation = self.scripts.open_session.key(user_key(&claims.sub));
        invocation
            .key(sessions_key(&claims.sub))
            .key(GENERATION)
            .arg(&user.hash)
            .arg(user.role.as_str())
            .arg(&claims.jti)
            .arg(now_ms())
            .arg(lifetime_ms)
            .arg(self.max_tokens_per_user);
        let (generation, dropped): (String, u64) = self.store.script(invocation).await?;
        if generation.is_empty() {
            return Ok(false);
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
        Ok(true)
    }

    /// The per-request check of a token whose signature and claims are valid: one round trip
    /// for the generation, the user's live tokens and the user's state, read at one instant
    /// (`MULTI`), so a change to the user or a loss of Redis's data cannot land between them.
    pub async fn session(&self, claims: Claims) -> Result<Session, ApiError> {
        let mut conn = self.store.connection();
        let (sessions_key, user_key) = (sessions_key(&claims.sub), user_key(&claims.sub));
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
        let mut invocation = self.scripts.count_visit.key(sessions_key(&claims.sub));
        invocation
            .key(user_key(&claims.sub))
            .key(VISITS_KEY)
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

    /// Logout: the token leaves its user's live tokens, so every backend of every replica
    /// refuses it from now on.
    pub async fn revoke(&self, claims: &Claims) -> Result<(), ApiError> {
        let mut conn = self.store.connection();
        let (sessions_key, jti) = (sessions_key(&claims.sub), claims.jti.clone());
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

    /// Creates `new`, on behalf of a session of `generation`.
    pub async fn create(&self, new: NewUser, generation: &str) -> Result<User, ApiError> {
        if !valid_name(&new.username) {
            return Err(ApiError::bad_request(
                "username: must be 1-64 characters of letters, digits, `.`, `_`, `-`, starting with a letter or digit",
            ));
        }
        check_password_length(&new.password)?;
        let hash = self.hash_off_thread(new.password).await?;
        let mut invocation = self.scripts.create.key(user_key(&new.username));
        invocation
            .key(USERS)
            .key(GENERATION)
            .arg(&new.username)
            .arg(hash)
            .arg(new.role.as_str())
            .arg(flag(new.active))
            .arg(now())
            .arg(generation);
        let created: i64 = self.store.script(invocation).await?;
        if created < 0 {
            return Err(self.stale().await);
        }
        if created == 0 {
            return Err(ApiError::conflict(format!(
                "username: a user named {:?} exists already",
                new.username
            )));
        }
        Ok(User {
            username: new.username,
            role: new.role,
            active: new.active,
        })
    }

    /// Applies `change`, on behalf of a session of `generation`; if anything changed, the
    /// user's tokens are revoked.
    pub async fn update(
        &self,
        name: &str,
        change: UserChange,
        generation: &str,
    ) -> Result<User, ApiError> {
        if change.role.is_none() && change.password.is_none() && change.active.is_none() {
            return Err(ApiError::bad_request(
                "body: give at least one of role, password, active",
            ));
        }
        if !valid_name(name) {
            return Err(no_such_user(name));
        }
        let hash = match change.password {
            Some(password) => {
                check_password_length(&password)?;
                Some(self.hash_off_thread(password).await?)
            }
            None => None,
        };
        let mut invocation = changing(&self.scripts.update, name);
        invocation
            .arg(change.role.map_or("", Role::as_str))
            .arg(hash.unwrap_or_default())
            .arg(change.active.map_or("", flag))
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
/// and delete scripts share (see `CHANGING`).
fn changing<'s>(script: &'s Script, name: &str) -> ScriptInvocation<'s> {
    let mut invocation = script.key(user_key(name));
    invocation
        .key(USERS)
        .key(sessions_key(name))
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
    Ok(Session { claims, role })
}

/// How long past a token's `exp` its entry in the live tokens is kept: the leeway `exp` is
/// checked with, plus a margin for backends (or replicas) whose clocks differ from the one
/// that wrote it. Dropping it early only refuses the token a little early.
const KEEP_AFTER_EXP: u64 = LEEWAY_SECONDS + 30;

fn user_key(name: &str) -> String {
    format!("{USER_PREFIX}{name}")
}

fn sessions_key(name: &str) -> String {
    format!("{SESSIONS_PREFIX}{name}")
}

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

fn check_password_length(password: &str) -> Result<(), ApiError> {
    let chars = password.chars().count();
    if (MIN_PASSWORD_CHARS..=MAX_PASSWORD_CHARS).contains(&chars) {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "password: must be {MIN_PASSWORD_CHARS} to {MAX_PASSWORD_CHARS} characters"
        )))
    }
}

impl Accounts {
    /// Runs password work on the blocking threads, at most [`HASHING_AT_ONCE`] at a time. A
    /// request that gives up while waiting for its turn costs nothing; one that waits too
    /// long gets `503` with `Retry-After`.
    async fn off_thread<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ApiError> {
        let permit = tokio::time::timeout(HASHING_WAIT, self.hashing.clone().acquire_owned())
            .await
            .map_err(|_| ApiError::busy())?
            .map_err(|_| ApiError::internal("cannot check the password"))?;
        tokio::task::spawn_blocking(move || {
            let _turn = permit;
            work()
        })
        .await
        .map_err(|_| ApiError::internal("cannot check the password"))
    }

    async fn hash_off_thread(&self, password: String) -> Result<String, ApiError> {
        self.off_thread(move || hash_password(&password))
            .await?
            .map_err(|e| {
                tracing::error!(error = %e, "cannot hash a password");
                ApiError::internal("cannot hash the password")
            })
    }
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
            seed: Script::new(SEED),
            open_session: Script::new(OPEN_SESSION),
            list: Script::new(LIST),
            create: Script::new(CREATE),
            update: Script::new(&format!("{CHANGING}{UPDATE}")),
            delete: Script::new(&format!("{CHANGING}{DELETE}")),
            count_visit: Script::new(COUNT_VISIT),
        }
    }
}

/// KEYS: generation, users set, then one user key per user.
/// ARGV: a fresh generation, now, then name, hash, role per user.
/// Returns the generation, how many users were copied in, and how many Redis had.
/// Seeds whenever Redis has no users and there are users to seed, under the fresh generation
/// (whatever was there: no token of before may outlive its user's record); otherwise only
/// makes the generation if there is none.
const SEED: &str = r"
local generation = redis.call('GET', KEYS[1])
local had = redis.call('SCARD', KEYS[2])
if had > 0 or #KEYS == 2 then
  if generation then
    return {generation, 0, had}
  end
  redis.call('SET', KEYS[1], ARGV[1])
  return {ARGV[1], 0, had}
end
for i = 3, #KEYS do
  local a = 3 + (i - 3) * 3
  -- A record that outlived the set of names (an eviction) keeps its password and state.
  if redis.call('EXISTS', KEYS[i]) == 0 then
    redis.call('HSET', KEYS[i], 'hash', ARGV[a + 1], 'role', ARGV[a + 2], 'active', '1',
      'created', ARGV[2])
  end
  redis.call('SADD', KEYS[2], ARGV[a])
end
redis.call('SET', KEYS[1], ARGV[1])
return {ARGV[1], #KEYS - 2, had}
";

/// KEYS: user, sessions, generation. ARGV: verified hash, role, jti, now (ms), lifetime (ms:
/// the token's time to live plus `KEEP_AFTER_EXP`), cap.
/// Drops expired entries, records the token scored by when it was issued, and past the cap
/// drops the oldest. Returns the generation ('' when refused) and how many were dropped.
const OPEN_SESSION: &str = r"
local user = redis.call('HMGET', KEYS[1], 'hash', 'role', 'active')
if user[1] ~= ARGV[1] or user[2] ~= ARGV[2] or user[3] ~= '1' then
  return {'', 0}
end
local generation = redis.call('GET', KEYS[3])
if not generation then
  return {'', 0}
end
local now, lifetime, cap = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', '(' .. (now - lifetime))
redis.call('ZADD', KEYS[2], now, ARGV[3])
local over = redis.call('ZCARD', KEYS[2]) - cap
if over > 0 then
  redis.call('ZPOPMIN', KEYS[2], over)
else
  over = 0
end
redis.call('PEXPIRE', KEYS[2], lifetime)
return {generation, over}
";

/// KEYS: users set. ARGV: user key prefix. Returns name, role, active for each user.
const LIST: &str = r"
local names = redis.call('SMEMBERS', KEYS[1])
table.sort(names)
local out = {}
for _, name in ipairs(names) do
  local user = redis.call('HMGET', ARGV[1] .. name, 'role', 'active')
  if user[1] then
    out[#out + 1] = {name, user[1], user[2] or '0'}
  end
end
return out
";

/// KEYS: user, users set, generation. ARGV: name, hash, role, active, now, the admin's
/// token's generation. Returns 1 (created), 0 (exists) or -1 (Redis lost its data since the
/// token was issued: a user created now would keep the users file from being seeded).
const CREATE: &str = r"
if redis.call('GET', KEYS[3]) ~= ARGV[6] then
  return -1
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], 'hash', ARGV[2], 'role', ARGV[3], 'active', ARGV[4],
  'created', ARGV[5])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
";

/// What the update and delete scripts share. KEYS: user, users set, sessions, generation.
/// ARGV: first the user prefix, last the admin's token's generation.
///
/// `stale`: Redis lost its data since the admin's token was issued, so the change is refused
/// as the token would be. `other_admin`: whether an active admin other than `self_key`'s user
/// exists: a change may never leave nobody able to manage users.
const CHANGING: &str = r"
local function stale()
  return redis.call('GET', KEYS[4]) ~= ARGV[#ARGV]
end
local function other_admin(users, self_key, prefix)
  for _, name in ipairs(redis.call('SMEMBERS', users)) do
    local key = prefix .. name
    if key ~= self_key then
      local user = redis.call('HMGET', key, 'role', 'active')
      if user[1] == 'admin' and user[2] == '1' then
        return true
      end
    end
  end
  return false
end
";

/// KEYS: user, users set, sessions, generation. ARGV: user prefix, role, hash, active ('' =
/// unchanged), generation of the admin's token.
/// Any change deletes the user's live tokens: at most the cap of them, so bounded work, and
/// `UNLINK` frees a large set off Redis's main thread.
const UPDATE: &str = r"
if stale() then
  return {'stale'}
end
local current = redis.call('HMGET', KEYS[1], 'role', 'active')
if not current[1] then
  return {'missing'}
end
local role = ARGV[2] ~= '' and ARGV[2] or current[1]
local active = ARGV[4] ~= '' and ARGV[4] or current[2]
local was_admin = current[1] == 'admin' and current[2] == '1'
if was_admin and not (role == 'admin' and active == '1')
    and not other_admin(KEYS[2], KEYS[1], ARGV[1]) then
  return {'last_admin'}
end
if role ~= current[1] or active ~= current[2] or ARGV[3] ~= '' then
  redis.call('HSET', KEYS[1], 'role', role, 'active', active)
  if ARGV[3] ~= '' then
    redis.call('HSET', KEYS[1], 'hash', ARGV[3])
  end
  redis.call('UNLINK', KEYS[3])
end
return {'ok', role, active}
";

/// KEYS: user, users set, sessions, generation. ARGV: user prefix, name, generation of the
/// admin's token.
const DELETE: &str = r"
if stale() then
  return 'stale'
end
local current = redis.call('HMGET', KEYS[1], 'role', 'active')
if not current[1] then
  return 'missing'
end
if current[1] == 'admin' and current[2] == '1'
    and not other_admin(KEYS[2], KEYS[1], ARGV[1]) then
  return 'last_admin'
end
redis.call('UNLINK', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[2])
return 'deleted'
";

/// KEYS: the user's live tokens, the user, the visit count, the generation. ARGV: the
/// token's jti and generation, then every role there is.
/// Returns what [`Accounts::session`] reads (generation, live, role, active) and the count
/// after this visit, counted only when [`admit`] will let the token through (generation
/// current, token live, user active, role known): a refused token must not count. Otherwise
/// the count is `nil`.
const COUNT_VISIT: &str = r"
local generation = redis.call('GET', KEYS[4])
local live = redis.call('ZSCORE', KEYS[1], ARGV[1]) and 1 or 0
local user = redis.call('HMGET', KEYS[2], 'role', 'active')
local known_role = false
for i = 3, #ARGV do
  known_role = known_role or user[1] == ARGV[i]
end
local visits = false
if generation == ARGV[2] and live == 1 and user[2] == '1' and known_role then
  visits = redis.call('INCR', KEYS[3])
end
return {generation, live, user[1], user[2], visits}
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_round_trip() {
        for role in [Role::Admin, Role::Maintainer, Role::Viewer] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
            let json = serde_json::to_string(&role).unwrap();
            assert_eq!(json, format!("\"{}\"", role.as_str()));
        }
        assert_eq!(Role::parse("Admin"), None);
    }

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

    #[test]
    fn password_length_is_counted_in_characters() {
        assert!(check_password_length("1234567").is_err());
        assert!(check_password_length("12345678").is_ok());
        assert!(check_password_length(&"é".repeat(256)).is_ok());
        let error = check_password_length(&"x".repeat(257)).unwrap_err();
        assert!(error.message.starts_with("password:"), "{}", error.message);
    }
}
