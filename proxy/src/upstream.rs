//! The backend pool: processes on Unix sockets behind a round-robin load balancer, with
//! active health checks on `/healthz`, passive failover on connect errors, and a cap on the
//! requests in flight to each backend (nginx `max_conns`, HAProxy `maxconn` per server).
//!
//! The cap keeps a flood of slow or stalled clients from holding every backend connection
//! (and a backend's file descriptors) at once: past it a request waits for a slot on a
//! backend, at most `queue_timeout`, and then gets `503` with `Retry-After`. A slot is held
//! until the request is over, because Pingora keeps the backend connection until the client
//! has its response. [`crate::client_shares`] keeps any one client from taking every slot.
//!
//! Pingora's `Backend::new` parses TCP addresses only and `HttpPeer::new` panics on a Unix
//! address, so each backend is built from `SocketAddr::Unix` and carries a ready-made peer.

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{error::BuildError, forward::Deadlines};
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

use crate::settings::{Balance, PoolSettings};

/// How long an idle backend connection stays in the pool. A backend must keep its idle
/// connections open longer, or a request sent on one as it closes would fail.
pub const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// A backend process: its name, the socket it serves requests on, and the one the admin
/// listener scrapes.
#[derive(Debug, Clone)]
pub struct BackendSocket {
    pub id: String,
    /// Where it serves requests (and `/healthz`).
    pub socket: PathBuf,
    /// Where it serves `/metrics`; `None` when it runs without one.
    pub admin_socket: Option<PathBuf>,
}

/// A backend as the proxy uses it: kept in its `ext`, so a choice costs one `Arc` clone,
/// not a clone of the whole [`Backend`].
pub struct Member {
    /// Its name (`b1`, ...), as metrics and access logs show it.
    pub id: Arc<str>,
    /// Where it serves requests (and `/healthz`); empty for a named pool's server.
    pub socket: PathBuf,
    /// Where it serves `/metrics`, which the admin listener scrapes.
    pub admin_socket: Option<PathBuf>,
    /// For Pingora's own path (requests with a body, upgrades, retries).
    pub peer: HttpPeer,
    /// Where the fast path ([`crate::forward`]) connects: a server spoken to in plain HTTP.
    /// `None` for one behind TLS, which only Pingora's path reaches.
    pub dial: Option<Dial>,
    /// How long the fast path keeps a connection to it idle.
    pub idle_timeout: Duration,
    /// Free slots for requests in flight.
    slots: Arc<Semaphore>,
    /// Keep-alive connections of the fast path ([`crate::forward`]).
    pub idle: crate::forward::IdleConnections,
}

/// A plain-HTTP server's address, for the fast path.
#[derive(Debug, Clone)]
pub enum Dial {
    Unix(PathBuf),
    Tcp(std::net::SocketAddr),
}

impl Member {
    /// The load balancer's entry for a named pool's server ([`crate::pools`]).
    pub fn backend(
        id: String,
        peer: HttpPeer,
        dial: Option<Dial>,
        max_connections: usize,
    ) -> Backend {
        let mut entry = Backend {
            addr: peer._address.clone(),
            weight: 1,
            ext: Default::default(),
        };
        entry.ext.insert(Arc::new(Member {
            id: Arc::from(id),
            socket: PathBuf::new(),
            admin_socket: None,
            idle_timeout: peer.options.idle_timeout.unwrap_or(POOL_IDLE_TIMEOUT),
            peer,
            dial,
            slots: Arc::new(Semaphore::new(max_connections)),
            idle: Default::default(),
        }));
        entry
    }
}

/// A backend chosen for a request, and its slot, held until the request is over.
pub struct Chosen {
    pub member: Arc<Member>,
    pub slot: OwnedSemaphorePermit,
}

/// Why no backend was chosen.
#[derive(Debug, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend failed this request already.
    Untried,
    /// Every backend stayed at its cap until the queue deadline.
    Full,
}

