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

pub fn client_ip(
    peer: IpAddr,
    forwarded_for: Option<&[u8]>,
    real_ip: Option<&[u8]>,
    trusted: &IpList,
) -> IpAddr {
    let peer = canonical(peer);
    if trusted.is_empty() || !trusted.contains(peer) {
        return peer;
    }
    if let Some(chain) = forwarded_for.and_then(|v| std::str::from_utf8(v).ok()) {
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
    real_ip
        .and_then(|v| std::str::from_utf8(v).ok())
        .and_then(|v| v.trim().parse::<IpAddr>().ok())
        .map_or(peer, canonical)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn untrusted_peers_cannot_forge() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let forged = Some(&b"127.0.0.1"[..]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), forged, forged, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_ip(ip("203.0.113.9"), forged, None, &IpList::default()),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn trusted_chains_are_read_from_the_right() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let chain = |s: &'static str| Some(s.as_bytes());
        // The client may prepend lies; only the hop our proxy saw counts.
        assert_eq!(
            client_ip(
                ip("10.0.0.2"),
                chain("1.1.1.1, 198.51.100.7, 10.0.0.3"),
                None,
                &trusted
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), chain("10.0.0.9"), None, &trusted),
            ip("10.0.0.9")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), chain("garbage, 10.0.0.3"), None, &trusted),
            ip("10.0.0.3")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), None, Some(b"198.51.100.8"), &trusted),
            ip("198.51.100.8")
        );
        assert_eq!(
            client_ip(
                ip("::ffff:10.0.0.2"),
                chain("::ffff:198.51.100.7"),
                None,
                &trusted
            ),
            ip("198.51.100.7")
        );
    }
}
