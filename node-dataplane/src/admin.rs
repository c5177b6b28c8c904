//! Admin HTTP endpoint on localhost: `/healthz/ready`, `/config_dump`, `/metrics`.
//! The config dump lists certificates with their SPIFFE ID, serial, expiry and PEM
//! chain, never their private keys.

use crate::certs::CertStore;
use crate::config::ConfigStore;
use crate::metrics::Metrics;
use crate::pods::PodMap;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use std::sync::Arc;

#[derive(Clone)]
pub struct AdminState {
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub pods: Option<PodMap>,
    pub proxy: Option<Arc<crate::proxy::state::ProxyState>>,
}

/// The public endpoint (`--metrics-addr`, default :15020): `/metrics` and `/healthz/ready`.
pub fn metrics_router(s: AdminState) -> Router {
    // Readiness too: with hostNetwork, the kubelet probes this public port.
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/ready", get(ready))
        .with_state(s)
}

pub fn router(s: AdminState) -> Router {
    Router::new()
        .route("/healthz/ready", get(ready))
        .route("/config_dump", get(config_dump))
        .route("/metrics", get(metrics))
        .with_state(s)
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if s.config.snapshot().synced {
        (StatusCode::OK, "ready\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "waiting for the first config from the control plane\n",
        )
    }
}

async fn config_dump(State(s): State<AdminState>) -> impl IntoResponse {
    let snap = s.config.snapshot();
    Json(serde_json::json!({
        "node": s.config.node(),
        "synced": snap.synced,
        "workloads": snap.workloads,
        "services": snap.services,
        "policies": snap.policies,
        "plugins": snap.plugins,
        "trust_bundles": snap.trust_bundles,
        "routes": snap.routes,
        "certificates": s.certs.all().iter().map(|c| c.as_ref().clone()).collect::<Vec<_>>(),
        "enrolled_pods": enrolled_pods(&s),
        "proxy": proxy_counters(&s),
    }))
}

fn proxy_counters(s: &AdminState) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(p) = &s.proxy else {
        return serde_json::Value::Null;
    };
    let c = &p.counters;
    serde_json::json!({
        "open_connections": c.open.load(Relaxed),
        "refused_over_capacity": c.over_capacity.load(Relaxed),
        "hbone_out": c.hbone_out.load(Relaxed),
        "hbone_in": c.hbone_in.load(Relaxed),
        "hbone_in_denied": c.hbone_in_denied.load(Relaxed),
        "hbone_refused": c.hbone_refused.load(Relaxed),
        "hbone_refused_source_handshakes": c.hbone_refused_source_handshakes.load(Relaxed),
        "hbone_handshake_timeouts": c.hbone_handshake_timeouts.load(Relaxed),
        "hbone_idle_closed": c.hbone_idle_closed.load(Relaxed),
        "plaintext_out": c.plaintext_out.load(Relaxed),
        "plaintext_in_denied": c.plaintext_in_denied.load(Relaxed),
        "closed_by_policy_change": c.closed_by_policy_change.load(Relaxed),
        "l7_connections": c.l7_connections.load(Relaxed),
        "l7_opaque_denied": c.l7_opaque_denied.load(Relaxed),
        "l7_idle_closed": c.l7_idle_closed.load(Relaxed),
        "l7_ambiguous_host": c.l7_ambiguous_host.load(Relaxed),
        "wasm_plugins": wasm_plugins(p),
        "open_inbound": p.conns.len(),
        "last_hbone_peer_serial": p.last_peer_serial.lock().map(|s| s.clone()).unwrap_or_default(),
        "pools": p.pool.sizes().into_iter().map(|(k, conns, streams)| serde_json::json!({
            "source": k.source_id, "destination": k.dest_id, "node": k.dest_node,
            "connections": conns, "active_streams": streams,
        })).collect::<Vec<_>>(),
    })
}

/// Each Wasm plugin's state: load error, calls, failures, memory.
fn wasm_plugins(p: &crate::proxy::state::ProxyState) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(reg) = &p.plugins else {
        return serde_json::Value::Null;
    };
    let mut v: Vec<serde_json::Value> = reg
        .all()
        .values()
        .map(|pl| {
            let st = &pl.stats;
            serde_json::json!({
                "plugin": pl.id,
                "sha256": pl.spec.sha256,
                "abi": pl.abi().map(|a| format!("{a:?}")),
                "phase": format!("{:?}", pl.phase),
                "priority": pl.priority,
                "fail_strategy": format!("{:?}", pl.fail),
                "load_error": pl.load_error().map(ToString::to_string),
                "calls": st.calls.load(Relaxed),
                "local_replies": st.local_replies.load(Relaxed),
                "skipped": st.skipped.load(Relaxed),
                "failed_requests": st.failed_requests.load(Relaxed),
                "restarts": st.restarts.load(Relaxed),
                "recycled": st.recycled.load(Relaxed),
                "caught_slow": st.caught_slow.load(Relaxed),
                "slow": pl.is_slow(),
                "overloaded": st.overloaded.load(Relaxed),
                "errors": st.errors.lock().map(|e| e.clone()).unwrap_or_default(),
                "last_error": st.last_error.lock().map(|e| e.clone()).unwrap_or_default(),
                "instance_memory_bytes": pl.instance_memory(),
            })
        })
        .collect();
    v.sort_by(|a, b| a["plugin"].as_str().cmp(&b["plugin"].as_str()));
    serde_json::Value::Array(v)
}

fn enrolled_pods(s: &AdminState) -> serde_json::Value {
    use std::sync::atomic::Ordering::Relaxed;
    let Some(pods) = &s.pods else {
        return serde_json::Value::Null;
    };
    let pods = pods.lock().unwrap_or_else(|p| p.into_inner());
    pods.values()
        .map(|p| {
            serde_json::json!({
                "pod": format!("{}/{}", p.sandbox.pod_namespace, p.sandbox.pod_name),
                "workload": p.workload_key,
                "netns": p.sandbox.netns,
                "netns_cookie": p.cookie,
                "ip": p.ip4.map(|ip| ip.to_string()),
                "outbound": {
                    "accepted": p.stats.outbound.accepted.load(Relaxed),
                    "forwarded": p.stats.outbound.forwarded.load(Relaxed),
                    "tunneled": p.stats.outbound.tunneled.load(Relaxed),
                    "failed": p.stats.outbound.failed.load(Relaxed),
                    "last_original_destination": p.stats.outbound.last_orig_dst.lock().ok().and_then(|l| l.map(|a| a.to_string())),
                },
                "inbound_plaintext": {
                    "accepted": p.stats.inbound.accepted.load(Relaxed),
                    "forwarded": p.stats.inbound.forwarded.load(Relaxed),
                    "last_destination": p.stats.inbound.last_dst.lock().ok().and_then(|l| l.map(|a| a.to_string())),
                },
            })
        })
        .collect()
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    if let Some(p) = &s.proxy {
        p.refresh_pool_gauges();
    }
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.encode(),
    )
}
