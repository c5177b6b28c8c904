//! weftctl end to end: the real binary against manifest directories (offline
//! authz check and analyze) and a running standalone mesh (status, config-dump,
//! certs). Exit codes and JSON output are checked exactly.

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;
use weft_e2e::{bin_path, StandaloneMesh};

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/standalone"
    ))
}

/// Runs weftctl; returns (exit code, stdout, stderr).
fn weftctl(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("weftctl").unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn json(args: &[&str]) -> (i32, serde_json::Value) {
    let mut a = args.to_vec();
    a.extend(["-o", "json"]);
    let (code, out, err) = weftctl(&a);
    let v = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}\n{err}"));
    (code, v)
}

#[test]
fn authz_check_offline_on_the_example() {
    let dir = example().to_str().unwrap();
    // The shop's web identity may call the ledger's gRPC port, through the Service.
    let (code, v) = json(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "shop/web-1",
        "--to",
        "payments/ledger:9090",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["allowed"], true);
    assert_eq!(v["from"]["principal"], "cluster.local/ns/shop/sa/web");
    assert_eq!(v["results"][0]["destination"], "payments/ledger-1:9090");
    assert_eq!(v["results"][0]["policy"], "payments/ledger-allow-web");
    assert_eq!(v["results"][0]["rule"], 0);
    // A pod outside the mesh has no identity: no ALLOW rule matches.
    let (code, v) = json(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "legacy/batch-1",
        "--to",
        "payments/ledger-1:9090",
    ]);
    assert_eq!(code, 1, "{v}");
    assert_eq!(v["results"][0]["allowed"], false);
    assert_eq!(v["results"][0]["reason"], "no ALLOW policy matched");
    assert_eq!(v["from"]["mtls"], false);
    // A SPIFFE ID and another port.
    let (code, _) = json(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "spiffe://cluster.local/ns/shop/sa/web",
        "--to",
        "payments/ledger-1:8080",
    ]);
    assert_eq!(code, 1);
    // Bad input: exit 2 and a message naming the problem.
    let (code, _, err) = weftctl(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "shop/nope",
        "--to",
        "payments/ledger:9090",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("no pod nope in namespace shop"), "{err}");
    let (code, _, err) = weftctl(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "shop/web-1",
        "--to",
        "payments/ledger:9091",
    ]);
    assert_eq!(code, 2);
    assert!(
        err.contains("service payments/ledger has no port 9091 (ports: 9090)"),
        "{err}"
    );
}

const L7: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop, uid: u-api-1, labels: {app: api}}
spec: {nodeName: n1, serviceAccountName: api, containers: [{name: api}]}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: shop, uid: u-client, labels: {app: client}}
spec: {nodeName: n1, serviceAccountName: client, containers: [{name: c}]}
status: {podIP: 10.0.0.11}
---
apiVersion: v1
kind: Pod
metadata: {name: admin, namespace: ops, uid: u-admin, labels: {app: admin}}
spec: {nodeName: n1, serviceAccountName: admin, containers: [{name: c}]}
status: {podIP: 10.0.0.12}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-read, namespace: shop}
spec:
  selector: {matchLabels: {app: api}}
  rules:
    - from: [{source: {namespaces: [shop]}}]
      to: [{operation: {ports: ["8080"], methods: [GET], paths: ["/api/*"]}}]
    - from: [{source: {principals: [cluster.local/ns/ops/sa/admin]}}]
      to: [{operation: {ports: ["8080"]}}]
"#;

#[test]
fn authz_check_at_l7() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("mesh.yaml"), L7).unwrap();
    let dir = d.path().to_str().unwrap();
    let check = |extra: &[&str]| {
        let mut a = vec!["authz", "check", "--dir", dir, "--to", "shop/api-1:8080"];
        a.extend_from_slice(extra);
        json(&a)
    };
    let (code, v) = check(&[
        "--from",
        "shop/client",
        "--method",
        "GET",
        "--path",
        "/api/items",
    ]);
    assert_eq!(
        (code, &v["results"][0]["rule"]),
        (0, &serde_json::json!(0)),
        "{v}"
    );
    // Paths are normalized as the proxy does.
    let (code, v) = check(&[
        "--from",
        "shop/client",
        "--method",
        "get",
        "--path",
        "/./api//items",
    ]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["request"]["path"], "/api/items");
    let (code, v) = check(&[
        "--from",
        "shop/client",
        "--method",
        "POST",
        "--path",
        "/api/items",
    ]);
    assert_eq!(code, 1, "{v}");
    // The admin identity matches rule 1, any request.
    let (code, v) = check(&["--from", "ops/admin", "--method", "DELETE", "--path", "/x"]);
    assert_eq!(
        (code, &v["results"][0]["rule"]),
        (0, &serde_json::json!(1)),
        "{v}"
    );
    // Without a request, the table says the port is parsed as HTTP.
    let (code, out, _) = weftctl(&[
        "authz",
        "check",
        "--dir",
        dir,
        "--from",
        "shop/client",
        "--to",
        "shop/api-1:8080",
    ]);
    assert_eq!(code, 1);
    assert!(out.contains("parsed as HTTP"), "{out}");
}

