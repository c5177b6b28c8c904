//! Inbound plaintext listener (in-pod :15006): connections from outside the mesh,
//! steered here by the sk_lookup program. The accepted socket keeps the original
//! destination as its local address. Each is authorized as unauthenticated (no
//! principal: principal and namespace rules cannot match it) and, if allowed,
//! forwarded to the application from the pod's own IP, which the sk_lookup program
//! leaves alone.

use super::access_log::{ConnRecord, Verdict};
use crate::netns::PodNetns;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
            let started = Instant::now();
            let r = async {
                let dst = conn.local_addr()?;
                if let Ok(mut l) = stats.last_dst.lock() {
                    *l = Some(dst);
                }
                let mut reg = None;
                let mut l7 = None;
                let mut policy = None;
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
                        tracing::debug!(%peer, %dst, policy = ?d.policy, reason = d.reason, "plaintext connection denied");
                        state.access_log.connection(&plaintext_record(peer, dst, workload, Verdict::Deny(d.policy.as_deref()), Some((0, 0)), Duration::ZERO, Some(d.reason)));
                        // Reset at once (RST, not FIN): SO_LINGER 0 on a non-blocking socket.
                        let _ = socket2::SockRef::from(&conn).set_linger(Some(std::time::Duration::ZERO));
                        return Ok(());
                    }
                    if let Some(plan) = plan {
                        l7 = Some((plan, attrs.clone()));
                    }
                    policy = d.policy;
                    reg = Some(state.conns.register(workload.clone(), attrs));
                }
                let metric = authz.as_ref().map(|(state, workload)| {
                    let src = state.workload_by_ip(peer.ip());
                    let l = super::metrics::labels("destination", src.as_deref(), Some(workload), false);
                    state.metrics.traffic.open(&l);
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
                    let error = r.as_ref().err().map(|e| format!("{e:#}"));
                    state.access_log.connection(&plaintext_record(peer, dst, workload, Verdict::Allow(policy.as_deref()), None, started.elapsed(), error.as_deref()));
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
                if let (Some((state, l)), Some((_, workload))) = (&metric, &authz) {
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
                    let error = match &done {
                        Ok(Some(_)) => None,
                        Ok(None) => Some(super::hbone::CLOSED_BY_POLICY.to_string()),
                        Err(e) => Some(e.to_string()),
                    };
                    let bytes = done.as_ref().ok().copied().flatten();
                    state.access_log.connection(&plaintext_record(peer, dst, workload, Verdict::Allow(policy.as_deref()), bytes, started.elapsed(), error.as_deref()));
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

/// The access log record of a plaintext inbound connection (no peer identity).
fn plaintext_record<'a>(
    peer: SocketAddr,
    dst: SocketAddr,
    workload: &'a weft_api::pb::Workload,
    verdict: Verdict<'a>,
    bytes: Option<(u64, u64)>,
    duration: Duration,
    error: Option<&'a str>,
) -> ConnRecord<'a> {
    ConnRecord {
        reporter: "destination",
        source_addr: peer,
        destination_addr: dst,
        source_identity: "unknown",
        destination_identity: &workload.spiffe_id,
        destination_workload: Some(workload),
        service: None,
        mtls: false,
        verdict,
        bytes,
        duration,
        error,
    }
}
