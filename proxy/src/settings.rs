//! The proxy's whole input: what [`crate::run`] starts with and what a reload hands it. The
//! config loader builds it once, validated and typed (addresses are [`SocketAddr`]s, times
//! are [`Duration`]s); nothing in the proxy parses a setting again.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, time::Duration};

use crate::{
    AccessSettings, BackendSocket, HttpsRedirect, LogFormat, LogTarget, Route, StaticSettings,
};

#[derive(Debug, Clone)]
pub struct Settings {
    /// The HTTP listener.
    pub listen: SocketAddr,
    pub limits: RequestLimits,
    /// Streams one HTTP/2 connection may have open at once.
    pub h2_max_streams: u32,
    /// Worker threads (at least 1).
    pub threads: usize,
    pub routes: Vec<Route>,
    pub statics: StaticSettings,
    /// The memory for kept backend responses (`[cache]`).
    pub cache: crate::cache::CacheSettings,
    pub pool: PoolSettings,
    /// The named pools (`[upstreams.NAME]`), by name.
    pub upstreams: Vec<NamedPool>,
    /// `None`: plain HTTP only.
    pub tls: Option<TlsListener>,
    pub tls_behaviour: TlsBehaviour,
    /// `Some`: certificates for the HTTPS listener's names come from an ACME server.
    pub acme: Option<crate::acme::AcmeSettings>,
    pub access: AccessSettings,
    /// Upper bound on draining in-flight requests after SIGTERM.
    pub shutdown_grace: Duration,
    /// Where the proxy keeps its pid file and upgrade socket, and finds the supervisor's
    /// metrics.
    pub runtime_dir: PathBuf,
    /// The admin listener (`/metrics`, `/healthz`, `/readyz`); `None`: no admin listener, and
    /// no metrics kept.
    pub admin_listen: Option<SocketAddr>,
    pub access_log_format: LogFormat,
    /// The log of requests no route takes.
    pub default_access_log: Option<LogTarget>,
    /// Application logs as JSON lines rather than text. The caller sets up the log
    /// subscriber when the process starts; the proxy only reports a change at a reload.
    pub json_logs: bool,
}

/// The backends and how the proxy uses them.
#[derive(Debug, Clone)]
pub struct PoolSettings {
    pub backends: Vec<BackendSocket>,
    /// `Some`: the backends are not listed but found in this directory, one socket each
    /// ([`crate::socket_dir`]); `backends` is empty.
    pub socket_dir: Option<PathBuf>,
    /// The most backends taken from `socket_dir`; the sockets past it are left out.
    pub socket_dir_max_backends: usize,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub health_check_interval: Duration,
    /// How long a backend may take to answer `/healthz` (which asks Redis, so it must outlast
    /// the Redis deadline: a slow Redis is not a dead backend).
    pub health_check_timeout: Duration,
    /// Requests in flight to one backend at once.
    pub max_connections_per_backend: usize,
    /// How long a request may wait for a slot when every backend is at its cap.
    pub queue_timeout: Duration,
}

/// A named pool of servers (`[upstreams.NAME]`): any HTTP application, on TCP or Unix
/// sockets, plain or over TLS.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedPool {
    pub name: String,
    pub servers: Vec<UpstreamServer>,
    /// `Some`: HTTPS to every server.
    pub tls: Option<UpstreamTls>,
    pub balance: Balance,
    /// `None`: no active checks; only failed connects take a server out, for that request.
    pub health: Option<HealthCheck>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// How long an idle connection to a server is kept for the next request; it must be
    /// shorter than the server keeps it.
    pub idle_timeout: Duration,
    /// Requests in flight to one server at once.
    pub max_connections: usize,
    pub queue_timeout: Duration,
    /// How often host names are looked up again.
    pub resolve_interval: Duration,
}

/// Where a server of a named pool listens.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum UpstreamServer {
    Unix(PathBuf),
    /// A host name or an address, looked up at start and every `resolve_interval`.
    Tcp {
        host: String,
        port: u16,
    },
}

/// TLS to a named pool's servers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamTls {
    /// The name sent in SNI and checked in each certificate; `None`: the server's host.
    pub sni: Option<String>,
    /// The CA certificates (DER) to trust instead of the system's.
    pub ca: Option<Vec<Vec<u8>>>,
}

/// How a named pool picks a server for a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// The server with the fewest requests in flight.
    LeastConnections,
    /// The same server for the same client address while it is up (rendezvous hashing).
    ClientHash,
    /// The same server for the same value of this request header (a session cookie or a
    /// user id); requests without it go round robin.
    HeaderHash(http::HeaderName),
}

/// Active health checks of a named pool: `GET path`, healthy on a 2xx or 3xx answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Good checks in a row that bring a server back.
    pub rise: usize,
    /// Failed checks in a row that take a server out.
    pub fall: usize,
}

/// The HTTPS listener.
#[derive(Debug, Clone, PartialEq)]
pub struct TlsListener {
    pub listen: SocketAddr,
    /// The default pair, for clients that name no host or one no other certificate is for.
    pub cert: PathBuf,
    pub key: PathBuf,
    /// More pairs (certificate, key), each chosen for the DNS names in its certificate.
    pub certificates: Vec<(PathBuf, PathBuf)>,
    /// `Some`: clients are asked for a certificate from these CAs (`tls.client_ca`).
    pub client_auth: Option<crate::client_cert::ClientAuth>,
}

/// What HTTPS changes in how requests are answered.
#[derive(Debug, Clone, Default)]
pub struct TlsBehaviour {
    /// `Some`: plain-HTTP requests are redirected to HTTPS.
    pub redirect: Option<HttpsRedirect>,
    /// `Strict-Transport-Security` for HTTPS responses; `None` sends none.
    pub hsts: Option<String>,
    /// Sites (as routes name them: `shop.example.com`, `*.example.com`) with their own
    /// choice of both, in place of the two above.
    pub sites: HashMap<String, SiteTls>,
    /// Client certificates mapped to users of the API (`[[tls.client_users]]`).
    pub client_users: crate::client_cert::ClientUsers,
}

/// One site's redirect and HSTS (`[[tls.sites]]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteTls {
    pub redirect: Option<HttpsRedirect>,
    pub hsts: Option<String>,
}

impl TlsBehaviour {
    /// The redirect for plain-HTTP requests to `site` (`None`: the default site).
    pub fn redirect(&self, site: Option<&str>) -> Option<&HttpsRedirect> {
        match self.site(site) {
            Some(own) => own.redirect.as_ref(),
            None => self.redirect.as_ref(),
        }
    }

    /// The `Strict-Transport-Security` value for HTTPS responses of `site`.
    pub fn hsts(&self, site: Option<&str>) -> Option<&str> {
        match self.site(site) {
            Some(own) => own.hsts.as_deref(),
            None => self.hsts.as_deref(),
        }
    }

    fn site(&self, site: Option<&str>) -> Option<&SiteTls> {
        if self.sites.is_empty() {
            return None;
        }
        self.sites.get(site?)
    }
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
    /// Requests one HTTP/1 connection may carry, pipelined or not, before it is closed
    /// (nginx: `keepalive_requests`).
    pub max_requests_per_connection: u32,
    /// How long an upgraded connection (a WebSocket) may carry nothing either way before it
    /// is closed (HAProxy: `timeout tunnel`); it replaces the body and backend read timeouts
    /// once the backend has answered `101`.
    pub upgrade_idle_timeout: Duration,
    /// WebSockets one client (IPv4 address, IPv6 /64) may have open or opening at once.
    pub max_upgraded_per_client: usize,
}
