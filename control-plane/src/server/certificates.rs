//! `Certificates.Sign` and `Certificates.SignJwt`: X.509-SVIDs and JWT-SVIDs for
//! node agents, under the same-node rule.

use super::auth::{NodeAuthenticator, RequestAuth};
use crate::identity::authority::Authority;
use crate::identity::{CaError, JwtError, JwtSigner};
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::SystemTime;
use tonic::{Request, Response, Status};
use weft_model::Model;
use weft_proto::pb::{self, certificates_server::Certificates};
use weft_proto::spiffe::SpiffeId;

pub struct Signer {
    /// The CA in force (it changes during a rotation).
    pub ca: Arc<Authority>,
    pub jwt: Arc<JwtSigner>,
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

    /// The checks both RPCs share: the caller is an authenticated node agent, the
    /// configuration is loaded, `spiffe_id` parses, and an enrolled workload with that
    /// identity is scheduled on the caller's node. Returns the node and the ID.
    async fn admit(
        &self,
        auth: &RequestAuth,
        spiffe_id: &str,
    ) -> Result<(String, SpiffeId), Status> {
        let node = match self.auth.authenticate(auth).await {
            Ok(n) => n,
            Err(s) => {
                self.metrics.refuse("unauthenticated");
                return Err(s);
            }
        };
        if !*self.ready.borrow() {
            return Err(self.refuse(
                &node,
                spiffe_id,
                "not_ready",
                Status::unavailable("the control plane is still loading its configuration"),
            ));
        }
        let id = SpiffeId::parse(spiffe_id).map_err(|e| {
            self.refuse(
                &node,
                spiffe_id,
                "invalid_id",
                Status::invalid_argument(format!("spiffe_id: {e}")),
            )
        })?;
        if !self.model.node_runs_identity(&node, spiffe_id) {
            return Err(self.refuse(
                &node,
                spiffe_id,
                "not_on_node",
                Status::permission_denied(format!(
                    "node {node:?} runs no enrolled workload with identity {spiffe_id}"
                )),
            ));
        }
        Ok((node, id))
    }
}

