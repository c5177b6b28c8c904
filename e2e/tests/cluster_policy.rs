//! L4 AuthorizationPolicy at the destination node proxy, across nodes over HBONE.
//! Root; runs in CI.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

fn app() -> std::path::PathBuf {
    bin_path("weft-testapp").unwrap()
}

const ALLOW_ALLOWED_ON_8080: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-allow, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/mesh/sa/allowed"]}}]
      to: [{operation: {ports: ["8080"]}}]
"#;

const DENY_OTHER: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-deny-other, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: DENY
  rules:
    - from: [{source: {serviceAccounts: ["mesh/other"]}}]
"#;

fn connect(c: &LocalCluster, pod: &str, dst: &str) -> bool {
    c.run_app(
        pod,
        &app(),
        &["client", "--connect", dst, "--bytes", "4096"],
    )
    .map(|r| r.0)
    .unwrap_or(false)
}

/// A client in `pod` holding one connection to `dst` for 8 s (in the pod's cgroup
/// and netns, so it is captured like the pod's own traffic).
fn long_lived(c: &LocalCluster, pod: &str, dst: &str) -> std::process::Child {
    let p = c.pod(pod);
    let cmd = format!(
        "echo $$ > {}/cgroup.procs && exec nsenter --net=/var/run/netns/{} -- {} client --connect {dst} --bytes 1024 --hold-ms 8000",
        p.cgroup.display(),
        p.netns,
        app().display()
    );
    std::process::Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

#[test]
fn allow_and_deny_across_nodes_and_policy_changes_close_open_connections() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c
        .add_pod("mesh", "server", "node-b", &[("app", "server")])
        .unwrap();
    c.add_pod("mesh", "allowed", "node-a", &[]).unwrap();
    c.add_pod("mesh", "other", "node-a", &[]).unwrap();
    c.add_pod("plain", "client", "node-a", &[]).unwrap();
    for port in [8080, 8081] {
        c.spawn_app(
            "mesh/server",
            &app(),
            &["server", "--listen", &format!("{ip}:{port}")],
        )
        .unwrap();
    }
    let (d8080, d8081) = (format!("{ip}:8080"), format!("{ip}:8081"));
    for (node, pod) in [
        ("node-b", "mesh/server"),
        ("node-a", "mesh/allowed"),
        ("node-a", "mesh/other"),
    ] {
        c.wait_enrolled(node, pod).unwrap();
    }
    // Before any policy: everyone gets through (certificates may take a moment).
    assert!(wait_until(Duration::from_secs(10), || connect(
        &c,
        "mesh/other",
        &d8080
    )
    .then_some(()))
    .is_some());
    assert!(connect(&c, "plain/client", &d8080));

    // A long-lived connection from mesh/other, open before the DENY policy exists.
    let mut long_lived = long_lived(&c, "mesh/other", &d8080);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let d = c.config_dump("node-b").ok()?;
            (d["proxy"]["open_inbound"].as_u64()? >= 1).then_some(())
        })
        .is_some(),
        "the long-lived connection is open at node-b: {:?} {}",
        long_lived.try_wait(),
        c.config_dump("node-b")
            .map(|d| d["proxy"].to_string())
            .unwrap_or_default()
            + &c.config_dump("node-a")
                .map(|d| d["enrolled_pods"].to_string() + &d["proxy"].to_string())
                .unwrap_or_default()
    );
    let t0 = Instant::now();
    c.write_manifest("deny.yaml", DENY_OTHER).unwrap();
    let status = loop {
        if let Some(s) = long_lived.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "open connection not closed after the DENY policy"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let closed_after = t0.elapsed();
    eprintln!("open connection closed {closed_after:?} after the policy was written");
    assert!(!status.success(), "the denied connection must not complete");
    assert!(
        closed_after < Duration::from_secs(1),
        "took {closed_after:?}"
    );
    let d = c.config_dump("node-b").unwrap();
    assert!(d["proxy"]["closed_by_policy_change"].as_u64().unwrap() >= 1);
    // New connections from mesh/other are denied; mesh/allowed still fine.
    assert!(!connect(&c, "mesh/other", &d8080));
    assert!(connect(&c, "mesh/allowed", &d8080));

    // ALLOW only mesh/allowed on 8080: everything else is denied.
    c.write_manifest("allow.yaml", ALLOW_ALLOWED_ON_8080)
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || (!connect(
            &c,
            "plain/client",
            &d8080
        ))
        .then_some(()))
        .is_some(),
        "plaintext must be denied (no principal)"
    );
    // That failure may have been an in-flight connection closed by the policy
    // re-check; with the policy now in effect a new one is refused at accept.
    assert!(
        !connect(&c, "plain/client", &d8080),
        "plaintext must be denied (no principal)"
    );
    assert!(
        connect(&c, "mesh/allowed", &d8080),
        "allowed identity on an allowed port"
    );
    assert!(
        !connect(&c, "mesh/allowed", &d8081),
        "allowed identity on another port"
    );
    assert!(!connect(&c, "mesh/other", &d8080));
    let d = c.config_dump("node-b").unwrap();
    assert!(
        d["proxy"]["hbone_in_denied"].as_u64().unwrap() >= 3,
        "{}",
        d["proxy"]
    );
    assert!(
        d["proxy"]["plaintext_in_denied"].as_u64().unwrap() >= 1,
        "{}",
        d["proxy"]
    );
}

