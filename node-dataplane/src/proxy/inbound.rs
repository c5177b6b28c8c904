//! The HBONE server: each enrolled pod's :15008 listener terminates mTLS with the
//! pod's SVID, takes the client's SPIFFE ID from its certificate, and serves the
//! HTTP/2 CONNECT streams of the session. Each stream names a destination, which
//! must be a local enrolled workload of the identity this session presented; it is
//! then authorized and served like any inbound connection ([`super::inbound_conn`]).
//!
//! Bounded under abuse: a connection's TLS and HTTP/2 handshakes must be done
//! within the handshake timeout of its accept, and one source IP may have at most
//! a set number of connections in their handshake ([`super::handshakes`]); a
//! session without streams for the server idle timeout is closed. A session with
//! an open stream is never idle, however quiet its tunnel.

use super::counters::NodeCounters;
use super::handshakes::Handshaking;
use super::idle::{Activity, Kind};
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
        // Until its handshake is done, a connection counts against its source's
        // maximum of handshakes.
        let Some(handshaking) = state.handshakes.begin(peer.ip()) else {
            super::copy::reset_on_close(&tcp);
            NodeCounters::count(&state.counters.hbone_refused_source_handshakes);
            tracing::debug!(%peer, "HBONE connection refused: its source holds its maximum of connections in their handshake");
            continue;
        };
        let (owner, state) = (owner.clone(), state.clone());
        tokio::spawn(async move {
            if let Err(e) = serve_conn(tcp, peer, &owner, &state, handshaking).await {
                NodeCounters::count(&state.counters.hbone_refused);
                tracing::info!(%peer, error = %format!("{e:#}"), "HBONE connection refused");
            }
        });
    }
}

/// A handshake that did not end in time: counted, and an error naming the bound.
fn handshake_timed_out(state: &ProxyState, peer: SocketAddr) -> anyhow::Error {
    NodeCounters::count(&state.counters.hbone_handshake_timeouts);
    anyhow::anyhow!(
        "HBONE connection from {peer}: handshake not done within {:?}",
        state.hbone_handshake_timeout
    )
}

/// One HBONE session: mTLS with `owner`'s SVID, then its streams. The TLS and
/// HTTP/2 handshakes must both be done within the handshake timeout of the accept;
/// `handshaking` is released once they are.
async fn serve_conn(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    owner: &LocalPod,
    state: &Arc<ProxyState>,
    handshaking: Handshaking,
) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + state.hbone_handshake_timeout;
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
    let accept = tokio_rustls::TlsAcceptor::from(cfg).accept(tcp);
    let tls = tokio::time::timeout_at(deadline, accept)
        .await
        .map_err(|_| handshake_timed_out(state, peer))??;
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
    let session = Session {
        peer,
        peer_id: &peer_id,
        served_id: &owner_id,
        state,
    };
    session.serve(tls, deadline, Some(handshaking)).await
}

/// Serves the CONNECT streams of an HBONE session whose TLS is done: `peer_id` is
/// the client's SPIFFE ID, `served_id` the identity the session presented. The
/// client's HTTP/2 preface must arrive within the handshake timeout. (The agent's
/// listener does the same after TLS; tests and benchmarks call this.)
#[cfg(any(test, feature = "testing"))]
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
    let deadline = tokio::time::Instant::now() + state.hbone_handshake_timeout;
    let session = Session {
        peer,
        peer_id,
        served_id,
        state,
    };
    session.serve(io, deadline, None).await
}

/// One HBONE session whose TLS is done.
struct Session<'a> {
    peer: SocketAddr,
    peer_id: &'a str,
    served_id: &'a str,
    state: &'a Arc<ProxyState>,
}

