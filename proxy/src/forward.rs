//! The fast path to the backends: a `GET` or `HEAD` without a body, an upgrade or any other
//! hop-by-hop header is forwarded from `request_filter` over a keep-alive connection of the
//! proxy's own, and everything else takes Pingora's path.
//!
//! Pingora's path costs, per request, a pool checkout and release under several locks, a task
//! spawned to watch the idle connection, a `getpeername`, and two channels between two
//! futures whose wake-ups bounce the request between worker threads. Here the request is
//! written and the response read in the request's own task, with Pingora's HTTP/1 client
//! codec (so framing, `Keep-Alive` and `Connection: close` are Pingora's rules), and the
//! connection goes back on a stack owned by its backend.
//!
//! The backends are gatehouse's own (on Unix sockets) and named pools' plain-HTTP servers (on
//! Unix sockets or TCP). An idle connection is not watched: one a server closed (it
//! restarted, or its keep-alive ran out) fails the next write or read at once, before any
//! byte of a response reached the client, and the request then takes Pingora's path, like
//! nginx's `proxy_next_upstream error` for a request that is safe to send twice.

use std::{
    sync::Mutex,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{HeaderName, Method, Version, header};
use pingora::{
    Error, ErrorType, OrErr, Result,
    http::{RequestHeader, ResponseHeader},
    protocols::{
        Stream,
        http::{HttpTask, v1::client::HttpSession},
        l4::stream::Stream as L4Stream,
    },
};
use pingora_proxy::Session;

use tokio::net::{TcpStream, UnixStream};

use crate::{
    header_rules::HeaderEdit,
    upstream::{Dial, Member},
};

/// Request headers that send a request down Pingora's path: hop-by-hop headers other than
/// `Connection` (which is dropped here), and whatever needs a body or an upgrade handled.
static NOT_SIMPLE: [HeaderName; 11] = [
    header::CONTENT_LENGTH,
    header::TRANSFER_ENCODING,
    header::EXPECT,
    header::UPGRADE,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    HeaderName::from_static("http2-settings"),
];

/// Whether the request can take the fast path.
pub fn eligible(session: &mut Session) -> bool {
    let request = session.req_header();
    // One pass over the request's few headers, comparing names already parsed.
    matches!(request.method, Method::GET | Method::HEAD)
        && request.headers.iter().all(|(name, value)| {
            if *name == header::CONNECTION {
                only_keep_alive_or_close(value.as_bytes())
            } else {
                !NOT_SIMPLE.contains(name)
            }
        })
        && session.is_body_empty()
}

/// `Connection` names only the connection's persistence, no other header to drop.
fn only_keep_alive_or_close(value: &[u8]) -> bool {
    value.split(|b| *b == b',').all(|token| {
        let token = token.trim_ascii();
        token.eq_ignore_ascii_case(b"keep-alive") || token.eq_ignore_ascii_case(b"close")
    })
}

/// The request as the backend gets it, before the forwarding headers: HTTP/1.1 and without
/// `Connection`. Its headers are a plain `HeaderMap`, without the map of the client's
/// header-name case that Pingora keeps: cloning that map, and growing it for each header
/// added, cost more than the rest of the copy, and header names are case-insensitive to
/// every backend.
pub fn upstream_parts(session: &Session) -> http::request::Parts {
    let mut parts = session.req_header().as_owned_parts();
    parts.version = Version::HTTP_11;
    parts.headers.remove(header::CONNECTION);
    parts
}

/// `parts` as Pingora sends them, with `target` as the raw request target (a rewritten
/// one, or the client's as it came).
pub fn upstream_request(parts: http::request::Parts, target: &[u8]) -> Result<RequestHeader> {
    let mut request = RequestHeader::from(parts);
    if request.uri.path_and_query().map(|p| p.as_str().as_bytes()) != Some(target) {
        request.set_raw_path(target)?;
    }
    Ok(request)
}

/// The `Host` the backend gets when the target has an authority (HTTP/2's `:authority`,
/// HTTP/1's absolute form): it names the host, and wins over any `Host` sent (RFC 9112
/// section 3.2.2, RFC 9113 section 8.3.1), on both paths to a backend, as in routing.
pub fn authority_host(request: &RequestHeader) -> Result<Option<http::HeaderValue>> {
    let authority = match request.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => absolute_form_authority(request.raw_path()),
    };
    let Some(host) = authority else {
        return Ok(None);
    };
    if host.contains(&b'@') {
        return Error::e_explain(ErrorType::InvalidHTTPHeader, "userinfo in the authority");
    }
    http::HeaderValue::from_bytes(host)
        .or_err(ErrorType::InvalidHTTPHeader, "the target's authority")
        .map(Some)
}

