//! The gatehouse edge proxy, on Pingora.
//!
//! - [`gateway`]: the request phases (`ProxyHttp`), in the order they run.
//! - [`routes`]: the route table, path prefix to target.
//! - [`upstream`]: the backend pool on Unix sockets, health checks and failover.
//! - [`drain`]: SIGTERM drains in-flight requests and exits when they are done.
//! - [`request_id`], [`respond`]: request ids and the JSON error responses.

pub mod drain;
pub mod gateway;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod upstream;

use std::{path::PathBuf, time::Duration};

use pingora::server::{RunArgs, Server, configuration::ServerConf};

pub use routes::{Route, Target};
pub use upstream::PoolSettings;

pub struct Settings {
    /// `host:port` of the HTTP listener.
    pub listen: String,
    pub threads: usize,
    pub routes: Vec<Route>,
    pub pool: PoolSettings,
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
    let gateway = gateway::Gateway::new(routes::RouteTable::new(settings.routes), pool);
    let mut proxy = pingora_proxy::http_proxy_service(&server.configuration, gateway);
    proxy.add_tcp(&settings.listen);

    server.add_service(proxy);
    server.add_service(health);
    tracing::info!(listen = %settings.listen, "proxy listening");
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