const DENY_QUARANTINED: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: quarantine, namespace: mesh}
spec:
  selector: {matchLabels: {quarantine: "true"}}
  action: DENY
  rules:
    - {}
"#;

/// Issue 27, item 6: the policies that apply to a pod follow its labels. A pod
/// relabelled into a DENY policy's selector has its open connections closed and
/// new ones denied; relabelled out of it, it is reachable again. (The proxy used to
/// keep the labels the pod had when it was enrolled.)
#[test]
fn relabelling_a_pod_changes_which_policies_apply_to_it_and_its_open_connections() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    let dst = c.mesh_pair().unwrap();
    c.add_pod("mesh", "other", "node-a", &[]).unwrap();
    c.wait_enrolled("node-a", "mesh/other").unwrap();
    c.write_manifest("quarantine.yaml", DENY_QUARANTINED)
        .unwrap();
    // Nothing carries the label yet.
    assert!(
        wait_until(Duration::from_secs(10), || connect(&c, "mesh/other", &dst)
            .then_some(()))
        .is_some()
    );
    let mut long_lived = long_lived(&c, "mesh/other", &dst);
    assert!(
        wait_until(Duration::from_secs(5), || {
            let d = c.config_dump("node-b").ok()?;
            (d["proxy"]["open_inbound"].as_u64()? >= 1).then_some(())
        })
        .is_some(),
        "the long-lived connection is open at node-b"
    );
    let t0 = Instant::now();
    c.relabel_pod("mesh/server", &[("app", "server"), ("quarantine", "true")])
        .unwrap();
    let status = loop {
        if let Some(s) = long_lived.try_wait().unwrap() {
            break s;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "the open connection to a pod relabelled into a DENY policy was not closed\n{}\n{}",
            c.agent_log("node-b"),
            c.control_plane
                .as_ref()
                .map(|p| p.log_text())
                .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    assert!(!status.success(), "the denied connection must not complete");
    for pod in ["mesh/other", "mesh/client"] {
        assert!(!connect(&c, pod, &dst), "{pod} reached a quarantined pod");
    }
    let d = c.config_dump("node-b").unwrap();
    assert!(d["proxy"]["closed_by_policy_change"].as_u64().unwrap() >= 1);
    // Out of quarantine: reachable again.
    c.relabel_pod("mesh/server", &[("app", "server")]).unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || connect(&c, "mesh/client", &dst)
            .then_some(()))
        .is_some(),
        "the pod relabelled out of the DENY policy stays unreachable"
    );
}
