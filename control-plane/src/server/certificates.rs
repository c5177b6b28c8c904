//! `Certificates.Sign`: X.509-SVIDs for node agents, under the same-node rule.

use super::auth::{NodeAuthenticator, RequestAuth};
use crate::identity::{Ca, CaError};
use crate::metrics::Metrics;
use std::sync::Arc;
use tonic::{Request, Response, Status};
use weft_model::Model;
use weft_proto::pb::{self, certificates_server::Certificates};
use weft_proto::spiffe::SpiffeId;

pub struct Signer {
    pub ca: Arc<Ca>,
    pub model: Arc<Model>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub metrics: Arc<Metrics>,
    /// True once the model holds the source's first complete snapshot: before, the
    /// same-node rule cannot be decided, so requests are answered `Unavailable` (the
    /// node retries and keeps its current certificates).
    pub ready: tokio::sync::watch::Receiver<bool>,
}

impl Signer {
    fn refuse(&self, node: &str, identity: &str, reason: &str, status: Status) -> Status {
        tracing::warn!(%node, %identity, %reason, message = %status.message(), "certificate request refused");
        self.metrics.refuse(reason);
        status
    }
}

#[tonic::async_trait]
impl Certificates for Signer {
    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let node = match self.auth.authenticate(&RequestAuth::of(&req)).await {
            Ok(n) => n,
            Err(s) => {
                self.metrics.refuse("unauthenticated");
                return Err(s);
            }
        };
        let r = req.into_inner();
        if !*self.ready.borrow() {
            return Err(self.refuse(
                &node,
                &r.spiffe_id,
                "not_ready",
                Status::unavailable("the control plane is still loading its configuration"),
            ));
        }
        let id = SpiffeId::parse(&r.spiffe_id).map_err(|e| {
            self.refuse(
                &node,
                &r.spiffe_id,
                "invalid_id",
                Status::invalid_argument(format!("spiffe_id: {e}")),
            )
        })?;
        if !self.model.node_runs_identity(&node, &r.spiffe_id) {
            return Err(self.refuse(
                &node,
                &r.spiffe_id,
                "not_on_node",
                Status::permission_denied(format!(
                    "node {node:?} runs no enrolled workload with identity {}",
                    r.spiffe_id
                )),
            ));
        }
        match self.ca.sign_svid(&r.csr_der, &id) {
            Ok(issued) => {
                self.metrics.certs_signed.inc();
                tracing::debug!(%node, identity = %id, serial = %issued.serial_hex, "signed SVID");
                Ok(Response::new(pb::SignResponse {
                    cert_chain_pem: issued.chain_pem,
                    trust_bundle_pem: self.ca.bundle_pem().to_string(),
                }))
            }
            Err(CaError::Csr(e)) => {
                let status = match e.reason() {
                    "san_mismatch" => Status::permission_denied(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                };
                Err(self.refuse(&node, &r.spiffe_id, e.reason(), status))
            }
            Err(CaError::Identity(id, msg)) => Err(self.refuse(
                &node,
                &id,
                "wrong_identity",
                Status::permission_denied(format!("{id}: {msg}")),
            )),
            Err(e) => Err(self.refuse(
                &node,
                &r.spiffe_id,
                "internal",
                Status::internal(e.to_string()),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{csr_for, opts, p256, WEB};
    use crate::server::auth::RequestAuth;
    use weft_model::manifest::parse_manifests;
    use weft_model::{ModelConfig, SourceEvent};

    struct NodeA;

    #[tonic::async_trait]
    impl NodeAuthenticator for NodeA {
        async fn authenticate(&self, _: &RequestAuth) -> Result<String, Status> {
            Ok("node-a".into())
        }
    }

    /// Before the first complete snapshot the same-node rule cannot be decided: the
    /// request is answered `Unavailable` (retry), not refused for good.
    #[tokio::test]
    async fn nothing_is_signed_before_the_first_complete_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(&opts(dir.path())).unwrap());
        let model = Model::new(
            ModelConfig {
                trust_domain: ca.trust_domain().clone(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: String::new(),
                default_identity_fallback: false,
            },
            Arc::new(weft_model::modules::Offline),
        );
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let signer = Signer {
            ca,
            model: model.clone(),
            auth: Arc::new(NodeA),
            metrics: metrics.clone(),
            ready,
        };
        let req = || {
            Request::new(pb::SignRequest {
                spiffe_id: WEB.into(),
                csr_der: csr_for(&[WEB], &p256()),
            })
        };
        let err = signer.sign(req()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert!(metrics
            .encode()
            .contains("weft_cp_certificate_refusals_total{reason=\"not_ready\"} 1"));

        let (objs, errs) = parse_manifests(
            "t.yaml",
            r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.0.1.5}
"#,
        );
        assert!(errs.is_empty(), "{errs:?}");
        model.apply(SourceEvent::Snapshot(objs));
        ready_tx.send_replace(true);
        let ok = signer.sign(req()).await.unwrap().into_inner();
        assert!(ok.cert_chain_pem.contains("BEGIN CERTIFICATE"));
    }
}
