//! Who is calling: every node agent authenticates with its own credential, and
//! every RPC is bound to the node that credential names.

use crate::identity::NODE_ID_PREFIX;
use tonic::Status;
use weft_proto::spiffe::{SpiffeId, TrustDomain};

/// Maps an authenticated request to the node it speaks for.
#[tonic::async_trait]
pub trait NodeAuthenticator: Send + Sync + 'static {
    async fn authenticate(&self, meta: &RequestAuth) -> Result<String, Status>;
}

/// What authentication may look at, taken from a request before it is consumed.
pub struct RequestAuth {
    pub peer_certs: Option<std::sync::Arc<Vec<tonic::transport::CertificateDer<'static>>>>,
    pub bearer: Option<String>,
}

impl RequestAuth {
    pub fn of<T>(req: &tonic::Request<T>) -> Self {
        let bearer = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::to_owned);
        Self {
            peer_certs: req.peer_certs(),
            bearer,
        }
    }
}

/// Standalone mode: node credentials are client certificates issued by the mesh CA
/// (`weft-control-plane node-credential`) with the single URI SAN
/// `spiffe://<td>/_weft/node/<node>`. The TLS layer has already verified the chain.
pub struct CertNodeAuthenticator {
    pub trust_domain: TrustDomain,
}

#[tonic::async_trait]
impl NodeAuthenticator for CertNodeAuthenticator {
    async fn authenticate(&self, meta: &RequestAuth) -> Result<String, Status> {
        let certs = meta
            .peer_certs
            .as_ref()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| {
                Status::unauthenticated("a node credential (client certificate) is required")
            })?;
        node_from_cert(&certs[0], &self.trust_domain)
    }
}

/// Extracts the node name from a node credential certificate.
pub fn node_from_cert(der: &[u8], td: &TrustDomain) -> Result<String, Status> {
    let uri = weft_proto::x509::single_uri_san(der)
        .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
    let uri = uri.as_str();
    let id = SpiffeId::parse(uri)
        .map_err(|e| Status::unauthenticated(format!("client certificate SAN: {e}")))?;
    if id.trust_domain() != td {
        return Err(Status::unauthenticated(format!(
            "client certificate is from trust domain {}, not {td}",
            id.trust_domain()
        )));
    }
    id.path()
        .strip_prefix(NODE_ID_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .map(str::to_owned)
        .ok_or_else(|| Status::permission_denied(format!("{id} is not a node credential")))
}

/// Counts refusals (by gRPC code) of the authenticator it wraps.
pub struct Metered {
    pub inner: std::sync::Arc<dyn NodeAuthenticator>,
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
}

#[tonic::async_trait]
impl NodeAuthenticator for Metered {
    async fn authenticate(&self, meta: &RequestAuth) -> Result<String, Status> {
        let r = self.inner.authenticate(meta).await;
        if let Err(s) = &r {
            let reason = match s.code() {
                tonic::Code::Unauthenticated => "unauthenticated",
                tonic::Code::PermissionDenied => "permission_denied",
                _ => "unavailable",
            };
            self.metrics
                .node_auth_refusals
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
            tracing::warn!(error = %s.message(), "node agent request refused");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::node_from_cert;
    use crate::identity::tests::{csr_for, der_chain, opts, p256, WEB};
    use crate::identity::Ca;
    use std::time::Duration;
    use weft_proto::spiffe::SpiffeId;

    #[test]
    fn a_node_credential_names_its_node_and_a_workload_svid_is_none() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
        let (c, _key) = ca
            .issue_node_credential("node-a", Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            node_from_cert(&der_chain(&c.chain_pem)[0], ca.trust_domain()).unwrap(),
            "node-a"
        );
        let svid = ca
            .sign_svid(&csr_for(&[WEB], &p256()), &SpiffeId::parse(WEB).unwrap())
            .unwrap();
        let s = node_from_cert(&der_chain(&svid.chain_pem)[0], ca.trust_domain()).unwrap_err();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
    }
}
