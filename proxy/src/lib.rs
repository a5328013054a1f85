//! The gatehouse edge proxy, on Pingora.
//!
//! A request meets these in order:
//!
//! - [`connection`]: each client connection first: the caps on open connections (in all and
//!   per client, counted by [`client_shares`]), the TLS handshake ([`tls`]; a client's
//!   certificate read once, by [`client_cert`]), the deadline for a
//!   request header, and the [`framing`] checks (ambiguous or oversized requests are refused
//!   before anything else); [`client_stream`] holds every write to the deadline for sending
//!   and watches an HTTP/2 client's opening.
//! - [`gateway`]: the request phases (`ProxyHttp`), in the order they run: the [`request_id`],
//!   the redirect to HTTPS ([`https_redirect`]), the [`path`] guard, the lookup in [`routes`]
//!   (a [`routes::LiveRoute`] holds what serves the route, its access rules, its metric
//!   series and its access log), the route's [`access`] rules (rate limits, allow/deny lists,
//!   basic auth; a guard that refuses is an audit event, handed to a backend by
//!   [`guard_events`]), then a static site ([`statics`]) or the backend pool on Unix sockets
//!   ([`upstream`], health checks and failover): a simple `GET` or `HEAD` over the proxy's
//!   own keep-alive connections ([`forward`]), anything else over Pingora's upstream path.
//! - [`respond`]: the responses the proxy writes itself; an [`respond::ErrorReply`] is a JSON
//!   error.
//! - [`observe`]: the request's end, counted in its route's [`metrics`] series and handed to
//!   its [`access_log`], which is written off the request path.
//!
//! Around them:
//!
//! - [`live`]: what a reload (SIGHUP) can change, built whole and swapped atomically.
//! - [`drain`]: SIGTERM drains in-flight requests and exits when they are done.
//! - [`admin`]: the admin listener: the metrics of the whole group, `/healthz`, `/readyz`.
//! - [`acme`]: certificates from an ACME server, renewed in the background; its challenges
//!   are answered by [`gateway`] (HTTP-01) and [`tls`] (TLS-ALPN-01).
//! - [`cache`]: backend responses kept in memory for the routes that ask (`[routes.cache]`).
//! - [`encoding`]: content codings: negotiation, the compressors, what is worth compressing.
//! - [`file_limit`]: the open-file limit, raised for the proxy and the backends alike.
//! - [`heap`]: memory a burst of connections freed, given back to the kernel.
//! - [`settings`]: the proxy's whole input, built and validated by the config loader.
//! - [`error`]: why the run-time state could not be built.
//!
//! # Errors
//!
//! - **A request's failure** is Pingora's [`pingora::Error`], which every phase returns: its
//!   type and source say what failed. [`gateway`]'s `fail_to_proxy` turns it into the status
//!   and JSON error the client gets, and `suppress_error_log` keeps the client's own failures
//!   (gone, too slow to send or to read) and a full pool's 503s out of the error log, since any
//!   client could flood it with them: they are in the metrics and the access log. A backend's
//!   failure is counted by backend and kind, and logged by Pingora once per request, with the
//!   request id and without the query.
//! - **A refusal is an answer, not an error**: a request the edge turns away (its framing, the
//!   path guard, no route, the access rules, a cap) is answered from its phase with a JSON
//!   `{"error","message","request_id","correlation_id"}` ([`respond`]), counted, and logged in the access log
//!   only.
//! - **Building** the run-time state, at start-up or on a reload, fails with a
//!   [`BuildError`] whose message names the file, socket or setting at fault. At start-up it
//!   stops the proxy; on a reload it goes to the error log and the reload report, and the
//!   running configuration keeps serving. The parsers of single config values
//!   (`IpList::parse`, `Htpasswd::parse`) return a message and the entry or line it is about,
//!   for the root crate to name the file, line and key.
//! - **Background work** (the access-log writer, scrapes of the backends, signal handlers) logs
//!   and counts its failures and carries on; it never stops the proxy or fails a request.
//!   Nothing unwraps a value from outside.

pub mod access;
pub mod access_log;
pub mod acme;
pub mod admin;
pub mod cache;
pub mod client_cert;
pub mod client_shares;
pub mod client_stream;
pub mod connection;
pub mod cors;
pub mod drain;
pub mod encoding;
pub mod error;
pub mod file_limit;
pub mod forward;
pub mod framing;
pub mod gateway;
pub mod guard_events;
pub mod header_rules;
pub mod heap;
pub mod https_redirect;
pub mod live;
pub mod metrics;
pub mod observe;
pub mod path;
pub mod pools;
pub mod request_id;
pub mod respond;
pub mod rewrite;
pub mod routes;
pub mod settings;
pub mod socket_dir;
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
pub use error::BuildError;
pub use https_redirect::HttpsRedirect;
pub use live::RELOAD_FILE;
pub use rewrite::PrefixRewrite;
pub use routes::{Route, RouteHeaders, Target};
pub use settings::{
    Balance, HealthCheck, NamedPool, PoolSettings, RequestLimits, Settings, SiteTls, TlsBehaviour,
    TlsListener, UpstreamServer, UpstreamTls,
};
pub use statics::StaticSettings;
pub use upstream::BackendSocket;

/// How the proxy stopped, for the exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Graceful,
    /// SIGINT.
    Fast,
}

/// Fails when `listen` cannot be bound. Pingora binds inside a task and panics there, leaving
/// a process that runs without listening; checking first turns that into a clear error.
pub fn check_listen(listen: SocketAddr) -> Result<(), BuildError> {
    std::net::TcpListener::bind(listen)
        .map(drop)
        .map_err(|source| BuildError::Listen {
            listen: listen.to_string(),
            source,
        })
}

