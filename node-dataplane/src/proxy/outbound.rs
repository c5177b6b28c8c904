//! Outbound listener (in-pod 127.0.0.1:15001): finds each captured connection's
//! original destination and, until the mTLS tunnel exists, forwards the bytes to it
//! in plaintext from the pod's own network namespace, with the proxy's mark so the
//! capture never loops.

use super::orig_dst::original_dst;
use crate::netns::PodNetns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default, Debug)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Last original destination seen (for tests and debugging).
    pub last_orig_dst: std::sync::Mutex<Option<SocketAddr>>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    netns: Arc<PodNetns>,
    mark: u32,
    stats: Arc<OutboundStats>,
) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let netns = netns.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(conn, netns, mark, &stats).await {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "outbound connection failed");
            }
        });
    }
}

async fn forward(
    mut conn: tokio::net::TcpStream,
    netns: Arc<PodNetns>,
    mark: u32,
    stats: &OutboundStats,
) -> std::io::Result<()> {
    let local = conn.local_addr()?;
    let dst = original_dst(&conn, local.is_ipv6())?;
    if let Ok(mut last) = stats.last_orig_dst.lock() {
        *last = Some(dst);
    }
    let sock = netns.tcp_socket(dst.is_ipv6(), mark).await?;
    let sock = tokio::net::TcpSocket::from_std_stream(sock.into());
    let mut up = sock.connect(dst).await?;
    stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let (a, b) = tokio::io::copy_bidirectional(&mut conn, &mut up).await?;
    stats.bytes_up.fetch_add(a, Ordering::Relaxed);
    stats.bytes_down.fetch_add(b, Ordering::Relaxed);
    Ok(())
}
