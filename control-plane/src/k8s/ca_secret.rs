//! The CA in Kubernetes mode lives in a Secret in the control plane's namespace, so
//! every replica signs with the same key and a restart keeps the trust root.
//!
//! Keys: `ca.crt` (signing certificate, followed by any intermediates above it),
//! `ca.key` (its PEM key) and, when `ca.crt` is an intermediate, `root-cert.pem`
//! (the roots nodes trust). A user who brings their own (intermediate) CA creates
//! the Secret before installing; otherwise the leader creates a self-signed root.
//! Followers wait until the Secret exists.
//!
//! The key `jwt-key.pem` holds the JWT-SVID signing key (PKCS#8 PEM, EC P-256). The
//! leader writes it into a new Secret; a Secret without it (made by an older
//! version, or by the user) gets one added by the first replica that reads it, with
//! an update conditioned on the Secret's resourceVersion, so that all replicas use
//! the same key. Users may add their own key under that name instead.

use super::leader::LeaderWatch;
use crate::identity::stored::{PemCa, Record, Stored};
use crate::identity::{ca::new_root, jwt, Ca, CaError, JwtError, JwtSigner};
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
pub const KEY_JWT: &str = jwt::KEY_FILE;
/// A CA staged for rotation (`weft-control-plane ca rotate --kubernetes`), and the
/// rotation's phase record; see [`crate::rotation`].
pub const KEY_NEXT_CERT: &str = "next-ca.crt";
pub const KEY_NEXT_KEY: &str = "next-ca.key";
pub const KEY_NEXT_ROOTS: &str = "next-root-cert.pem";
pub const KEY_PHASE: &str = "rotation-phase";
/// The certificate of the CA the last rotation retired.
pub const KEY_RETIRED: &str = "retired-ca.crt";

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
    #[error("Secret {namespace}/{name}: key {KEY_JWT:?}: {source}")]
    Jwt {
        namespace: String,
        name: String,
        source: JwtError,
    },
    #[error("Secret {namespace}/{name} has no key {KEY_JWT:?} (the JWT-SVID signing key) and adding it failed: {source}; allow the control plane to update the Secret, or add a PKCS#8 PEM EC P-256 key under that name")]
    AddJwtKey {
        namespace: String,
        name: String,
        source: kube::Error,
    },
    #[error("Secret {namespace}/{name}: {message}")]
    Rotation {
        namespace: String,
        name: String,
        message: String,
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

    /// The JWT-SVID signer, from the key `jwt-key.pem` of the Secret (which
    /// [`Self::load_or_create`] has seen exist), adding a new key when it lacks one.
    pub async fn load_or_create_jwt(&self, ttl: Duration) -> Result<JwtSigner, CaSecretError> {
        loop {
            let secret = match self.api.get_opt(&self.name).await {
                Ok(Some(s)) => s,
                Ok(None) => {
                    tracing::warn!(secret = %format!("{}/{}", self.namespace, self.name), "the CA Secret is gone; waiting for it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(e) => {
                    tracing::warn!(secret = %format!("{}/{}", self.namespace, self.name), error = %e, "reading the CA Secret failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            if let Some(pem) = self.text(&secret, KEY_JWT)? {
                return JwtSigner::from_pem(&pem, &self.trust_domain, ttl)
                    .map_err(|source| self.jwt_error(source));
            }
            // Add a key; the update carries the resourceVersion just read, so of
            // replicas that race only one succeeds and the others read its key.
            let pem = JwtSigner::generate_pem().map_err(|source| self.jwt_error(source))?;
            let mut updated = secret;
            updated
                .data
                .get_or_insert_with(Default::default)
                .insert(KEY_JWT.to_string(), ByteString(pem.into_bytes()));
            match self
                .api
                .replace(&self.name, &PostParams::default(), &updated)
                .await
            {
                Ok(_) => {
                    tracing::info!(secret = %format!("{}/{}", self.namespace, self.name), "added a JWT-SVID signing key to the CA Secret");
                }
                Err(kube::Error::Api(s)) if s.code == 409 => {}
                Err(source) => {
                    return Err(CaSecretError::AddJwtKey {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        source,
                    })
                }
            }
        }
    }

    fn jwt_error(&self, source: JwtError) -> CaSecretError {
        CaSecretError::Jwt {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    fn api_error(&self, source: kube::Error) -> CaSecretError {
        CaSecretError::Api {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        }
    }

    fn rotation_error(&self, message: String) -> CaSecretError {
        CaSecretError::Rotation {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            message,
        }
    }

    async fn get(&self) -> Result<Secret, CaSecretError> {
        self.api
            .get_opt(&self.name)
            .await
            .map_err(|e| self.api_error(e))?
            .ok_or_else(|| self.rotation_error("the Secret is gone".into()))
    }

    /// The CA, a staged one and the rotation's phase, as the Secret holds them.
    pub async fn read_rotation(&self) -> Result<Stored, CaSecretError> {
        let secret = self.get().await?;
        let text = |key: &'static str| self.text(&secret, key);
        let pair = |c: &'static str,
                    k: &'static str,
                    r: &'static str|
         -> Result<Option<PemCa>, CaSecretError> {
            match (text(c)?, text(k)?) {
                (Some(chain), Some(key)) => Ok(Some(PemCa {
                    chain,
                    key,
                    bundle: text(r)?,
                })),
                (None, None) => Ok(None),
                _ => Err(self.rotation_error(format!("keys {c:?} and {k:?} must both be present"))),
            }
        };
        let current = pair(KEY_CERT, KEY_KEY, KEY_ROOTS)?.ok_or_else(|| {
            self.rotation_error(format!("key {KEY_CERT:?} or {KEY_KEY:?} is missing"))
        })?;
        let next = pair(KEY_NEXT_CERT, KEY_NEXT_KEY, KEY_NEXT_ROOTS)?;
        let record = match text(KEY_PHASE)? {
            Some(t) if next.is_some() => Some(
                Record::parse(&t)
                    .map_err(|e| self.rotation_error(format!("key {KEY_PHASE:?}: {e}")))?,
            ),
            _ => None,
        };
        Ok(Stored {
            current,
            next,
            record,
        })
    }

    /// Replaces the Secret's data with `edit` applied, conditioned on the version
    /// just read (a conflict is an error: the next tick reads again).
    async fn edit(
        &self,
        edit: impl FnOnce(&mut BTreeMap<String, ByteString>) -> Result<(), String>,
    ) -> Result<(), CaSecretError> {
        let mut secret = self.get().await?;
        edit(secret.data.get_or_insert_with(Default::default))
            .map_err(|m| self.rotation_error(m))?;
        self.api
            .replace(&self.name, &PostParams::default(), &secret)
            .await
            .map_err(|e| self.api_error(e))?;
        Ok(())
    }

    /// Records `r`, provided the staged CA is still `next` and the record is still
    /// `before` (so a replica that lost leadership mid-step cannot skip a phase of a
    /// newer rotation).
    pub async fn set_rotation_record(
        &self,
        next: &PemCa,
        before: Option<Record>,
        r: Record,
    ) -> Result<(), CaSecretError> {
        self.edit(|d| {
            let text = |k: &str| d.get(k).map(|b| String::from_utf8_lossy(&b.0).to_string());
            if text(KEY_NEXT_CERT).as_deref() != Some(next.chain.as_str()) {
                return Err("the staged CA changed meanwhile".into());
            }
            let held = text(KEY_PHASE).and_then(|t| Record::parse(&t).ok());
            if held != before {
                return Err("the rotation's phase changed meanwhile".into());
            }
            d.insert(KEY_PHASE.into(), ByteString(r.text().into_bytes()));
            Ok(())
        })
        .await
    }

    /// Stages `next` (the `ca rotate` command); refuses while a rotation runs.
    pub async fn stage_rotation(&self, next: &PemCa) -> Result<(), CaSecretError> {
        self.edit(|d| {
            if d.contains_key(KEY_NEXT_CERT) {
                let phase = d
                    .get(KEY_PHASE)
                    .map(|b| String::from_utf8_lossy(&b.0).trim().to_string())
                    .unwrap_or_default();
                return Err(format!(
                    "a CA rotation is already under way ({phase}); wait until it is done"
                ));
            }
            d.remove(KEY_PHASE);
            d.insert(
                KEY_NEXT_CERT.into(),
                ByteString(next.chain.clone().into_bytes()),
            );
            d.insert(
                KEY_NEXT_KEY.into(),
                ByteString(next.key.clone().into_bytes()),
            );
            match &next.bundle {
                Some(b) => d.insert(KEY_NEXT_ROOTS.into(), ByteString(b.clone().into_bytes())),
                None => d.remove(KEY_NEXT_ROOTS),
            };
            Ok(())
        })
        .await
    }

    /// The staged CA becomes the current one; the old certificate is kept under
    /// [`KEY_RETIRED`], its key is deleted.
    pub async fn promote_rotation(
        &self,
        next: &PemCa,
        next_bundle: &str,
    ) -> Result<(), CaSecretError> {
        self.edit(|d| {
            let staged = d.get(KEY_NEXT_CERT).map(|b| b.0.clone());
            if staged.as_deref() != Some(next.chain.as_bytes()) {
                return Err("the staged CA changed meanwhile".into());
            }
            if let Some(old) = d.get(KEY_CERT).cloned() {
                d.insert(KEY_RETIRED.into(), old);
            }
            d.insert(KEY_CERT.into(), ByteString(next.chain.clone().into_bytes()));
            d.insert(KEY_KEY.into(), ByteString(next.key.clone().into_bytes()));
            d.insert(
                KEY_ROOTS.into(),
                ByteString(next_bundle.as_bytes().to_vec()),
            );
            for k in [KEY_NEXT_CERT, KEY_NEXT_KEY, KEY_NEXT_ROOTS, KEY_PHASE] {
                d.remove(k);
            }
            Ok(())
        })
        .await
    }

    /// Removes the staged CA and the phase record.
    pub async fn drop_rotation(&self) -> Result<(), CaSecretError> {
        self.edit(|d| {
            for k in [KEY_NEXT_CERT, KEY_NEXT_KEY, KEY_NEXT_ROOTS, KEY_PHASE] {
                d.remove(k);
            }
            Ok(())
        })
        .await
    }

    /// The text of `key` in the Secret, if present.
    fn text(&self, secret: &Secret, key: &'static str) -> Result<Option<String>, CaSecretError> {
        match secret.data.as_ref().and_then(|d| d.get(key)) {
            None => Ok(None),
            Some(b) => {
                String::from_utf8(b.0.clone())
                    .map(Some)
                    .map_err(|_| CaSecretError::NotText {
                        namespace: self.namespace.clone(),
                        name: self.name.clone(),
                        key,
                    })
            }
        }
    }

    async fn create(&self) -> Result<(), CaSecretError> {
        let (cert, key) = new_root(&self.trust_domain).map_err(|source| CaSecretError::Ca {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            source,
        })?;
        let jwt_key = JwtSigner::generate_pem().map_err(|source| self.jwt_error(source))?;
        let data: BTreeMap<String, ByteString> = [
            (KEY_CERT, cert.clone()),
            (KEY_KEY, key),
            (KEY_ROOTS, cert),
            (KEY_JWT, jwt_key),
        ]
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
        let text = |key: &'static str| self.text(secret, key);
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

#[cfg(test)]
mod tests {
    //! Against a fake API server that keeps one Secret and enforces resourceVersion
    //! preconditions on updates.

    use super::*;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    const NS: &str = "weft-system";
    const NAME: &str = "weft-ca";

    #[derive(Default)]
    struct Fake {
        secret: Mutex<Option<Secret>>,
        version: AtomicU64,
        updates: AtomicU64,
        creates: AtomicU64,
        forbid_updates: AtomicBool,
    }

    fn status(code: StatusCode, reason: &str) -> Response {
        (
            code,
            Json(serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "metadata": {},
                "status": "Failure", "message": reason, "reason": reason,
                "code": code.as_u16(),
            })),
        )
            .into_response()
    }

    async fn read(State(f): State<Arc<Fake>>, Path((_, name)): Path<(String, String)>) -> Response {
        match &*f.secret.lock().unwrap() {
            Some(s) if name == NAME => Json(s.clone()).into_response(),
            _ => status(StatusCode::NOT_FOUND, "NotFound"),
        }
    }

    async fn create(
        State(f): State<Arc<Fake>>,
        Path(_): Path<String>,
        Json(mut s): Json<Secret>,
    ) -> Response {
        let mut cur = f.secret.lock().unwrap();
        if cur.is_some() {
            return status(StatusCode::CONFLICT, "AlreadyExists");
        }
        f.creates.fetch_add(1, Ordering::SeqCst);
        s.metadata.resource_version = Some(f.version.fetch_add(1, Ordering::SeqCst).to_string());
        *cur = Some(s.clone());
        (StatusCode::CREATED, Json(s)).into_response()
    }

    async fn replace(
        State(f): State<Arc<Fake>>,
        Path(_): Path<(String, String)>,
        Json(mut s): Json<Secret>,
    ) -> Response {
        if f.forbid_updates.load(Ordering::SeqCst) {
            return status(StatusCode::FORBIDDEN, "Forbidden");
        }
        // Let racing readers read the old version first.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let mut cur = f.secret.lock().unwrap();
        let Some(old) = cur.as_ref() else {
            return status(StatusCode::NOT_FOUND, "NotFound");
        };
        if s.metadata.resource_version != old.metadata.resource_version {
            return status(StatusCode::CONFLICT, "Conflict");
        }
        f.updates.fetch_add(1, Ordering::SeqCst);
        s.metadata.resource_version = Some(f.version.fetch_add(1, Ordering::SeqCst).to_string());
        *cur = Some(s.clone());
        Json(s).into_response()
    }

    async fn start(fake: Arc<Fake>) -> (CaSecret, tokio::task::JoinHandle<()>) {
        let app = Router::new()
            .route("/api/v1/namespaces/{ns}/secrets", post(create))
            .route(
                "/api/v1/namespaces/{ns}/secrets/{name}",
                get(read).put(replace),
            )
            .with_state(fake);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        let config = kube::Config::new(format!("http://{addr}").parse().unwrap());
        let client = Client::try_from(config).unwrap();
        let secret = CaSecret::new(
            client,
            NS,
            NAME,
            TrustDomain::new("cluster.local").unwrap(),
            Duration::from_secs(3600),
        );
        (secret, server)
    }

    fn stored_key(f: &Fake) -> Option<String> {
        let s = f.secret.lock().unwrap();
        s.as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(KEY_JWT))
            .map(|b| String::from_utf8(b.0.clone()).unwrap())
    }

    /// A Secret as an older version (or a user) made it: no JWT key.
    fn legacy_secret() -> Secret {
        let (cert, key) = new_root(&TrustDomain::new("cluster.local").unwrap()).unwrap();
        Secret {
            metadata: ObjectMeta {
                name: Some(NAME.into()),
                namespace: Some(NS.into()),
                resource_version: Some("7".into()),
                ..Default::default()
            },
            data: Some(
                [(KEY_CERT, cert.clone()), (KEY_KEY, key), (KEY_ROOTS, cert)]
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.into_bytes())))
                    .collect(),
            ),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn the_leader_creates_the_secret_with_a_jwt_key() {
        let fake = Arc::new(Fake::default());
        let (secret, server) = start(fake.clone()).await;
        let (_tx, leader) = tokio::sync::watch::channel(true);
        secret.load_or_create(leader).await.unwrap();
        assert_eq!(fake.creates.load(Ordering::SeqCst), 1);
        let pem = stored_key(&fake).expect("jwt-key.pem in the new Secret");
        let jwt = secret.load_or_create_jwt(jwt::DEFAULT_TTL).await.unwrap();
        let expected = JwtSigner::from_pem(&pem, &secret.trust_domain, jwt::DEFAULT_TTL).unwrap();
        assert_eq!(jwt.kid(), expected.kid());
        assert_eq!(fake.updates.load(Ordering::SeqCst), 0);
        server.abort();
    }

    #[tokio::test]
    async fn a_secret_without_the_key_gets_one_added_once_for_all_replicas() {
        let fake = Arc::new(Fake::default());
        *fake.secret.lock().unwrap() = Some(legacy_secret());
        fake.version.store(8, Ordering::SeqCst);
        let (a, server) = start(fake.clone()).await;
        let (b, server_b) = start(fake.clone()).await;
        // A follower reads the CA as before.
        let (_tx, leader) = tokio::sync::watch::channel(false);
        a.load_or_create(leader).await.unwrap();

        let (ja, jb) = tokio::join!(
            a.load_or_create_jwt(jwt::DEFAULT_TTL),
            b.load_or_create_jwt(jwt::DEFAULT_TTL)
        );
        let (ja, jb) = (ja.unwrap(), jb.unwrap());
        assert_eq!(ja.kid(), jb.kid());
        assert_eq!(fake.updates.load(Ordering::SeqCst), 1);
        let pem = stored_key(&fake).unwrap();
        let stored = JwtSigner::from_pem(&pem, &a.trust_domain, jwt::DEFAULT_TTL).unwrap();
        assert_eq!(stored.kid(), ja.kid());
        // The CA keys are untouched, and a restart reads the same key.
        a.load_or_create(tokio::sync::watch::channel(false).1)
            .await
            .unwrap();
        let again = a.load_or_create_jwt(jwt::DEFAULT_TTL).await.unwrap();
        assert_eq!(again.kid(), ja.kid());
        assert_eq!(fake.updates.load(Ordering::SeqCst), 1);
        server.abort();
        server_b.abort();
    }

    #[tokio::test]
    async fn a_refused_update_is_a_clear_error() {
        let fake = Arc::new(Fake::default());
        *fake.secret.lock().unwrap() = Some(legacy_secret());
        fake.forbid_updates.store(true, Ordering::SeqCst);
        let (secret, server) = start(fake.clone()).await;
        let err = secret
            .load_or_create_jwt(jwt::DEFAULT_TTL)
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with(
                "Secret weft-system/weft-ca has no key \"jwt-key.pem\" (the JWT-SVID signing key) and adding it failed: "
            ),
            "{err}"
        );
        assert!(stored_key(&fake).is_none());
        server.abort();
    }

    #[tokio::test]
    async fn an_unusable_jwt_key_is_an_error_and_never_overwritten() {
        let fake = Arc::new(Fake::default());
        let mut s = legacy_secret();
        s.data
            .as_mut()
            .unwrap()
            .insert(KEY_JWT.into(), ByteString(b"garbage".to_vec()));
        *fake.secret.lock().unwrap() = Some(s);
        let (secret, server) = start(fake.clone()).await;
        let err = secret
            .load_or_create_jwt(jwt::DEFAULT_TTL)
            .await
            .unwrap_err();
        assert!(matches!(err, CaSecretError::Jwt { .. }), "{err}");
        assert_eq!(stored_key(&fake).as_deref(), Some("garbage"));
        server.abort();
    }
}
