//! The HTTP/1 proxy end to end in one process: a client on an in-memory pipe, the
//! proxy's destination side, and a scripted application on loopback TCP. Each test
//! checks the exact bytes both ends see.

use bytes::BytesMut;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::{TcpListener, TcpStream};
use weft_proto::pb;

/// The proxy in front of `app`, with an ALLOW policy on paths `/ok*` (so requests
/// are parsed and everything else is denied). Returns the client's end.
fn proxy(app: SocketAddr) -> DuplexStream {
    proxy_with(app, Duration::from_secs(30))
}

/// [`proxy`] with this HTTP/1 head timeout.
fn proxy_with(app: SocketAddr, head_timeout: Duration) -> DuplexStream {
    let policy = path_policy("ok", pb::authorization_policy::Action::Allow, "/ok*");
    proxy_with_policy(app, head_timeout, policy)
}

/// A policy on `shop/web` with one rule: `action` for requests to `path`.
pub(super) fn path_policy(
    name: &str,
    action: pb::authorization_policy::Action,
    path: &str,
) -> pb::AuthorizationPolicy {
    pb::AuthorizationPolicy {
        name: name.into(),
        namespace: "shop".into(),
        selector: [("app".to_string(), "web".to_string())].into(),
        action: action as i32,
        rules: vec![pb::Rule {
            to: vec![pb::Operation {
                paths: vec![path.into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        mesh_wide: false,
    }
}

/// The proxy in front of `app` (workload `shop/web`, labels `app=web`) with this
/// HTTP/1 head timeout and this policy, which must have an L7 field so that
/// requests are parsed. Returns the client's end.
pub(super) fn proxy_with_policy(
    app: SocketAddr,
    head_timeout: Duration,
    policy: pb::AuthorizationPolicy,
) -> DuplexStream {
    proxy_with_plugins(app, head_timeout, policy, Vec::new())
}

/// [`proxy_with_policy`] with these Wasm plugins too (in this order).
fn proxy_with_plugins(
    app: SocketAddr,
    head_timeout: Duration,
    policy: pb::AuthorizationPolicy,
    plugins: Vec<Arc<crate::wasm::plugin::Plugin>>,
) -> DuplexStream {
    let (mut ctx, _) = web_ctx(app, policy, |o| o.http1_head_timeout = head_timeout);
    ctx.plan.plugins = plugins;
    let (client, proxy_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve(BytesMut::new(), proxy_end, Arc::new(ctx)));
    client
}

/// The proxy in front of `app` with an ALLOW policy on paths `/ok*` and options
/// changed by `opts`, served by the whole L7 path (protocol sniffed) from a task;
/// returns the client's end and the proxy's state (its counters).
pub(in crate::proxy::l7) fn proxy_l7(
    app: SocketAddr,
    opts: impl FnOnce(&mut crate::proxy::state::ProxyOptions),
) -> (DuplexStream, Arc<crate::proxy::state::ProxyState>) {
    proxy_l7_with_plugins(app, opts, Vec::new())
}

/// [`proxy_l7`] with these Wasm plugins.
pub(in crate::proxy::l7) fn proxy_l7_with_plugins(
    app: SocketAddr,
    opts: impl FnOnce(&mut crate::proxy::state::ProxyOptions),
    plugins: Vec<Arc<crate::wasm::plugin::Plugin>>,
) -> (DuplexStream, Arc<crate::proxy::state::ProxyState>) {
    let policy = path_policy("ok", pb::authorization_policy::Action::Allow, "/ok*");
    let (mut ctx, state) = web_ctx(app, policy, opts);
    ctx.plan.plugins = plugins;
    let (client, proxy_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(crate::proxy::l7::serve(proxy_end, ctx));
    (client, state)
}

/// The L7 context of a connection from outside the mesh to `shop/web` at `app`
/// (labels `app=web`) under `policy`, which must have an L7 field, with options
/// changed by `opts`; and the proxy's state.
fn web_ctx(
    app: SocketAddr,
    policy: pb::AuthorizationPolicy,
    opts: impl FnOnce(&mut crate::proxy::state::ProxyOptions),
) -> (
    crate::proxy::l7::ConnCtx,
    Arc<crate::proxy::state::ProxyState>,
) {
    let config = crate::config::ConfigStore::new("node-b");
    let workload = pb::Workload {
        uid: "web-uid".into(),
        name: "web".into(),
        namespace: "shop".into(),
        service_account: "web".into(),
        node: "node-b".into(),
        ips: vec![app.ip().to_string()],
        enrolled: true,
        labels: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    };
    let key = format!("AuthorizationPolicy/shop/{}", policy.name);
    let rejected = config.apply(&pb::ConfigUpdate {
        initial: true,
        upserts: vec![
            pb::Resource {
                key: "Workload/web-uid".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Workload(workload)),
            },
            pb::Resource {
                key,
                version: "1".into(),
                kind: Some(pb::resource::Kind::AuthorizationPolicy(policy)),
            },
        ],
        ..Default::default()
    });
    assert!(rejected.is_empty(), "{rejected:?}");
    let state = crate::proxy::state::test_state_with(config, opts);
    let workload = state
        .config
        .snapshot()
        .workloads
        .get("Workload/web-uid")
        .cloned()
        .expect("workload");
    let peer: SocketAddr = "127.0.0.2:40000".parse().unwrap();
    let ctx = crate::proxy::l7::test_ctx(&state, workload, app, peer, None).expect("an L7 plan");
    (ctx, state)
}

/// Reads until `want` has arrived whole (or fails after 5 s); returns everything.
async fn read_until<R: AsyncRead + Unpin>(r: &mut R, want: &str) -> String {
    let mut got = Vec::new();
    let fut = async {
        while !String::from_utf8_lossy(&got).contains(want) {
            let mut b = [0u8; 4096];
            let n = r.read(&mut b).await.expect("read");
            assert!(
                n > 0,
                "closed before {want:?}; got {:?}",
                String::from_utf8_lossy(&got)
            );
            got.extend_from_slice(&b[..n]);
        }
    };
    tokio::time::timeout(Duration::from_secs(5), fut)
        .await
        .unwrap_or_else(|_| panic!("no {want:?} within 5 s"));
    String::from_utf8(got).expect("text")
}

/// Reads to EOF (5 s at most).
async fn read_to_end<R: AsyncRead + Unpin>(r: &mut R) -> String {
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut got))
        .await
        .expect("EOF within 5 s")
        .expect("read");
    String::from_utf8(got).expect("text")
}

async fn app() -> (TcpListener, SocketAddr) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap();
    (l, a)
}

async fn accept(l: &TcpListener) -> TcpStream {
    tokio::time::timeout(Duration::from_secs(5), l.accept())
        .await
        .expect("a connection from the proxy")
        .unwrap()
        .0
}

/// Sends `GET path` on `client`, answers it with an empty 200 on a new connection
/// from the proxy to `l`, and reads the answer; returns the app's connection.
async fn get_ok(client: &mut DuplexStream, l: &TcpListener, path: &str) -> TcpStream {
    let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
    client.write_all(req.as_bytes()).await.unwrap();
    let mut s = accept(l).await;
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        format!("GET {path} HTTP/1.1\r\nhost: web\r\n\r\n")
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_until(client, "\r\n\r\n").await;
    s
}

#[tokio::test]
async fn chunked_and_pipelined_requests_reach_the_app_in_order_and_canonical() {
    let (l, addr) = app().await;
    let mut client = proxy(addr);
    // Two requests in one write: a chunked POST (lenient line ends in its head)
    // and a GET.
    client
        .write_all(
            b"POST /ok/a HTTP/1.1\nHost: web\nTransfer-Encoding: chunked\n\n\
              4;ext=1\r\nwxyz\r\n0\r\nx-trailer: t\r\n\r\n\
              GET /ok/b HTTP/1.1\r\nHost: web\r\n\r\n",
        )
        .await
        .unwrap();
    let mut s = accept(&l).await;
    let first = read_until(&mut s, "0\r\nx-trailer: t\r\n\r\n").await;
    assert_eq!(
        first,
        "POST /ok/a HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\n\
         4;ext=1\r\nwxyz\r\n0\r\nx-trailer: t\r\n\r\n"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")
        .await
        .unwrap();
    let second = read_until(&mut s, "\r\n\r\n").await;
    assert_eq!(second, "GET /ok/b HTTP/1.1\r\nhost: web\r\n\r\n");
    s.write_all(b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc")
        .await
        .unwrap();
    let got = read_until(&mut client, "abc").await;
    assert_eq!(
        got,
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n\
         HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\nabc"
    );
}

#[tokio::test]
async fn ambiguous_framing_is_refused_before_anything_reaches_the_app() {
    let (l, addr) = app().await;
    for (raw, status) in [
        // TE.CL / CL.TE smuggling shapes, a duplicate Host, an obs-fold.
        ("POST /ok HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\nHost: web\r\n\r\n", "400 Bad Request"),
        ("POST /ok HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n", "400 Bad Request"),
        ("GET /ok HTTP/1.1\r\nHost: web\r\nHost: admin\r\n\r\n", "400 Bad Request"),
        ("GET /ok HTTP/1.1\r\nHost: web\r\nX: a\r\n b\r\n\r\n", "400 Bad Request"),
        ("POST /ok HTTP/1.1\r\nHost: web\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n", "400 Bad Request"),
    ] {
        let mut client = proxy(addr);
        client.write_all(raw.as_bytes()).await.unwrap();
        let got = read_to_end(&mut client).await;
        assert!(
            got.starts_with(&format!("HTTP/1.1 {status}\r\n")) && got.contains("connection: close\r\n"),
            "{raw:?} -> {got:?}"
        );
    }
    // A chunked body malformed in the bytes that came with the head: nothing of
    // the request is forwarded, the client gets a 400, both connections end.
    let mut client = proxy(addr);
    client
        .write_all(b"POST /ok HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\nzz\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    assert_eq!(read_to_end(&mut s).await, "");
    let got = read_to_end(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 400 Bad Request\r\n")
            && got.contains("connection: close\r\n")
            && got.ends_with("malformed request body\n"),
        "{got:?}"
    );
    // Nothing else connected to the app.
    assert!(
        tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err(),
        "no other connection"
    );
}

#[tokio::test]
async fn denied_requests_keep_the_connection_when_their_body_is_here() {
    let (l, addr) = app().await;
    let mut client = proxy(addr);
    client
        .write_all(b"POST /admin HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhelloGET /ok HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        "GET /ok HTTP/1.1\r\nhost: web\r\n\r\n"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut client, "\r\n\r\nok").await,
        "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 19\r\n\r\nRBAC: access denied\
         HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    );
    // A denied request whose body has not arrived: answered, then closed.
    let mut client = proxy(addr);
    client
        .write_all(b"POST /admin HTTP/1.1\r\nHost: web\r\nContent-Length: 500\r\n\r\nhe")
        .await
        .unwrap();
    let got = read_to_end(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 403 Forbidden\r\n") && got.contains("connection: close\r\n"),
        "{got}"
    );
}

#[tokio::test]
async fn expect_continue_interim_responses_and_upgrades() {
    let (l, addr) = app().await;
    let mut client = proxy(addr);
    client
        .write_all(
            b"PUT /ok HTTP/1.1\r\nHost: web\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n",
        )
        .await
        .unwrap();
    let mut s = accept(&l).await;
    read_until(&mut s, "100-continue\r\n\r\n").await;
    s.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await.unwrap();
    assert_eq!(
        read_until(&mut client, "\r\n\r\n").await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    client.write_all(b"body").await.unwrap();
    assert_eq!(read_until(&mut s, "body").await, "body");
    s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut client, "\r\n\r\n").await,
        "HTTP/1.1 204 No Content\r\n\r\n"
    );
    // An upgrade on the same connection: after the 101, bytes both ways.
    client
        .write_all(
            b"GET /ok/ws HTTP/1.1\r\nHost: web\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
        )
        .await
        .unwrap();
    read_until(&mut s, "upgrade: echo\r\n\r\n").await;
    s.write_all(
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello",
    )
    .await
    .unwrap();
    let got = read_until(&mut client, "hello").await;
    assert_eq!(
        got,
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\nhello"
    );
    client.write_all(b"not http at all\r\n\r\n").await.unwrap();
    assert_eq!(
        read_until(&mut s, "not http at all\r\n\r\n").await,
        "not http at all\r\n\r\n"
    );
    client.shutdown().await.unwrap();
    assert_eq!(read_to_end(&mut s).await, "", "half-close reaches the app");
    // A 101 to a request that did not ask for an upgrade is not spliced.
    let mut client = proxy(addr);
    client
        .write_all(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    read_until(&mut s, "\r\n\r\n").await;
    s.write_all(b"HTTP/1.1 101 Switching Protocols\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_end(&mut client).await;
    assert!(got.starts_with("HTTP/1.1 502 Bad Gateway\r\n"), "{got}");
}

#[tokio::test]
async fn the_app_closing_its_connection_is_survived() {
    let (l, addr) = app().await;
    let mut client = proxy(addr);
    // The app answers once and closes (no Connection: close said): an idempotent
    // request on the reused connection is sent again on a new one.
    client
        .write_all(b"GET /ok/1 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    read_until(&mut s, "\r\n\r\n").await;
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n1")
        .await
        .unwrap();
    assert!(read_until(&mut client, "\r\n\r\n1").await.ends_with("1"));
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .write_all(b"GET /ok/2 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        "GET /ok/2 HTTP/1.1\r\nhost: web\r\n\r\n"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n2")
        .await
        .unwrap();
    assert!(read_until(&mut client, "\r\n\r\n2").await.ends_with("2"));
    // A response framed by the close of the connection ends the client's too.
    client
        .write_all(b"GET /ok/3 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "\r\n\r\n").await;
    s.write_all(b"HTTP/1.1 200 OK\r\n\r\nuntil close")
        .await
        .unwrap();
    drop(s);
    assert_eq!(
        read_to_end(&mut client).await,
        "HTTP/1.1 200 OK\r\n\r\nuntil close"
    );
    // A non-idempotent request is not sent twice: 503.
    let mut client = proxy(addr);
    let s = get_ok(&mut client, &l, "/ok/4").await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(50)).await;
    client
        .write_all(b"POST /ok/5 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let got = read_to_end(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
        "{got}"
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err(),
        "the POST was not sent again"
    );
}

#[tokio::test]
async fn an_early_response_ends_the_connection_after_it() {
    let (l, addr) = app().await;
    let mut client = proxy(addr);
    client
        .write_all(b"POST /ok HTTP/1.1\r\nHost: web\r\nContent-Length: 100000\r\n\r\npart")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    read_until(&mut s, "part").await;
    s.write_all(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_to_end(&mut client).await,
        "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\n\r\n"
    );
}

#[tokio::test]
async fn a_head_must_arrive_in_time_but_an_idle_connection_may_wait() {
    let (l, addr) = app().await;
    let timeout = Duration::from_millis(200);
    // Idle for longer than the timeout, then a whole request: served.
    let mut client = proxy_with(addr, timeout);
    tokio::time::sleep(timeout * 2).await;
    let mut s = get_ok(&mut client, &l, "/ok").await;
    // A head that starts and stalls: 408 after the timeout, then the connection
    // closes; nothing of it reaches the app.
    let started = std::time::Instant::now();
    client
        .write_all(b"GET /ok HTTP/1.1\r\nHost: w")
        .await
        .unwrap();
    let got = read_to_end(&mut client).await;
    let took = started.elapsed();
    assert_eq!(
        got,
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain\r\ncontent-length: 34\r\n\
         connection: close\r\n\r\nrequest head not received in time\n"
    );
    assert!(took >= timeout, "answered after {took:?}");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest))
        .await
        .expect("the app's connection ends")
        .unwrap();
    assert_eq!(n, 0, "{:?}", String::from_utf8_lossy(&rest));
}

/// Waits for EOF on `client` (or a reset): the time it took from `since`.
async fn closed_after(client: &mut DuplexStream, since: std::time::Instant) -> Duration {
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
        .await
        .expect("the proxy closes the connection within 5 s")
        .expect("read");
    assert_eq!(
        String::from_utf8_lossy(&rest),
        "",
        "closed without an answer"
    );
    since.elapsed()
}

/// Serves `ctx` as HTTP/1 on the proxy's end of a new pipe as the inbound path
/// does: watched by the proxy's idle sweep, which cancels it. Returns the client's
/// end.
fn serve_watched(ctx: crate::proxy::l7::ConnCtx) -> DuplexStream {
    let state = ctx.state.clone();
    let cancel = tokio_util::sync::CancellationToken::new();
    let watched = state.idle.watch(
        ctx.activity.clone(),
        cancel.clone(),
        state.http_idle_timeout,
        crate::proxy::idle::Kind::Http,
    );
    let (client, proxy_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        tokio::select! {
            _ = super::serve(BytesMut::new(), proxy_end, Arc::new(ctx)) => {}
            _ = cancel.cancelled() => {}
        }
        drop(watched);
    });
    client
}

/// A connection that waits for a request, before its first or between two, is
/// closed after the idle timeout (before, it had no limit); one whose exchange
/// takes longer than the timeout is not idle meanwhile, and keeps its connection.
#[tokio::test]
async fn a_connection_idle_for_the_idle_timeout_is_closed() {
    use std::sync::atomic::Ordering::Relaxed;
    let (l, addr) = app().await;
    let idle = Duration::from_millis(400);
    let set = |o: &mut crate::proxy::state::ProxyOptions| {
        o.http_idle_timeout = idle;
        o.hbone_server_idle = idle;
        o.hbone_idle = idle;
    };
    let policy = || path_policy("ok", pb::authorization_policy::Action::Allow, "/ok*");
    // Nothing sent at all.
    let (ctx, state) = web_ctx(addr, policy(), set);
    tokio::spawn(state.clone().reap_forever());
    let started = std::time::Instant::now();
    let mut client = serve_watched(ctx);
    let took = closed_after(&mut client, started).await;
    assert!(took >= idle, "closed after {took:?}");
    assert_eq!(state.counters.l7_idle_closed.load(Relaxed), 1);

    // Keep-alive: a request, an answer that takes three idle timeouts, another
    // request at once: served on the same connections; then idle: closed.
    let (ctx, state) = web_ctx(addr, policy(), set);
    tokio::spawn(state.clone().reap_forever());
    let mut client = serve_watched(ctx);
    let mut s = get_ok(&mut client, &l, "/ok/1").await;
    client
        .write_all(b"GET /ok/2 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut s, "\r\n\r\n").await;
    tokio::time::sleep(idle * 3).await;
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "\r\n\r\n").await;
    let answered = std::time::Instant::now();
    client
        .write_all(b"GET /ok/3 HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        "GET /ok/3 HTTP/1.1\r\nhost: web\r\n\r\n"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "\r\n\r\n").await;
    assert_eq!(state.counters.l7_idle_closed.load(Relaxed), 0);
    let took = closed_after(&mut client, answered).await;
    assert!(took >= idle, "closed after {took:?}");
    assert_eq!(state.counters.l7_idle_closed.load(Relaxed), 1);
}

/// Ambiguous hosts get 400 and never reach the application (before, each of
/// these was authorized with one host and forwarded with another).
#[tokio::test]
async fn ambiguous_hosts_are_refused_and_counted() {
    use std::sync::atomic::Ordering::Relaxed;
    let (l, addr) = app().await;
    // A policy that allows only the host `web`.
    let mut policy = path_policy("ok", pb::authorization_policy::Action::Allow, "/ok*");
    policy.rules[0].to[0].hosts = vec!["web".into()];
    for raw in [
        "GET /ok HTTP/1.0\r\nHost: web\r\nHost: admin\r\n\r\n",
        "GET http://web/ok HTTP/1.1\r\nHost: admin\r\n\r\n",
        "GET http://web/ok HTTP/1.0\r\nHost: admin\r\n\r\n",
    ] {
        let (ctx, state) = web_ctx(addr, policy.clone(), |_| {});
        let (mut client, proxy_end) = tokio::io::duplex(64 * 1024);
        tokio::spawn(super::serve(BytesMut::new(), proxy_end, Arc::new(ctx)));
        client.write_all(raw.as_bytes()).await.unwrap();
        let got = read_to_end(&mut client).await;
        assert!(
            got.starts_with("HTTP/1.1 400 Bad Request\r\n")
                && got.contains("connection: close\r\n")
                && got.ends_with("ambiguous host\n"),
            "{raw:?} -> {got:?}"
        );
        assert_eq!(state.counters.l7_ambiguous_host.load(Relaxed), 1, "{raw:?}");
    }
    assert!(
        tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err(),
        "nothing reached the app"
    );
    // The same host spelled two ways is one host: forwarded.
    let (ctx, _) = web_ctx(addr, policy, |_| {});
    let (mut client, proxy_end) = tokio::io::duplex(64 * 1024);
    tokio::spawn(super::serve(BytesMut::new(), proxy_end, Arc::new(ctx)));
    client
        .write_all(b"GET http://web/ok HTTP/1.1\r\nHost: WEB:80\r\n\r\n")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        "GET http://web/ok HTTP/1.1\r\nhost: WEB:80\r\n\r\n"
    );
}

#[tokio::test]
async fn a_connections_requests_reuse_the_plugins_view_and_none_sees_another() {
    // An AUTHZ-phase plugin: replies 500 if it finds a response's `:status` while a
    // request runs (it could only be an earlier exchange's), rewrites /deny to
    // /rewritten, adds `x-in: <:path as it sees it>` to the request and
    // `x-wat: yes` to the response.
    let wat = crate::wasm::tests::module(
        r#"
    (if (i32.eqz (call $get (i32.const 2) (i32.const 608) (i32.const 7) (i32.const 200) (i32.const 204)))
      (then (drop (call $reply (i32.const 500) (i32.const 64) (i32.const 13) (i32.const 64) (i32.const 13) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (if (call $is_deny)
      (then (drop (call $replace (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 512) (i32.const 10)))))
    (drop (call $get (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 200) (i32.const 204)))
    (drop (call $add (i32.const 0) (i32.const 544) (i32.const 4) (i32.load (i32.const 200)) (i32.load (i32.const 204))))
    (i32.const 0)"#,
        r#"
    (drop (call $add (i32.const 2) (i32.const 32) (i32.const 5) (i32.const 48) (i32.const 3)))
    (i32.const 0)"#,
        "",
    );
    let plugin = crate::wasm::tests::plugin_in_phase(&wat, "FAIL_CLOSE", "AUTHZ");
    assert!(plugin.load_error().is_none(), "{:?}", plugin.load_error());
    let (l, addr) = app().await;
    let policy = path_policy("all", pb::authorization_policy::Action::Allow, "/*");
    let mut client = proxy_with_plugins(
        addr,
        Duration::from_secs(30),
        policy,
        vec![Arc::new(plugin)],
    );
    let mut s = None;
    // A target long enough that its run is dropped after it, not kept.
    let long = format!("/{}", "l".repeat(20_000));
    for (path, app_sees) in [
        ("/deny", "/rewritten"),
        ("/ok", "/ok"),
        ("/deny", "/rewritten"),
        (&long, &long),
        ("/ok/2", "/ok/2"),
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
        client.write_all(req.as_bytes()).await.unwrap();
        // One connection to the application for all of them.
        let app_conn = match &mut s {
            Some(c) => c,
            None => s.insert(accept(&l).await),
        };
        assert_eq!(
            read_until(app_conn, "\r\n\r\n").await,
            format!("GET {app_sees} HTTP/1.1\r\nhost: web\r\nx-in: {app_sees}\r\n\r\n")
        );
        app_conn
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        assert_eq!(
            read_until(&mut client, "\r\n\r\nok").await,
            "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-wat: yes\r\n\r\nok",
            "{}",
            &path[..path.len().min(20)]
        );
    }
    // An interim response goes out as it came, and the plugin sees the final one.
    client
        .write_all(b"GET /ok HTTP/1.1\r\nHost: web\r\n\r\n")
        .await
        .unwrap();
    let app_conn = s.as_mut().expect("the application's connection");
    read_until(app_conn, "\r\n\r\n").await;
    app_conn
        .write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut client, "\r\n\r\nok").await,
        "HTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 2\r\nx-wat: yes\r\n\r\nok"
    );
}

/// A plugin that reads request bodies gets them whole: it can change them (the
/// application gets the new body with its length, or chunked with the trailers
/// kept) or refuse them (the connection goes on); a body past the limit is 413.
#[tokio::test]
async fn request_bodies_go_through_the_plugins_that_read_them() {
    let plugin =
        crate::wasm::tests::plugin_in_phase(crate::wasm::tests::BODY_WAT, "FAIL_CLOSE", "AUTHZ");
    assert!(plugin.load_error().is_none(), "{:?}", plugin.load_error());
    let (l, addr) = app().await;
    let policy = path_policy("all", pb::authorization_policy::Action::Allow, "/*");
    let mut client = proxy_with_plugins(
        addr,
        Duration::from_secs(30),
        policy,
        vec![Arc::new(plugin)],
    );
    client
        .write_all(b"POST /a HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let mut s = accept(&l).await;
    assert_eq!(
        read_until(&mut s, "seen:hello").await,
        "POST /a HTTP/1.1\r\nhost: web\r\ncontent-length: 10\r\n\r\nseen:hello"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    read_until(&mut client, "\r\n\r\nok").await;
    // Chunked with a trailer: one chunk, the trailer kept.
    client
        .write_all(b"POST /b HTTP/1.1\r\nHost: web\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nx-t: 1\r\n\r\n")
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut s, "x-t: 1\r\n\r\n").await,
        "POST /b HTTP/1.1\r\nhost: web\r\ntransfer-encoding: chunked\r\n\r\na\r\nseen:abcde\r\n0\r\nx-t: 1\r\n\r\n"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        .await
        .unwrap();
    read_until(&mut client, "\r\n\r\nok").await;
    // A client waiting for 100 Continue gets it from the proxy; the application
    // gets the whole request, without the Expect field.
    client
        .write_all(
            b"POST /x HTTP/1.1\r\nHost: web\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        )
        .await
        .unwrap();
    assert_eq!(
        read_until(&mut client, "\r\n\r\n").await,
        "HTTP/1.1 100 Continue\r\n\r\n"
    );
    client.write_all(b"abc").await.unwrap();
    assert_eq!(
        read_until(&mut s, "seen:abc").await,
        "POST /x HTTP/1.1\r\nhost: web\r\ncontent-length: 8\r\n\r\nseen:abc"
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_until(&mut client, "content-length: 0\r\n\r\n").await;
    // Refused by the plugin: answered, and the connection goes on.
    client
        .write_all(b"POST /c HTTP/1.1\r\nHost: web\r\nContent-Length: 8\r\n\r\nevil!!!!")
        .await
        .unwrap();
    let got = read_until(&mut client, "body refused").await;
    assert!(got.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{got}");
    let _ = get_ok_on(&mut client, &mut s, "/d").await;
    // Past the limit: 413, and the connection closes (the body is not read).
    let big = crate::wasm::abi::MAX_BODY_BYTES + 1;
    client
        .write_all(
            format!("POST /e HTTP/1.1\r\nHost: web\r\nContent-Length: {big}\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
    let got = read_to_end(&mut client).await;
    assert!(
        got.starts_with("HTTP/1.1 413 Payload Too Large\r\n"),
        "{got}"
    );
}

/// `GET path` on `client`, answered with an empty 200 on the app connection `s`.
async fn get_ok_on(client: &mut DuplexStream, s: &mut TcpStream, path: &str) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: web\r\n\r\n");
    client.write_all(req.as_bytes()).await.unwrap();
    assert_eq!(
        read_until(s, "\r\n\r\n").await,
        format!("GET {path} HTTP/1.1\r\nhost: web\r\n\r\n")
    );
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        .await
        .unwrap();
    read_until(client, "200 OK").await;
}

/// A plugin whose body callbacks only continue (an SDK's default) does not make
/// bodies buffered: a body past the plugins' limit streams through both ways.
#[tokio::test]
async fn bodies_stream_past_a_plugin_that_does_not_read_them() {
    let plugin = crate::wasm::tests::plugin_in_phase(
        crate::wasm::tests::SDK_DEFAULT_BODY_WAT,
        "FAIL_CLOSE",
        "AUTHZ",
    );
    let (l, addr) = app().await;
    let policy = path_policy("all", pb::authorization_policy::Action::Allow, "/*");
    let mut client = proxy_with_plugins(
        addr,
        Duration::from_secs(30),
        policy,
        vec![Arc::new(plugin)],
    );
    let big = crate::wasm::abi::MAX_BODY_BYTES + 10;
    let head = format!("POST /up HTTP/1.1\r\nHost: web\r\nContent-Length: {big}\r\n\r\n");
    client.write_all(head.as_bytes()).await.unwrap();
    let mut s = accept(&l).await;
    // The head reaches the application before the body has been sent.
    assert_eq!(
        read_until(&mut s, "\r\n\r\n").await,
        format!("POST /up HTTP/1.1\r\nhost: web\r\ncontent-length: {big}\r\n\r\n")
    );
    let body = vec![b'x'; big];
    let (mut cr, mut cw) = tokio::io::split(client);
    let send = tokio::spawn(async move { cw.write_all(&body).await.map(|_| cw) });
    let mut got = 0;
    let mut buf = vec![0u8; 64 * 1024];
    while got < big {
        let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("body bytes within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {got} bytes");
        got += n;
    }
    let _cw = send.await.unwrap().unwrap();
    let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {big}\r\n\r\n");
    s.write_all(resp.as_bytes()).await.unwrap();
    s.write_all(&vec![b'y'; big]).await.unwrap();
    let mut seen = 0;
    let mut text = Vec::new();
    while !text.ends_with(b"\r\n\r\n") {
        let n = cr.read(&mut buf[..1]).await.unwrap();
        assert!(n > 0);
        text.push(buf[0]);
    }
    assert!(String::from_utf8_lossy(&text).starts_with("HTTP/1.1 200 OK\r\n"));
    while seen < big {
        let n = tokio::time::timeout(Duration::from_secs(5), cr.read(&mut buf))
            .await
            .expect("response bytes within 5 s")
            .unwrap();
        assert!(n > 0, "closed after {seen} bytes");
        seen += n;
    }
    assert_eq!(seen, big);
}
