//! The gatehouse backend: a lean hyper 1.x server on a Unix domain socket.
//!
//! - [`routes`]: the route table (each endpoint with who may call it) and the dispatch.
//! - [`login`]: logging in and out, `/auth/verify`, `/api/me`.
//! - [`user_admin`]: the admin-only user endpoints.
//! - [`accounts`]: users, roles, live tokens and the generation marker, in Redis.
//! - [`guard`]: the login brute-force guard, in Redis.
//! - [`token`]: issuing and checking HS256 JWTs.
//! - [`users`]: the users file that seeds Redis, and argon2id hashing.
//! - [`openapi`]: the OpenAPI document, generated from the types and the route table.
//! - [`store`]: the Redis connection, shared by every backend process and replica.
//! - [`metrics`]: the backend's Prometheus series, served on a separate admin socket.
//! - [`connection`]: header and idle deadlines on the backend's own connections, and the
//!   request body that tells them when it has been read (its own deadline is in
//!   [`http_util::read_json`]).
//! - [`error`], [`http_util`]: the JSON error type and body helpers.
//!
//! [`serve`] takes a bound listener and a shutdown future, so tests and the process group
//! start it the same way; it holds at most `max_connections` connections at once, and
//! closes each past its header or idle deadline. [`serve_admin`] answers `GET /metrics` on
//! its own socket, which no route of the proxy can reach.

pub mod accounts;
pub mod connection;
pub mod error;
pub mod guard;
pub mod http_util;
pub mod login;
pub mod metrics;
pub mod openapi;
pub mod routes;
pub mod store;
pub mod token;
pub mod user_admin;
pub mod users;

use std::{io, path::Path, sync::Arc, time::Duration};

use http::HeaderValue;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use connection::{Tracker, Watched};
use metrics::ConnectionLimit;

pub use accounts::Accounts;
pub use connection::ConnectionLimits;
pub use guard::{Guard, GuardSettings};
pub use metrics::Metrics;
pub use store::Store;
pub use token::Tokens;
pub use users::Users;

/// Everything a request handler needs, built once at start-up.
pub struct App {
    pub id: String,
    id_header: HeaderValue,
    pub tokens: Tokens,
    pub store: Arc<Store>,
    pub accounts: Accounts,
    pub guard: Guard,
    pub max_body_bytes: usize,
    /// How long a handler waits for a request body, whole.
    pub body_timeout: Duration,
    pub metrics: Arc<Metrics>,
    /// The OpenAPI document, serialized once.
    pub openapi: bytes::Bytes,
    /// Set when the backend is about to stop: `/healthz` fails, so the proxy takes it out of
    /// rotation before it closes its socket.
    pub draining: std::sync::atomic::AtomicBool,
}

/// What [`App::new`] is built from.
pub struct Settings {
    pub id: String,
    /// The users file, copied into Redis when Redis has no users.
    pub users: Users,
    pub tokens: Tokens,
    pub store: Store,
    pub guard: GuardSettings,
    pub max_body_bytes: usize,
    pub body_timeout: Duration,
    /// Live tokens a user may hold; a login past it revokes the oldest.
    pub max_tokens_per_user: usize,
    pub metrics: Arc<Metrics>,
}

impl App {
    pub fn new(settings: Settings) -> Result<Self, String> {
        let Settings {
            id,
            users,
            tokens,
            store,
            guard,
            max_body_bytes,
            body_timeout,
            max_tokens_per_user,
            metrics,
        } = settings;
        let id_header = HeaderValue::from_str(&id)
            .map_err(|_| format!("backend id {id:?} is not a valid header value"))?;
        let store = Arc::new(store);
        Ok(Self {
            id,
            id_header,
            tokens,
            accounts: Accounts::new(
                store.clone(),
                users.seed,
                max_tokens_per_user,
                metrics.clone(),
            )?,
            guard: Guard::new(store.clone(), guard, metrics.clone()),
            store,
            max_body_bytes,
            body_timeout,
            metrics,
            openapi: openapi::document_json()?,
            draining: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Reads Redis's generation, seeding the users first if Redis has none, retrying while
    /// Redis is down. Requests that find it missing do the same, so none waits for this loop.
    pub async fn seed_users(self: Arc<Self>) {
        while self.accounts.generation().await.is_err() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Binds `path`, removing a socket file left by a dead process but never one that a live
/// process still answers on.
pub async fn bind(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        match UnixStream::connect(path).await {
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AddrInUse,
                    format!("{} is in use by a running process", path.display()),
                ));
            }
            Err(_) => {
                tracing::info!(socket = %path.display(), "removing stale socket");
                std::fs::remove_file(path)?;
            }
        }
    }
    UnixListener::bind(path)
}

/// Serves until `shutdown` resolves, then stops accepting and lets open requests finish
/// for up to `drain`.
///
/// Past `limits.max_connections` a new connection is not accepted until one ends: it waits
/// in the listen queue (like HAProxy's `maxconn`), so a flood of connections cannot take
/// the descriptors every backend process needs for Redis and its other clients.
pub async fn serve(
    listener: UnixListener,
    app: Arc<App>,
    limits: ConnectionLimits,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
) {
    tokio::spawn(app.clone().seed_users());
    // HTTP/1.1 only: the proxy is the one client, and it speaks HTTP/1.1 over the socket.
    let mut server = http1::Builder::new();
    server.keep_alive(true);
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let slot = match slots.clone().try_acquire_owned() {
            Ok(slot) => slot,
            Err(_) => {
                app.metrics
                    .connection_limit(ConnectionLimit::MaxConnections);
                tokio::select! {
                    slot = slots.clone().acquire_owned() => match slot {
                        Ok(slot) => slot,
                        // Never closed; if it were, nothing could be served.
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let tracker = Tracker::new(limits);
        let service = {
            let (app, tracker) = (app.clone(), tracker.clone());
            service_fn(move |request: http::Request<hyper::body::Incoming>| {
                let (app, tracker) = (app.clone(), tracker.clone());
                let request = connection::RequestBody::watch(request, &tracker);
                async move {
                    let response = routes::handle(app, request).await;
                    tracker.request_ended();
                    Ok::<_, std::convert::Infallible>(response)
                }
            })
        };
        let io = TokioIo::new(Watched::new(stream, tracker.clone()));
        let connection = graceful.watch(server.serve_connection(io, service));
        let metrics = app.metrics.clone();
        metrics.connections_open(1);
        tokio::spawn(async move {
            tokio::select! {
                ended = connection => if let Err(error) = ended {
                    tracing::debug!(%error, "connection ended with an error");
                },
                // Dropping the connection closes it: past either deadline no request is
                // being handled, so none is cut short.
                limit = tracker.expired() => metrics.connection_limit(limit),
            }
            metrics.connections_open(-1);
            drop(slot);
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_s = drain.as_secs(),
            "requests still open after the drain period; closing them"
        );
    }
}

/// Answers `GET /metrics` with the Prometheus text of `metrics`, until the process ends.
pub async fn serve_admin(listener: UnixListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let metrics = metrics.clone();
            async move {
                let response = if request.uri().path() == "/metrics" {
                    let mut response = http::Response::new(http_util::Body::from(metrics.render()));
                    response.headers_mut().insert(
                        http::header::CONTENT_TYPE,
                        HeaderValue::from_static("text/plain; version=0.0.4"),
                    );
                    response
                } else {
                    let mut response = http::Response::new(http_util::Body::default());
                    *response.status_mut() = http::StatusCode::NOT_FOUND;
                    response
                };
                Ok::<_, std::convert::Infallible>(response)
            }
        });
        tokio::spawn(async move {
            let _ = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
