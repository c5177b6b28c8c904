//! The node agent's side of the Workload API ([`Provider`]): callers are attested
//! by their network namespace (the process's `/proc/<pid>/ns/net` is an enrolled
//! pod's), X.509-SVIDs come from the agent's certificate store (rotations pushed),
//! JWT-SVIDs are signed by the control plane (the same rule as X.509: only for
//! identities of pods on this node), and JWT bundles come with the trust bundle.

use super::{Caller, Claims, JwtBundles, Provider, X509Material};
use crate::certs::{CertStore, WorkloadCert};
use crate::config::ConfigStore;
use crate::control::channel::ControlPlaneTarget;
use crate::pods::PodDataplane;
use futures::future::BoxFuture;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;
use weft_proto::pb;

type Pods = Arc<Mutex<BTreeMap<String, PodDataplane>>>;

pub struct AgentProvider {
    pods: Pods,
    config: Arc<ConfigStore>,
    certs: Arc<CertStore>,
    control_plane: ControlPlaneTarget,
    /// One sender per identity asked for; refreshed when the store changes.
    x509: Mutex<HashMap<String, watch::Sender<Option<X509Material>>>>,
    bundles: watch::Sender<JwtBundles>,
}

impl AgentProvider {
    /// A provider; its background task follows the certificate store and the
    /// configuration (trust bundles) for as long as the provider lives.
    pub fn start(
        pods: Pods,
        config: Arc<ConfigStore>,
        certs: Arc<CertStore>,
        control_plane: ControlPlaneTarget,
    ) -> Arc<Self> {
        let p = Arc::new(Self {
            bundles: watch::channel(jwt_bundles(&config)).0,
            pods,
            config,
            certs,
            control_plane,
            x509: Default::default(),
        });
        let weak = Arc::downgrade(&p);
        let mut certs_changed = p.certs.watch();
        let mut config_changed = p.config.watch();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = certs_changed.changed() => if r.is_err() { return },
                    r = config_changed.changed() => if r.is_err() { return },
                }
                let Some(p) = weak.upgrade() else { return };
                p.refresh();
            }
        });
        p
    }

    fn refresh(&self) {
        let senders = self.x509.lock().unwrap_or_else(|p| p.into_inner());
        for (id, tx) in senders.iter() {
            let now = self.certs.get(id).and_then(|c| material(&c, &self.config));
            tx.send_if_modified(|held| {
                let same = match (held.as_ref(), now.as_ref()) {
                    (Some(a), Some(b)) => {
                        a.chain_der == b.chain_der && a.bundle_der == b.bundle_der
                    }
                    (None, None) => true,
                    _ => false,
                };
                if !same {
                    *held = now.clone();
                }
                !same
            });
        }
        let b = jwt_bundles(&self.config);
        self.bundles.send_if_modified(|held| {
            let changed = *held != b;
            if changed {
                *held = b.clone();
            }
            changed
        });
    }
}

/// A stored certificate as the Workload API sends it (DER), with the trust bundle in
/// force (so a CA rotation reaches applications at once, retirement included);
/// `None` if it does not parse (never sent half).
fn material(c: &WorkloadCert, config: &ConfigStore) -> Option<X509Material> {
    let bundle = config
        .trust_bundle()
        .unwrap_or_else(|| c.trust_bundle_pem.clone());
    let chain_der: Vec<Vec<u8>> = rustls_pemfile::certs(&mut c.chain_pem.as_bytes())
        .map(|r| r.map(|d| d.to_vec()))
        .collect::<Result<_, _>>()
        .ok()?;
    let bundle_der: Vec<Vec<u8>> = rustls_pemfile::certs(&mut bundle.as_bytes())
        .map(|r| r.map(|d| d.to_vec()))
        .collect::<Result<_, _>>()
        .ok()?;
    let key = rustls_pemfile::private_key(&mut c.key_pem.0.as_bytes()).ok()??;
    let key_pkcs8_der = match key {
        rustls::pki_types::PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => return None,
    };
    let trust_domain = weft_proto::spiffe::SpiffeId::parse(&c.spiffe_id)
        .ok()?
        .trust_domain()
        .to_string();
    (!chain_der.is_empty()).then(|| X509Material {
        spiffe_id: c.spiffe_id.clone(),
        chain_der,
        key_pkcs8_der,
        bundle_der,
        trust_domain,
    })
}

