//! The HBONE client side: mTLS + HTTP/2 connections to other nodes' HBONE
//! listeners, pooled per (source identity, destination identity, destination
//! node) and multiplexed; a connection carrying
//! [`super::h2::MAX_STREAMS_PER_CONN`] streams makes the pool open another.

use super::local::LocalPod;
use super::ports::HBONE_PORT;
use super::tls;
use super::tunnel::Tunnel;
use crate::certs::CertStore;
use crate::config::ConfigStore;
use bytes::Bytes;
use h2::client::SendRequest;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// What dialing a new HBONE connection needs besides the pool.
pub struct Dial<'a> {
    /// The source pod: its SVID is presented, and the connection is made from its
    /// network namespace.
    pub source: &'a LocalPod,
    pub certs: &'a CertStore,
    /// Where the trust bundle is read from (only when a new connection is dialed).
    pub config: &'a ConfigStore,
    /// SO_MARK of the proxy's own sockets.
    pub mark: u32,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct PoolKey {
    pub source_id: String,
    pub dest_id: String,
    pub dest_node: String,
}

struct Pooled {
    send: SendRequest<Bytes>,
    /// Set when the connection has ended.
    closed: Arc<AtomicBool>,
    active: Arc<AtomicUsize>,
    /// When the last stream ended (for idle reaping).
    idle_since: Mutex<Option<std::time::Instant>>,
}

/// Connections pooled per key. Dialing is serialized per key, so a burst of new
/// streams shares one new connection instead of each dialing its own; connections
/// idle for `idle_timeout` are closed.
pub struct HbonePool {
    conns: Mutex<HashMap<PoolKey, Vec<Pooled>>>,
    dialing: Mutex<HashMap<PoolKey, Arc<tokio::sync::Mutex<()>>>>,
    pub idle_timeout: std::time::Duration,
    /// A new connection's TCP connect, TLS and HTTP/2 handshakes must be done
    /// within this (a destination that accepts and never answers would otherwise
    /// hold the dial, and every stream waiting for it, for good).
    handshake_timeout: std::time::Duration,
}

pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
/// Default of the HBONE handshake timeout (both sides: `--hbone-handshake-timeout`).
pub const DEFAULT_HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Default for HbonePool {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_TIMEOUT, DEFAULT_HANDSHAKE_TIMEOUT)
    }
}

