//! Each client connection, before Pingora's HTTP code reads from it.
//!
//! - **A cap on open connections** (`limits.max_connections`). At the cap the listeners stop
//!   accepting, as nginx and HAProxy do: new connections wait in the kernel's backlog rather
//!   than each costing a task and buffers here, and are taken in turn as others close.
//! - **A cap per client** (`limits.max_connections_per_client`, IPv6 by /64; nginx
//!   `limit_conn`): a client holding that many gets its new connections closed at once, so one
//!   address cannot fill the global cap while everyone else waits.
//! - **The TLS handshake** ([`crate::tls::Handshake`]) on the HTTPS port, counted against both
//!   caps from accept and bounded by `limits.tls_handshake_timeout`.
//! - **A deadline for the whole request header** (`limits.header_timeout`, from accept, or
//!   from the end of the TLS handshake). Pingora's read timeout restarts with every byte, so a
//!   client trickling a byte a minute would hold its connection for ever; here it gets `408`
//!   when the deadline passes. The body's reads get their own timeout
//!   (`limits.body_timeout`), set on each session here. An HTTP/2 client owes its first
//!   request (a `HEADERS` frame) by the same deadline.
//! - **A send deadline** (`limits.send_timeout`) on every write to the client
//!   ([`crate::client_stream`]): a client that stops reading loses its response and its
//!   connection.
//! - **The framing checks** of [`crate::framing`] on the raw header, answered with the same
//!   JSON errors as every other refusal.
//! - **Pipelined requests** (sent before the previous answer; RFC 9112, 9.3.2) are answered
//!   one at a time, in order, each header read here with every check above. Pingora is given
//!   one request's bytes at a time ([`ClientStream::fence`]); those read past a request wait
//!   for its answer. Only a chunked body (or an upgrade) has no end known here: Pingora reads
//!   it, and a request pipelined behind it closes the connection after the first answer. A
//!   connection carries at most `limits.max_requests_per_connection` requests, so a client
//!   pipelining without end is served its share, then connects again, past the caps.
//!
//! The header read here is handed to Pingora as the session's first bytes, so nothing is
//! read twice. HTTP/2 connections go to Pingora once their opening is in, whose codec frames
//! requests itself.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::{
    apps::{HttpPersistentSettings, HttpServerApp, HttpServerOptions, ServerApp},
    listeners::ConnectionFilter,
    protocols::{ALPN, GetSocketDigest, Ssl, Stream, http::ServerSession},
    server::ShutdownWatch,
};
use pingora_proxy::HttpProxy;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    sync::{Notify, watch},
};

use crate::{
    RequestLimits,
    client_shares::{ClientShares, Share},
    client_stream::{ClientStream, Opened},
    framing::{self, Body, Head, Look},
    gateway::Gateway,
    live::Live,
    metrics::Cut,
    observe::Finished,
    request_id,
    respond::ErrorReply,
    tls,
};

/// How long a kept-alive connection may sit idle between requests (Pingora's default).
const KEEPALIVE_IDLE: Duration = Duration::from_secs(60);

/// Room for a typical request header in one read.
const FIRST_READ: usize = 4096;

/// After refusing a request, how long its connection is read and discarded before it closes:
/// closing with unread bytes would reset the connection and could lose the response.
const LINGER: Duration = Duration::from_secs(2);

/// What an HTTP/2 stream may keep queued for a client that reads slowly (h2's default is 400
/// KiB): with 100 streams a connection, that is what one stalled client could pin until the
/// send deadline.
const H2_SEND_BUFFER: usize = 64 << 10;

/// The proxy's application: every connection on the public listeners starts here.
pub struct Edge {
    proxy: Arc<HttpProxy<Gateway>>,
    live: Arc<ArcSwap<Live>>,
    capacity: Arc<Capacity>,
    /// The HTTPS port and its handshake; connections to any other port are plain HTTP. (One
    /// Pingora service for both listeners, since each service gets its own runtime and
    /// threads.)
    tls: Option<(u16, tls::Handshake)>,
}

