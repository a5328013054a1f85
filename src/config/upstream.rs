//! `[upstream]`: how the proxy uses the backends (deadlines, the cap on requests in flight
//! and the queue behind it, health checks), and the backends' sockets.

use std::{path::Path, time::Duration};

use gatehouse_proxy::{BackendSocket, PoolSettings};

use super::{
    error::{ConfigError, Source},
    raw::RawUpstream,
};

/// `count` backends with their sockets in `runtime_dir`; `redis_timeout`: a backend's health
/// check asks Redis, so it is given longer than that.
pub fn validate(
    u: &RawUpstream,
    count: usize,
    runtime_dir: &Path,
    redis_timeout: Duration,
    source: &Source,
) -> Result<PoolSettings, ConfigError> {
    let positive = Duration::from_millis(1)..=Duration::from_secs(3600);
    let connect_timeout = source.duration(
        u.connect_timeout.0,
        positive.clone(),
        "upstream.connect_timeout",
    )?;
    let read_timeout =
        source.duration(u.read_timeout.0, positive.clone(), "upstream.read_timeout")?;
    let health_check_interval = source.duration(
        u.health_check_interval.0,
        Duration::from_millis(10)..=Duration::from_secs(3600),
        "upstream.health_check_interval",
    )?;
    source.within(u.max_connections, 1..=1_000_000, "upstream.max_connections")?;
    let queue_timeout = source.duration(
        u.queue_timeout.0,
        Duration::ZERO..=Duration::from_secs(600),
        "upstream.queue_timeout",
    )?;
    let socket_dir = u
        .socket_dir
        .as_ref()
        .map(|dir| source.path("upstream.socket_dir", dir));
    // A backend's socket there is `NAME.sock`, NAME up to 64 bytes.
    if let Some(dir) = &socket_dir
        && dir.as_os_str().len() > super::MAX_SOCKET_PATH - 64 - 10
    {
        return Err(source.at(
            "upstream.socket_dir",
            format!(
                "{} is too long for socket paths in it; use a shorter one",
                dir.display()
            ),
        ));
    }
    source.within(
        u.socket_dir_max_backends,
        1..=65_536,
        "upstream.socket_dir_max_backends",
    )?;
    let count = if socket_dir.is_some() { 0 } else { count };
    Ok(PoolSettings {
        socket_dir,
        socket_dir_max_backends: u.socket_dir_max_backends,
        backends: (0..count)
            .map(|i| BackendSocket {
                id: super::backend_id(i),
                socket: super::backend_socket(runtime_dir, i),
                admin_socket: Some(super::backend_admin_socket(runtime_dir, i)),
            })
            .collect(),
        connect_timeout,
        read_timeout,
        health_check_interval,
        health_check_timeout: redis_timeout + Duration::from_secs(1),
        max_connections_per_backend: u.max_connections,
        queue_timeout,
    })
}
