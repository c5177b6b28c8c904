//! What the proxy's listeners share: the node's config, certificates, the local
//! pods, the HBONE connection pool, the compiled policies, metrics and counters.
//! One [`ProxyState`] per node; every connection holds an `Arc` of it.

use super::counters::NodeCounters;
use super::local::LocalPods;
use super::policies::{Applicable, CompiledPolicies};
use super::pool::HbonePool;
use crate::certs::CertStore;
use crate::config::ConfigStore;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use weft_authz::{self as authz, Attributes, Decision};
use weft_proto::pb;

/// Policies compiled from a given policy map (compared by identity, O(1)).
type CompiledCache = (
    imbl::OrdMap<String, Arc<pb::AuthorizationPolicy>>,
    Arc<CompiledPolicies>,
);

type AuthnCache = (
    imbl::OrdMap<String, Arc<pb::RequestAuthentication>>,
    Arc<super::request_authn::CompiledAuthn>,
);

pub struct ProxyState {
    pub(crate) config: Arc<ConfigStore>,
    pub(crate) certs: Arc<CertStore>,
    /// SO_MARK of the proxy's own sockets.
    pub(crate) mark: u32,
    pub(crate) pool: HbonePool,
    /// The local enrolled pods (the pod manager adds and removes them).
    pub(crate) local: LocalPods,
    pub(crate) counters: NodeCounters,
    /// Open inbound connections, re-authorized when policies change.
    pub(crate) conns: Arc<super::conns::ConnTracker>,
    pub(crate) metrics: Arc<crate::metrics::Metrics>,
    pub(crate) balancer: super::lb::Balancer,
    /// Serial of the client certificate of the last accepted HBONE session (hex).
    pub(crate) last_peer_serial: std::sync::Mutex<String>,
    /// Compiled policies and the policy map they were compiled from.
    compiled: std::sync::Mutex<Option<CompiledCache>>,
    /// Compiled RequestAuthentications and the map they were compiled from.
    compiled_authn: std::sync::Mutex<Option<AuthnCache>>,
    /// Route tables compiled from the Gateway API routes ([`super::route_table`]).
    pub(crate) routes: std::sync::Mutex<super::route_table::RouteCache>,
    /// Wasm plugins (absent: no plugin support, e.g. in unit tests).
    pub(crate) plugins: Option<Arc<crate::wasm::registry::PluginRegistry>>,
    pub(crate) access_log: super::access_log::AccessLog,
    /// See [`ProxyOptions::http1_head_timeout`].
    pub(crate) http1_head_timeout: std::time::Duration,
    /// See [`ProxyOptions::http_idle_timeout`].
    pub(crate) http_idle_timeout: std::time::Duration,
    /// See [`ProxyOptions::hbone_handshake_timeout`].
    pub(crate) hbone_handshake_timeout: std::time::Duration,
    /// See [`ProxyOptions::hbone_server_idle`].
    pub(crate) hbone_server_idle: std::time::Duration,
    /// HBONE connections in their handshake, per source IP (at most
    /// [`ProxyOptions::max_handshakes_per_source`] each).
    pub(crate) handshakes: Arc<super::handshakes::Handshakes>,
    /// HBONE sessions and L7 connections, closed when idle by [`Self::reap_forever`].
    pub(crate) idle: Arc<super::idle::IdleWatch>,
    /// See [`ProxyOptions::max_connections`].
    max_connections: u64,
    /// See [`ProxyOptions::allow_from_node`].
    pub(crate) node_addresses: Arc<super::node_addresses::NodeAddresses>,
    /// Cancelled when the agent drains before it exits: HBONE sessions then tell
    /// their clients to open new connections elsewhere (HTTP/2 GOAWAY).
    pub(crate) draining: tokio_util::sync::CancellationToken,
}

/// The reason of the decision that lets a connection from the node through.
pub const FROM_NODE: &str = "from the pod's own node (kubelet probes): not subject to policy";

/// Default of [`ProxyOptions::max_handshakes_per_source`].
pub const DEFAULT_MAX_HANDSHAKES_PER_SOURCE: u32 = 128;

