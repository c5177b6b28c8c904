//! Node authentication in Kubernetes mode. A node agent sends its projected
//! ServiceAccount token (audience [`DEFAULT_AUDIENCE`] unless configured) as a
//! bearer token. The control plane:
//!
//! 1. asks the API server to review it (TokenReview, with that audience) and requires
//!    the review's `status.audiences` to contain that audience (an API server that
//!    ignores audiences, or a token for another audience, is refused);
//! 2. requires the user `system:serviceaccount:<ns>:<node-agent SA>`; tokens of any
//!    other ServiceAccount are refused;
//! 3. binds the caller to a node: the token's `authentication.kubernetes.io/node-name`
//!    extra (Kubernetes 1.30+ puts it in pod-bound tokens) or else the pod the token
//!    is bound to (`.../pod-name` and `.../pod-uid`), read from the API server, whose
//!    `spec.nodeName` is the node. A token not bound to a pod is refused.
//!
//! Bounded under abuse:
//! - accepted tokens are cached for [`ACCEPTED_TTL`] by token digest, so a node's RPCs
//!   do not each cost a review; the entry is dropped as soon as the pod the token is
//!   bound to is deleted or replaced ([`TokenReviewAuthenticator::observe`]);
//! - refused tokens are cached for [`REFUSED_TTL`], so the same bad token repeated
//!   costs one review, not one per request;
//! - reviews that fail are limited per source address (IPv6 per /64) by a token
//!   bucket ([`FAILURE_BURST`], [`FAILURE_RATE`] per second); a source that exhausted
//!   its bucket is refused without a review. The map of sources is bounded
//!   ([`SOURCES_MAX`]): when full, new sources share one bucket;
//! - both caches are bounded ([`CACHE_MAX`] entries each).
//!
//! What the API server said (errors, usernames, audiences) is logged, never returned
//! to the caller: callers get one generic message per outcome.

use crate::config::{Object, SourceEvent};
use crate::server::auth::{NodeAuthenticator, RequestAuth};
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec, TokenReviewStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Status;

pub const DEFAULT_AUDIENCE: &str = "weft.dev/control-plane";
/// How long an accepted token is trusted without another review.
pub const ACCEPTED_TTL: Duration = Duration::from_secs(60);
/// How long a refused token is refused without another review.
pub const REFUSED_TTL: Duration = Duration::from_secs(10);
/// Entries of each cache (accepted, refused).
pub const CACHE_MAX: usize = 4096;
/// Source addresses with their own failure bucket.
pub const SOURCES_MAX: usize = 4096;
/// Failed reviews a source may cause in a burst ...
pub const FAILURE_BURST: f64 = 10.0;
/// ... and per second after that.
pub const FAILURE_RATE: f64 = 1.0;
const EXTRA_NODE: &str = "authentication.kubernetes.io/node-name";
const EXTRA_POD: &str = "authentication.kubernetes.io/pod-name";
const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Why the API server could not be asked (logged, never returned to the caller).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ApiError(pub String);

/// The two API calls authentication makes; the API server in production, a fake in
/// tests.
#[tonic::async_trait]
pub trait Reviewer: Send + Sync + 'static {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, ApiError>;
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ApiError>;
}

/// [`Reviewer`] of the API server.
pub struct ApiReviewer {
    pub client: Client,
}

#[tonic::async_trait]
impl Reviewer for ApiReviewer {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, ApiError> {
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_string()),
                audiences: Some(vec![audience.to_string()]),
            },
            ..Default::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let out = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| ApiError(format!("TokenReview failed: {e}")))?;
        Ok(out.status.unwrap_or_default())
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ApiError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), namespace);
        pods.get_opt(name)
            .await
            .map_err(|e| ApiError(format!("reading pod {namespace}/{name}: {e}")))
    }
}

/// What callers are told. Nothing of the API server's answer is in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The token is not valid for this audience.
    Unauthenticated,
    /// A valid token, but not a node agent's bound to a live pod on a node.
    NotANode,
}

