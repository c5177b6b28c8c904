//! Gateway API routing for the mesh (GAMMA), decided in the source node's proxy: a
//! connection a pod opens to a Service that has `HTTPRoute`s or `GRPCRoute`s is
//! served as HTTP here, and every request is matched ([`super::route_table`]), filtered
//! ([`filters`]) and sent on its own to a backend and an endpoint chosen for it
//! ([`forward`], over [`upstream`] connections): per-request balancing, retries,
//! timeouts and mirrors without an extra proxy hop. The destination's proxy still
//! authorizes every request and runs its plugins, as for any mesh connection.
//!
//! Connections to Services without routes never come here: they keep the L4 path.

pub mod filters;
pub mod forward;
pub mod upstream;

use super::route_table::{RouteTable, MAX_TABLES};
use super::sniff::{self, Protocol, Rewind, SNIFF_TIMEOUT};
use super::state::ProxyState;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::sync::Arc;
use weft_proto::pb;
use weft_proto::protocol::{declared, Declared};

impl ProxyState {
    /// The route table of Service `key` port `port` for clients in `client_ns`.
    pub fn route_table(
        &self,
        key: &str,
        svc: &pb::Service,
        port: u16,
        client_ns: &str,
    ) -> Arc<RouteTable> {
        let snap = self.config.snapshot();
        let k = (key.to_string(), port, client_ns.to_string());
        {
            let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
            if cache.generation != snap.routes_generation {
                cache.tables.clear();
                cache.generation = snap.routes_generation;
            }
            if let Some(t) = cache.tables.get(&k) {
                return t.clone();
            }
        }
        // Compiled outside the lock (regular expressions can take a while).
        let t = Arc::new(RouteTable::build(
            snap.routes.values(),
            &svc.namespace,
            &svc.name,
            port,
            client_ns,
        ));
        let mut cache = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        if cache.generation == snap.routes_generation {
            if cache.tables.len() >= MAX_TABLES {
                cache.tables.clear();
            }
            cache.tables.insert(k, t.clone());
        }
        t
    }
}

/// How a routed connection is served.
pub enum Serve {
    /// Served as HTTP here (the connection is consumed).
    Done(anyhow::Result<()>),
    /// Not HTTP: the caller forwards it at L4, after the bytes already read.
    Opaque(tokio::net::TcpStream, bytes::Bytes),
}

/// Serves a connection to a routed Service port, unless it turns out not to be
/// HTTP: a port declared opaque (`appProtocol: tcp`, ...) is never parsed, and on
/// any other the first bytes tell HTTP/1.x, h2c (prior knowledge) or neither.
pub async fn serve(mut conn: tokio::net::TcpStream, base: forward::Routed) -> Serve {
    let declared = base
        .service
        .ports
        .iter()
        .find(|p| p.port == u32::from(base.port))
        .map(|p| declared(&p.app_protocol, &p.name))
        .unwrap_or(Declared::Unknown);
    if declared == Declared::Opaque {
        return Serve::Opaque(conn, bytes::Bytes::new());
    }
    // Declared HTTP or not, the client may speak HTTP/1.1 or h2c with prior
    // knowledge (an `http` port carries both): the first bytes tell.
    let (proto, prefix) = match sniff::sniff(&mut conn, SNIFF_TIMEOUT).await {
        Ok(x) => x,
        Err(e) => return Serve::Done(Err(e.into())),
    };
    if proto == Protocol::Opaque {
        return Serve::Opaque(conn, prefix.freeze());
    }
    let h2 = proto == Protocol::Http2;
    let rc = Arc::new(forward::Routed { h2, ..base });
    let io = TokioIo::new(Rewind::new(prefix, conn));
    let svc = {
        let rc = rc.clone();
        hyper::service::service_fn(move |req| {
            let rc = rc.clone();
            async move { Ok::<_, std::convert::Infallible>(forward::handle(req, rc).await) }
        })
    };
    let r = if h2 {
        hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(hyper_util::rt::TokioTimer::new())
            .keep_alive_interval(Some(rc.state.http_idle_timeout))
            .serve_connection(io, svc)
            .await
    } else {
        // A keep-alive connection waiting for its next request's head is closed
        // after the proxy's HTTP idle timeout, as on the destination side.
        hyper::server::conn::http1::Builder::new()
            .keep_alive(true)
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(rc.state.http_idle_timeout)
            .serve_connection(io, svc)
            .await
    };
    Serve::Done(r.map_err(|e| {
        anyhow::Error::from(e).context(format!(
            "routed connection to Service {}/{}",
            rc.service.namespace, rc.service.name
        ))
    }))
}
