//! HBONE: HTTP/2 CONNECT over mTLS to the destination pod's :15008, as Istio's
//! ambient mesh does. Connections are pooled per (source identity, destination
//! identity, destination node) and multiplexed; a connection carrying
//! `MAX_STREAMS_PER_CONN` streams makes the pool open another.

use super::access_log::{ConnRecord, Verdict};
use super::state::ProxyState;
use super::tls;
use super::tunnel::{Tunnel, TunnelIo};
use bytes::Bytes;
use h2::client::SendRequest;
use h2::server::SendResponse;
use h2::RecvStream;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_api::authz::Attributes;

pub const HBONE_PORT: u16 = 15008;
pub const MAX_STREAMS_PER_CONN: usize = 100;
/// Large HTTP/2 DATA frames: fewer frames (and TLS records) per byte in bulk transfers.
const MAX_FRAME: u32 = 256 << 10;

/// HTTP/2 settings of the HBONE client side (the source node): large windows and
/// frames for bulk streams, no server push.
pub fn h2_client() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    b
}

/// HTTP/2 settings of the HBONE server side (the destination node).
pub fn h2_server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(MAX_STREAMS_PER_CONN as u32)
        .initial_window_size(4 << 20)
        .initial_connection_window_size(16 << 20)
        .max_frame_size(MAX_FRAME)
        .max_send_buffer_size(1 << 20);
    b
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
            .find(|c| c.active.load(Ordering::Acquire) < MAX_STREAMS_PER_CONN)?;
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

/// Opens a CONNECT stream to `authority` through the destination pod's HBONE
/// listener, from the source pod's netns. Returns the tunnel and a guard that
/// releases the pool slot when dropped.
pub async fn open(
    state: &ProxyState,
    source: &super::state::LocalPod,
    dest: &weft_api::pb::Workload,
    dest_pod_ip: std::net::IpAddr,
    authority: SocketAddr,
) -> anyhow::Result<(Tunnel, StreamGuard)> {
    let key = PoolKey {
        source_id: source.workload.spiffe_id.clone(),
        dest_id: dest.spiffe_id.clone(),
        dest_node: dest.node.clone(),
    };
    // One dialer per key at a time; the others wait and reuse its connection. The
    // guard is held until the new connection is in the pool.
    let mut _dialing = None;
    let taken = match state.pool.take(&key) {
        Some(x) => Some(x),
        None => {
            let lock = state.pool.dial_lock(&key);
            _dialing = Some(lock.lock_owned().await);
            state.pool.take(&key)
        }
    };
    let (send, guard) = match taken {
        Some(x) => x,
        None => {
            let cert = state.certs.get(&source.workload.spiffe_id).ok_or_else(|| {
                anyhow::anyhow!("no certificate yet for {}", source.workload.spiffe_id)
            })?;
            let bundle = state
                .trust_bundle()
                .ok_or_else(|| anyhow::anyhow!("no trust bundle"))?;
            let cfg = tls::client_config(&cert, &bundle, &dest.spiffe_id)?;
            let target = SocketAddr::new(dest_pod_ip, HBONE_PORT);
            let sock = source
                .netns
                .tcp_socket(target.is_ipv6(), state.mark)
                .await?;
            let tcp = tokio::net::TcpSocket::from_std_stream(sock.into())
                .connect(target)
                .await?;
            let name = rustls::pki_types::ServerName::IpAddress(dest_pod_ip.into());
            let tls = tokio_rustls::TlsConnector::from(cfg)
                .connect(name, tcp)
                .await?;
            let (send, conn) = h2_client().handshake::<_, Bytes>(tls).await?;
            let closed = Arc::new(AtomicBool::new(false));
            let ended = closed.clone();
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "HBONE connection ended");
                }
                ended.store(true, Ordering::Release);
            });
            let guard = state.pool.put(key, send.clone(), closed);
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