impl Session<'_> {
    /// The HTTP/2 handshake (by `deadline`, then `handshaking` is released), then
    /// the streams until the session ends.
    async fn serve<T>(
        self,
        io: T,
        deadline: tokio::time::Instant,
        handshaking: Option<Handshaking>,
    ) -> anyhow::Result<()>
    where
        T: AsyncRead + AsyncWrite + Unpin,
    {
        let Session {
            peer,
            peer_id,
            served_id,
            state,
        } = self;
        let handshake = super::h2::server().handshake::<_, Bytes>(io);
        let mut conn = tokio::time::timeout_at(deadline, handshake)
            .await
            .map_err(|_| handshake_timed_out(state, peer))?
            .map_err(|e| anyhow::anyhow!("HBONE connection from {peer_id}: {e}"))?;
        drop(handshaking);
        // Ends the session: cancelled when the agent drains, or by the proxy's idle
        // sweep when the session has had no stream for long enough.
        let ending = state.draining.child_token();
        let streams = Arc::new(Activity::default());
        let _watched = state.idle.watch(
            streams.clone(),
            ending.clone(),
            state.hbone_server_idle,
            Kind::HboneSession,
        );
        // Accepting streams also drives the connection; each stream runs in its own
        // task. When the agent drains, GOAWAY tells the client to open new streams
        // elsewhere (its successor), and the streams already open go on until they
        // end. When the session is idle, it is closed (GOAWAY, then the connection
        // ends: the client opens a new one if it needs one).
        // One wait for both per session, not one per accept: `accept` is polled on
        // every frame of the connection.
        let ended = ending.cancelled();
        tokio::pin!(ended);
        let (mut going_away, mut idle) = (false, false);
        loop {
            let stream = tokio::select! {
                biased;
                s = conn.accept() => s,
                _ = &mut ended, if !going_away => {
                    going_away = true;
                    if state.draining.is_cancelled() || streams.busy() > 0 {
                        // Draining, or a stream was admitted as the session was found
                        // idle: the open streams go on until they end.
                        conn.graceful_shutdown();
                    } else {
                        // No stream is open: nothing to wait for (a client that opens
                        // one meanwhile is told it was not taken, and retries).
                        tracing::debug!(%peer, "HBONE connection closed: no stream");
                        idle = true;
                        conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    }
                    continue;
                }
            };
            let Some(stream) = stream else { break };
            let (req, respond) = match stream {
                Ok(s) => s,
                Err(_) if idle => break,
                Err(e) => return Err(anyhow::anyhow!("HBONE connection from {peer_id}: {e}")),
            };
            handle(req, respond, peer, peer_id, served_id, state, &streams);
        }
        Ok(())
    }
}

/// One admitted stream of a session, while its task runs: the session is not idle.
struct LiveStream(Arc<Activity>);

impl LiveStream {
    fn new(streams: &Arc<Activity>) -> Self {
        streams.begin();
        Self(streams.clone())
    }
}

