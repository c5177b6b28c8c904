//! HTTP connections from one source pod to the endpoints its routed requests go to:
//! each request picks its endpoint, so connections are kept per endpoint and
//! reused. HTTP/1.1: idle connections are kept and one request uses a connection
//! at a time (it returns to the pool when its response body ends); HTTP/2: one
//! multiplexed connection per endpoint. A connection to an enrolled endpoint is an
//! HBONE stream (mTLS with the source pod's identity, so the destination's
//! policies and plugins decide as for any mesh connection); to anything else, a
//! TCP connection from the pod's network namespace.

use super::super::local::LocalPod;
use super::super::pool::{Dial, StreamGuard};
use super::super::state::ProxyState;
use super::super::tunnel::TunnelIo;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body as sent upstream: streamed from the client, or buffered.
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 16;
/// Endpoints with idle HTTP/1.1 connections before closed ones are swept.
const MAX_ENDPOINTS: usize = 1024;
/// A plaintext (not HBONE) connection must be established within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request did not get a response.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection to the endpoint: nothing was sent (always safe to retry).
    #[error("connecting to {0}: {1:#}")]
    Connect(SocketAddr, anyhow::Error),
    /// The request was sent, or partly sent, and failed.
    #[error("request to {0}: {1}")]
    Request(SocketAddr, hyper::Error),
}

/// Both kinds of upstream connection.
enum UpIo {
    Tcp(tokio::net::TcpStream),
    /// `_slot` releases the HBONE connection's stream slot when dropped.
    Hbone {
        io: Box<TunnelIo>,
        _slot: StreamGuard,
    },
}

impl AsyncRead for UpIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpIo::Hbone { io: t, .. } => Pin::new(t.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, b: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_write(cx, b),
            UpIo::Hbone { io: t, .. } => Pin::new(t.as_mut()).poll_write(cx, b),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpIo::Hbone { io: t, .. } => Pin::new(t.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpIo::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpIo::Hbone { io: t, .. } => Pin::new(t.as_mut()).poll_shutdown(cx),
        }
    }
}

/// One source pod's connections to endpoints.
pub struct Upstreams {
    /// Mirrored requests in flight ([`super::forward::MAX_MIRRORS_IN_FLIGHT`]).
    pub mirrors: Arc<tokio::sync::Semaphore>,
    h1: Mutex<HashMap<SocketAddr, Vec<http1::SendRequest<ReqBody>>>>,
    h2: Mutex<HashMap<SocketAddr, http2::SendRequest<ReqBody>>>,
    /// One HTTP/2 dial per endpoint at a time: a burst shares it.
    h2_dialing: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            mirrors: Arc::new(tokio::sync::Semaphore::new(
                super::forward::MAX_MIRRORS_IN_FLIGHT,
            )),
            h1: Default::default(),
            h2: Default::default(),
            h2_dialing: Default::default(),
        }
    }
}

/// Who dials: the proxy state and the source pod.
pub struct DialFrom<'a> {
    pub state: &'a ProxyState,
    pub source: &'a LocalPod,
}

