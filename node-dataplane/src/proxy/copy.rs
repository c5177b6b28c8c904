//! Byte copying between the two sides of a proxied connection, with buffers large
//! enough that a bulk transfer is not split into 8 KiB reads (tokio's default).

use tokio::io::{AsyncRead, AsyncWrite};

/// Per-direction buffer size.
pub const BUF: usize = 128 << 10;

/// Copies both ways until both sides are done (half-close is propagated).
pub async fn bidirectional<A, B>(a: &mut A, b: &mut B) -> std::io::Result<(u64, u64)>
where
    A: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    tokio::io::copy_bidirectional_with_sizes(a, b, BUF, BUF).await
}

/// Sets SO_LINGER 0, so that closing the socket resets the connection (RST, not FIN).
pub fn reset_on_close(s: &tokio::net::TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(std::time::Duration::ZERO));
}
