//! One HBONE stream (an HTTP/2 CONNECT stream) as the proxy uses it: bytes copied
//! between it and a TCP connection without intermediate buffers, or, for the L7
//! path, read and written as an `AsyncRead + AsyncWrite` stream.
//!
//! The copy reads the TCP side into a buffer that is handed to HTTP/2 as is, and
//! writes received DATA frames to the TCP side as they are: no copy in user space
//! besides TLS. Flow control: a DATA frame's window is released only after its
//! bytes were written to the TCP side, and reading the TCP side waits for send
//! capacity, so a slow reader on either end slows the writer down.

use bytes::{Bytes, BytesMut};
use h2::{RecvStream, SendStream};
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};

/// Largest read from the TCP side (one HTTP/2 DATA frame at most this big).
pub const BUF: usize = super::copy::BUF;

/// Both halves of an HBONE stream.
pub struct Tunnel {
    pub send: SendStream<Bytes>,
    pub recv: RecvStream,
}

fn h2_io(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::Error::other("HTTP/2 I/O error"));
    }
    io::Error::new(io::ErrorKind::ConnectionReset, e)
}

/// Waits until HTTP/2 grants send capacity for up to `want` bytes; returns how many
/// (at least one).
async fn capacity(send: &mut SendStream<Bytes>, want: usize) -> io::Result<usize> {
    send.reserve_capacity(want);
    loop {
        match poll_fn(|cx| send.poll_capacity(cx)).await {
            Some(Ok(0)) => continue,
            Some(Ok(n)) => return Ok(n),
            Some(Err(e)) => return Err(h2_io(e)),
            None => {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "HBONE stream closed by the peer",
                ))
            }
        }
    }
}

/// TCP -> tunnel until EOF, then ends the stream (half-close). Returns the bytes sent.
async fn upstream<R: AsyncRead + Unpin>(
    tcp: &mut R,
    send: &mut SendStream<Bytes>,
) -> io::Result<u64> {
    let mut buf = BytesMut::new();
    let mut total = 0u64;
    loop {
        if buf.capacity() < BUF / 4 {
            buf.reserve(BUF);
        }
        let n = tcp.read_buf(&mut buf).await?;
        if n == 0 {
            send.send_data(Bytes::new(), true).map_err(h2_io)?;
            return Ok(total);
        }
        let mut data = buf.split().freeze();
        while !data.is_empty() {
            let cap = capacity(send, data.len()).await?;
            let chunk = data.split_to(cap.min(data.len()));
            send.send_data(chunk, false).map_err(h2_io)?;
        }
        total += n as u64;
    }
}

/// Tunnel -> TCP until the stream ends, then half-closes the TCP side. Returns the
/// bytes received.
async fn downstream<W: AsyncWrite + Unpin>(recv: &mut RecvStream, tcp: &mut W) -> io::Result<u64> {
    let mut total = 0u64;
    // `None`: the peer ended the stream (a reset is an error instead).
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.map_err(h2_io)?;
        tcp.write_all(&chunk).await?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        total += chunk.len() as u64;
    }
    tcp.shutdown().await?;
    Ok(total)
}

/// Copies both ways between a TCP connection and a tunnel until both directions
/// are done. Returns (bytes TCP -> tunnel, bytes tunnel -> TCP). An error (a reset
/// stream, a broken connection) ends both directions.
pub async fn copy(tcp: &mut tokio::net::TcpStream, t: Tunnel) -> io::Result<(u64, u64)> {
    let Tunnel { mut send, mut recv } = t;
    let (mut rd, mut wr) = tcp.split();
    tokio::try_join!(upstream(&mut rd, &mut send), downstream(&mut recv, &mut wr))
}

/// A tunnel as a byte stream, for the HTTP (L7) path.
pub struct TunnelIo {
    t: Tunnel,
    /// Received bytes not read yet.
    pending: Bytes,
    eof: bool,
}

impl TunnelIo {
    pub fn new(t: Tunnel) -> Self {
        Self {
            t,
            pending: Bytes::new(),
            eof: false,
        }
    }
}

impl AsyncRead for TunnelIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.pending.is_empty() && !this.eof {
            match ready!(this.t.recv.poll_data(cx)) {
                Some(Ok(chunk)) => {
                    let _ = this.t.recv.flow_control().release_capacity(chunk.len());
                    this.pending = chunk;
                }
                Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
                None => this.eof = true,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending.split_to(n));
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for TunnelIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let send = &mut self.t.send;
        send.reserve_capacity(buf.len().min(BUF));
        let n = match ready!(send.poll_capacity(cx)) {
            Some(Ok(n)) => n.min(buf.len()),
            Some(Err(e)) => return Poll::Ready(Err(h2_io(e))),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "HBONE stream closed by the peer",
                )))
            }
        };
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(h2_io)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Ending an already ended stream is an error in h2; a second shutdown is a no-op.
        let _ = self.t.send.send_data(Bytes::new(), true);
        Poll::Ready(Ok(()))
    }
}
