//! The HTTP listener's answer: a redirect to the same path and query over HTTPS.
//!
//! The host is the configured server name when there is one, otherwise the request's `Host`
//! when it is a valid host name or IP literal. Nothing else from the request reaches the
//! `Location` header, so a garbage `Host` can never redirect a client elsewhere.

use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpsRedirect {
    /// Configured server name; `None` means the request's `Host`.
    pub server_name: Option<String>,
    pub https_port: u16,
}

impl HttpsRedirect {
    /// The `Location` for a request, or `None` when no trustworthy host is known.
    /// `own_host`: the request's host is one the routes name, redirected to itself.
    pub fn location(
        &self,
        host_header: Option<&[u8]>,
        path_and_query: &str,
        own_host: bool,
    ) -> Option<String> {
        let host = match &self.server_name {
            Some(name) if !own_host => name.clone(),
            _ => valid_host(host_header?)?,
        };
        let port = if self.https_port == 443 {
            String::new()
        } else {
            format!(":{}", self.https_port)
        };
        Some(format!("https://{host}{port}{path_and_query}"))
    }
}

/// The host part of a `Host` header (port dropped) if it is a DNS name or an IP literal.
fn valid_host(header: &[u8]) -> Option<String> {
    split_host(header).map(|(host, _)| host)
}

/// A `Host` header as `host[:port]` in lower case, if the host is a DNS name or an IP
/// literal: the only form a header built from it may repeat (`$host` in header rules).
pub fn valid_authority(header: &[u8]) -> Option<String> {
    let (host, port) = split_host(header)?;
    Some(match port {
        Some(port) => format!("{host}:{port}"),
        None => host,
    })
}

/// A `Host` header's host, in lower case, and its port, if the host is a DNS name or an IP
/// literal and the port is digits.
fn split_host(header: &[u8]) -> Option<(String, Option<&str>)> {
    let text = std::str::from_utf8(header).ok()?.trim();
    if let Some(rest) = text.strip_prefix('[') {
        let (v6, after) = rest.split_once(']')?;
        v6.parse::<Ipv6Addr>().ok()?;
        let port = match after {
            "" => None,
            _ => Some(after.strip_prefix(':').filter(|port| is_port(port))?),
        };
        return Some((format!("[{}]", v6.to_ascii_lowercase()), port));
    }
    let (host, port) = match text.rsplit_once(':') {
        Some((host, port)) if is_port(port) => (host, Some(port)),
        Some(_) => return None,
        None => (text, None),
    };
    (host.parse::<Ipv4Addr>().is_ok() || is_dns_name(host))
        .then(|| (host.to_ascii_lowercase(), port))
}

fn is_port(text: &str) -> bool {
    !text.is_empty() && text.len() <= 5 && text.bytes().all(|b| b.is_ascii_digit())
}

/// RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens.
pub fn is_dns_name(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn from_host(host: &str) -> Option<String> {
        HttpsRedirect {
            server_name: None,
            https_port: 8443,
        }
        .location(Some(host.as_bytes()), "/a?b=1", false)
    }

    #[test]
    fn valid_hosts_keep_path_and_query() {
        assert_eq!(
            from_host("example.com").as_deref(),
            Some("https://example.com:8443/a?b=1")
        );
        assert_eq!(
            from_host("Example.COM:8080").as_deref(),
            Some("https://example.com:8443/a?b=1")
        );
        assert_eq!(
            from_host("127.0.0.1:8080").as_deref(),
            Some("https://127.0.0.1:8443/a?b=1")
        );
        assert_eq!(
            from_host("[::1]:8080").as_deref(),
            Some("https://[::1]:8443/a?b=1")
        );
        let fixed = HttpsRedirect {
            server_name: Some("edge.example".into()),
            https_port: 443,
        };
        assert_eq!(
            fixed.location(Some(b"evil.test"), "/", false).as_deref(),
            Some("https://edge.example/")
        );
    }

    #[test]
    fn garbage_hosts_never_become_a_location() {
        for host in [
            "evil.com/path",
            "a b",
            "evil.com@x",
            "x:99999999",
            "-bad.com",
            "[::1",
            "a..b",
            "",
            "\u{e9}.com",
            "x:y",
        ] {
            assert_eq!(from_host(host), None, "{host:?}");
        }
        let redirect = HttpsRedirect {
            server_name: None,
            https_port: 8443,
        };
        assert_eq!(redirect.location(None, "/", false), None);
    }

    #[test]
    fn authorities_keep_their_port_in_lower_case() {
        assert_eq!(
            valid_authority(b"A.Example:8080").as_deref(),
            Some("a.example:8080")
        );
        assert_eq!(valid_authority(b"[::1]").as_deref(), Some("[::1]"));
        for bad in [
            &b"a.example,evil.example"[..],
            b"a b",
            b"a\"<x>",
            b"a;evil=1",
            b"",
        ] {
            assert_eq!(
                valid_authority(bad),
                None,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }
}
