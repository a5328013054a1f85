//! Named pools (`[upstreams.NAME]`): any HTTP application behind the edge, on TCP or Unix
//! sockets, plain or over TLS, with its own load balancing, health checks, deadlines and
//! cap per server. Routes name them (`upstream = "NAME"`); the built-in pool `backends` is
//! gatehouse's own processes ([`crate::upstream`]).
//!
//! Each pool is a Pingora load balancer whose members come from [`Resolved`]: host names
//! are looked up at start and every `resolve_interval`, and a server whose lookup fails
//! keeps the addresses it had, so a resolver hiccup takes nothing out. An address found
//! again keeps its [`Member`] (its cap's slots and its health), so a lookup never resets
//! a server in the middle of its requests. Requests to named pools take Pingora's path
//! (TLS, retries of idempotent requests on the next server, upgrades), never the fast path
//! of [`crate::forward`], which speaks to gatehouse's own Unix sockets only.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use async_trait::async_trait;
use pingora::{
    http::RequestHeader,
    lb::{
        Backend, Backends, LoadBalancer, discovery::ServiceDiscovery,
        health_check::HttpHealthCheck, selection::RoundRobin,
    },
    protocols::l4::socket::SocketAddr,
    services::background::{GenBackgroundService, background_service},
    upstreams::peer::HttpPeer,
    utils::tls::WrappedX509,
};

use crate::{
    error::BuildError,
    settings::{NamedPool, UpstreamServer},
    upstream::{Member, Pool},
};

/// The named pools, by name, built once at start.
#[derive(Default)]
pub struct Pools {
    by_name: HashMap<String, Arc<Pool>>,
}

impl Pools {
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name)
    }
}

/// The background service that resolves and health-checks one pool's servers.
pub type PoolService = GenBackgroundService<LoadBalancer<RoundRobin>>;

/// The pools, and their background services.
pub fn build(pools: &[NamedPool]) -> Result<(Pools, Vec<PoolService>), BuildError> {
    let mut built = Pools::default();
    let mut services = Vec::with_capacity(pools.len());
    for pool in pools {
        let ca = ca_list(pool)?;
        let discovery = Resolved {
            pool: pool.clone(),
            ca: ca.clone(),
            known: Mutex::default(),
            resolved_at: Mutex::default(),
        };
        let mut lb = LoadBalancer::<RoundRobin>::from_backends(Backends::new(Box::new(discovery)));
        lb.update_frequency = Some(UPDATE_EVERY);
        if let Some(health) = &pool.health {
            let host = pool
                .tls
                .as_ref()
                .and_then(|t| t.sni.clone())
                .unwrap_or_else(|| first_host(pool));
            let mut check = HttpHealthCheck::new(&host, pool.tls.is_some());
            check.req = RequestHeader::build("GET", health.path.as_bytes(), None)
                .map_err(BuildError::HealthCheck)?;
            check
                .req
                .insert_header("host", &host)
                .map_err(BuildError::HealthCheck)?;
            check.consecutive_success = health.rise;
            check.consecutive_failure = health.fall;
            check.peer_template.options.connection_timeout = Some(pool.connect_timeout);
            check.peer_template.options.read_timeout = Some(health.timeout);
            check.peer_template.options.ca = ca;
            // Healthy on any 2xx or 3xx, as HAProxy's `option httpchk` and nginx Plus's
            // `health_check` judge by default.
            check.validator = Some(Box::new(|response| {
                let status = response.status;
                if status.is_success() || status.is_redirection() {
                    Ok(())
                } else {
                    pingora::Error::e_explain(
                        pingora::ErrorType::HTTPStatus(status.as_u16()),
                        "the health check's answer",
                    )
                }
            }));
            lb.set_health_check(Box::new(check));
            lb.health_check_frequency = Some(health.interval);
            lb.parallel_health_check = true;
        }
        let service = background_service(&format!("upstream pool {}", pool.name), lb);
        let deadlines = crate::forward::Deadlines {
            connect: pool.connect_timeout,
            read: pool.read_timeout,
        };
        let runtime = Pool::new(
            service.task(),
            pool.queue_timeout,
            deadlines,
            pool.balance.clone(),
        );
        built.by_name.insert(pool.name.clone(), Arc::new(runtime));
        services.push(service);
    }
    Ok((built, services))
}

/// The host the health check names when no SNI is set: the first server's.
fn first_host(pool: &NamedPool) -> String {
    pool.servers
        .iter()
        .find_map(|s| match s {
            UpstreamServer::Tcp { host, .. } => Some(host.clone()),
            UpstreamServer::Unix(_) => None,
        })
        .unwrap_or_else(|| "localhost".into())
}

type CaList = Option<Arc<[WrappedX509]>>;

/// The pool's CA certificates as Pingora takes them. Each was parsed when the config was
/// loaded, so Pingora's own parse (which panics on a bad one) cannot fail here.
fn ca_list(pool: &NamedPool) -> Result<CaList, BuildError> {
    let Some(ders) = pool.tls.as_ref().and_then(|t| t.ca.as_ref()) else {
        return Ok(None);
    };
    let mut list = Vec::with_capacity(ders.len());
    for der in ders {
        if x509_parser::parse_x509_certificate(der).is_err() {
            return Err(BuildError::UpstreamCa(pool.name.clone()));
        }
        list.push(WrappedX509::new(
            der.clone(),
            pingora::utils::tls::parse_x509,
        ));
    }
    Ok(Some(Arc::from(list)))
}

/// A named pool's servers, looked up again at each update.
struct Resolved {
    pool: NamedPool,
    ca: CaList,
    /// By server: the addresses it had at its last good lookup, each with its member.
    known: Mutex<BTreeMap<UpstreamServer, Vec<Backend>>>,
    /// When every server was last looked up.
    resolved_at: Mutex<Option<Instant>>,
}

