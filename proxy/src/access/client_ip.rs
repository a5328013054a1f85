//! Who the client is: the socket's peer, unless that peer is a trusted proxy, in which case
//! the header the proxy writes names it (`access.client_ip_header`, like nginx's
//! `real_ip_header`): `X-Forwarded-For` (the default) or `X-Real-IP`. Only that header is
//! read. A client can write anything into these headers, so from an untrusted peer they are
//! ignored, and an allowlist or a rate limit can never be dodged by forging them.
//!
//! `X-Forwarded-For` is read from the right, skipping trusted hops; the first untrusted address
//! is the client (nginx's `real_ip_recursive on`). Each hop is read from the header's bytes on
//! its own, so a stray non-ASCII byte in the client's part spoils that hop only, not the
//! address the proxy appended after it. A hop may carry a port (`192.0.2.7:5123`,
//! `[2001:db8::7]:5123`, as some load balancers write it). A hop that is no address at all
//! (`unknown`, garbage) stops the walk and is itself the client: it gets an address of its own
//! in the discard-only prefix `100::/64` (RFC 6666), derived from its text, so such clients
//! neither share one identity (one of them would exhaust everyone's rate limit) nor borrow a
//! trusted proxy's. Such an address is never taken for a trusted proxy, whatever
//! `trusted_proxies` says (even `::/0`), as a hop or as the socket's peer.
//!
//! `X-Real-IP` is one address: the peer of the proxy nearest to us, as that proxy wrote it.
//! No chain is walked, so this mode is safe only when every trusted proxy overwrites the
//! header rather than passing on the client's.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use sha2::Digest;

use super::ip_list::IpList;

/// What a client counts as for rate limits, the basic-auth guard and the connection caps: its
/// IPv4 address, or its IPv6 /64 (one host usually holds a whole /64 and could otherwise
/// rotate addresses). A client named by an unreadable forwarding hop keeps its whole address.
pub fn key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) if is_unreadable_hop(v6) => ip,
        IpAddr::V6(v6) => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !u128::from(u64::MAX))),
    }
}

/// Which header names the client when the peer is a trusted proxy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ClientIpHeader {
    #[default]
    XForwardedFor,
    XRealIp,
}

impl ClientIpHeader {
    /// The config value: the header's name, in lower case.
    pub fn parse(value: &str) -> Option<Self> {
        match value.to_ascii_lowercase().as_str() {
            "x-forwarded-for" => Some(Self::XForwardedFor),
            "x-real-ip" => Some(Self::XRealIp),
            _ => None,
        }
    }
}

/// The discard-only prefix `100::/64` holding the addresses of unreadable hops.
const UNREADABLE_PREFIX: u128 = 0x0100 << 112;

