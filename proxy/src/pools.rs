//! Named pools (`[upstreams.NAME]`): any HTTP application behind the edge, on TCP or Unix
//! sockets, plain or over TLS, with its own load balancing, health checks, deadlines and
//! cap per server. Routes name them (`upstream = "NAME"`); the built-in pool `backends` is
//! gatehouse's own processes ([`crate::upstream`]).
//!
//! Each pool is a Pingora load balancer whose members come from [`Resolved`]: host names
//! are looked up at start and every `resolve_interval`, and a server whose lookup fails
//! keeps the addresses it had, so a resolver hiccup takes nothing out. An address found
//! again keeps its [`Member`] (its cap's slots and its health), so a lookup never resets
//! a server in the middle of its requests. Simple requests to a plain-HTTP pool take the
//! fast path of [`crate::forward`], as requests to gatehouse's own backends do; the rest,
//! and everything to a TLS pool, take Pingora's path (TLS, retries of idempotent requests on
//! the next server, upgrades).

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
    server::ShutdownWatch,
    services::{ServiceReadyNotifier, background::BackgroundService},
    upstreams::peer::HttpPeer,
    utils::tls::WrappedX509,
};
use tokio::sync::watch;

use crate::{
    error::BuildError,
    settings::{NamedPool, UpstreamServer},
    upstream::{Dial, Member, Pool},
};

type Balancer = LoadBalancer<RoundRobin>;

/// The named pools, by name. A reload keeps each pool defined as it was (its servers'
/// health, slots and connections) and builds the others anew; a pool no configuration in
/// use names any more stops looking its servers up and checking them.
#[derive(Default)]
pub struct Pools {
    by_name: HashMap<String, Arc<Named>>,
}

/// One pool, and what keeps its servers current.
struct Named {
    config: NamedPool,
    pool: Arc<Pool>,
    lb: Arc<Balancer>,
    /// Its servers' addresses, as the load balancer's discovery found them.
    resolved: Arc<Resolved>,
    /// Ends the pool's lookups and health checks; sent when the pool is dropped.
    stop: watch::Sender<bool>,
}

impl Drop for Named {
    fn drop(&mut self) {
        self.stop.send_replace(true);
    }
}

impl Named {
    /// Looks the servers up once, each name under [`LOOKUP_TIMEOUT`]; returns the servers
    /// that have no address.
    async fn look_up(&self) -> Vec<String> {
        if let Err(error) = self.lb.update().await {
            tracing::warn!(pool = %self.config.name, %error, "lookup failed");
        }
        self.resolved.unresolved()
    }

    /// Keeps the servers looked up and checked, in the background, until the pool is
    /// dropped. On the runtime of the caller: the pools' background service, or the reload's.
    fn keep_current(&self) {
        let (lb, stop) = (self.lb.clone(), self.stop.subscribe());
        tokio::spawn(async move { lb.start(stop).await });
    }
}

impl Pools {
    pub fn get(&self, name: &str) -> Option<&Arc<Pool>> {
        self.by_name.get(name).map(|named| &named.pool)
    }

    pub fn each(&self) -> impl Iterator<Item = &Arc<Pool>> {
        self.by_name.values().map(|named| &named.pool)
    }

    /// The pools `configs` define: those of `previous` defined the same way as they are,
    /// the others new and not yet started ([`Pools::start`]).
    pub fn build(configs: &[NamedPool], previous: Option<&Pools>) -> Result<Pools, BuildError> {
        let mut by_name = HashMap::with_capacity(configs.len());
        for config in configs {
            let kept = previous
                .and_then(|p| p.by_name.get(&config.name))
                .filter(|named| named.config == *config);
            let named = match kept {
                Some(named) => named.clone(),
                None => Arc::new(build_one(config)?),
            };
            by_name.insert(config.name.clone(), named);
        }
        Ok(Pools { by_name })
    }

    /// The pools that are not `previous`'s.
    fn fresh<'a>(&'a self, previous: Option<&'a Pools>) -> impl Iterator<Item = &'a Arc<Named>> {
        self.by_name.iter().filter_map(move |(name, named)| {
            let kept = previous
                .and_then(|p| p.by_name.get(name))
                .is_some_and(|old| Arc::ptr_eq(old, named));
            (!kept).then_some(named)
        })
    }