/// The load balancer's entry for one backend, with its [`Member`].
pub fn entry(settings: &PoolSettings, backend: &BackendSocket) -> Result<Backend, BuildError> {
    let path = &backend.socket;
    let text = path
        .to_str()
        .ok_or_else(|| BuildError::NotUtf8(path.clone()))?;
    let mut peer = HttpPeer::new_uds(text, false, String::new()).map_err(|source| {
        BuildError::BackendSocket {
            path: path.clone(),
            source,
        }
    })?;
    peer.options.connection_timeout = Some(settings.connect_timeout);
    peer.options.read_timeout = Some(settings.read_timeout);
    peer.options.idle_timeout = Some(POOL_IDLE_TIMEOUT);
    let mut entry = Backend {
        addr: peer._address.clone(),
        weight: 1,
        ext: Default::default(),
    };
    entry.ext.insert(Arc::new(Member {
        id: Arc::from(backend.id.as_str()),
        socket: path.clone(),
        admin_socket: backend.admin_socket.clone(),
        peer,
        dial: Some(Dial::Unix(path.clone())),
        idle_timeout: POOL_IDLE_TIMEOUT,
        slots: Arc::new(Semaphore::new(settings.max_connections_per_backend)),
        idle: Default::default(),
    }));
    Ok(entry)
}

/// Builds the pool and the background service that keeps its health up to date.
pub fn build(
    settings: &PoolSettings,
) -> Result<GenBackgroundService<LoadBalancer<RoundRobin>>, BuildError> {
    let refused = Arc::new(crate::socket_dir::Refused::default());
    let backends = match &settings.socket_dir {
        Some(dir) => Backends::new(crate::socket_dir::SocketDir::new(
            dir,
            settings,
            refused.clone(),
        )),
        None => {
            let mut backends = BTreeSet::new();
            for backend in &settings.backends {
                backends.insert(entry(settings, backend)?);
            }
            Backends::new(discovery::Static::new(backends))
        }
    };
    let mut lb = LoadBalancer::<RoundRobin>::from_backends(backends);

    let mut check = HttpHealthCheck::new("localhost", false);
    check.req = RequestHeader::build("GET", b"/healthz", None).map_err(BuildError::HealthCheck)?;
    check
        .req
        .insert_header("host", "localhost")
        .map_err(BuildError::HealthCheck)?;
    check.peer_template.options.connection_timeout = Some(settings.connect_timeout);
    check.peer_template.options.read_timeout = Some(settings.health_check_timeout);
    lb.health_check_frequency = Some(settings.health_check_interval);
    if settings.socket_dir.is_some() {
        lb.update_frequency = Some(settings.health_check_interval);
        lb.set_health_check(Box::new(crate::socket_dir::RefusalCheck {
            inner: check,
            refused,
        }));
    } else {
        lb.set_health_check(Box::new(check));
    }
    lb.parallel_health_check = true;
    Ok(background_service("backend health checks", lb))
}

pub struct Pool {
    lb: Arc<LoadBalancer<RoundRobin>>,
    queue_timeout: Duration,
    deadlines: Deadlines,
    /// Where round robin goes next.
    next: AtomicUsize,
    /// How a server is picked (named pools; the built-in pool goes round robin).
    balance: Balance,
    /// Whether its servers speak plain HTTP, which the fast path speaks too.
    plain_http: bool,
}

impl Pool {
    /// `balance`: round robin for the built-in pool; a named pool's own. `plain_http`: its
    /// servers are not behind TLS.
    pub fn new(
        lb: Arc<LoadBalancer<RoundRobin>>,
        queue_timeout: Duration,
        deadlines: Deadlines,
        balance: Balance,
        plain_http: bool,
    ) -> Self {
        Self {
            lb,
            queue_timeout,
            deadlines,
            next: AtomicUsize::new(0),
            balance,
            plain_http,
        }
    }

    pub fn deadlines(&self) -> Deadlines {
        self.deadlines
    }

    /// The admin socket of a backend in rotation, for what the edge hands the backends (its
    /// audit events); `None` when none has one (a named pool's servers).
    pub fn admin_socket(&self) -> Option<std::path::PathBuf> {
        let backends = self.lb.backends();
        backends
            .get_backend()
            .iter()
            .filter(|b| backends.ready(b))
            .find_map(|b| member(b).and_then(|m| m.admin_socket.clone()))
    }

    /// Closes each server's fast-path connections idle past its deadline.
    pub fn close_idle(&self) {
        for backend in self.lb.backends().get_backend().iter() {
            if let Some(member) = member(backend) {
                member.idle.expire(member.idle_timeout);
            }
        }
    }

    /// Whether the fast path ([`crate::forward`]) can reach its servers.
    pub fn plain_http(&self) -> bool {
        self.plain_http
    }

