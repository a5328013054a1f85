//! `[proxy]` and `[limits]`: the HTTP listener, the proxy process, and what one client and
//! one request may take.

use std::{net::SocketAddr, time::Duration};

use gatehouse_proxy::RequestLimits;

use super::{
    error::{ConfigError, Source},
    raw::{RawLimits, RawProxy},
};

pub struct Listener {
    pub listen: SocketAddr,
    pub threads: usize,
    pub shutdown_grace: Duration,
}

pub fn validate(p: &RawProxy, source: &Source) -> Result<Listener, ConfigError> {
    let listen = source
        .listen(&p.listen, "proxy.listen", false)?
        .ok_or_else(|| source.at("proxy.listen", "the HTTP listener cannot be off".into()))?;
    let threads = match p.threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => {
            source.within(n, 1..=256, "proxy.threads")?;
            n
        }
    };
    let shutdown_grace = Duration::from_secs(source.seconds(
        p.shutdown_grace.0,
        Duration::ZERO..=Duration::from_secs(3600),
        "proxy.shutdown_grace",
    )?);
    Ok(Listener {
        listen,
        threads,
        shutdown_grace,
    })
}

/// The limits, and the streams one HTTP/2 connection may have open.
pub fn limits(l: &RawLimits, source: &Source) -> Result<(RequestLimits, u32), ConfigError> {
    source.within(l.max_body_bytes, 1..=1 << 30, "limits.max_body_bytes")?;
    // Pingora refuses more than 1 MiB read with a header (body bytes included) and more than
    // 256 fields; a quarter of that leaves room for the body's first bytes.
    source.within(
        l.max_header_bytes,
        1024..=256 << 10,
        "limits.max_header_bytes",
    )?;
    source.within(l.max_headers, 8..=256, "limits.max_headers")?;
    let deadline = |value: Duration, key: &str| {
        source.duration(
            value,
            Duration::from_millis(100)..=Duration::from_secs(600),
            key,
        )
    };
    let header_timeout = deadline(l.header_timeout.0, "limits.header_timeout")?;
    let body_timeout = deadline(l.body_timeout.0, "limits.body_timeout")?;
    let send_timeout = deadline(l.send_timeout.0, "limits.send_timeout")?;
    let tls_handshake_timeout =
        deadline(l.tls_handshake_timeout.0, "limits.tls_handshake_timeout")?;
    source.within(l.max_connections, 1..=1_000_000, "limits.max_connections")?;
    source.within(
        l.max_connections_per_client,
        1..=1_000_000,
        "limits.max_connections_per_client",
    )?;
    source.within(
        l.max_upstream_requests_per_client,
        1..=1_000_000,
        "limits.max_upstream_requests_per_client",
    )?;
    source.within(
        l.max_requests_per_connection,
        1..=10_000_000,
        "limits.max_requests_per_connection",
    )?;
    source.within(l.h2_max_streams, 1..=1000, "limits.h2_max_streams")?;
    source.within(
        l.max_upgraded_per_client,
        1..=100_000,
        "limits.max_upgraded_per_client",
    )?;
    let upgrade_idle_timeout = source.duration(
        l.upgrade_idle_timeout.0,
        Duration::from_secs(1)..=Duration::from_secs(24 * 3600),
        "limits.upgrade_idle_timeout",
    )?;
    Ok((
        RequestLimits {
            max_body_bytes: l.max_body_bytes,
            max_header_bytes: l.max_header_bytes,
            max_headers: l.max_headers,
            header_timeout,
            body_timeout,
            max_connections: l.max_connections,
            max_connections_per_client: l.max_connections_per_client,
            send_timeout,
            tls_handshake_timeout,
            max_upstream_requests_per_client: l.max_upstream_requests_per_client,
            max_requests_per_connection: l.max_requests_per_connection,
            upgrade_idle_timeout,
            max_upgraded_per_client: l.max_upgraded_per_client,
        },
        l.h2_max_streams,
    ))
}
