//! The backend pool: processes on Unix sockets behind a round-robin load balancer, with
//! active health checks on `/healthz` and passive failover on connect errors.
//!
//! Pingora's `Backend::new` parses TCP addresses only and `HttpPeer::new` panics on a Unix
//! address, so each backend is built from `SocketAddr::Unix` and carries a ready-made peer.

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use pingora::{
    http::RequestHeader,
    lb::{
        Backend, Backends, LoadBalancer, discovery, health_check::HttpHealthCheck,
        selection::RoundRobin,
    },
    protocols::l4::socket::SocketAddr,
    services::background::{GenBackgroundService, background_service},
    upstreams::peer::HttpPeer,
};

use crate::admin::BackendSocket;

/// A backend's name (`b1`, ...), as metrics and access logs show it; kept in its `ext`.
#[derive(Debug, Clone)]
pub struct BackendId(pub Arc<str>);

pub struct PoolSettings {
    pub backends: Vec<BackendSocket>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check_interval: Duration,
    /// How long a backend may take to answer `/healthz` (which asks Redis, so it must outlast
    /// the Redis deadline: a slow Redis is not a dead backend).
    pub health_check_timeout: Duration,
}

/// Builds the pool and the background service that keeps its health up to date.
pub fn build(
    settings: &PoolSettings,
) -> Result<GenBackgroundService<LoadBalancer<RoundRobin>>, String> {
    let mut backends = BTreeSet::new();
    for backend in &settings.backends {
        let path = &backend.socket;
        let text = path
            .to_str()
            .ok_or_else(|| format!("{} is not UTF-8", path.display()))?;
        let mut peer = HttpPeer::new_uds(text, false, String::new())
            .map_err(|e| format!("backend socket {}: {e}", path.display()))?;
        peer.options.connection_timeout = Some(settings.connect_timeout);
        peer.options.read_timeout = Some(settings.read_timeout);
        peer.options.idle_timeout = Some(Duration::from_secs(60));
        let mut entry = Backend {
            addr: peer._address.clone(),
            weight: 1,
            ext: Default::default(),
        };
        entry.ext.insert(peer);
        entry.ext.insert(BackendId(Arc::from(backend.id.as_str())));
        backends.insert(entry);
    }
    let backends = Backends::new(discovery::Static::new(backends));
    let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);

    let mut check = HttpHealthCheck::new("localhost", false);
    check.req = RequestHeader::build("GET", b"/healthz", None)
        .map_err(|e| format!("health check request: {e}"))?;
    check
        .req
        .insert_header("host", "localhost")
        .map_err(|e| format!("health check request: {e}"))?;
    check.peer_template.options.connection_timeout = Some(settings.connect_timeout);
    check.peer_template.options.read_timeout = Some(settings.health_check_timeout);
    lb.set_health_check(Box::new(check));
    lb.health_check_frequency = Some(settings.health_check_interval);
    lb.parallel_health_check = true;
    Ok(background_service("backend health checks", lb))
}

pub struct Pool {
    lb: Arc<LoadBalancer<RoundRobin>>,
}

impl Pool {
    pub fn new(lb: Arc<LoadBalancer<RoundRobin>>) -> Self {
        Self { lb }
    }

    /// The next healthy backend that has not already failed this request. When health checks
    /// have every one marked down, an untried backend is still worth one connect attempt.
    pub fn select(&self, failed: &[SocketAddr]) -> Option<(Box<HttpPeer>, Option<Arc<str>>)> {
        let untried = |b: &Backend| !failed.contains(&b.addr);
        let backend = self
            .lb
            .select_with(b"", 256, |b, healthy| healthy && untried(b))
            .or_else(|| self.lb.select_with(b"", 256, |b, _| untried(b)))?;
        let id = backend.ext.get::<BackendId>().map(|id| id.0.clone());
        let peer = backend.ext.get::<HttpPeer>().cloned().map(Box::new)?;
        Some((peer, id))
    }
}