/// Serves HBONE on one in-pod :15008 listener. `owner` is the pod that owns the
/// listener: its SVID is presented.
pub async fn serve(
    listener: tokio::net::TcpListener,
    owner: super::state::LocalPod,
    state: Arc<ProxyState>,
) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        let (owner, state) = (owner.clone(), state.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_conn(tcp, peer, owner, state.clone()).await {
                state.counters.hbone_refused.fetch_add(1, Ordering::Relaxed);
                tracing::info!(%peer, error = %format!("{e:#}"), "HBONE connection refused");
            }
        });
    }
}

async fn serve_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    owner: super::state::LocalPod,
    state: Arc<ProxyState>,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let cert = state
        .certs
        .get(&owner.workload.spiffe_id)
        .ok_or_else(|| anyhow::anyhow!("no certificate yet for {}", owner.workload.spiffe_id))?;
    let bundle = state
        .trust_bundle()
        .ok_or_else(|| anyhow::anyhow!("no trust bundle"))?;
    let cfg = tls::server_config(&cert, &bundle)?;
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await?;
    let peer_id = {
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| anyhow::anyhow!("no client certificate"))?;
        if let Ok((_, x)) = <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<'_, _>>::from_der(leaf) {
            *state.last_peer_serial.lock().unwrap_or_else(|p| p.into_inner()) = x.raw_serial_as_string().replace(':', "");
        }
        tls::spiffe_id_of(leaf).map_err(anyhow::Error::msg)?
    };
    let principal = peer_id
        .strip_prefix("spiffe://")
        .unwrap_or(&peer_id)
        .to_string();
    let served_id = owner.workload.spiffe_id.clone();
    let mut conn = h2_server()
        .handshake::<_, Bytes>(tls)
        .await
        .map_err(|e| anyhow::anyhow!("HBONE connection from {peer_id}: {e}"))?;
    // Accepting streams also drives the connection; each stream runs in its own task.
    while let Some(stream) = conn.accept().await {
        let (req, respond) =
            stream.map_err(|e| anyhow::anyhow!("HBONE connection from {peer_id}: {e}"))?;
        handle(req, respond, peer, &principal, &served_id, &state);
    }
    Ok(())
}