impl Drop for LiveStream {
    fn drop(&mut self) {
        self.0.end();
    }
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
    streams: &Arc<Activity>,
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
    let live = LiveStream::new(streams);
    tokio::spawn(async move {
        admitted.serve(tunnel).await;
        drop(live);
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::state::{test_state_with, ProxyOptions};
    use std::sync::atomic::Ordering::Relaxed;
    use std::time::{Duration, Instant};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use weft_proto::pb;

    const SERVER_ID: &str = "spiffe://td.local/ns/shop/sa/web";
    const PEER_ID: &str = "spiffe://td.local/ns/shop/sa/client";

    /// A proxy state with options changed by `opts`, holding a certificate for
    /// [`SERVER_ID`] (self-signed, also the trust bundle), and the pod that owns a
    /// listener, `shop/web` at 127.0.0.1 in this process's network namespace.
    fn state(opts: impl FnOnce(&mut ProxyOptions)) -> (Arc<ProxyState>, LocalPod) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(SERVER_ID.try_into().unwrap())];
        let cert = params.self_signed(&key).unwrap();
        let config = crate::config::ConfigStore::new("node-b");
        let rejected = config.apply(&pb::ConfigUpdate {
            initial: true,
            upserts: vec![pb::Resource {
                key: "TrustBundle/td.local".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::TrustBundle(pb::TrustBundle {
                    trust_domain: "td.local".into(),
                    roots_pem: cert.pem(),
                    ..Default::default()
                })),
            }],
            ..Default::default()
        });
        assert!(rejected.is_empty(), "{rejected:?}");
        let state = test_state_with(config, opts);
        state.certs.put(crate::certs::WorkloadCert {
            spiffe_id: SERVER_ID.into(),
            serial: "1".into(),
            not_before: std::time::SystemTime::UNIX_EPOCH,
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
            chain_pem: cert.pem(),
            trust_bundle_pem: cert.pem(),
            key_pem: crate::certs::zeroizing::Secret(key.serialize_pem()),
        });
        let owner = LocalPod {
            workload: crate::proxy::local::LiveWorkload::new(Arc::new(pb::Workload {
                uid: "web-uid".into(),
                name: "web".into(),
                namespace: "shop".into(),
                service_account: "web".into(),
                spiffe_id: SERVER_ID.into(),
                ips: vec!["127.0.0.1".into()],
                enrolled: true,
                ..Default::default()
            })),
            netns: Arc::new(crate::netns::PodNetns::open("/proc/self/ns/net").unwrap()),
        };
        (state, owner)
    }

    /// A TCP connection to `addr` from `source`.
    async fn connect_from(source: &str, addr: SocketAddr) -> tokio::net::TcpStream {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind(SocketAddr::new(source.parse().unwrap(), 0)).unwrap();
        s.connect(addr).await.unwrap()
    }

    /// Whether the proxy closed (or reset) `s` within `within`.
    async fn closed_within(s: &mut tokio::net::TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 64];
        match tokio::time::timeout(within, s.read(&mut b)).await {
            Ok(Ok(0)) | Ok(Err(_)) => true,
            Ok(Ok(n)) => panic!("the proxy sent {n} bytes to a client without a handshake"),
            Err(_) => false,
        }
    }

    /// Polls `f` every 10 ms until it holds (5 s at most).
    async fn eventually(what: &str, f: impl Fn() -> bool) {
        let until = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < until, "{what}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Connections that open and send nothing, or part of a ClientHello, are
    /// closed after the handshake timeout (before, they were held for good), and
    /// one source may hold only so many at once: more are reset at once, while
    /// another source is not affected.
    #[tokio::test]
    async fn handshakes_are_bounded_in_time_and_per_source() {
        let timeout = Duration::from_millis(500);
        let (state, owner) = state(|o| {
            o.hbone_handshake_timeout = timeout;
            o.max_handshakes_per_source = 3;
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, owner, state.clone()));
        let started = Instant::now();
        let mut held = Vec::new();
        for i in 0..3 {
            let mut s = connect_from("127.0.0.1", addr).await;
            if i > 0 {
                // A TLS record header announcing a ClientHello that never comes.
                s.write_all(b"\x16\x03\x01\x02\x00\x01").await.unwrap();
            }
            held.push(s);
        }
        let source: std::net::IpAddr = "127.0.0.1".parse().unwrap();
        eventually("three handshakes in progress", || {
            state.handshakes.of(source) == 3
        })
        .await;
        let mut fourth = connect_from("127.0.0.1", addr).await;
        assert!(
            closed_within(&mut fourth, Duration::from_secs(1)).await,
            "a fourth from the same source is refused"
        );
        assert_eq!(
            state.counters.hbone_refused_source_handshakes.load(Relaxed),
            1
        );
        let mut other = connect_from("127.0.0.2", addr).await;
        assert!(
            !closed_within(&mut other, Duration::from_millis(100)).await,
            "another source is not refused"
        );
        // All of them are closed once their handshake time is up.
        for s in held.iter_mut().chain([&mut other]) {
            assert!(
                closed_within(s, Duration::from_secs(5)).await,
                "closed after the handshake timeout"
            );
        }
        assert!(
            started.elapsed() >= timeout,
            "closed after {:?}",
            started.elapsed()
        );
        eventually("timeouts counted", || {
            state.counters.hbone_handshake_timeouts.load(Relaxed) == 4
        })
        .await;
        assert_eq!(state.handshakes.sources(), 0);
        // The source may start handshakes again.
        let mut again = connect_from("127.0.0.1", addr).await;
        assert!(!closed_within(&mut again, Duration::from_millis(100)).await);
    }

    /// After TLS, the client's HTTP/2 preface is bounded by the same timeout.
    #[tokio::test]
    async fn a_session_without_its_http2_preface_is_closed_after_the_handshake_timeout() {
        let timeout = Duration::from_millis(300);
        let (state, _) = state(|o| o.hbone_handshake_timeout = timeout);
        let (_client, server) = tokio::io::duplex(1024);
        let peer: SocketAddr = "127.0.0.9:4000".parse().unwrap();
        let started = Instant::now();
        let served = serve_streams(server, peer, PEER_ID, SERVER_ID, &state);
        let r = tokio::time::timeout(Duration::from_secs(5), served)
            .await
            .expect("the session ends within 5 s");
        assert!(r.is_err(), "a session without a preface is refused");
        assert!(started.elapsed() >= timeout);
        assert_eq!(state.counters.hbone_handshake_timeouts.load(Relaxed), 1);
    }

    /// An HTTP/2 client on `io` whose connection task reports when it ends.
    async fn h2_client(
        io: tokio::io::DuplexStream,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::sync::oneshot::Receiver<()>,
    ) {
        let (send, conn) = crate::proxy::h2::client()
            .handshake::<_, Bytes>(io)
            .await
            .expect("h2 handshake");
        let (ended, rx) = tokio::sync::oneshot::channel();
        tokio::spawn(async move {
            let _ = conn.await;
            let _ = ended.send(());
        });
        (send, rx)
    }

    /// A session without streams is closed after the idle timeout (before, it was
    /// held for good); one with an open stream whose tunnel is quiet for longer is
    /// not, and is closed once its stream has ended and it has been idle.
    #[tokio::test]
    async fn sessions_without_streams_are_closed_and_quiet_tunnels_are_not() {
        let idle = Duration::from_millis(300);
        let (state, owner) = state(|o| {
            o.hbone_server_idle = idle;
            o.http_idle_timeout = idle;
            o.hbone_idle = idle;
        });
        tokio::spawn(state.clone().reap_forever());
        let peer: SocketAddr = "127.0.0.9:4000".parse().unwrap();

        // No stream at all.
        let (client, server) = tokio::io::duplex(64 << 10);
        let st = state.clone();
        let served =
            tokio::spawn(async move { serve_streams(server, peer, PEER_ID, SERVER_ID, &st).await });
        let started = Instant::now();
        let (_send, ended) = h2_client(client).await;
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the session is closed within 5 s")
            .unwrap();
        assert!(
            started.elapsed() >= idle,
            "closed after {:?}",
            started.elapsed()
        );
        served
            .await
            .unwrap()
            .expect("an idle session ends without an error");
        assert_eq!(state.counters.hbone_idle_closed.load(Relaxed), 1);

        // A quiet tunnel to the application at 127.0.0.1.
        let app = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let dst = app.local_addr().unwrap();
        state.set_local_pod(dst.ip(), Some(owner));
        let (client, server) = tokio::io::duplex(64 << 10);
        let st = state.clone();
        tokio::spawn(async move { serve_streams(server, peer, PEER_ID, SERVER_ID, &st).await });
        let (send, mut ended) = h2_client(client).await;
        let mut send = send.ready().await.unwrap();
        let req = http::Request::connect(dst.to_string()).body(()).unwrap();
        let (resp, mut up) = send.send_request(req, false).unwrap();
        let resp = resp.await.expect("CONNECT answered");
        assert_eq!(resp.status(), http::StatusCode::OK);
        let (mut app_conn, _) = app.accept().await.unwrap();
        tokio::time::sleep(idle * 3).await;
        assert!(
            ended.try_recv().is_err(),
            "a session with an open stream is not idle"
        );
        // The tunnel still carries bytes.
        up.send_data(Bytes::from_static(b"ping"), false).unwrap();
        let mut b = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), app_conn.read_exact(&mut b))
            .await
            .expect("bytes through the quiet tunnel")
            .unwrap();
        assert_eq!(&b, b"ping");
        assert_eq!(state.counters.hbone_idle_closed.load(Relaxed), 1);
        // The stream ends; then the session is idle and closed.
        up.send_data(Bytes::new(), true).unwrap();
        drop(app_conn);
        let stream_ended = Instant::now();
        tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the session is closed within 5 s")
            .unwrap();
        assert!(
            stream_ended.elapsed() >= idle,
            "closed after {:?}",
            stream_ended.elapsed()
        );
        assert_eq!(state.counters.hbone_idle_closed.load(Relaxed), 2);
    }
}