impl Resolved {
    /// The load balancer's entry for one address of `server`.
    fn entry(&self, server: &UpstreamServer, addr: SocketAddr) -> Result<Backend, BuildError> {
        let pool = &self.pool;
        let tls = pool.tls.is_some();
        // The name to send and check: the configured one, else the server's host.
        let sni = match (pool.tls.as_ref().and_then(|t| t.sni.as_ref()), server) {
            (Some(sni), _) => sni.clone(),
            (None, UpstreamServer::Tcp { host, .. }) => host.clone(),
            (None, UpstreamServer::Unix(_)) => String::new(),
        };
        let mut peer = match (&addr, server) {
            (SocketAddr::Inet(inet), _) => HttpPeer::new(*inet, tls, sni),
            (SocketAddr::Unix(_), UpstreamServer::Unix(path)) => {
                let unusable = || BuildError::UpstreamSocket {
                    pool: pool.name.clone(),
                    path: path.clone(),
                };
                let text = path.to_str().ok_or_else(unusable)?;
                HttpPeer::new_uds(text, tls, sni).map_err(|_| unusable())?
            }
            // A name looks up to network addresses only.
            (SocketAddr::Unix(_), UpstreamServer::Tcp { host, .. }) => {
                return Err(BuildError::UpstreamSocket {
                    pool: pool.name.clone(),
                    path: host.into(),
                });
            }
        };
        peer.options.ca = self.ca.clone();
        peer.options.connection_timeout = Some(pool.connect_timeout);
        peer.options.read_timeout = Some(pool.read_timeout);
        peer.options.idle_timeout = Some(pool.idle_timeout);
        // Pingora's connection reuse does not tell CAs apart: a connection verified against
        // one pool's CA must never serve another pool with the same address and name.
        peer.group_key = crate::upstream::hash_key(pool.name.as_bytes());
        let id = match (&addr, server) {
            (SocketAddr::Inet(inet), _) => format!("{}/{inet}", pool.name),
            (_, UpstreamServer::Unix(path)) => format!("{}/unix:{}", pool.name, path.display()),
            (_, UpstreamServer::Tcp { host, port }) => format!("{}/{host}:{port}", pool.name),
        };
        Ok(Member::backend(id, peer, pool.max_connections))
    }

    /// The addresses `server` names now: at most [`MAX_ADDRESSES`], in a stable order.
    async fn lookup(server: UpstreamServer) -> std::io::Result<Vec<SocketAddr>> {
        match server {
            UpstreamServer::Unix(path) => {
                let addr = std::os::unix::net::SocketAddr::from_pathname(path)?;
                Ok(vec![SocketAddr::Unix(addr)])
            }
            UpstreamServer::Tcp { host, port } => {
                let lookup = tokio::net::lookup_host((host.as_str(), port));
                let found = tokio::time::timeout(LOOKUP_TIMEOUT, lookup)
                    .await
                    .map_err(|_| std::io::Error::other("the lookup timed out"))??;
                let mut addrs: Vec<_> = found.map(SocketAddr::Inet).collect();
                addrs.sort_by_key(|a| a.to_string());
                addrs.dedup();
                if addrs.len() > MAX_ADDRESSES {
                    tracing::warn!(%host, found = addrs.len(), kept = MAX_ADDRESSES, "a name with more addresses than a pool takes");
                    addrs.truncate(MAX_ADDRESSES);
                }
                Ok(addrs)
            }
        }
    }

    /// The servers to look up now: all of them every `resolve_interval`, and any that never
    /// resolved at every update (each second) until it does.
    fn due(&self) -> Vec<UpstreamServer> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        let mut last = self.resolved_at.lock().unwrap_or_else(|p| p.into_inner());
        let all_due = last.is_none_or(|at| at.elapsed() >= self.pool.resolve_interval);
        if all_due {
            *last = Some(Instant::now());
        }
        self.pool
            .servers
            .iter()
            .filter(|s| all_due || !known.contains_key(*s))
            .cloned()
            .collect()
    }
}

/// How long one name's lookup may take; past it the name keeps the addresses it had.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);
/// The most addresses one name gives a pool: each is a server with its own health checks
/// and metric series.
const MAX_ADDRESSES: usize = 64;
/// How often a pool's discovery runs: names that never resolved are tried this often. As
/// long as a lookup's deadline, so a hanging resolver holds about one blocked lookup thread
/// per name at a time.
const UPDATE_EVERY: Duration = LOOKUP_TIMEOUT;

#[async_trait]
impl ServiceDiscovery for Resolved {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        // Every name at once, each under its own deadline.
        let mut lookups = tokio::task::JoinSet::new();
        for server in self.due() {
            lookups.spawn(async move { (server.clone(), Self::lookup(server).await) });
        }
        let found = lookups.join_all().await;
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for (server, addrs) in found {
            let addrs = match addrs {
                Ok(addrs) => addrs,
                Err(error) => {
                    tracing::warn!(pool = %self.pool.name, ?server, %error, "lookup failed; keeping the addresses it had");
                    continue;
                }
            };
            let old = known.remove(&server).unwrap_or_default();
            let mut now = Vec::with_capacity(addrs.len());
            for addr in addrs {
                match old.iter().find(|b| b.addr == addr) {
                    Some(backend) => now.push(backend.clone()),
                    None => match self.entry(&server, addr) {
                        Ok(backend) => now.push(backend),
                        Err(error) => {
                            tracing::error!(pool = %self.pool.name, ?server, %error, "unusable address")
                        }
                    },
                }
            }
            known.insert(server, now);
        }
        let all = known.values().flatten().cloned().collect();
        Ok((all, HashMap::new()))
    }
}
