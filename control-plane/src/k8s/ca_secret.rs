//! The CA in Kubernetes mode lives in a Secret in the control plane's namespace, so
//! every replica signs with the same key and a restart keeps the trust root.
//!
//! Keys: `ca.crt` (signing certificate, followed by any intermediates above it),
//! `ca.key` (its PEM key) and, when `ca.crt` is an intermediate, `root-cert.pem`
//! (the roots nodes trust). A user who brings their own (intermediate) CA creates
//! the Secret before installing; otherwise the leader creates a self-signed root.
//! Followers wait until the Secret exists.

use super::leader::LeaderWatch;
use crate::identity::{ca::new_root, Ca, CaError};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::collections::BTreeMap;
use std::time::Duration;
use weft_proto::spiffe::TrustDomain;

pub const KEY_CERT: &str = "ca.crt";
pub const KEY_KEY: &str = "ca.key";
pub const KEY_ROOTS: &str = "root-cert.pem";

#[derive(Debug, thiserror::Error)]
pub enum CaSecretError {
    #[error("Secret {namespace}/{name}: key {key:?} is missing")]
    MissingKey {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: key {key:?} is not UTF-8 PEM")]
    NotText {
        namespace: String,
        name: String,
        key: &'static str,
    },
    #[error("Secret {namespace}/{name}: {source}")]
    Ca {
        namespace: String,
        name: String,
        source: CaError,
    },
    #[error("Secret {namespace}/{name}: {source}")]
    Api {
        namespace: String,
        name: String,
        source: kube::Error,
    },
}

pub struct CaSecret {
    pub api: Api<Secret>,
    pub namespace: String,
    pub name: String,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
}

impl CaSecret {
    pub fn new(
        client: Client,
        namespace: &str,
        name: &str,
        trust_domain: TrustDomain,
        svid_ttl: Duration,
    ) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            namespace: namespace.to_string(),
            name: name.to_string(),
            trust_domain,
            svid_ttl,
        }
    }

    /// Loads the CA, creating the Secret first when this replica leads and it is
    /// absent. A Secret that exists but is unusable is an error (never overwritten).
    pub async fn load_or_create(&self, mut leader: LeaderWatch) -> Result<Ca, CaSecretError> {
        let mut waited = false;
        loop {
            match self.api.get_opt(&self.name).await {
                Ok(Some(secret)) => return self.parse(&secret),
                Ok(None) if *leader.borrow() => match self.create().await {
                    Ok(()) => continue,
                    Err(CaSecretError::Api {
                        source: kube::Error::Api(s),
                        ..
                    }) if s.code == 409 => continue,
                    Err(e) => return Err(e),
                },
                Ok(None) => {
                    if !waited {
                        tracing::info!(secret = %format!("{}/{}", self.namespace, self.name), "waiting for the leader to create the CA Secret");
                        waited = true;
                    }
                }
                Err(e) => {
                    tracing::warn!(secret = %format!("{}/{}", self.namespace, self.name), error = %e, "reading the CA Secret failed; retrying");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = leader.changed() => {}
            }
        }
    }

    async fn create(&self) -> Result<(), CaSecretError> {
        let (cert, key) = new_root(&self.trust_domain).map_err(|source| CaSecretError::Ca {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        let data: BTreeMap<String, ByteString> =
            [(KEY_CERT, cert.clone()), (KEY_KEY, key), (KEY_ROOTS, cert)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                .collect();
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(
                    [("app.kubernetes.io/part-of".to_string(), "weft".to_string())].into(),
                ),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        };
        self.api
            .create(&PostParams::default(), &secret)
            .await
            .map_err(|source| CaSecretError::Api {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                source,
            })?;
        tracing::info!(secret = %format!("{}/{}", self.namespace, self.name), trust_domain = %self.trust_domain, "created a new root CA in a Secret");
        Ok(())
    }

    fn parse(&self, secret: &Secret) -> Result<Ca, CaSecretError> {
        let text =
            |key: &'static str| -> Result<Option<String>, CaSecretError> {
                match secret.data.as_ref().and_then(|d| d.get(key)) {
                    None => Ok(None),
                    Some(b) => String::from_utf8(b.0.clone()).map(Some).map_err(|_| {
                        CaSecretError::NotText {
                            namespace: self.namespace.clone(),
                            name: self.name.clone(),
                            key,
                        }
                    }),
                }
            };
        let required = |key: &'static str| -> Result<String, CaSecretError> {
            text(key)?.ok_or_else(|| CaSecretError::MissingKey {
                namespace: self.namespace.clone(),
                name: self.name.clone(),
                key,
            })
        };
        let cert = required(KEY_CERT)?;
        let key = required(KEY_KEY)?;
        let roots = text(KEY_ROOTS)?;
        Ca::from_pem(
            &cert,
            &key,
            roots.as_deref(),
            &self.trust_domain,
            self.svid_ttl,
        )
        .map_err(|source| CaSecretError::Ca {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })
    }
}
