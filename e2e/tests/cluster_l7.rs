//! L7 authorization in the node proxy, across nodes over mTLS, with real HTTP/1.1
//! and HTTP/2 clients (curl, h2load): methods, paths (with normalization-bypass
//! attempts), DENY rules, keep-alive, per-request metrics. Root; runs in CI.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::curl::Reply;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

const POLICIES: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-l7, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - from: [{source: {namespaces: ["shop"]}}]
      to: [{operation: {methods: ["GET"], paths: ["/api/*", "/public"]}}]
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/admin"]}}]
      to: [{operation: {paths: ["/admin*"]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-deny-secret, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/api/secret"]}}]
    - when: [{key: "request.headers[x-evil]", values: ["*"]}]
"#;

/// (status, headers, body) of one curl request from `pod`.
fn curl(c: &LocalCluster, pod: &str, extra: &[&str], url: &str) -> (u16, Reply) {
    let r = weft_e2e::curl::curl(c, pod, extra, url).expect("curl");
    (r.status, r)
}

/// shop/web (HTTP on :8080) on node-b; shop/client and shop/admin on node-a.
fn topology(c: &mut LocalCluster) -> String {
    c.namespace("shop", true).unwrap();
    let web = c
        .add_pod("shop", "web", "node-b", &[("app", "web")])
        .unwrap();
    c.add_pod("shop", "client", "node-a", &[("app", "client")])
        .unwrap();
    c.add_pod("shop", "admin", "node-a", &[("app", "admin")])
        .unwrap();
    for (node, pod) in [
        ("node-b", "shop/web"),
        ("node-a", "shop/client"),
        ("node-a", "shop/admin"),
    ] {
        c.wait_enrolled(node, pod).unwrap();
    }
    let app = bin_path("weft-testapp").unwrap();
    let addr = format!("{web}:8080");
    c.spawn_app("shop/web", &app, &["http", "--listen", "0.0.0.0:8080"])
        .unwrap();
    // Certificates and config settle: any HTTP answer from the app.
    // A reset before then (no certificate yet) is retried, not a failure.
    wait_until(Duration::from_secs(20), || {
        let r = weft_e2e::curl::curl(c, "shop/client", &[], &format!("http://{addr}/api/ready"));
        r.ok().filter(|r| r.status == 200).map(|_| ())
    })
    .expect("web reachable");
    addr
}

#[test]
fn l7_policy_http1_and_http2_across_nodes() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    let web = topology(&mut c);
    c.write_manifest("policies.yaml", POLICIES).unwrap();
    let url = |p: &str| format!("http://{web}{p}");
    // Wait for the policy: /admin from the client becomes 403. A request whose
    // connection is open when the policy lands may be reset instead: the connection
    // was authorized at L4, and L7 rules cannot be checked there, so the re-check
    // closes it (fail closed). That is not an answer yet; try again.
    wait_until(Duration::from_secs(20), || {
        let r = weft_e2e::curl::curl(&c, "shop/client", &[], &url("/admin")).ok()?;
        (r.status == 403).then_some(())
    })
    .expect("policy applied");

    // Allowed requests reach the app with the path it was authorized with.
    let (code, r) = curl(&c, "shop/client", &[], &url("/api/items?x=1"));
    assert_eq!((code, r.body.as_str()), (200, "GET /api/items?x=1"));
    assert_eq!(r.header("x-app"), Some("testapp"));
    // Method not allowed by the rule.
    let (code, r) = curl(&c, "shop/client", &["-X", "POST"], &url("/api/items"));
    assert_eq!((code, r.body.as_str()), (403, "RBAC: access denied"));
    // Path-normalization bypass attempts all land on /admin and are denied.
    for p in [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/api/../admin",
        "/public/../admin/x",
    ] {
        let (code, r) = curl(&c, "shop/client", &[], &url(p));
        assert_eq!((code, r.body.as_str()), (403, "RBAC: access denied"), "{p}");
    }
    // DENY wins over ALLOW, also when encoded.
    for p in ["/api/secret", "/api/%73ecret", "/api//secret"] {
        assert_eq!(curl(&c, "shop/client", &[], &url(p)).0, 403, "{p}");
    }
    assert_eq!(
        curl(&c, "shop/client", &["-H", "x-evil: 1"], &url("/api/x")).0,
        403
    );
    // The admin identity may use /admin; the app sees the normalized path.
    let (code, r) = curl(&c, "shop/admin", &["-X", "DELETE"], &url("//admin/./users"));
    assert_eq!((code, r.body.as_str()), (200, "DELETE /admin/users"));
    // ...but the admin's GET /api is not in the namespace rule? It is: admin is in shop.
    assert_eq!(curl(&c, "shop/admin", &[], &url("/api/x")).0, 200);

    // HTTP/1.1 keep-alive: a 403 does not close the connection.
    let (_, out, _) = c
        .run_app(
            "shop/client",
            Path::new("/usr/bin/curl"),
            &[
                "-s",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{num_connects}\n",
                &url("/api/a"),
                &url("/admin"),
                &url("/api/b"),
            ],
        )
        .unwrap();
    assert_eq!(out, "200 1\n403 0\n200 0\n", "one connection for all three");

    // HTTP/2 with prior knowledge (h2c).
    let (code, r) = curl(
        &c,
        "shop/client",
        &["--http2-prior-knowledge"],
        &url("/api/h2"),
    );
    assert_eq!((code, r.body.as_str()), (200, "GET /api/h2"));
    let (code, r) = curl(
        &c,
        "shop/client",
        &["--http2-prior-knowledge"],
        &url("/admin"),
    );
    assert_eq!((code, r.body.as_str()), (403, "RBAC: access denied"));
    // h2load: many multiplexed streams, all allowed; then all denied.
    for (path, expect) in [
        ("/api/load", "200 2xx, 0 3xx, 0 4xx"),
        ("/admin", "0 2xx, 0 3xx, 200 4xx"),
    ] {
        let (_, out, err) = c
            .run_app(
                "shop/client",
                Path::new("/usr/bin/h2load"),
                &["-n", "200", "-c", "2", "-m", "10", &url(path)],
            )
            .unwrap();
        assert!(
            out.contains("200 total") || out.contains("requests: 200 total"),
            "{out}{err}"
        );
        assert!(
            out.contains(&format!("status codes: {expect}")),
            "{path}: {out}{err}"
        );
    }

    // Per-request metrics at the destination, with bounded labels.
    let (_, m) = c.node_http("node-b", "/metrics").unwrap();
    let has = |code: &str, method: &str| {
        m.lines().any(|l| {
            l.starts_with("weft_requests_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("destination_workload=\"web\"")
                && l.contains("source_principal=\"spiffe://cluster.local/ns/shop/sa/client\"")
                && l.contains("connection_security_policy=\"mutual_tls\"")
                && l.contains(&format!("request_method=\"{method}\""))
                && l.contains(&format!("response_code=\"{code}\""))
        })
    };
    assert!(
        has("200", "GET") && has("403", "GET") && has("403", "POST"),
        "{m}"
    );
    assert!(m.contains("weft_request_duration_seconds_bucket{"), "{m}");
    assert!(m.contains("policy=\"shop/web-deny-secret\""), "{m}");
    assert!(!m
        .lines()
        .any(|l| l.starts_with("weft_requests_total{") && l.contains(":8080")));
}

const L7_ON_9090: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: tcp-l7, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - to: [{operation: {ports: ["9090"], paths: ["/x"]}}]
    - to: [{operation: {ports: ["8080"]}}]
"#;

#[test]
fn non_http_on_an_l7_port_is_never_more_permissive() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    let web = topology(&mut c);
    let ip = web.split(':').next().unwrap().to_string();
    let tcp = format!("{ip}:9090");
    let app = bin_path("weft-testapp").unwrap();
    c.spawn_app("shop/web", &app, &["server", "--listen", "0.0.0.0:9090"])
        .unwrap();
    c.wait_reachable("shop/client", &tcp).unwrap();
    // An ALLOW whose only rule for 9090 has L7 fields: raw TCP (not HTTP) there
    // matches no rule and is refused, while HTTP on 8080 still works.
    c.write_manifest("policies.yaml", L7_ON_9090).unwrap();
    wait_until(Duration::from_secs(20), || {
        let d = c.config_dump("node-b").ok()?;
        d["policies"]
            .get("AuthorizationPolicy/shop/tcp-l7")
            .is_some()
            .then_some(())
    })
    .expect("policy at node-b");
    let (ok, out, err) = c
        .run_app(
            "shop/client",
            &app,
            &["client", "--connect", &tcp, "--bytes", "64"],
        )
        .unwrap();
    assert!(!ok, "raw TCP to an L7-only port got through: {out}{err}");
    assert_eq!(
        curl(&c, "shop/client", &[], &format!("http://{web}/any")).0,
        200
    );
    let (_, dump) = c.node_http("node-b", "/config_dump").unwrap();
    let v: serde_json::Value = serde_json::from_str(&dump).unwrap();
    assert!(
        v["proxy"]["l7_opaque_denied"].as_u64().unwrap_or(0) >= 1,
        "{}\n{}",
        v["proxy"],
        c.agent_log("node-b")
    );
}
