//! L7 on the destination side, in the node proxy itself (no waypoint): when an
//! AuthorizationPolicy with HTTP fields or a Wasm plugin applies to the destination
//! workload and port, the connection (after HBONE termination, or plaintext from
//! outside the mesh) is parsed as HTTP and every request is authorized and run
//! through the plugins.
//!
//! The protocol is sniffed from the first bytes (HTTP/1.x request line, or the
//! HTTP/2 prior-knowledge preface), unless a Service port declares it
//! (`appProtocol` or an Istio-style port name). Traffic that is not HTTP on such a
//! port is authorized without a request: an ALLOW rule with L7 fields never
//! matches it and a DENY rule with L7 fields always does, and a plugin that does not
//! fail open refuses it. Never more permissive than the policy.

pub mod h1;
pub mod http;
pub mod jwt;
pub mod message;
pub mod upstream;

#[cfg(test)]
mod tests;

use super::counters::NodeCounters;
use super::local::LocalPod;
use super::sniff::{self, Protocol};
use super::state::{ProxyState, RequestAuthz};
use crate::wasm::abi::ConnProps;
use crate::wasm::plugin::{FailStrategy, Plugin};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_authz::Attributes;
use weft_proto::pb;
use weft_proto::protocol::{declared, Declared};

pub use super::sniff::SNIFF_TIMEOUT;

/// What L7 processing a connection to a workload and port needs.
#[derive(Clone)]
pub struct L7Plan {
    /// An applicable policy has L7 fields for this port.
    pub authz_http: bool,
    /// The policies and the workload the plan was made from: when either changes,
    /// a request's need for L7 authorization is decided again
    /// ([`ConnCtx::authz_http`]).
    pub policies: Arc<super::policies::CompiledPolicies>,
    pub workload: Arc<pb::Workload>,
    /// Plugins in execution order.
    pub plugins: Vec<Arc<Plugin>>,
    /// What a Service declares for the port; `Unknown`: sniff.
    pub declared: Declared,
}

impl L7Plan {
    /// Will the connection be parsed as HTTP (unless sniffing finds otherwise)?
    pub fn parses_http(&self) -> bool {
        self.declared != Declared::Opaque
    }

    /// Would not-HTTP traffic be refused by a plugin (one that does not fail open)?
    fn plugins_refuse_opaque(&self) -> Option<&str> {
        self.plugins
            .iter()
            .find(|p| p.fail != FailStrategy::Open)
            .map(|p| p.id.as_str())
    }
}

/// What every request on one connection shares.
pub struct ConnCtx {
    pub state: Arc<ProxyState>,
    pub target: LocalPod,
    pub dst: SocketAddr,
    /// The connection's L4 attributes (no request).
    pub attrs: Attributes,
    pub props: Arc<ConnProps>,
    pub plan: L7Plan,
    pub labels: crate::metrics::traffic::TcpLabels,
    pub upstream: upstream::Upstream,
    /// Metric handles of this connection by (method, code): label sets are built
    /// once per connection, not per request.
    pub handles: std::sync::Mutex<Vec<RequestHandles>>,
    /// Authorization decision counters of this connection by (allowed, policy).
    decisions: std::sync::Mutex<Vec<DecisionCounter>>,
    /// What its requests' authorization reuses.
    pub authz: std::sync::Mutex<RequestAuthz>,
    /// The JWT rules its requests are verified with, and what they were taken
    /// from (taken again when the RequestAuthentications or the workload change).
    authn: std::sync::Mutex<Option<AuthnRules>>,
    /// What its requests' plugin runs reuse ([`http::PluginRun`]).
    runs: std::sync::Mutex<Option<http::PluginRun>>,
    /// Whether it is waiting for a request, for the proxy's idle sweep: busy
    /// during an exchange, and for good once it carries anything but HTTP/1
    /// requests (HTTP/2, opaque bytes, an upgrade).
    pub activity: Arc<super::idle::Activity>,
}