impl Edge {
    /// `h2_max_streams`: streams one HTTP/2 connection may have open at once (nginx:
    /// `http2_max_concurrent_streams`).
    pub fn new(
        mut proxy: HttpProxy<Gateway>,
        h2_max_streams: u32,
        live: Arc<ArcSwap<Live>>,
        capacity: Arc<Capacity>,
        tls: Option<(u16, tls::Handshake)>,
    ) -> Self {
        // An HTTP/2 connection with no stream open holds a slot like an idle kept-alive
        // one, and is closed after as long.
        let mut options = HttpServerOptions::default();
        options.h2_idle_timeout = Some(KEEPALIVE_IDLE);
        proxy.server_options = Some(options);
        let mut h2 = pingora_core::protocols::http::v2::server::default_h2_options();
        h2.max_concurrent_streams(h2_max_streams);
        h2.max_send_buffer_size(H2_SEND_BUFFER);
        proxy.h2_options = Some(h2);
        Self {
            proxy: Arc::new(proxy),
            live,
            capacity,
            tls,
        }
    }

    fn cut(&self, cut: Cut) {
        if let Some(metrics) = &self.live.load().metrics {
            metrics.cut(cut);
        }
    }

    /// HTTP/2: Pingora serves the connection, which must bring its first request by the
    /// header deadline; one that has not by then, or opens wrongly, is closed.
    async fn serve_h2(
        &self,
        mut stream: ClientStream,
        deadline: Instant,
        shutdown: &ShutdownWatch,
    ) {
        let opened = stream.watch_h2();
        let serve = ServerApp::process_new(&self.proxy, Box::new(stream), shutdown);
        let cut = async {
            if let Ok(Ok(Opened::Request)) = tokio::time::timeout_at(deadline.into(), opened).await
            {
                std::future::pending::<()>().await;
            }
        };
        tokio::select! {
            biased;
            _ = serve => {}
            () = cut => self.cut(Cut::H2Opening),
        }
    }

    /// HTTP/1: read each request header here, then let Pingora serve the request; bytes read
    /// past a request (pipelined ones) start the next header read.
    async fn serve_http1(&self, stream: ClientStream, shutdown: &ShutdownWatch) {
        let mut stream = Box::new(stream);
        let mut kept_alive = false;
        // Pipelining stays off in Pingora: the next request never reaches it as part of this
        // one, so it needs no say in it.
        let mut settings: Option<HttpPersistentSettings> = None;
        let mut crowded = self.capacity.crowded.subscribe();
        loop {
            let limits = self.live.load().limits;
            let started = Instant::now();
            let carried = stream.unfence();
            // A new connection owes its first header from the start; a kept-alive one may
            // idle, and owes the header from its first byte.
            let due = if kept_alive {
                Due::AfterFirstByte
            } else {
                Due::By(started + limits.header_timeout)
            };
            let read = read_header(&mut stream, carried, &limits, due, shutdown, &mut crowded);
            let (mut request, head) = match read.await {
                Ok(header) => header,
                Err(Ended::Quietly) => return,
                Err(Ended::Refused(reply, header)) => {
                    return self.refuse(stream, reply, &header, started).await;
                }
            };
            // Pingora gets the header and as much of the body as came with it; the body's
            // other bytes are read through the fence, and the rest waits for the next turn.
            let after_head = (request.len() - head.len) as u64;
            match head.body {
                Body::Length(length) => {
                    let took = length.min(after_head);
                    let held = request.split_off(head.len + took as usize);
                    stream.fence(length - took, held);
                }
                // Read by Pingora to wherever it ends; anything it reads past that closes
                // the connection after the response.
                Body::Unbounded => {}
            }
            let mut session = ServerSession::new_http1(stream);
            match settings.take() {
                Some(settings) => settings.apply_to_session(&mut session),
                None => {
                    session.set_keepalive(Some(KEEPALIVE_IDLE.as_secs()));
                    // Counted down by Pingora at each reuse: this session is the first.
                    let reuses = limits.max_requests_per_connection.saturating_sub(1);
                    session.set_keepalive_reuses_remaining(Some(reuses));
                }
            }
            if *shutdown.borrow() {
                session.set_keepalive(None);
            }
            // The header is in; the body may still trickle in, a read at a time.
            session.set_read_timeout(Some(limits.body_timeout));
            session.set_pipelined_prefix(request);
            let Some(next) = HttpServerApp::process_new_http(&self.proxy, session, shutdown).await
            else {
                return;
            };
            let next_stream;
            (next_stream, settings) = next.consume();
            // Always ours: the session was made from it.
            let Ok(next_stream) = next_stream.into_any().downcast::<ClientStream>() else {
                return;
            };
            stream = next_stream;
            kept_alive = true;
        }
    }

