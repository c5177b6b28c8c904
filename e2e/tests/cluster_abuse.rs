//! The proxy's own ports are never destinations, and the proxy holds a bounded
//! number of connections. Before this, one connection to `<pod IP>:15006` (or an
//! HBONE CONNECT to it) was authorized and dialled again from inside the pod into
//! the same listener, over and over, until the agent ran out of file descriptors
//! and every pod of its node fell off the mesh. Root; runs in CI.

#![forbid(unsafe_code)]

use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

fn app() -> std::path::PathBuf {
    bin_path("weft-testapp").unwrap()
}

fn counter(c: &LocalCluster, node: &str, name: &str) -> u64 {
    c.config_dump(node).unwrap()["proxy"][name]
        .as_u64()
        .unwrap_or(0)
}

/// A client that sends 16 bytes to `dst` and expects the server's answer within
/// 10 s (a connection looping through the proxy would never answer).
fn connect(c: &LocalCluster, pod: &str, dst: &str) -> bool {
    let app = app();
    let app = app.to_string_lossy();
    c.run_app(
        pod,
        std::path::Path::new("timeout"),
        &["10", &app, "client", "--connect", dst, "--bytes", "16"],
    )
    .map(|r| r.0)
    .unwrap_or(false)
}

/// Two nodes: `mesh/server` (a server on 8080) on node-b, `mesh/client` and
/// `plain/outsider` (not in the mesh) on node-a, agents run with `agent_args`.
/// Returns the cluster and the server's IP once both mesh pods are enrolled.
fn mesh(agent_args: &[&str]) -> (LocalCluster, String) {
    require_root();
    let mut c = LocalCluster::with_args(&["node-a", "node-b"], &[], agent_args).unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c.add_pod("mesh", "server", "node-b", &[]).unwrap();
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.add_pod("plain", "outsider", "node-a", &[]).unwrap();
    c.spawn_app(
        "mesh/server",
        &app(),
        &["server", "--listen", &format!("{ip}:8080")],
    )
    .unwrap();
    c.wait_enrolled("node-b", "mesh/server").unwrap();
    c.wait_enrolled("node-a", "mesh/client").unwrap();
    (c, ip)
}

#[test]
fn the_proxys_own_ports_are_refused_as_destinations_from_anywhere() {
    let (c, ip) = mesh(&[]);
    let app_port = format!("{ip}:8080");
    assert!(
        wait_until(Duration::from_secs(10), || connect(
            &c,
            "mesh/client",
            &app_port
        )
        .then_some(()))
        .is_some(),
        "the mesh works: {}",
        c.agent_log("node-b")
    );

    // Plaintext from outside the mesh to the in-pod plaintext listener: refused by
    // the destination's agent.
    let before = counter(&c, "node-b", "plaintext_in_denied");
    let dst = format!("{ip}:15006");
    assert!(
        !connect(&c, "plain/outsider", &dst),
        "outsider -> {dst} must be refused"
    );
    let refused = wait_until(Duration::from_secs(5), || {
        (counter(&c, "node-b", "plaintext_in_denied") > before).then_some(())
    });
    assert!(
        refused.is_some(),
        "node-b should count a denial: {}",
        c.config_dump("node-b").unwrap()["proxy"]
    );
    // From the mesh: refused by the source's agent, before anything is tunnelled.
    // (A forged HBONE CONNECT to these ports is refused by the destination:
    // cluster_mtls's refusals.)
    for port in [15006, 15008] {
        let failed = |c: &LocalCluster| {
            c.enrolled_pod("node-a", "mesh/client").unwrap()["outbound"]["failed"]
                .as_u64()
                .unwrap_or(0)
        };
        let before = failed(&c);
        let dst = format!("{ip}:{port}");
        assert!(
            !connect(&c, "mesh/client", &dst),
            "client -> {dst} must be refused"
        );
        let refused = wait_until(Duration::from_secs(5), || {
            (failed(&c) > before).then_some(())
        });
        assert!(
            refused.is_some(),
            "node-a should refuse client -> {dst}: {}",
            c.enrolled_pod("node-a", "mesh/client").unwrap()
        );
    }
    // Refused once, not proxied back into themselves: nothing stays open.
    for node in ["node-a", "node-b"] {
        let drained = wait_until(Duration::from_secs(5), || {
            (counter(&c, node, "open_connections") == 0).then_some(())
        });
        assert!(
            drained.is_some(),
            "{node} still holds connections: {}",
            c.config_dump(node).unwrap()["proxy"]
        );
    }
    // The mesh still works.
    assert!(connect(&c, "mesh/client", &app_port));
}

#[test]
fn connections_beyond_the_maximum_are_refused_and_the_rest_go_on() {
    let (mut c, ip) = mesh(&["--max-connections", "2"]);
    let dst = format!("{ip}:8080");
    assert!(
        wait_until(Duration::from_secs(10), || connect(&c, "mesh/client", &dst)
            .then_some(()))
        .is_some()
    );
    // Two connections held open fill node-a's proxy...
    for _ in 0..2 {
        c.spawn_app(
            "mesh/client",
            &app(),
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "16",
                "--hold-ms",
                "8000",
            ],
        )
        .unwrap();
    }
    let full = wait_until(Duration::from_secs(5), || {
        (counter(&c, "node-a", "open_connections") == 2).then_some(())
    });
    assert!(
        full.is_some(),
        "{}",
        c.config_dump("node-a").unwrap()["proxy"]
    );
    // ...so a third is refused at once, and counted.
    assert!(!connect(&c, "mesh/client", &dst));
    assert!(counter(&c, "node-a", "refused_over_capacity") >= 1);
    // Once they end, new connections go through again.
    let again = wait_until(Duration::from_secs(20), || {
        connect(&c, "mesh/client", &dst).then_some(())
    });
    assert!(
        again.is_some(),
        "{}",
        c.config_dump("node-a").unwrap()["proxy"]
    );
}
