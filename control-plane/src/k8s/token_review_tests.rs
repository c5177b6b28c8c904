//! The TokenReview authenticator against a fake API server.

use super::*;
use crate::config::ObjectRef;
use k8s_openapi::api::authentication::v1::UserInfo;
use k8s_openapi::api::core::v1::PodSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

const NS: &str = "weft-system";
const SA: &str = "weft-node";
const AUD: &str = DEFAULT_AUDIENCE;
/// What the fake API server says in its errors: must never reach a caller.
const SECRET: &str = "10.96.0.1:443 etcd-cluster-internal";

/// What the fake API server answers for a token.
#[derive(Clone)]
enum Answer {
    /// A node agent's token bound to pod `agent-<node>` (uid `uid-<node>`), with the
    /// node-name extra when `node_extra`, for these audiences.
    Agent {
        node: String,
        node_extra: bool,
        audiences: Option<Vec<String>>,
    },
    /// A valid token of another user.
    User(String),
    /// Not authenticated, with an error text.
    Rejected,
    /// The API server cannot be reached.
    Down,
}

#[derive(Default)]
struct Api {
    tokens: Mutex<HashMap<String, Answer>>,
    /// pod name -> (uid, node)
    pods: Mutex<HashMap<String, (String, String)>>,
    reviews: AtomicU64,
    pod_reads: AtomicU64,
}

struct Fake(Arc<Api>);

#[tonic::async_trait]
impl Reviewer for Fake {
    async fn review(&self, token: &str, audience: &str) -> Result<TokenReviewStatus, ApiError> {
        self.0.reviews.fetch_add(1, Ordering::SeqCst);
        let answer = self.0.tokens.lock().unwrap().get(token).cloned();
        let user = |name: &str, extra: BTreeMap<String, Vec<String>>| UserInfo {
            username: Some(name.to_string()),
            extra: Some(extra),
            ..Default::default()
        };
        Ok(match answer {
            Some(Answer::Agent {
                node,
                node_extra,
                audiences,
            }) => {
                let pod = format!("agent-{node}");
                // The API server refuses a token whose bound pod is gone.
                let Some((uid, _)) = self.0.pods.lock().unwrap().get(&pod).cloned() else {
                    return Ok(TokenReviewStatus {
                        authenticated: Some(false),
                        error: Some(format!("pod {pod} not found ({SECRET})")),
                        ..Default::default()
                    });
                };
                let mut extra = BTreeMap::new();
                extra.insert(EXTRA_POD.to_string(), vec![pod]);
                extra.insert(EXTRA_POD_UID.to_string(), vec![uid]);
                if node_extra {
                    extra.insert(EXTRA_NODE.to_string(), vec![node]);
                }
                TokenReviewStatus {
                    authenticated: Some(true),
                    audiences: audiences.or_else(|| Some(vec![audience.to_string()])),
                    user: Some(user(&format!("system:serviceaccount:{NS}:{SA}"), extra)),
                    ..Default::default()
                }
            }
            Some(Answer::User(name)) => TokenReviewStatus {
                authenticated: Some(true),
                audiences: Some(vec![audience.to_string()]),
                user: Some(user(&name, BTreeMap::new())),
                ..Default::default()
            },
            Some(Answer::Down) => return Err(ApiError(format!("connection refused ({SECRET})"))),
            Some(Answer::Rejected) | None => TokenReviewStatus {
                authenticated: Some(false),
                error: Some(format!("invalid bearer token ({SECRET})")),
                ..Default::default()
            },
        })
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<Pod>, ApiError> {
        assert_eq!(namespace, NS);
        self.0.pod_reads.fetch_add(1, Ordering::SeqCst);
        Ok(self
            .0
            .pods
            .lock()
            .unwrap()
            .get(name)
            .map(|(uid, node)| pod(name, uid, node)))
    }
}

fn pod(name: &str, uid: &str, node: &str) -> Pod {
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            uid: Some(uid.into()),
            ..Default::default()
        },
        spec: Some(PodSpec {
            node_name: Some(node.into()),
            ..Default::default()
        }),
        ..Default::default()
    }
}