/// The JWT bundles of the trust domains the node knows.
fn jwt_bundles(config: &ConfigStore) -> JwtBundles {
    config
        .snapshot()
        .trust_bundles
        .values()
        .filter(|b| !b.jwt_jwks.is_empty())
        .map(|b| (b.trust_domain.clone(), b.jwt_jwks.clone().into_bytes()))
        .collect()
}

impl Provider for AgentProvider {
    fn attest(&self, pid: i32) -> Option<Caller> {
        let inode = super::netns_inode(pid).ok()?;
        let pods = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        pods.values().find_map(|p| {
            if p.netns.inode() != inode {
                return None;
            }
            let w = p.workload.get();
            (w.enrolled && !w.spiffe_id.is_empty()).then(|| Caller {
                spiffe_id: w.spiffe_id.clone(),
                pod: format!("{}/{}", w.namespace, w.name),
            })
        })
    }

    fn x509(&self, spiffe_id: &str) -> watch::Receiver<Option<X509Material>> {
        let mut senders = self.x509.lock().unwrap_or_else(|p| p.into_inner());
        // Identities that left the node (no receiver) are forgotten.
        senders.retain(|_, tx| tx.receiver_count() > 0);
        senders
            .entry(spiffe_id.to_string())
            .or_insert_with(|| {
                watch::channel(
                    self.certs
                        .get(spiffe_id)
                        .and_then(|c| material(&c, &self.config)),
                )
                .0
            })
            .subscribe()
    }

    fn jwt_svid(
        &self,
        spiffe_id: &str,
        audiences: &[String],
    ) -> BoxFuture<'static, Result<String, tonic::Status>> {
        let target = self.control_plane.clone();
        let req = pb::SignJwtRequest {
            spiffe_id: spiffe_id.to_string(),
            audiences: audiences.to_vec(),
        };
        Box::pin(async move {
            let ch = target
                .connect()
                .await
                .map_err(|e| tonic::Status::unavailable(format!("the control plane: {e:#}")))?;
            let mut client = pb::certificates_client::CertificatesClient::new(ch);
            let r = client.sign_jwt(req).await?;
            Ok(r.into_inner().token)
        })
    }

    fn jwt_bundles(&self) -> watch::Receiver<JwtBundles> {
        self.bundles.subscribe()
    }

    fn validate_jwt(&self, token: &str, audience: &str) -> Result<(String, Claims), tonic::Status> {
        let invalid = |m: String| tonic::Status::invalid_argument(m);
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| invalid(format!("not a JWT: {e}")))?;
        let bundles = self.bundles.borrow().clone();
        let mut last = String::from("no JWT bundle holds the token's key");
        for (td, jwks) in &bundles {
            let Ok(set) = serde_json::from_slice::<jsonwebtoken::jwk::JwkSet>(jwks) else {
                continue;
            };
            let keys = set
                .keys
                .iter()
                .filter(|k| match (&header.kid, &k.common.key_id) {
                    (Some(want), Some(have)) => want == have,
                    _ => true,
                });
            for jwk in keys {
                let Ok(key) = jsonwebtoken::DecodingKey::from_jwk(jwk) else {
                    continue;
                };
                let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
                v.set_audience(&[audience]);
                v.set_required_spec_claims(&["exp", "aud", "sub"]);
                match jsonwebtoken::decode::<Claims>(token, &key, &v) {
                    Ok(data) => {
                        let sub = data
                            .claims
                            .get("sub")
                            .and_then(|s| s.as_str())
                            .unwrap_or_default()
                            .to_string();
                        let id = weft_proto::spiffe::SpiffeId::parse(&sub)
                            .map_err(|e| invalid(format!("sub: {e}")))?;
                        if id.trust_domain().as_str() != td.as_str() {
                            return Err(invalid(format!(
                                "sub {sub} is not of trust domain {td}, whose key signed it"
                            )));
                        }
                        return Ok((sub, data.claims));
                    }
                    Err(e) => last = format!("{e}"),
                }
            }
        }
        Err(invalid(format!("the JWT-SVID is not valid: {last}")))
    }
}
