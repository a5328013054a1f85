//! Deadlines on a backend's own connections, like nginx's `client_header_timeout` and
//! `keepalive_timeout`:
//!
//! - header: a connection's first request, and any request whose first byte has arrived,
//!   must have its whole header within the deadline, or the connection is cut.
//! - idle: a connection with no request in flight and no bytes of a new one for the idle
//!   deadline is closed.
//!
//! hyper's own `header_read_timeout` is not used: it also runs while a kept-alive connection
//! waits for its next request, so it would close the proxy's idle pooled connections at the
//! header deadline, and a request the proxy sends on one at that moment would fail.
//!
//! [`Tracker`] sees both sides: [`Watched`] wraps the socket and notes when bytes of a new
//! request arrive, [`RequestBody`] notes when a request's body has been read, and the service
//! notes when a request starts and ends, with a few relaxed atomics and no wake-up.
//!
//! Bytes of the next request may arrive while one is being handled (hyper reads once its body
//! is done, to notice a client that closes): if any did, the next header's deadline starts
//! when the request ends, not the idle one. Bytes read with the end of a body cannot be told
//! from the body's, so a next header begun in the same read still gets the idle deadline; the
//! proxy, the backend's one client, never sends a request before the last one's answer. One timer per connection ([`Tracker::expired`]) looks at the phase
//! at least four times per deadline, so a connection is closed at most a quarter of the
//! shorter deadline late, and a request costs no timer.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Instant,
};

use crate::metrics::ConnectionLimit;

/// The limits, from `[backend]` in the config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub header_timeout: Duration,
    /// A request body must arrive whole within this of the handler starting to read it
    /// (see [`crate::handlers::read_json`]), or it is answered `408` and the connection
    /// closed.
    pub body_timeout: Duration,
    pub idle_timeout: Duration,
    /// Connections one backend holds at once; more wait in the listen queue.
    pub max_connections: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_connections: 1024,
        }
    }
}

/// What one connection is doing. Times are milliseconds since the connection's start, plus
/// one, so that 0 means "not set".
pub struct Tracker {
    start: Instant,
    limits: ConnectionLimits,
    in_flight: AtomicUsize,
    /// When the first byte of the header being waited for arrived (or the connection
    /// started, for its first request); 0: none is being waited for.
    header_since: AtomicU64,
    /// When the last request ended.
    idle_since: AtomicU64,
    /// The request being handled has a body not yet read to its end: bytes arriving are its.
    body_open: AtomicBool,
    /// Bytes arrived while a request was handled, after its body: the next request's.
    arrived_during: AtomicBool,
}