const LINT: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u-web, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web, containers: [{name: web}]}
status: {podIP: 10.0.0.10}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  selector: {app: web}
  ports: [{name: tcp-db, port: 5432, targetPort: 5432, appProtocol: tcp}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: nobody, namespace: shop}
spec:
  selector: {matchLabels: {app: missing}}
  rules: [{}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: typos, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - from: [{source: {namespaces: [shpo], principals: [cluster.local/ns/shop/sa/wbe]}}]
    - from: [{source: {namespaces: [shpo], principals: [cluster.local/ns/shop/sa/wbe]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-l7, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
    - to: [{operation: {ports: ["5432"], methods: [GET]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{}]
"#;

#[test]
fn analyze_finds_each_kind_of_mistake() {
    let d = tempfile::tempdir().unwrap();
    std::fs::write(d.path().join("mesh.yaml"), LINT).unwrap();
    let (code, v) = json(&["analyze", "--dir", d.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{v}");
    let found: Vec<(String, String, String)> = v["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["code"].as_str().unwrap().to_string(),
                f["object"].as_str().unwrap().to_string(),
                f["field"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let has = |code: &str, obj: &str, field: &str| {
        assert!(
            found
                .iter()
                .any(|(c, o, f)| c == code && o.ends_with(obj) && f.starts_with(field)),
            "missing {code} {obj} {field} in {found:#?}"
        )
    };
    has("SelectsNothing", "shop/nobody", "spec.selector");
    has(
        "UnknownNamespace",
        "shop/typos",
        "spec.rules[0].from[0].source.namespaces",
    );
    has(
        "UnknownServiceAccount",
        "shop/typos",
        "spec.rules[0].from[0].source.principals",
    );
    has("DuplicateRule", "shop/typos", "spec.rules[1]");
    has(
        "L7OnNonHttpPort",
        "shop/db-l7",
        "spec.rules[0].to[0].operation.ports",
    );
    has("Shadowed", "shop/db-l7", "spec.rules");
    has("Shadowed", "shop/typos", "spec.rules");
    // The clean example has no findings.
    let (code, v) = json(&["analyze", "--dir", example().to_str().unwrap()]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["findings"], serde_json::json!([]));
}

#[test]
fn status_config_dump_and_certs_of_a_running_mesh() {
    let mut m = StandaloneMesh::new(Some(example()), &[]).unwrap();
    m.start_control_plane().unwrap();
    m.start_node("node-a").unwrap();
    m.start_node("node-b").unwrap();
    for n in ["node-a", "node-b"] {
        m.wait_node(n, Duration::from_secs(20), "certificates", |d| {
            d["synced"] == true && !weft_e2e::standalone::cert_ids(d).is_empty()
        })
        .unwrap();
    }
    let cp = m.cp_admin();
    let a = format!("node-a={}", m.node_admin("node-a"));
    let b = format!("node-b={}", m.node_admin("node-b"));
    let (code, v) = json(&["status", "--control-plane", &cp, "--node", &a, "--node", &b]);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["control_plane"][0]["leader"], true);
    assert_eq!(v["control_plane"][0]["ready"], true);
    assert_eq!(v["nodes"]["node-a"]["state"], "ACK");
    assert_eq!(v["nodes"]["node-b"]["state"], "ACK");
    let certs = v["certificates"].as_array().unwrap();
    assert_eq!(certs.len(), 3, "{v}");
    let expiries: Vec<&str> = certs
        .iter()
        .map(|c| c["not_after"].as_str().unwrap())
        .collect();
    let mut sorted = expiries.clone();
    sorted.sort();
    assert_eq!(expiries, sorted, "soonest expiry first");
    let (code, table, _) = weftctl(&["status", "--control-plane", &cp, "--node", &a]);
    assert_eq!(code, 0);
    assert!(table.contains("leader"), "{table}");
    assert!(
        table.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{table}"
    );

    let (code, v) = json(&["certs", "node-a", "--admin", &m.node_admin("node-a")]);
    assert_eq!(code, 0);
    assert_eq!(
        v["certificates"][0]["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    let (code, v) = json(&["config-dump", "node-b", "--admin", &m.node_admin("node-b")]);
    assert_eq!(code, 0);
    assert_eq!(v["node"], "node-b");
    assert!(
        v["policies"]["AuthorizationPolicy/payments/ledger-allow-web"].is_object(),
        "{v}"
    );
    // Asking a node for another's dump is an error, not a wrong answer.
    let (code, _, err) = weftctl(&["config-dump", "node-a", "--admin", &m.node_admin("node-b")]);
    assert_eq!(code, 2);
    assert!(err.contains("is node \"node-b\", not \"node-a\""), "{err}");
    // A control plane that is not there: unhealthy, exit 1, reachable=false.
    m.kill_control_plane();
    let (code, v) = json(&["status", "--control-plane", &cp]);
    assert_eq!(code, 1);
    assert_eq!(v["control_plane"][0]["reachable"], false);
}
