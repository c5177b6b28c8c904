//! Admin HTTP endpoint: `/metrics`, `/healthz/ready`, `/debug/status` (JSON).

use crate::metrics::Metrics;
use crate::server::Sessions;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use std::sync::Arc;
use weft_model::Model;
use weft_proto::resource;

#[derive(Clone)]
pub struct AdminState {
    pub model: Arc<Model>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
    /// True once the source's first complete snapshot is in the model.
    pub ready: tokio::sync::watch::Receiver<bool>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/ready", get(ready))
        .route("/debug/status", get(status))
        .with_state(state)
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    refresh_gauges(&s);
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.encode(),
    )
}

fn refresh_gauges(s: &AdminState) {
    let st = s.model.read_state();
    let mut counts: std::collections::BTreeMap<&str, i64> = Default::default();
    for k in st.entries.keys() {
        *counts.entry(resource::kind_of(k)).or_default() += 1;
    }
    for kind in [
        resource::KIND_WORKLOAD,
        resource::KIND_SERVICE,
        resource::KIND_AUTHZ,
        resource::KIND_PEER_AUTHN,
        resource::KIND_REQUEST_AUTHN,
        resource::KIND_WASM,
        resource::KIND_TRUST_BUNDLE,
    ] {
        s.metrics
            .resources
            .get_or_create(&crate::metrics::KindLabel { kind: kind.into() })
            .set(counts.get(kind).copied().unwrap_or(0));
    }
    drop(st);
    s.metrics
        .source_errors
        .set(s.model.source_errors().len() as i64);
}

async fn ready(State(s): State<AdminState>) -> impl IntoResponse {
    if *s.ready.borrow() {
        (StatusCode::OK, "ready\n")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "config not loaded yet\n")
    }
}

#[derive(Serialize)]
struct Status {
    ready: bool,
    nodes: Vec<crate::server::sessions::NodeSession>,
    source_errors: Vec<String>,
    rejected: Vec<Rejected>,
    /// Objects whose latest version did not parse or validate: their last good
    /// version is still in force.
    stale: Vec<StaleObject>,
    /// Pods of enrolled namespaces given no identity (and so not enrolled).
    not_enrolled: Vec<NotEnrolled>,
    /// Gateway API routes on Services, per parent.
    routes: Vec<RouteEntry>,
}

#[derive(Serialize)]
struct RouteEntry {
    route: String,
    /// `namespace/name[:port]` of the Service parent.
    parent: String,
    accepted: bool,
    accepted_reason: &'static str,
    resolved_refs: bool,
    resolved_refs_reason: &'static str,
    /// Messages of the conditions that are not true.
    problems: Vec<String>,
    /// The latest version is not valid; the last valid one is in force.
    stale: bool,
}

#[derive(Serialize)]
struct StaleObject {
    object: String,
    /// `metadata.generation` of the rejected version, when known.
    generation: Option<i64>,
    /// `field: error` of the rejected version.
    errors: Vec<String>,
    enforced: &'static str,
}

#[derive(Serialize)]
struct NotEnrolled {
    pod: String,
    reason: &'static str,
}

#[derive(Serialize)]
struct Rejected {
    object: String,
    accepted: bool,
    errors: Vec<String>,
    not_enforced: Vec<String>,
    enforced_at_l7: Vec<String>,
}

async fn status(State(s): State<AdminState>) -> impl IntoResponse {
    let rejected = s
        .model
        .statuses()
        .into_iter()
        .filter(|(_, st)| {
            !st.report.errors.is_empty()
                || !st.report.unsupported.is_empty()
                || !st.l7_enforced.is_empty()
        })
        .map(|(r, st)| Rejected {
            object: r.to_string(),
            accepted: st.report.is_valid(),
            errors: st.report.errors.iter().map(ToString::to_string).collect(),
            not_enforced: st
                .report
                .unsupported
                .iter()
                .map(ToString::to_string)
                .collect(),
            enforced_at_l7: st.l7_enforced,
        })
        .collect();
    let stale = s
        .model
        .stale()
        .into_iter()
        .map(|(r, st)| StaleObject {
            object: r.to_string(),
            generation: st.generation,
            errors: st.errors.iter().map(ToString::to_string).collect(),
            enforced: "last good version",
        })
        .collect();
    let not_enrolled = s
        .model
        .refused_pods()
        .into_iter()
        .map(|(pod, reason)| NotEnrolled { pod, reason })
        .collect();
    let routes = s
        .model
        .route_statuses()
        .into_iter()
        .flat_map(|(r, (st, stale))| {
            st.parents.into_iter().map(move |p| RouteEntry {
                route: r.to_string(),
                parent: match p.port {
                    Some(port) => format!("{}/{}:{port}", p.service_namespace, p.service_name),
                    None => format!("{}/{}", p.service_namespace, p.service_name),
                },
                accepted: p.accepted.status,
                accepted_reason: p.accepted.reason,
                resolved_refs: p.resolved_refs.status,
                resolved_refs_reason: p.resolved_refs.reason,
                problems: [&p.accepted, &p.resolved_refs]
                    .into_iter()
                    .filter(|c| !c.status)
                    .map(|c| c.message.clone())
                    .collect(),
                stale: stale.is_some(),
            })
        })
        .collect();
    Json(Status {
        ready: *s.ready.borrow(),
        stale,
        not_enrolled,
        routes,
        nodes: s.sessions.list(),
        source_errors: s
            .model
            .source_errors()
            .iter()
            .map(ToString::to_string)
            .collect(),
        rejected,
    })
}