struct Harness {
    api: Arc<Api>,
    auth: TokenReviewAuthenticator,
    /// Milliseconds the fake clock moved.
    elapsed: Arc<AtomicU64>,
}

impl Harness {
    fn new() -> Self {
        let api = Arc::new(Api::default());
        let elapsed = Arc::new(AtomicU64::new(0));
        let base = Instant::now();
        let e = elapsed.clone();
        let clock: Clock = Arc::new(move || base + Duration::from_millis(e.load(Ordering::SeqCst)));
        let auth = TokenReviewAuthenticator::with_reviewer(
            Box::new(Fake(api.clone())),
            clock,
            AUD,
            NS,
            SA,
        );
        Self { api, auth, elapsed }
    }

    fn advance(&self, d: Duration) {
        self.elapsed
            .fetch_add(d.as_millis() as u64, Ordering::SeqCst);
    }

    /// A node agent's token on `node` (its pod created), with the node-name extra.
    fn agent(&self, token: &str, node: &str) {
        self.agent_with(token, node, true, None);
    }

    fn agent_with(&self, token: &str, node: &str, node_extra: bool, aud: Option<Vec<String>>) {
        self.api.pods.lock().unwrap().insert(
            format!("agent-{node}"),
            (format!("uid-{node}"), node.to_string()),
        );
        self.answer(
            token,
            Answer::Agent {
                node: node.into(),
                node_extra,
                audiences: aud,
            },
        );
    }

    fn answer(&self, token: &str, a: Answer) {
        self.api.tokens.lock().unwrap().insert(token.into(), a);
    }

    fn reviews(&self) -> u64 {
        self.api.reviews.load(Ordering::SeqCst)
    }

    async fn auth(&self, token: &str, from: &str) -> Result<String, Status> {
        self.auth
            .authenticate(&RequestAuth {
                peer_certs: None,
                bearer: Some(token.into()),
                remote: Some(from.parse().unwrap()),
            })
            .await
    }
}

const A: &str = "192.0.2.1";
const B: &str = "192.0.2.2";

#[tokio::test]
async fn a_review_must_name_the_requested_audience() {
    let h = Harness::new();
    h.agent_with(
        "other-aud",
        "n1",
        true,
        Some(vec!["https://kubernetes.default.svc".into()]),
    );
    h.agent_with("no-aud", "n2", true, Some(vec![]));
    h.agent_with("both", "n3", true, Some(vec!["x".into(), AUD.into()]));
    for t in ["other-aud", "no-aud"] {
        let e = h.auth(t, A).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{t}: {e:?}");
    }
    assert_eq!(h.auth("both", A).await.unwrap(), "n3");
}

#[tokio::test]
async fn what_the_api_server_said_never_reaches_the_caller() {
    let h = Harness::new();
    h.answer("rejected", Answer::Rejected);
    h.answer("down", Answer::Down);
    h.answer(
        "intruder",
        Answer::User("system:serviceaccount:shop:intruder".into()),
    );
    // Bound to a pod the authenticator reads, and that pod is gone by then.
    h.agent_with("vanished", "n1", false, None);
    h.api.pods.lock().unwrap().clear();
    let cases = [
        ("rejected", tonic::Code::Unauthenticated),
        ("down", tonic::Code::Unavailable),
        ("intruder", tonic::Code::PermissionDenied),
        ("vanished", tonic::Code::Unauthenticated),
    ];
    for (t, code) in cases {
        let e = h.auth(t, A).await.unwrap_err();
        assert_eq!(e.code(), code, "{t}: {e:?}");
        for leak in [SECRET, "intruder", "shop", "agent-n1", "bearer"] {
            assert!(!e.message().contains(leak), "{t} leaks {leak:?}: {e:?}");
        }
    }
}