/// Decrements a connection's stream count when a stream ends.
pub struct StreamGuard(Arc<AtomicUsize>);
impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl HbonePool {
    pub fn new(idle_timeout: std::time::Duration, handshake_timeout: std::time::Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            idle_timeout,
            handshake_timeout,
        }
    }

    fn dial_lock(&self, key: &PoolKey) -> Arc<tokio::sync::Mutex<()>> {
        self.dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone()
    }

    /// Closes connections without streams for longer than the idle timeout.
    pub fn reap_idle(&self) -> usize {
        let now = std::time::Instant::now();
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for v in m.values_mut() {
            v.retain(|c| {
                let mut idle = c.idle_since.lock().unwrap_or_else(|p| p.into_inner());
                let open = !c.closed.load(Ordering::Acquire);
                if c.active.load(Ordering::Acquire) > 0 {
                    *idle = None;
                    return open;
                }
                let since = *idle.get_or_insert(now);
                let keep = open && now.duration_since(since) < self.idle_timeout;
                closed += usize::from(!keep);
                keep
            });
        }
        m.retain(|_, v| !v.is_empty());
        closed
    }

    fn take(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamGuard, Arc<AtomicBool>)> {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.get_mut(key)?;
        v.retain(|c| !c.closed.load(Ordering::Acquire));
        let c = v
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < super::h2::MAX_STREAMS_PER_CONN)?;
        c.active.fetch_add(1, Ordering::AcqRel);
        Some((
            c.send.clone(),
            StreamGuard(c.active.clone()),
            c.closed.clone(),
        ))
    }

    fn put(&self, key: PoolKey, send: SendRequest<Bytes>, closed: Arc<AtomicBool>) -> StreamGuard {
        let active = Arc::new(AtomicUsize::new(1));
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key)
            .or_default()
            .push(Pooled {
                send,
                closed,
                active: active.clone(),
                idle_since: Mutex::new(None),
            });
        StreamGuard(active)
    }

    /// Opens a CONNECT stream to `authority` through the destination pod's HBONE
    /// listener, from the source pod's netns. Returns the tunnel and a guard that
    /// releases the pool slot when dropped.
    ///
    /// A pooled connection may be going away (its peer drains and sent GOAWAY, or it
    /// just closed): a stream it refuses before the peer took it is opened once more
    /// on a new connection, so a draining peer costs no connection.
    pub async fn open(
        &self,
        dial: Dial<'_>,
        dest: &weft_proto::pb::Workload,
        dest_pod_ip: std::net::IpAddr,
        authority: SocketAddr,
    ) -> anyhow::Result<(Tunnel, StreamGuard)> {
        let key = PoolKey {
            source_id: dial.source.workload().spiffe_id.clone(),
            dest_id: dest.spiffe_id.clone(),
            dest_node: dest.node.clone(),
        };
        let (send, guard, closed, pooled) = self.connection(&dial, &key, dest, dest_pod_ip).await?;
        match connect_stream(send, authority).await {
            Ok(tunnel) => Ok((tunnel, guard)),
            Err(StreamError::NotTaken(e)) if pooled => {
                tracing::debug!(%authority, error = %e, "pooled HBONE connection going away: opening a new one");
                closed.store(true, Ordering::Release);
                drop(guard);
                let (send, guard, _, _) = self.dial_new(&dial, key, dest, dest_pod_ip).await?;
                let tunnel = connect_stream(send, authority)
                    .await
                    .map_err(StreamError::into_inner)?;
                Ok((tunnel, guard))
            }
            Err(e) => Err(e.into_inner()),
        }
    }

    /// A connection for `key` with a free stream slot: a pooled one (`true`), or a
    /// new one.
    async fn connection(
        &self,
        dial: &Dial<'_>,
        key: &PoolKey,
        dest: &weft_proto::pb::Workload,
        dest_pod_ip: std::net::IpAddr,
    ) -> anyhow::Result<(SendRequest<Bytes>, StreamGuard, Arc<AtomicBool>, bool)> {
        // One dialer per key at a time; the others wait and reuse its connection. The
        // guard is held until the new connection is in the pool.
        if let Some((send, guard, closed)) = self.take(key) {
            return Ok((send, guard, closed, true));
        }
        let lock = self.dial_lock(key);
        let _dialing = lock.lock_owned().await;
        if let Some((send, guard, closed)) = self.take(key) {
            return Ok((send, guard, closed, true));
        }
        self.dial_new(dial, key.clone(), dest, dest_pod_ip).await
    }

    /// Dials a new mTLS + HTTP/2 connection and puts it in the pool.
    async fn dial_new(
        &self,
        dial: &Dial<'_>,
        key: PoolKey,
        dest: &weft_proto::pb::Workload,
        dest_pod_ip: std::net::IpAddr,
    ) -> anyhow::Result<(SendRequest<Bytes>, StreamGuard, Arc<AtomicBool>, bool)> {
        let source = dial.source;
        let source_id = &source.workload().spiffe_id;
        let cert = dial
            .certs
            .get(source_id)
            .ok_or_else(|| anyhow::anyhow!("no certificate yet for {source_id}"))?;
        let bundle = dial
            .config
            .trust_bundle()
            .ok_or_else(|| anyhow::anyhow!("no trust bundle"))?;
        let cfg = tls::client_config(&cert, &bundle, &dest.spiffe_id)?;
        let target = SocketAddr::new(dest_pod_ip, HBONE_PORT);
        let sock = source.netns.tcp_socket(target.is_ipv6(), dial.mark).await?;
        let handshake = async {
            let tcp = tokio::net::TcpSocket::from_std_stream(sock.into())
                .connect(target)
                .await?;
            let name = rustls::pki_types::ServerName::IpAddress(dest_pod_ip.into());
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            anyhow::Ok(super::h2::client().handshake::<_, Bytes>(tls).await?)
        };
        let (send, conn) = tokio::time::timeout(self.handshake_timeout, handshake)
            .await
            .map_err(|_| {
                anyhow::anyhow!(
                    "HBONE connection to {target}: handshake not done within {:?}",
                    self.handshake_timeout
                )
            })??;
        let closed = Arc::new(AtomicBool::new(false));
        let ended = closed.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HBONE connection ended");
            }
            ended.store(true, Ordering::Release);
        });
        let guard = self.put(key, send.clone(), closed.clone());
        Ok((send, guard, closed, false))
    }

    /// Open connections per key (for metrics).
    pub fn sizes(&self) -> Vec<(PoolKey, usize, usize)> {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(k, v)| {
                (
                    k.clone(),
                    v.len(),
                    v.iter().map(|c| c.active.load(Ordering::Relaxed)).sum(),
                )
            })
            .collect()
    }
}

