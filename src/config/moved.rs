//! Keys of the earlier file shape, each with where it went: a file that still sets one is
//! refused with the new key and its value already converted (`proxy.send_timeout_ms = 30000`
//! -> `use limits.send_timeout = "30s"`), rather than with "unknown field".

use std::time::Duration;

use toml::{Table, Value};

/// How an old value reads under its new key.
#[derive(Clone, Copy)]
enum Unit {
    /// The same value.
    Same,
    /// A number of milliseconds, now a duration.
    Millis,
    /// A number of seconds, now a duration.
    Seconds,
}

enum Fate {
    Moved(&'static str, Unit),
    /// Gone, and why.
    Removed(&'static str),
}

use Fate::{Moved, Removed};
use Unit::{Millis, Same, Seconds};

/// Old key -> what became of it. One place, so the docs' table of renamed keys is this one.
const TABLE: &[(&str, Fate)] = &[
    (
        "proxy.shutdown_grace_seconds",
        Moved("proxy.shutdown_grace", Seconds),
    ),
    (
        "proxy.upstream_connect_timeout_ms",
        Moved("upstream.connect_timeout", Millis),
    ),
    (
        "proxy.upstream_read_timeout_seconds",
        Moved("upstream.read_timeout", Seconds),
    ),
    (
        "proxy.health_check_interval_ms",
        Moved("upstream.health_check_interval", Millis),
    ),
    (
        "proxy.upstream_max_connections",
        Moved("upstream.max_connections", Same),
    ),
    (
        "proxy.upstream_queue_timeout_ms",
        Moved("upstream.queue_timeout", Millis),
    ),
    (
        "proxy.upstream_max_requests_per_client",
        Moved("limits.max_upstream_requests_per_client", Same),
    ),
    ("proxy.max_body_bytes", Moved("limits.max_body_bytes", Same)),
    (
        "proxy.max_header_bytes",
        Moved("limits.max_header_bytes", Same),
    ),
    ("proxy.max_headers", Moved("limits.max_headers", Same)),
    (
        "proxy.header_timeout_ms",
        Moved("limits.header_timeout", Millis),
    ),
    (
        "proxy.body_timeout_ms",
        Moved("limits.body_timeout", Millis),
    ),
    (
        "proxy.send_timeout_ms",
        Moved("limits.send_timeout", Millis),
    ),
    (
        "proxy.tls_handshake_timeout_ms",
        Moved("limits.tls_handshake_timeout", Millis),
    ),
    (
        "proxy.max_connections",
        Moved("limits.max_connections", Same),
    ),
    (
        "proxy.max_connections_per_client",
        Moved("limits.max_connections_per_client", Same),
    ),
    ("proxy.h2_max_streams", Moved("limits.h2_max_streams", Same)),
    (
        "proxy.trusted_proxies",
        Moved("access.trusted_proxies", Same),
    ),
    (
        "proxy.client_ip_header",
        Moved("access.client_ip_header", Same),
    ),
    (
        "proxy.default_rate_limit",
        Moved("access.default_rate_limit", Same),
    ),
    (
        "proxy.rate_limit_max_keys",
        Moved("access.rate_limit_max_keys", Same),
    ),
    (
        "proxy.auth_max_failures",
        Moved("access.auth_max_failures", Same),
    ),
    (
        "proxy.auth_max_failures_per_user",
        Moved("access.auth_max_failures_per_user", Same),
    ),
    (
        "proxy.auth_failure_window_seconds",
        Moved("access.auth_failure_window", Seconds),
    ),
    (
        "proxy.auth_guard_max_keys",
        Moved("access.auth_guard_max_keys", Same),
    ),
    (
        "tls.enabled",
        Removed("removed: tls.listen = \"off\" turns HTTPS off, any address turns it on"),
    ),
    (
        "static.check_interval_ms",
        Moved("static.check_interval", Millis),
    ),
    (
        "backend.token_ttl_seconds",
        Moved("backend.token_ttl", Seconds),
    ),
    (
        "backend.login_failure_window_seconds",
        Moved("backend.login_failure_window", Seconds),
    ),
    (
        "backend.login_known_address_seconds",
        Moved("backend.login_known_address_ttl", Seconds),
    ),
    (
        "backend.header_timeout_ms",
        Moved("backend.header_timeout", Millis),
    ),
    (
        "backend.body_timeout_ms",
        Moved("backend.body_timeout", Millis),
    ),
    (
        "backend.idle_timeout_seconds",
        Moved("backend.idle_timeout", Seconds),
    ),
    (
        "backend.login_max_failures_per_user",
        // Its old meaning (one count per name, from every address) was a lockout weapon; a
        // file that still sets it must say which of the new limits it means.
        Removed(
            "renamed: failures for one user name are now counted per client address \
             (backend.login_max_failures_per_user_per_ip, default 5), with a higher ceiling \
             over every address (backend.login_max_failures_per_user_all_ips, default 100)",
        ),
    ),
    ("redis.timeout_ms", Moved("redis.timeout", Millis)),
];

/// The first (in the table's order) old key the file sets, and what to write instead.
pub fn find(file: &Table) -> Option<(&'static str, String)> {
    TABLE.iter().find_map(|(old, fate)| {
        let value = lookup(file, old)?;
        let message = match fate {
            Removed(why) => why.to_string(),
            Moved(new, unit) => format!("moved: use {new} = {}", convert(value, *unit)),
        };
        Some((*old, message))
    })
}

/// Every old key and its new name.
#[cfg(test)]
fn renames() -> impl Iterator<Item = (&'static str, Option<&'static str>)> {
    TABLE.iter().map(|(old, fate)| match fate {
        Moved(new, _) => (*old, Some(*new)),
        Removed(_) => (*old, None),
    })
}

fn lookup<'a>(table: &'a Table, path: &str) -> Option<&'a Value> {
    let (section, key) = path.split_once('.')?;
    table.get(section)?.as_table()?.get(key)
}

