//! Admin HTTP endpoint: `/metrics`, `/healthz/ready`, `/debug/status` (JSON), and
//! `/jwks.json`: the public keys JWT-SVIDs are signed with, for verifiers outside
//! the mesh.

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
    /// The JWT-SVID signing keys' JWKS (JSON, public keys only).
    pub jwks: Arc<str>,
    /// The CA in force and any rotation under way.
    pub rotation: Option<Arc<crate::rotation::Rotation>>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz/ready", get(ready))
        .route("/debug/status", get(status))
        .route("/jwks.json", get(jwks))
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

async fn jwks(State(s): State<AdminState>) -> impl IntoResponse {
    ([("content-type", "application/json")], s.jwks.to_string())
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
    /// The CA in force and where a rotation stands.
    ca: Option<crate::rotation::RotationStatus>,
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
    let ca = match &s.rotation {
        Some(r) => Some(r.status().await),
        None => None,
    };
    Json(Status {
        ready: *s.ready.borrow(),
        ca,
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

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_model::ModelConfig;
    use weft_proto::spiffe::TrustDomain;

    #[tokio::test]
    async fn jwks_json_serves_the_public_key_set() {
        let jwks = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"x","y":"y","kid":"k","alg":"ES256","use":"sig"}]}"#;
        let model = Model::new(
            ModelConfig {
                trust_domain: TrustDomain::new("cluster.local").unwrap(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: String::new(),
                jwt_jwks: jwks.into(),
                default_identity_fallback: false,
            },
            Arc::new(weft_model::modules::Offline),
        );
        let (_ready_tx, ready) = tokio::sync::watch::channel(false);
        let app = router(AdminState {
            model,
            metrics: Arc::new(Metrics::new()),
            sessions: Arc::new(Sessions::default()),
            ready,
            jwks: jwks.into(),
            rotation: None,
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        conn.write_all(b"GET /jwks.json HTTP/1.1\r\nHost: cp\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut resp = String::new();
        tokio::time::timeout(
            std::time::Duration::from_secs(10),
            conn.read_to_string(&mut resp),
        )
        .await
        .unwrap()
        .unwrap();
        server.abort();
        let (head, body) = resp.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert!(
            head.to_ascii_lowercase()
                .contains("content-type: application/json"),
            "{head}"
        );
        assert_eq!(body, jwks);
    }
}