/// IPv4-mapped IPv6 addresses (`::ffff:10.0.0.5`) count as the IPv4 address.
pub fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Whether an address stands for an unreadable forwarding hop (see the module's doc).
pub fn is_unreadable_hop(ip: Ipv6Addr) -> bool {
    u128::from(ip) >> 64 == UNREADABLE_PREFIX >> 64
}

/// Every `X-Forwarded-For` line joined into one chain: a proxy may add its own line after the
/// client's instead of extending it, and the last line is the one nearest to us. A hop that
/// cannot be written in a header (bytes outside visible ASCII) is written as the address it
/// stands for here, so whoever reads the chain next finds the client [`client_ip`] found, and
/// the hops after it are kept.
pub fn forwarded_chain(headers: &http::HeaderMap) -> Option<String> {
    let mut lines = headers.get_all("x-forwarded-for").iter().peekable();
    lines.peek()?;
    let hops: Vec<std::borrow::Cow<'_, str>> = lines
        .flat_map(|line| line.as_bytes().split(|b| *b == b','))
        .map(|hop| match std::str::from_utf8(hop) {
            Ok(text)
                if text
                    .bytes()
                    .all(|b| b == b'\t' || (b' '..=b'~').contains(&b)) =>
            {
                text.into()
            }
            _ => hop_address(hop).to_string().into(),
        })
        .collect();
    Some(hops.join(","))
}

/// Whether a trusted peer was seen naming the client in `X-Real-IP` only, while the config
/// reads `X-Forwarded-For`: worth one warning, as versions before `access.client_ip_header`
/// fell back to it.
static REAL_IP_IGNORED: std::sync::Once = std::sync::Once::new();

pub fn client_ip(
    peer: IpAddr,
    headers: &http::HeaderMap,
    trusted: &IpList,
    header: ClientIpHeader,
) -> IpAddr {
    let peer = canonical(peer);
    // A peer in the discard prefix is never trusted, as a hop there is never: otherwise a
    // backend behind this proxy, walking the chain it forwards, would stop at that peer's
    // address where this proxy read past it, and the two would charge different clients.
    if trusted.is_empty() || is_synthetic(peer) || !trusted.contains(peer) {
        return peer;
    }
    match header {
        ClientIpHeader::XForwardedFor => {
            let mut lines = headers.get_all("x-forwarded-for").iter().rev().peekable();
            if lines.peek().is_none() {
                if headers.contains_key("x-real-ip") {
                    REAL_IP_IGNORED.call_once(|| {
                        tracing::warn!(
                            %peer,
                            "a trusted proxy sent X-Real-IP without X-Forwarded-For; only \
                             X-Forwarded-For is read: set access.client_ip_header = \"x-real-ip\" \
                             if that proxy names clients in X-Real-IP"
                        );
                    });
                }
                return peer;
            }
            let mut nearest_untrusted = peer;
            // The last line is the one nearest to us (a proxy may add a line of its own
            // instead of extending the client's), and within a line the last hop.
            for hop in lines.flat_map(|line| line.as_bytes().rsplit(|b| *b == b',')) {
                let ip = hop_address(hop);
                if is_synthetic(ip) || !trusted.contains(ip) {
                    return ip;
                }
                nearest_untrusted = ip;
            }
            // Every hop is a trusted proxy: the farthest one is where the request began.
            nearest_untrusted
        }
        // The line nearest to us, in case the client sent one of its own too.
        ClientIpHeader::XRealIp => headers
            .get_all("x-real-ip")
            .iter()
            .next_back()
            .map_or(peer, |value| hop_address(value.as_bytes())),
    }
}

fn is_synthetic(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(v6) if is_unreadable_hop(v6))
}

/// One hop's address: an IP address, with or without a port, or else the hop's own
/// address in `100::/64` (never taken for a trusted one, so the walk stops there).
fn hop_address(hop: &[u8]) -> IpAddr {
    let hop = hop.trim_ascii();
    let Ok(text) = std::str::from_utf8(hop) else {
        return synthetic(hop);
    };
    readable_hop(text).unwrap_or_else(|| synthetic(hop))
}

fn readable_hop(hop: &str) -> Option<IpAddr> {
    if let Ok(ip) = hop.parse::<IpAddr>() {
        return Some(canonical(ip));
    }
    if let Ok(socket) = hop.parse::<SocketAddr>() {
        return Some(canonical(socket.ip()));
    }
    hop.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .and_then(|h| h.parse::<Ipv6Addr>().ok())
        .map(|ip| canonical(IpAddr::V6(ip)))
}