/// Why a CONNECT stream did not open.
enum StreamError {
    /// The peer never took the stream (the connection is going away or gone, or it
    /// refused the stream unprocessed): safe to open on another connection.
    NotTaken(anyhow::Error),
    /// Anything else, including the peer's answer (403, 404, ...).
    Failed(anyhow::Error),
}

impl StreamError {
    fn into_inner(self) -> anyhow::Error {
        match self {
            StreamError::NotTaken(e) | StreamError::Failed(e) => e,
        }
    }
}

/// Sends `CONNECT authority` on `send` and waits for the peer's 200.
async fn connect_stream(
    send: SendRequest<Bytes>,
    authority: SocketAddr,
) -> Result<Tunnel, StreamError> {
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(authority.to_string())
        .body(())
        .map_err(|e| StreamError::Failed(e.into()))?;
    let not_taken = |e: h2::Error| StreamError::NotTaken(e.into());
    let (resp, send) = send
        .ready()
        .await
        .map_err(not_taken)?
        .send_request(req, false)
        .map_err(not_taken)?;
    let resp = match resp.await {
        Ok(r) => r,
        // Refused before any processing (RFC 9113 8.7): e.g. beyond a GOAWAY's last
        // stream.
        Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) || e.is_go_away() => {
            return Err(StreamError::NotTaken(e.into()))
        }
        Err(e) => return Err(StreamError::Failed(e.into())),
    };
    if resp.status() != http::StatusCode::OK {
        return Err(StreamError::Failed(anyhow::anyhow!(
            "HBONE CONNECT {authority} refused: {}",
            resp.status()
        )));
    }
    Ok(Tunnel {
        send,
        recv: resp.into_body(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection whose peer sent GOAWAY: a new stream on it is reported as not
    /// taken (so the pool opens it on a new connection), while a stream the peer
    /// answered with 403 is a plain failure.
    #[tokio::test]
    async fn streams_refused_by_a_draining_peer_are_not_taken_and_403_is_a_failure() {
        let authority: SocketAddr = "10.0.0.1:80".parse().unwrap();
        // A peer that answers one CONNECT with 403, then drains.
        let (a, b) = tokio::io::duplex(64 << 10);
        tokio::spawn(async move {
            let mut conn = super::super::h2::server()
                .handshake::<_, Bytes>(b)
                .await
                .unwrap();
            if let Some(Ok((_req, mut respond))) = conn.accept().await {
                let mut r = http::Response::new(());
                *r.status_mut() = http::StatusCode::FORBIDDEN;
                let _ = respond.send_response(r, true);
            }
            conn.graceful_shutdown();
            while let Some(Ok(_)) = conn.accept().await {}
        });
        let (send, conn) = super::super::h2::client()
            .handshake::<_, Bytes>(a)
            .await
            .unwrap();
        tokio::spawn(async move {
            let _ = conn.await;
        });
        match connect_stream(send.clone(), authority).await {
            Err(StreamError::Failed(e)) => assert!(e.to_string().contains("403"), "{e}"),
            Err(StreamError::NotTaken(e)) => panic!("a 403 is not a refused stream: {e}"),
            Ok(_) => panic!("the peer answered 403"),
        }
        // Give the GOAWAY time to arrive.
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        match connect_stream(send, authority).await {
            Err(StreamError::NotTaken(_)) => {}
            Err(StreamError::Failed(e)) => panic!("a stream after GOAWAY is retryable: {e}"),
            Ok(_) => panic!("the peer drains: no new stream"),
        }
    }
}
