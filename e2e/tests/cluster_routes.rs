//! Gateway API routes for the mesh (GAMMA), decided in the source node's proxy:
//! matching and precedence, weighted splits, per-request balancing of one HTTP/1.1
//! keep-alive and one HTTP/2 connection, redirects, rewrites, header modifiers,
//! timeouts and retries, with the destination's policy still deciding each
//! request. Real pods (network namespaces), real agents and control plane. Root;
//! runs in CI.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

const VIP: &str = "10.96.0.60:80";
const FLAKY_VIP: &str = "10.96.0.63:80";
const STRICT_VIP: &str = "10.96.0.66:80";

const GRPC_VIP: &str = "10.96.0.64:50051";

const GRPC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: greeter, namespace: mesh}
spec:
  clusterIP: 10.96.0.64
  selector: {app: greeter}
  ports: [{name: grpc, port: 50051, targetPort: 50051}]
---
apiVersion: v1
kind: Service
metadata: {name: greeter-g3, namespace: mesh}
spec:
  clusterIP: 10.96.0.65
  selector: {app: greeter, pick: g3}
  ports: [{name: grpc, port: 50051, targetPort: 50051}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules:
  - matches: [{method: {service: weft.test.Other}}]
    backendRefs: [{name: greeter-g3, port: 50051}]
  - backendRefs: [{name: greeter, port: 50051}]
"#;

const SERVICES: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: mesh}
spec:
  clusterIP: 10.96.0.60
  selector: {app: echo}
  ports: [{name: web, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v1, namespace: mesh}
spec:
  clusterIP: 10.96.0.61
  selector: {app: echo, version: v1}
  ports: [{name: web, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: mesh}
spec:
  clusterIP: 10.96.0.62
  selector: {app: echo, version: v2}
  ports: [{name: web, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: strict, namespace: mesh}
spec:
  clusterIP: 10.96.0.66
  selector: {app: echo}
  ports: [{name: web, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: flaky, namespace: mesh}
spec:
  clusterIP: 10.96.0.63
  selector: {app: flaky}
  ports: [{name: web, port: 80, targetPort: 8080}]
"#;

const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: canary-header
    matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - name: spread
    matches: [{path: {type: PathPrefix, value: /spread}}]
    backendRefs: [{name: echo, port: 80}]
  - name: moved
    matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: new.example, statusCode: 301}}]
  - name: rewrite
    matches: [{path: {type: PathPrefix, value: /shop}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /store}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: rewrite}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-resp, value: added}]}}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: slow
    matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: mirrored
    matches: [{path: {type: PathPrefix, value: /count}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: gone
    matches: [{path: {type: PathPrefix, value: /gone}}]
    backendRefs: [{name: no-such-service, port: 80}]
  - name: split
    backendRefs:
    - {name: echo-v1, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: web}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: mesh}]
  rules:
  - filters:
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-consumer, value: web}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: strict, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: strict}]
  rules:
  - matches: [{path: {type: Exact, value: /only}}]
    backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: mesh}
spec:
  parentRefs: [{group: "", kind: Service, name: flaky}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {attempts: 1, codes: [503]}
"#;

/// The destination still decides every request: v2 refuses `/spread/secret`.
const POLICY: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: v2-no-secret, namespace: mesh}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules: [{to: [{operation: {paths: [/spread/secret]}}]}]
"#;

struct Mesh {
    c: LocalCluster,
    app: std::path::PathBuf,
}

impl Mesh {
    fn requests(&self, args: &[&str]) -> Value {
        let mut all = vec!["requests"];
        all.extend_from_slice(args);
        let (ok, out, err) = self.c.run_app("mesh/client", &self.app, &all).unwrap();
        assert!(
            ok,
            "requests {args:?}: {err}\n{}",
            self.c.agent_log("node-a")
        );
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }

    fn get(&self, vip: &str, path: &str) -> Value {
        let (ok, out, err) = self
            .c
            .run_app(
                "mesh/client",
                &self.app,
                &["get", "--connect", vip, "--path", path, "--host", "echo"],
            )
            .unwrap();
        assert!(ok, "get {path}: {err}");
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    }
}

