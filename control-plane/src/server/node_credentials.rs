//! `NodeCredentials.Renew`: a standalone node agent renews its own credential (a
//! client certificate for `spiffe://<td>/_weft/node/<node>`) before it expires, for a
//! key it generated. The caller must hold a valid, unrevoked credential of that node;
//! the new one is issued for the same node and [`Renewer::ttl`].

use super::auth::{NodeAuthenticator, RequestAuth};
use crate::identity::authority::Authority;
use crate::identity::CaError;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tonic::{Request, Response, Status};
use weft_proto::pb::{self, node_credentials_server::NodeCredentials};

pub struct Renewer {
    /// The CA in force (it changes during a rotation).
    pub ca: Arc<Authority>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub metrics: Arc<Metrics>,
    /// Lifetime of renewed credentials; `None` (Kubernetes mode: nodes use
    /// ServiceAccount tokens) refuses renewals.
    pub ttl: Option<Duration>,
}

#[tonic::async_trait]
impl NodeCredentials for Renewer {
    async fn renew(
        &self,
        req: Request<pb::RenewNodeCredentialRequest>,
    ) -> Result<Response<pb::RenewNodeCredentialResponse>, Status> {
        let node = self.auth.authenticate(&RequestAuth::of(&req)).await?;
        let Some(ttl) = self.ttl else {
            return Err(Status::failed_precondition(
                "node credentials are ServiceAccount tokens in Kubernetes mode; nothing to renew",
            ));
        };
        let r = req.into_inner();
        let view = self.ca.view();
        match view.signer.renew_node_credential(&r.csr_der, &node, ttl) {
            Ok(issued) => {
                self.metrics.node_credentials_renewed.inc();
                tracing::info!(%node, serial = %issued.serial_hex, not_after = %humantime::format_rfc3339_seconds(issued.not_after), "renewed a node credential");
                Ok(Response::new(pb::RenewNodeCredentialResponse {
                    cert_chain_pem: issued.chain_pem,
                    trust_bundle_pem: view.bundle_pem.clone(),
                }))
            }
            Err(CaError::Csr(e)) => {
                tracing::warn!(%node, error = %e, "node credential renewal refused");
                Err(match e.reason() {
                    "san_mismatch" => Status::permission_denied(e.to_string()),
                    _ => Status::invalid_argument(e.to_string()),
                })
            }
            Err(e) => {
                tracing::error!(%node, error = %e, "node credential renewal failed");
                Err(Status::internal("the node credential could not be issued"))
            }
        }
    }
}
