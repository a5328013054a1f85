//! The listeners: [`serve`] answers the API on the backend's socket, [`serve_admin`] its
//! metrics (and the proxy's audit events) on another, and [`bind`] makes either socket.

use std::{io, path::Path, sync::Arc, time::Duration};

use http::HeaderValue;
use hyper::{server::conn::http1, service::service_fn};
use hyper_util::{rt::TokioIo, server::graceful::GracefulShutdown};
use tokio::{
    net::{UnixListener, UnixStream},
    sync::Semaphore,
};

use crate::{
    app::App,
    connection::{self, ConnectionLimits, Tracker, Watched},
    dispatch, http_util,
    metrics::ConnectionLimit,
    openapi,
};

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
    // Built now, so no request waits for it.
    openapi::document();
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
                    let response = dispatch::handle(app, request).await;
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

/// The admin socket: `GET /metrics` for the proxy's admin listener, and `POST /audit`, where
/// the proxy hands over its tripped guards as audit events (it holds no Redis credentials).
/// Only processes that can reach the socket's file (the group's own) can call it.
pub async fn serve_admin(listener: UnixListener, app: Arc<App>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(error) => {
                tracing::warn!(%error, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let app = app.clone();
        let service = service_fn(move |request: http::Request<hyper::body::Incoming>| {
            let app = app.clone();
            async move {
                let route = (request.method().clone(), request.uri().path().to_owned());
                let response = match (route.0, route.1.as_str()) {
                    (http::Method::GET, "/metrics") => {
                        let mut response =
                            http::Response::new(http_util::Body::from(app.metrics.render()));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            HeaderValue::from_static("text/plain; version=0.0.4"),
                        );
                        response
                    }
                    (http::Method::POST, "/audit") => {
                        let status = crate::audit::edge_event(&app, request.into_body()).await;
                        let mut response = http::Response::new(http_util::Body::default());
                        *response.status_mut() = status;
                        response
                    }
                    _ => {
                        let mut response = http::Response::new(http_util::Body::default());
                        *response.status_mut() = http::StatusCode::NOT_FOUND;
                        response
                    }
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
