//! Who is calling: every node agent authenticates with its own credential, and
//! every RPC is bound to the node that credential names.

use super::revocation::{NodeCredential, Revocations};
use crate::identity::NODE_ID_PREFIX;
use std::sync::Arc;
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
    /// The client's address (failed authentications are limited per source).
    pub remote: Option<std::net::IpAddr>,
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
            remote: req.remote_addr().map(|a| a.ip()),
        }
    }
}

/// Standalone mode: node credentials are client certificates issued by the mesh CA
/// (`weft-control-plane node-credential`, renewed by the agent) with the single URI
/// SAN `spiffe://<td>/_weft/node/<node>`. The TLS layer has already verified the
/// chain and the validity period; a credential in the revocation list is refused.
pub struct CertNodeAuthenticator {
    pub trust_domain: TrustDomain,
    pub revocations: Arc<Revocations>,
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
        let node = node_from_cert(&certs[0], &self.trust_domain).inspect_err(|s| {
            tracing::warn!(source = ?meta.remote, error = %s.message(), "node credential refused")
        })?;
        let cred = NodeCredential::parse(&certs[0], &node)
            .map_err(|e| Status::unauthenticated(format!("client certificate: {e}")))?;
        if let Err(why) = self.revocations.check(&cred) {
            tracing::warn!(%node, serial = %cred.serial, source = ?meta.remote, %why, "revoked node credential refused");
            return Err(Status::unauthenticated(
                "this node credential has been revoked",
            ));
        }
        Ok(node)
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
                tonic::Code::ResourceExhausted => "rate_limited",
                _ => "unavailable",
            };
            self.metrics
                .node_auth_refusals
                .get_or_create(&crate::metrics::ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
            // The authenticators log what they decided (once per decision, not per
            // cached or rate-limited repeat, so a flood does not flood the log).
            tracing::debug!(error = %s.message(), "node agent request refused");
        }
        r
    }
}

#[cfg(test)]
mod tests {
    use super::{node_from_cert, CertNodeAuthenticator, NodeAuthenticator, RequestAuth};
    use crate::identity::tests::{csr_for, der_chain, opts, p256, WEB};
    use crate::identity::Ca;
    use crate::server::revocation::{self, Revocation, Revocations};
    use std::sync::Arc;
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

    #[tokio::test]
    async fn a_revoked_node_credential_is_refused_and_a_new_one_is_not() {
        use std::time::SystemTime;
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
        let path = dir.path().join(revocation::FILE_NAME);
        let revocations =
            Revocations::load(path.clone(), Arc::new(crate::metrics::Metrics::new())).unwrap();
        let auth = CertNodeAuthenticator {
            trust_domain: ca.trust_domain().clone(),
            revocations: revocations.clone(),
        };
        let request = |node: &str| {
            let (c, _) = ca
                .issue_node_credential(node, Duration::from_secs(3600))
                .unwrap();
            RequestAuth {
                peer_certs: Some(Arc::new(vec![der_chain(&c.chain_pem).remove(0).into()])),
                bearer: None,
                remote: None,
            }
        };
        let (old, other) = (request("node-a"), request("node-b"));
        assert_eq!(auth.authenticate(&old).await.unwrap(), "node-a");
        revocation::append(
            &path,
            Revocation {
                node: Some("node-a".into()),
                serial: None,
                revoked_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                reason: Some("test".into()),
            },
        )
        .unwrap();
        assert!(revocations.reload());
        let e = auth.authenticate(&old).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
        assert!(e.message().contains("revoked"), "{e:?}");
        assert_eq!(auth.authenticate(&other).await.unwrap(), "node-b");
        // A credential issued after the revocation's second is not affected.
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(
            auth.authenticate(&request("node-a")).await.unwrap(),
            "node-a"
        );
    }
}
