//! Whether a backend's response may be kept, and for how long (RFC 9111 for a shared cache,
//! RFC 5861 for the stale windows), from its status and headers and the route's settings.

use std::time::{Duration, SystemTime};

use http::{HeaderMap, StatusCode, header};

/// A route's `[routes.cache]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutePolicy {
    /// No freshness or stale window is longer, whatever the response says.
    pub max_ttl: Duration,
    /// For a response that gives no freshness of its own; zero: such responses are not kept.
    pub default_ttl: Duration,
    /// For a response whose `Cache-Control` names none.
    pub stale_while_revalidate: Duration,
    pub stale_if_error: Duration,
}

/// How long a kept response serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifetimes {
    /// Fresh for this long from when the backend made it.
    pub fresh: Duration,
    /// After that, served at once while one request refreshes it.
    pub stale_while_revalidate: Duration,
    /// After that, served when every backend fails.
    pub stale_if_error: Duration,
    /// The response said `public`: it may answer a request with credentials.
    pub public: bool,
    /// How old the response already was when it arrived (its `Age`).
    pub age: Duration,
}

/// The `Cache-Control` directives a shared cache acts on.
#[derive(Debug, Default, PartialEq, Eq)]
struct Directives {
    max_age: Option<u64>,
    s_maxage: Option<u64>,
    stale_while_revalidate: Option<u64>,
    stale_if_error: Option<u64>,
    no_store: bool,
    no_cache: bool,
    private: bool,
    public: bool,
    /// `must-revalidate`, `proxy-revalidate`, or `s-maxage` (which implies the latter): not
    /// to be served stale unless it says so itself (`stale-if-error`...).
    revalidate: bool,
}

impl Directives {
    fn parse(headers: &HeaderMap) -> Self {
        let mut out = Self::default();
        for value in headers.get_all(header::CACHE_CONTROL) {
            let Ok(value) = value.to_str() else {
                // A value that cannot be read might say `no-store`: keep nothing.
                out.no_store = true;
                continue;
            };
            for directive in value.split(',') {
                let (name, argument) = match directive.split_once('=') {
                    Some((name, argument)) => (name, Some(argument.trim().trim_matches('"'))),
                    None => (directive, None),
                };
                let seconds = || argument.and_then(delta_seconds);
                match name.trim().to_ascii_lowercase().as_str() {
                    "max-age" => out.max_age = Some(seconds().unwrap_or(0)),
                    "s-maxage" => {
                        out.s_maxage = Some(seconds().unwrap_or(0));
                        out.revalidate = true;
                    }
                    "stale-while-revalidate" => out.stale_while_revalidate = seconds(),
                    "stale-if-error" => out.stale_if_error = seconds(),
                    "no-store" => out.no_store = true,
                    // `no-cache="field"` keeps the rest of the response usable; not worth the
                    // rarity: treated as the plain directive, which is stricter.
                    "no-cache" => out.no_cache = true,
                    "private" => out.private = true,
                    "public" => out.public = true,
                    "must-revalidate" | "proxy-revalidate" => out.revalidate = true,
                    _ => {}
                }
            }
        }
        out
    }
}

/// Seconds as `delta-seconds` (RFC 9111 1.2.2): digits only; too large a number is as long
/// as any ceiling.
fn delta_seconds(text: &str) -> Option<u64> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(text.parse().unwrap_or(u64::MAX))
}

