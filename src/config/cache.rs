//! `[cache]`, the memory for kept backend responses, and each route's `[routes.cache]`.

use std::time::Duration;

use gatehouse_proxy::cache::{CacheSettings, RoutePolicy};

use super::{
    error::{ConfigError, Source},
    raw::{RawCache, RawRouteCache},
};

/// Nothing is kept longer: a year, the longest `max-age` RFC 9111 asks a cache to honour.
const LONGEST: Duration = Duration::from_secs(365 * 24 * 3600);

pub fn validate(c: &RawCache, source: &Source) -> Result<CacheSettings, ConfigError> {
    source.positive(c.max_bytes, "cache.max_bytes")?;
    source.positive(c.max_object_bytes, "cache.max_object_bytes")?;
    if c.max_object_bytes > c.max_bytes / 2 {
        return Err(source.at(
            "cache.max_object_bytes",
            format!(
                "{} is more than half of cache.max_bytes ({}): the memory is shared out among \
                 responses, and one that size would not be kept",
                c.max_object_bytes, c.max_bytes
            ),
        ));
    }
    let lock_timeout = source.duration(
        c.lock_timeout.0,
        Duration::ZERO..=Duration::from_secs(60),
        "cache.lock_timeout",
    )?;
    Ok(CacheSettings {
        max_bytes: c.max_bytes,
        max_object_bytes: c.max_object_bytes,
        lock_timeout,
    })
}

/// `key`: the section's own key, `routes[N].cache`.
pub fn route(c: &RawRouteCache, key: &str, source: &Source) -> Result<RoutePolicy, ConfigError> {
    let field = |name: &str| format!("{key}.{name}");
    let max_ttl = source.duration(
        c.max_ttl.0,
        Duration::from_secs(1)..=LONGEST,
        &field("max_ttl"),
    )?;
    let within = |value: Duration, name: &str| {
        source.duration(value, Duration::ZERO..=max_ttl, &field(name))
    };
    Ok(RoutePolicy {
        max_ttl,
        default_ttl: within(c.default_ttl.0, "default_ttl")?,
        stale_while_revalidate: within(c.stale_while_revalidate.0, "stale_while_revalidate")?,
        stale_if_error: within(c.stale_if_error.0, "stale_if_error")?,
    })
}