impl Refusal {
    fn status(self) -> Status {
        match self {
            Refusal::Unauthenticated => Status::unauthenticated("the node token was not accepted"),
            Refusal::NotANode => {
                Status::permission_denied("the token does not belong to a node agent on a node")
            }
        }
    }
}

fn unavailable() -> Status {
    Status::unavailable("the node token cannot be verified right now; retry later")
}

fn rate_limited() -> Status {
    Status::resource_exhausted("too many failed authentications from this address; retry later")
}

/// The pod a token is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
struct PodRef {
    name: String,
    uid: String,
}

enum Verdict {
    Accepted {
        node: String,
        pod: Option<PodRef>,
    },
    /// Refused; the detail is for the log.
    Refused(Refusal, String),
    /// The API server could not be asked; the detail is for the log.
    Unavailable(String),
}

struct Accepted {
    node: String,
    pod: Option<PodRef>,
    at: Instant,
}

struct Refused {
    refusal: Refusal,
    at: Instant,
}

/// A token bucket refilled continuously.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(now: Instant) -> Self {
        Self {
            tokens: FAILURE_BURST,
            at: now,
        }
    }
    fn refill(&mut self, now: Instant) {
        let dt = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + dt * FAILURE_RATE).min(FAILURE_BURST);
        self.at = now;
    }
    fn take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
    fn give_back(&mut self) {
        self.tokens = (self.tokens + 1.0).min(FAILURE_BURST);
    }
}

/// Which bucket a review was charged to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Source {
    Addr(IpAddr),
    /// Sources without a bucket of their own (map full, or address unknown).
    Shared,
}

/// Failure budgets by source address, bounded to [`SOURCES_MAX`] addresses.
struct Limiter {
    buckets: HashMap<IpAddr, Bucket>,
    shared: Bucket,
    /// When full buckets were last forgotten (at most once a second: it walks the map).
    pruned: Instant,
}

impl Limiter {
    fn new(now: Instant) -> Self {
        Self {
            buckets: HashMap::new(),
            shared: Bucket::full(now),
            pruned: now,
        }
    }

    /// IPv4 by address, IPv6 by /64 (one host usually holds a whole /64).
    fn key(ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(_) => ip,
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => IpAddr::V4(v4),
                None => IpAddr::V6((u128::from(v6) & !((1u128 << 64) - 1)).into()),
            },
        }
    }

    /// Charges one review to the source; `None` when its budget is spent.
    fn take(&mut self, ip: Option<IpAddr>, now: Instant) -> Option<Source> {
        let source = match ip.map(Self::key) {
            Some(k) if self.buckets.contains_key(&k) => Source::Addr(k),
            Some(k) => {
                if self.buckets.len() >= SOURCES_MAX
                    && now.saturating_duration_since(self.pruned) >= Duration::from_secs(1)
                {
                    // A full bucket is the same as none: forget those.
                    self.pruned = now;
                    self.buckets.retain(|_, b| {
                        b.refill(now);
                        b.tokens < FAILURE_BURST
                    });
                }
                if self.buckets.len() < SOURCES_MAX {
                    self.buckets.insert(k, Bucket::full(now));
                    Source::Addr(k)
                } else {
                    Source::Shared
                }
            }
            None => Source::Shared,
        };
        let bucket = match source {
            Source::Addr(k) => self.buckets.get_mut(&k)?,
            Source::Shared => &mut self.shared,
        };
        bucket.take(now).then_some(source)
    }

    /// Returns the charge of a review that succeeded.
    fn give_back(&mut self, source: Source) {
        match source {
            Source::Addr(k) => {
                if let Some(b) = self.buckets.get_mut(&k) {
                    b.give_back();
                }
            }
            Source::Shared => self.shared.give_back(),
        }
    }
}

/// All of the authenticator's mutable state, behind one lock never held across an
/// await.
struct State {
    accepted: HashMap<[u8; 32], Accepted>,
    refused: HashMap<[u8; 32], Refused>,
    limiter: Limiter,
}