impl Upstreams {
    async fn dial(&self, from: &DialFrom<'_>, ep: SocketAddr) -> anyhow::Result<UpIo> {
        let state = from.state;
        let dest = state.workload_by_ip(ep.ip());
        if let Some(w) = dest.filter(|w| w.enrolled && !w.spiffe_id.is_empty()) {
            let dial = Dial {
                source: from.source,
                certs: &state.certs,
                config: &state.config,
                mark: state.mark,
            };
            let (tunnel, guard) = state.pool.open(dial, &w, ep.ip(), ep).await?;
            return Ok(UpIo::Hbone {
                io: Box::new(TunnelIo::new(tunnel)),
                _slot: guard,
            });
        }
        let sock = from
            .source
            .netns
            .tcp_socket(ep.is_ipv6(), state.mark)
            .await?;
        let connect = tokio::net::TcpSocket::from_std_stream(sock.into()).connect(ep);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| anyhow::anyhow!("not connected within {CONNECT_TIMEOUT:?}"))??;
        let _ = tcp.set_nodelay(true);
        Ok(UpIo::Tcp(tcp))
    }

    fn idle_h1(&self, ep: SocketAddr) -> Option<http1::SendRequest<ReqBody>> {
        let mut m = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.get_mut(&ep)?;
        while let Some(s) = v.pop() {
            if !s.is_closed() {
                return Some(s);
            }
        }
        None
    }

    fn put_h1(&self, ep: SocketAddr, s: http1::SendRequest<ReqBody>) {
        if s.is_closed() {
            return;
        }
        let mut m = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ENDPOINTS {
            // Endpoints come and go: forget those whose connections all closed.
            m.retain(|_, v| {
                v.retain(|s| !s.is_closed());
                !v.is_empty()
            });
        }
        let v = m.entry(ep).or_default();
        if v.len() < MAX_IDLE_H1 {
            v.push(s);
        }
    }

    async fn h2_sender(
        &self,
        from: &DialFrom<'_>,
        ep: SocketAddr,
    ) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let cached = |m: &Mutex<HashMap<SocketAddr, http2::SendRequest<ReqBody>>>| {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&ep)
                .filter(|s| !s.is_closed())
                .cloned()
        };
        if let Some(s) = cached(&self.h2) {
            return Ok(s);
        }
        let lock = self
            .h2_dialing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(ep)
            .or_default()
            .clone();
        let _dialing = lock.lock().await;
        if let Some(s) = cached(&self.h2) {
            return Ok(s);
        }
        let io = self
            .dial(from, ep)
            .await
            .map_err(|e| SendError::Connect(ep, e))?;
        let (send, conn) = http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(ep, e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %ep, error = %e, "routed HTTP/2 connection ended");
            }
        });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep, send.clone());
        Ok(send)
    }

    /// Sends `req` to `ep` over HTTP/2 or HTTP/1.1 and returns the response (its
    /// body streams from the endpoint).
    pub async fn send(
        self: &Arc<Self>,
        from: &DialFrom<'_>,
        ep: SocketAddr,
        h2: bool,
        req: http::Request<ReqBody>,
    ) -> Result<http::Response<UpBody>, SendError> {
        if h2 {
            let mut s = self.h2_sender(from, ep).await?;
            s.ready().await.map_err(|e| SendError::Request(ep, e))?;
            let resp = s
                .send_request(req)
                .await
                .map_err(|e| SendError::Request(ep, e))?;
            return Ok(resp.map(|b| UpBody {
                inner: Some(b),
                back: None,
            }));
        }
        let mut s = match self.idle_h1(ep) {
            Some(s) => s,
            None => {
                let io = self
                    .dial(from, ep)
                    .await
                    .map_err(|e| SendError::Connect(ep, e))?;
                let (s, conn) = http1::handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| SendError::Connect(ep, e.into()))?;
                tokio::spawn(async move {
                    if let Err(e) = conn.await {
                        tracing::debug!(endpoint = %ep, error = %e, "routed HTTP/1 connection ended");
                    }
                });
                s
            }
        };
        s.ready().await.map_err(|e| SendError::Request(ep, e))?;
        let resp = s
            .send_request(req)
            .await
            .map_err(|e| SendError::Request(ep, e))?;
        let (parts, inner) = resp.into_parts();
        let ended = inner.is_end_stream();
        let mut body = UpBody {
            inner: Some(inner),
            back: None,
        };
        if ended {
            self.put_h1(ep, s);
        } else {
            body.back = Some((Arc::downgrade(self), ep, s));
        }
        Ok(http::Response::from_parts(parts, body))
    }
}

/// A response body from an endpoint. An HTTP/1.1 connection goes back to the pool
/// when the body ends (dropped before: the connection closes).
pub struct UpBody {
    inner: Option<Incoming>,
    back: Option<(Weak<Upstreams>, SocketAddr, http1::SendRequest<ReqBody>)>,
}

impl UpBody {
    fn release(&mut self) {
        if let Some((pool, ep, s)) = self.back.take() {
            if let Some(pool) = pool.upgrade() {
                pool.put_h1(ep, s);
            }
        }
    }
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let r = Pin::new(inner).poll_frame(cx);
        if let Poll::Ready(None) = r {
            this.release();
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }

    fn size_hint(&self) -> SizeHint {
        self.inner
            .as_ref()
            .map(Body::size_hint)
            .unwrap_or_else(|| SizeHint::with_exact(0))
    }
}
