//! Outbound listener (in-pod 127.0.0.1:15001 / [::1]:15001): finds each captured
//! connection's original destination, resolves a Service VIP to an endpoint, and
//! sends the bytes over HBONE (mTLS, HTTP/2 CONNECT) when the destination workload
//! is enrolled, or in plaintext (with the proxy's mark) when it is not.

use super::orig_dst::original_dst;
use super::state::{LocalPod, ProxyState};
use crate::netns::PodNetns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Default, Debug)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub tunneled: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Last original destination seen (for tests and debugging).
    pub last_orig_dst: std::sync::Mutex<Option<SocketAddr>>,
}

/// How one pod's outbound connections are handled.
pub struct Outbound {
    pub netns: Arc<PodNetns>,
    pub mark: u32,
    pub stats: Arc<OutboundStats>,
    /// The mesh: the node's proxy state and the source pod. `None`: plaintext only.
    pub mesh: Option<(Arc<ProxyState>, LocalPod)>,
}

pub async fn serve(listener: tokio::net::TcpListener, ob: Arc<Outbound>) {
    loop {
        let (conn, peer) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                tracing::warn!(error = %e, "outbound accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                continue;
            }
        };
        ob.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let ob = ob.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(conn, &ob).await {
                ob.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %format!("{e:#}"), "outbound connection failed");
            }
        });
    }
}

/// Plaintext-only forwarding (no mesh), used where no proxy state exists.
pub async fn serve_plain(
    listener: tokio::net::TcpListener,
    netns: Arc<PodNetns>,
    mark: u32,
    stats: Arc<OutboundStats>,
) {
    serve(
        listener,
        Arc::new(Outbound {
            netns,
            mark,
            stats,
            mesh: None,
        }),
    )
    .await
}

/// Where a connection goes after Service resolution.
struct Resolved {
    dst: SocketAddr,
    /// Counts the connection against the endpoint (least-conn) while held.
    _active: Option<super::lb::Active>,
    /// `namespace/name` of the Service, when the client addressed one.
    service: Option<Arc<weft_api::pb::Service>>,
}

/// A Service VIP:port becomes one of its ready endpoints (chosen by the node's
/// balancer); anything else stays as it is.
fn resolve(state: &ProxyState, dst: SocketAddr) -> Resolved {
    let snap = state.config.snapshot();
    if let Some(svc) = snap.service_by_vip(dst.ip()) {
        let port = u32::from(dst.port());
        let eps: Vec<SocketAddr> = svc
            .endpoints
            .iter()
            .filter(|e| e.ready)
            .filter_map(|e| {
                let t = e.target_ports.get(&port)?;
                let ip = e.ips.first()?.parse().ok()?;
                Some(SocketAddr::new(ip, u16::try_from(*t).ok()?))
            })
            .collect();
        let service = Some(svc.clone());
        if let Some((ep, active)) = state.balancer.pick(&eps) {
            return Resolved {
                dst: ep,
                _active: Some(active),
                service,
            };
        }
        return Resolved {
            dst,
            _active: None,
            service,
        };
    }
    Resolved {
        dst,
        _active: None,
        service: None,
    }
}