impl Tracker {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(Self {
            start: Instant::now(),
            limits,
            in_flight: AtomicUsize::new(0),
            // The first request's header is due from the start, like nginx.
            header_since: AtomicU64::new(1),
            idle_since: AtomicU64::new(1),
            body_open: AtomicBool::new(false),
            arrived_during: AtomicBool::new(false),
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// A request's header has been read: it is being handled. `body`: it has a body still to
    /// be read.
    pub fn request_started(&self, body: bool) {
        self.body_open.store(body, Ordering::Relaxed);
        self.arrived_during.store(false, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.header_since.store(0, Ordering::Relaxed);
    }

    /// The request's body has been read to its end.
    fn body_ended(&self) {
        self.body_open.store(false, Ordering::Relaxed);
    }

    /// The request has been answered: the connection is idle, or, if bytes of the next
    /// request came meanwhile, waiting for the rest of its header.
    pub fn request_ended(&self) {
        let now = self.now();
        self.idle_since.store(now, Ordering::Relaxed);
        if self.arrived_during.swap(false, Ordering::Relaxed) {
            self.header_since.store(now, Ordering::Relaxed);
        }
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes arrived; between requests they start the next request's header deadline, during
    /// one (after its body) they start it when the request ends.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            if !self.body_open.load(Ordering::Relaxed) {
                self.arrived_during.store(true, Ordering::Relaxed);
            }
        } else if self.header_since.load(Ordering::Relaxed) == 0 {
            self.header_since.store(self.now(), Ordering::Relaxed);
        }
    }

    /// Resolves when the connection has passed a deadline, naming it. A request in flight
    /// has none here (the handlers bound their own work, and the proxy its wait).
    pub async fn expired(&self) -> ConnectionLimit {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX / 2);
        let (header, idle) = (ms(self.limits.header_timeout), ms(self.limits.idle_timeout));
        // The phase changes without waking this timer (a wake-up per request would cost more
        // than the request's own bookkeeping), so it never sleeps longer than this.
        let tick = (header.min(idle) / 4).max(1);
        loop {
            let now = self.now();
            let (deadline, limit) = if self.in_flight.load(Ordering::Relaxed) > 0 {
                (now + idle, None)
            } else {
                match self.header_since.load(Ordering::Relaxed) {
                    0 => (
                        self.idle_since.load(Ordering::Relaxed) + idle,
                        Some(ConnectionLimit::IdleTimeout),
                    ),
                    since => (since + header, Some(ConnectionLimit::HeaderTimeout)),
                }
            };
            match limit {
                Some(limit) if now >= deadline => return limit,
                _ => {
                    let wait = deadline.saturating_sub(now).min(tick);
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
            }
        }
    }
}

/// A request's body that tells its connection's [`Tracker`] when it has been read to its end.
pub struct RequestBody {
    inner: Incoming,
    tracker: Arc<Tracker>,
}

impl RequestBody {
    /// Notes the request's start with `tracker`, and wraps its body.
    pub fn watch(request: http::Request<Incoming>, tracker: &Arc<Tracker>) -> http::Request<Self> {
        tracker.request_started(!request.body().is_end_stream());
        let tracker = tracker.clone();
        request.map(|inner| RequestBody { inner, tracker })
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None | Some(Err(_))) => this.tracker.body_ended(),
            Poll::Ready(Some(Ok(_))) if this.inner.is_end_stream() => this.tracker.body_ended(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A socket that tells its [`Tracker`] when bytes arrive.
pub struct Watched<T> {
    inner: T,
    tracker: Arc<Tracker>,
}

impl<T> Watched<T> {
    pub fn new(inner: T, tracker: Arc<Tracker>) -> Self {
        Self { inner, tracker }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(polled, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.tracker.bytes_arrived();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ConnectionLimits {
        ConnectionLimits {
            header_timeout: Duration::from_secs(2),
            body_timeout: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_connections: 1,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_first_header_is_due_from_the_start() {
        let tracker = Tracker::new(limits());
        let started = Instant::now();
        assert!(matches!(
            tracker.expired().await,
            ConnectionLimit::HeaderTimeout
        ));
        assert_eq!(started.elapsed(), Duration::from_secs(2));
    }

    #[tokio::test(start_paused = true)]
    async fn between_requests_the_idle_deadline_runs_until_bytes_arrive() {
        let tracker = Tracker::new(limits());
        tracker.request_started(false);
        // A request in flight has no deadline here, however long it takes.
        tokio::time::advance(Duration::from_secs(30)).await;
        tracker.request_ended();
        let watchdog = {
            let tracker = tracker.clone();
            tokio::spawn(async move { tracker.expired().await })
        };
        tokio::time::advance(Duration::from_secs(9)).await;
        assert!(!watchdog.is_finished());
        let arrived = Instant::now();
        // The next request's first bytes: its header is due within the header deadline.
        tracker.bytes_arrived();
        let limit = watchdog.await.unwrap();
        assert!(matches!(limit, ConnectionLimit::HeaderTimeout));
        // Within a quarter of the header deadline (0.5 s) of it.
        let late = arrived.elapsed() - Duration::from_secs(2);
        assert!(late <= Duration::from_millis(500), "{late:?}");

        tracker.request_started(false);
        tracker.request_ended();
        let ended = Instant::now();
        assert!(matches!(
            tracker.expired().await,
            ConnectionLimit::IdleTimeout
        ));
        let late = ended.elapsed() - Duration::from_secs(10);
        assert!(late <= Duration::from_millis(500), "{late:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_header_begun_during_a_request_is_due_from_its_end() {
        let tracker = Tracker::new(limits());
        // A request with a body: bytes while the body is being read are the body's.
        tracker.request_started(true);
        tracker.bytes_arrived();
        tracker.body_ended();
        tracker.request_ended();
        let watchdog = {
            let tracker = tracker.clone();
            tokio::spawn(async move { tracker.expired().await })
        };
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(
            !watchdog.is_finished(),
            "body bytes started a header deadline"
        );
        watchdog.abort();

        // After the body, bytes are the next request's: its header is due within the header
        // deadline of this request's end, not the idle one.
        tracker.request_started(true);
        tracker.body_ended();
        tracker.bytes_arrived();
        tokio::time::advance(Duration::from_secs(30)).await;
        tracker.request_ended();
        let ended = Instant::now();
        assert!(matches!(
            tracker.expired().await,
            ConnectionLimit::HeaderTimeout
        ));
        let late = ended.elapsed() - Duration::from_secs(2);
        assert!(late <= Duration::from_millis(500), "{late:?}");

        // The next request, whole, clears it: the one after is idle again.
        tracker.request_started(false);
        tracker.request_ended();
        assert!(matches!(
            tracker.expired().await,
            ConnectionLimit::IdleTimeout
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_phase_change_is_seen_without_waiting_for_the_old_deadline() {
        // A long header deadline, a short idle one: the timer, already asleep on the first
        // header's deadline, must still close the connection soon after its request ends.
        let tracker = Tracker::new(ConnectionLimits {
            header_timeout: Duration::from_secs(20),
            body_timeout: Duration::from_secs(20),
            idle_timeout: Duration::from_secs(2),
            max_connections: 1,
        });
        let watchdog = {
            let tracker = tracker.clone();
            tokio::spawn(async move { tracker.expired().await })
        };
        tokio::task::yield_now().await;
        tracker.request_started(false);
        tracker.request_ended();
        let ended = Instant::now();
        assert!(matches!(
            watchdog.await.unwrap(),
            ConnectionLimit::IdleTimeout
        ));
        let late = ended.elapsed() - Duration::from_secs(2);
        assert!(late <= Duration::from_millis(500), "{late:?}");
    }
}