/// A time source (tests move theirs by hand).
pub type Clock = Arc<dyn Fn() -> Instant + Send + Sync>;

pub struct TokenReviewAuthenticator {
    reviewer: Box<dyn Reviewer>,
    clock: Clock,
    audience: String,
    /// `system:serviceaccount:<ns>:<name>` of the node agents.
    username: String,
    namespace: String,
    state: Mutex<State>,
}

impl TokenReviewAuthenticator {
    pub fn new(client: Client, audience: &str, namespace: &str, service_account: &str) -> Self {
        Self::with_reviewer(
            Box::new(ApiReviewer { client }),
            Arc::new(Instant::now),
            audience,
            namespace,
            service_account,
        )
    }

    pub fn with_reviewer(
        reviewer: Box<dyn Reviewer>,
        clock: Clock,
        audience: &str,
        namespace: &str,
        service_account: &str,
    ) -> Self {
        let now = clock();
        Self {
            reviewer,
            clock,
            audience: audience.to_string(),
            username: format!("system:serviceaccount:{namespace}:{service_account}"),
            namespace: namespace.to_string(),
            state: Mutex::new(State {
                accepted: HashMap::new(),
                refused: HashMap::new(),
                limiter: Limiter::new(now),
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Drops accepted tokens bound to pods of the node agents' namespace that this
    /// change deleted or replaced (another UID under the same name). Called with every
    /// event of the Kubernetes source before the model applies it.
    pub fn observe(&self, ev: &SourceEvent) {
        let pod_of = |o: &Object| match o {
            Object::Pod(p) if p.metadata.namespace.as_deref() == Some(self.namespace.as_str()) => p
                .metadata
                .name
                .clone()
                .map(|n| (n, p.metadata.uid.clone().unwrap_or_default())),
            _ => None,
        };
        // Pods of the namespace after this event: name -> uid. For a snapshot every
        // pod, for changes only those applied.
        let (live, gone): (HashMap<String, String>, HashSet<&str>) = match ev {
            SourceEvent::Snapshot(objs) => {
                (objs.iter().filter_map(pod_of).collect(), HashSet::new())
            }
            SourceEvent::Changes { apply, delete, .. } => (
                apply.iter().filter_map(pod_of).collect(),
                delete
                    .iter()
                    .filter(|r| r.kind == "Pod" && r.namespace == self.namespace)
                    .map(|r| r.name.as_str())
                    .collect(),
            ),
            _ => return,
        };
        let snapshot = matches!(ev, SourceEvent::Snapshot(_));
        if !snapshot && live.is_empty() && gone.is_empty() {
            return;
        }
        let mut st = self.state();
        let before = st.accepted.len();
        st.accepted.retain(|_, a| {
            let Some(pod) = &a.pod else { return true };
            let keep = match live.get(&pod.name) {
                Some(uid) => *uid == pod.uid,
                None => !snapshot && !gone.contains(pod.name.as_str()),
            };
            if !keep {
                tracing::info!(node = %a.node, pod = %pod.name, "the pod of a cached node token is gone; the token will be reviewed again");
            }
            keep
        });
        let dropped = before - st.accepted.len();
        if dropped > 0 {
            tracing::debug!(dropped, "node tokens dropped from the cache");
        }
    }

    async fn review(&self, token: &str) -> Verdict {
        let st = match self.reviewer.review(token, &self.audience).await {
            Ok(st) => st,
            Err(e) => return Verdict::Unavailable(e.0),
        };
        if st.authenticated != Some(true) {
            return Verdict::Refused(
                Refusal::Unauthenticated,
                format!(
                    "the API server did not authenticate the token: {}",
                    st.error.as_deref().unwrap_or("no reason given")
                ),
            );
        }
        let audiences = st.audiences.unwrap_or_default();
        if !audiences.contains(&self.audience) {
            return Verdict::Refused(
                Refusal::Unauthenticated,
                format!(
                    "the review's audiences {audiences:?} do not include {:?}",
                    self.audience
                ),
            );
        }
        let user = st.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        if username != self.username {
            return Verdict::Refused(
                Refusal::NotANode,
                format!(
                    "{username} is not the node agent's ServiceAccount ({})",
                    self.username
                ),
            );
        }
        let extra = user.extra.unwrap_or_default();
        let first = |k: &str| {
            extra
                .get(k)
                .and_then(|v| v.first())
                .filter(|v| !v.is_empty())
                .cloned()
        };
        let pod = match (first(EXTRA_POD), first(EXTRA_POD_UID)) {
            (Some(name), Some(uid)) => Some(PodRef { name, uid }),
            _ => None,
        };
        if let Some(node) = first(EXTRA_NODE) {
            return Verdict::Accepted { node, pod };
        }
        let Some(pod) = pod else {
            return Verdict::Refused(
                Refusal::NotANode,
                "the token is not bound to a pod (use a projected ServiceAccount token)".into(),
            );
        };
        let p = match self.reviewer.pod(&self.namespace, &pod.name).await {
            Ok(Some(p)) => p,
            Ok(None) => {
                return Verdict::Refused(
                    Refusal::NotANode,
                    format!("the token's pod {} no longer exists", pod.name),
                )
            }
            Err(e) => return Verdict::Unavailable(e.0),
        };
        if p.metadata.uid.as_deref() != Some(pod.uid.as_str()) {
            return Verdict::Refused(
                Refusal::NotANode,
                format!("the token's pod {} was replaced (uid differs)", pod.name),
            );
        }
        match p.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()) {
            Some(node) => Verdict::Accepted {
                node,
                pod: Some(pod),
            },
            None => Verdict::Refused(
                Refusal::NotANode,
                format!("the token's pod {} is not on a node", pod.name),
            ),
        }
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
        let charged = {
            let now = (self.clock)();
            let mut st = self.state();
            if let Some(a) = st.accepted.get(&digest) {
                if now.saturating_duration_since(a.at) < ACCEPTED_TTL {
                    return Ok(a.node.clone());
                }
            }
            if let Some(r) = st.refused.get(&digest) {
                if now.saturating_duration_since(r.at) < REFUSED_TTL {
                    return Err(r.refusal.status());
                }
            }
            match st.limiter.take(meta.remote, now) {
                Some(source) => source,
                None => {
                    tracing::debug!(source = ?meta.remote, "node token refused without review: too many failed reviews from this source");
                    return Err(rate_limited());
                }
            }
        };
        let verdict = self.review(token).await;
        let now = (self.clock)();
        let mut st = self.state();
        match verdict {
            Verdict::Accepted { node, pod } => {
                st.limiter.give_back(charged);
                st.refused.remove(&digest);
                if st.accepted.len() >= CACHE_MAX {
                    st.accepted
                        .retain(|_, a| now.saturating_duration_since(a.at) < ACCEPTED_TTL);
                }
                if st.accepted.len() < CACHE_MAX {
                    st.accepted.insert(
                        digest,
                        Accepted {
                            node: node.clone(),
                            pod,
                            at: now,
                        },
                    );
                }
                Ok(node)
            }
            Verdict::Refused(refusal, detail) => {
                tracing::warn!(source = ?meta.remote, reason = %detail, "node token refused");
                if st.refused.len() >= CACHE_MAX {
                    st.refused
                        .retain(|_, r| now.saturating_duration_since(r.at) < REFUSED_TTL);
                }
                if st.refused.len() < CACHE_MAX {
                    st.refused.insert(digest, Refused { refusal, at: now });
                }
                Err(refusal.status())
            }
            Verdict::Unavailable(detail) => {
                tracing::warn!(source = ?meta.remote, error = %detail, "node token could not be reviewed");
                Err(unavailable())
            }
        }
    }
}

#[cfg(test)]
#[path = "token_review_tests.rs"]
mod tests;