async fn forward(conn: tokio::net::TcpStream, ob: &Outbound) -> anyhow::Result<()> {
    let _ = conn.set_nodelay(true);
    let local = conn.local_addr()?;
    let orig = original_dst(&conn, local.is_ipv6())?;
    if let Ok(mut last) = ob.stats.last_orig_dst.lock() {
        *last = Some(orig);
    }
    let Some((state, source)) = &ob.mesh else {
        return passthrough(conn, ob, orig).await.map(|_| ());
    };
    let started = std::time::Instant::now();
    let client = conn.peer_addr().unwrap_or(local);
    let to = resolve(state, orig);
    let dest = state.workload_by_ip(to.dst.ip());
    let meshed = dest
        .as_ref()
        .filter(|w| w.enrolled && !w.spiffe_id.is_empty());
    let l = super::metrics::labels(
        "source",
        Some(&source.workload),
        dest.as_deref(),
        meshed.is_some(),
    );
    let result = match meshed {
        Some(w) => tunnel(conn, ob, state, source, w, to.dst, &l).await,
        None => {
            state.counters.plaintext_out.fetch_add(1, Ordering::Relaxed);
            let t = &state.metrics.traffic;
            t.open(&l);
            let r = passthrough(conn, ob, to.dst).await;
            t.closed.get_or_create(&l).inc();
            match &r {
                Ok((a, b)) => {
                    t.sent.get_or_create(&l).inc_by(*a);
                    t.received.get_or_create(&l).inc_by(*b);
                }
                Err(_) => {
                    t.failed.get_or_create(&l).inc();
                }
            }
            r
        }
    };
    let error = result.as_ref().err().map(|e| format!("{e:#}"));
    state.access_log.connection(&super::access_log::ConnRecord {
        reporter: "source",
        source_addr: client,
        destination_addr: to.dst,
        source_identity: &source.workload.spiffe_id,
        destination_identity: meshed.map_or("unknown", |w| w.spiffe_id.as_str()),
        destination_workload: dest.as_deref(),
        service: to.service.as_deref(),
        mtls: meshed.is_some(),
        verdict: super::access_log::Verdict::Unchecked,
        bytes: result.as_ref().ok().copied(),
        duration: started.elapsed(),
        error: error.as_deref(),
    });
    result.map(|_| ())
}

/// An enrolled destination: the bytes go over HBONE (mTLS + HTTP/2 CONNECT).
async fn tunnel(
    mut conn: tokio::net::TcpStream,
    ob: &Outbound,
    state: &Arc<ProxyState>,
    source: &LocalPod,
    w: &Arc<weft_api::pb::Workload>,
    dst: SocketAddr,
    l: &super::metrics::TcpLabels,
) -> anyhow::Result<(u64, u64)> {
    let t = &state.metrics.traffic;
    let (tunnel, _guard) = match super::hbone::open(state, source, w, dst.ip(), dst).await {
        Ok(x) => x,
        Err(e) => {
            t.failed.get_or_create(l).inc();
            return Err(e);
        }
    };
    ob.stats.tunneled.fetch_add(1, Ordering::Relaxed);
    state.counters.hbone_out.fetch_add(1, Ordering::Relaxed);
    t.open(l);
    let copied = super::tunnel::copy(&mut conn, tunnel).await;
    t.closed.get_or_create(l).inc();
    match copied {
        Ok((a, b)) => {
            t.sent.get_or_create(l).inc_by(a);
            t.received.get_or_create(l).inc_by(b);
            ob.stats.bytes_up.fetch_add(a, Ordering::Relaxed);
            ob.stats.bytes_down.fetch_add(b, Ordering::Relaxed);
            Ok((a, b))
        }
        Err(e) => {
            t.failed.get_or_create(l).inc();
            // The tunnel was reset (e.g. denied by a policy change): reset the
            // application's connection too instead of a graceful close.
            let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
            Err(e.into())
        }
    }
}

async fn passthrough(
    mut conn: tokio::net::TcpStream,
    ob: &Outbound,
    dst: SocketAddr,
) -> anyhow::Result<(u64, u64)> {
    let sock = ob.netns.tcp_socket(dst.is_ipv6(), ob.mark).await?;
    let mut up = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(dst)
        .await?;
    ob.stats.forwarded.fetch_add(1, Ordering::Relaxed);
    let (a, b) = super::copy::bidirectional(&mut conn, &mut up).await?;
    ob.stats.bytes_up.fetch_add(a, Ordering::Relaxed);
    ob.stats.bytes_down.fetch_add(b, Ordering::Relaxed);
    Ok((a, b))
}