    /// The next healthy backend with a free slot that has not already failed this request,
    /// in the order the pool's balance gives (`key`: the request's client or header hash,
    /// for the hash policies). When every one is full, the request queues at the first
    /// healthy one, until the queue deadline. When health checks have every one marked down,
    /// an untried backend is still worth one connect attempt.
    pub async fn select(
        &self,
        failed: &[SocketAddr],
        key: Option<u64>,
    ) -> Result<Chosen, NoBackend> {
        let backends = self.lb.backends();
        let members = backends.get_backend();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        // Round robin from `start`: each request starts one further along.
        let n = members.len().max(1);
        let rotation = || members.iter().cycle().skip(start % n).take(members.len());
        let ready = |b: &Backend| backends.ready(b);
        let sort = |key: &dyn Fn(&Member) -> u64| {
            let mut order: Vec<&Backend> = rotation().collect();
            // Highest first; the sort is stable, so equals stay in round robin order.
            order.sort_by_key(|b| std::cmp::Reverse(member(b).map_or(0, |m| key(m))));
            order
        };
        // Round robin takes no allocation: it is the built-in pool's, on every request.
        let pick = match (&self.balance, key) {
            (Balance::LeastConnections, _) => {
                let order = sort(&|m| m.slots.available_permits() as u64);
                pick(|| order.iter().copied(), failed, ready)
            }
            // Rendezvous hashing: each key ranks the servers its own way, so a server
            // leaving moves only its own keys.
            (Balance::ClientHash | Balance::HeaderHash(_), Some(key)) => {
                let order = sort(&|m| rank(key, &m.id));
                pick(|| order.iter().copied(), failed, ready)
            }
            (Balance::RoundRobin | Balance::ClientHash | Balance::HeaderHash(_), _) => {
                pick(rotation, failed, ready)
            }
        }?;
        let member = match pick {
            Pick::Now(chosen) => return Ok(chosen),
            Pick::Wait(member) => member,
        };
        let slots = member.slots.clone();
        match tokio::time::timeout(self.queue_timeout, slots.acquire_owned()).await {
            Ok(Ok(slot)) => Ok(Chosen { member, slot }),
            _ => Err(NoBackend::Full),
        }
    }
}

/// What [`pick`] found: a backend with a free slot, or the one to queue at.
enum Pick {
    Now(Chosen),
    Wait(Arc<Member>),
}

/// The first ready backend in `in_order` with a free slot that has not failed this request;
/// else the first ready one to queue at; else, when health checks have every one marked
/// down, the first untried one, still worth one connect attempt.
fn pick<'a, I: Iterator<Item = &'a Backend>>(
    in_order: impl Fn() -> I,
    failed: &[SocketAddr],
    ready: impl Fn(&Backend) -> bool,
) -> Result<Pick, NoBackend> {
    let untried = |b: &&Backend| !failed.contains(&b.addr);
    for backend in in_order().filter(untried).filter(|b| ready(b)) {
        if let Some(member) = member(backend)
            && let Ok(slot) = member.slots.clone().try_acquire_owned()
        {
            return Ok(Pick::Now(Chosen {
                member: member.clone(),
                slot,
            }));
        }
    }
    let backend = in_order()
        .filter(untried)
        .find(|b| ready(b))
        .or_else(|| in_order().find(untried))
        .ok_or(NoBackend::Untried)?;
    Ok(Pick::Wait(
        member(backend).ok_or(NoBackend::Untried)?.clone(),
    ))
}

impl Pool {
    /// The key this request is ranked by, under a hash policy.
    pub fn request_key(
        &self,
        session: &pingora_proxy::Session,
        client: std::net::IpAddr,
    ) -> Option<u64> {
        match &self.balance {
            // IPv6 by /64, as the rate limits count a client: its address may rotate in it.
            Balance::ClientHash => {
                Some(match crate::access::client_ip::key(client.to_canonical()) {
                    std::net::IpAddr::V4(v4) => hash_key(&v4.octets()),
                    std::net::IpAddr::V6(v6) => hash_key(&v6.octets()),
                })
            }
            Balance::HeaderHash(name) => session
                .req_header()
                .headers
                .get(name)
                .map(|value| hash_key(value.as_bytes())),
            Balance::RoundRobin | Balance::LeastConnections => None,
        }
    }
}

/// A server's rank for a key (rendezvous hashing). SipHash with fixed keys: the same ranks
/// in every worker and every process of one build.
fn rank(key: u64, id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    id.hash(&mut hasher);
    hasher.finish()
}

/// A request's key for the hash policies: `bytes` hashed the same way everywhere.
pub fn hash_key(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    bytes.hash(&mut hasher);
    hasher.finish()
}

pub fn member(backend: &Backend) -> Option<&Arc<Member>> {
    backend.ext.get::<Arc<Member>>()
}