#[tonic::async_trait]
impl Certificates for Signer {
    async fn sign(
        &self,
        req: Request<pb::SignRequest>,
    ) -> Result<Response<pb::SignResponse>, Status> {
        let auth = RequestAuth::of(&req);
        let r = req.into_inner();
        let (node, id) = self.admit(&auth, &r.spiffe_id).await?;
        let view = self.ca.view();
        match view.signer.sign_svid(&r.csr_der, &id) {
            Ok(issued) => {
                self.metrics.certs_signed.inc();
                tracing::debug!(%node, identity = %id, serial = %issued.serial_hex, "signed SVID");
                Ok(Response::new(pb::SignResponse {
                    cert_chain_pem: issued.chain_pem,
                    trust_bundle_pem: view.bundle_pem.clone(),
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

    async fn sign_jwt(
        &self,
        req: Request<pb::SignJwtRequest>,
    ) -> Result<Response<pb::SignJwtResponse>, Status> {
        let auth = RequestAuth::of(&req);
        let r = req.into_inner();
        let (node, id) = self.admit(&auth, &r.spiffe_id).await?;
        match self.jwt.sign(&id, &r.audiences, SystemTime::now()) {
            Ok((token, expires_at)) => {
                tracing::debug!(%node, identity = %id, audiences = ?r.audiences, expires_at, "signed JWT-SVID");
                Ok(Response::new(pb::SignJwtResponse { token, expires_at }))
            }
            Err(JwtError::Audience(m)) => Err(self.refuse(
                &node,
                &r.spiffe_id,
                "invalid_audience",
                Status::invalid_argument(format!("audiences: {m}")),
            )),
            Err(JwtError::Identity(id, msg)) => Err(self.refuse(
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
    use crate::identity::jwt::DEFAULT_TTL;
    use crate::identity::tests::{csr_for, opts, p256, WEB};
    use crate::identity::Ca;
    use crate::server::auth::RequestAuth;
    use jsonwebtoken::jwk::JwkSet;
    use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
    use weft_model::manifest::parse_manifests;
    use weft_model::{ModelConfig, SourceEvent};

    struct NodeA;

    #[tonic::async_trait]
    impl NodeAuthenticator for NodeA {
        async fn authenticate(&self, _: &RequestAuth) -> Result<String, Status> {
            Ok("node-a".into())
        }
    }

    /// The bearer token is the node's name; no token: unauthenticated.
    struct BearerIsNode;

    #[tonic::async_trait]
    impl NodeAuthenticator for BearerIsNode {
        async fn authenticate(&self, a: &RequestAuth) -> Result<String, Status> {
            a.bearer
                .clone()
                .ok_or_else(|| Status::unauthenticated("no token"))
        }
    }

    /// `web-1` (identity WEB) runs on node-a.
    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.0.1.5}
"#;

    struct Fixture {
        _dir: tempfile::TempDir,
        signer: Signer,
        model: Arc<Model>,
        metrics: Arc<Metrics>,
        ready_tx: tokio::sync::watch::Sender<bool>,
    }

    fn fixture(auth: Arc<dyn NodeAuthenticator>) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca = Arc::new(Ca::load_or_create(&opts(dir.path())).unwrap());
        let jwt = Arc::new(JwtSigner::load_or_create(&opts(dir.path()), DEFAULT_TTL).unwrap());
        let model = Model::new(
            ModelConfig {
                trust_domain: ca.trust_domain().clone(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: String::new(),
                jwt_jwks: jwt.jwks(),
                default_identity_fallback: false,
            },
            Arc::new(weft_model::modules::Offline),
        );
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let metrics = Arc::new(Metrics::new());
        let signer = Signer {
            ca: crate::identity::authority::Authority::new(
                crate::identity::authority::View::stable(ca),
            ),
            jwt,
            model: model.clone(),
            auth,
            metrics: metrics.clone(),
            ready,
        };
        Fixture {
            _dir: dir,
            signer,
            model,
            metrics,
            ready_tx,
        }
    }

    fn load(f: &Fixture) {
        let (objs, errs) = parse_manifests("t.yaml", SHOP);
        assert!(errs.is_empty(), "{errs:?}");
        f.model.apply(SourceEvent::Snapshot(objs));
        f.ready_tx.send_replace(true);
    }

    fn refusals(f: &Fixture, reason: &str) -> String {
        let text = f.metrics.encode();
        let prefix = format!("weft_cp_certificate_refusals_total{{reason=\"{reason}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(prefix.as_str()))
            .unwrap_or("absent")
            .to_string()
    }

    /// Before the first complete snapshot the same-node rule cannot be decided: the
    /// request is answered `Unavailable` (retry), not refused for good.
    #[tokio::test]
    async fn nothing_is_signed_before_the_first_complete_snapshot() {
        let f = fixture(Arc::new(NodeA));
        let req = || {
            Request::new(pb::SignRequest {
                spiffe_id: WEB.into(),
                csr_der: csr_for(&[WEB], &p256()),
            })
        };
        let err = f.signer.sign(req()).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert_eq!(refusals(&f, "not_ready"), "1");
        let jwt_req = Request::new(pb::SignJwtRequest {
            spiffe_id: WEB.into(),
            audiences: vec!["a".into()],
        });
        let err = f.signer.sign_jwt(jwt_req).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unavailable, "{err}");
        assert_eq!(refusals(&f, "not_ready"), "2");

        load(&f);
        let ok = f.signer.sign(req()).await.unwrap().into_inner();
        assert!(ok.cert_chain_pem.contains("BEGIN CERTIFICATE"));
    }

    fn jwt_request(
        node: Option<&str>,
        id: &str,
        audiences: &[&str],
    ) -> Request<pb::SignJwtRequest> {
        let mut r = Request::new(pb::SignJwtRequest {
            spiffe_id: id.into(),
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
        });
        if let Some(n) = node {
            r.metadata_mut()
                .insert("authorization", format!("Bearer {n}").parse().unwrap());
        }
        r
    }

    /// SignJwt follows Sign's rule: only the node an enrolled workload with the
    /// identity runs on gets its token; the token verifies with the TrustBundle's JWKS.
    #[tokio::test]
    async fn sign_jwt_only_for_the_node_that_runs_the_identity() {
        let f = fixture(Arc::new(BearerIsNode));
        load(&f);

        let ok = f
            .signer
            .sign_jwt(jwt_request(Some("node-a"), WEB, &["svc-a"]))
            .await
            .unwrap()
            .into_inner();
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!(
            (now + 299..=now + 300).contains(&ok.expires_at),
            "{}",
            ok.expires_at
        );

        // Verified with the JWKS the TrustBundle resource carries.
        let jwks = {
            let st = f.model.read_state();
            let tb = st
                .entries
                .values()
                .find_map(|e| match &e.resource.kind {
                    Some(pb::resource::Kind::TrustBundle(tb)) => Some(tb.clone()),
                    _ => None,
                })
                .unwrap();
            tb.jwt_jwks
        };
        assert_eq!(jwks, f.signer.jwt.jwks());
        let set: JwkSet = serde_json::from_str(&jwks).unwrap();
        let key = DecodingKey::from_jwk(&set.keys[0]).unwrap();
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(&["svc-a"]);
        let data = decode::<serde_json::Value>(ok.token.as_bytes(), &key, &v).unwrap();
        assert_eq!(data.claims["sub"], WEB);
        assert_eq!(data.claims["exp"], ok.expires_at);

        // Another node: denied, counted as Sign's refusals are.
        let err = f
            .signer
            .sign_jwt(jwt_request(Some("node-b"), WEB, &["svc-a"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(
            err.message()
                .contains("node \"node-b\" runs no enrolled workload"),
            "{err}"
        );
        assert_eq!(refusals(&f, "not_on_node"), "1");

        // An identity nothing runs with, on the right node: denied too.
        let err = f
            .signer
            .sign_jwt(jwt_request(
                Some("node-a"),
                "spiffe://cluster.local/ns/shop/sa/db",
                &["svc-a"],
            ))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert_eq!(refusals(&f, "not_on_node"), "2");

        // No credential at all.
        let err = f
            .signer
            .sign_jwt(jwt_request(None, WEB, &["svc-a"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert_eq!(refusals(&f, "unauthenticated"), "1");

        // Malformed ID and bad audiences: invalid arguments.
        let err = f
            .signer
            .sign_jwt(jwt_request(Some("node-a"), "web", &["svc-a"]))
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        assert_eq!(refusals(&f, "invalid_id"), "1");
        for auds in [&[][..], &[""][..]] {
            let err = f
                .signer
                .sign_jwt(jwt_request(Some("node-a"), WEB, auds))
                .await
                .unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err}");
        }
        assert_eq!(refusals(&f, "invalid_audience"), "2");
    }
}
