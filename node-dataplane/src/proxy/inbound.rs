//! Inbound plaintext listener (in-pod :15006): connections from outside the mesh,
//! steered here by the sk_lookup program. The accepted socket keeps the original
//! destination as its local address. Each is authorized as unauthenticated (no
//! principal: principal and namespace rules cannot match it) and, if allowed,
//! forwarded to the application from the pod's own IP, which the sk_lookup program
//! leaves alone.

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
    authz: Option<(Arc<super::state::ProxyState>, Arc<weft_api::pb::Workload>)>,
) {
    loop {
        let Ok((mut conn, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        stats.accepted.fetch_add(1, Ordering::Relaxed);
        let netns = netns.clone();
        let stats = stats.clone();
        let authz = authz.clone();
        tokio::spawn(async move {
            let r = async {
                let dst = conn.local_addr()?;
                if let Ok(mut l) = stats.last_dst.lock() {
                    *l = Some(dst);
                }
                let mut reg = None;
                let mut l7 = None;
                if let Some((state, workload)) = &authz {
                    let plan = state.l7_plan(workload, dst.port());
                    let attrs = weft_api::authz::Attributes {
                        source_ip: Some(peer.ip()),
                        destination_ip: Some(dst.ip()),
                        destination_port: dst.port(),
                        principal: None,
                        request: None,
                        l7_pending: plan.as_ref().is_some_and(super::l7::L7Plan::parses_http),
                    };
                    let d = state.authorize(workload, &attrs);
                    if !d.allowed {
                        state.counters.plaintext_in_denied.fetch_add(1, Ordering::Relaxed);
                        tracing::info!(%peer, %dst, policy = ?d.policy, reason = d.reason, "plaintext connection denied");
                        // Reset at once (RST, not FIN): SO_LINGER 0 on a non-blocking socket.
                        let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
                        return Ok(());
                    }
                    if let Some(plan) = plan {
                        l7 = Some((plan, attrs.clone()));
                    }
                    reg = Some(state.conns.register(workload.clone(), attrs));
                }
                let metric = authz.as_ref().map(|(state, workload)| {
                    let src = state.workload_by_ip(peer.ip());
                    let l = super::metrics::labels("destination", src.as_deref(), Some(workload), false);
                    state.metrics.traffic.opened.get_or_create(&l).inc();
                    (state.clone(), l)
                });
                if let (Some((plan, attrs)), Some((state, workload)), Some((_, l))) = (l7, &authz, &metric) {
                    state.counters.l7_connections.fetch_add(1, Ordering::Relaxed);
                    let local = super::state::LocalPod { workload: workload.clone(), netns: netns.clone() };
                    let ctx = super::l7::ConnCtx::new(state.clone(), local, dst, peer, attrs, None, plan, l.clone());
                    stats.forwarded.fetch_add(1, Ordering::Relaxed);
                    let r = tokio::select! {
                        r = super::l7::serve(conn, ctx) => r,
                        _ = async { match &reg { Some(r) => r.cancel.cancelled().await, None => std::future::pending().await } } => Ok(()),
                    };
                    let t = &state.metrics.traffic;
                    t.closed.get_or_create(l).inc();
                    if r.is_err() {
                        t.failed.get_or_create(l).inc();
                    }
                    return r;
                }
                let sock = netns.tcp_socket(dst.is_ipv6(), mark).await?;
                let mut up = tokio::net::TcpSocket::from_std_stream(sock.into())
                    .connect(dst)
                    .await?;
                stats.forwarded.fetch_add(1, Ordering::Relaxed);
                let cancelled = async {
                    match &reg {
                        Some(r) => r.cancel.cancelled().await,
                        None => std::future::pending().await,
                    }
                };
                let done = tokio::select! {
                    r = super::copy::bidirectional(&mut conn, &mut up) => r.map(Some),
                    _ = cancelled => {
                        // Denied by a policy change: reset both sides.
                        let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
                        let _ = socket2::SockRef::from(&up).set_linger(Some(std::time::Duration::ZERO));
                        Ok(None)
                    }
                };
                if let Some((state, l)) = &metric {
                    let t = &state.metrics.traffic;
                    t.closed.get_or_create(l).inc();
                    match &done {
                        Ok(Some((a, b))) => {
                            t.sent.get_or_create(l).inc_by(*a);
                            t.received.get_or_create(l).inc_by(*b);
                        }
                        _ => {
                            t.failed.get_or_create(l).inc();
                        }
                    }
                }
                done.map(|_| ()).map_err(anyhow::Error::from)
            }
            .await;
            if let Err(e) = r {
                stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::debug!(%peer, error = %e, "inbound plaintext connection failed");
            }
        });
    }
}
