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

pub mod access;
pub mod drain;
pub mod gateway;
pub mod https_redirect;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod statics;
pub mod upstream;

use std::{path::PathBuf, time::Duration};

use pingora::{
    listeners::tls::TlsSettings,
    server::{RunArgs, Server, configuration::ServerConf},
};

pub use access::{AccessSettings, AccessSpec};
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
    /// Where the proxy keeps its pid file and upgrade socket.
    pub runtime_dir: PathBuf,
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
    let pool = upstream::Pool::new(health.task());
    let routes = routes::RouteTable::new(settings.routes, &settings.statics, &settings.access)?;
    let compress_min = settings.statics.min_compress_bytes;
    let trusted = settings.access.trusted_proxies.clone();
    let gateway =
        gateway::Gateway::new(routes, pool, settings.tls_behaviour, trusted, compress_min);
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&settings.listen);
    if let Some(tls) = &settings.tls {
        // The files were checked at start-up (Pingora would panic on a bad pair later).
        let mut tls_settings = TlsSettings::intermediate(
            &path_string(tls.cert.clone())?,
            &path_string(tls.key.clone())?,
        )
        .map_err(|e| format!("TLS settings: {e}"))?;
        // HTTP/2 and HTTP/1.1 by ALPN; rustls offers TLS 1.2 and 1.3 with AEAD suites only.
        tls_settings.enable_h2();
        proxy.add_tls_with_settings(&tls.listen, None, tls_settings);
    }

    server.add_service(proxy);
    server.add_service(health);
    tracing::info!(listen = %settings.listen, tls = settings.tls.as_ref().map(|t| t.listen.as_str()), "proxy listening");
    server.run(RunArgs {
        shutdown_signal: Box::new(drain::Signals),
    });
    Ok(if drain::stopped_fast() {
        Stopped::Fast
    } else {
        Stopped::Graceful
    })
}

fn path_string(path: PathBuf) -> Result<String, String> {
    path.into_os_string()
        .into_string()
        .map_err(|p| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