/// The proxy's tunables.
#[derive(Debug, Clone, Copy)]
pub struct ProxyOptions {
    /// SO_MARK of the proxy's own sockets.
    pub mark: u32,
    /// How Service endpoints are chosen.
    pub lb: super::lb::LbPolicy,
    /// Pooled HBONE connections without streams this long are closed.
    pub hbone_idle: std::time::Duration,
    /// An HBONE connection's TLS and HTTP/2 handshake (the client's preface) must
    /// be done this long after the TCP connection was accepted (server side) or
    /// dialled (client side).
    pub hbone_handshake_timeout: std::time::Duration,
    /// Accepted HBONE sessions without streams for at least this long are closed
    /// (by [`ProxyState::reap_forever`]'s sweep). Keep it above the peers'
    /// `hbone_idle`, so that clients close their idle connections first.
    pub hbone_server_idle: std::time::Duration,
    /// HBONE connections one source IP may have in their handshake at once; more
    /// are refused at once.
    pub max_handshakes_per_source: u32,
    /// An HTTP/1 request head must arrive whole this long after its first bytes.
    pub http1_head_timeout: std::time::Duration,
    /// A connection parsed at L7 that waits for a request's first bytes (before
    /// its first request, or between two) for at least this long is closed (by the
    /// same sweep).
    pub http_idle_timeout: std::time::Duration,
    /// Connections the proxy holds at most; more are refused at once, so that no
    /// client (nor a loop) can take the agent's file descriptors from the node's
    /// other pods.
    pub max_connections: u64,
    pub access_log: super::access_log::AccessLogSettings,
    /// Plaintext connections from the node's own addresses (the kubelet's
    /// probes) reach pods without authorization ([`super::node_addresses`]).
    pub allow_from_node: bool,
}

impl ProxyState {
    pub fn new(
        config: Arc<ConfigStore>,
        certs: Arc<CertStore>,
        metrics: Arc<crate::metrics::Metrics>,
        opts: ProxyOptions,
        plugins: Option<Arc<crate::wasm::registry::PluginRegistry>>,
    ) -> Arc<Self> {
        let access_log =
            super::access_log::AccessLog::new(opts.access_log, metrics.access_log_dropped.clone());
        Arc::new(Self {
            config,
            certs,
            mark: opts.mark,
            http1_head_timeout: opts.http1_head_timeout,
            http_idle_timeout: opts.http_idle_timeout,
            hbone_handshake_timeout: opts.hbone_handshake_timeout,
            hbone_server_idle: opts.hbone_server_idle,
            handshakes: super::handshakes::Handshakes::new(opts.max_handshakes_per_source),
            idle: Arc::default(),
            max_connections: opts.max_connections,
            node_addresses: Arc::new(super::node_addresses::NodeAddresses::new(
                opts.allow_from_node,
            )),
            access_log,
            pool: HbonePool::new(opts.hbone_idle, opts.hbone_handshake_timeout),
            local: LocalPods::default(),
            counters: NodeCounters::default(),
            conns: Arc::default(),
            metrics,
            balancer: super::lb::Balancer::new(opts.lb),
            last_peer_serial: std::sync::Mutex::new(String::new()),
            compiled: std::sync::Mutex::new(None),
            compiled_authn: std::sync::Mutex::new(None),
            routes: Default::default(),
            plugins,
            draining: Default::default(),
        })
    }

    /// Whether the proxy holds its maximum of connections: a new one must be
    /// refused (counted).
    pub(crate) fn over_capacity(&self) -> bool {
        use std::sync::atomic::Ordering::Relaxed;
        let full = self.counters.open.load(Relaxed) >= self.max_connections;
        if full {
            self.counters.over_capacity.fetch_add(1, Relaxed);
        }
        full
    }

    /// Counts an authorization decision.
    pub fn record_decision(&self, d: &Decision) {
        let l = crate::metrics::traffic::AuthzLabels {
            decision: if d.allowed { "allow" } else { "deny" },
            policy: d.policy.as_deref().unwrap_or("none").to_string(),
        };
        self.metrics.traffic.authz.get_or_create(&l).inc();
    }

    /// Refreshes the pool gauges (called when metrics are scraped).
    pub fn refresh_pool_gauges(&self) {
        let t = &self.metrics.traffic;
        t.pool_connections.clear();
        t.pool_streams.clear();
        for (k, conns, streams) in self.pool.sizes() {
            let l = crate::metrics::traffic::PoolLabels {
                source_principal: k.source_id,
                destination_principal: k.dest_id,
                destination_node: k.dest_node,
            };
            t.pool_connections.get_or_create(&l).set(conns as i64);
            t.pool_streams.get_or_create(&l).set(streams as i64);
        }
    }

