//! A route's prefix rewrite (`rewrite_prefix`; nginx's `proxy_pass` with a URI): the route's
//! prefix is replaced before the request goes to the backend, and `Location` headers in its
//! responses are mapped back, so a client never sees the backend's own paths.
//!
//! The prefix is matched against the raw target as the route table matched it, after one
//! percent-decoding ([`crate::path`]): `/fl%61sk/x` takes the route `/flask/` and reaches the
//! backend as `/x`, and everything after the prefix goes on exactly as the client sent it.
//! When the rewrite removes the prefix (`rewrite_prefix = "/"`), the backend is told what was
//! removed in `X-Forwarded-Prefix` (the header Traefik and Spring use), so that the links it
//! makes (an OpenAPI document's `servers`) point back through the edge.

use http::HeaderValue;

/// `from` (the route's prefix) becomes `to` on the way to the backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefixRewrite {
    from: String,
    to: String,
    /// `X-Forwarded-Prefix` for the backend: what the rewrite removed from the front, when it
    /// only removed (`/flask/` to `/`, `/flask/login` to `/login`).
    forwarded: Option<HeaderValue>,
}

/// Why a request cannot go to the backend under a rewrite.
#[derive(Debug, PartialEq, Eq)]
pub enum Unfit {
    /// The target does not spell the route's prefix (an odd absolute form): `400`.
    Malformed,
    /// An empty segment right after a prefix ending in `/` (`/flask//evil.example`), which
    /// would reach the backend as `//evil.example`, a host to many a redirect: `400`.
    EmptySegment,
    /// The backends' own `/healthz`, which only the proxy calls: `404`, as for any route.
    HealthCheck,
}

impl PrefixRewrite {
    /// Both start with `/`, both end with `/` or neither does, and both are plain path
    /// characters with no `%`, `//` or dot segment: the rewritten path stays a valid path
    /// with the separators it had, and the prefix can be sent in a header as it is.
    pub fn new(from: &str, to: &str) -> Result<Self, String> {
        Self::for_key(from, to, "rewrite_prefix")
    }

    /// As [`PrefixRewrite::new`], for `to` set by the config key `key` (`redirect`).
    pub fn for_key(from: &str, to: &str, key: &str) -> Result<Self, String> {
        for (what, value) in [("the route's prefix", from), (key, to)] {
            if !value.starts_with('/') {
                return Err(format!("{what} {value:?} must start with `/`"));
            }
            if value.bytes().any(|b| !is_plain_path_byte(b)) {
                return Err(format!(
                    "{what} {value:?} may hold only letters, digits, `/` and \
                     `-._~!$&'()*+,;=:@` when the prefix is replaced"
                ));
            }
            if value.contains("//") || value.split('/').any(|s| s == "." || s == "..") {
                return Err(format!("{what} {value:?} has an empty or dot segment"));
            }
        }
        if from.ends_with('/') != to.ends_with('/') {
            return Err(format!(
                "{to:?} must end with `/` exactly when the route's prefix {from:?} does"
            ));
        }
        if from == to {
            return Err(format!(
                "{to:?} is the route's prefix itself: nothing to replace"
            ));
        }
        // What was removed from the front, if that is all the rewrite does.
        let removed = match to {
            "/" => from.strip_suffix('/'),
            _ => from.strip_suffix(to),
        };
        let forwarded = removed
            .filter(|r| !r.is_empty())
            .and_then(|r| HeaderValue::from_str(r).ok());
        Ok(Self {
            from: from.to_owned(),
            to: to.to_owned(),
            forwarded,
        })
    }

    /// The target the backend gets: the route's prefix replaced in `raw` (origin form, or
    /// the path of an absolute form), the rest exactly as sent.
    pub fn upstream_target(&self, raw: &[u8]) -> Result<Vec<u8>, Unfit> {
        let raw = origin_form(raw);
        let at = raw_prefix_len(raw, self.from.as_bytes()).ok_or(Unfit::Malformed)?;
        let rest = &raw[at..];
        if self.to.ends_with('/')
            && (rest.starts_with(b"/") || rest.len() >= 3 && rest[..3].eq_ignore_ascii_case(b"%2f"))
        {
            return Err(Unfit::EmptySegment);
        }
        let mut target = Vec::with_capacity(self.to.len() + rest.len());
        target.extend_from_slice(self.to.as_bytes());
        target.extend_from_slice(rest);
        let path = target.split(|&b| b == b'?').next().unwrap_or_default();
        if percent_encoding::percent_decode(path).eq(b"/healthz".iter().copied()) {
            return Err(Unfit::HealthCheck);
        }
        Ok(target)
    }

    /// `X-Forwarded-Prefix` for the backend, when the rewrite only removes a prefix.
    pub fn forwarded_prefix(&self) -> Option<&HeaderValue> {
        self.forwarded.as_ref()
    }

