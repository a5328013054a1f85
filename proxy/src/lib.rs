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
//! - [`settings`]: the proxy's whole input, built and validated by the config loader.

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
pub mod settings;
pub mod statics;
pub mod tls;
pub mod upstream;

use std::{net::SocketAddr, path::PathBuf, sync::Arc};

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
pub use https_redirect::HttpsRedirect;
pub use routes::{Route, Target};
pub use settings::{PoolSettings, RequestLimits, Settings, TlsBehaviour, TlsListener};
pub use statics::StaticSettings;

/// How the proxy stopped, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Graceful,
    /// SIGINT.
    Fast,
}

/// Fails when `listen` cannot be bound. Pingora binds inside a task and panics there, leaving
/// a process that runs without listening; checking first turns that into a clear error.
pub fn check_listen(listen: SocketAddr) -> Result<(), String> {
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
        check_listen(settings.listen)?;
        if let Some(tls) = &settings.tls {
            check_listen(tls.listen)?;
        }
        if let Some(admin) = settings.admin_listen {
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
    listeners
        .add_listener(ListenerConfig::tcp(settings.listen.to_string()).l4_buffer(CLIENT_BUFFERS));
    let mut public_ports = vec![settings.listen.port()];
    let mut handshake = None;
    if let Some(tls) = &settings.tls {
        // The pair is checked here, before Pingora would panic on it.
        let slot = Arc::new(ArcSwap::new(tls::load_certified_key(&tls.cert, &tls.key)?));
        certificate = Some(slot.clone());
        // Plain TCP to Pingora: the handshake is made by `connection`, under the caps.
        listeners
            .add_listener(ListenerConfig::tcp(tls.listen.to_string()).l4_buffer(CLIENT_BUFFERS));
        handshake = Some((
            tls.listen.port(),
            tls::Handshake::new(slot, metrics.clone())?,
        ));
        public_ports.push(tls.listen.port());
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

    if let (Some(listen), Some(metrics)) = (settings.admin_listen, &metrics) {
        let admin = admin::Admin {
            metrics: metrics.clone(),
            lb,
            live: live.clone(),
            backends: settings.pool.backends.clone(),
            supervisor_file: settings.runtime_dir.join(SUPERVISOR_METRICS),
            public_ports,
        };
        let mut service = Service::new("gatehouse admin".into(), admin);
        service.add_tcp(&listen.to_string());
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
    tracing::info!(listen = %settings.listen, tls = ?settings.tls.as_ref().map(|t| t.listen), "proxy listening");
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
            "the open-file limit is low for limits.max_connections; raise it (ulimit -n) or lower max_connections"
        );
    }
}

fn path_string(path: PathBuf) -> Result<String, String> {
    path.into_os_string()
        .into_string()
        .map_err(|p| format!("{} is not UTF-8", PathBuf::from(p).display()))
}