fn convert(value: &Value, unit: Unit) -> String {
    let duration = match (unit, value.as_integer().and_then(|n| u64::try_from(n).ok())) {
        (Millis, Some(n)) => Duration::from_millis(n),
        (Seconds, Some(n)) => Duration::from_secs(n),
        // The old spellings of "no rate limit".
        (Same, _) if matches!(value.as_str(), Some("" | "none")) => {
            return format!("\"{}\"", super::raw::OFF);
        }
        _ => return value.to_string(),
    };
    format!("\"{}\"", humantime::format_duration(duration))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_keys_are_told_their_new_key_and_value() {
        let file: Table = "[proxy]\nsend_timeout_ms = 30000\nmax_headers = 50\n"
            .parse()
            .unwrap();
        let (old, message) = find(&file).unwrap();
        assert_eq!(old, "proxy.max_headers");
        assert_eq!(message, "moved: use limits.max_headers = 50");
        let file: Table = "[proxy]\nsend_timeout_ms = 1500\n".parse().unwrap();
        let (_, message) = find(&file).unwrap();
        assert_eq!(message, "moved: use limits.send_timeout = \"1s 500ms\"");
        let file: Table = "[proxy]\ndefault_rate_limit = \"none\"\n".parse().unwrap();
        assert_eq!(
            find(&file).unwrap().1,
            "moved: use access.default_rate_limit = \"off\""
        );
        let file: Table = "[backend]\nidle_timeout_seconds = 75\n".parse().unwrap();
        assert_eq!(
            find(&file).unwrap().1,
            "moved: use backend.idle_timeout = \"1m 15s\""
        );
    }

    #[test]
    fn every_new_key_exists_and_no_old_one_does() {
        let defaults = toml::Table::try_from(super::super::raw::RawConfig::default()).unwrap();
        for (old, new) in renames() {
            assert!(lookup(&defaults, old).is_none(), "{old} is still a key");
            if let Some(new) = new {
                assert!(lookup(&defaults, new).is_some(), "{new} is no key");
            }
        }
    }
}