/// The address in `100::/64` standing for an unreadable hop, derived from its bytes.
fn synthetic(hop: &[u8]) -> IpAddr {
    let digest = sha2::Sha256::digest(hop);
    let mut low = [0u8; 8];
    low.copy_from_slice(&digest[..8]);
    IpAddr::V6(Ipv6Addr::from(
        UNREADABLE_PREFIX | u128::from(u64::from_be_bytes(low)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const XFF: ClientIpHeader = ClientIpHeader::XForwardedFor;
    const REAL: ClientIpHeader = ClientIpHeader::XRealIp;

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

    fn unreadable(ip: IpAddr) -> bool {
        matches!(ip, IpAddr::V6(v6) if is_unreadable_hop(v6))
    }

    #[test]
    fn a_peer_in_the_discard_prefix_is_never_trusted() {
        // Found by the client_ip fuzz target: with `::/0` trusted, a peer in 100::/64 was
        // trusted as a socket peer but not as the hop this proxy forwards, so the proxy charged
        // the client its header named and a backend behind it charged the peer.
        let trusted = IpList::parse(&["::/0"]).unwrap();
        let peer = ip("100::5d:0");
        let sent = headers(&[("x-forwarded-for", ""), ("x-real-ip", "2001:db8::1")]);
        for header in [XFF, REAL] {
            assert_eq!(client_ip(peer, &sent, &trusted, header), peer);
        }
        let forwarded = headers(&[("x-forwarded-for", ", 100::5d:0")]);
        assert_eq!(client_ip(peer, &forwarded, &trusted, XFF), peer);
    }

    #[test]
    fn untrusted_peers_cannot_forge() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let forged = headers(&[("x-forwarded-for", "127.0.0.1"), ("x-real-ip", "127.0.0.1")]);
        for header in [XFF, REAL] {
            assert_eq!(
                client_ip(ip("203.0.113.9"), &forged, &trusted, header),
                ip("203.0.113.9")
            );
            assert_eq!(
                client_ip(ip("203.0.113.9"), &forged, &IpList::default(), header),
                ip("203.0.113.9")
            );
        }
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
                &trusted,
                XFF
            ),
            ip("198.51.100.7")
        );
        assert_eq!(
            client_ip(ip("10.0.0.2"), &xff("10.0.0.9"), &trusted, XFF),
            ip("10.0.0.9")
        );
        assert_eq!(
            client_ip(
                ip("::ffff:10.0.0.2"),
                &xff("::ffff:198.51.100.7"),
                &trusted,
                XFF
            ),
            ip("198.51.100.7")
        );
    }

    #[test]
    fn hops_with_ports_are_read_as_their_address() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        for (chain, client) in [
            ("198.51.100.7:51234", "198.51.100.7"),
            ("[2001:db8::7]:443, 10.0.0.3:80", "2001:db8::7"),
            ("[2001:db8::8]", "2001:db8::8"),
        ] {
            let map = http::HeaderMap::from_iter([(
                http::header::HeaderName::from_static("x-forwarded-for"),
                http::HeaderValue::from_str(chain).unwrap(),
            )]);
            assert_eq!(
                client_ip(ip("10.0.0.2"), &map, &trusted, XFF),
                ip(client),
                "{chain}"
            );
        }
    }

    #[test]
    fn an_unparsable_hop_is_the_client_with_an_identity_of_its_own() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let xff = |v: &'static str| headers(&[("x-forwarded-for", v)]);
        let peer = ip("10.0.0.2");
        let garbage = client_ip(peer, &xff("198.51.100.7, garbage, 10.0.0.3"), &trusted, XFF);
        // The walk stops at the hop: what lies beyond it cannot be believed...
        assert!(unreadable(garbage), "{garbage}");
        assert_ne!(garbage, ip("198.51.100.7"));
        // ...and it is neither the trusted proxy nor shared with other unreadable hops.
        assert_ne!(garbage, peer);
        assert_ne!(garbage, ip("10.0.0.3"));
        let unknown = client_ip(peer, &xff("unknown"), &trusted, XFF);
        assert!(unreadable(unknown));
        assert_ne!(garbage, unknown);
        assert_eq!(
            client_ip(peer, &xff("garbage"), &trusted, XFF),
            garbage,
            "the same hop is the same client"
        );
        // Each keeps its own rate-limit bucket (not grouped by /64 like other IPv6 clients).
        assert_ne!(key(garbage), key(unknown));
        assert!(!trusted.contains(garbage));
        // So does an unreadable X-Real-IP.
        assert!(unreadable(client_ip(
            peer,
            &headers(&[("x-real-ip", "not-an-ip")]),
            &trusted,
            REAL
        )));
    }

    #[test]
    fn only_the_configured_header_names_the_client() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let peer = ip("10.0.0.2");
        let both = headers(&[
            ("x-forwarded-for", "198.51.100.7"),
            ("x-real-ip", "198.51.100.8"),
        ]);
        assert_eq!(client_ip(peer, &both, &trusted, XFF), ip("198.51.100.7"));
        assert_eq!(client_ip(peer, &both, &trusted, REAL), ip("198.51.100.8"));
        // The configured header missing: the peer itself is the client.
        let real_only = headers(&[("x-real-ip", "198.51.100.8")]);
        assert_eq!(client_ip(peer, &real_only, &trusted, XFF), peer);
        let xff_only = headers(&[("x-forwarded-for", "198.51.100.7")]);
        assert_eq!(client_ip(peer, &xff_only, &trusted, REAL), peer);
        // X-Real-IP is one address, the proxy's word, whatever it names.
        assert_eq!(
            client_ip(
                peer,
                &headers(&[("x-real-ip", " 10.0.0.9 ")]),
                &trusted,
                REAL
            ),
            ip("10.0.0.9")
        );
        assert_eq!(
            ClientIpHeader::parse("X-Real-IP"),
            Some(ClientIpHeader::XRealIp)
        );
        assert_eq!(ClientIpHeader::parse("forwarded"), None);
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
            client_ip(ip("10.0.0.2"), &two_lines, &trusted, XFF),
            ip("198.51.100.7")
        );
        let real_ip = headers(&[("x-real-ip", "127.0.0.1"), ("x-real-ip", "198.51.100.8")]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &real_ip, &trusted, REAL),
            ip("198.51.100.8")
        );
    }

    #[test]
    fn a_non_ascii_byte_spoils_only_its_own_hop() {
        let trusted = IpList::parse(&["10.0.0.0/8"]).unwrap();
        let peer = ip("10.0.0.2");
        let raw = |bytes: &[u8]| {
            let mut map = http::HeaderMap::new();
            map.append(
                "x-forwarded-for",
                http::HeaderValue::from_bytes(bytes).unwrap(),
            );
            map
        };
        // The client wrote a Latin-1 byte; nginx appended the address it saw.
        let appended = raw(b"caf\xe9, 198.51.100.7");
        assert_eq!(
            client_ip(peer, &appended, &trusted, XFF),
            ip("198.51.100.7")
        );
        let appended = raw(b"\xff\xfe,198.51.100.8, 10.0.0.3");
        assert_eq!(
            client_ip(peer, &appended, &trusted, XFF),
            ip("198.51.100.8")
        );
        // As its own line too, with the proxy's line after it.
        let mut lines = raw(b"\xe9");
        lines.append(
            "x-forwarded-for",
            http::HeaderValue::from_static("198.51.100.9"),
        );
        assert_eq!(client_ip(peer, &lines, &trusted, XFF), ip("198.51.100.9"));
        // The bad hop itself, reached, is a client of its own, per byte string.
        let first = client_ip(peer, &raw(b"caf\xe9"), &trusted, XFF);
        let second = client_ip(peer, &raw(b"caf\xe8"), &trusted, XFF);
        assert!(unreadable(first) && unreadable(second));
        assert_ne!(first, second);
    }

    /// Found by fuzzing (`fuzz/fuzz_targets/client_ip.rs`): a line with an unreadable byte
    /// was forwarded as `unreadable`, so the next reader of the chain charged every such
    /// client to one address, and lost the hops a proxy had appended to the line.
    #[test]
    fn the_forwarded_chain_names_the_same_client() {
        let trusted = IpList::parse(&["10.0.0.0/8", "0.1.0.0/16"]).unwrap();
        let peer = ip("10.0.0.2");
        for line in [
            &b"\xffKs"[..],
            b"caf\xe9, 198.51.100.7",
            b"198.51.100.7, \xe9t\xe9, 10.0.0.3",
            b"203.0.113.1,\t10.0.0.4",
        ] {
            let mut sent = http::HeaderMap::new();
            sent.append(
                "x-forwarded-for",
                http::HeaderValue::from_bytes(line).unwrap(),
            );
            let client = client_ip(peer, &sent, &trusted, XFF);
            let chain = format!("{}, {peer}", forwarded_chain(&sent).unwrap());
            let mut forwarded = http::HeaderMap::new();
            forwarded.insert("x-forwarded-for", chain.parse().unwrap());
            assert_eq!(
                client_ip(peer, &forwarded, &trusted, XFF),
                client,
                "{line:?} -> {chain:?}"
            );
        }
        let readable = headers(&[("x-forwarded-for", "203.0.113.1,\t10.0.0.4")]);
        assert_eq!(
            forwarded_chain(&readable).unwrap(),
            "203.0.113.1,\t10.0.0.4"
        );
    }

    #[test]
    fn a_synthetic_address_is_never_a_trusted_proxy() {
        let everyone = IpList::parse(&["0.0.0.0/0", "::/0"]).unwrap();
        let xff = headers(&[("x-forwarded-for", "198.51.100.7, garbage, 10.0.0.3")]);
        let client = client_ip(ip("10.0.0.2"), &xff, &everyone, XFF);
        assert!(unreadable(client), "{client}");
    }
}
