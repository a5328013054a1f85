//! A client connection's stream, as the HTTP code sees it.
//!
//! - **Every write is bounded by the send deadline** (`limits.send_timeout`, nginx's
//!   `send_timeout`): a write, flush or shutdown that cannot make progress for that long fails
//!   with `TimedOut`, and the connection closes. Pingora's own write timeout covers only body
//!   writes, not a response header, the final flush or TLS's `close_notify`; with a 32 KiB write
//!   buffer most responses end in that untimed flush, where a client that stops reading would
//!   hold its connection (and a backend slot) for as long as its kernel keeps the window shut.
//!   Under HTTP/2 this also covers the connection's own socket writes.
//! - **An HTTP/2 client's opening is watched**: Pingora's HTTP/2 handshake has no deadline, so
//!   [`Opening`] tells [`crate::connection`] when the first `HEADERS` frame has arrived (or that
//!   the preface was wrong, or the client left), and a connection still without one at the
//!   header deadline is closed, as an HTTP/1 connection without a request header is. A bad
//!   opening is cut here, so it is counted rather than logged by Pingora's handshake.
//! - **An HTTP/1 request is read up to its end, no further** ([`ClientStream::fence`]): bytes
//!   past it (a pipelined next request) are held back from Pingora, which would take them
//!   for data sent after the request and close the connection, and are handed to
//!   [`crate::connection`] for the next header read instead.

use std::{
    future::Future,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use bytes::BytesMut;
use pingora_core::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
    raw_connect::ProxyDigest,
    tls::{SslDigest, TlsRef},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
    time::Sleep,
};

use crate::metrics::{Cut, Metrics};

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The fixed header of every frame (RFC 9113, 4.1): length (3 bytes), type, flags, stream.
const FRAME_HEADER_LEN: usize = 9;
const HEADERS_FRAME: u8 = 0x1;

/// How an HTTP/2 client's opening ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Opened {
    /// The preface, and a `HEADERS` frame: a request has begun.
    Request,
    /// Not the preface, or the client closed the connection first.
    Bad,
}

/// A client connection's stream with its send deadline, and its HTTP/2 opening watched when
/// [`ClientStream::watch_h2`] was called.
pub struct ClientStream {
    inner: Stream,
    send_timeout: Duration,
    /// Running while a write waits; reset when one makes progress.
    stalled: Option<Pin<Box<Sleep>>>,
    metrics: Option<Arc<Metrics>>,
    /// `None` once the opening is over (or it is not watched).
    opening: Option<Opening>,
    /// Bytes of the current HTTP/1 request still to come, when its end is known: reads stop
    /// there. `None` while a header is being read, and under HTTP/2.
    fence: Option<u64>,
    /// Bytes read past the fence: the start of the next request.
    held: BytesMut,
}

/// Where an HTTP/2 client's opening stands.
#[derive(Debug)]
struct Opening {
    /// Bytes read so far.
    read: usize,
    /// Where the frame whose header is being read starts.
    frame: usize,
    header: [u8; FRAME_HEADER_LEN],
    told: oneshot::Sender<Opened>,
}

impl Opening {
    /// Takes bytes just read; what the opening amounts to once it is decided.
    fn take(&mut self, bytes: &[u8]) -> Option<Opened> {
        for &byte in bytes {
            let at = self.read;
            self.read += 1;
            if let Some(&expected) = PREFACE.get(at) {
                if byte != expected {
                    return Some(Opened::Bad);
                }
                continue;
            }
            // In a frame's payload, which is skipped.
            let Some(slot) = at
                .checked_sub(self.frame)
                .and_then(|i| self.header.get_mut(i))
            else {
                continue;
            };
            *slot = byte;
            if at - self.frame + 1 < FRAME_HEADER_LEN {
                continue;
            }
            if self.header[3] == HEADERS_FRAME {
                return Some(Opened::Request);
            }
            let [a, b, c, ..] = self.header;
            let length = usize::from(a) << 16 | usize::from(b) << 8 | usize::from(c);
            self.frame += FRAME_HEADER_LEN + length;
        }
        None
    }
}