/// How an inbound stream ended: bytes copied (L4 only; L7 connections are logged
/// per request) and a note for the access log.
type StreamEnd = (Option<(u64, u64)>, Option<&'static str>);

/// Access log note for a connection closed because a policy now denies it.
pub const CLOSED_BY_POLICY: &str = "closed: denied by a policy change";

/// Answers a CONNECT that is refused, ending the stream.
fn refuse(mut respond: SendResponse<Bytes>, code: http::StatusCode) {
    let mut r = http::Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

/// Checks one CONNECT stream and, if allowed, starts its task.
fn handle(
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    principal: &str,
    served_id: &str,
    state: &Arc<ProxyState>,
) {
    if req.method() != http::Method::CONNECT {
        return refuse(respond, http::StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(dst) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(respond, http::StatusCode::BAD_REQUEST);
    };
    // Only to an enrolled workload on this node...
    let Some(target) = state.local_pod(dst.ip()) else {
        tracing::info!(%dst, peer = %principal, "HBONE CONNECT to a destination that is not a local enrolled workload");
        return refuse(respond, http::StatusCode::NOT_FOUND);
    };
    // ...whose identity is the one this TLS session presented to the client.
    if target.workload.spiffe_id != served_id {
        tracing::info!(%dst, peer = %principal, target = %target.workload.spiffe_id, presented = %served_id, "HBONE CONNECT to a workload of another identity");
        return refuse(respond, http::StatusCode::MISDIRECTED_REQUEST);
    }
    let plan = state.l7_plan(&target.workload, dst.port());
    let attrs = Attributes {
        source_ip: Some(peer.ip()),
        destination_ip: Some(dst.ip()),
        destination_port: dst.port(),
        principal: Some(principal.to_string()),
        request: None,
        // Parsed as HTTP: L7 fields are checked per request.
        l7_pending: plan.as_ref().is_some_and(super::l7::L7Plan::parses_http),
    };
    let decision = state.authorize(&target.workload, &attrs);
    if !decision.allowed {
        state
            .counters
            .hbone_in_denied
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%dst, peer = %principal, policy = ?decision.policy, reason = decision.reason, "connection denied");
        state.access_log.connection(&ConnRecord {
            reporter: "destination",
            source_addr: peer,
            destination_addr: dst,
            source_identity: &format!("spiffe://{principal}"),
            destination_identity: &target.workload.spiffe_id,
            destination_workload: Some(&target.workload),
            service: None,
            mtls: true,
            verdict: Verdict::Deny(decision.policy.as_deref()),
            bytes: Some((0, 0)),
            duration: Duration::ZERO,
            error: Some(decision.reason),
        });
        return refuse(respond, http::StatusCode::FORBIDDEN);
    }
    state.counters.hbone_in.fetch_add(1, Ordering::Relaxed);
    let mark = state.mark;
    let attrs_l7 = attrs.clone();
    let reg = state.conns.register(target.workload.clone(), attrs);
    let source = state.workload_by_ip(peer.ip());
    let mut l = super::metrics::labels(
        "destination",
        source.as_deref(),
        Some(&target.workload),
        true,
    );
    l.source_principal = format!("spiffe://{principal}");
    let policy = decision.policy;
    // Accepted: 200 now; the application connection is made in the stream's task
    // (if it fails, the stream is reset).
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "HBONE stream ended before its response");
            return;
        }
    };
    let tunnel = Tunnel {
        send,
        recv: req.into_body(),
    };
    let state = state.clone();
    tokio::spawn(async move {
        let started = Instant::now();
        let t = &state.metrics.traffic;
        t.open(&l);
        let r: anyhow::Result<StreamEnd> = async {
            if let Some(plan) = plan {
                state.counters.l7_connections.fetch_add(1, Ordering::Relaxed);
                let ctx = super::l7::ConnCtx::new(
                    state.clone(),
                    target.clone(),
                    dst,
                    peer,
                    attrs_l7,
                    Some(l.source_principal.clone()),
                    plan,
                    l.clone(),
                );
                tokio::select! {
                    r = super::l7::serve(TunnelIo::new(tunnel), ctx) => r?,
                    _ = reg.cancel.cancelled() => return Ok((None, Some(CLOSED_BY_POLICY))),
                }
                return Ok((None, None));
            }
            let sock = target.netns.tcp_socket(dst.is_ipv6(), mark).await?;
            let mut app = tokio::net::TcpSocket::from_std_stream(sock.into())
                .connect(dst)
                .await?;
            tokio::select! {
                r = super::tunnel::copy(&mut app, tunnel) => {
                    // (to the tunnel, to the application)
                    let (b, a) = r?;
                    t.sent.get_or_create(&l).inc_by(a);
                    t.received.get_or_create(&l).inc_by(b);
                    Ok((Some((a, b)), None))
                }
                _ = reg.cancel.cancelled() => {
                    // Denied by a policy change: reset the application side; dropping
                    // the tunnel resets the stream.
                    let _ = socket2::SockRef::from(&app).set_linger(Some(std::time::Duration::ZERO));
                    Ok((None, Some(CLOSED_BY_POLICY)))
                }
            }
        }
        .await;
        drop(reg);
        t.closed.get_or_create(&l).inc();
        let (bytes, error) = match r {
            Ok((bytes, note)) => (bytes, note.map(str::to_string)),
            Err(e) => {
                t.failed.get_or_create(&l).inc();
                tracing::debug!(%dst, error = %e, "HBONE stream ended with an error");
                (None, Some(format!("{e:#}")))
            }
        };
        state.access_log.connection(&ConnRecord {
            reporter: "destination",
            source_addr: peer,
            destination_addr: dst,
            source_identity: &l.source_principal,
            destination_identity: &target.workload.spiffe_id,
            destination_workload: Some(&target.workload),
            service: None,
            mtls: true,
            verdict: Verdict::Allow(policy.as_deref()),
            bytes,
            duration: started.elapsed(),
            error: error.as_deref(),
        });
    });
}
