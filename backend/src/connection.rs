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
//! request arrive, and the service notes when a request starts and ends, with a few relaxed
//! atomics and no wake-up. One timer per connection ([`Tracker::expired`]) looks at the phase
//! at least four times per deadline, so a connection is closed at most a quarter of the
//! shorter deadline late, and a request costs no timer.

use std::{
    io,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

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
    /// (see [`crate::http_util::read_json`]), or it is answered `408` and the connection
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
        })
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_millis())
            .unwrap_or(u64::MAX - 1)
            .saturating_add(1)
    }

    /// A request's header has been read: it is being handled.
    pub fn request_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.header_since.store(0, Ordering::Relaxed);
    }

    pub fn request_ended(&self) {
        self.idle_since.store(self.now(), Ordering::Relaxed);
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }

    /// Bytes arrived; between requests they start the next request's header deadline.
    fn bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Relaxed) == 0
            && self.header_since.load(Ordering::Relaxed) == 0
        {
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
        tracker.request_started();
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

        tracker.request_started();
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
        tracker.request_started();
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