    /// Answers a refused request with its JSON error and closes the connection.
    async fn refuse(
        &self,
        mut stream: Box<ClientStream>,
        reply: ErrorReply,
        header: &[u8],
        started: Instant,
    ) {
        let live = self.live.load_full();
        let request_id = request_id::generate();
        let tls = stream.get_ssl_digest().is_some();
        let response = error_response(reply, &request_id, live.tls.hsts.as_deref().filter(|_| tls));
        let sent = tokio::time::timeout(LINGER, async {
            stream.write_all(&response).await?;
            stream.flush().await?;
            AsyncWriteExt::shutdown(&mut stream).await
        })
        .await;
        let bytes = match sent {
            Ok(Ok(())) => response.len(),
            _ => 0,
        };
        let _ = tokio::time::timeout(LINGER, async {
            let mut sink = [0u8; 4096];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
        })
        .await;

        let (method, path) = request_line(header);
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(SocketAddr::ip))
            .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
        live.unrouted.finished(Finished {
            correlation_id: None,
            elapsed: started.elapsed(),
            request_id,
            client,
            method: method.as_ref(),
            path: &path,
            http2: false,
            status: reply.status,
            bytes,
            upstream: None,
            upstream_duration: None,
            user: None,
            headers: None,
            cache: None,
        });
    }
}

#[async_trait]
impl ServerApp for Edge {
    async fn process_new(
        self: &Arc<Self>,
        stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let accepted = Instant::now();
        let client = stream
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).map(SocketAddr::ip));
        let Some(_open) = self.capacity.enter(client) else {
            self.cut(Cut::PerClientLimit);
            return None;
        };
        // Read once and let go: a connection may last hours, and the configuration it was
        // accepted under must not (a removed pool would keep checking its servers).
        let (limits, metrics) = {
            let live = self.live.load();
            (live.limits, live.metrics.clone())
        };
        let stream = match &self.tls {
            Some((port, tls)) if local_port(&stream) == Some(*port) => {
                tls.accept(stream, accepted + limits.tls_handshake_timeout)
                    .await?
            }
            _ => stream,
        };
        let stream = ClientStream::new(stream, limits.send_timeout, metrics);
        if matches!(stream.selected_alpn_proto(), Some(ALPN::H2)) {
            let deadline = Instant::now() + limits.header_timeout;
            self.serve_h2(stream, deadline, shutdown).await;
            return None;
        }
        self.serve_http1(stream, shutdown).await;
        None
    }

    async fn cleanup(&self) {
        ServerApp::cleanup(self.proxy.as_ref()).await;
    }
}

fn local_port(stream: &Stream) -> Option<u16> {
    stream
        .get_socket_digest()?
        .local_addr()?
        .as_inet()
        .map(SocketAddr::port)
}

/// Why a connection ends before its request reaches Pingora.
enum Ended {
    /// Closed by the client, idle too long or the proxy is stopping: nothing to answer.
    Quietly,
    /// The header so far, refused.
    Refused(ErrorReply, BytesMut),
}

/// When a request header must be complete.
enum Due {
    By(Instant),
    /// `header_timeout` after its first byte, which may take up to [`KEEPALIVE_IDLE`].
    AfterFirstByte,
}

impl Due {
    /// The deadline, once the header's first byte is in.
    fn deadline(&self, limits: &RequestLimits) -> Instant {
        match *self {
            Due::By(deadline) => deadline,
            Due::AfterFirstByte => Instant::now() + limits.header_timeout,
        }
    }
}

