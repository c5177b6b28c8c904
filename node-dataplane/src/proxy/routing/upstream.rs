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
use futures::FutureExt;
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
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Mirrored requests in flight per source pod at most; more are not mirrored.
pub const MAX_MIRRORS_IN_FLIGHT: usize = 256;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// A request body as sent upstream: streamed from the client, or buffered.
pub type ReqBody = BoxBody<Bytes, BoxError>;

/// Idle HTTP/1.1 connections kept per endpoint.
const MAX_IDLE_H1: usize = 16;
/// Endpoints with pooled connections before closed ones are swept.
const MAX_ENDPOINTS: usize = 1024;
/// A plaintext (not HBONE) connection must be established within this.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection must be ready for the next request within this (an HTTP/1.1
/// connection is not while the previous request's body is still being sent).
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Pooled connections unused this long are closed (each holds an HBONE stream).
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the pools are swept for idle and closed connections.
const SWEEP_EVERY: Duration = Duration::from_secs(10);

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

/// What sending a request on a connection gave.
pub enum Sent {
    Response(http::Response<UpBody>),
    /// The connection closed before the request was written: it comes back
    /// untouched, to be sent on another connection.
    NotSent(http::Request<ReqBody>),
}

/// A connection ready for one request.
pub enum Conn {
    H1(http1::SendRequest<ReqBody>),
    H2(http2::SendRequest<ReqBody>),
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

/// A pooled connection and when it was last used.
struct Idle<T> {
    send: T,
    since: Instant,
}

/// One source pod's connections to endpoints.
pub struct Upstreams {
    /// Mirrored requests in flight ([`MAX_MIRRORS_IN_FLIGHT`]).
    pub mirrors: Arc<tokio::sync::Semaphore>,
    h1: Mutex<HashMap<SocketAddr, Vec<Idle<http1::SendRequest<ReqBody>>>>>,
    h2: Mutex<HashMap<SocketAddr, Idle<http2::SendRequest<ReqBody>>>>,
    /// One HTTP/2 dial per endpoint at a time: a burst shares it.
    h2_dialing: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<()>>>>,
    last_sweep: Mutex<Instant>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self {
            mirrors: Arc::new(tokio::sync::Semaphore::new(MAX_MIRRORS_IN_FLIGHT)),
            h1: Default::default(),
            h2: Default::default(),
            h2_dialing: Default::default(),
            last_sweep: Mutex::new(Instant::now()),
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

    /// Closes pooled connections unused for [`IDLE_TIMEOUT`] and forgets closed
    /// ones, at most every [`SWEEP_EVERY`].
    fn sweep(&self) {
        let now = Instant::now();
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*last) < SWEEP_EVERY {
                return;
            }
            *last = now;
        }
        let fresh = |since: Instant| now.duration_since(since) < IDLE_TIMEOUT;
        self.h1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, v| {
                v.retain(|c| !c.send.is_closed() && fresh(c.since));
                !v.is_empty()
            });
        self.h2
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, c| !c.send.is_closed() && fresh(c.since));
        let mut dialing = self.h2_dialing.lock().unwrap_or_else(|p| p.into_inner());
        dialing.retain(|_, l| Arc::strong_count(l) > 1);
    }

    fn idle_h1(&self, ep: SocketAddr) -> Option<http1::SendRequest<ReqBody>> {
        let mut m = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        let v = m.get_mut(&ep)?;
        while let Some(c) = v.pop() {
            if !c.send.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c.send);
            }
        }
        None
    }

    fn put_h1(&self, ep: SocketAddr, s: http1::SendRequest<ReqBody>) {
        if s.is_closed() {
            return;
        }
        let mut m = self.h1.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() >= MAX_ENDPOINTS && !m.contains_key(&ep) {
            m.retain(|_, v| {
                v.retain(|c| !c.send.is_closed());
                !v.is_empty()
            });
            if m.len() >= MAX_ENDPOINTS {
                return; // not pooled: it closes when dropped
            }
        }
        let v = m.entry(ep).or_default();
        if v.len() < MAX_IDLE_H1 {
            v.push(Idle {
                send: s,
                since: Instant::now(),
            });
        }
    }

    async fn h2_sender(
        &self,
        from: &DialFrom<'_>,
        ep: SocketAddr,
    ) -> Result<http2::SendRequest<ReqBody>, SendError> {
        let cached = |m: &Mutex<HashMap<SocketAddr, Idle<http2::SendRequest<ReqBody>>>>| {
            let mut m = m.lock().unwrap_or_else(|p| p.into_inner());
            let c = m.get_mut(&ep).filter(|c| !c.send.is_closed())?;
            c.since = Instant::now();
            Some(c.send.clone())
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
        let mut m = self.h2.lock().unwrap_or_else(|p| p.into_inner());
        if m.len() < MAX_ENDPOINTS || m.contains_key(&ep) {
            m.insert(
                ep,
                Idle {
                    send: send.clone(),
                    since: Instant::now(),
                },
            );
        }
        Ok(send)
    }

    /// A connection to `ep` ready for one request: pooled, or new. Nothing is sent.
    pub async fn connection(
        &self,
        from: &DialFrom<'_>,
        ep: SocketAddr,
        h2: bool,
    ) -> Result<Conn, SendError> {
        self.sweep();
        let ready = |e: hyper::Error| SendError::Connect(ep, e.into());
        let timed_out = || {
            SendError::Connect(
                ep,
                anyhow::anyhow!("connection not ready within {READY_TIMEOUT:?}"),
            )
        };
        if h2 {
            let mut s = self.h2_sender(from, ep).await?;
            // Mostly ready at once: a timer only when it is not.
            match s.ready().now_or_never() {
                Some(r) => r.map_err(ready)?,
                None => tokio::time::timeout(READY_TIMEOUT, s.ready())
                    .await
                    .map_err(|_| timed_out())?
                    .map_err(ready)?,
            }
            return Ok(Conn::H2(s));
        }
        while let Some(mut s) = self.idle_h1(ep) {
            // A pooled connection the endpoint closed meanwhile: try the next one.
            let r = match s.ready().now_or_never() {
                Some(r) => Ok(r),
                None => tokio::time::timeout(READY_TIMEOUT, s.ready()).await,
            };
            if let Ok(Ok(())) = r {
                return Ok(Conn::H1(s));
            }
        }
        let io = self
            .dial(from, ep)
            .await
            .map_err(|e| SendError::Connect(ep, e))?;
        let (mut s, conn) = http1::handshake(TokioIo::new(io))
            .await
            .map_err(|e| SendError::Connect(ep, e.into()))?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(endpoint = %ep, error = %e, "routed HTTP/1 connection ended");
            }
        });
        tokio::time::timeout(READY_TIMEOUT, s.ready())
            .await
            .map_err(|_| timed_out())?
            .map_err(ready)?;
        Ok(Conn::H1(s))
    }

    /// Sends `req` on `conn` (a connection to `ep`); the response body streams from
    /// the endpoint. A request the connection never wrote comes back
    /// ([`Sent::NotSent`]).
    pub async fn send(
        self: &Arc<Self>,
        conn: Conn,
        ep: SocketAddr,
        req: http::Request<ReqBody>,
    ) -> Result<Sent, SendError> {
        match conn {
            Conn::H2(mut s) => match s.try_send_request(req).await {
                Ok(resp) => Ok(Sent::Response(resp.map(|b| UpBody {
                    inner: Some(b),
                    back: None,
                }))),
                Err(mut e) => match e.take_message() {
                    Some(req) => Ok(Sent::NotSent(req)),
                    None => Err(SendError::Request(ep, e.into_error())),
                },
            },
            Conn::H1(mut s) => {
                let resp = match s.try_send_request(req).await {
                    Ok(r) => r,
                    Err(mut e) => {
                        return match e.take_message() {
                            Some(req) => Ok(Sent::NotSent(req)),
                            None => Err(SendError::Request(ep, e.into_error())),
                        }
                    }
                };
                let (parts, inner) = resp.into_parts();
                let mut body = UpBody {
                    inner: Some(inner),
                    back: Some((Arc::downgrade(self), ep, s)),
                };
                if body.is_end_stream() {
                    body.release();
                }
                Ok(Sent::Response(http::Response::from_parts(parts, body)))
            }
        }
    }
}

/// A response body from an endpoint. An HTTP/1.1 connection goes back to the pool
/// when the body has ended (read to its end, or dropped once complete, as a
/// server does when the body's length is known); dropped before its end, the
/// connection closes.
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

impl Drop for UpBody {
    fn drop(&mut self) {
        if self.inner.as_ref().is_none_or(Body::is_end_stream) {
            self.release();
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
        let r = Pin::new(&mut *inner).poll_frame(cx);
        if matches!(r, Poll::Ready(None)) || inner.is_end_stream() {
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
