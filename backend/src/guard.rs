//! The login brute-force guard, in Redis so that it holds across every backend process and
//! every replica. Three counters, each living for one window from its first failure:
//!
//! - per user name and client address (IPv6 by /64): the tight limit. Guessing at a name from
//!   one address locks that name out *for that address only*; the user logs in from any
//!   other address as usual.
//! - per client address, over every name: bounds one client spraying guesses at many names.
//! - per user name, over every address: a much higher ceiling that bounds a guesser with many
//!   addresses. It would be a lockout weapon of its own, so it does not apply to an address
//!   the user has logged in from lately (a "known" address, remembered for a while after each
//!   success): the user's own devices keep working while a botnet is held at the ceiling.
//!
//! An attempt is charged to all three before the password is hashed, in one Lua script (one
//! round trip, atomic in Redis), so parallel guesses cannot slip past a count, and a refused
//! attempt costs no hash. Past a limit the answer is `429` with `Retry-After` (the seconds left
//! in that counter's window). A success takes back only its own charge: clearing a count would
//! let anyone who shares an address with the user (or who owns an account of their own) wipe
//! the guesses counted against it.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use http::{HeaderValue, StatusCode, header};
use redis::Script;

use crate::{
    error::ApiError,
    keys,
    metrics::{GuardLimit, Metrics},
    store::Store,
    users::valid_name,
};

/// The limits, from `[backend]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    /// Failures for one user name from one client address.
    pub max_failures_per_user_per_ip: u32,
    /// Failures from one client address, whatever the names.
    pub max_failures_per_ip: u32,
    /// Failures for one user name from every address that is not known for it.
    pub max_failures_per_user_all_ips: u32,
    pub window_seconds: u64,
    /// How long an address stays known for a user after a successful login from it; 0: never
    /// (the per-name ceiling then applies to every address).
    pub known_address_seconds: u64,
}

pub struct Guard {
    store: Arc<Store>,
    settings: GuardSettings,
    metrics: Arc<Metrics>,
    charge: Script,
    take_back: Script,
}

impl Guard {
    pub fn new(store: Arc<Store>, settings: GuardSettings, metrics: Arc<Metrics>) -> Self {
        Self {
            store,
            settings,
            metrics,
            charge: Script::new(include_str!("lua/guard_charge.lua")),
            take_back: Script::new(include_str!("lua/guard_take_back.lua")),
        }
    }

    /// Counts one attempt by `client` at `user`, or refuses it with `429` when a counter that
    /// applies is already at its limit.
    pub async fn charge(&self, user: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        let s = self.settings;
        let keys = Keys::new(user, client);
        let mut invocation = self.charge.key(&keys.pair);
        invocation
            .key(&keys.client)
            .key(&keys.user)
            .key(&keys.known)
            .arg(s.window_seconds)
            .arg(s.max_failures_per_user_per_ip)
            .arg(s.max_failures_per_ip)
            .arg(s.max_failures_per_user_all_ips);
        let (wait, which): (u64, u8) = self.store.script(invocation).await?;
        if wait == 0 {
            return Ok(());
        }
        let limit = match which {
            1 => GuardLimit::UserPerIp,
            2 => GuardLimit::Ip,
            _ => GuardLimit::UserAllIps,
        };
        Err(self.throttled(limit, wait, "logins"))
    }

    /// A success takes back this attempt's charge, and remembers the address as known for
    /// the user.
    pub async fn success(&self, user: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        self.take_back(user, client, self.settings.known_address_seconds)
            .await
    }

    /// Takes back the charge of an attempt that reached no verdict (the password check was
    /// busy, or Redis failed): its client learned nothing, so it is no failure.
    pub async fn refund(&self, user: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        self.take_back(user, client, 0).await
    }

    async fn take_back(
        &self,
        user: &str,
        client: Option<IpAddr>,
        known_seconds: u64,
    ) -> Result<(), ApiError> {
        let keys = Keys::new(user, client);
        let mut invocation = self.take_back.key(&keys.pair);
        invocation
            .key(&keys.client)
            .key(&keys.user)
            .key(&keys.known)
            .arg(known_seconds);
        let () = self.store.script(invocation).await?;
        Ok(())
    }
}