#[tokio::test]
async fn refusals_are_cached_briefly() {
    let h = Harness::new();
    h.answer("bad", Answer::Rejected);
    h.answer(
        "intruder",
        Answer::User("system:serviceaccount:shop:intruder".into()),
    );
    for _ in 0..5 {
        assert_eq!(
            h.auth("bad", A).await.unwrap_err().code(),
            tonic::Code::Unauthenticated
        );
        assert_eq!(
            h.auth("intruder", A).await.unwrap_err().code(),
            tonic::Code::PermissionDenied,
            "a cached refusal keeps its code"
        );
    }
    assert_eq!(h.reviews(), 2, "one review per bad token");
    h.advance(REFUSED_TTL);
    assert!(h.auth("bad", A).await.is_err());
    assert_eq!(h.reviews(), 3, "reviewed again once the refusal expired");
    // A token the API server could not review is not cached as refused.
    h.answer("flaky", Answer::Down);
    assert_eq!(
        h.auth("flaky", A).await.unwrap_err().code(),
        tonic::Code::Unavailable
    );
    h.agent("flaky", "n1");
    assert_eq!(h.auth("flaky", A).await.unwrap(), "n1");
}

#[tokio::test]
async fn accepted_tokens_are_cached_for_a_minute() {
    let h = Harness::new();
    h.agent("good", "n1");
    for _ in 0..5 {
        assert_eq!(h.auth("good", A).await.unwrap(), "n1");
    }
    assert_eq!(h.reviews(), 1);
    h.advance(ACCEPTED_TTL);
    assert_eq!(h.auth("good", A).await.unwrap(), "n1");
    assert_eq!(h.reviews(), 2);
}

#[tokio::test]
async fn failed_reviews_are_limited_per_source() {
    let h = Harness::new();
    h.agent("good", "n1");
    let burst = FAILURE_BURST as u64;
    // Distinct bad tokens (the refusal cache does not help): the burst is reviewed ...
    for i in 0..burst {
        let e = h.auth(&format!("bad-{i}"), A).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated);
    }
    assert_eq!(h.reviews(), burst);
    // ... then the source is refused without a review, good token or not.
    for t in ["bad-x", "good"] {
        let e = h.auth(t, A).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{t}: {e:?}");
    }
    assert_eq!(h.reviews(), burst);
    // Another source is not affected.
    assert_eq!(h.auth("good", B).await.unwrap(), "n1");
    // The budget refills at FAILURE_RATE per second.
    h.advance(Duration::from_secs_f64(1.0 / FAILURE_RATE));
    assert!(h.auth("bad-y", A).await.is_err());
    assert_eq!(h.reviews(), burst + 2);
    assert_eq!(
        h.auth("bad-z", A).await.unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
}

#[tokio::test]
async fn successful_reviews_cost_no_budget_and_ipv6_sources_share_a_64() {
    let h = Harness::new();
    for i in 0..3 * FAILURE_BURST as usize {
        h.agent(&format!("good-{i}"), &format!("n{i}"));
        assert!(h.auth(&format!("good-{i}"), A).await.is_ok());
    }
    for i in 0..FAILURE_BURST as usize {
        let from = format!("2001:db8:1:2::{:x}", i + 1);
        assert!(h.auth(&format!("bad-{i}"), &from).await.is_err());
    }
    let e = h.auth("bad-x", "2001:db8:1:2:ffff::1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "same /64");
    let e = h.auth("bad-x", "2001:db8:1:3::1").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated, "another /64");
}

