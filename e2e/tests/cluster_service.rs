//! Services through the node proxy: VIP resolution and load balancing, and many
//! concurrent long-lived connections. Root; runs in CI.

#![forbid(unsafe_code)]

use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

const SERVICE: &str = r#"apiVersion: v1
kind: Service
metadata: {name: lb, namespace: mesh}
spec:
  clusterIP: 10.96.0.50
  selector: {app: lb}
  ports: [{name: tcp, port: 80, targetPort: 8080}]
"#;

#[test]
fn load_balancing_across_three_endpoints_is_even() {
    require_root();
    let app = bin_path("weft-testapp").unwrap();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("mesh", true).unwrap();
    let mut files = Vec::new();
    for (i, node) in ["node-b", "node-b", "node-a"].iter().enumerate() {
        let name = format!("lb-{i}");
        let ip = c.add_pod("mesh", &name, node, &[("app", "lb")]).unwrap();
        let f = c.dir.path().join(format!("{name}.count"));
        c.spawn_app(
            &format!("mesh/{name}"),
            &app,
            &[
                "server",
                "--listen",
                &format!("{ip}:8080"),
                "--count-file",
                f.to_str().unwrap(),
            ],
        )
        .unwrap();
        files.push(f);
    }
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.write_manifest("service.yaml", SERVICE).unwrap();
    for i in 0..3 {
        let node = if i == 2 { "node-a" } else { "node-b" };
        assert!(wait_until(Duration::from_secs(20), || c
            .enrolled_pod(node, &format!("mesh/lb-{i}")))
        .is_some());
    }
    assert!(wait_until(Duration::from_secs(20), || c
        .enrolled_pod("node-a", "mesh/client"))
    .is_some());
    // The Service (and its endpoints) reached node-a, and the client gets through.
    assert!(
        wait_until(Duration::from_secs(10), || {
            c.run_app(
                "mesh/client",
                &app,
                &["client", "--connect", "10.96.0.50:80", "--bytes", "1"],
            )
            .ok()?
            .0
            .then_some(())
        })
        .is_some(),
        "service VIP not reachable\n{}",
        c.agent_log("node-a")
    );
    let before: Vec<usize> = files
        .iter()
        .map(|f| {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.parse().ok())
                .unwrap_or(0)
        })
        .collect();
    let (ok, _, err) = c
        .run_app(
            "mesh/client",
            &app,
            &[
                "client",
                "--connect",
                "10.96.0.50:80",
                "--bytes",
                "64",
                "--parallel",
                "10",
                "--repeat",
                "300",
            ],
        )
        .unwrap();
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    let counts: Vec<usize> = files
        .iter()
        .zip(before)
        .map(|(f, b)| {
            std::fs::read_to_string(f)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(0)
                - b
        })
        .collect();
    eprintln!("connections per endpoint: {counts:?}");
    assert_eq!(counts.iter().sum::<usize>(), 3000, "{counts:?}");
    for n in &counts {
        assert!(
            (800..=1200).contains(n),
            "uneven: {counts:?} (each must be within 20% of 1000)"
        );
    }
}

#[test]
fn two_hundred_concurrent_long_lived_connections_for_thirty_seconds() {
    require_root();
    let app = bin_path("weft-testapp").unwrap();
    // The agents also give back their code pages every second (default: every
    // minute), so the 30 s below run while the proxy's code is unmapped and mapped
    // again about 30 times.
    let mut c =
        LocalCluster::with_args(&["node-a", "node-b"], &[], &["--release-code-pages", "1s"])
            .unwrap();
    let dst = c.mesh_pair().unwrap();
    for node in ["node-a", "node-b"] {
        let line = wait_until(Duration::from_secs(20), || {
            c.agent_log(node)
                .lines()
                .find(|l| l.contains("gave back startup code pages"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("{node}: no code pages given back: {}", c.agent_log(node)));
        // `name=1.5` in text logs, `"name":"1.5"` in JSON ones.
        let field = |name: &str| -> f64 {
            let rest = line
                .split_once(&format!("{name}="))
                .or_else(|| line.split_once(&format!("\"{name}\":\"")))
                .unwrap_or_else(|| panic!("no {name} in {line}"))
                .1;
            let v: String = rest
                .chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect();
            v.parse().unwrap_or_else(|_| panic!("{name} in {line}"))
        };
        eprintln!("{node}: {line}");
        assert!(
            field("released_mib") > 0.0 && field("rss_after_mib") < field("rss_before_mib"),
            "{node}: {line}"
        );
    }
    let fds = |node: &str| -> usize {
        let pid = c.nodes[node].agent.as_ref().map(|p| p.pid()).unwrap_or(0);
        // The agent runs under `sh -c ... exec nsenter ... exec weft-node`: same pid.
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    std::thread::sleep(Duration::from_millis(500));
    let (fa, fb) = (fds("node-a"), fds("node-b"));
    assert!(fa > 0 && fb > 0, "could not read the agents' fds");
    let (ok, out, err) = c
        .run_app(
            "mesh/client",
            &app,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "262144",
                "--parallel",
                "200",
                "--hold-ms",
                "30000",
            ],
        )
        .unwrap();
    assert!(ok, "errors under 200 long-lived connections: {err}");
    assert_eq!(
        out.lines().filter(|l| l.starts_with("peer=")).count(),
        200,
        "checksums verified for all 200"
    );
    // Idle pooled HBONE connections are released after the idle timeout (2 s here).
    std::thread::sleep(Duration::from_secs(4));
    let (fa2, fb2) = (fds("node-a"), fds("node-b"));
    eprintln!("agent fds before/after: node-a {fa}/{fa2}, node-b {fb}/{fb2}");
    assert!(
        fa2 <= fa + 4 && fb2 <= fb + 4,
        "file descriptors grew: node-a {fa} -> {fa2}, node-b {fb} -> {fb2}"
    );
    let d = c.config_dump("node-b").unwrap();
    assert_eq!(
        d["proxy"]["open_inbound"], 0,
        "connections left open: {}",
        d["proxy"]
    );
}
