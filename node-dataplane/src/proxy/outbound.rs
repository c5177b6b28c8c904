//! Outbound listener (in-pod 127.0.0.1:15001 / [::1]:15001): finds each captured
//! connection's original destination, resolves a Service VIP to an endpoint, and
//! sends the bytes over HBONE (mTLS, HTTP/2 CONNECT) when the destination workload
//! is enrolled, or in plaintext (with the proxy's mark) when it is not.

use super::counters::OutboundStats;
use super::local::LocalPod;
use super::orig_dst::original_dst;
use super::pool::Dial;
use super::record::ConnRecord;
use super::state::ProxyState;
use crate::netns::PodNetns;
use bytes::Bytes;
use std::net::SocketAddr;
use std::sync::Arc;

/// How one pod's outbound connections are handled.
pub struct Outbound {
    pub netns: Arc<PodNetns>,
    pub mark: u32,
    pub stats: Arc<OutboundStats>,
    /// The mesh: the node's proxy state and the source pod. `None`: plaintext only.
    pub mesh: Option<(Arc<ProxyState>, LocalPod)>,
    /// The pod's HTTP connections to endpoints, for requests routed per request
    /// (Services with Gateway API routes).
    pub upstreams: Arc<super::routing::upstream::Upstreams>,
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
        if ob.mesh.as_ref().is_some_and(|(s, _)| s.over_capacity()) {
            super::copy::reset_on_close(&conn);
            tracing::debug!(%peer, "outbound connection refused: the proxy holds its maximum");
            continue;
        }
        let ob = ob.clone();
        let state = ob.mesh.as_ref().map(|(s, _)| s.clone());
        let mut record = ConnRecord::outbound(state, ob.stats.clone());
        tokio::spawn(async move {
            if let Err(e) = forward(conn, &ob, &mut record).await {
                tracing::debug!(%peer, error = %format!("{e:#}"), "outbound connection failed");
                record.fail(&e);
            }
        });
    }
}

#[cfg(any(test, feature = "testing"))]
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
            upstreams: Default::default(),
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
    service: Option<Arc<weft_proto::pb::Service>>,
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

async fn forward(
    conn: tokio::net::TcpStream,
    ob: &Outbound,
    record: &mut ConnRecord,
) -> anyhow::Result<()> {
    let _ = conn.set_nodelay(true);
    let local = conn.local_addr()?;
    let orig = original_dst(&conn, local.is_ipv6())?;
    record.original_destination(orig);
    if super::ports::is_proxy_port(orig.port()) {
        super::copy::reset_on_close(&conn);
        anyhow::bail!("{orig}: the proxy's own port is never a destination");
    }
    let Some((state, source)) = &ob.mesh else {
        let (a, b) = passthrough(conn, ob, orig, record, Bytes::new()).await?;
        record.bytes(a, b);
        return Ok(());
    };
    // A Service with Gateway API routes: each request is routed on its own.
    let mut conn = conn;
    let mut prefix = Bytes::new();
    // Routed only when a route applies to this port for this client's namespace
    // (a route on another port, or a consumer route of another namespace, leaves
    // the connection on the L4 path).
    let routed = {
        let snap = state.config.snapshot();
        snap.service_entry_by_vip(orig.ip())
            .filter(|(k, _)| snap.is_routed(k))
            .map(|(k, s)| (k.clone(), s.clone()))
            .filter(|(k, s)| {
                !state
                    .route_table(k, s, orig.port(), &source.workload().namespace)
                    .is_empty()
            })
    };
    if let Some((service_key, service)) = routed {
        let base = super::routing::forward::Routed {
            state: state.clone(),
            source: source.clone(),
            upstreams: ob.upstreams.clone(),
            service: service.clone(),
            service_key,
            port: orig.port(),
            client: conn.peer_addr().unwrap_or(local),
            h2: false,
            cache: Default::default(),
        };
        record.peers.service = Some(service);
        match super::routing::serve(conn, base).await {
            super::routing::Serve::Done(r) => {
                record.routed();
                return r;
            }
            super::routing::Serve::Opaque(c, p) => {
                conn = c;
                prefix = p;
            }
        }
    }
    let to = resolve(state, orig);
    let dest = state.workload_by_ip(to.dst.ip());
    let meshed = dest
        .as_ref()
        .filter(|w| w.enrolled && !w.spiffe_id.is_empty());
    let source_workload = source.workload();
    let p = &mut record.peers;
    p.source_addr = Some(conn.peer_addr().unwrap_or(local));
    p.destination_addr = Some(to.dst);
    p.source_identity = Some(source_workload.spiffe_id.clone());
    p.destination_identity = meshed.map(|w| w.spiffe_id.clone());
    p.destination_workload = dest.clone();
    p.service = to.service.clone();
    record.open(crate::metrics::traffic::labels(
        "source",
        Some(&source_workload),
        dest.as_deref(),
        meshed.is_some(),
    ));
    let (a, b) = match meshed {
        Some(w) => tunnel(conn, state, source, w, to.dst, record, prefix).await?,
        None => {
            record.plaintext_out();
            passthrough(conn, ob, to.dst, record, prefix).await?
        }
    };
    record.bytes(a, b);
    Ok(())
}

/// An enrolled destination: the bytes go over HBONE (mTLS + HTTP/2 CONNECT).
async fn tunnel(
    mut conn: tokio::net::TcpStream,
    state: &ProxyState,
    source: &LocalPod,
    w: &Arc<weft_proto::pb::Workload>,
    dst: SocketAddr,
    record: &mut ConnRecord,
    prefix: Bytes,
) -> anyhow::Result<(u64, u64)> {
    let dial = Dial {
        source,
        certs: &state.certs,
        config: &state.config,
        mark: state.mark,
    };
    let (mut tunnel, _guard) = state.pool.open(dial, w, dst.ip(), dst).await?;
    record.tunneled();
    if !prefix.is_empty() {
        // Bytes read while finding out the connection is not HTTP (a few dozen at
        // most: within the stream's initial window).
        tunnel.send.send_data(prefix, false)?;
    }
    match super::tunnel::copy(&mut conn, tunnel).await {
        Ok(copied) => Ok(copied),
        Err(e) => {
            // The tunnel was reset (e.g. denied by a policy change): reset the
            // application's connection too instead of a graceful close.
            super::copy::reset_on_close(&conn);
            Err(e.into())
        }
    }
}

async fn passthrough(
    mut conn: tokio::net::TcpStream,
    ob: &Outbound,
    dst: SocketAddr,
    record: &ConnRecord,
    prefix: Bytes,
) -> anyhow::Result<(u64, u64)> {
    let sock = ob.netns.tcp_socket(dst.is_ipv6(), ob.mark).await?;
    let mut up = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(dst)
        .await?;
    record.forwarded();
    if !prefix.is_empty() {
        tokio::io::AsyncWriteExt::write_all(&mut up, &prefix).await?;
    }
    Ok(super::copy::bidirectional(&mut conn, &mut up).await?)
}