/// The authority of an HTTP/1 absolute-form target (`http://host:port/path`), which
/// Pingora keeps in the raw target rather than in the URI.
pub fn absolute_form_authority(target: &[u8]) -> Option<&[u8]> {
    let scheme_end = target.windows(3).position(|w| w == b"://")?;
    let scheme = &target[..scheme_end];
    if !(scheme.eq_ignore_ascii_case(b"http") || scheme.eq_ignore_ascii_case(b"https")) {
        return None;
    }
    let rest = &target[scheme_end + 3..];
    let end = rest
        .iter()
        .position(|b| matches!(b, b'/' | b'?' | b'#'))
        .unwrap_or(rest.len());
    Some(&rest[..end]).filter(|authority| !authority.is_empty())
}

/// Idle connections kept per backend: enough for the requests in flight at a busy moment on a
/// small machine; a burst past it makes new connections, as a pool without idle ones would.
const MAX_IDLE: usize = 64;

/// A backend's idle keep-alive connections, newest last: the newest is the likeliest to be
/// alive and warm in the caches.
#[derive(Default)]
pub struct IdleConnections(Mutex<Vec<(Stream, Instant)>>);

impl IdleConnections {
    /// The newest connection idle for less than `timeout` that is still quiet; older ones,
    /// and ones the server closed or wrote on, are closed.
    fn take(&self, timeout: Duration) -> Option<Stream> {
        let mut idle = self.0.lock().ok()?;
        while let Some((mut stream, since)) = idle.pop() {
            if since.elapsed() >= timeout {
                // Every one below is older still.
                idle.clear();
                return None;
            }
            if quiet(&mut stream) {
                return Some(stream);
            }
        }
        None
    }

    /// Keeps `stream` for the next request. Connections idle past `timeout` at the bottom
    /// of the stack are closed here, and at most [`MAX_IDLE`] are kept: after a burst, light
    /// traffic only ever reuses the top, and the rest would otherwise stay open (and count
    /// against the backend's connection limit) for as long as traffic continues.
    fn put(&self, stream: Stream, timeout: Duration) {
        if let Ok(mut idle) = self.0.lock() {
            let now = Instant::now();
            let expired = idle
                .iter()
                .take_while(|(_, since)| now.duration_since(*since) >= timeout)
                .count();
            let over = (idle.len() - expired + 1).saturating_sub(MAX_IDLE);
            idle.drain(..expired + over);
            idle.push((stream, now));
        }
    }

    /// Closes the connections idle for `timeout` or longer: a server that gets no more
    /// requests (taken out by health checks, no longer picked by a hash) would otherwise keep
    /// its idle ones open on both sides until it does.
    pub fn expire(&self, timeout: Duration) {
        if let Ok(mut idle) = self.0.lock() {
            let expired = idle
                .iter()
                .take_while(|(_, since)| since.elapsed() >= timeout)
                .count();
            idle.drain(..expired);
        }
    }

    /// After a connection turned out dead: its backend has likely closed the others too.
    fn clear(&self) {
        if let Ok(mut idle) = self.0.lock() {
            idle.clear();
        }
    }
}

/// Whether an idle connection has nothing to read: not closed by the server (a keep-alive
/// that ran out), and no bytes it sent unasked (a `408` before closing, a stray body), which
/// the next request would take for its answer. A read polled without waiting: while the
/// socket has had no event since its last read came up empty, no syscall is made.
fn quiet(stream: &mut Stream) -> bool {
    use std::task::{Context, Poll, Waker};
    use tokio::io::{AsyncRead, ReadBuf};
    let mut byte = [0u8; 1];
    let mut buf = ReadBuf::new(&mut byte);
    let mut cx = Context::from_waker(Waker::noop());
    matches!(
        std::pin::Pin::new(stream).poll_read(&mut cx, &mut buf),
        Poll::Pending
    )
}

/// Deadlines of a backend exchange.
#[derive(Clone, Copy)]
pub struct Deadlines {
    pub connect: Duration,
    /// For each read of the response, and each write of the request.
    pub read: Duration,
}

/// A connection to a backend, with the request sent and the response header read.
pub struct Exchange {
    client: HttpSession,
    /// The response's status and headers, as a plain map for the filters to edit: without the
    /// map of the backend's header-name case that Pingora keeps, as the request is sent.
    pub response: http::response::Parts,
    /// Body read ahead (by [`Exchange::read_whole`]), sent before the rest.
    read: Vec<Bytes>,
}

