//! `[upstreams.NAME]`: named pools of servers, for routes to applications other than
//! gatehouse's own backends. Deadlines and the cap per server default to `[upstream]`'s.

use std::{path::Path, time::Duration};

use gatehouse_proxy::{Balance, HealthCheck, NamedPool, UpstreamServer, UpstreamTls};
use rustls::pki_types::{CertificateDer, ServerName, pem::PemObject};

use super::{
    error::{ConfigError, Source},
    raw::{OFF, RawConfig, RawNamedPool},
};

/// The name of gatehouse's own pool, which `[upstreams]` may not define again.
pub const BUILT_IN: &str = "backends";

pub fn validate(raw: &RawConfig, source: &Source) -> Result<Vec<NamedPool>, ConfigError> {
    raw.upstreams
        .iter()
        .map(|(name, pool)| one(name, pool, raw, source))
        .collect()
}

fn one(
    name: &str,
    p: &RawNamedPool,
    raw: &RawConfig,
    source: &Source,
) -> Result<NamedPool, ConfigError> {
    let key = |field: &str| format!("upstreams.{name}.{field}");
    let plain = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    if name == BUILT_IN || name.is_empty() || !name.chars().all(plain) || name.len() > 64 {
        return Err(source.at(
            &key("servers"),
            format!(
                "{name:?}: a pool's name is 1-64 of a-z, 0-9, `-` and `_`, and not \"{BUILT_IN}\" \
                 (gatehouse's own backends)"
            ),
        ));
    }
    if p.servers.is_empty() || p.servers.len() > 256 {
        return Err(source.at(&key("servers"), "list 1 to 256 servers".into()));
    }
    let mut servers = Vec::with_capacity(p.servers.len());
    for (i, text) in p.servers.iter().enumerate() {
        let server = server(text, source.base.as_path())
            .map_err(|m| source.at(&format!("upstreams.{name}.servers[{i}]"), m))?;
        if servers.contains(&server) {
            return Err(source.at(&key("servers"), format!("{text:?} is listed twice")));
        }
        servers.push(server);
    }

    let tls = match (p.tls, &p.sni, &p.ca_file) {
        (false, None, None) => None,
        (false, _, _) => {
            return Err(source.at(&key("tls"), "sni and ca_file need tls = true".into()));
        }
        (true, sni, ca_file) => {
            if let Some(sni) = sni
                && ServerName::try_from(sni.as_str()).is_err()
            {
                return Err(source.at(&key("sni"), format!("{sni:?} is not a host name")));
            }
            let unix = servers.iter().any(|s| matches!(s, UpstreamServer::Unix(_)));
            if unix && sni.is_none() {
                return Err(source.at(
                    &key("sni"),
                    "TLS over a Unix socket needs the name to check the certificate against".into(),
                ));
            }
            // The health checks send one name to every server (Pingora's checker has one
            // template), so servers under different names need the one their certificates
            // share.
            let mut names = servers.iter().filter_map(|s| match s {
                UpstreamServer::Tcp { host, .. } => Some(host),
                UpstreamServer::Unix(_) => None,
            });
            let first = names.next();
            if sni.is_none() && names.any(|n| Some(n) != first) {
                return Err(source.at(
                    &key("sni"),
                    "servers under different names need the name their certificates share".into(),
                ));
            }
            let ca = match ca_file {
                Some(file) => Some(
                    ca_certificates(&source.path(&key("ca_file"), file))
                        .map_err(|m| source.at(&key("ca_file"), m))?,
                ),
                None => None,
            };
            Some(UpstreamTls {
                sni: sni.clone(),
                ca,
            })
        }
    };

    let balance = match (p.balance.as_str(), &p.hash_header) {
        ("round_robin", None) => Balance::RoundRobin,
        ("least_connections", None) => Balance::LeastConnections,
        ("client_hash", None) => Balance::ClientHash,
        ("header_hash", Some(header)) => Balance::HeaderHash(
            http::HeaderName::from_bytes(header.as_bytes()).map_err(|_| {
                source.at(
                    &key("hash_header"),
                    format!("{header:?} is not a header name"),
                )
            })?,
        ),
        ("header_hash", None) => {
            return Err(source.at(&key("balance"), "header_hash needs hash_header".into()));
        }
        ("round_robin" | "least_connections" | "client_hash", Some(_)) => {
            return Err(source.at(
                &key("hash_header"),
                "only balance = \"header_hash\" takes hash_header".into(),
            ));
        }
        (other, _) => {
            return Err(source.at(
                &key("balance"),
                format!(
                    "{other:?}: choose round_robin, least_connections, client_hash or header_hash"
                ),
            ));
        }
    };

    let positive = Duration::from_millis(1)..=Duration::from_secs(3600);
    let or =
        |value: &Option<super::raw::Human>, default: super::raw::Human| value.unwrap_or(default).0;
    let connect_timeout = source.duration(
        or(&p.connect_timeout, raw.upstream.connect_timeout),
        positive.clone(),
        &key("connect_timeout"),
    )?;
    let read_timeout = source.duration(
        or(&p.read_timeout, raw.upstream.read_timeout),
        positive.clone(),
        &key("read_timeout"),
    )?;
    let queue_timeout = source.duration(
        or(&p.queue_timeout, raw.upstream.queue_timeout),
        Duration::ZERO..=Duration::from_secs(600),
        &key("queue_timeout"),
    )?;
    let idle_timeout = source.duration(
        p.idle_timeout.0,
        Duration::from_millis(100)..=Duration::from_secs(3600),
        &key("idle_timeout"),
    )?;
    let max_connections = p.max_connections.unwrap_or(raw.upstream.max_connections);
    source.within(max_connections, 1..=1_000_000, &key("max_connections"))?;
    let resolve_interval = source.duration(
        p.resolve_interval.0,
        Duration::from_secs(1)..=Duration::from_secs(24 * 3600),
        &key("resolve_interval"),
    )?;

    let health = match p.health_check.as_str() {
        OFF => None,
        path if path.starts_with('/') && http::uri::PathAndQuery::try_from(path).is_ok() => {
            let interval = source.duration(
                p.health_check_interval.0,
                Duration::from_millis(100)..=Duration::from_secs(3600),
                &key("health_check_interval"),
            )?;
            let timeout = source.duration(
                p.health_check_timeout.0,
                Duration::from_millis(10)..=Duration::from_secs(600),
                &key("health_check_timeout"),
            )?;
            source.within(p.health_check_rise, 1..=100, &key("health_check_rise"))?;
            source.within(p.health_check_fall, 1..=100, &key("health_check_fall"))?;
            Some(HealthCheck {
                path: path.to_owned(),
                interval,
                timeout,
                rise: p.health_check_rise,
                fall: p.health_check_fall,
            })
        }
        other => {
            return Err(source.at(
                &key("health_check"),
                format!("{other:?}: a path starting with `/`, or \"off\""),
            ));
        }
    };

    Ok(NamedPool {
        name: name.to_owned(),
        servers,
        tls,
        balance,
        health,
        connect_timeout,
        read_timeout,
        idle_timeout,
        max_connections,
        queue_timeout,
        resolve_interval,
    })
}

