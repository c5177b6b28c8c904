//! The L7 path with HTTP/2 clients (prior knowledge, sniffed): what it refuses.

use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;
use tokio::net::TcpListener;

/// An HTTP/2 request whose `host` field says another host than its `:authority`
/// (or that has two) gets 400 and never reaches the application; before, it was
/// authorized with `:authority` and forwarded with both. One host spelled two
/// ways is not refused.
#[tokio::test]
async fn an_h2_request_with_an_ambiguous_host_is_refused() {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (client, state) = super::h1::tests::proxy_l7(addr, |_| {});
    let (mut send, conn) = h2::client::handshake(client).await.expect("h2 handshake");
    tokio::spawn(conn);
    let cases: [(&str, &[&str], u16); 4] = [
        ("web", &["admin"], 400),
        ("web", &["web", "admin"], 400),
        ("web:8080", &["web"], 400),
        ("web", &["adm\u{ed}n"], 400),
    ];
    for (authority, hosts, status) in cases {
        let mut req = http::Request::get(format!("http://{authority}/ok"));
        for h in hosts {
            req = req.header(
                http::header::HOST,
                http::HeaderValue::from_bytes(h.as_bytes()).unwrap(),
            );
        }
        let (resp, _) = send
            .send_request(req.body(()).unwrap(), true)
            .expect("sent");
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer within 5 s")
            .expect("a response");
        assert_eq!(resp.status().as_u16(), status, "{authority} {hosts:?}");
    }
    assert_eq!(state.counters.l7_ambiguous_host.load(Relaxed), 4);
    assert!(
        tokio::time::timeout(Duration::from_millis(100), l.accept())
            .await
            .is_err(),
        "nothing reached the app"
    );
}

#[test]
fn an_h2_host_matching_its_authority_is_not_ambiguous() {
    let req = |authority: &str, host: Option<&str>| {
        let mut r = http::Request::get(format!("http://{authority}/ok"));
        if let Some(h) = host {
            r = r.header(http::header::HOST, h);
        }
        r.body(()).unwrap()
    };
    for (authority, host) in [
        ("web", None),
        ("web", Some("web")),
        ("web", Some("WEB:80")),
        ("web:8080", Some("web:8080")),
    ] {
        assert_eq!(
            super::http::ambiguous_h2_host(&req(authority, host)),
            None,
            "{authority} {host:?}"
        );
    }
}

/// HTTP/2: a plugin that reads bodies gets them whole; the application (and the
/// client) get the body it left, with its length, and the trailers; a refused
/// body is answered by the plugin.
#[tokio::test]
async fn h2_bodies_go_through_the_plugins_that_read_them() {
    use bytes::Bytes;
    let plugin =
        crate::wasm::tests::plugin_in_phase(crate::wasm::tests::BODY_WAT, "FAIL_CLOSE", "AUTHZ");
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    // The application: h2c, answers each request with what it received.
    tokio::spawn(async move {
        let (s, _) = l.accept().await.unwrap();
        let mut conn = h2::server::handshake(s).await.unwrap();
        while let Some(Ok((req, mut respond))) = conn.accept().await {
            tokio::spawn(async move {
                let (parts, mut body) = req.into_parts();
                let mut got = Vec::new();
                while let Some(d) = body.data().await {
                    let d = d.unwrap();
                    let _ = body.flow_control().release_capacity(d.len());
                    got.extend_from_slice(&d);
                }
                let trailers = body.trailers().await.unwrap();
                let len = parts
                    .headers
                    .get("content-length")
                    .map(|v| v.to_str().unwrap().to_string());
                let text = format!(
                    "{} len={len:?} trailer={:?}",
                    String::from_utf8_lossy(&got),
                    trailers.and_then(|t| t.get("x-t").map(|v| v.to_str().unwrap().to_string()))
                );
                let resp = http::Response::builder().status(200).body(()).unwrap();
                let mut send = respond.send_response(resp, false).unwrap();
                send.send_data(Bytes::from(text), false).unwrap();
                let mut t = http::HeaderMap::new();
                t.insert("grpc-status", http::HeaderValue::from_static("0"));
                send.send_trailers(t).unwrap();
            });
        }
    });
    let (client, _) =
        super::h1::tests::proxy_l7_with_plugins(addr, |_| {}, vec![std::sync::Arc::new(plugin)]);
    let (send, conn) = h2::client::handshake(client).await.expect("h2 handshake");
    tokio::spawn(conn);
    let mut send = send.ready().await.unwrap();
    let post = |path: &str| {
        http::Request::post(format!("http://web{path}"))
            .header("content-length", "5")
            .body(())
            .unwrap()
    };
    async fn answer(resp: h2::client::ResponseFuture) -> (u16, String, Option<String>) {
        let resp = tokio::time::timeout(Duration::from_secs(5), resp)
            .await
            .expect("an answer within 5 s")
            .expect("a response");
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut got = Vec::new();
        while let Some(d) = body.data().await {
            let d = d.unwrap();
            let _ = body.flow_control().release_capacity(d.len());
            got.extend_from_slice(&d);
        }
        let trailer = body.trailers().await.ok().flatten().and_then(|t| {
            t.get("grpc-status")
                .map(|v| v.to_str().unwrap().to_string())
        });
        (status, String::from_utf8_lossy(&got).into_owned(), trailer)
    }
    // Data in two frames, then trailers.
    let (resp, mut stream) = send.send_request(post("/ok/a"), false).unwrap();
    stream.send_data(Bytes::from_static(b"hel"), false).unwrap();
    stream.send_data(Bytes::from_static(b"lo"), false).unwrap();
    let mut t = http::HeaderMap::new();
    t.insert("x-t", http::HeaderValue::from_static("1"));
    stream.send_trailers(t).unwrap();
    // The response's body went through the plugin too, its trailers kept.
    assert_eq!(
        answer(resp).await,
        (
            200,
            "seen:hello len=Some(\"10\") trailer=Some(\"1\")+checked".to_string(),
            Some("0".to_string())
        )
    );
    let (resp, mut stream) = send.send_request(post("/ok/b"), false).unwrap();
    stream
        .send_data(Bytes::from_static(b"evil!"), true)
        .unwrap();
    assert_eq!(answer(resp).await, (403, "body refused".to_string(), None));
}