impl std::fmt::Debug for ClientStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStream")
            .field("inner", &self.inner)
            .field("send_timeout", &self.send_timeout)
            .finish()
    }
}

impl ClientStream {
    pub fn new(inner: Stream, send_timeout: Duration, metrics: Option<Arc<Metrics>>) -> Self {
        Self {
            inner,
            send_timeout,
            stalled: None,
            metrics,
            opening: None,
            fence: None,
            held: BytesMut::new(),
        }
    }

    /// From here on, reads end `left` bytes on (at the end of the request Pingora is given);
    /// `held`, bytes already read past that, waits for the next request.
    pub fn fence(&mut self, left: u64, held: BytesMut) {
        self.fence = Some(left);
        self.held = held;
    }

    /// Lifts the fence, for the next header read; the bytes held past it, which that read
    /// starts from.
    pub fn unfence(&mut self) -> BytesMut {
        self.fence = None;
        std::mem::take(&mut self.held)
    }

    /// A read that stops at the fence. Once the request is all read, the next read (Pingora
    /// watching for the client leaving) still sees the client close, but bytes that arrive
    /// instead are held, and the read then waits for good: the next request is read after
    /// this one's response.
    fn poll_fenced(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
        left: u64,
    ) -> Poll<std::io::Result<()>> {
        if left == 0 && !self.held.is_empty() {
            return Poll::Pending;
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !matches!(polled, Poll::Ready(Ok(()))) {
            return polled;
        }
        let read = buf.filled().len() - before;
        let Some(over) = (read as u64).checked_sub(left).filter(|&over| over > 0) else {
            self.fence = Some(left - read as u64);
            return polled;
        };
        let end = buf.filled().len() - over as usize;
        self.held.extend_from_slice(&buf.filled()[end..]);
        buf.set_filled(end);
        self.fence = Some(0);
        if left == 0 {
            return Poll::Pending;
        }
        polled
    }

    /// Watches the HTTP/2 opening from here on; the receiver learns how it ends.
    pub fn watch_h2(&mut self) -> oneshot::Receiver<Opened> {
        let (told, opened) = oneshot::channel();
        self.opening = Some(Opening {
            read: 0,
            frame: PREFACE.len(),
            header: [0; FRAME_HEADER_LEN],
            told,
        });
        opened
    }

    /// What a write returned, held to the send deadline: `Pending` starts (or keeps) the
    /// clock, anything else stops it.
    fn deadline<T>(
        &mut self,
        cx: &mut Context<'_>,
        polled: Poll<std::io::Result<T>>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let timeout = self.send_timeout;
        let stalled = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        if stalled.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        if let Some(metrics) = &self.metrics {
            metrics.cut(Cut::SendTimeout);
        }
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client took no data for the send deadline",
        )))
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if let Some(left) = self.fence {
            return self.poll_fenced(cx, buf, left);
        }
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let Some(opening) = self.opening.as_mut() else {
            return polled;
        };
        let read = &buf.filled()[before..];
        let decided = match &polled {
            Poll::Ready(Ok(())) if read.is_empty() => Some(Opened::Bad),
            Poll::Ready(Ok(())) => opening.take(read),
            Poll::Ready(Err(_)) => Some(Opened::Bad),
            Poll::Pending => None,
        };
        let Some(decided) = decided else {
            return polled;
        };
        let bad = decided == Opened::Bad;
        if let Some(opening) = self.opening.take() {
            // The watcher may have given up already; nothing to tell then.
            let _ = opening.told.send(decided);
        }
        if bad {
            // Held back from the HTTP/2 code, which would log a failed handshake for each;
            // the watcher closes the connection and counts it.
            buf.set_filled(before);
            return Poll::Pending;
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.deadline(cx, polled)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_flush(cx);
        self.deadline(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let polled = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.deadline(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.deadline(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for ClientStream {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for ClientStream {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for ClientStream {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }

    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for ClientStream {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }

    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }

    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for ClientStream {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for ClientStream {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for ClientStream {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh() -> (Opening, oneshot::Receiver<Opened>) {
        let (told, opened) = oneshot::channel();
        let opening = Opening {
            read: 0,
            frame: PREFACE.len(),
            header: [0; FRAME_HEADER_LEN],
            told,
        };
        (opening, opened)
    }

    /// The preface, a SETTINGS frame with one setting, a WINDOW_UPDATE, then HEADERS.
    fn client_opening() -> Vec<u8> {
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0, 0, 3, 0, 0, 0, 100]);
        bytes.extend_from_slice(&[0, 0, 4, 8, 0, 0, 0, 0, 0, 0, 1, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 3, 1, 4, 0, 0, 0, 1]);
        bytes
    }

    #[test]
    fn the_opening_is_a_request_at_the_first_headers_frame_in_any_pieces() {
        let bytes = client_opening();
        for split in [1, 5, 24, 30, 33, 38, 1000] {
            let (mut opening, _opened) = fresh();
            let mut decided = None;
            for piece in bytes.chunks(split) {
                assert_eq!(decided, None, "decided early (pieces of {split})");
                decided = opening.take(piece);
            }
            assert_eq!(decided, Some(Opened::Request), "pieces of {split}");
        }
    }

    #[test]
    fn settings_alone_is_no_request_and_a_wrong_preface_is_bad() {
        let bytes = client_opening();
        let (mut opening, _opened) = fresh();
        assert_eq!(opening.take(&bytes[..bytes.len() - 9]), None);
        let (mut opening, _opened) = fresh();
        assert_eq!(opening.take(b"GET / HTTP/1.1\r\n"), Some(Opened::Bad));
        let (mut opening, _opened) = fresh();
        assert_eq!(opening.take(&PREFACE[..10]), None);
        assert_eq!(opening.take(b"x"), Some(Opened::Bad));
    }

    fn fenced_pair() -> (ClientStream, tokio::io::DuplexStream) {
        let (ours, client) = tokio::io::duplex(1 << 16);
        let stream = ClientStream::new(Box::new(ours), Duration::from_secs(1), None);
        (stream, client)
    }

    /// A read that does not finish within a moment: it waits for good, or for more bytes.
    async fn waits(stream: &mut ClientStream) -> bool {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        tokio::time::timeout(Duration::from_millis(50), stream.read(&mut buf))
            .await
            .is_err()
    }

    #[tokio::test]
    async fn reads_stop_at_the_fence_and_hold_the_next_request_back() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, mut client) = fenced_pair();
        stream.fence(3, BytesMut::new());
        client.write_all(b"lo!GET /next").await.ok();
        // The body's last 3 bytes are read, the next request is not.
        let mut buf = [0u8; 64];
        let n = stream.read(&mut buf).await.unwrap_or(0);
        assert_eq!(&buf[..n], b"lo!");
        assert!(waits(&mut stream).await);
        assert!(waits(&mut stream).await, "read again past the fence");
        assert_eq!(&stream.unfence()[..], b"GET /next");
        // Unfenced, reads go through again.
        client.write_all(b"x").await.ok();
        let n = stream.read(&mut buf).await.unwrap_or(0);
        assert_eq!(&buf[..n], b"x");
    }

    #[tokio::test]
    async fn at_the_fence_a_close_still_shows_and_later_bytes_are_held() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut stream, mut client) = fenced_pair();
        stream.fence(0, BytesMut::new());
        assert!(waits(&mut stream).await, "nothing sent yet");
        client.write_all(b"GET / HTTP/1.1\r\n").await.ok();
        assert!(waits(&mut stream).await, "the next request went through");
        assert_eq!(&stream.unfence()[..], b"GET / HTTP/1.1\r\n");

        stream.fence(0, BytesMut::new());
        drop(client);
        let mut buf = [0u8; 64];
        assert!(matches!(stream.read(&mut buf).await, Ok(0)));
    }

    #[test]
    fn a_huge_frame_length_is_skipped_without_overflow() {
        let (mut opening, _opened) = fresh();
        let mut bytes = PREFACE.to_vec();
        bytes.extend_from_slice(&[0xff, 0xff, 0xff, 0, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 1]);
        assert_eq!(opening.take(&bytes), None);
    }
}