    /// Closes idle pooled HBONE connections, idle accepted HBONE sessions and idle
    /// L7 connections, forever: every quarter of the shortest of their timeouts
    /// (at least 100 ms), with one timer for them all.
    pub async fn reap_forever(self: Arc<Self>) {
        let shortest = self
            .pool
            .idle_timeout
            .min(self.hbone_server_idle)
            .min(self.http_idle_timeout);
        let every = (shortest / 4).max(std::time::Duration::from_millis(100));
        loop {
            tokio::time::sleep(every).await;
            let n = self.pool.reap_idle();
            if n > 0 {
                tracing::debug!(closed = n, "closed idle HBONE connections");
            }
            self.sweep_idle();
        }
    }

    /// Closes the accepted HBONE sessions and L7 connections idle for their
    /// timeout (counted).
    pub(crate) fn sweep_idle(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let (sessions, http) = self.idle.sweep(std::time::Instant::now());
        self.counters
            .hbone_idle_closed
            .fetch_add(sessions as u64, Relaxed);
        self.counters.l7_idle_closed.fetch_add(http as u64, Relaxed);
        if sessions + http > 0 {
            tracing::debug!(
                sessions,
                http,
                "closed idle HBONE sessions and HTTP connections"
            );
        }
    }

    /// Re-authorizes open connections after every config change, forever.
    pub async fn recheck_forever(self: Arc<Self>) {
        let mut changes = self.config.watch();
        while changes.changed().await.is_ok() {
            self.recheck_open();
        }
    }

