//! The HBONE server: each enrolled pod's :15008 listener terminates mTLS with the
//! pod's SVID, takes the client's SPIFFE ID from its certificate, and serves the
//! HTTP/2 CONNECT streams of the session. Each stream names a destination, which
//! must be a local enrolled workload of the identity this session presented; it is
//! then authorized and served like any inbound connection ([`super::inbound_conn`]).

use super::counters::NodeCounters;
use super::inbound_conn::InboundConn;
use super::local::LocalPod;
use super::record::ConnRecord;
use super::state::ProxyState;
use super::tls;
use super::tunnel::Tunnel;
use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncWrite};

/// Serves HBONE on one in-pod :15008 listener. `owner` is the pod that owns the
/// listener: its SVID is presented.
pub async fn serve(listener: tokio::net::TcpListener, owner: LocalPod, state: Arc<ProxyState>) {
    loop {
        let Ok((tcp, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        if state.over_capacity() {
            super::copy::reset_on_close(&tcp);
            tracing::debug!(%peer, "HBONE connection refused: the proxy holds its maximum");
            continue;
        }
        let (owner, state) = (owner.clone(), state.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_conn(tcp, peer, &owner, &state).await {
                NodeCounters::count(&state.counters.hbone_refused);
                tracing::info!(%peer, error = %format!("{e:#}"), "HBONE connection refused");
            }
        });
    }
}

/// One HBONE session: mTLS with `owner`'s SVID, then its streams.
async fn serve_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    owner: &LocalPod,
    state: &Arc<ProxyState>,
) -> anyhow::Result<()> {
    let _ = tcp.set_nodelay(true);
    let owner_id = owner.workload().spiffe_id.clone();
    let cert = state
        .certs
        .get(&owner_id)
        .ok_or_else(|| anyhow::anyhow!("no certificate yet for {owner_id}"))?;
    let bundle = state
        .config
        .trust_bundle()
        .ok_or_else(|| anyhow::anyhow!("no trust bundle"))?;
    let cfg = tls::server_config(&cert, &bundle)?;
    let tls = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp).await?;
    let peer_id = {
        let (_, conn) = tls.get_ref();
        let leaf = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| anyhow::anyhow!("no client certificate"))?;
        if let Ok((_, x)) = <x509_parser::prelude::X509Certificate as x509_parser::prelude::FromDer<'_, _>>::from_der(leaf) {
            *state.last_peer_serial.lock().unwrap_or_else(|p| p.into_inner()) = x.raw_serial_as_string().replace(':', "");
        }
        tls::spiffe_id_of(leaf).map_err(anyhow::Error::msg)?
    };
    serve_streams(tls, peer, &peer_id, &owner_id, state).await
}

/// Serves the CONNECT streams of an HBONE session whose TLS is done: `peer_id` is
/// the client's SPIFFE ID, `served_id` the identity the session presented.
pub async fn serve_streams<T>(
    io: T,
    peer: SocketAddr,
    peer_id: &str,
    served_id: &str,
    state: &Arc<ProxyState>,
) -> anyhow::Result<()>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let mut conn = super::h2::server()
        .handshake::<_, Bytes>(io)
        .await
        .map_err(|e| anyhow::anyhow!("HBONE connection from {peer_id}: {e}"))?;
    // Accepting streams also drives the connection; each stream runs in its own task.
    // When the agent drains, GOAWAY tells the client to open new streams elsewhere
    // (its successor), and the streams already open go on until they end.
    // One wait for the drain per session, not one per accept: `accept` is polled on
    // every frame of the connection.
    let draining = state.draining.cancelled();
    tokio::pin!(draining);
    let mut going_away = false;
    loop {
        let stream = tokio::select! {
            biased;
            s = conn.accept() => s,
            _ = &mut draining, if !going_away => {
                going_away = true;
                conn.graceful_shutdown();
                continue;
            }
        };
        let Some(stream) = stream else { break };
        let (req, respond) =
            stream.map_err(|e| anyhow::anyhow!("HBONE connection from {peer_id}: {e}"))?;
        handle(req, respond, peer, peer_id, served_id, state);
    }
    Ok(())
}

/// Answers a CONNECT that is refused, ending the stream.
fn refuse(mut respond: SendResponse<Bytes>, code: http::StatusCode) {
    let mut r = http::Response::new(());
    *r.status_mut() = code;
    let _ = respond.send_response(r, true);
}

/// Checks one CONNECT stream and, if allowed, starts its task.
fn handle(
    req: http::Request<RecvStream>,
    mut respond: SendResponse<Bytes>,
    peer: SocketAddr,
    peer_id: &str,
    served_id: &str,
    state: &Arc<ProxyState>,
) {
    if req.method() != http::Method::CONNECT {
        return refuse(respond, http::StatusCode::METHOD_NOT_ALLOWED);
    }
    let Some(dst) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(respond, http::StatusCode::BAD_REQUEST);
    };
    // Only to an enrolled workload on this node...
    let Some(target) = state.local.get(dst.ip()) else {
        tracing::info!(%dst, peer = %peer_id, "HBONE CONNECT to a destination that is not a local enrolled workload");
        return refuse(respond, http::StatusCode::NOT_FOUND);
    };
    // ...whose identity is the one this TLS session presented to the client.
    let target_id = &target.workload().spiffe_id;
    if target_id != served_id {
        tracing::info!(%dst, peer = %peer_id, target = %target_id, presented = %served_id, "HBONE CONNECT to a workload of another identity");
        return refuse(respond, http::StatusCode::MISDIRECTED_REQUEST);
    }
    if state.over_capacity() {
        return refuse(respond, http::StatusCode::SERVICE_UNAVAILABLE);
    }
    let record = ConnRecord::inbound_hbone(state.clone(), peer, peer_id.to_string(), dst);
    let conn = InboundConn::new(
        state.clone(),
        target,
        peer,
        dst,
        Some(peer_id.to_string()),
        record,
    );
    let admitted = match conn.authorize() {
        Ok(a) => a,
        Err(_denied) => return refuse(respond, http::StatusCode::FORBIDDEN),
    };
    // Accepted: 200 now; the application connection is made in the stream's task
    // (if it fails, the stream is reset).
    let send = match respond.send_response(http::Response::new(()), false) {
        Ok(send) => send,
        Err(e) => {
            tracing::debug!(%dst, error = %e, "HBONE stream ended before its response");
            return;
        }
    };
    let tunnel = Tunnel {
        send,
        recv: req.into_body(),
    };
    tokio::spawn(admitted.serve(tunnel));
}
