//! The gatehouse edge proxy, on Pingora.
//!
//! - [`gateway`]: the request phases (`ProxyHttp`), in the order they run.
//! - [`routes`]: the route table, path prefix to target.
//! - [`access`]: rate limits, allow/deny lists and basic auth, per route.
//! - [`statics`]: static sites: files, compression once per version, conditional requests.
//! - [`https_redirect`]: the HTTP listener's redirect to HTTPS.
//! - [`upstream`]: the backend pool on Unix sockets, health checks and failover.
//! - [`drain`]: SIGTERM drains in-flight requests and exits when they are done.
//! - [`connection`]: each client connection first: the caps on open connections (in all and
//!   per client), the TLS handshake, the deadline for a request header, and the [`framing`]
//!   checks (ambiguous or oversized requests are refused before anything else);
//!   [`client_stream`] holds every write to the deadline for sending and watches an HTTP/2
//!   client's opening; [`client_shares`] counts what each client holds.
//! - [`request_id`], [`respond`]: request ids and the JSON error responses.
//! - [`metrics`], [`admin`]: Prometheus series and the admin listener that serves them.
//! - [`access_log`]: per-route access logs, written off the request path.
//! - [`tls`]: the certificate pair and the handshake counters.
//! - [`file_limit`]: the open-file limit, raised for the proxy and the backends alike.
//! - [`heap`]: memory a burst of connections freed, given back to the kernel.
//! - [`live`]: what a reload (SIGHUP) can change, swapped atomically.

pub mod access;
pub mod access_log;
pub mod admin;
pub mod client_shares;
pub mod client_stream;
pub mod connection;
pub mod drain;
pub mod file_limit;
pub mod framing;
pub mod gateway;
pub mod heap;
pub mod https_redirect;
pub mod live;
pub mod metrics;
pub mod request_id;
pub mod respond;
pub mod routes;
pub mod statics;
pub mod tls;
pub mod upstream;

use std::{path::PathBuf, sync::Arc, time::Duration};

use arc_swap::ArcSwap;
use pingora::{
    listeners::{ListenerConfig, Listeners},
    server::{RunArgs, Server, configuration::ServerConf},
    services::listening::Service,
};
use pingora_core::protocols::l4::stream::L4BufferSettings;

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
    pub limits: RequestLimits,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_streams: u32,
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

