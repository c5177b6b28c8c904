//! PeerAuthentication at the destination node proxy (issue 29): STRICT refuses
//! plaintext (new and already open connections) while mesh clients keep working;
//! mesh-wide, namespace and workload scopes with Istio's precedence; port-level
//! overrides; an invalid object fails closed (STRICT) and says why; the refusals
//! are counted; `weftctl authz check` and `analyze` say the same.
//! Root; runs in CI.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

fn app() -> std::path::PathBuf {
    bin_path("weft-testapp").unwrap()
}

fn connect(c: &LocalCluster, pod: &str, dst: &str) -> bool {
    c.run_app(
        pod,
        &app(),
        &["client", "--connect", dst, "--bytes", "4096"],
    )
    .map(|r| r.0)
    .unwrap_or(false)
}

/// Waits until `pod` -> `dst` succeeds (`want`) or fails, then checks it twice
/// more: a decision in force, not a connection caught mid-change.
fn settles(c: &LocalCluster, pod: &str, dst: &str, want: bool, what: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || (connect(c, pod, dst) == want)
            .then_some(()))
        .is_some(),
        "{what}: {pod} -> {dst} never became {}",
        if want { "allowed" } else { "refused" }
    );
    for _ in 0..2 {
        assert_eq!(connect(c, pod, dst), want, "{what}: {pod} -> {dst}");
    }
}

const NAMESPACE_STRICT: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec:
  mtls: {mode: STRICT}
"#;

/// The workload's own: inherits STRICT (UNSET) but opens port 9090 to plaintext.
const SERVER_PORT_9090_PERMISSIVE: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: server-metrics, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  mtls: {mode: UNSET}
  portLevelMtls:
    "9090": {mode: PERMISSIVE}
"#;

const NAMESPACE_PERMISSIVE: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec:
  mtls: {mode: PERMISSIVE}
"#;

const MESH_STRICT: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh-strict, namespace: weft-system}
spec:
  mtls: {mode: STRICT}
"#;

/// Port-level modes without a selector: invalid, so enforced as STRICT.
const INVALID: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: typo, namespace: mesh}
spec:
  portLevelMtls:
    "8080": {mode: PERMISSIVE}
"#;

/// An ALLOW rule by address on a workload that is STRICT everywhere.
const ALLOW_BY_IP: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: by-ip, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  rules:
    - from: [{source: {ipBlocks: ["10.0.0.0/8"]}}]
"#;

