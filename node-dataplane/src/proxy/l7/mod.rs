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

pub mod http;
pub mod sniff;
pub mod upstream;

use super::state::{LocalPod, ProxyState};
use crate::wasm::abi::ConnProps;
use crate::wasm::plugin::{FailStrategy, Plugin};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sniff::Protocol;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use weft_api::authz::Attributes;
use weft_api::pb;

/// How long the first bytes may take before a connection counts as not HTTP.
pub const SNIFF_TIMEOUT: Duration = Duration::from_secs(5);

/// What a Service says about the protocol on a port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hint {
    Sniff,
    Http1,
    Http2,
    Opaque,
}

/// The protocol a Service port declares (see [`weft_api::protocol`]).
pub fn hint_of(app_protocol: &str, port_name: &str) -> Hint {
    use weft_api::protocol::{declared, Declared};
    match declared(app_protocol, port_name) {
        Declared::Http1 => Hint::Http1,
        Declared::Http2 => Hint::Http2,
        Declared::Opaque => Hint::Opaque,
        Declared::Unknown => Hint::Sniff,
    }
}

/// What L7 processing a connection to a workload and port needs.
#[derive(Clone)]
pub struct L7Plan {
    /// An applicable policy has L7 fields for this port.
    pub authz_http: bool,
    /// Plugins in execution order.
    pub plugins: Vec<Arc<Plugin>>,
    pub hint: Hint,
}

impl L7Plan {
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
    pub labels: super::metrics::TcpLabels,
    pub upstream: upstream::Upstream,
    /// Metric handles of this connection by (method, code): label sets are built
    /// once per connection, not per request.
    pub handles: std::sync::Mutex<Vec<RequestHandles>>,
}

type RequestHandles = (
    (&'static str, u16),
    prometheus_client::metrics::counter::Counter,
    prometheus_client::metrics::histogram::Histogram,
);

impl ConnCtx {
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
                let l = super::metrics::RequestLabels::new(&self.labels, method, code);
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

/// Serves one destination-side connection at L7. `io` is the HBONE tunnel or the
/// plaintext connection; returns when the connection ends.
pub async fn serve<S>(mut io: S, ctx: ConnCtx) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (proto, prefix) = match ctx.plan.hint {
        Hint::Http1 => (Protocol::Http1, Default::default()),
        Hint::Http2 => (Protocol::Http2, Default::default()),
        Hint::Opaque => (Protocol::Opaque, Default::default()),
        Hint::Sniff => sniff::sniff(&mut io, SNIFF_TIMEOUT).await?,
    };
    let io = sniff::Rewind::new(prefix, io);
    if proto == Protocol::Opaque {
        return serve_opaque(io, ctx).await;
    }
    let ctx = Arc::new(ctx);
    let svc = {
        let ctx = ctx.clone();
        hyper::service::service_fn(move |req| {
            let ctx = ctx.clone();
            async move { Ok::<_, std::convert::Infallible>(http::handle(req, ctx, proto).await) }
        })
    };
    let io = TokioIo::new(io);
    let r = match proto {
        Protocol::Http2 => hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .serve_connection(io, svc)
            .await
            .map_err(anyhow::Error::from),
        _ => {
            let server = hyper::server::conn::http1::Builder::new()
                .keep_alive(true)
                .serve_connection(io, svc)
                .with_upgrades();
            // The first upstream connection is driven in this task, next to the
            // downstream one: a request and its response cross no task boundary.
            // (If the app closes it, later requests reconnect on a spawned task.)
            match ctx.upstream.open_h1().await {
                Ok(upstream) => {
                    tokio::pin!(server, upstream);
                    let mut upstream_done = false;
                    loop {
                        tokio::select! {
                            r = &mut server => break r.map_err(anyhow::Error::from),
                            _ = &mut upstream, if !upstream_done => upstream_done = true,
                        }
                    }
                }
                Err(_) => server.await.map_err(anyhow::Error::from),
            }
        }
    };
    r.map_err(|e| e.context(format!("HTTP connection to {}", ctx.dst)))
}

/// Not HTTP on a port with L7 rules or plugins: authorize without a request
/// (fail-closed for L7 fields), refuse if a plugin does not fail open, else copy.
async fn serve_opaque<S>(mut io: sniff::Rewind<S>, ctx: ConnCtx) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let d = ctx.state.authorize(&ctx.target.workload, &ctx.attrs);
    if !d.allowed {
        ctx.state
            .counters
            .l7_opaque_denied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(dst = %ctx.dst, peer = ?ctx.attrs.principal, policy = ?d.policy, "connection denied: not HTTP on a port with L7 rules");
        return Ok(());
    }
    if let Some(p) = ctx.plan.plugins_refuse_opaque() {
        ctx.state
            .counters
            .l7_opaque_denied
            .fetch_add(1, Ordering::Relaxed);
        tracing::info!(dst = %ctx.dst, plugin = p, "connection refused: not HTTP on a port with a Wasm plugin that does not fail open");
        return Ok(());
    }
    let mut app = ctx.upstream.connect().await?;
    super::copy::bidirectional(&mut io, &mut app).await?;
    Ok(())
}

impl ProxyState {
    /// The L7 processing a connection to `w` on `port` needs, or `None` for L4 only.
    pub fn l7_plan(&self, w: &pb::Workload, port: u16) -> Option<L7Plan> {
        let authz_http = self
            .compiled_policies()
            .iter()
            .any(|p| p.applies_to_labels(&w.namespace, &w.labels) && p.needs_http(port));
        let plugins = self
            .plugins
            .as_ref()
            .map(|r| r.for_workload(w, port))
            .unwrap_or_default();
        if !authz_http && plugins.is_empty() {
            return None;
        }
        Some(L7Plan {
            authz_http,
            plugins,
            hint: self.port_hint(w, port),
        })
    }

    /// The protocol a Service selecting `w` declares for target port `port`.
    fn port_hint(&self, w: &pb::Workload, port: u16) -> Hint {
        let snap = self.config.snapshot();
        for s in snap.services.values() {
            if s.namespace != w.namespace
                || s.selector.is_empty()
                || !s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
            {
                continue;
            }
            for p in &s.ports {
                let target = match p.target_port.parse::<u16>() {
                    Ok(t) => Some(t),
                    Err(_) if p.target_port.is_empty() => u16::try_from(p.port).ok(),
                    Err(_) => w
                        .ports
                        .iter()
                        .find(|c| c.name == p.target_port)
                        .and_then(|c| u16::try_from(c.port).ok()),
                };
                if target == Some(port) {
                    let h = hint_of(&p.app_protocol, &p.name);
                    if h != Hint::Sniff {
                        return h;
                    }
                }
            }
        }
        Hint::Sniff
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_hints() {
        assert_eq!(hint_of("", "http-web"), Hint::Http1);
        assert_eq!(hint_of("", "grpc-api"), Hint::Http2);
        assert_eq!(hint_of("tcp", "http"), Hint::Opaque);
        assert_eq!(hint_of("", "web"), Hint::Sniff);
    }
}
