//! Inbound plaintext listener (in-pod :15006): connections from outside the mesh,
//! steered here by the sk_lookup program. The accepted socket keeps the original
//! destination as its local address. Until L4 authorization exists (node proxy
//! issue) they are forwarded to the application from the pod's own IP, which the
//! sk_lookup program leaves alone.

use crate::netns::PodNetns;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default, Debug)]
pub struct InboundStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    pub last_dst: std::sync::Mutex<Option<std::net::SocketAddr>>,
}

pub async fn serve(
    listener: tokio::net::TcpListener,
    netns: Arc<PodNetns>,
    mark: u32,
    stats: Arc<InboundStats>,
) {
    loop {
        let Ok((mut conn, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let netns = netns.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            let r = async {
                let dst = conn.local_addr()?;
                if let Ok(mut l) = stats.last_dst.lock() {
                    *l = Some(dst);
                }
                let sock = netns.tcp_socket(dst.is_ipv6(), mark).await?;
                let mut up = tokio::net::TcpSocket::from_std_stream(sock.into())
                    .connect(dst)
                    .await?;
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                tokio::io::copy_bidirectional(&mut conn, &mut up).await
            }
            .await;
            if let Err(e) = r {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "inbound plaintext connection failed");
            }
        });
    }
}

/// HBONE (:15008) arrives with the node proxy issue; until then connections are
/// closed at once (never forwarded unauthenticated).
pub async fn refuse_hbone(listener: tokio::net::TcpListener) {
    loop {
        if let Ok((conn, peer)) = listener.accept().await {
            tracing::debug!(%peer, "HBONE is not implemented yet: connection closed");
            drop(conn);
        }
    }
}
