//! Lists of networks (CIDR, IPv4 and IPv6) for allowlists, denylists and trusted proxies.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, Default)]
pub struct IpList {
    nets: Vec<IpNet>,
}

impl IpList {
    /// Parses `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a /32 or /128). An
    /// IPv4-mapped IPv6 network is stored as the IPv4 network it means.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<Self, (usize, String)> {
        let mut nets = Vec::with_capacity(entries.len());
        for (i, entry) in entries.iter().enumerate() {
            let text = entry.as_ref().trim();
            let net = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| (i, format!("{text:?} is not an IP address or CIDR network")))?;
            nets.push(match net {
                IpNet::V6(v6) if v6.addr().to_ipv4_mapped().is_some() && v6.prefix_len() >= 96 => {
                    let v4 = v6
                        .addr()
                        .to_ipv4_mapped()
                        .unwrap_or(std::net::Ipv4Addr::UNSPECIFIED);
                    IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96)
                        .map_err(|e| (i, e.to_string()))?
                }
                other => other.trunc(),
            });
        }
        Ok(Self { nets })
    }

    pub fn is_empty(&self) -> bool {
        self.nets.is_empty()
    }

    /// `ip` must be canonical (mapped IPv6 already turned into IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|net| net.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edges() {
        let list = IpList::parse(&[
            "127.0.0.1",
            "::1",
            "192.168.1.0/24",
            "10.0.0.5",
            "2001:db8::/32",
            "::ffff:172.16.0.0/108",
        ])
        .unwrap();
        for yes in [
            "127.0.0.1",
            "::1",
            "192.168.1.0",
            "192.168.1.255",
            "10.0.0.5",
            "2001:db8:ffff::1",
            "172.16.3.4",
        ] {
            assert!(list.contains(yes.parse().unwrap()), "{yes}");
        }
        for no in [
            "127.0.0.2",
            "192.168.2.1",
            "10.0.0.4",
            "10.0.0.6",
            "2001:db9::1",
            "::2",
            "172.32.0.1",
        ] {
            assert!(!list.contains(no.parse().unwrap()), "{no}");
        }
        assert_eq!(IpList::parse(&["10.0.0.0/33"]).unwrap_err().0, 0);
        assert_eq!(IpList::parse(&["10.0.0.1", "nonsense"]).unwrap_err().0, 1);
        // A network written with host bits set means the network.
        assert!(
            IpList::parse(&["10.1.2.3/8"])
                .unwrap()
                .contains("10.200.0.1".parse().unwrap())
        );
    }
}
