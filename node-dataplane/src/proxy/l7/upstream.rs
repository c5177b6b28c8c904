//! Connections from the node proxy to the application, for parsed HTTP: one per
//! downstream connection. HTTP/1 connections are driven by [`super::h1`]; HTTP/2
//! streams are multiplexed on one h2c connection (hyper's client).

use crate::netns::PodNetns;
use hyper::body::Incoming;
use hyper::client::conn::http2;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;

/// A request body the plugins read whole: its data, then its trailers.
pub type BufferedBody = http_body_util::StreamBody<
    futures::stream::Iter<
        std::vec::IntoIter<Result<hyper::body::Frame<bytes::Bytes>, std::convert::Infallible>>,
    >,
>;

/// An HTTP/2 request body on its way to the application: streamed from the
/// client, or buffered for the plugins.
pub type UpBody = http_body_util::Either<Incoming, BufferedBody>;

pub struct Upstream {
    netns: Arc<PodNetns>,
    dst: SocketAddr,
    mark: u32,
    h2: tokio::sync::Mutex<Option<http2::SendRequest<UpBody>>>,
}

impl Upstream {
    pub fn new(netns: Arc<PodNetns>, dst: SocketAddr, mark: u32) -> Self {
        Self {
            netns,
            dst,
            mark,
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

    /// Sends one HTTP/2 request; the response body streams from the application.
    pub async fn send_h2(
        &self,
        req: http::Request<UpBody>,
    ) -> anyhow::Result<http::Response<Incoming>> {
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
        Ok(send.send_request(req).await?)
    }
}