    /// A backend's `Location`, mapped back to the client's paths (nginx's default
    /// `proxy_redirect`): a path under `to`, on its own or in a URL naming the host the
    /// client asked for. Left as it is: another site, a relative reference, a path that
    /// already starts with the prefix the backend was told of (it made its links with
    /// `X-Forwarded-Prefix`), and anything that would map to `//host` or `/\host`.
    pub fn location(&self, value: &HeaderValue, host: Option<&[u8]>) -> Option<HeaderValue> {
        let value = value.as_bytes();
        let (origin, path) = match split_url(value) {
            Some((origin, authority, path)) => {
                if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
                    return None;
                }
                // `http://host` is the root.
                (origin, if path.is_empty() { &b"/"[..] } else { path })
            }
            // A path-absolute reference; `//host/..` names another host.
            None if value.starts_with(b"/") && !value.starts_with(b"//") => (&value[..0], value),
            None => return None,
        };
        if let Some(told) = &self.forwarded
            && let Some(after) = path.strip_prefix(told.as_bytes())
            && matches!(after.first(), None | Some(b'/' | b'?' | b'#'))
        {
            return None;
        }
        let rest = path.strip_prefix(self.to.as_bytes())?;
        if self.from.ends_with('/') && matches!(rest.first(), Some(b'/' | b'\\')) {
            return None;
        }
        let mut mapped = Vec::with_capacity(value.len() + self.from.len());
        mapped.extend_from_slice(origin);
        mapped.extend_from_slice(self.from.as_bytes());
        mapped.extend_from_slice(rest);
        HeaderValue::from_bytes(&mapped).ok()
    }
}

/// The path and query of a target: the target itself in origin form, the part after the
/// authority in absolute form (`scheme://host/path`, any scheme Pingora let through).
fn origin_form(raw: &[u8]) -> &[u8] {
    if raw.starts_with(b"/") {
        return raw;
    }
    let Some(scheme_end) = raw.windows(3).position(|w| w == b"://") else {
        return raw;
    };
    let after = &raw[scheme_end + 3..];
    let end = after
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(after.len());
    &after[end..]
}

/// `http(s)://authority/path` into the part before the path, the authority, and the path
/// (`/` on; empty when there is none). `None` for anything else.
fn split_url(value: &[u8]) -> Option<(&[u8], &[u8], &[u8])> {
    let scheme_len = [&b"http://"[..], b"https://"]
        .into_iter()
        .find(|s| value.len() >= s.len() && value[..s.len()].eq_ignore_ascii_case(s))?
        .len();
    let after = &value[scheme_len..];
    let end = after
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(after.len());
    let (origin, path) = value.split_at(scheme_len + end);
    Some((origin, &after[..end], path))
}

/// How many bytes of `raw` spell `prefix` once percent-decoded, as the route table decoded
/// them; `None` if they do not.
fn raw_prefix_len(raw: &[u8], prefix: &[u8]) -> Option<usize> {
    let mut at = 0;
    for &want in prefix {
        let (got, len) = match raw.get(at)? {
            b'%' => (decode_hex(raw.get(at + 1..at + 3)?)?, 3),
            &byte => (byte, 1),
        };
        if got != want {
            return None;
        }
        at += len;
    }
    Some(at)
}

fn decode_hex(pair: &[u8]) -> Option<u8> {
    let digit = |b: u8| (b as char).to_digit(16);
    Some((digit(pair[0])? * 16 + digit(pair[1])?) as u8)
}