#[tokio::test]
async fn the_source_map_and_the_caches_are_bounded() {
    let h = Harness::new();
    // More failing sources than the map holds, each with more bad tokens than the
    // refusal cache holds in total.
    let sources = SOURCES_MAX + 50;
    for i in 0..sources {
        let from = std::net::Ipv4Addr::from(0x0a00_0000u32 + i as u32).to_string();
        let _ = h.auth(&format!("bad-{i}"), &from).await;
    }
    {
        let st = h.auth.state();
        assert!(st.limiter.buckets.len() <= SOURCES_MAX);
        assert!(st.refused.len() <= CACHE_MAX);
    }
    // The sources beyond the map share one budget: FAILURE_BURST reviews, not 50.
    assert_eq!(h.reviews(), (SOURCES_MAX + FAILURE_BURST as usize) as u64);
    let e = h.auth("bad-new", "198.51.100.7").await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::ResourceExhausted);
    // Buckets that refilled are forgotten, making room for new sources.
    h.advance(Duration::from_secs_f64(FAILURE_BURST / FAILURE_RATE));
    assert_eq!(
        h.auth("bad-new", "198.51.100.7").await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert!(h.auth.state().limiter.buckets.len() <= SOURCES_MAX);

    // The accepted cache is bounded too.
    let h = Harness::new();
    for i in 0..CACHE_MAX + 10 {
        h.agent(&format!("good-{i}"), "n1");
        assert!(h.auth(&format!("good-{i}"), A).await.is_ok());
    }
    assert_eq!(h.auth.state().accepted.len(), CACHE_MAX);
}

fn pod_ref(name: &str) -> ObjectRef {
    ObjectRef {
        kind: "Pod",
        namespace: NS.into(),
        name: name.into(),
    }
}

#[tokio::test]
async fn a_cached_token_is_dropped_when_its_pod_is_deleted_or_replaced() {
    for node_extra in [true, false] {
        let h = Harness::new();
        h.agent_with("t1", "n1", node_extra, None);
        h.agent_with("t2", "n2", node_extra, None);
        h.agent_with("t3", "n3", node_extra, None);
        for t in ["t1", "t2", "t3"] {
            assert!(h.auth(t, A).await.is_ok());
        }
        assert_eq!(h.reviews(), 3);
        // A pod of another namespace with the same name changes nothing.
        h.auth.observe(&SourceEvent::Changes {
            apply: Vec::new(),
            delete: vec![ObjectRef {
                namespace: "shop".into(),
                ..pod_ref("agent-n1")
            }],
        });
        assert!(h.auth("t1", A).await.is_ok());
        assert_eq!(h.reviews(), 3);

        // Deleted: the API server no longer accepts the token, and the cache must
        // not either.
        h.api.pods.lock().unwrap().remove("agent-n1");
        h.auth.observe(&SourceEvent::Changes {
            apply: Vec::new(),
            delete: vec![pod_ref("agent-n1")],
        });
        let e = h.auth("t1", A).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        // Replaced under the same name (another UID).
        h.api
            .pods
            .lock()
            .unwrap()
            .insert("agent-n2".into(), ("uid-new".into(), "n2".into()));
        h.auth.observe(&SourceEvent::Changes {
            apply: vec![Object::Pod(Box::new(pod("agent-n2", "uid-new", "n2")))],
            delete: Vec::new(),
        });
        let before = h.reviews();
        assert!(h.auth("t2", A).await.is_ok());
        assert_eq!(h.reviews(), before + 1, "t2 was reviewed again");
        // A snapshot without the pod (a re-list after the watch broke).
        h.auth
            .observe(&SourceEvent::Snapshot(vec![Object::Pod(Box::new(pod(
                "agent-n2", "uid-new", "n2",
            )))]));
        let before = h.reviews();
        assert!(h.auth("t3", A).await.is_ok());
        assert!(h.auth("t2", A).await.is_ok());
        assert_eq!(h.reviews(), before + 1, "only t3 was reviewed again");
    }
}

#[tokio::test]
async fn a_token_bound_to_no_pod_or_to_a_pod_on_no_node_is_refused() {
    let h = Harness::new();
    h.agent_with("t", "n1", false, None);
    h.api
        .pods
        .lock()
        .unwrap()
        .insert("agent-n1".into(), ("uid-n1".into(), String::new()));
    let e = h.auth("t", A).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied);
    assert_eq!(h.api.pod_reads.load(Ordering::SeqCst), 1);
    let e = h
        .auth
        .authenticate(&RequestAuth {
            peer_certs: None,
            bearer: None,
            remote: None,
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(h.reviews(), 1, "no token, no review");
}