    /// Looks up the servers of the pools that are not `previous`'s, all at once; an error
    /// names the first pool (by name) with servers that found no address, and those.
    pub async fn look_up(&self, previous: Option<&Pools>) -> Result<(), BuildError> {
        let mut lookups = tokio::task::JoinSet::new();
        for named in self.fresh(previous) {
            let named = named.clone();
            lookups.spawn(async move { (named.config.name.clone(), named.look_up().await) });
        }
        let mut failed = lookups.join_all().await;
        failed.retain(|(_, servers)| !servers.is_empty());
        failed.sort();
        match failed.into_iter().next() {
            None => Ok(()),
            Some((pool, servers)) => Err(BuildError::Unresolved {
                pool,
                servers: servers.join(", "),
            }),
        }
    }

    /// Keeps the pools that are not `previous`'s current from now on.
    pub fn keep_current(&self, previous: Option<&Pools>) {
        for named in self.fresh(previous) {
            named.keep_current();
        }
    }
}

/// The background service that starts the pools the proxy starts with; the proxy depends
/// on it, so requests to a pool find its servers looked up.
pub struct Starter {
    /// Taken at start: held here, the pools would outlive a reload that drops them.
    pools: Mutex<Option<Arc<Pools>>>,
}

impl Starter {
    pub fn new(pools: Arc<Pools>) -> Self {
        Self {
            pools: Mutex::new(Some(pools)),
        }
    }
}

#[async_trait]
impl BackgroundService for Starter {
    async fn start_with_ready_notifier(
        &self,
        _shutdown: ShutdownWatch,
        ready: ServiceReadyNotifier,
    ) {
        let pools = self.pools.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(pools) = pools {
            // At start a name that does not resolve yet is no reason to keep every route
            // down: it is looked up again every few seconds until it does.
            if let Err(error) = pools.look_up(None).await {
                tracing::warn!(%error, "serving without it until it resolves");
            }
            pools.keep_current(None);
        }
        ready.notify_ready();
    }

    async fn start(&self, _shutdown: ShutdownWatch) {}
}

/// One pool, with its discovery and health check, not yet started.
fn build_one(pool: &NamedPool) -> Result<Named, BuildError> {
    let ca = ca_list(pool)?;
    let resolved = Arc::new(Resolved {
        pool: pool.clone(),
        ca: ca.clone(),
        known: Mutex::default(),
        resolved_at: Mutex::default(),
    });
    let discovery = Discovery(resolved.clone());
    let mut lb = Balancer::from_backends(Backends::new(Box::new(discovery)));
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
    let lb = Arc::new(lb);
    let deadlines = crate::forward::Deadlines {
        connect: pool.connect_timeout,
        read: pool.read_timeout,
    };
    let runtime = Pool::new(
        lb.clone(),
        pool.queue_timeout,
        deadlines,
        pool.balance.clone(),
        pool.tls.is_none(),
    );
    Ok(Named {
        config: pool.clone(),
        pool: Arc::new(runtime),
        lb,
        resolved,
        stop: watch::Sender::new(false),
    })
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
        // Plain HTTP goes by the fast path too (simple GETs and HEADs); TLS by Pingora's only.
        let dial = match (&addr, server, tls) {
            (_, _, true) => None,
            (SocketAddr::Inet(inet), _, false) => Some(Dial::Tcp(*inet)),
            (_, UpstreamServer::Unix(path), false) => Some(Dial::Unix(path.clone())),
            (_, UpstreamServer::Tcp { .. }, false) => None,
        };
        Ok(Member::backend(id, peer, dial, pool.max_connections))
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

/// The load balancer's view of a pool's [`Resolved`] servers, which the pool reads too.
struct Discovery(Arc<Resolved>);

#[async_trait]
impl ServiceDiscovery for Discovery {
    async fn discover(&self) -> pingora::Result<(BTreeSet<Backend>, HashMap<u64, bool>)> {
        self.0.discover().await
    }
}

impl Resolved {
    /// The servers with no address, as written (`app.internal:8080`, `unix:/run/app.sock`).
    fn unresolved(&self) -> Vec<String> {
        let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        self.pool
            .servers
            .iter()
            .filter(|s| known.get(*s).is_none_or(Vec::is_empty))
            .map(|s| match s {
                UpstreamServer::Tcp { host, port } => format!("{host}:{port}"),
                UpstreamServer::Unix(path) => format!("unix:{}", path.display()),
            })
            .collect()
    }

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
