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
    /// `X-Forwarded-Prefix` for the backend, when the rewrite removes the prefix.
    forwarded: Option<HeaderValue>,
}

impl PrefixRewrite {
    /// Both start with `/`, and both end with `/` or neither does (checked by the config),
    /// so a path never gains `//` or loses its separator.
    pub fn new(from: &str, to: &str) -> Result<Self, String> {
        if !from.starts_with('/') || !to.starts_with('/') {
            return Err(format!("{to:?} must start with `/`"));
        }
        if from.ends_with('/') != to.ends_with('/') {
            return Err(format!(
                "{to:?} must end with `/` exactly when the route's prefix {from:?} does"
            ));
        }
        if to.bytes().any(|b| !is_path_byte(b)) {
            return Err(format!(
                "{to:?} may hold only letters, digits, `/` and `-._~!$&'()*+,;=:@%`"
            ));
        }
        let forwarded = if to == "/" {
            let removed = from.trim_end_matches('/');
            Some(
                HeaderValue::from_str(removed)
                    .map_err(|_| format!("the prefix {from:?} cannot be sent in a header"))?,
            )
        } else {
            None
        };
        Ok(Self {
            from: from.to_owned(),
            to: to.to_owned(),
            forwarded,
        })
    }

    /// The target the backend gets: the route's prefix replaced in `raw` (origin form, or the
    /// absolute form's path). `None` if `raw` does not start with the prefix, which the route
    /// lookup rules out.
    pub fn upstream_target(&self, raw: &[u8]) -> Option<Vec<u8>> {
        let raw = origin_form(raw);
        let rest = &raw[raw_prefix_len(raw, self.from.as_bytes())?..];
        let mut target = Vec::with_capacity(self.to.len() + rest.len());
        target.extend_from_slice(self.to.as_bytes());
        target.extend_from_slice(rest);
        Some(target)
    }

    /// `X-Forwarded-Prefix` for the backend, when the rewrite removes the prefix.
    pub fn forwarded_prefix(&self) -> Option<&HeaderValue> {
        self.forwarded.as_ref()
    }

    /// A backend's `Location`, mapped back to the client's paths (nginx's default
    /// `proxy_redirect`): a path under `to`, on its own or in a URL naming the host the
    /// client asked for. Anything else (another site, a relative reference) is left as it is.
    pub fn location(&self, value: &HeaderValue, host: Option<&[u8]>) -> Option<HeaderValue> {
        let value = value.as_bytes();
        let (origin, path) = match split_url(value) {
            Some((origin, authority, path)) => {
                if !host.is_some_and(|h| h.eq_ignore_ascii_case(authority)) {
                    return None;
                }
                (origin, path)
            }
            // A path-absolute reference; `//host/..` names another host.
            None if value.starts_with(b"/") && !value.starts_with(b"//") => (&value[..0], value),
            None => return None,
        };
        let rest = path.strip_prefix(self.to.as_bytes())?;
        let mut mapped = Vec::with_capacity(value.len() + self.from.len());
        mapped.extend_from_slice(origin);
        mapped.extend_from_slice(self.from.as_bytes());
        mapped.extend_from_slice(rest);
        HeaderValue::from_bytes(&mapped).ok()
    }
}

/// The path and query of a target: the target itself in origin form, the part after the
/// authority in absolute form (`http://host/path`).
fn origin_form(raw: &[u8]) -> &[u8] {
    match split_url(raw) {
        Some((_, _, path)) => path,
        None => raw,
    }
}

/// `scheme://authority/path` into the part before the path, the authority, and the path
/// (`/` on; empty when there is none). `None` for anything not an `http(s)` URL.
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

/// RFC 3986's `pchar` and `/`: what a path may hold without further encoding.
fn is_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"/-._~!$&'()*+,;=:@%".contains(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strip() -> PrefixRewrite {
        PrefixRewrite::new("/flask/", "/").unwrap()
    }

    fn target(rewrite: &PrefixRewrite, raw: &str) -> Option<String> {
        rewrite
            .upstream_target(raw.as_bytes())
            .map(|t| String::from_utf8(t).unwrap())
    }

    #[test]
    fn the_prefix_is_replaced_and_the_rest_kept_as_sent() {
        let strip = strip();
        assert_eq!(
            target(&strip, "/flask/api/ping").as_deref(),
            Some("/api/ping")
        );
        assert_eq!(target(&strip, "/flask/").as_deref(), Some("/"));
        assert_eq!(
            target(&strip, "/flask/a%2Fb?x=%20y").as_deref(),
            Some("/a%2Fb?x=%20y")
        );
        // The prefix in any encoding the route table accepted.
        assert_eq!(target(&strip, "/fl%61sk/x").as_deref(), Some("/x"));
        assert_eq!(target(&strip, "/fl%61sk%2fx").as_deref(), Some("/x"));
        // Absolute form: the path after the authority.
        assert_eq!(
            target(&strip, "http://a.example/flask/x?q").as_deref(),
            Some("/x?q")
        );
        assert_eq!(target(&strip, "/other/x"), None);
        assert_eq!(target(&strip, "/fl%6"), None);

        let replace = PrefixRewrite::new("/v1/", "/api/v1/").unwrap();
        assert_eq!(
            target(&replace, "/v1/users").as_deref(),
            Some("/api/v1/users")
        );
        let exact = PrefixRewrite::new("/login", "/auth/login").unwrap();
        assert_eq!(
            target(&exact, "/login?next=/").as_deref(),
            Some("/auth/login?next=/")
        );
    }

    #[test]
    fn only_a_removed_prefix_is_forwarded() {
        assert_eq!(strip().forwarded_prefix().unwrap(), "/flask");
        assert!(
            PrefixRewrite::new("/v1/", "/api/")
                .unwrap()
                .forwarded_prefix()
                .is_none()
        );
    }

    #[test]
    fn rewrites_that_would_break_paths_are_refused() {
        for (from, to) in [
            ("/flask/", "/api"),
            ("/flask", "/api/"),
            ("/flask/", "api/"),
            ("/flask/", "/a b/"),
            ("/flask/", "/a\r\n/"),
        ] {
            assert!(PrefixRewrite::new(from, to).is_err(), "{from} -> {to}");
        }
    }

    #[test]
    fn locations_under_the_backends_prefix_are_mapped_back() {
        let strip = strip();
        let host = Some(&b"edge.example"[..]);
        let map = |rewrite: &PrefixRewrite, value: &str| {
            rewrite
                .location(&HeaderValue::from_str(value).unwrap(), host)
                .map(|v| v.to_str().unwrap().to_owned())
        };
        assert_eq!(map(&strip, "/api/next").as_deref(), Some("/flask/api/next"));
        assert_eq!(
            map(&strip, "https://EDGE.example/api/x?y").as_deref(),
            Some("https://EDGE.example/flask/api/x?y")
        );
        assert_eq!(
            map(&strip, "http://edge.example").as_deref(),
            None,
            "no path: not under the prefix"
        );
        assert_eq!(map(&strip, "https://elsewhere.example/api/x"), None);
        assert_eq!(map(&strip, "//elsewhere.example/api/x"), None);
        assert_eq!(map(&strip, "next"), None);

        let replace = PrefixRewrite::new("/v1/", "/api/v1/").unwrap();
        assert_eq!(
            map(&replace, "/api/v1/users/7").as_deref(),
            Some("/v1/users/7")
        );
        assert_eq!(map(&replace, "/api/v2/users"), None);
    }
}