type AuthnRules = (
    Arc<super::request_authn::CompiledAuthn>,
    Arc<pb::Workload>,
    Arc<[weft_authn::CompiledRule]>,
);

type DecisionCounter = (
    (bool, Option<Arc<str>>),
    prometheus_client::metrics::counter::Counter,
);

type RequestHandles = (
    (&'static str, u16),
    prometheus_client::metrics::counter::Counter,
    prometheus_client::metrics::histogram::Histogram,
);

/// Who one connection is between, as its L7 context needs it.
pub struct ConnInfo {
    /// The local workload the connection goes to.
    pub target: LocalPod,
    /// Its original destination (the workload's IP and port).
    pub dst: SocketAddr,
    pub peer: SocketAddr,
    /// Its L4 attributes (requests add theirs).
    pub attrs: Attributes,
    /// The client's SPIFFE ID, if it came over mTLS.
    pub peer_id: Option<String>,
    /// Its traffic metric labels (requests add method and code).
    pub labels: crate::metrics::traffic::TcpLabels,
}

impl ConnCtx {
    /// The context of one connection, parsed as `plan` says.
    pub fn new(state: Arc<ProxyState>, info: ConnInfo, plan: L7Plan) -> Self {
        let ConnInfo {
            target,
            dst,
            peer,
            attrs,
            peer_id,
            labels,
        } = info;
        let attrs = Attributes {
            l7_pending: false,
            ..attrs
        };
        Self {
            upstream: upstream::Upstream::new(target.netns.clone(), dst, state.mark),
            state,
            target,
            dst,
            authz: std::sync::Mutex::new(RequestAuthz::new(attrs.clone())),
            attrs,
            props: Arc::new(ConnProps {
                source: peer,
                destination: dst,
                peer_id,
            }),
            plan,
            labels,
            handles: Default::default(),
            decisions: Default::default(),
            authn: Default::default(),
            runs: Default::default(),
            activity: Default::default(),
        }
    }

    /// Whether a request must be authorized with its HTTP fields: as planned when
    /// the connection opened, unless the policies or the pod's workload (its
    /// labels) changed since; then as they say now. So a keep-alive connection
    /// parsed only for a plugin is checked against an L7 policy added later.
    pub fn authz_http(&self, workload: &Arc<pb::Workload>) -> bool {
        if self.plan.authz_http {
            return true;
        }
        let now = self.state.compiled_policies();
        if Arc::ptr_eq(&now, &self.plan.policies) && Arc::ptr_eq(workload, &self.plan.workload) {
            return false;
        }
        let needs = now
            .applicable(workload)
            .any(|p| p.needs_http(self.dst.port()));
        needs
    }

    /// The JWT rules that apply to `workload` now (empty: no RequestAuthentication
    /// does). Looked up once per connection unless the RequestAuthentications or
    /// the workload (its labels) changed since, so one added while a keep-alive
    /// connection is open applies from its next request.
    pub fn authn_rules(&self, workload: &Arc<pb::Workload>) -> Arc<[weft_authn::CompiledRule]> {
        let now = self.state.compiled_authn();
        let mut held = self.authn.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((from, w, rules)) = held.as_ref() {
            if Arc::ptr_eq(from, &now) && Arc::ptr_eq(w, workload) {
                return rules.clone();
            }
        }
        let rules = now.rules_for(workload);
        *held = Some((now, workload.clone(), rules.clone()));
        rules
    }

    /// Counts a request's authorization decision, as [`ProxyState::authorize`]
    /// does for connections; the counter is looked up once per connection.
    pub fn count_decision(&self, d: &weft_authz::Decision) {
        let mut counters = self.decisions.lock().unwrap_or_else(|p| p.into_inner());
        let hit = counters
            .iter()
            .find(|((allowed, policy), _)| *allowed == d.allowed && *policy == d.policy);
        match hit {
            Some((_, c)) => {
                c.inc();
            }
            None => {
                let l = crate::metrics::traffic::AuthzLabels {
                    decision: if d.allowed { "allow" } else { "deny" },
                    policy: d.policy.as_deref().unwrap_or("none").to_string(),
                };
                let c = self.state.metrics.traffic.authz.get_or_create(&l).clone();
                c.inc();
                counters.push(((d.allowed, d.policy.clone()), c));
            }
        }
    }

    pub fn record_request(
        &self,
        method: &'static str,
        code: u16,
        took: Duration,
        decided_by: Option<&str>,
    ) {
        let mut handles = self.handles.lock().unwrap_or_else(|p| p.into_inner());
        let i = match handles.iter().position(|(k, _, _)| *k == (method, code)) {
            Some(i) => i,
            None => {
                let l = crate::metrics::traffic::RequestLabels {
                    connection: self.labels.clone(),
                    request_method: method,
                    response_code: code,
                };
                let t = &self.state.metrics.traffic;
                handles.push((
                    (method, code),
                    t.requests.get_or_create(&l).clone(),
                    t.request_duration.get_or_create(&l).clone(),
                ));
                handles.len() - 1
            }
        };
        let (_, count, hist) = &handles[i];
        count.inc();
        hist.observe(took.as_secs_f64());
        drop(handles);
        if let Some(d) = decided_by {
            tracing::debug!(dst = %self.dst, code, decided_by = d, "request answered locally");
        }
    }
}

/// The L7 context of a connection from `peer` (with SPIFFE ID `peer_id`, if it
/// came over mTLS) to `workload` at `dst`, as the policies of `state` plan it; the
/// application is reached from the calling thread's network namespace. For tests
/// and benchmarks.
#[cfg(any(test, feature = "testing"))]
pub fn test_ctx(
    state: &Arc<ProxyState>,
    workload: Arc<pb::Workload>,
    dst: SocketAddr,
    peer: SocketAddr,
    peer_id: Option<&str>,
) -> anyhow::Result<ConnCtx> {
    let plan = state
        .l7_plan(&workload, dst.port())
        .ok_or_else(|| anyhow::anyhow!("no policy or plugin makes {dst} L7"))?;
    let attrs = Attributes {
        source_ip: Some(peer.ip()),
        destination_ip: Some(dst.ip()),
        destination_port: dst.port(),
        principal: peer_id.map(|id| id.trim_start_matches("spiffe://").to_string()),
        request: None,
        l7_pending: true,
    };
    let labels =
        crate::metrics::traffic::labels("destination", None, Some(&workload), peer_id.is_some());
    let netns = Arc::new(crate::netns::PodNetns::open("/proc/self/ns/net")?);
    let info = ConnInfo {
        target: LocalPod {
            workload: super::local::LiveWorkload::new(workload),
            netns,
        },
        dst,
        peer,
        attrs,
        peer_id: peer_id.map(str::to_string),
        labels,
    };
    Ok(ConnCtx::new(state.clone(), info, plan))
}

/// Serves one destination-side connection at L7. `io` is the HBONE tunnel or the
/// plaintext connection; returns when the connection ends.
pub async fn serve<S>(mut io: S, ctx: ConnCtx) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (proto, prefix) = match ctx.plan.declared {
        Declared::Http1 => (Protocol::Http1, Default::default()),
        Declared::Http2 => {
            // Not held before its first bytes: a client that connects and sends
            // nothing is closed by the idle sweep.
            let mut prefix = bytes::BytesMut::with_capacity(64);
            if tokio::io::AsyncReadExt::read_buf(&mut io, &mut prefix).await? == 0 {
                return Ok(());
            }
            (Protocol::Http2, prefix)
        }
        Declared::Opaque => (Protocol::Opaque, Default::default()),
        Declared::Unknown => {
            // Silence means a protocol whose server speaks first, not idleness: the
            // sniff bounds it.
            ctx.activity.begin();
            let sniffed = sniff::sniff(&mut io, SNIFF_TIMEOUT).await;
            ctx.activity.end();
            sniffed?
        }
    };
    if proto == Protocol::Http1 {
        let ctx = Arc::new(ctx);
        return h1::serve(prefix, io, ctx.clone())
            .await
            .map_err(|e| e.context(format!("HTTP/1 connection to {}", ctx.dst)));
    }
    let io = sniff::Rewind::new(prefix, io);
    // Neither opaque bytes nor HTTP/2 streams are ever idle here.
    ctx.activity.hold();
    if proto == Protocol::Opaque {
        return serve_opaque(io, ctx).await;
    }
    let ctx = Arc::new(ctx);
    let svc = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, std::convert::Infallible>(http::serve_h2_request(req, ctx).await) }
        })
    };
    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
        .serve_connection(TokioIo::new(io), svc)
        .await
        .map_err(|e| anyhow::Error::from(e).context(format!("HTTP/2 connection to {}", ctx.dst)))
}

