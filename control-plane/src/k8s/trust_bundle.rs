//! The trust bundle as a ConfigMap (`weft-ca-root-cert`, key `root-cert.pem`) in
//! every enrolled namespace and in the control plane's own namespace (node agents
//! mount it there to verify the control plane). Written by the leader with
//! server-side apply when the set of namespaces changes, and re-applied every
//! minute to repair edits and deletions; a CA rotation's bundle is published at once.

use super::leader::LeaderWatch;
use crate::identity::authority::Authority;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_model::Model;

pub const CONFIG_MAP: &str = "weft-ca-root-cert";
pub const KEY: &str = "root-cert.pem";
const CHECK: Duration = Duration::from_secs(1);
const REPAIR: Duration = Duration::from_secs(60);

pub async fn run(
    client: Client,
    model: Arc<Model>,
    own_namespace: String,
    authority: Arc<Authority>,
    mut leader: LeaderWatch,
) {
    let mut published: BTreeSet<String> = BTreeSet::new();
    let mut last_full = Instant::now();
    let mut bundle_pem = authority.bundle_pem();
    loop {
        // A CA rotation changes the bundle: publish it everywhere again.
        let now = authority.bundle_pem();
        if now != bundle_pem {
            bundle_pem = now;
            published.clear();
        }
        if !*leader.borrow() {
            published.clear();
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        if last_full.elapsed() > REPAIR {
            published.clear();
            last_full = Instant::now();
        }
        let mut want: BTreeSet<String> = model.enrolled_namespaces().into_iter().collect();
        want.insert(own_namespace.clone());
        let missing: Vec<String> = want.difference(&published).cloned().collect();
        for ns in &missing {
            match apply(&client, ns, &bundle_pem).await {
                Ok(()) => {
                    published.insert(ns.clone());
                }
                Err(e) => {
                    tracing::warn!(namespace = %ns, error = %e, "publishing the trust bundle failed; will retry")
                }
            }
        }
        // Namespaces that left the mesh keep their copy (pods may still mount it);
        // they are just no longer tracked.
        published.retain(|ns| want.contains(ns));
        tokio::select! {
            _ = tokio::time::sleep(CHECK) => {}
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

async fn apply(client: &Client, ns: &str, bundle_pem: &str) -> Result<(), kube::Error> {
    let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": CONFIG_MAP,
            "labels": { "app.kubernetes.io/part-of": "weft" },
        },
        "data": { KEY: bundle_pem },
    });
    api.patch(
        CONFIG_MAP,
        &PatchParams::apply(super::status::FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await?;
    tracing::debug!(namespace = %ns, "trust bundle published");
    Ok(())
}