/// Reads one request header, by its deadline; with it come the bytes read past it. `carried`:
/// bytes read already, past the previous request (pipelined), which the header starts with.
/// A kept-alive connection still waiting for one closes when the connection cap is reached,
/// to make room (as nginx does).
async fn read_header(
    stream: &mut ClientStream,
    carried: BytesMut,
    limits: &RequestLimits,
    due: Due,
    shutdown: &ShutdownWatch,
    crowded: &mut watch::Receiver<u64>,
) -> Result<(BytesMut, Head), Ended> {
    if !carried.is_empty() {
        return read_rest_of_header(stream, carried, limits, due.deadline(limits)).await;
    }
    let mut buf = BytesMut::with_capacity(FIRST_READ);
    let idle = match due {
        Due::By(deadline) => deadline.saturating_duration_since(Instant::now()),
        Due::AfterFirstByte => KEEPALIVE_IDLE,
    };
    let idling = matches!(due, Due::AfterFirstByte);
    crowded.mark_unchanged();
    let mut stopping = shutdown.clone();
    let first = tokio::select! {
        biased;
        read = pingora_timeout::timeout(idle, stream.read_buf(&mut buf)) => read,
        () = stopping_down(&mut stopping) => return Err(Ended::Quietly),
        _ = crowded.changed(), if idling => return Err(Ended::Quietly),
    };
    if !matches!(first, Ok(Ok(n)) if n > 0) {
        return Err(Ended::Quietly);
    }
    read_rest_of_header(stream, buf, limits, due.deadline(limits)).await
}

/// Reads until the header that `buf` starts is complete, or refused, or `deadline` passes.
async fn read_rest_of_header(
    stream: &mut ClientStream,
    mut buf: BytesMut,
    limits: &RequestLimits,
    deadline: Instant,
) -> Result<(BytesMut, Head), Ended> {
    // One timer for the whole header, however many reads it takes; made only when the first
    // read did not bring it all, which the usual request does.
    let mut expiry = None;
    // Bytes before this were read and did not end the header.
    let mut looked = 0;
    loop {
        let look = if framing::may_end(&buf, looked) {
            framing::look_h1(&buf, limits)
        } else {
            Look::Partial
        };
        match look {
            Look::Complete(head) => return Ok((buf, head)),
            Look::Refuse(reply) => return Err(Ended::Refused(reply, buf)),
            Look::Partial if buf.len() > limits.max_header_bytes => {
                return Err(Ended::Refused(framing::HEADERS_TOO_LARGE, buf));
            }
            Look::Partial => {}
        }
        looked = buf.len();
        let expiry =
            expiry.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline.into())));
        let read = tokio::select! {
            biased;
            read = stream.read_buf(&mut buf) => read,
            () = expiry.as_mut() => return Err(Ended::Refused(framing::HEADER_TIMEOUT, buf)),
        };
        if !matches!(read, Ok(n) if n > 0) {
            return Err(Ended::Quietly);
        }
    }
}