/// Not HTTP on a port with L7 rules or plugins: authorize without a request
/// (fail-closed for L7 fields), refuse if a plugin does not fail open, else copy.
async fn serve_opaque<S>(mut io: sniff::Rewind<S>, ctx: ConnCtx) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let d = ctx.state.authorize(&ctx.target.workload(), &ctx.attrs);
    if !d.allowed {
        NodeCounters::count(&ctx.state.counters.l7_opaque_denied);
        tracing::info!(dst = %ctx.dst, peer = ?ctx.attrs.principal, policy = ?d.policy, "connection denied: not HTTP on a port with L7 rules");
        return Ok(());
    }
    if ctx.plan.declared != Declared::Opaque && !ctx.authn_rules(&ctx.target.workload()).is_empty()
    {
        // Its tokens (and claim headers) could not be checked: never let them through.
        NodeCounters::count(&ctx.state.counters.l7_opaque_denied);
        tracing::info!(dst = %ctx.dst, "connection refused: not HTTP on a port of a workload with a RequestAuthentication (declare the port's protocol if it is not HTTP)");
        return Ok(());
    }
    if let Some(p) = ctx.plan.plugins_refuse_opaque() {
        NodeCounters::count(&ctx.state.counters.l7_opaque_denied);
        tracing::info!(dst = %ctx.dst, plugin = p, "connection refused: not HTTP on a port with a Wasm plugin that does not fail open");
        return Ok(());
    }
    let mut app = ctx.upstream.connect().await?;
    super::copy::bidirectional(&mut io, &mut app).await?;
    Ok(())
}