fn strict_refusals(c: &LocalCluster, node: &str, by: &str) -> u64 {
    let (_, m) = c.node_http(node, "/metrics").unwrap();
    m.lines()
        .find(|l| {
            l.starts_with("weft_plaintext_refused_strict_mtls_total{")
                && l.contains(&format!("peer_authentication=\"{by}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

fn weftctl(c: &LocalCluster, args: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(bin_path("weftctl").unwrap())
        .args(args)
        .args(["--dir", c.config_dir().to_str().unwrap(), "-o", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "weftctl {args:?}: {e}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), v)
}

#[test]
fn strict_mtls_refuses_plaintext_and_keeps_the_mesh_working() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c
        .add_pod("mesh", "server", "node-b", &[("app", "server")])
        .unwrap();
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.add_pod("plain", "client", "node-a", &[]).unwrap();
    for port in [8080, 9090] {
        c.spawn_app(
            "mesh/server",
            &app(),
            &["server", "--listen", &format!("{ip}:{port}")],
        )
        .unwrap();
    }
    let (d8080, d9090) = (format!("{ip}:8080"), format!("{ip}:9090"));
    c.wait_enrolled("node-b", "mesh/server").unwrap();
    c.wait_enrolled("node-a", "mesh/client").unwrap();
    // PERMISSIVE by default: plaintext and mesh clients both get through.
    settles(&c, "mesh/client", &d8080, true, "no PeerAuthentication");
    settles(&c, "plain/client", &d8080, true, "no PeerAuthentication");

    // A plaintext connection open before STRICT is closed by it.
    let p = c.pod("plain/client");
    let mut open = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "exec nsenter --net=/var/run/netns/{} -- {} client --connect {d8080} --bytes 1024 --hold-ms 8000",
            p.netns,
            app().display()
        ))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || {
            let d = c.config_dump("node-b").ok()?;
            (d["proxy"]["open_inbound"].as_u64()? >= 1).then_some(())
        })
        .is_some(),
        "the plaintext connection is open at node-b"
    );
    let t0 = Instant::now();
    c.write_manifest("strict.yaml", NAMESPACE_STRICT).unwrap();
    let status = loop {
        if let Some(s) = open.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "an open plaintext connection survived STRICT"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(
        !status.success(),
        "the plaintext transfer must not complete"
    );
    eprintln!(
        "open plaintext connection closed {:?} after STRICT was written",
        t0.elapsed()
    );

    // Namespace STRICT: plaintext refused on every port, the mesh unaffected.
    settles(&c, "plain/client", &d8080, false, "namespace STRICT");
    settles(&c, "plain/client", &d9090, false, "namespace STRICT");
    settles(&c, "mesh/client", &d8080, true, "namespace STRICT");
    let refused = strict_refusals(&c, "node-b", "mesh/strict");
    assert!(refused >= 4, "refusals counted: {refused}");

    // weftctl sees what the proxy does.
    let (ok, v) = weftctl(
        &c,
        &[
            "authz",
            "check",
            "--from",
            "10.99.0.1",
            "--to",
            "mesh/server:8080",
        ],
    );
    assert!(!ok, "{v}");
    assert_eq!(v["results"][0]["allowed"], false, "{v}");
    assert_eq!(
        v["results"][0]["policy"], "PeerAuthentication mesh/strict",
        "{v}"
    );
    assert_eq!(v["results"][0]["mtls"]["mode"], "STRICT", "{v}");
    let (ok, v) = weftctl(
        &c,
        &[
            "authz",
            "check",
            "--from",
            "mesh/client",
            "--to",
            "mesh/server:8080",
        ],
    );
    assert!(ok, "a mesh client is not refused by STRICT: {v}");

    // The workload's own port-level PERMISSIVE wins over the namespace's STRICT,
    // on that port only.
    c.write_manifest("server.yaml", SERVER_PORT_9090_PERMISSIVE)
        .unwrap();
    settles(&c, "plain/client", &d9090, true, "port-level PERMISSIVE");
    settles(&c, "plain/client", &d8080, false, "workload UNSET inherits");

    // An ALLOW by address on a workload STRICT on every port is flagged (here
    // 9090 is PERMISSIVE, so it is not).
    c.write_manifest("by-ip.yaml", ALLOW_BY_IP).unwrap();
    let (_, v) = weftctl(&c, &["analyze"]);
    let flagged = |v: &Value| {
        v["findings"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|f| f["code"] == "PlaintextRuleOnStrictWorkload")
    };
    assert!(!flagged(&v), "{v}");
    std::fs::remove_file(c.config_dir().join("server.yaml")).unwrap();
    let (_, v) = weftctl(&c, &["analyze"]);
    assert!(flagged(&v), "{v}");
    std::fs::remove_file(c.config_dir().join("by-ip.yaml")).unwrap();
    settles(
        &c,
        "plain/client",
        &d9090,
        false,
        "back to namespace STRICT",
    );

    // The namespace's PERMISSIVE wins over the mesh's STRICT.
    c.write_manifest("strict.yaml", NAMESPACE_PERMISSIVE)
        .unwrap();
    c.write_manifest("mesh.yaml", MESH_STRICT).unwrap();
    settles(
        &c,
        "plain/client",
        &d8080,
        true,
        "namespace PERMISSIVE over mesh STRICT",
    );
    std::fs::remove_file(c.config_dir().join("strict.yaml")).unwrap();
    settles(&c, "plain/client", &d8080, false, "mesh STRICT");
    assert!(strict_refusals(&c, "node-b", "weft-system/mesh-strict") >= 3);
    std::fs::remove_file(c.config_dir().join("mesh.yaml")).unwrap();
    settles(
        &c,
        "plain/client",
        &d8080,
        true,
        "no PeerAuthentication again",
    );

    // Invalid: enforced as STRICT, and the status says why.
    c.write_manifest("typo.yaml", INVALID).unwrap();
    settles(
        &c,
        "plain/client",
        &d8080,
        false,
        "an invalid PeerAuthentication",
    );
    settles(
        &c,
        "mesh/client",
        &d8080,
        true,
        "an invalid PeerAuthentication",
    );
    let (_, st) = c.cp_http("/debug/status").unwrap();
    let st: Value = serde_json::from_str(&st).unwrap();
    let typo = st["rejected"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["object"] == "PeerAuthentication mesh/typo")
        .unwrap_or_else(|| panic!("{st}"));
    assert_eq!(typo["accepted"], false, "{typo}");
    assert!(
        typo["errors"][0]
            .as_str()
            .unwrap()
            .starts_with("spec.portLevelMtls: needs spec.selector"),
        "{typo}"
    );
}