/// Why no response header came back.
pub enum Failed {
    /// A reused connection failed before any byte of a response: it was closed while idle.
    /// Nothing is known about the backend.
    Stale(Box<Error>),
    /// A new connection could not be made.
    Connect(Box<Error>),
    /// The backend took the request and failed to answer.
    Backend(Box<Error>),
}

/// Sends `request` to `member` and reads the response header.
pub async fn send(
    member: &Member,
    request: RequestHeader,
    deadlines: Deadlines,
) -> Result<Exchange, Failed> {
    let (stream, reused) = match member.idle.take(member.idle_timeout) {
        Some(stream) => (stream, true),
        None => (
            connect(member, deadlines.connect)
                .await
                .map_err(Failed::Connect)?,
            false,
        ),
    };
    let mut client = HttpSession::new(stream);
    client.read_timeout = Some(deadlines.read);
    client.write_timeout = Some(deadlines.read);
    let outcome = async {
        client.write_request_header(Box::new(request)).await?;
        // Informational responses (`103 Early Hints`) are not passed on.
        loop {
            client.read_response().await?;
            if client.get_status().is_some_and(|s| !s.is_informational()) {
                break;
            }
        }
        Ok::<_, Box<Error>>(())
    }
    .await;
    match outcome {
        Ok(()) => {
            let response = match client.resp_header() {
                Some(header) => header.as_owned_parts(),
                None => return Err(Failed::Backend(Error::new(ErrorType::InvalidHTTPHeader))),
            };
            Ok(Exchange {
                client,
                response,
                read: Vec::new(),
            })
        }
        Err(e) if reused && closed_while_idle(&e) => {
            member.idle.clear();
            Err(Failed::Stale(e))
        }
        Err(e) => Err(Failed::Backend(e)),
    }
}

async fn connect(member: &Member, deadline: Duration) -> Result<Stream> {
    let connect = async {
        match &member.dial {
            Some(Dial::Unix(path)) => Ok(L4Stream::from(UnixStream::connect(path).await?)),
            Some(Dial::Tcp(addr)) => {
                let stream = TcpStream::connect(addr).await?;
                // A request goes out in one write and waits for its answer: no Nagle delay
                // (an optimisation: a socket that refuses it still works).
                let _ = stream.set_nodelay(true);
                Ok(L4Stream::from(stream))
            }
            None => Err(std::io::Error::other("a server behind TLS")),
        }
    };
    match tokio::time::timeout(deadline, connect).await {
        Ok(Ok(stream)) => Ok(Box::new(stream)),
        Ok(Err(e)) => Error::e_because(ErrorType::ConnectError, "connecting to the backend", e),
        Err(_) => Error::e_explain(ErrorType::ConnectTimedout, "connecting to the backend"),
    }
}

/// How a connection the backend closed while it was idle fails the next exchange: the write
/// or the first read breaks. A backend that answers garbage or too slowly is to blame, and
/// is not let off as a stale connection would be.
fn closed_while_idle(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ConnectionClosed | ErrorType::ReadError | ErrorType::WriteError
    )
}

pub fn is_timeout(e: &Error) -> bool {
    matches!(
        e.etype(),
        ErrorType::ReadTimedout | ErrorType::WriteTimedout | ErrorType::ConnectTimedout
    )
}

impl Exchange {
    /// A response that ends when the backend closes the connection (HTTP/1.0 style, no
    /// length) goes to an HTTP/1.1 client chunked, as on Pingora's path, so that the client's
    /// connection outlives it. An HTTP/1.0 client cannot read chunks: it gets the body up to
    /// the close. (HTTP/2 frames every body itself.)
    pub fn chunk_if_close_delimited(&mut self, request: &RequestHeader) -> Result<()> {
        let head = request.method == Method::HEAD;
        let old_client = matches!(request.version, Version::HTTP_09 | Version::HTTP_10);
        let headers = &self.response.headers;
        let close_delimited = !head
            && !old_client
            && !matches!(self.response.status.as_u16(), 204 | 304)
            && !self.client.is_body_done()
            && headers.get(header::TRANSFER_ENCODING).is_none()
            && headers.get(header::CONTENT_LENGTH).is_none();
        if close_delimited {
            self.response.version = Version::HTTP_11;
            let chunked = http::HeaderValue::from_static("chunked");
            self.response
                .headers
                .put(&header::TRANSFER_ENCODING, chunked)?;
        }
        Ok(())
    }