impl ProxyState {
    /// The L7 processing a connection to `w` on `port` needs, or `None` for L4 only.
    pub fn l7_plan(&self, w: &Arc<pb::Workload>, port: u16) -> Option<L7Plan> {
        let policies = self.compiled_policies();
        let authz_http = policies.applicable(w).any(|p| p.needs_http(port));
        let plugins = self
            .plugins
            .as_ref()
            .map(|r| r.for_workload(w, port))
            .unwrap_or_default();
        let authn = self.compiled_authn().applies(w);
        if !authz_http && plugins.is_empty() && !authn {
            return None;
        }
        Some(L7Plan {
            authz_http,
            policies,
            workload: w.clone(),
            plugins,
            declared: self.declared_protocol(w, port),
        })
    }

    /// The protocol a Service declares for `port` of `w`: the Service ports whose
    /// resolved target port on `w`'s endpoint is `port`.
    fn declared_protocol(&self, w: &pb::Workload, port: u16) -> Declared {
        let snap = self.config.snapshot();
        snap.services
            .values()
            .filter(|s| s.namespace == w.namespace)
            .filter_map(|s| {
                let e = s.endpoints.iter().find(|e| e.workload_uid == w.uid)?;
                s.ports
                    .iter()
                    .filter(|p| e.target_ports.get(&p.port) == Some(&u32::from(port)))
                    .map(|p| declared(&p.app_protocol, &p.name))
                    .find(|d| *d != Declared::Unknown)
            })
            .next()
            .unwrap_or(Declared::Unknown)
    }
}
