//! The gatehouse edge proxy, on Pingora.
//!
//! - [`gateway`]: the request phases (`ProxyHttp`), in the order they run.
//! - [`routes`]: the route table, path prefix to target.
//! - [`access`]: rate limits, allow/deny lists and basic auth, per route.
//! - [`statics`]: static sites: files, compression once per version, conditional requests.
//! - [`https_redirect`]: the HTTP listener's redirect to HTTPS.
//! - [`upstream`]: the backend pool on Unix sockets, health checks and failover.
//! - [`drain`]: SIGTERM drains in-flight requests and exits when they are done.
//! - [`request_id`], [`respond`]: request ids and the JSON error responses.
//! - [`metrics`], [`admin`]: Prometheus series and the admin listener that serves them.
//! - [`access_log`]: per-route access logs, written off the request path.
//! - [`tls`]: the certificate pair and the handshake counters.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod drain;
pub mod gateway;
pub mod https_redirect;
pub mod metrics;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod statics;
pub mod tls;
pub mod upstream;

use std::{collections::HashMap, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use pingora::{
    listeners::Listeners,
    server::{RunArgs, Server, ShutdownWatch, configuration::ServerConf},
    services::{background::BackgroundService, listening::Service},
};

pub use access::{AccessSettings, AccessSpec};
pub use access_log::{Format as LogFormat, LogTarget};
pub use admin::BackendSocket;
pub use gateway::TlsBehaviour;
pub use https_redirect::HttpsRedirect;
pub use routes::{Route, Target};
pub use statics::StaticSettings;
pub use upstream::PoolSettings;

/// The HTTPS listener.
pub struct TlsListener {
    pub listen: String,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub struct Settings {
    /// `host:port` of the HTTP listener.
    pub listen: String,
    pub threads: usize,
    pub routes: Vec<Route>,
    pub statics: StaticSettings,
    pub pool: PoolSettings,
    /// `None`: plain HTTP only.
    pub tls: Option<TlsListener>,
    pub tls_behaviour: TlsBehaviour,
    pub access: AccessSettings,
    /// Upper bound on draining in-flight requests after SIGTERM.
    pub shutdown_grace: Duration,
    /// Where the proxy keeps its pid file and upgrade socket, and finds the supervisor's
    /// metrics.
    pub runtime_dir: PathBuf,
    /// `host:port` of the admin listener (`/metrics`, `/healthz`, `/readyz`); `None`: no
    /// admin listener, and no metrics kept.
    pub admin_listen: Option<String>,
    pub access_log_format: LogFormat,
    /// The log of requests no route takes.
    pub default_access_log: Option<LogTarget>,
}

/// How the proxy stopped, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Graceful,
    /// SIGINT.
    Fast,
}

/// Fails when `listen` cannot be bound. Pingora binds inside a task and panics there, leaving
/// a process that runs without listening; checking first turns that into a clear error.
pub fn check_listen(listen: &str) -> Result<(), String> {
    std::net::TcpListener::bind(listen)
        .map(drop)
        .map_err(|e| format!("cannot listen on {listen}: {e}"))
}

/// Runs the proxy until a signal stops it. Returns after a fast (SIGINT) shutdown or a full
/// grace period; a drained SIGTERM exits the process directly (see [`drain`]).
pub fn run(settings: Settings) -> Result<Stopped, String> {
    check_listen(&settings.listen)?;
    if let Some(tls) = &settings.tls {
        check_listen(&tls.listen)?;
    }
    if let Some(admin) = &settings.admin_listen {
        check_listen(admin)?;
    }
    let conf = ServerConf {
        threads: settings.threads,
        daemon: false,
        pid_file: path_string(settings.runtime_dir.join("proxy.pid"))?,
        upgrade_sock: path_string(settings.runtime_dir.join("proxy-upgrade.sock"))?,
        grace_period_seconds: Some(settings.shutdown_grace.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let health = upstream::build(&settings.pool)?;
    let lb = health.task();
    let pool = upstream::Pool::new(lb.clone());
    let routes = Arc::new(routes::RouteTable::new(
        settings.routes,
        &settings.statics,
        &settings.access,
    )?);
    let metrics = match &settings.admin_listen {
        Some(_) => Some(Arc::new(metrics::Metrics::new()?)),
        None => None,
    };
    let observe = metrics.as_ref().map(|metrics| gateway::Observe {
        metrics: metrics.clone(),
        routes: routes
            .iter()
            .map(|(prefix, _)| metrics.route(prefix))
            .collect(),
        unrouted: metrics.route(metrics::NO_ROUTE),
    });
    let logs = access_logs(
        &routes,
        settings.default_access_log,
        settings.access_log_format,
        metrics.as_ref(),
    )?;
    let compress_min = settings.statics.min_compress_bytes;
    let trusted = settings.access.trusted_proxies.clone();
    let reopen = ReopenLogs(logs.as_ref().map(|l| l.log.clone()));
    let gateway = gateway::Gateway::new(
        routes.clone(),
        pool,
        settings.tls_behaviour,
        trusted,
        compress_min,
    )
    .with_observers(observe, logs);

    let mut listeners = Listeners::new();
    listeners.add_tcp(&settings.listen);
    let mut public_ports = vec![port_of(&settings.listen)];
    if let Some(tls) = &settings.tls {
        // The pair is checked here, before Pingora would panic on it.
        let key = tls::load_certified_key(&tls.cert, &tls.key)?;
        let (begun, completed) = match &metrics {
            Some(m) => (m.tls_connections.clone(), m.tls_handshakes.clone()),
            None => (unregistered_counter()?, unregistered_counter()?),
        };
        listeners.set_pre_tls_callback(Arc::new(tls::CountBegun(begun)));
        listeners.add_tls_with_settings(&tls.listen, None, tls::settings(key, completed)?);
        public_ports.push(port_of(&tls.listen));
    }
    let proxy = Service::with_listeners(
        "gatehouse proxy".into(),
        listeners,
        pingora_proxy::http_proxy(&server.configuration, gateway),
    );

    if let (Some(listen), Some(metrics)) = (&settings.admin_listen, metrics) {
        let rate_limit_keys = admin::Admin::rate_limit_keys_gauge(&metrics)?;
        let admin = admin::Admin {
            metrics,
            lb,
            routes,
            backends: settings.pool.backends.clone(),
            supervisor_file: settings.runtime_dir.join(SUPERVISOR_METRICS),
            public_ports,
            rate_limit_keys,
        };
        let mut service = Service::new("gatehouse admin".into(), admin);
        service.add_tcp(listen);
        server.add_service(service);
    }
    // Always, so SIGUSR1 (which logrotate sends the group) never kills a proxy without logs.
    server.add_service(pingora::services::background::background_service(
        "access log reopen",
        reopen,
    ));
    server.add_service(proxy);
    server.add_service(health);
    tracing::info!(listen = %settings.listen, tls = settings.tls.as_ref().map(|t| t.listen.as_str()), "proxy listening");
    server.run(RunArgs {
        shutdown_signal: Box::new(drain::Signals),
    });
    access_log::flush_before_exit();
    Ok(if drain::stopped_fast() {
        Stopped::Fast
    } else {
        Stopped::Graceful
    })
}

/// The file in the runtime directory where the supervisor keeps its series.
pub const SUPERVISOR_METRICS: &str = "supervisor.prom";

/// Opens the access logs the routes name, each file once, and starts their writer.
fn access_logs(
    routes: &routes::RouteTable,
    default: Option<LogTarget>,
    format: LogFormat,
    metrics: Option<&Arc<metrics::Metrics>>,
) -> Result<Option<gateway::Logs>, String> {
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
    let dropped = match metrics {
        Some(m) => m.access_log_dropped.clone(),
        None => unregistered_counter()?,
    };
    Ok(Some(gateway::Logs {
        log: access_log::AccessLog::start(targets, format, dropped)?,
        routes: by_route,
        unrouted,
        names: routes.iter().map(|(prefix, _)| Arc::from(prefix)).collect(),
    }))
}

/// A counter nobody scrapes, for when metrics are off.
fn unregistered_counter() -> Result<prometheus::IntCounter, String> {
    prometheus::IntCounter::new("unused", "unused").map_err(|e| e.to_string())
}

fn port_of(listen: &str) -> u16 {
    listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(0)
}

/// SIGUSR1 reopens the access logs (after logrotate has moved them); without logs it is
/// ignored.
struct ReopenLogs(Option<Arc<access_log::AccessLog>>);

#[async_trait]
impl BackgroundService for ReopenLogs {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut usr1) = signal(SignalKind::user_defined1()) else {
            tracing::error!("cannot listen for SIGUSR1; access logs cannot be reopened");
            return;
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    if let Some(log) = &self.0 {
                        log.reopen();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

fn path_string(path: PathBuf) -> Result<String, String> {
    path.into_os_string()
        .into_string()
        .map_err(|p| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
