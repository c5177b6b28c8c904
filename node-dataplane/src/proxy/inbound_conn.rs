//! What both inbound listeners do with one connection to a local workload, once
//! the transport has told who is calling ([`super::inbound`] for HBONE streams,
//! [`super::inbound_passthrough`] for plaintext from outside the mesh):
//! authorize it, and, if allowed, register it for re-authorization on policy
//! changes, count it, and serve it at L7 (when a policy or plugin needs HTTP) or
//! copy its bytes to the application from inside the pod's network namespace.
//! The connection's [`ConnRecord`] writes its metrics and access-log record.

use super::conns::Registration;
use super::copy::reset_on_close;
use super::idle::Kind;
use super::l7::{self, ConnCtx, ConnInfo, L7Plan};
use super::local::LocalPod;
use super::record::ConnRecord;
use super::state::ProxyState;
use super::tunnel::{Tunnel, TunnelIo};
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use weft_authz::{Attributes, Decision};

/// An inbound connection to a local workload, before authorization.
pub(crate) struct InboundConn {
    pub state: Arc<ProxyState>,
    pub target: LocalPod,
    pub peer: SocketAddr,
    /// The original destination (the workload's IP and port).
    pub dst: SocketAddr,
    /// The client's SPIFFE ID (`spiffe://...`) when it came over HBONE; `None`:
    /// plaintext from outside the mesh, authorized as unauthenticated.
    pub peer_id: Option<String>,
    pub record: ConnRecord,
}

/// An inbound connection that its destination's policies allow.
pub(crate) struct Admitted {
    conn: InboundConn,
    plan: Option<L7Plan>,
    attrs: Attributes,
}

impl InboundConn {
    pub(crate) fn new(
        state: Arc<ProxyState>,
        target: LocalPod,
        peer: SocketAddr,
        dst: SocketAddr,
        peer_id: Option<String>,
        mut record: ConnRecord,
    ) -> Self {
        let workload = target.workload();
        record.peers.destination_identity = Some(workload.spiffe_id.clone());
        record.peers.destination_workload = Some(workload);
        Self {
            state,
            target,
            peer,
            dst,
            peer_id,
            record,
        }
    }

    /// Authorizes the connection with its L4 attributes (L7 fields are checked per
    /// request when it is parsed as HTTP). A denial is counted and logged here; the
    /// caller refuses the connection.
    pub(crate) fn authorize(mut self) -> Result<Admitted, Decision> {
        if super::ports::is_proxy_port(self.dst.port()) {
            // Proxied, it would come back to this listener, and again.
            let d = Decision {
                allowed: false,
                policy: None,
                rule: None,
                audited: Vec::new(),
                reason: "the proxy's own port is never a destination",
            };
            self.record.decided(&d);
            tracing::debug!(peer = %self.peer, dst = %self.dst, "connection to a proxy port refused");
            return Err(d);
        }
        let workload = &self.target.workload();
        // A probe from the node is passed to the application as it is: no policy,
        // so no HTTP parsing either (nor plugins, as Istio's probes skip them).
        let from_node = self.peer_id.is_none() && self.state.node_addresses.exempts(self.peer.ip());
        let plan = match from_node {
            true => None,
            false => self.state.l7_plan(workload, self.dst.port()),
        };
        let attrs = Attributes {
            source_ip: Some(self.peer.ip()),
            destination_ip: Some(self.dst.ip()),
            destination_port: self.dst.port(),
            principal: self
                .peer_id
                .as_deref()
                .map(|id| id.strip_prefix("spiffe://").unwrap_or(id).to_string()),
            request: None,
            l7_pending: plan.as_ref().is_some_and(L7Plan::parses_http),
        };
        let d = self.state.authorize(workload, &attrs);
        self.record.decided(&d);
        if !d.allowed {
            tracing::debug!(peer = %self.peer, dst = %self.dst, principal = ?attrs.principal, policy = ?d.policy, reason = d.reason, "connection denied");
            return Err(d);
        }
        Ok(Admitted {
            conn: self,
            plan,
            attrs,
        })
    }
}

/// How an allowed connection ended.
enum Ended {
    /// Served per request at L7 (the requests carry the detail), or closed there
    /// while idle.
    Parsed,
    /// Copied at L4: bytes to the application, from it.
    Copied(u64, u64),
    /// Reset because a policy change denies it now.
    ClosedByPolicy,
}