    /// Reads the body ahead, up to `limit` bytes: the whole body if it ends within them, or
    /// `None` (what was read is relayed first). Errors are the backend's
    /// (`ErrorSource::Upstream`).
    pub async fn read_whole(&mut self, limit: u64) -> Result<Option<Bytes>> {
        let mut len = 0u64;
        while !self.client.is_body_done() {
            let Some(chunk) = self
                .client
                .read_body_bytes()
                .await
                .map_err(|e| e.into_up())?
            else {
                break;
            };
            len += chunk.len() as u64;
            self.read.push(chunk);
            if len > limit {
                return Ok(None);
            }
        }
        Ok(Some(joined(&self.read)))
    }

    /// Whether the whole body has been read (or there is none).
    pub fn body_done(&mut self) -> bool {
        self.client.is_body_done()
    }

    /// After [`Exchange::read_whole`] read the whole body: gives the connection back to
    /// `member` if the backend kept it open.
    pub async fn release(mut self, member: &Member) {
        self.client.respect_keepalive();
        if let Some(stream) = self.client.reuse().await {
            member.idle.put(stream, member.idle_timeout);
        }
    }

    /// Sends the response header (as the filters left it) and the body to the client,
    /// then gives the connection back to `member` if both sides kept it whole. An error from
    /// the backend's side carries `ErrorSource::Upstream`, from the client's `Downstream`.
    pub async fn relay(self, session: &mut Session, member: &Member) -> Result<()> {
        self.relay_keeping(session, member, None).await.map(drop)
    }

    /// [`Exchange::relay`], keeping a copy of the body as it goes when `keep` is its most:
    /// `Some(body)` if the whole body was within it.
    pub async fn relay_keeping(
        mut self,
        session: &mut Session,
        member: &Member,
        keep: Option<u64>,
    ) -> Result<Option<Bytes>> {
        let mut copied: u64 = self.read.iter().map(|c| c.len() as u64).sum();
        let mut copy = keep
            .filter(|most| copied <= *most)
            .map(|_| self.read.clone());
        let mut done = self.client.is_body_done();
        let mut tasks = Vec::with_capacity(2 + self.read.len());
        let header = Box::new(ResponseHeader::from(self.response));
        tasks.push(HttpTask::Header(header, done && self.read.is_empty()));
        let read_ahead = self.read.len();
        for (i, chunk) in self.read.drain(..).enumerate() {
            tasks.push(HttpTask::Body(Some(chunk), done && i + 1 == read_ahead));
        }
        // Most responses are whole in the first read: header and body go out in one write.
        while !done {
            let body: Option<Bytes> = self
                .client
                .read_body_bytes()
                .await
                .map_err(|e| e.into_up())?;
            done = self.client.is_body_done() || body.is_none();
            if let (Some(kept), Some(chunk)) = (copy.as_mut(), body.as_ref()) {
                copied += chunk.len() as u64;
                if keep.is_some_and(|most| copied > most) {
                    // Past the size worth keeping: the rest is only relayed.
                    copy = None;
                } else {
                    kept.push(chunk.clone());
                }
            }
            tasks.push(HttpTask::Body(body, done));
            session
                .write_response_tasks(std::mem::take(&mut tasks))
                .await
                .map_err(|e| e.into_down())?;
        }
        if !tasks.is_empty() {
            session
                .write_response_tasks(tasks)
                .await
                .map_err(|e| e.into_down())?;
        }
        self.client.respect_keepalive();
        if let Some(stream) = self.client.reuse().await {
            member.idle.put(stream, member.idle_timeout);
        }
        Ok(copy.map(|chunks| joined(&chunks)))
    }
}

fn joined(chunks: &[Bytes]) -> Bytes {
    match chunks {
        [] => Bytes::new(),
        [one] => one.clone(),
        many => Bytes::from(many.concat()),
    }
}

/// How often connections idle past their deadline are closed.
pub const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// The background service that closes idle connections past their deadline, in the
/// built-in pool and in every named pool of the running configuration.
pub struct IdleSweep {
    pub backends: std::sync::Arc<crate::upstream::Pool>,
    pub live: std::sync::Arc<arc_swap::ArcSwap<crate::live::Live>>,
}

#[async_trait::async_trait]
impl pingora::services::background::BackgroundService for IdleSweep {
    async fn start(&self, mut shutdown: pingora::server::ShutdownWatch) {
        let mut every = tokio::time::interval(SWEEP_EVERY);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = every.tick() => {
                    self.backends.close_idle();
                    for pool in self.live.load().pools.each() {
                        pool.close_idle();
                    }
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
