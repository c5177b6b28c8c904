//! Protocol detection from a connection's first bytes, and an IO wrapper that
//! replays the bytes read while detecting.

use bytes::{Buf, BytesMut};
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// How long the first bytes may take before a connection counts as not HTTP.
pub const SNIFF_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    /// HTTP/2 with prior knowledge (h2c): the connection preface.
    Http2,
    /// Anything else, or nothing sent before the timeout (server-first protocols).
    Opaque,
}

pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Methods accepted as the start of an HTTP/1.x request line.
const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// Classifies `buf`, or `None` if more bytes are needed.
pub fn classify(buf: &[u8]) -> Option<Protocol> {
    if buf.is_empty() {
        return None;
    }
    let n = buf.len().min(H2_PREFACE.len());
    if buf[..n] == H2_PREFACE[..n] {
        return (n == H2_PREFACE.len()).then_some(Protocol::Http2);
    }
    match buf.iter().position(|b| *b == b' ') {
        Some(sp) => Some(if METHODS.contains(&&buf[..sp]) {
            Protocol::Http1
        } else {
            Protocol::Opaque
        }),
        None if buf.len() > 8 || !buf.iter().all(u8::is_ascii_uppercase) => Some(Protocol::Opaque),
        None => None,
    }
}

/// Reads until the protocol is known (or EOF / timeout: opaque). Returns it and
/// the bytes read.
pub async fn sniff<S: AsyncRead + Unpin>(
    io: &mut S,
    timeout: std::time::Duration,
) -> std::io::Result<(Protocol, BytesMut)> {
    let mut buf = BytesMut::with_capacity(64);
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(p) = classify(&buf) {
            return Ok((p, buf));
        }
        match tokio::time::timeout_at(deadline, io.read_buf(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => return Ok((Protocol::Opaque, buf)),
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return Err(e),
        }
    }
}

/// `inner` with `prefix` replayed before its own bytes.
pub struct Rewind<S> {
    prefix: BytesMut,
    inner: S,
}

impl<S> Rewind<S> {
    pub fn new(prefix: BytesMut, inner: S) -> Self {
        Self { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Rewind<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Rewind<S> {
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_first_bytes() {
        assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(b"DELETE /x"), Some(Protocol::Http1));
        assert_eq!(classify(b"GE"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Opaque));
        assert_eq!(classify(b"\x16\x03\x01\x02"), Some(Protocol::Opaque));
        assert_eq!(classify(b"SSH-2.0-OpenSSH"), Some(Protocol::Opaque));
        assert_eq!(classify(b"FOO /x"), Some(Protocol::Opaque));
        assert_eq!(classify(b"ABCDEFGHIJ"), Some(Protocol::Opaque));
    }

    #[tokio::test]
    async fn sniff_replays_what_it_read() {
        let (mut a, b) = tokio::io::duplex(64);
        tokio::io::AsyncWriteExt::write_all(&mut a, b"GET /x HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        drop(a);
        let mut b = b;
        let (p, prefix) = sniff(&mut b, std::time::Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(p, Protocol::Http1);
        let mut all = Vec::new();
        Rewind::new(prefix, b).read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"GET /x HTTP/1.1\r\n\r\n");
    }

    #[tokio::test]
    async fn silence_is_opaque() {
        let (_a, mut b) = tokio::io::duplex(64);
        let (p, prefix) = sniff(&mut b, std::time::Duration::from_millis(30))
            .await
            .unwrap();
        assert_eq!((p, prefix.len()), (Protocol::Opaque, 0));
    }
}
