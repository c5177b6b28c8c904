//! Node authentication in Kubernetes mode. A node agent sends its projected
//! ServiceAccount token (audience [`DEFAULT_AUDIENCE`] unless configured) as a
//! bearer token. The control plane:
//!
//! 1. asks the API server to review it (TokenReview, with that audience);
//! 2. requires the user `system:serviceaccount:<ns>:<node-agent SA>`; tokens of any
//!    other ServiceAccount are refused;
//! 3. binds the caller to a node: the token's `authentication.kubernetes.io/node-name`
//!    extra (Kubernetes 1.30+ puts it in pod-bound tokens) or else the pod the token
//!    is bound to (`.../pod-name` and `.../pod-uid`), read from the API server, whose
//!    `spec.nodeName` is the node. A token not bound to a pod is refused.
//!
//! Results are cached for [`CACHE_TTL`] by token digest, so a node's RPCs do not
//! each cost a review.

use crate::server::auth::{NodeAuthenticator, RequestAuth};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tonic::Status;

pub const DEFAULT_AUDIENCE: &str = "weft.dev/control-plane";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 4096;
const EXTRA_NODE: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

pub struct TokenReviewAuthenticator {
    client: Client,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>` of the node agents.
    username: String,
    namespace: String,
    cache: Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, audience: &str, namespace: &str, service_account: &str) -> Self {
        Self {
            client,
            audience: audience.to_string(),
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_string(),
            cache: Mutex::default(),
        }
    }

    async fn review(&self, token: &str) -> Result<String, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![self.audience.clone()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let out = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("TokenReview failed: {e}")))?;
        let st = out.status.unwrap_or_default();
        if st.authenticated != Some(true) {
            return Err(Status::unauthenticated(format!(
                "the token was not accepted by the API server{}",
                st.error.map(|e| format!(": {e}")).unwrap_or_default()
            )));
        }
        let user = st.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Err(Status::permission_denied(format!(
                "{username} is not the node agent's ServiceAccount ({})",
                self.username
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| extra.get(k).and_then(|v| v.first()).cloned();
        if let Some(node) = first(EXTRA_NODE).filter(|n| !n.is_empty()) {
            return Ok(node);
        }
        let (Some(pod), Some(uid)) = (first(EXTRA_POD), first(EXTRA_POD_UID)) else {
            return Err(Status::permission_denied(
                "the token is not bound to a pod (use a projected ServiceAccount token)",
            ));
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.namespace);
        let p = pods
            .get_opt(&pod)
            .await
            .map_err(|e| Status::unavailable(format!("reading pod {pod}: {e}")))?
            .ok_or_else(|| {
                Status::permission_denied(format!("the token's pod {pod} no longer exists"))
            })?;
        if p.metadata.uid.as_deref() != Some(uid.as_str()) {
            return Err(Status::permission_denied(format!(
                "the token's pod {pod} was replaced (uid differs)"
            )));
        }
        p.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Status::permission_denied(format!("the token's pod {pod} is not on a node"))
            })
    }
}

#[tonic::async_trait]
impl NodeAuthenticator for TokenReviewAuthenticator {
    async fn authenticate(&self, meta: &RequestAuth) -> Result<String, Status> {
        let token = meta.bearer.as_deref().ok_or_else(|| {
            Status::unauthenticated(
                "a ServiceAccount token (authorization: Bearer) is required in Kubernetes mode",
            )
        })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        {
            let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((node, at)) = cache.get(&digest) {
                if at.elapsed() < CACHE_TTL {
                    return Ok(node.clone());
                }
            }
        }
        let node = self.review(token).await?;
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        if cache.len() < CACHE_MAX {
            cache.insert(digest, (node.clone(), Instant::now()));
        }
        Ok(node)
    }
}
