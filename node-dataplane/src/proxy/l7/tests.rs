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
