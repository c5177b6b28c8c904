//! Admin HTTP endpoint on localhost: `/healthz/ready`, `/config_dump`, `/metrics`.
//! The config dump lists certificates with their SPIFFE ID, serial, expiry and PEM
//! chain, never their private keys.

use crate::certs::CertStore;
use crate::config::ConfigStore;
use crate::metrics::Metrics;
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
        "certificates": s.certs.all().iter().map(|c| c.as_ref().clone()).collect::<Vec<_>>(),
    }))
}

async fn metrics(State(s): State<AdminState>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.encode(),
    )
}
