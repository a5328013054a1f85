//! An HTTP/2 client's opening, watched: the connection preface and its first `SETTINGS` frame.
//!
//! Pingora's HTTP/2 handshake has no deadline, so a client that completes TLS with ALPN `h2`
//! and then sends nothing (or half a preface) would hold its connection for ever. The
//! connection's stream is wrapped in [`Watched`], which passes every byte through unchanged
//! and says when the opening has been read whole; [`crate::connection`] closes the connection
//! when that has not happened by the header deadline. After the opening the wrapper only
//! forwards: an open connection with no stream is closed by Pingora's idle timeout, and
//! stalled streams by the send deadline.

use std::{
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use async_trait::async_trait;
use pingora_core::protocols::{
    ALPN, GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl,
    Stream, TimingDigest, UniqueID, UniqueIDType,
    raw_connect::ProxyDigest,
    tls::{SslDigest, TlsRef},
};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::oneshot,
};

/// `PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n` (RFC 9113, 3.4).
const PREFACE_LEN: usize = 24;
/// The fixed header of every frame (RFC 9113, 4.1), whose first three bytes are its length.
const FRAME_HEADER_LEN: usize = 9;
const OPENING_HEAD: usize = PREFACE_LEN + FRAME_HEADER_LEN;

/// A client connection's stream, watched until the HTTP/2 opening has been read.
#[derive(Debug)]
pub struct Watched {
    inner: Stream,
    /// `None` once the opening is read (or the watcher is gone).
    opening: Option<Opening>,
}

#[derive(Debug)]
struct Opening {
    /// The preface and the first frame's header, as far as read.
    head: [u8; OPENING_HEAD],
    read: usize,
    done: oneshot::Sender<()>,
}

impl Opening {
    /// Takes bytes just read; true once the preface and the whole first frame are in.
    fn take(&mut self, bytes: &[u8]) -> bool {
        if let Some(room) = self.head.get_mut(self.read..) {
            let copied = bytes.len().min(room.len());
            room[..copied].copy_from_slice(&bytes[..copied]);
        }
        self.read = self.read.saturating_add(bytes.len());
        if self.read < OPENING_HEAD {
            return false;
        }
        let length = &self.head[PREFACE_LEN..PREFACE_LEN + 3];
        let length =
            usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]);
        self.read >= OPENING_HEAD + length
    }
}

impl Watched {
    /// The stream to hand to the HTTP/2 code, and what resolves once the opening is read.
    pub fn new(inner: Stream) -> (Self, oneshot::Receiver<()>) {
        let (done, opened) = oneshot::channel();
        let opening = Opening {
            head: [0; OPENING_HEAD],
            read: 0,
            done,
        };
        let watched = Self {
            inner,
            opening: Some(opening),
        };
        (watched, opened)
    }
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(opening)) = (&polled, self.opening.as_mut())
            && opening.take(&buf.filled()[before..])
            && let Some(opening) = self.opening.take()
        {
            // The watcher may have given up already; nothing to tell then.
            let _ = opening.done.send(());
        }
        polled
    }
}

impl AsyncWrite for Watched {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[async_trait]
impl Shutdown for Watched {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Watched {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Watched {
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

impl GetTimingDigest for Watched {
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

impl GetProxyDigest for Watched {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
}

impl GetSocketDigest for Watched {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
}

#[async_trait]
impl Peek for Watched {
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        self.inner.try_peek(buf).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opening() -> (Opening, oneshot::Receiver<()>) {
        let (done, opened) = oneshot::channel();
        let opening = Opening {
            head: [0; OPENING_HEAD],
            read: 0,
            done,
        };
        (opening, opened)
    }

    /// The preface, then a SETTINGS frame with one setting (6 bytes).
    fn client_opening() -> Vec<u8> {
        let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        bytes.extend_from_slice(&[0, 0, 6, 4, 0, 0, 0, 0, 0]);
        bytes.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        bytes
    }

    #[test]
    fn the_opening_is_complete_with_the_whole_first_frame_in_any_pieces() {
        let bytes = client_opening();
        for split in [1, 5, 24, 30, 33, 38] {
            let (mut opening, _opened) = opening();
            let mut done = false;
            for piece in bytes.chunks(split) {
                assert!(!done, "complete before the last byte (pieces of {split})");
                done = opening.take(piece);
            }
            assert!(done, "pieces of {split}");
        }
    }

    #[test]
    fn a_preface_alone_or_a_frame_cut_short_is_not_an_opening() {
        let bytes = client_opening();
        let (mut opening, _opened) = opening();
        assert!(!opening.take(&bytes[..PREFACE_LEN]));
        assert!(!opening.take(&bytes[PREFACE_LEN..bytes.len() - 1]));
        assert!(opening.take(&bytes[bytes.len() - 1..]));
    }
}