impl Admitted {
    /// Serves the connection until it ends; `down` is the client side.
    pub(crate) async fn serve(self, down: impl Downstream) {
        let Admitted {
            conn:
                InboundConn {
                    state,
                    target,
                    peer,
                    dst,
                    peer_id,
                    mut record,
                },
            plan,
            attrs,
        } = self;
        let reg = state.conns.register(target.workload.clone(), attrs.clone());
        let destination = target.workload();
        let source = state.workload_by_ip(peer.ip());
        let mut labels = crate::metrics::traffic::labels(
            "destination",
            source.as_deref(),
            Some(&destination),
            peer_id.is_some(),
        );
        if let Some(id) = &peer_id {
            labels.source_principal = id.clone();
        }
        record.open(labels.clone());
        let served = match plan {
            Some(plan) => {
                record.l7();
                let info = ConnInfo {
                    target,
                    dst,
                    peer,
                    attrs,
                    peer_id,
                    labels,
                };
                let ctx = ConnCtx::new(state.clone(), info, plan);
                // Closed (through `reg.cancel`) when it waits for a request too long.
                let activity = ctx.activity.clone();
                let _watched = state.idle.watch(
                    activity.clone(),
                    reg.cancel.clone(),
                    state.http_idle_timeout,
                    Kind::Http,
                );
                tokio::select! {
                    r = l7::serve(down.into_io(), ctx) => r.map(|()| Ended::Parsed),
                    _ = reg.cancel.cancelled() => Ok(if activity.closed_idle() {
                        Ended::Parsed
                    } else {
                        Ended::ClosedByPolicy
                    }),
                }
            }
            None => copy_to_app(&state, &target, dst, down, &record, &reg).await,
        };
        drop(reg);
        match served {
            Ok(Ended::Parsed) => {}
            Ok(Ended::Copied(a, b)) => record.bytes(a, b),
            Ok(Ended::ClosedByPolicy) => record.closed_by_policy(),
            Err(e) => {
                tracing::debug!(%peer, %dst, error = %format!("{e:#}"), "inbound connection ended with an error");
                record.fail(&e);
            }
        }
    }
}

/// L4: connects to the application from inside its pod and copies both ways.
async fn copy_to_app(
    state: &ProxyState,
    target: &LocalPod,
    dst: SocketAddr,
    down: impl Downstream,
    record: &ConnRecord,
    reg: &Registration,
) -> anyhow::Result<Ended> {
    let sock = target.netns.tcp_socket(dst.is_ipv6(), state.mark).await?;
    let app = tokio::net::TcpSocket::from_std_stream(sock.into())
        .connect(dst)
        .await?;
    record.forwarded();
    Ok(match down.relay(app, &reg.cancel).await? {
        Some((a, b)) => Ended::Copied(a, b),
        None => Ended::ClosedByPolicy,
    })
}

/// The client side of an inbound connection: a plaintext TCP connection, or an
/// HBONE stream.
pub(crate) trait Downstream: Send + 'static {
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// As a byte stream, for the L7 path.
    fn into_io(self) -> Self::Io;

    /// Copies both ways with `app` until both sides are done: `Some((to the
    /// application, from it))`; or, when `cancel` fires first, resets both sides:
    /// `None`.
    fn relay(
        self,
        app: TcpStream,
        cancel: &CancellationToken,
    ) -> impl Future<Output = io::Result<Option<(u64, u64)>>> + Send;
}

impl Downstream for TcpStream {
    type Io = TcpStream;

    fn into_io(self) -> TcpStream {
        self
    }

    async fn relay(
        mut self,
        mut app: TcpStream,
        cancel: &CancellationToken,
    ) -> io::Result<Option<(u64, u64)>> {
        tokio::select! {
            r = super::copy::bidirectional(&mut self, &mut app) => r.map(Some),
            _ = cancel.cancelled() => {
                reset_on_close(&self);
                reset_on_close(&app);
                Ok(None)
            }
        }
    }
}

impl Downstream for Tunnel {
    type Io = TunnelIo;

    fn into_io(self) -> TunnelIo {
        TunnelIo::new(self)
    }

    async fn relay(
        self,
        mut app: TcpStream,
        cancel: &CancellationToken,
    ) -> io::Result<Option<(u64, u64)>> {
        tokio::select! {
            // (to the tunnel, to the application)
            r = super::tunnel::copy(&mut app, self) => r.map(|(b, a)| Some((a, b))),
            // Dropping the tunnel (with the copy) resets the stream.
            _ = cancel.cancelled() => {
                reset_on_close(&app);
                Ok(None)
            }
        }
    }
}
