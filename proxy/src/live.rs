//! What a reload can change, and the reload itself.
//!
//! [`Live`] holds everything requests read from the configuration: the route table (each
//! route with its static root, allow/deny lists, rate policy, htpasswd file, metric series and
//! access log), HTTPS behaviour and trusted proxies. It sits behind an
//! `ArcSwap`: a reload builds a complete new one and swaps it in, so a request in flight keeps
//! the version it started with and connections are never touched. A reload that fails at any
//! step changes nothing.
//!
//! Listeners, worker threads and the backend sockets are bound at start-up; a changed value
//! there is reported and takes effect at the next restart or upgrade.

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use prometheus::IntCounter;

use crate::{
    Settings,
    access::{AccessCounters, client_ip::ClientIpHeader, ip_list::IpList},
    access_log::{AccessLog, LogTarget},
    error::BuildError,
    metrics::{self, Metrics},
    observe::Observer,
    routes::RouteTable,
    settings::TlsBehaviour,
    tls::CertificateSlot,
};

pub struct Live {
    /// Each route with its access rules, metric series and access log.
    pub routes: RouteTable,
    /// The series and log of requests no route took.
    pub unrouted: Observer,
    pub tls: TlsBehaviour,
    /// Peers whose `X-Forwarded-For` / `X-Real-IP` / `X-Request-ID` are believed.
    pub trusted_proxies: IpList,
    /// The header such a peer names the client in.
    pub client_ip_header: ClientIpHeader,
    /// Backend responses at least this large are compressed for clients that accept it.
    pub compress_min_bytes: u64,
    pub limits: crate::RequestLimits,
    /// The request metrics, when the admin listener is on to serve them.
    pub metrics: Option<Arc<Metrics>>,
    /// The writer of every access log; `None` when nothing is logged.
    pub access_log: Option<Arc<AccessLog>>,
}

impl Live {
    /// Builds everything from `settings`. Rate limit policies whose definition did not change
    /// keep their buckets, the basic-auth guard always keeps its counts, and an unchanged set
    /// of access logs keeps its writer.
    pub fn build(
        settings: &Settings,
        previous: Option<&Live>,
        metrics: Option<&Arc<Metrics>>,
    ) -> Result<Live, BuildError> {
        let counters = match metrics {
            Some(metrics) => metrics.access.clone(),
            None => AccessCounters::new()?,
        };
        // Started only once the routes are built: a reload that fails opens no file.
        let access_log = access_log(settings, metrics, previous)?;
        let observer = |name: &str, target: Option<&LogTarget>| {
            Observer::new(name, metrics.map(Arc::as_ref), access_log.as_ref(), target)
        };
        let routes = RouteTable::new(
            settings.routes.clone(),
            &settings.statics,
            &settings.access,
            previous.map(|p| &p.routes),
            &counters,
            &observer,
        )?;
        if let Some(log) = &access_log {
            log.start()?;
        }
        Ok(Live {
            routes,
            unrouted: observer(metrics::NO_ROUTE, settings.default_access_log.as_ref()),
            tls: settings.tls_behaviour.clone(),
            trusted_proxies: settings.access.trusted_proxies.clone(),
            client_ip_header: settings.access.client_ip_header,
            compress_min_bytes: settings.statics.min_compress_bytes,
            limits: settings.limits,
            metrics: metrics.cloned(),
            access_log,
        })
    }

    /// Waits until the access log has written every line so far: the process is about to exit.
    pub fn flush_access_log(&self) {
        if let Some(log) = &self.access_log {
            log.flush_before_exit();
        }
    }
}

/// The writer of the access logs the routes name, each file once: the previous one when the
/// files and format are the same, or a new one, not yet started.
fn access_log(
    settings: &Settings,
    metrics: Option<&Arc<Metrics>>,
    previous: Option<&Live>,
) -> Result<Option<Arc<AccessLog>>, BuildError> {
    let mut targets: Vec<LogTarget> = Vec::new();
    let named = settings.routes.iter().map(|r| r.access_log.as_ref());
    for target in std::iter::once(settings.default_access_log.as_ref())
        .chain(named)
        .flatten()
    {
        if !targets.contains(target) {
            targets.push(target.clone());
        }
    }
    if targets.is_empty() {
        return Ok(None);
    }
    let format = settings.access_log_format;
    if let Some(log) = previous.and_then(|p| p.access_log.as_ref())
        && log.writes(&targets, format)
    {
        return Ok(Some(log.clone()));
    }
    let dropped = match metrics {
        Some(m) => m.access_log_dropped.clone(),
        None => unregistered_counter()?,
    };
    Ok(Some(AccessLog::new(targets, format, dropped)))
}

/// A counter nobody scrapes, for when metrics are off.
pub fn unregistered_counter() -> Result<IntCounter, BuildError> {
    Ok(IntCounter::new("unused", "unused")?)
}

/// The file in the runtime directory where the proxy writes the outcome of its last reload.
pub const RELOAD_FILE: &str = "proxy.reload";

/// Reads the configuration again and returns the proxy's settings, or why it cannot (the
/// config check's message, naming file, line and key).
pub type LoadSettings = Box<dyn Fn() -> Result<Settings, String> + Send + Sync>;

/// What is bound at start-up: a change here waits for a restart or an upgrade.
#[derive(Debug, Clone, PartialEq)]
pub struct Fixed {
    listen: std::net::SocketAddr,
    tls_listen: Option<std::net::SocketAddr>,
    admin_listen: Option<std::net::SocketAddr>,
    threads: usize,
    backends: Vec<PathBuf>,
    socket_dir: Option<PathBuf>,
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
            socket_dir: settings.pool.socket_dir.clone(),
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
        let outcome = load()
            .map_err(BuildError::Config)
            .and_then(|settings| self.apply(&settings));
        if let Some(metrics) = &self.metrics {
            metrics.reload(outcome.is_ok());
        }
        // For the supervisor, which restarts backends only when the proxy took the new file.
        let report = match &outcome {
            Ok(()) => "ok".to_string(),
            Err(error) => format!("failed: {error}"),
        };
        let file = self.fixed.runtime_dir.join(RELOAD_FILE);
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

    fn apply(&self, settings: &Settings) -> Result<(), BuildError> {
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
                    if let Some(log) = &self.live.load().access_log {
                        log.reopen();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