/// What a request may carry (nginx: `client_max_body_size`, `large_client_header_buffers`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestLimits {
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// The whole request header must arrive within this (nginx: `client_header_timeout`).
    pub header_timeout: Duration,
    /// The longest wait for the next bytes of a request body (nginx: `client_body_timeout`).
    pub body_timeout: Duration,
    /// Client connections open at once; past this the listeners stop accepting.
    pub max_connections: usize,
    /// Connections one client (IPv4 address, IPv6 /64) may hold open at once; past this its
    /// new connections are closed at once (nginx: `limit_conn`).
    pub max_connections_per_client: usize,
    /// The longest a response may make no progress: a write to the client (HTTP/1) or a
    /// stream waiting for flow-control credit (HTTP/2) that stalls this long is aborted
    /// (nginx: `send_timeout`).
    pub send_timeout: Duration,
    /// A TLS handshake must be complete this long after the connection was accepted.
    pub tls_handshake_timeout: Duration,
    /// Requests one client may have in flight to the backends at once.
    pub max_upstream_requests_per_client: usize,
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
///
/// `load` reads the configuration again on SIGHUP. `upgrade`: take the listening sockets
/// over from the running proxy (which hands them over on SIGQUIT) instead of binding them.
pub fn run(
    settings: Settings,
    load: Option<live::LoadSettings>,
    upgrade: bool,
) -> Result<Stopped, String> {
    // Until the reload service listens for them, SIGHUP and SIGUSR1 would end the process (a
    // reload or logrotate right after start); ignored now, handled once the service runs.
    // SAFETY: setting the disposition of two signals to "ignore", before any thread starts.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    // glibc gives each busy thread its own heap; under many connections they fragment and the
    // proxy's memory creeps up run after run. Two heaps keep it flat, at no measurable cost.
    // SAFETY: mallopt before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
    }
    raise_file_limit(settings.limits.max_connections);
    // An upgrade receives its sockets from the old proxy, which still holds the ports.
    if !upgrade {
        check_listen(&settings.listen)?;
        if let Some(tls) = &settings.tls {
            check_listen(&tls.listen)?;
        }
        if let Some(admin) = &settings.admin_listen {
            check_listen(admin)?;
        }
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
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(Some(opt), conf);

    let health = upstream::build(&settings.pool)?;
    let lb = health.task();
    let pool = upstream::Pool::new(lb.clone(), settings.pool.queue_timeout);
    let metrics = match &settings.admin_listen {
        Some(_) => Some(Arc::new(metrics::Metrics::new()?)),
        None => None,
    };
    let live = Arc::new(ArcSwap::from_pointee(live::Live::build(
        &settings,
        None,
        metrics.as_ref(),
    )?));
    let gateway = gateway::Gateway::new(live.clone(), pool);

    let mut listeners = Listeners::new();
    let capacity = Arc::new(connection::Capacity::new(live.clone()));
    listeners.set_connection_filter(capacity.clone());
    let mut certificate = None;
    listeners.add_listener(ListenerConfig::tcp(&settings.listen).l4_buffer(CLIENT_BUFFERS));
    let mut public_ports = vec![port_of(&settings.listen)];
    let mut handshake = None;
    if let Some(tls) = &settings.tls {
        // The pair is checked here, before Pingora would panic on it.
        let slot = Arc::new(ArcSwap::new(tls::load_certified_key(&tls.cert, &tls.key)?));
        certificate = Some(slot.clone());
        // Plain TCP to Pingora: the handshake is made by `connection`, under the caps.
        listeners.add_listener(ListenerConfig::tcp(&tls.listen).l4_buffer(CLIENT_BUFFERS));
        handshake = Some((
            port_of(&tls.listen),
            tls::Handshake::new(slot, metrics.clone())?,
        ));
        public_ports.push(port_of(&tls.listen));
    }
    let proxy = Service::with_listeners(
        "gatehouse proxy".into(),
        listeners,
        connection::Edge::new(
            pingora_proxy::http_proxy(&server.configuration, gateway),
            settings.h2_max_streams,
            live.clone(),
            capacity,
            handshake,
        ),
    );

    if let (Some(listen), Some(metrics)) = (&settings.admin_listen, &metrics) {
        let admin = admin::Admin {
            metrics: metrics.clone(),
            lb,
            live: live.clone(),
            backends: settings.pool.backends.clone(),
            supervisor_file: settings.runtime_dir.join(SUPERVISOR_METRICS),
            public_ports,
        };
        let mut service = Service::new("gatehouse admin".into(), admin);
        service.add_tcp(listen);
        server.add_service(service);
    }
    // Always, so neither SIGHUP nor SIGUSR1 (logrotate) ever kills the proxy.
    let signals = live::Signals {
        fixed: live::Fixed::of(&settings),
        live,
        load,
        certificate,
        metrics,
    };
    server.add_service(pingora::services::background::background_service(
        "reload and log reopening",
        signals,
    ));
    server.add_service(pingora::services::background::background_service(
        "heap trim",
        heap::Trim,
    ));
    server.add_service(proxy);
    server.add_service(health);
    // Last, after everything that can fail: in an upgrade this takes the listening sockets
    // from the old proxy, which stops serving them soon after. Then say so to the
    // supervisor, which waits for it.
    server.bootstrap();
    let ready = settings.runtime_dir.join(READY_FILE);
    if let Err(error) = std::fs::write(&ready, std::process::id().to_string()) {
        tracing::warn!(file = %ready.display(), %error, "cannot write the ready file");
    }
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

/// Buffers between each client socket and the HTTP code. Pingora's defaults (64 KiB read,
/// 1460 bytes write) copy every request through a read buffer first, and send a response's
/// header and body in separate packets once the body is over 1460 bytes. Without the read
/// buffer, requests are read straight into the parser's own; with a 32 KiB write buffer, a
/// response of up to 32 KiB (an API answer, a compressed page) leaves in one `send`. Measured
/// with oha -c 64: 10-20% more requests a second for static pages and `/api/ping`, 10-20% less
/// proxy CPU per request, for up to 32 KiB more memory per busy connection.
const CLIENT_BUFFERS: L4BufferSettings = L4BufferSettings {
    read: Some(0),
    write: Some(32 << 10),
};

/// The file in the runtime directory where the proxy writes its pid once it holds the
/// listening sockets (the supervisor waits for it during an upgrade).
pub const READY_FILE: &str = "proxy.ready";

/// The file in the runtime directory where the proxy writes the outcome of its last reload.
pub const RELOAD_FILE: &str = "proxy.reload";

/// The file in the runtime directory where the supervisor keeps its series.
pub const SUPERVISOR_METRICS: &str = "supervisor.prom";

/// Each client connection takes a file descriptor and may take another to a backend: the soft
/// limit goes up to the hard one ([`file_limit`]), and a limit still too low is reported, since
/// past it connections fail instead of waiting their turn.
fn raise_file_limit(max_connections: usize) {
    let Some(soft) = file_limit::raise_to_hard() else {
        return;
    };
    // Room for a backend connection each, and the proxy's own files.
    let needed = (max_connections as u64).saturating_mul(2) + 64;
    if soft < needed {
        tracing::warn!(
            open_files = soft,
            max_connections,
            "the open-file limit is low for proxy.max_connections; raise it (ulimit -n) or lower max_connections"
        );
    }
}

fn port_of(listen: &str) -> u16 {
    listen
        .rsplit_once(':')
        .and_then(|(_, port)| port.parse().ok())
        .unwrap_or(0)
}

fn path_string(path: PathBuf) -> Result<String, String> {
    path.into_os_string()
        .into_string()
        .map_err(|p| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
