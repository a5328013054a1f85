//! What a reload can change, and the reload itself.
//!
//! [`Live`] holds everything requests read from the configuration: the route table (with
//! static roots, allow/deny lists, rate policies and htpasswd files), HTTPS behaviour,
//! trusted proxies, and the metrics and access logs that follow the routes. It sits behind an
//! `ArcSwap`: a reload builds a complete new one and swaps it in, so a request in flight keeps
//! the version it started with and connections are never touched. A reload that fails at any
//! step changes nothing.
//!
//! Listeners, worker threads and the backend sockets are bound at start-up; a changed value
//! there is reported and takes effect at the next restart or upgrade.

use std::{collections::HashMap, path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use prometheus::IntCounter;

use crate::{
    Settings,
    access::{AccessCounters, client_ip::ClientIpHeader, ip_list::IpList},
    access_log::{self, AccessLog, LogTarget},
    metrics::{self, Metrics, RouteSeries},
    routes::RouteTable,
    settings::TlsBehaviour,
    tls::CertificateSlot,
};

/// The request metrics, when the admin listener is on to serve them.
pub struct Observe {
    pub metrics: Arc<Metrics>,
    /// By route index.
    pub routes: Vec<RouteSeries>,
    /// Requests no route took.
    pub unrouted: RouteSeries,
}

/// Access logging, when configured.
pub struct Logs {
    pub log: Arc<AccessLog>,
    /// By route index: the target (in the writer's list), or `None` for no log.
    pub routes: Vec<Option<usize>>,
    pub unrouted: Option<usize>,
    /// Route prefixes, as the `route` field shows them.
    pub names: Vec<Arc<str>>,
}

pub struct Live {
    pub routes: Arc<RouteTable>,
    pub tls: TlsBehaviour,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` / `X-Request-ID` are believed.
    pub trusted_proxies: IpList,
    /// The header such a peer names the client in.
    pub client_ip_header: ClientIpHeader,
    /// Backend responses at least this large are compressed for clients that accept it.
    pub compress_min_bytes: u64,
    pub limits: crate::RequestLimits,
    pub observe: Option<Observe>,
    pub logs: Option<Logs>,
}

impl Live {
    /// Builds everything from `settings`. Rate limit policies whose definition did not change
    /// keep their buckets, the basic-auth guard always keeps its counts, and an unchanged set
    /// of access logs keeps its writer.
    pub fn build(
        settings: &Settings,
        previous: Option<&Live>,
        metrics: Option<&Arc<Metrics>>,
    ) -> Result<Live, String> {
        let counters = match metrics {
            Some(metrics) => metrics.access.clone(),
            None => AccessCounters::new()?,
        };
        let routes = Arc::new(RouteTable::new(
            settings.routes.clone(),
            &settings.statics,
            &settings.access,
            previous.map(|p| p.routes.as_ref()),
            &counters,
        )?);
        let observe = metrics.map(|metrics| Observe {
            metrics: metrics.clone(),
            routes: routes
                .iter()
                .map(|(prefix, _)| metrics.route(prefix))
                .collect(),
            unrouted: metrics.route(metrics::NO_ROUTE),
        });
        let logs = access_logs(
            &routes,
            settings.default_access_log.clone(),
            settings.access_log_format,
            metrics,
            previous.and_then(|p| p.logs.as_ref()),
        )?;
        Ok(Live {
            routes,
            tls: settings.tls_behaviour.clone(),
            trusted_proxies: settings.access.trusted_proxies.clone(),
            client_ip_header: settings.access.client_ip_header,
            compress_min_bytes: settings.statics.min_compress_bytes,
            limits: settings.limits,
            observe,
            logs,
        })
    }

    pub fn series(&self, route: Option<usize>) -> Option<&RouteSeries> {
        let observe = self.observe.as_ref()?;
        Some(match route {
            Some(i) => observe.routes.get(i)?,
            None => &observe.unrouted,
        })
    }
}

/// Opens the access logs the routes name, each file once, and starts their writer (or keeps
/// the previous writer when the files and format are the same).
fn access_logs(
    routes: &RouteTable,
    default: Option<LogTarget>,
    format: access_log::Format,
    metrics: Option<&Arc<Metrics>>,
    previous: Option<&Logs>,
) -> Result<Option<Logs>, String> {
    let mut targets: Vec<LogTarget> = Vec::new();
    let mut index: HashMap<LogTarget, usize> = HashMap::new();
    let mut slot = |target: Option<&LogTarget>| {
        let target = target?;
        Some(*index.entry(target.clone()).or_insert_with(|| {
            targets.push(target.clone());
            targets.len() - 1
        }))
    };
    let unrouted = slot(default.as_ref());
    let by_route: Vec<Option<usize>> = routes.iter().map(|(_, log)| slot(log)).collect();
    if targets.is_empty() {
        return Ok(None);
    }
    let log = match previous {
        Some(p) if p.log.writes(&targets, format) => p.log.clone(),
        _ => {
            let dropped = match metrics {
                Some(m) => m.access_log_dropped.clone(),
                None => unregistered_counter()?,
            };
            AccessLog::start(targets, format, dropped)?
        }
    };
    Ok(Some(Logs {
        log,
        routes: by_route,
        unrouted,
        names: routes.iter().map(|(prefix, _)| Arc::from(prefix)).collect(),
    }))
}

/// A counter nobody scrapes, for when metrics are off.
pub fn unregistered_counter() -> Result<IntCounter, String> {
    IntCounter::new("unused", "unused").map_err(|e| e.to_string())
}

/// Reads the configuration again and returns the proxy's settings, or why it cannot.
pub type LoadSettings = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// What is bound at start-up: a change here waits for a restart or an upgrade.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixed {
    listen: std::net::SocketAddr,
    tls_listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    threads: usize,
    backends: Vec<PathBuf>,
    runtime_dir: PathBuf,
    health_check_interval: std::time::Duration,
    h2_max_streams: u32,
    upstream_max_connections: usize,
    upstream_queue_timeout: std::time::Duration,
}

impl Fixed {
    pub fn of(settings: &Settings) -> Fixed {
        Fixed {
            listen: settings.listen,
            tls_listen: settings.tls.as_ref().map(|t| t.listen),
            admin_listen: settings.admin_listen,
            threads: settings.threads,
            backends: settings
                .pool
                .backends
                .iter()
                .map(|b| b.socket.clone())
                .collect(),
            runtime_dir: settings.runtime_dir.clone(),
            health_check_interval: settings.pool.health_check_interval,
            h2_max_streams: settings.h2_max_streams,
            upstream_max_connections: settings.pool.max_connections_per_backend,
            upstream_queue_timeout: settings.pool.queue_timeout,
        }
    }
}

/// Reacts to signals from the supervisor (or an operator): SIGHUP reloads the configuration,
/// SIGUSR1 reopens the access logs. Installed always, so neither signal ever kills the proxy.
pub struct Signals {
    pub live: Arc<ArcSwap<Live>>,
    pub load: Option<LoadSettings>,
    pub fixed: Fixed,
    pub certificate: Option<CertificateSlot>,
    pub metrics: Option<Arc<Metrics>>,
}

impl Signals {
    fn reload(&self) {
        let Some(load) = &self.load else {
            tracing::warn!("SIGHUP: this proxy was started without a config file to reload");
            return;
        };
        let outcome = load().and_then(|settings| self.apply(&settings));
        if let Some(metrics) = &self.metrics {
            metrics.reload(outcome.is_ok());
        }
        // For the supervisor, which restarts backends only when the proxy took the new file.
        let report = match &outcome {
            Ok(()) => "ok".to_string(),
            Err(error) => format!("failed: {error}"),
        };
        let file = self.fixed.runtime_dir.join(crate::RELOAD_FILE);
        let staging = file.with_extension("tmp");
        if let Err(error) =
            std::fs::write(&staging, report).and_then(|()| std::fs::rename(&staging, &file))
        {
            tracing::warn!(file = %file.display(), %error, "cannot report the reload");
        }
        match outcome {
            Ok(()) => tracing::info!("configuration reloaded"),
            // The message names the file, line and key; the old configuration keeps serving.
            Err(error) => {
                tracing::error!(%error, "reload failed; the running configuration is unchanged")
            }
        }
    }

    fn apply(&self, settings: &Settings) -> Result<(), String> {
        let fixed = Fixed::of(settings);
        if fixed != self.fixed {
            tracing::warn!(
                "listen addresses, threads, backends, health checks, h2_max_streams, the upstream caps and the runtime directory change only at a restart or upgrade; \
                 the rest of the configuration is reloaded"
            );
        }
        // Everything is built before anything is swapped, so a bad certificate leaves the
        // routes alone too.
        let key = match (&self.certificate, &settings.tls) {
            (Some(_), Some(tls)) => Some(crate::tls::load_certified_key(&tls.cert, &tls.key)?),
            (None, Some(_)) | (Some(_), None) => {
                tracing::warn!("turning TLS on or off takes a restart");
                None
            }
            (None, None) => None,
        };
        let previous = self.live.load_full();
        let live = Live::build(settings, Some(&previous), self.metrics.as_ref())?;
        if let (Some(slot), Some(key)) = (&self.certificate, key) {
            slot.store(key);
        }
        self.live.store(Arc::new(live));
        Ok(())
    }
}

#[async_trait]
impl BackgroundService for Signals {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut hup), Ok(mut usr1)) = (
            signal(SignalKind::hangup()),
            signal(SignalKind::user_defined1()),
        ) else {
            tracing::error!(
                "cannot listen for SIGHUP and SIGUSR1; reloads and log reopening are off"
            );
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => self.reload(),
                _ = usr1.recv() => {
                    if let Some(logs) = &self.live.load().logs {
                        logs.log.reopen();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