    /// Re-authorizes the open connections with the current policies and their
    /// destinations' current workloads; closes (and counts) the denied ones.
    pub fn recheck_open(&self) {
        let n = self.conns.recheck(|w, a| self.authorize(w, a));
        if n > 0 {
            self.counters
                .closed_by_policy_change
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The workload with this IP, from the config (any node).
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<pb::Workload>> {
        self.config.snapshot().workload_by_ip(ip).cloned()
    }

    /// The node's policies, compiled once per change of the policy set.
    pub(crate) fn compiled_policies(&self) -> Arc<CompiledPolicies> {
        let snap = self.config.snapshot();
        let mut cache = self.compiled.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((policies, compiled)) = cache.as_ref() {
            if policies.ptr_eq(&snap.policies) {
                return compiled.clone();
            }
        }
        let compiled = Arc::new(CompiledPolicies::new(
            snap.policies.values().map(|p| authz::compile(p)).collect(),
        ));
        *cache = Some((snap.policies.clone(), compiled.clone()));
        compiled
    }

    /// The node's RequestAuthentications, compiled once per change of their set.
    pub(crate) fn compiled_authn(&self) -> Arc<super::request_authn::CompiledAuthn> {
        let snap = self.config.snapshot();
        let mut cache = self
            .compiled_authn
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some((objects, compiled)) = cache.as_ref() {
            if objects.ptr_eq(&snap.request_authns) {
                return compiled.clone();
            }
        }
        let compiled = Arc::new(super::request_authn::CompiledAuthn::new(
            snap.request_authns.values().map(|o| &**o),
            cache.as_ref().map(|(_, c)| &**c),
        ));
        *cache = Some((snap.request_authns.clone(), compiled.clone()));
        compiled
    }

    /// Authorizes a connection to the local workload `dst`: plaintext (no peer
    /// principal) to a port a PeerAuthentication makes STRICT is refused before any
    /// AuthorizationPolicy is looked at.
    pub fn authorize(&self, dst: &pb::Workload, attrs: &Attributes) -> Decision {
        if self.is_from_node(attrs) {
            return Decision {
                allowed: true,
                policy: None,
                rule: None,
                audited: Vec::new(),
                reason: FROM_NODE,
            };
        }
        if attrs.principal.is_none() {
            if let Some(d) = self.strict_refusal(dst, attrs.destination_port) {
                return d;
            }
        }
        let compiled = self.compiled_policies();
        let d = authz::evaluate(compiled.applicable(dst), attrs);
        self.record_decision(&d);
        d
    }

    /// Is this a plaintext connection from the node's own addresses (a kubelet
    /// probe), which passes without authorization ([`super::node_addresses`])?
    pub(crate) fn is_from_node(&self, attrs: &Attributes) -> bool {
        attrs.principal.is_none()
            && attrs
                .source_ip
                .is_some_and(|ip| self.node_addresses.exempts(ip))
    }

    /// The refusal of a plaintext connection to `port` of `dst` when a
    /// PeerAuthentication makes it STRICT (counted); `None` when plaintext may pass
    /// on to authorization.
    fn strict_refusal(&self, dst: &pb::Workload, port: u16) -> Option<Decision> {
        let snap = self.config.snapshot();
        if snap.peer_authns.is_empty() {
            return None;
        }
        let e = weft_authz::mtls::effective(snap.peer_authns.values().map(|p| &**p), dst, port);
        if !e.strict {
            return None;
        }
        let id = e.policy_id().unwrap_or_default();
        let l = crate::metrics::traffic::StrictLabels {
            peer_authentication: id.clone(),
        };
        self.metrics.traffic.strict_refused.get_or_create(&l).inc();
        Some(Decision {
            allowed: false,
            policy: Some(format!("PeerAuthentication {id}").into()),
            rule: None,
            audited: Vec::new(),
            reason: "plaintext refused: STRICT mTLS (PeerAuthentication)",
        })
    }

    /// Decides one HTTP request to the local workload `dst` (not counted: the
    /// caller counts it). `conn` is what the connection's requests reuse (see
    /// [`RequestAuthz`]); `fill(request, headers)` writes this request's attributes
    /// into an emptied request (nothing of the previous request's is left), and
    /// `headers` says whether an applicable policy reads request headers, so they
    /// are only collected when one does.
    pub fn decide_request(
        &self,
        dst: &Arc<pb::Workload>,
        conn: &Mutex<RequestAuthz>,
        fill: impl FnOnce(&mut authz::Request, bool),
    ) -> Decision {
        let compiled = self.compiled_policies();
        let mut conn = conn.lock().unwrap_or_else(|p| p.into_inner());
        let RequestAuthz {
            applicable,
            workload,
            attrs,
        } = &mut *conn;
        // Kept while neither the policies nor the workload (its labels) changed.
        let fresh = workload.as_ref().is_some_and(|w| Arc::ptr_eq(w, dst));
        let applicable = match applicable.take() {
            Some(a) if fresh && a.is_from(&compiled) => applicable.insert(a),
            _ => {
                *workload = Some(dst.clone());
                applicable.insert(compiled.applicable_to(dst))
            }
        };
        let headers = applicable.iter().any(|p| p.reads_request_headers());
        let request = attrs.request.get_or_insert_with(Default::default);
        let authz::Request {
            method,
            path,
            host,
            headers: fields,
            auth,
        } = request;
        method.clear();
        path.clear();
        host.clear();
        fields.clear();
        *auth = None;
        fill(request, headers);
        authz::evaluate(applicable.iter(), attrs)
    }
}

#[cfg(any(test, feature = "testing"))]
impl ProxyState {
    /// The node's view of the mesh.
    pub fn config(&self) -> &Arc<ConfigStore> {
        &self.config
    }

    /// Adds (`Some`) or removes a local enrolled pod, as the pod manager does.
    pub fn set_local_pod(&self, ip: IpAddr, pod: Option<super::local::LocalPod>) {
        self.local.set(ip, pod);
    }
}

/// What one connection's requests reuse to be authorized: the policies applicable
/// to its workload (kept while the policy set is current), and its attributes,
/// whose request part each request overwrites in place (no allocation per request
/// once the strings have grown to fit).
pub struct RequestAuthz {
    applicable: Option<Applicable>,
    /// The workload `applicable` was selected for.
    workload: Option<Arc<pb::Workload>>,
    attrs: Attributes,
}

impl RequestAuthz {
    /// For a connection with attributes `attrs` (its request part is replaced).
    pub fn new(attrs: Attributes) -> Self {
        Self {
            applicable: None,
            workload: None,
            attrs: Attributes {
                request: None,
                l7_pending: false,
                ..attrs
            },
        }
    }
}

/// A node's proxy state over `config`, with default options, for tests.
#[cfg(test)]
pub fn test_state(config: Arc<ConfigStore>) -> Arc<ProxyState> {
    test_state_with(config, |_| {})
}

/// [`test_state`] with options changed by `f`.
#[cfg(any(test, feature = "testing"))]
pub fn test_state_with(
    config: Arc<ConfigStore>,
    f: impl FnOnce(&mut ProxyOptions),
) -> Arc<ProxyState> {
    let mut opts = ProxyOptions {
        mark: 0,
        lb: Default::default(),
        hbone_idle: std::time::Duration::from_secs(60),
        hbone_handshake_timeout: super::pool::DEFAULT_HANDSHAKE_TIMEOUT,
        hbone_server_idle: std::time::Duration::from_secs(120),
        max_handshakes_per_source: DEFAULT_MAX_HANDSHAKES_PER_SOURCE,
        http1_head_timeout: std::time::Duration::from_secs(30),
        http_idle_timeout: std::time::Duration::from_secs(600),
        access_log: Default::default(),
        max_connections: 100_000,
        allow_from_node: false,
    };
    f(&mut opts);
    let metrics = Arc::new(crate::metrics::Metrics::new());
    ProxyState::new(config, Default::default(), metrics, opts, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state_with(policy: pb::AuthorizationPolicy) -> (Arc<ProxyState>, Arc<pb::Workload>) {
        let w = Arc::new(pb::Workload {
            name: "web".into(),
            namespace: "shop".into(),
            labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        });
        let config = ConfigStore::new("node-a");
        let rejected = config.apply(&pb::ConfigUpdate {
            upserts: vec![pb::Resource {
                key: "AuthorizationPolicy/shop/p".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::AuthorizationPolicy(policy)),
            }],
            ..Default::default()
        });
        assert!(rejected.is_empty(), "{rejected:?}");
        (test_state(config), w)
    }

    fn deny(rule: pb::Rule) -> pb::AuthorizationPolicy {
        pb::AuthorizationPolicy {
            name: "p".into(),
            namespace: "shop".into(),
            action: pb::authorization_policy::Action::Deny as i32,
            rules: vec![rule],
            ..Default::default()
        }
    }

    /// Decides a GET / carrying `x-evil: 1`, with the headers only if asked for.
    fn decide(state: &ProxyState, w: &Arc<pb::Workload>) -> (bool, bool) {
        decide_with(state, w, &Mutex::new(RequestAuthz::new(Default::default())))
    }

    fn decide_with(
        state: &ProxyState,
        w: &Arc<pb::Workload>,
        conn: &Mutex<RequestAuthz>,
    ) -> (bool, bool) {
        let mut asked = false;
        let d = state.decide_request(w, conn, |r, with_headers| {
            asked = with_headers;
            r.method.push_str("GET");
            r.path.push('/');
            if with_headers {
                r.headers.push(("x-evil".into(), "1".into()));
            }
        });
        (asked, d.allowed)
    }

    #[test]
    fn request_headers_are_collected_only_when_a_policy_reads_them() {
        let header_rule = pb::Rule {
            when: vec![pb::Condition {
                key: "request.headers[x-evil]".into(),
                values: vec!["*".into()],
                not_values: vec![],
            }],
            ..Default::default()
        };
        let (state, w) = state_with(deny(header_rule));
        assert_eq!(decide(&state, &w), (true, false));

        let path_rule = pb::Rule {
            to: vec![pb::Operation {
                paths: vec!["/admin".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (state, w) = state_with(deny(path_rule));
        assert_eq!(decide(&state, &w), (false, true));
    }

    /// A connection's requests share one set of attributes, overwritten per
    /// request: nothing of one request's (path, host, headers) is left for the next.
    #[test]
    fn a_requests_attributes_never_carry_over_to_the_next() {
        let mut p = deny(pb::Rule {
            when: vec![pb::Condition {
                key: "request.headers[x-evil]".into(),
                values: vec!["*".into()],
                not_values: vec![],
            }],
            ..Default::default()
        });
        p.rules.push(pb::Rule {
            to: vec![pb::Operation {
                hosts: vec!["admin.example".into()],
                ..Default::default()
            }],
            ..Default::default()
        });
        let (state, w) = state_with(p);
        let conn = Mutex::new(RequestAuthz::new(Default::default()));
        let d = state.decide_request(&w, &conn, |r, with_headers| {
            assert!(with_headers);
            r.method.push_str("POST");
            r.path.push_str("/admin");
            r.host.push_str("admin.example");
            r.headers.push(("x-evil".into(), "1".into()));
        });
        assert_eq!((d.allowed, d.rule), (false, Some(0)));
        let d = state.decide_request(&w, &conn, |r, _| r.method.push_str("GET"));
        assert!(d.allowed, "{d:?}");
        let conn = conn.lock().unwrap();
        let r = conn.attrs.request.as_ref().unwrap();
        assert_eq!(
            (
                r.method.as_str(),
                r.path.as_str(),
                r.host.as_str(),
                r.headers.len()
            ),
            ("GET", "", "", 0)
        );
    }

    /// A connection keeps the policies applicable to its workload between requests;
    /// a policy change made while it is open applies to its next request.
    #[test]
    fn a_connections_cached_policies_follow_policy_changes() {
        let allow_get = pb::AuthorizationPolicy {
            name: "p".into(),
            namespace: "shop".into(),
            rules: vec![pb::Rule {
                to: vec![pb::Operation {
                    methods: vec!["GET".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let (state, w) = state_with(allow_get);
        let cache = Mutex::new(RequestAuthz::new(Default::default()));
        assert_eq!(decide_with(&state, &w, &cache), (false, true));
        assert_eq!(decide_with(&state, &w, &cache), (false, true));
        // Same key: the ALLOW on GET becomes a DENY on headers.
        let rejected = state.config.apply(&pb::ConfigUpdate {
            upserts: vec![pb::Resource {
                key: "AuthorizationPolicy/shop/p".into(),
                version: "2".into(),
                kind: Some(pb::resource::Kind::AuthorizationPolicy(deny(pb::Rule {
                    when: vec![pb::Condition {
                        key: "request.headers[x-evil]".into(),
                        values: vec!["*".into()],
                        not_values: vec![],
                    }],
                    ..Default::default()
                }))),
            }],
            ..Default::default()
        });
        assert!(rejected.is_empty(), "{rejected:?}");
        assert_eq!(decide_with(&state, &w, &cache), (true, false));
        // And removing it leaves no policy: allowed, headers not needed.
        state.config.apply(&pb::ConfigUpdate {
            removals: vec!["AuthorizationPolicy/shop/p".into()],
            ..Default::default()
        });
        assert_eq!(decide_with(&state, &w, &cache), (false, true));
    }
}

#[cfg(test)]
mod from_node_tests {
    use super::*;

    /// Issue 27 (found by the chaos test under load): the kubelet's probes come
    /// from the node's own address in plaintext; an ALLOW policy that names only
    /// mesh sources denied them, so HTTP-probed pods never became Ready and
    /// TCP-probed ones flapped out of their Services.
    #[test]
    fn plaintext_from_the_node_passes_and_nothing_else_does() {
        let w = Arc::new(pb::Workload {
            name: "web".into(),
            namespace: "shop".into(),
            ..Default::default()
        });
        let allow_shop = pb::AuthorizationPolicy {
            name: "only-shop".into(),
            namespace: "shop".into(),
            action: pb::authorization_policy::Action::Allow as i32,
            rules: vec![pb::Rule {
                from: vec![pb::Source {
                    namespaces: vec!["shop".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let state_with = |allow_from_node: bool| {
            let config = ConfigStore::new("node-a");
            let rejected = config.apply(&pb::ConfigUpdate {
                upserts: vec![pb::Resource {
                    key: "AuthorizationPolicy/shop/only-shop".into(),
                    version: "1".into(),
                    kind: Some(pb::resource::Kind::AuthorizationPolicy(allow_shop.clone())),
                }],
                ..Default::default()
            });
            assert!(rejected.is_empty(), "{rejected:?}");
            let s = test_state_with(config, |o| o.allow_from_node = allow_from_node);
            s.node_addresses.replace(["10.245.1.1".parse().unwrap()]);
            s
        };
        let attrs = |src: &str, principal: Option<&str>| Attributes {
            source_ip: Some(src.parse().unwrap()),
            destination_ip: Some("10.245.1.3".parse().unwrap()),
            destination_port: 8080,
            principal: principal.map(String::from),
            request: None,
            l7_pending: false,
        };
        let s = state_with(true);
        let probe = s.authorize(&w, &attrs("10.245.1.1", None));
        assert!(probe.allowed, "{probe:?}");
        assert_eq!(probe.reason, FROM_NODE);
        // Another node, or another pod of this node: policy as always.
        assert!(!s.authorize(&w, &attrs("10.245.2.1", None)).allowed);
        assert!(!s.authorize(&w, &attrs("10.245.1.7", None)).allowed);
        // An mTLS peer is authorized by its identity, wherever it connects from.
        let other = "cluster.local/ns/other/sa/default";
        assert!(!s.authorize(&w, &attrs("10.245.1.1", Some(other))).allowed);
        let shop = "cluster.local/ns/shop/sa/default";
        assert!(s.authorize(&w, &attrs("10.245.2.9", Some(shop))).allowed);
        // Turned off: the node is just another plaintext source.
        let s = state_with(false);
        assert!(!s.authorize(&w, &attrs("10.245.1.1", None)).allowed);
    }
}
