//! The login brute-force guard, in Redis so that it holds across every backend process and
//! every replica: one failure counter per user name and one per client address (IPv6 by /64,
//! like the proxy's guard), each living for one window from its first failure.
//!
//! An attempt is charged before the password is hashed, so parallel guesses cannot slip past
//! the count, and a refused attempt costs no hash. Past either limit the answer is `429` with
//! `Retry-After` (the seconds left in the window). A successful login clears the name's
//! counter and takes back only its own charge from the address's: otherwise a client could
//! spray guesses at many names and wipe its address's count by signing in to its own account.
//! The per-name limit bounds guesses at any one account however many addresses they come
//! from; the per-address limit bounds one client spraying many names.

use std::{
    net::{IpAddr, Ipv6Addr},
    sync::Arc,
};

use http::{HeaderValue, StatusCode, header};
use redis::Script;

use crate::{error::ApiError, store::Store, users::valid_name};

const PREFIX: &str = "gatehouse:guard:";

/// The limits, from `[backend]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardSettings {
    pub max_failures_per_user: u32,
    pub max_failures_per_ip: u32,
    pub window_seconds: u64,
}

pub struct Guard {
    store: Arc<Store>,
    settings: GuardSettings,
    charge: Script,
    success: Script,
}

impl Guard {
    pub fn new(store: Arc<Store>, settings: GuardSettings) -> Self {
        Self {
            store,
            settings,
            charge: Script::new(CHARGE),
            success: Script::new(SUCCESS),
        }
    }

    /// Counts one attempt by `client` at `user`, or refuses it with `429` when either counter
    /// is already at its limit.
    pub async fn charge(&self, user: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        let s = self.settings;
        let mut invocation = self.charge.key(user_key(user));
        invocation
            .key(client_key(client))
            .arg(s.window_seconds)
            .arg(s.max_failures_per_user)
            .arg(s.max_failures_per_ip);
        let wait: u64 = self.store.script(invocation).await?;
        if wait == 0 {
            return Ok(());
        }
        Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "too_many_attempts",
            format!("too many failed logins; try again in {wait} s"),
        )
        .with_header_value(header::RETRY_AFTER, HeaderValue::from(wait)))
    }

    /// A success clears the name's counter and undoes this attempt's charge on the address.
    pub async fn reset(&self, user: &str, client: Option<IpAddr>) -> Result<(), ApiError> {
        let mut invocation = self.success.key(user_key(user));
        invocation.key(client_key(client));
        let () = self.store.script(invocation).await?;
        Ok(())
    }
}

/// Names no user can have share one counter: they cannot be guessed right anyway, and
/// arbitrary client bytes never become a key.
fn user_key(user: &str) -> String {
    if valid_name(user) {
        format!("{PREFIX}user:{user}")
    } else {
        format!("{PREFIX}user:?")
    }
}

/// The client as the proxy saw it (`X-Real-IP`); a request straight to the socket has none.
fn client_key(client: Option<IpAddr>) -> String {
    match client.map(|ip| ip.to_canonical()) {
        Some(IpAddr::V4(ip)) => format!("{PREFIX}ip:{ip}"),
        Some(IpAddr::V6(ip)) => {
            // One host usually holds a whole /64: count it as one client.
            let bits = u128::from(ip) & !((1u128 << 64) - 1);
            format!("{PREFIX}ip:{}/64", Ipv6Addr::from(bits))
        }
        None => format!("{PREFIX}ip:local"),
    }
}

/// KEYS: user counter, client counter. ARGV: window, max per user, max per client.
/// Returns 0 when the attempt may go ahead (and is counted), otherwise the seconds to wait.
const CHARGE: &str = r"
local wait = 0
for i, key in ipairs(KEYS) do
  local failures = tonumber(redis.call('GET', key) or '0')
  if failures >= tonumber(ARGV[i + 1]) then
    wait = math.max(wait, redis.call('TTL', key), 1)
  end
end
if wait > 0 then
  return wait
end
for _, key in ipairs(KEYS) do
  if redis.call('INCR', key) == 1 then
    redis.call('EXPIRE', key, ARGV[1])
  end
end
return 0
";

/// KEYS: the name's counter, the address's counter.
const SUCCESS: &str = r"
redis.call('DEL', KEYS[1])
if redis.call('EXISTS', KEYS[2]) == 1 and redis.call('DECR', KEYS[2]) <= 0 then
  redis.call('DEL', KEYS[2])
end
";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clients_are_keyed_by_address_and_ipv6_by_64() {
        let key = |s: &str| client_key(Some(s.parse().unwrap()));
        assert_eq!(key("192.0.2.7"), "gatehouse:guard:ip:192.0.2.7");
        assert_eq!(key("::ffff:192.0.2.7"), "gatehouse:guard:ip:192.0.2.7");
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_eq!(
            key("2001:db8:1:2::5"),
            "gatehouse:guard:ip:2001:db8:1:2::/64"
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(client_key(None), "gatehouse:guard:ip:local");
        assert_eq!(user_key("alice"), "gatehouse:guard:user:alice");
        assert_eq!(user_key("a b\r\n"), "gatehouse:guard:user:?");
    }
}
