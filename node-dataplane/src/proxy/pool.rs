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
}

pub const DEFAULT_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl Default for HbonePool {
    fn default() -> Self {
        Self::new(DEFAULT_IDLE_TIMEOUT)
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
    pub fn new(idle_timeout: std::time::Duration) -> Self {
        Self {
            conns: Mutex::new(HashMap::new()),
            dialing: Mutex::new(HashMap::new()),
            idle_timeout,
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

    fn take(&self, key: &PoolKey) -> Option<(SendRequest<Bytes>, StreamGuard)> {
        let mut m = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.get_mut(key)?;
        v.retain(|c| !c.closed.load(Ordering::Acquire));
        let c = v
            .iter()
            .find(|c| c.active.load(Ordering::Acquire) < super::h2::MAX_STREAMS_PER_CONN)?;
        c.active.fetch_add(1, Ordering::AcqRel);
        Some((c.send.clone(), StreamGuard(c.active.clone())))
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
    pub async fn open(
        &self,
        dial: Dial<'_>,
        dest: &weft_proto::pb::Workload,
        dest_pod_ip: std::net::IpAddr,
        authority: SocketAddr,
    ) -> anyhow::Result<(Tunnel, StreamGuard)> {
        let source = dial.source;
        let key = PoolKey {
            source_id: source.workload.spiffe_id.clone(),
            dest_id: dest.spiffe_id.clone(),
            dest_node: dest.node.clone(),
        };
        // One dialer per key at a time; the others wait and reuse its connection. The
        // guard is held until the new connection is in the pool.
        let mut _dialing = None;
        let taken = match self.take(&key) {
            Some(x) => Some(x),
            None => {
                let lock = self.dial_lock(&key);
                _dialing = Some(lock.lock_owned().await);
                self.take(&key)
            }
        };
        let (send, guard) = match taken {
            Some(x) => x,
            None => {
                let cert = dial.certs.get(&source.workload.spiffe_id).ok_or_else(|| {
                    anyhow::anyhow!("no certificate yet for {}", source.workload.spiffe_id)
                })?;
                let bundle = dial
                    .config
                    .trust_bundle()
                    .ok_or_else(|| anyhow::anyhow!("no trust bundle"))?;
                let cfg = tls::client_config(&cert, &bundle, &dest.spiffe_id)?;
                let target = SocketAddr::new(dest_pod_ip, HBONE_PORT);
                let sock = source.netns.tcp_socket(target.is_ipv6(), dial.mark).await?;
                let tcp = tokio::net::TcpSocket::from_std_stream(sock.into())
                    .connect(target)
                    .await?;
                let name = rustls::pki_types::ServerName::IpAddress(dest_pod_ip.into());
                let tls = tokio_rustls::TlsConnector::from(cfg)
                    .connect(name, tcp)
                    .await?;
                let (send, conn) = super::h2::client().handshake::<_, Bytes>(tls).await?;
                let closed = Arc::new(AtomicBool::new(false));
                let ended = closed.clone();
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "HBONE connection ended");
                    }
                    ended.store(true, Ordering::Release);
                });
                let guard = self.put(key, send.clone(), closed);
                (send, guard)
            }
        };
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority.to_string())
            .body(())?;
        let (resp, send) = send.ready().await?.send_request(req, false)?;
        let resp = resp.await?;
        if resp.status() != http::StatusCode::OK {
            anyhow::bail!("HBONE CONNECT {authority} refused: {}", resp.status());
        }
        let recv = resp.into_body();
        Ok((Tunnel { send, recv }, guard))
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