fn counts(v: &Value, field: &str) -> BTreeMap<String, u64> {
    v[field]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

fn setup() -> Mesh {
    let app = bin_path("weft-testapp").unwrap();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("mesh", true).unwrap();
    let pods = [
        (
            "v1-a",
            "node-a",
            vec![("app", "echo"), ("version", "v1")],
            "0",
        ),
        (
            "v1-b",
            "node-b",
            vec![("app", "echo"), ("version", "v1")],
            "0",
        ),
        (
            "v2",
            "node-b",
            vec![("app", "echo"), ("version", "v2")],
            "0",
        ),
        ("flaky", "node-b", vec![("app", "flaky")], "2"),
    ];
    for (name, node, labels, fail_every) in &pods {
        let ip = c.add_pod("mesh", name, node, labels).unwrap();
        let count = c.dir.path().join(format!("{name}.count"));
        c.spawn_app(
            &format!("mesh/{name}"),
            &app,
            &[
                "http",
                "--listen",
                &format!("{ip}:8080"),
                "--name",
                name,
                "--fail-every",
                fail_every,
                "--count-file",
                count.to_str().unwrap(),
            ],
        )
        .unwrap();
    }
    let greeters = [
        ("g1", "node-a", vec![("app", "greeter")]),
        ("g2", "node-b", vec![("app", "greeter")]),
        ("g3", "node-b", vec![("app", "greeter"), ("pick", "g3")]),
    ];
    for (name, node, labels) in &greeters {
        let ip = c.add_pod("mesh", name, node, labels).unwrap();
        c.spawn_app(
            &format!("mesh/{name}"),
            &app,
            &[
                "grpc-server",
                "--listen",
                &format!("{ip}:50051"),
                "--name",
                name,
            ],
        )
        .unwrap();
    }
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.namespace("web", true).unwrap();
    c.add_pod("web", "client", "node-a", &[]).unwrap();
    c.write_manifest("services.yaml", SERVICES).unwrap();
    c.write_manifest("grpc.yaml", GRPC).unwrap();
    c.write_manifest("routes.yaml", ROUTES).unwrap();
    c.write_manifest("policy.yaml", POLICY).unwrap();
    for (name, node, _, _) in &pods {
        c.wait_enrolled(node, &format!("mesh/{name}")).unwrap();
    }
    for (name, node, _) in &greeters {
        c.wait_enrolled(node, &format!("mesh/{name}")).unwrap();
    }
    c.wait_enrolled("node-a", "mesh/client").unwrap();
    c.wait_enrolled("node-a", "web/client").unwrap();
    let m = Mesh { c, app };
    // The routes reached node-a: the canary header goes to v2.
    let reached = wait_until(Duration::from_secs(20), || {
        let (ok, out, _) =
            m.c.run_app(
                "mesh/client",
                &m.app,
                &[
                    "requests",
                    "--connect",
                    VIP,
                    "--count",
                    "1",
                    "--header",
                    "x-canary:yes",
                ],
            )
            .ok()?;
        (ok && out.contains("\"v2\":1")).then_some(())
    });
    assert!(
        reached.is_some(),
        "routes not in force on node-a\n{}",
        m.c.agent_log("node-a")
    );
    m
}

#[test]
fn gateway_api_routes_are_decided_per_request_at_the_source() {
    require_root();
    let m = setup();

    // Weighted split over one keep-alive connection: 90/10 between v1 and v2.
    let r = m.requests(&["--connect", VIP, "--count", "1000"]);
    let by = counts(&r, "served_by");
    assert_eq!(counts(&r, "status").get("200"), Some(&1000), "{r}");
    let v2 = by.get("v2").copied().unwrap_or(0);
    let v1 = by.get("v1-a").copied().unwrap_or(0) + by.get("v1-b").copied().unwrap_or(0);
    assert_eq!(v1 + v2, 1000, "{by:?}");
    // 100 expected; 3.2 standard deviations either way.
    assert!((70..=130).contains(&v2), "v2 share of 1000: {v2} ({by:?})");
    // Per request, not per connection: both v1 endpoints served this one connection.
    assert!(by.get("v1-a").copied().unwrap_or(0) > 100, "{by:?}");
    assert!(by.get("v1-b").copied().unwrap_or(0) > 100, "{by:?}");

    // A header match outranks the default rule.
    let r = m.requests(&[
        "--connect",
        VIP,
        "--count",
        "50",
        "--header",
        "x-canary:yes",
    ]);
    assert_eq!(counts(&r, "served_by").get("v2"), Some(&50), "{r}");

    // One HTTP/2 connection, 3000 requests, spread across the three endpoints.
    let r = m.requests(&[
        "--connect",
        VIP,
        "--h2",
        "--count",
        "3000",
        "--concurrency",
        "10",
        "--path",
        "/spread/x",
    ]);
    assert_eq!(counts(&r, "status").get("200"), Some(&3000), "{r}");
    let by = counts(&r, "served_by");
    for ep in ["v1-a", "v1-b", "v2"] {
        let n = by.get(ep).copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&n),
            "{ep}: {n} of 3000 (each must be within 20% of 1000): {by:?}"
        );
    }

    // The destination's policy still decides: v2 refuses the path, v1 serves it.
    let r = m.requests(&[
        "--connect",
        VIP,
        "--h2",
        "--count",
        "300",
        "--concurrency",
        "5",
        "--path",
        "/spread/secret",
    ]);
    let status = counts(&r, "status");
    let by = counts(&r, "served_by");
    assert!(!by.contains_key("v2"), "v2 must refuse every request: {r}");
    assert_eq!(
        status.get("403").copied().unwrap_or(0) + status.get("200").copied().unwrap_or(0),
        300,
        "{r}"
    );
    assert!(status.get("403").copied().unwrap_or(0) > 30, "{r}");

    // Redirect: answered at the source with the filter's status and location.
    let r = m.get(VIP, "/old?x=1");
    assert_eq!(r["status"], 301, "{r}");
    assert_eq!(
        r["headers"]["location"], "http://new.example/old?x=1",
        "{r}"
    );

    // Rewrite + request and response header modifiers.
    let r = m.get(VIP, "/shop/cart?id=7");
    assert_eq!(r["status"], 200, "{r}");
    let body = r["body"].as_str().unwrap_or_default();
    assert!(body.starts_with("GET /store/cart?id=7"), "{r}");
    assert!(body.contains("x-route=rewrite"), "{r}");
    assert_eq!(r["headers"]["x-resp"], "added", "{r}");
    assert!(
        ["v1-a", "v1-b"].contains(&r["headers"]["x-served-by"].as_str().unwrap_or("")),
        "{r}"
    );

    // Timeout: a 2 s answer is cut at 300 ms with 504.
    let t = Instant::now();
    let r = m.get(VIP, "/delay/2000");
    assert_eq!(r["status"], 504, "{r}");
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // A consumer route (namespace web, on Service mesh/echo) applies to web's
    // clients only, and replaces the producer route for them: no split, every
    // endpoint of echo, and its response header; mesh's client is unaffected.
    let (ok, out, err) =
        m.c.run_app(
            "web/client",
            &m.app,
            &[
                "requests",
                "--connect",
                VIP,
                "--count",
                "300",
                "--show-header",
                "x-consumer",
            ],
        )
        .unwrap();
    assert!(ok, "{err}");
    let r: Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(counts(&r, "header").get("web"), Some(&300), "{r}");
    assert_eq!(
        counts(&r, "served_by").len(),
        3,
        "all three echo endpoints: {r}"
    );
    let r = m.requests(&[
        "--connect",
        VIP,
        "--count",
        "20",
        "--show-header",
        "x-consumer",
    ]);
    assert_eq!(counts(&r, "header").get("-"), Some(&20), "{r}");

    // No rule matches: 404; the one that does is served.
    assert_eq!(m.get(STRICT_VIP, "/other")["status"], 404);
    assert_eq!(m.get(STRICT_VIP, "/only")["status"], 200);

    // Mirror: every /count request served by v1 is also sent to v2 (whose answer
    // is dropped).
    let r = m.requests(&["--connect", VIP, "--count", "50", "--path", "/count/x"]);
    let by = counts(&r, "served_by");
    assert_eq!(
        by.get("v1-a").copied().unwrap_or(0) + by.get("v1-b").copied().unwrap_or(0),
        50,
        "{r}"
    );
    let read = |name: &str| -> u64 {
        std::fs::read_to_string(m.c.dir.path().join(format!("{name}.count")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    assert!(
        wait_until(Duration::from_secs(5), || (read("v2") == 50).then_some(())).is_some(),
        "v2 saw {} mirrored requests of 50",
        read("v2")
    );

    // A backend that does not exist: 500, the spec's answer.
    let r = m.get(VIP, "/gone");
    assert_eq!(r["status"], 500, "{r}");

    // Retries: the flaky endpoint fails every other request; each failure is retried.
    let r = m.requests(&["--connect", FLAKY_VIP, "--count", "100"]);
    assert_eq!(counts(&r, "status").get("200"), Some(&100), "{r}");

    // gRPC (real tonic client and servers): one channel spreads 3,000 calls across
    // the three endpoints, and a GRPCRoute method match sends a service elsewhere.
    let grpc = |args: &[&str]| -> Value {
        let mut all = vec!["grpc-calls", "--connect", GRPC_VIP];
        all.extend_from_slice(args);
        let (ok, out, err) = m.c.run_app("mesh/client", &m.app, &all).unwrap();
        assert!(
            ok,
            "grpc-calls {args:?}: {err}\n{}",
            m.c.agent_log("node-a")
        );
        serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{e}: {out}"))
    };
    let r = grpc(&["--count", "3000", "--concurrency", "10"]);
    assert_eq!(counts(&r, "codes").get("OK"), Some(&3000), "{r}");
    let by = counts(&r, "served_by");
    for ep in ["g1", "g2", "g3"] {
        let n = by.get(ep).copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&n),
            "gRPC {ep}: {n} of 3000 (each must be within 20% of 1000): {by:?}"
        );
    }
    let r = grpc(&[
        "--method",
        "/weft.test.Other/Call",
        "--count",
        "100",
        "--concurrency",
        "4",
    ]);
    assert_eq!(counts(&r, "served_by").get("g3"), Some(&100), "{r}");

    // Route status: /debug/status and `weftctl status` list each route per Service
    // parent with Accepted and ResolvedRefs (echo names a missing Service).
    let (_, st) = m.c.cp_http("/debug/status").unwrap();
    let st: Value = serde_json::from_str(&st).unwrap();
    let echo = st["routes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["route"] == "HTTPRoute mesh/echo")
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(echo["parent"], "mesh/echo:80", "{echo}");
    assert_eq!(echo["accepted"], true, "{echo}");
    assert_eq!(echo["resolved_refs_reason"], "BackendNotFound", "{echo}");
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", m.c.fabric_netns()))
        .arg(bin_path("weftctl").unwrap())
        .args(["status", "--control-plane", &m.c.control_plane_admin()])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.contains("HTTPRoute mesh/echo") && l.contains("mesh/echo:80"))
        .unwrap_or_else(|| panic!("no route row in weftctl status:\n{table}"));
    assert!(
        row.contains("True (Accepted)") && row.contains("False (BackendNotFound)"),
        "{row}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains("GRPCRoute mesh/greeter") && l.contains("True (ResolvedRefs)")),
        "{table}"
    );

    // Metrics name the route, rule and backend.
    let (_, metrics) = m.c.node_http("node-a", "/metrics").unwrap();
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("weft_routed_requests_total{")
                && l.contains("route=\"mesh/echo\"")
                && l.contains("rule=\"split\"")
                && l.contains("backend=\"mesh/echo-v2\"")
        })
        .unwrap_or_else(|| panic!("no routed request series:\n{metrics}"));
    let n: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(n >= 70.0, "{line}");
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("weft_routed_retries_total{")
                && l.contains("route=\"mesh/flaky\"")),
        "retries counted"
    );
}
