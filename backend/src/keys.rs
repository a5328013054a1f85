//! The Redis key schema: every key the backends read or write, and nothing else names one.
//!
//! Users and tokens ([`crate::accounts`]):
//! - `gatehouse:user:NAME`: a hash of `hash` (argon2id), `role`, `active` (`1`/`0`) and
//!   `created` (Unix seconds);
//! - `gatehouse:users`: the set of names (for the list and the last-admin check);
//! - `gatehouse:generation`: a random id made when the users are seeded, carried by every
//!   token as its `gen` claim;
//! - `gatehouse:sessions:NAME`: the user's live tokens, a sorted set of `jti` scored by the
//!   millisecond each was issued, at most `max_tokens_per_user` of them;
//! - `gatehouse:visits`: the one count `/api/count` bumps, shared by every backend and replica.
//!
//! API keys ([`crate::api_keys`]):
//! - `gatehouse:apikey:ID`: a hash of `name`, `role`, `hash` (SHA-256 of the key, hex),
//!   `created` and `last_used` (Unix seconds);
//! - `gatehouse:apikeys`: the set of ids; `gatehouse:apikey-names`: name -> id, so a name is
//!   used once.
//!
//! The audit log ([`crate::audit`]): `gatehouse:audit`, a stream capped near
//! `audit.max_events`, one JSON event per entry.
//!
//! The login guard ([`crate::guard`]), each a counter living for one window, or a marker:
//! - `gatehouse:guard:pair:NAME|ADDRESS`: failures for a name from one client;
//! - `gatehouse:guard:ip:ADDRESS`: failures from one client, whatever the names;
//! - `gatehouse:guard:user:NAME`: failures for a name from every client;
//! - `gatehouse:guard:known:NAME|ADDRESS`: set while the client is known for the name.
//!
//! An API key's failures count as `key:ID` in the pair and address counters (a name no user
//! can have: a user name has no `:`).
//!
//! The scripts name other users' keys from [`USER_PREFIX`], which fits one Redis (or a
//! primary with replicas), not Redis Cluster.

pub const USER_PREFIX: &str = "gatehouse:user:";
pub const USERS: &str = "gatehouse:users";
pub const GENERATION: &str = "gatehouse:generation";
const SESSIONS_PREFIX: &str = "gatehouse:sessions:";
pub const VISITS: &str = "gatehouse:visits";
const GUARD_PREFIX: &str = "gatehouse:guard:";
pub const API_KEY_PREFIX: &str = "gatehouse:apikey:";
pub const API_KEYS: &str = "gatehouse:apikeys";
pub const API_KEY_NAMES: &str = "gatehouse:apikey-names";
pub const AUDIT: &str = "gatehouse:audit";

pub fn api_key(id: &str) -> String {
    format!("{API_KEY_PREFIX}{id}")
}

pub fn user(name: &str) -> String {
    format!("{USER_PREFIX}{name}")
}

pub fn sessions(name: &str) -> String {
    format!("{SESSIONS_PREFIX}{name}")
}

/// `user` and `client` as the guard normalizes them: a valid name (no `|`) or `?`, an address
/// (IPv6 by /64) or `local`.
pub fn guard_pair(user: &str, client: &str) -> String {
    format!("{GUARD_PREFIX}pair:{user}|{client}")
}

pub fn guard_ip(client: &str) -> String {
    format!("{GUARD_PREFIX}ip:{client}")
}

pub fn guard_user(user: &str) -> String {
    format!("{GUARD_PREFIX}user:{user}")
}

pub fn guard_known(user: &str, client: &str) -> String {
    format!("{GUARD_PREFIX}known:{user}|{client}")
}