/// `host:port`, `[v6]:port` or `unix:PATH` (relative to the config's directory).
fn server(text: &str, base: &Path) -> Result<UpstreamServer, String> {
    if let Some(path) = text.strip_prefix("unix:") {
        let path = base.join(path);
        if path.as_os_str().len() > super::MAX_SOCKET_PATH || path.to_str().is_none() {
            return Err(format!(
                "{text:?}: the socket path is too long or not UTF-8"
            ));
        }
        return Ok(UpstreamServer::Unix(path));
    }
    let bad = || format!("{text:?}: write host:port, [v6 address]:port or unix:PATH");
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    let port: u16 = port.parse().ok().filter(|&p| p > 0).ok_or_else(bad)?;
    let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        Some(v6) => v6
            .parse::<std::net::Ipv6Addr>()
            .map_err(|_| bad())?
            .to_string(),
        None if host.parse::<std::net::Ipv4Addr>().is_ok() => host.to_owned(),
        None => {
            let name = ServerName::try_from(host).map_err(|_| bad())?;
            if !matches!(name, ServerName::DnsName(_)) {
                return Err(bad());
            }
            host.to_ascii_lowercase()
        }
    };
    Ok(UpstreamServer::Tcp { host, port })
}

/// The most a CA bundle may hold: several hundred certificates, more than the system's.
pub const MAX_CA_BUNDLE_BYTES: u64 = 1 << 20;

/// The PEM certificates in `file`, as DER (an upstream's `ca_file`, `tls.client_ca`).
pub fn ca_certificates(file: &Path) -> Result<Vec<Vec<u8>>, String> {
    use std::io::Read;
    let mut text = Vec::new();
    std::fs::File::open(file)
        .and_then(|f| f.take(MAX_CA_BUNDLE_BYTES + 1).read_to_end(&mut text))
        .map_err(|e| format!("{}: {e}", file.display()))?;
    if text.len() as u64 > MAX_CA_BUNDLE_BYTES {
        return Err(format!(
            "{}: over {MAX_CA_BUNDLE_BYTES} bytes, more than a CA bundle needs",
            file.display()
        ));
    }
    let mut found = Vec::new();
    for certificate in CertificateDer::pem_slice_iter(&text) {
        let certificate = certificate.map_err(|e| format!("{}: {e}", file.display()))?;
        // Both parsers that will read it at run time: Pingora's, and rustls's trust store.
        let mut store = rustls::RootCertStore::empty();
        if x509_parser::parse_x509_certificate(&certificate).is_err()
            || store.add(certificate.clone()).is_err()
        {
            return Err(format!(
                "{}: a certificate in it cannot be used as a CA",
                file.display()
            ));
        }
        found.push(certificate.to_vec());
    }
    if found.is_empty() {
        return Err(format!("{}: no PEM certificate in it", file.display()));
    }
    Ok(found)
}