impl Guard {
    pub fn settings(&self) -> GuardSettings {
        self.settings
    }

    /// The pair and address counters an API key's failures are charged to: `key:ID` stands for
    /// the user name (`id` is checked hex, or `-` for a key that could not be read).
    pub fn key_counters(&self, id: &str, client: Option<IpAddr>) -> [String; 2] {
        let client = client_part(client);
        [
            keys::guard_pair(&format!("key:{id}"), &client),
            keys::guard_ip(&client),
        ]
    }

    /// `429` for `what` (`logins`, `API keys`) from a client past a limit.
    pub(crate) fn throttled(&self, limit: GuardLimit, wait: u64, what: &str) -> ApiError {
        self.metrics.login_throttled(limit);
        ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            format!("too many failed {what}; try again in {wait} s"),
        )
        .with_header_value(header::RETRY_AFTER, HeaderValue::from(wait))
    }
}

/// The Redis keys one attempt touches.
struct Keys {
    pair: String,
    client: String,
    user: String,
    known: String,
}

impl Keys {
    fn new(user: &str, client: Option<IpAddr>) -> Self {
        let user = user_part(user);
        let client = client_part(client);
        Self {
            pair: keys::guard_pair(user, &client),
            client: keys::guard_ip(&client),
            known: keys::guard_known(user, &client),
            user: keys::guard_user(user),
        }
    }
}

/// Names no user can have share one counter: they cannot be guessed right anyway, and
/// arbitrary client bytes never become a key. A valid name has no `|`.
fn user_part(user: &str) -> &str {
    if valid_name(user) { user } else { "?" }
}

/// The client as the proxy saw it (`X-Real-IP`); a request straight to the socket has none.
pub(crate) fn client_part(client: Option<IpAddr>) -> String {
    match client.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(ip)) => ip.to_string(),
        // The proxy's stand-in for an unreadable forwarding hop (`100::/64`, discard-only,
        // RFC 6666): each address is a client of its own, not one shared /64.
        Some(IpAddr::V6(ip)) if u128::from(ip) >> 64 == 0x0100 << 48 => ip.to_string(),
        Some(IpAddr::V6(ip)) => {
            // One host usually holds a whole /64: count it as one client.
            let bits = u128::from(ip) & !((1u128 << 64) - 1);
            format!("{}/64", Ipv6Addr::from(bits))
        }
        None => "local".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_keyed_by_address_and_ipv6_by_64() {
        let key = |s: &str| Keys::new("alice", Some(s.parse().unwrap()));
        assert_eq!(key("192.0.2.7").client, "gatehouse:guard:ip:192.0.2.7");
        assert_eq!(
            key("::ffff:192.0.2.7").client,
            "gatehouse:guard:ip:192.0.2.7"
        );
        assert_eq!(
            key("2001:db8:1:2:aaaa::1").pair,
            key("2001:db8:1:2:bbbb::9").pair
        );
        assert_eq!(
            key("2001:db8:1:2::5").client,
            "gatehouse:guard:ip:2001:db8:1:2::/64"
        );
        assert_ne!(key("2001:db8:1:2::1").client, key("2001:db8:1:3::1").client);
        // The proxy's stand-ins for unreadable forwarding hops are clients of their own.
        assert_ne!(key("100::1:2:3:4").client, key("100::5:6:7:8").client);
        assert_eq!(
            key("100::1:2:3:4").client,
            "gatehouse:guard:ip:100::1:2:3:4"
        );
        let keys = key("192.0.2.7");
        assert_eq!(keys.pair, "gatehouse:guard:pair:alice|192.0.2.7");
        assert_eq!(keys.known, "gatehouse:guard:known:alice|192.0.2.7");
        assert_eq!(keys.user, "gatehouse:guard:user:alice");
        assert_eq!(Keys::new("alice", None).client, "gatehouse:guard:ip:local");
        assert_eq!(
            Keys::new("a b|\r\n", None).pair,
            "gatehouse:guard:pair:?|local"
        );
    }
}