/// Resolves when the proxy starts stopping (never, should the signal's sender be gone).
async fn stopping_down(stopping: &mut ShutdownWatch) {
    if stopping.wait_for(|&down| down).await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn error_response(reply: ErrorReply, request_id: &str, hsts: Option<&str>) -> Vec<u8> {
    let body = serde_json::json!({
        "error": reply.code,
        "message": reply.message,
        "request_id": request_id,
        // Refused before its headers are read: no trusted proxy's id to keep.
        "correlation_id": request_id,
    })
    .to_string();
    let reason = http::StatusCode::from_u16(reply.status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    let mut head = format!(
        "HTTP/1.1 {} {reason}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         cache-control: no-store\r\nconnection: close\r\nx-request-id: {request_id}\r\n\
         x-correlation-id: {request_id}\r\n",
        reply.status,
        body.len(),
    );
    if let Some(hsts) = hsts {
        head.push_str("strict-transport-security: ");
        head.push_str(hsts);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    head.push_str(&body);
    head.into_bytes()
}

/// The method and path of a refused request, as far as they can be read, for its log line.
/// The query is left out, as for every logged request.
fn request_line(header: &[u8]) -> (Option<http::Method>, String) {
    let line = header.split(|&b| b == b'\n').next().unwrap_or_default();
    let mut parts = line.split(|&b| b == b' ');
    let method = parts
        .next()
        .and_then(|m| http::Method::from_bytes(m).ok())
        .filter(|_| line.contains(&b' '));
    let path = parts
        .next()
        .map(|target| target.split(|&b| b == b'?').next().unwrap_or_default())
        .filter(|p| p.starts_with(b"/"))
        .map_or_else(
            || "-".to_owned(),
            |p| String::from_utf8_lossy(p).into_owned(),
        );
    (method, path)
}

/// The count of open client connections, in all and per client, and the wait at the
/// listeners when it is full.
pub struct Capacity {
    open: AtomicUsize,
    /// Open connections by client. Touched once when a connection opens and once when it
    /// closes, never per request.
    by_client: Arc<ClientShares>,
    freed: Notify,
    /// Bumped when the cap is reached: idle kept-alive connections then close.
    crowded: watch::Sender<u64>,
    live: Arc<ArcSwap<Live>>,
}

impl Capacity {
    pub fn new(live: Arc<ArcSwap<Live>>) -> Self {
        Self {
            open: AtomicUsize::new(0),
            by_client: Arc::default(),
            freed: Notify::new(),
            crowded: watch::Sender::new(0),
            live,
        }
    }

    fn max(&self) -> usize {
        self.live.load().limits.max_connections
    }

    /// Counts a connection from `client` as open, unless that client already has its
    /// share. The check and the count are one step under the lock, so a burst of
    /// connections from one client cannot slip past the cap together. Trusted proxies (a
    /// load balancer carrying many clients) have no share to exceed.
    fn enter(self: &Arc<Self>, client: Option<IpAddr>) -> Option<Open> {
        let live = self.live.load();
        let client = client
            .map(|ip| ip.to_canonical())
            .filter(|&ip| !live.trusted_proxies.contains(ip));
        let share = match client {
            Some(ip) => Some(
                self.by_client
                    .enter(ip, live.limits.max_connections_per_client)?,
            ),
            None => None,
        };
        self.open.fetch_add(1, Ordering::AcqRel);
        Some(Open {
            capacity: self.clone(),
            _share: share,
        })
    }
}

impl fmt::Debug for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Capacity")
            .field("open", &self.open.load(Ordering::Relaxed))
            .finish()
    }
}

/// One open connection, counted until dropped (its client's share with it).
struct Open {
    capacity: Arc<Capacity>,
    _share: Option<Share>,
}

impl Drop for Open {
    fn drop(&mut self) {
        let before = self.capacity.open.fetch_sub(1, Ordering::AcqRel);
        if before >= self.capacity.max() {
            self.capacity.freed.notify_waiters();
        }
    }
}

#[async_trait]
impl ConnectionFilter for Capacity {
    /// Called by a listener's accept loop with a connection just accepted: while this waits,
    /// the loop accepts nothing more, and the kernel queues the rest.
    async fn should_accept(&self, _addr: Option<&SocketAddr>) -> bool {
        let mut counted = false;
        loop {
            let freed = self.freed.notified();
            let mut freed = std::pin::pin!(freed);
            // Registered before the check, so a close between the two is not missed.
            freed.as_mut().enable();
            if self.open.load(Ordering::Acquire) < self.max() {
                return true;
            }
            if !counted {
                counted = true;
                self.crowded.send_modify(|times| *times += 1);
                if let Some(metrics) = &self.live.load().metrics {
                    metrics.connection_waits.inc();
                }
            }
            // Looked at again every second anyway: a reload may raise the limit.
            let _ = tokio::time::timeout(Duration::from_secs(1), freed).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_request_line_is_read_for_the_log_without_its_query() {
        let (method, path) = request_line(b"GET /a/b?token=x HTTP/1.1\r\nHost: x\r\n");
        assert_eq!(method, Some(http::Method::GET));
        assert_eq!(path, "/a/b");
        let (method, path) = request_line(b"GET");
        assert_eq!(method, None);
        assert_eq!(path, "-");
        assert_eq!(request_line(b"\x01\x02 x").1, "-");
    }

    #[test]
    fn refusals_are_json_with_a_request_id_and_close() {
        let response = error_response(framing::HEADER_TIMEOUT, "id-1", Some("max-age=60"));
        let text = String::from_utf8(response).unwrap_or_default();
        assert!(
            text.starts_with("HTTP/1.1 408 Request Timeout\r\n"),
            "{text}"
        );
        assert!(text.contains("connection: close\r\n"));
        assert!(text.contains("strict-transport-security: max-age=60\r\n"));
        let body = text.split("\r\n\r\n").nth(1).unwrap_or_default();
        let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
        assert_eq!(json["error"], "request_timeout");
        assert_eq!(json["request_id"], "id-1");
        assert_eq!(json["correlation_id"], "id-1");
        assert!(text.contains("x-correlation-id: id-1\r\n"));
        assert!(text.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