/// Statuses a cache may keep without the response saying so (RFC 9110 15.1), the ones
/// worth keeping of those.
fn cacheable_status(status: StatusCode) -> bool {
    matches!(
        status.as_u16(),
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// Statuses the route's `default_ttl` keeps when the response says nothing (nginx's
/// `proxy_cache_valid` default is 200, 301 and 302): never an error, which the request may
/// have caused as much as the resource.
fn kept_by_default(status: StatusCode) -> bool {
    matches!(status.as_u16(), 200 | 203 | 300 | 301 | 308)
}

/// How long `status` and `headers` may serve from the cache, or `None` if they are not to be
/// kept. `credentials`: the request carried `Authorization` or `Cookie`, whose answer is
/// kept only when the response says `public`.
pub fn lifetimes(
    status: StatusCode,
    headers: &HeaderMap,
    policy: &RoutePolicy,
    credentials: bool,
    now: SystemTime,
) -> Option<Lifetimes> {
    if !cacheable_status(status) || headers.contains_key(header::SET_COOKIE) {
        return None;
    }
    // `*`, or a name that cannot be read: nothing tells which requests it answers.
    if headers.get_all(header::VARY).iter().any(|v| {
        v.as_bytes()
            .split(|b| *b == b',')
            .map(<[u8]>::trim_ascii)
            .any(|f| f == b"*" || (!f.is_empty() && header::HeaderName::from_bytes(f).is_err()))
    }) {
        return None;
    }
    let directives = Directives::parse(headers);
    if directives.no_store || directives.no_cache || directives.private {
        return None;
    }
    if credentials && !directives.public {
        return None;
    }
    let age = headers
        .get(header::AGE)
        .and_then(|v| delta_seconds(v.to_str().ok()?))
        .map_or(Duration::ZERO, Duration::from_secs);
    let fresh = match directives.s_maxage.or(directives.max_age) {
        Some(seconds) => Duration::from_secs(seconds),
        None => match http_date(headers, header::EXPIRES) {
            // An `Expires` that cannot be read is in the past (RFC 9111 5.3).
            Some(None) => Duration::ZERO,
            Some(Some(expires)) => {
                let date = http_date(headers, header::DATE).flatten().unwrap_or(now);
                expires.duration_since(date).unwrap_or(Duration::ZERO)
            }
            None if kept_by_default(status) => policy.default_ttl,
            None => Duration::ZERO,
        },
    };
    let fresh = fresh.min(policy.max_ttl).saturating_sub(age);
    if fresh.is_zero() {
        return None;
    }
    let window = |said: Option<u64>, default: Duration| {
        let default = if directives.revalidate {
            Duration::ZERO
        } else {
            default
        };
        said.map_or(default, Duration::from_secs)
            .min(policy.max_ttl)
    };
    Some(Lifetimes {
        fresh,
        stale_while_revalidate: window(
            directives.stale_while_revalidate,
            policy.stale_while_revalidate,
        ),
        stale_if_error: window(directives.stale_if_error, policy.stale_if_error),
        public: directives.public,
        age,
    })
}

/// `None`: no such header; `Some(None)`: one that is not a date.
fn http_date(headers: &HeaderMap, name: header::HeaderName) -> Option<Option<SystemTime>> {
    let value = headers.get(name)?;
    Some(
        value
            .to_str()
            .ok()
            .and_then(|v| httpdate::parse_http_date(v).ok()),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(default_ttl: u64) -> RoutePolicy {
        RoutePolicy {
            max_ttl: Duration::from_secs(3600),
            default_ttl: Duration::from_secs(default_ttl),
            stale_while_revalidate: Duration::ZERO,
            stale_if_error: Duration::from_secs(5),
        }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, value.parse().expect("value"));
        }
        map
    }

    fn fresh(pairs: &[(&'static str, &str)]) -> Option<u64> {
        lifetimes(
            StatusCode::OK,
            &headers(pairs),
            &policy(0),
            false,
            SystemTime::now(),
        )
        .map(|l| l.fresh.as_secs())
    }

    #[test]
    fn freshness_comes_from_s_maxage_then_max_age_then_expires() {
        assert_eq!(fresh(&[("cache-control", "max-age=60")]), Some(60));
        assert_eq!(
            fresh(&[("cache-control", "max-age=0, s-maxage=30")]),
            Some(30)
        );
        assert_eq!(
            fresh(&[("cache-control", "public, max-age=\"90\"")]),
            Some(90)
        );
        let date = "Sun, 06 Nov 1994 08:49:37 GMT";
        let expires = "Sun, 06 Nov 1994 08:59:37 GMT";
        assert_eq!(fresh(&[("date", date), ("expires", expires)]), Some(600));
        assert_eq!(fresh(&[("date", date), ("expires", "0")]), None);
        assert_eq!(
            fresh(&[("cache-control", "max-age=60"), ("age", "50")]),
            Some(10)
        );
        assert_eq!(
            fresh(&[("cache-control", "max-age=60"), ("age", "70")]),
            None
        );
        // Capped by the route.
        assert_eq!(
            fresh(&[("cache-control", "max-age=99999999999999999999")]),
            Some(3600)
        );
        // Nothing said, no default: not kept.
        assert_eq!(fresh(&[]), None);
        assert_eq!(fresh(&[("cache-control", "max-age=abc")]), None);
    }

    #[test]
    fn what_forbids_keeping() {
        for forbidding in [
            vec![("cache-control", "no-store, max-age=60")],
            vec![
                ("cache-control", "max-age=60"),
                ("cache-control", "private"),
            ],
            vec![("cache-control", "NO-CACHE, max-age=60")],
            vec![("cache-control", "max-age=60"), ("set-cookie", "a=b")],
            vec![("cache-control", "max-age=60"), ("vary", "accept, *")],
        ] {
            assert_eq!(fresh(&forbidding), None, "{forbidding:?}");
        }
        let status = |code| {
            lifetimes(
                StatusCode::from_u16(code).expect("status"),
                &headers(&[("cache-control", "max-age=60")]),
                &policy(0),
                false,
                SystemTime::now(),
            )
        };
        assert!(status(404).is_some());
        assert!(status(500).is_none());
        assert!(status(206).is_none());
    }

    #[test]
    fn credentials_need_public_and_windows_default_to_the_route() {
        let now = SystemTime::now();
        let plain = headers(&[("cache-control", "max-age=60")]);
        assert!(lifetimes(StatusCode::OK, &plain, &policy(0), true, now).is_none());
        let public = headers(&[(
            "cache-control",
            "public, max-age=60, stale-while-revalidate=7",
        )]);
        let kept = lifetimes(StatusCode::OK, &public, &policy(0), true, now).expect("kept");
        assert!(kept.public);
        assert_eq!(kept.stale_while_revalidate, Duration::from_secs(7));
        assert_eq!(kept.stale_if_error, Duration::from_secs(5));
        let defaulted = lifetimes(StatusCode::OK, &HeaderMap::new(), &policy(20), false, now);
        assert_eq!(defaulted.map(|l| l.fresh), Some(Duration::from_secs(20)));
    }
}
