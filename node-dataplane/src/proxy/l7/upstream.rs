//! The connection from the node proxy to the application, for parsed HTTP: one per
//! downstream connection, in the downstream's HTTP version (HTTP/1.1 keep-alive is
//! mirrored; HTTP/2 streams are multiplexed on one h2c connection).

use super::sniff::Protocol;
use crate::netns::PodNetns;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;

pub struct Upstream {
    netns: Arc<PodNetns>,
    dst: SocketAddr,
    mark: u32,
    h1: tokio::sync::Mutex<Option<http1::SendRequest<Incoming>>>,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<Incoming>>>,
}

impl Upstream {
    pub fn new(netns: Arc<PodNetns>, dst: SocketAddr, mark: u32) -> Self {
        Self {
            netns,
            dst,
            mark,
            h1: tokio::sync::Mutex::new(None),
            h2: tokio::sync::Mutex::new(None),
        }
    }

    /// A plain TCP connection to the application (from inside its pod's netns).
    pub async fn connect(&self) -> std::io::Result<tokio::net::TcpStream> {
        let sock = self.netns.tcp_socket(self.dst.is_ipv6(), self.mark).await?;
        let s = tokio::net::TcpSocket::from_std_stream(sock.into())
            .connect(self.dst)
            .await?;
        let _ = s.set_nodelay(true);
        Ok(s)
    }

    /// Opens the HTTP/1 connection to the application and returns its driver for the
    /// caller to poll (in its own task); requests then use it.
    pub async fn open_h1(
        &self,
    ) -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
        let (send, driver) = self.handshake_h1().await?;
        *self.h1.lock().await = Some(send);
        Ok(driver)
    }

    /// A new HTTP/1 connection: its sender and the future that drives it.
    async fn handshake_h1(
        &self,
    ) -> anyhow::Result<(
        http1::SendRequest<Incoming>,
        impl std::future::Future<Output = ()> + Send + 'static,
    )> {
        let io = TokioIo::new(self.connect().await?);
        let (send, conn) = http1::handshake(io).await?;
        Ok((send, async move {
            let _ = conn.with_upgrades().await;
        }))
    }

    /// Sends one request; the response body streams from the application.
    pub async fn send(
        &self,
        req: http::Request<Incoming>,
        proto: Protocol,
    ) -> anyhow::Result<http::Response<Incoming>> {
        if proto == Protocol::Http2 {
            let mut g = self.h2.lock().await;
            let send = match g.as_ref().filter(|s| !s.is_closed()) {
                Some(s) => s.clone(),
                None => {
                    let io = TokioIo::new(self.connect().await?);
                    let (send, conn) = http2::handshake(TokioExecutor::new(), io).await?;
                    tokio::spawn(async move {
                        let _ = conn.await;
                    });
                    *g = Some(send.clone());
                    send
                }
            };
            drop(g);
            let mut send = send;
            return Ok(send.send_request(req).await?);
        }
        let upgrade = req.headers().contains_key(http::header::UPGRADE);
        let mut g = self.h1.lock().await;
        if g.as_ref().is_none_or(|s| s.is_closed()) {
            let (send, driver) = self.handshake_h1().await?;
            tokio::spawn(driver);
            *g = Some(send);
        }
        let send = g
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("no upstream connection"))?;
        send.ready().await?;
        let resp = send.send_request(req).await?;
        if upgrade && resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
            // The connection now belongs to the upgraded protocol.
            *g = None;
        }
        Ok(resp)
    }
}