/// RFC 3986's `pchar` and `/`, less `%`: a path with nothing encoded.
fn is_plain_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip() -> PrefixRewrite {
        PrefixRewrite::new("/flask/", "/").unwrap()
    }

    fn target(rewrite: &PrefixRewrite, raw: &str) -> Result<String, Unfit> {
        rewrite
            .upstream_target(raw.as_bytes())
            .map(|t| String::from_utf8(t).unwrap())
    }

    #[test]
    fn the_prefix_is_replaced_and_the_rest_kept_as_sent() {
        let strip = strip();
        let ok = |raw: &str| target(&strip, raw).unwrap();
        assert_eq!(ok("/flask/api/ping"), "/api/ping");
        assert_eq!(ok("/flask/"), "/");
        assert_eq!(ok("/flask/a%2Fb?x=%20y"), "/a%2Fb?x=%20y");
        // The prefix in any encoding the route table accepted.
        assert_eq!(ok("/fl%61sk/x"), "/x");
        assert_eq!(ok("/fl%61sk%2fx"), "/x");
        // Absolute form, in any scheme: the path after the authority.
        assert_eq!(ok("http://a.example/flask/x?q"), "/x?q");
        assert_eq!(ok("ws://a.example/flask/x"), "/x");
        assert_eq!(target(&strip, "http://a.example?q"), Err(Unfit::Malformed));
        assert_eq!(target(&strip, "/other/x"), Err(Unfit::Malformed));
        assert_eq!(target(&strip, "/fl%6"), Err(Unfit::Malformed));

        let replace = PrefixRewrite::new("/v1/", "/api/v1/").unwrap();
        assert_eq!(target(&replace, "/v1/users").unwrap(), "/api/v1/users");
        let exact = PrefixRewrite::new("/login", "/auth/login").unwrap();
        assert_eq!(
            target(&exact, "/login?next=/").unwrap(),
            "/auth/login?next=/"
        );
    }

    #[test]
    fn no_rewrite_makes_a_host_of_the_path_or_reaches_the_health_check() {
        let strip = strip();
        for raw in [
            "/flask//evil.example/x",
            "/flask/%2Fevil.example",
            "/flask%2F%2fx",
        ] {
            assert_eq!(target(&strip, raw), Err(Unfit::EmptySegment), "{raw}");
        }
        for raw in ["/flask/healthz", "/flask/healthz?x", "/flask/health%7a"] {
            assert_eq!(target(&strip, raw), Err(Unfit::HealthCheck), "{raw}");
        }
        assert_eq!(target(&strip, "/flask/healthz/x").unwrap(), "/healthz/x");
    }

    #[test]
    fn only_a_removed_prefix_is_forwarded() {
        let forwarded = |from, to| {
            PrefixRewrite::new(from, to)
                .unwrap()
                .forwarded_prefix()
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(forwarded("/flask/", "/").as_deref(), Some("/flask"));
        assert_eq!(
            forwarded("/flask/auth/login", "/auth/login").as_deref(),
            Some("/flask")
        );
        assert_eq!(forwarded("/a/b/api/", "/api/").as_deref(), Some("/a/b"));
        assert_eq!(forwarded("/v1/", "/api/"), None);
        assert_eq!(forwarded("/", "/app/"), None);
    }

    #[test]
    fn rewrites_that_would_break_paths_are_refused() {
        for (from, to) in [
            ("/flask/", "/api"),
            ("/flask", "/api/"),
            ("/flask/", "api/"),
            ("/flask/", "/a b/"),
            ("/flask/", "/a%20b/"),
            ("/flask/", "/a//b/"),
            ("/flask/", "/a/../b/"),
            ("/flask/", "/flask/"),
            ("/my app/", "/"),
            ("/caf\u{e9}/", "/"),
            ("/a%2f/", "/"),
        ] {
            assert!(PrefixRewrite::new(from, to).is_err(), "{from} -> {to}");
        }
        let error = PrefixRewrite::new("/my app/", "/").unwrap_err();
        assert!(error.contains("the route's prefix"), "{error}");
    }

    #[test]
    fn locations_under_the_backends_prefix_are_mapped_back() {
        let host = Some(&b"edge.example"[..]);
        let map = |rewrite: &PrefixRewrite, value: &str| {
            rewrite
                .location(&HeaderValue::from_str(value).unwrap(), host)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        let strip = strip();
        assert_eq!(map(&strip, "/api/next").as_deref(), Some("/flask/api/next"));
        assert_eq!(
            map(&strip, "https://EDGE.example/api/x?y").as_deref(),
            Some("https://EDGE.example/flask/api/x?y")
        );
        assert_eq!(
            map(&strip, "http://edge.example").as_deref(),
            Some("http://edge.example/flask/")
        );
        assert_eq!(map(&strip, "https://elsewhere.example/api/x"), None);
        assert_eq!(map(&strip, "//elsewhere.example/api/x"), None);
        assert_eq!(map(&strip, "next"), None);
        // A backend that made its link with the prefix it was told of: as it is.
        assert_eq!(map(&strip, "/flask/next"), None);
        assert_eq!(map(&strip, "/flask"), None);
        assert_eq!(map(&strip, "/flasks").as_deref(), Some("/flask/flasks"));

        let replace = PrefixRewrite::new("/v1/", "/api/v1/").unwrap();
        assert_eq!(
            map(&replace, "/api/v1/users/7").as_deref(),
            Some("/v1/users/7")
        );
        assert_eq!(map(&replace, "/api/v2/users"), None);

        // Under the root, a backend's `/app//evil.example` must not become `//evil.example`.
        let root = PrefixRewrite::new("/", "/app/").unwrap();
        assert_eq!(map(&root, "/app/x").as_deref(), Some("/x"));
        assert_eq!(map(&root, "/app//evil.example"), None);
        assert_eq!(map(&root, "/app/\\evil.example"), None);
    }
}