/// Runs the proxy until a signal stops it. Returns after a fast (SIGINT) shutdown or a full
/// grace period; a drained SIGTERM or SIGQUIT exits the process directly (see [`drain`]).
///
/// `load` reads the configuration again on SIGHUP. `upgrade`: take the listening sockets
/// over from the running proxy (which hands them over on SIGQUIT) instead of binding them.
/// `allocator`: the process's, chosen by the binary before `main`.
pub fn run(
    settings: Settings,
    load: Option<live::LoadSettings>,
    upgrade: bool,
    allocator: heap::Allocator,
) -> Result<Stopped, BuildError> {
    // Until the reload service listens for them, SIGHUP and SIGUSR1 would end the process (a
    // reload or logrotate right after start); ignored now, handled once the service runs.
    // SAFETY: setting the disposition of two signals to "ignore"; a disposition is the
    // process's, whichever thread a signal reaches, and no handler of ours is replaced.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGUSR1, libc::SIG_IGN);
    }
    // glibc gives each busy thread its own heap; under many connections they fragment and the
    // proxy's memory creeps up run after run. Two heaps keep it flat.
    if allocator == heap::Allocator::Glibc {
        // SAFETY: mallopt before any thread starts (on glibc the binary starts none).
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 2);
        }
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
        // Pingora counts whole seconds; rounded up, so a drain never gets less than asked.
        grace_period_seconds: Some(
            settings.shutdown_grace.as_secs()
                + u64::from(settings.shutdown_grace.subsec_nanos() > 0),
        ),
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
    let deadlines = forward::Deadlines {
        connect: settings.pool.connect_timeout,
        read: settings.pool.read_timeout,
    };
    let pool = Arc::new(upstream::Pool::new(
        lb.clone(),
        settings.pool.queue_timeout,
        deadlines,
        settings::Balance::RoundRobin,
        true,
    ));
    let pools = Arc::new(pools::Pools::build(&settings.upstreams, None)?);
    let metrics = match &settings.admin_listen {
        Some(_) => Some(Arc::new(metrics::Metrics::new()?)),
        None => None,
    };
    let live = Arc::new(ArcSwap::from_pointee(live::Live::build(
        &settings,
        None,
        metrics.as_ref(),
        &pools,
    )?));
    let (acme, renewer) = match &settings.acme {
        Some(acme) => {
            let registry = metrics.as_ref().map(|m| &m.registry);
            let (acme, renewer) = acme::Acme::start(acme.clone(), registry)?;
            (Some(acme), Some(renewer))
        }
        None => (None, None),
    };
    let drain = drain::Drain::new();
    let cache = Arc::new(cache::Store::new(settings.cache.clone()));
    let gateway = gateway::Gateway::new(
        live.clone(),
        pool.clone(),
        drain.clone(),
        acme.clone(),
        cache.clone(),
    );

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
        let slot = Arc::new(ArcSwap::from_pointee(tls::Certificates::load(tls)?));
        certificate = Some(slot.clone());
        // Plain TCP to Pingora: the handshake is made by `connection`, under the caps.
        listeners
            .add_listener(ListenerConfig::tcp(tls.listen.to_string()).l4_buffer(CLIENT_BUFFERS));
        handshake = Some((
            tls.listen.port(),
            tls::Handshake::new(
                slot,
                tls.client_auth.as_ref(),
                acme.clone(),
                metrics.clone(),
            )?,
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
            supervisor_file: settings.runtime_dir.join(SUPERVISOR_METRICS),
            public_ports,
            cache: cache.clone(),
        };
        let mut service = Service::new("gatehouse admin".into(), admin);
        service.add_tcp(&listen.to_string());
        server.add_service(service);
    }
    let flushing = live.clone();
    server.add_service(pingora::services::background::background_service(
        "exit when drained",
        drain::ExitWhenDrained {
            drain: drain.clone(),
            before_exit: Box::new(move || flushing.load().flush_access_log()),
        },
    ));
    // Always, so neither SIGHUP nor SIGUSR1 (logrotate) ever kills the proxy.
    let signals = live::Signals {
        fixed: live::Fixed::of(&settings),
        live: live.clone(),
        load,
        certificate,
        metrics,
    };
    server.add_service(pingora::services::background::background_service(
        "reload and log reopening",
        signals,
    ));
    if allocator == heap::Allocator::Glibc {
        server.add_service(pingora::services::background::background_service(
            "heap trim",
            heap::Trim,
        ));
    }
    server.add_service(pingora::services::background::background_service(
        "idle upstream connections",
        forward::IdleSweep {
            backends: pool,
            live: live.clone(),
        },
    ));
    let proxy = server.add_service(proxy);
    // After the listeners: the CA's checks must find them serving.
    if let Some(renewer) = renewer {
        let renewer = server.add_service(pingora::services::background::background_service(
            "acme certificates",
            renewer,
        ));
        renewer.add_dependency(&proxy);
    }
    server.add_service(health);
    // Requests to a named pool find its servers: the proxy starts once each pool has looked
    // its names up (or failed to, under the lookup deadline).
    // Given away, not kept here: a reload that drops a pool stops its lookups and checks.
    let starter = server.add_service(pingora::services::background::background_service(
        "upstream pools",
        pools::Starter::new(pools),
    ));
    proxy.add_dependency(&starter);
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
        shutdown_signal: Box::new(drain::Signals(drain.clone())),
    });
    live.load().flush_access_log();
    Ok(if drain.stopped_fast() {
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

fn path_string(path: PathBuf) -> Result<String, BuildError> {
    path.into_os_string()
        .into_string()
        .map_err(|p| BuildError::NotUtf8(PathBuf::from(p)))
}
