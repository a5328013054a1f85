//! What a reload can change, and the reload itself.
//!
//! [`Live`] holds everything requests read from the configuration: the route table (each
//! route with its static root, allow/deny lists, rate policy, htpasswd file, metric series and
//! access log), the named pools, HTTPS behaviour and trusted proxies. It sits behind an
//! `ArcSwap`: a reload builds a complete new one and swaps it in, so a request in flight keeps
//! the version it started with and connections are never touched. A reload that fails at any
//! step changes nothing.
//!
//! Listeners (the client-certificate CAs and mode with the HTTPS one), worker threads, the
//! built-in backend pool (its sockets, deadlines, caps and health checks), the shutdown
//! grace and the log format are set at start-up; a reload names each of them that changed
//! (see [`Fixed`]), and they take effect at the next restart or upgrade.

use std::{path::PathBuf, sync::Arc};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::{server::ShutdownWatch, services::background::BackgroundService};
use prometheus::IntCounter;

use crate::{
    Settings,
    access::{AccessCounters, client_ip::ClientIpHeader, ip_list::IpList},
    access_log::{AccessLog, LogTarget},
    client_cert::ClientAuth,
    error::BuildError,
    metrics::{self, Metrics},
    observe::Observer,
    pools::Pools,
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
    /// The named pools: a reload keeps those defined as they were.
    pub pools: Arc<Pools>,
}

impl Live {
    /// Builds everything from `settings`. Rate limit policies whose definition did not change
    /// keep their buckets, the basic-auth guard always keeps its counts, and an unchanged set
    /// of access logs keeps its writer.
    pub fn build(
        settings: &Settings,
        previous: Option<&Live>,
        metrics: Option<&Arc<Metrics>>,
        pools: &Arc<Pools>,
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
            pools,
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
            pools: pools.clone(),
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

/// What is bound or built at start-up (sockets, threads, the backend pool, the drain, the
/// log subscriber): a change here waits for a restart or an upgrade, and a reload names it.
#[derive(Debug, Clone)]
pub struct Fixed {
    /// Where the reload's outcome is reported.
    runtime_dir: PathBuf,
    /// Each value with the config key that sets it, in the file's order, so that a reload
    /// can name what it did not apply. Compared as written out: these are plain values.
    values: Vec<(&'static str, String)>,
}

impl Fixed {
    pub fn of(settings: &Settings) -> Fixed {
        let pool = &settings.pool;
        let sockets: Vec<_> = pool.backends.iter().map(|b| &b.socket).collect();
        let v = |value: &dyn std::fmt::Debug| format!("{value:?}");
        let client_auth = settings.tls.as_ref().and_then(|t| t.client_auth.as_ref());
        let values = vec![
            ("proxy.listen", v(&settings.listen)),
            ("proxy.threads", v(&settings.threads)),
            ("proxy.shutdown_grace", v(&settings.shutdown_grace)),
            ("limits.h2_max_streams", v(&settings.h2_max_streams)),
            ("upstream.connect_timeout", v(&pool.connect_timeout)),
            ("upstream.read_timeout", v(&pool.read_timeout)),
            (
                "upstream.max_connections",
                v(&pool.max_connections_per_backend),
            ),
            ("upstream.queue_timeout", v(&pool.queue_timeout)),
            (
                "upstream.health_check_interval",
                v(&pool.health_check_interval),
            ),
            ("tls.listen", v(&settings.tls.as_ref().map(|t| t.listen))),
            // The handshake's verifier is built with the listener.
            ("tls.client_ca", v(&client_auth.map(ClientAuth::bundle))),
            ("tls.client_certs", v(&client_auth.map(|a| a.required))),
            ("backend.count", v(&sockets)),
            ("upstream.socket_dir", v(&pool.socket_dir)),
            // The health checks' deadline follows the backends' Redis deadline.
            ("redis.timeout", v(&pool.health_check_timeout)),
            ("paths.runtime_dir", v(&settings.runtime_dir)),
            ("admin.listen", v(&settings.admin_listen)),
            ("logging.format", v(&settings.json_logs)),
            ("acme", v(&settings.acme)),
            ("cache", v(&settings.cache)),
        ];
        Fixed {
            runtime_dir: settings.runtime_dir.clone(),
            values,
        }
    }

    /// The config keys whose values differ in `other`.
    pub fn changed(&self, other: &Fixed) -> Vec<&'static str> {
        self.values
            .iter()
            .zip(&other.values)
            .filter(|((_, old), (_, new))| old != new)
            .map(|((key, _), _)| *key)
            .collect()
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
    async fn reload(&self) {
        let Some(load) = &self.load else {
            tracing::warn!("SIGHUP: this proxy was started without a config file to reload");
            return;
        };
        let outcome = match load() {
            Ok(settings) => self.apply(&settings).await,
            Err(error) => Err(BuildError::Config(error)),
        };
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

    async fn apply(&self, settings: &Settings) -> Result<(), BuildError> {
        let changed = self.fixed.changed(&Fixed::of(settings));
        if !changed.is_empty() {
            tracing::warn!(
                keys = %changed.join(", "),
                "these keys change only at a restart or upgrade and keep their running values; \
                 the rest of the configuration is reloaded"
            );
        }
        // Everything is built before anything is swapped, so a bad certificate leaves the
        // routes alone too.
        let key = match (&self.certificate, &settings.tls) {
            (Some(_), Some(tls)) => Some(crate::tls::Certificates::load(tls)?),
            (None, Some(_)) | (Some(_), None) => {
                tracing::warn!("turning TLS on or off takes a restart");
                None
            }
            (None, None) => None,
        };
        let previous = self.live.load_full();
        let pools = Arc::new(Pools::build(&settings.upstreams, Some(&previous.pools))?);
        let live = Live::build(settings, Some(&previous), self.metrics.as_ref(), &pools)?;
        // New pools' servers are looked up before a request can reach them, and a server
        // that has no address refuses the reload. This holds off SIGUSR1 for at most the
        // lookup deadline (5 s).
        pools.look_up(Some(&previous.pools)).await?;
        pools.keep_current(Some(&previous.pools));
        if let (Some(slot), Some(key)) = (&self.certificate, key) {
            slot.store(Arc::new(key));
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
                _ = hup.recv() => self.reload().await,
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
