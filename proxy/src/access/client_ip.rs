//! Who the client is: the socket's peer, unless that peer is a trusted proxy, in which case
//! `X-Forwarded-For` (or `X-Real-IP`) names it. The chain is read from the right, skipping
//! trusted hops; the first untrusted address is the client. A client can write anything into
//! these headers, so from an untrusted peer they are ignored, and an allowlist or a rate limit
//! can never be dodged by forging them.

use std::net::IpAddr;

use super::ip_list::IpList;

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.5`) count as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Every `X-Forwarded-For` line joined into one chain: a proxy may add its own line after the
/// client's instead of extending it, and the last line is the one nearest to us.
pub fn forwarded_chain(headers: &http::HeaderMap) -> Option<String> {
    let mut lines = headers.get_all("x-forwarded-for").iter().peekable();
    lines.peek()?;
    let parts: Vec<&str> = lines.map(|v| v.to_str().unwrap_or("unreadable")).collect();
    Some(parts.join(","))
}

pub fn client_ip(peer: IpAddr, headers: &http::HeaderMap, trusted: &IpList) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    if let Some(chain) = forwarded_chain(headers) {
        let mut leftmost = peer;
        for hop in chain.rsplit(',') {
            // An unparsable hop ends the walk: what lies beyond it cannot be believed.
            let Ok(ip) = hop.trim().parse::<IpAddr>().map(canonical) else {
                return leftmost;
            };
            if !trusted.contains(ip) {
                return ip;
            }
            leftmost = ip;
        }
        return leftmost;
    }
    headers
        .get_all("x-real-ip")
        .iter()
        .next_back()
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map_or(peer, canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> http::HeaderMap {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, http::HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn untrusted_peers_cannot_forge() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let forged = headers(&[("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "127.0.0.1")]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &forged, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("203.0.113.9"), &forged, &IpList::default()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_chains_are_read_from_the_right() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let xff = |v: &'static str| headers(&[("x-forwarded-for", v)]);
        // The client may prepend lies; only the hop our proxy saw counts.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &xff("1.1.1.1, 198.51.100.7, 10.0.0.3"),
                &trusted
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("10.0.0.9"), &trusted),
            ip("10.0.0.9")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("garbage, 10.0.0.3"), &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                &headers(&[("x-real-ip", "198.51.100.8")]),
                &trusted
            ),
            ip("198.51.100.8")
        );
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &xff("::ffff:198.51.100.7"), &trusted),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn a_forged_first_line_does_not_count_when_the_proxy_adds_its_own() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        // The client sent `X-Forwarded-For: 127.0.0.1`; the proxy added a line with the truth.
        let two_lines = headers(&[
            ("x-forwarded-for", "127.0.0.1"),
            ("x-forwarded-for", "198.51.100.7"),
        ]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &two_lines, &trusted),
            ip("198.51.100.7")
        );
        let real_ip = headers(&[("x-real-ip", "127.0.0.1"), ("x-real-ip", "198.51.100.8")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &real_ip, &trusted),
            ip("198.51.100.8")
        );
    }
}
