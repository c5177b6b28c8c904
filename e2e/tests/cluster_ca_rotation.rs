//! CA rotation under steady traffic (issue 29): `weft-control-plane rotate-ca` stages
//! a new root; the control plane goes trusting -> reissuing -> stable, every node
//! re-issues its SVIDs and its node credential from the new CA, the old root leaves
//! the bundle, and not one connection fails meanwhile: a long-lived one, a new one
//! every 50 ms over a pooled HBONE connection, and one every 2.5 s that needs a new
//! HBONE handshake (the harness closes idle HBONE connections after 2 s). A node
//! agent restarted afterwards reconnects with what it wrote (`ca.crt`, its renewed
//! credential) and the mesh works. Root; runs in CI.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};
use x509_parser::prelude::{FromDer, X509Certificate};

fn app() -> std::path::PathBuf {
    bin_path("weft-testapp").unwrap()
}

fn ders(pem: &str) -> Vec<Vec<u8>> {
    x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|p| p.unwrap().contents)
        .collect()
}

/// Is the first certificate of `chain_pem` signed by the (only) certificate of `ca_pem`?
fn signed_by(chain_pem: &str, ca_pem: &str) -> bool {
    let (leaf, ca) = (&ders(chain_pem)[0], &ders(ca_pem)[0]);
    let (_, leaf) = X509Certificate::from_der(leaf).unwrap();
    let (_, ca) = X509Certificate::from_der(ca).unwrap();
    leaf.verify_signature(Some(ca.public_key())).is_ok()
}

fn ca_status(c: &LocalCluster) -> Value {
    let (_, body) = c.cp_http("/debug/status").unwrap();
    serde_json::from_str::<Value>(&body).unwrap()["ca"].clone()
}

/// The SVID chains a node holds, by SPIFFE ID.
fn svids(c: &LocalCluster, node: &str) -> Vec<(String, String)> {
    let dump = c.config_dump(node).unwrap();
    dump["certificates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| {
            (
                x["spiffe_id"].as_str().unwrap().to_string(),
                x["chain_pem"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// `weftctl status` against the control plane (from its netns): JSON and table.
fn weftctl_status(c: &LocalCluster) -> (Value, String) {
    let run = |extra: &[&str]| {
        let out = std::process::Command::new("nsenter")
            .arg(format!("--net={}", c.fabric_netns()))
            .arg("--")
            .arg(bin_path("weftctl").unwrap())
            .args(["status", "--control-plane", &c.control_plane_admin()])
            .args(extra)
            .output()
            .unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let json = run(&["-o", "json"]);
    (
        serde_json::from_str(&json).unwrap_or_else(|e| panic!("{e}: {json}")),
        run(&[]),
    )
}

fn connect(c: &LocalCluster, pod: &str, dst: &str) -> Result<(), String> {
    match c.run_app(
        pod,
        &app(),
        &["client", "--connect", dst, "--bytes", "4096"],
    ) {
        Ok((true, _, _)) => Ok(()),
        Ok((false, out, err)) => Err(format!("{out}{err}")),
        Err(e) => Err(e.to_string()),
    }
}

#[test]
fn the_ca_rotates_under_traffic_without_a_failed_connection() {
    require_root();
    let mut c = LocalCluster::with_control_plane_args(
        &["node-a", "node-b"],
        &["--ca-rotation-min-phase", "5s"],
    )
    .unwrap();
    c.namespace("mesh", true).unwrap();
    let ip = c
        .add_pod("mesh", "server", "node-b", &[("app", "server")])
        .unwrap();
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.add_pod("mesh", "prober", "node-a", &[]).unwrap();
    let echo = format!("{ip}:7");
    let plain = format!("{ip}:8080");
    c.spawn_app("mesh/server", &app(), &["echo", "--listen", &echo])
        .unwrap();
    c.spawn_app("mesh/server", &app(), &["server", "--listen", &plain])
        .unwrap();
    for (node, pod) in [
        ("node-b", "mesh/server"),
        ("node-a", "mesh/client"),
        ("node-a", "mesh/prober"),
    ] {
        c.wait_enrolled(node, pod).unwrap();
    }
    c.wait_reachable("mesh/client", &plain).unwrap();
    c.wait_reachable("mesh/prober", &plain).unwrap();

    let ca_dir = c.dir.path().join("cp-state/ca");
    let old_root = std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap();
    let st = ca_status(&c);
    assert_eq!(st["phase"], "stable", "{st}");
    assert_eq!(st["roots"], 1, "{st}");
    for node in ["node-a", "node-b"] {
        for (id, chain) in svids(&c, node) {
            assert!(signed_by(&chain, &old_root), "{node} {id}");
        }
    }

    std::thread::scope(|s| {
        let cluster = &c;
        let flow = s.spawn(move || {
            cluster
                .run_app(
                    "mesh/client",
                    &app(),
                    &[
                        "flow",
                        "--connect",
                        &echo,
                        "--seconds",
                        "45",
                        "--interval-ms",
                        "50",
                    ],
                )
                .unwrap()
        });
        std::thread::sleep(Duration::from_secs(2));

        let out = std::process::Command::new(bin_path("weft-control-plane").unwrap())
            .args(["rotate-ca", "--state-dir"])
            .arg(cluster.dir.path().join("cp-state"))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "rotate-ca: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let staged = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(staged.starts_with("staged "), "{staged}");
        let new_root = std::fs::read_to_string(ca_dir.join("next/ca.crt")).unwrap();
        assert_ne!(new_root, old_root);
        // A second rotation cannot start while this one runs.
        let again = std::process::Command::new(bin_path("weft-control-plane").unwrap())
            .args(["rotate-ca", "--state-dir"])
            .arg(cluster.dir.path().join("cp-state"))
            .output()
            .unwrap();
        assert!(!again.status.success());
        assert!(
            String::from_utf8_lossy(&again.stderr).contains("already under way"),
            "{}",
            String::from_utf8_lossy(&again.stderr)
        );

        // Phases, while a connection that needs a new HBONE handshake is made
        // every 2.5 s.
        let mut phases: Vec<String> = Vec::new();
        let mut probes = 0;
        let mut probe_failures = Vec::new();
        let mut last_probe = Instant::now();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let st = ca_status(cluster);
            let phase = st["phase"].as_str().unwrap().to_string();
            if phases.last() != Some(&phase) {
                phases.push(phase.clone());
                // weftctl shows the phase.
                let (v, table) = weftctl_status(cluster);
                // The same phase, or the next one if it moved on meanwhile.
                let shown = v["ca"]["phase"].as_str().unwrap_or_default().to_string();
                let next = match phase.as_str() {
                    "stable" => "trusting",
                    "trusting" => "reissuing",
                    _ => "stable",
                };
                assert!(shown == phase || shown == next, "{phase}: {}", v["ca"]);
                assert!(table.contains("CA PHASE"), "{table}");
                if shown != "stable" {
                    assert_eq!(v["ca"]["roots"], 2, "{}", v["ca"]);
                }
            }
            if phase == "stable" && phases.len() > 1 {
                break;
            }
            assert!(Instant::now() < deadline, "rotation stuck: {st}");
            if last_probe.elapsed() > Duration::from_millis(2500) {
                last_probe = Instant::now();
                probes += 1;
                if let Err(e) = connect(cluster, "mesh/prober", &plain) {
                    probe_failures.push(format!("during {phase}: {e}"));
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        assert_eq!(phases, ["stable", "trusting", "reissuing", "stable"]);
        assert!(probes >= 3, "only {probes} probes");
        assert!(probe_failures.is_empty(), "{probe_failures:?}");

        // After the rotation: one root, the new one, everywhere.
        let st = ca_status(cluster);
        assert_eq!(st["roots"], 1, "{st}");
        assert_eq!(
            std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(),
            new_root
        );
        for node in ["node-a", "node-b"] {
            // The retired bundle reaches the node within moments (an agent whose
            // control-plane connection used an old-CA credential reconnects first).
            let roots = wait_until(Duration::from_secs(10), || {
                let dump = cluster.config_dump(node).ok()?;
                let roots = dump["trust_bundles"].as_object()?.values().next()?["roots_pem"]
                    .as_str()?
                    .to_string();
                (ders(&roots) == ders(&new_root)).then_some(roots)
            });
            assert!(
                roots.is_some(),
                "{node}: the bundle never became the new root alone: {}",
                cluster.config_dump(node).unwrap()["trust_bundles"]
            );
            let svids = svids(cluster, node);
            assert!(!svids.is_empty());
            for (id, chain) in svids {
                assert!(signed_by(&chain, &new_root), "{node} {id}");
            }
            let cred = cluster
                .dir
                .path()
                .join("nodes")
                .join(node)
                .join("credential");
            let node_crt = std::fs::read_to_string(cred.join("node.crt")).unwrap();
            assert!(signed_by(&node_crt, &new_root), "{node}: node credential");
            assert_eq!(
                ders(&std::fs::read_to_string(cred.join("ca.crt")).unwrap()),
                ders(&new_root),
                "{node}: ca.crt"
            );
        }

        let (ok, out, err) = flow.join().unwrap();
        assert!(ok, "flow: {out}{err}");
        let r: Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(r["new_failed"], 0, "{r}");
        assert!(r["new_ok"].as_u64().unwrap() > 300, "{r}");
        assert!(r["long_lived_error"].is_null(), "{r}");
    });
    let m = c.cp_http("/metrics").unwrap().1;
    assert!(
        m.lines().any(|l| l == "weft_cp_ca_rotation_phase 0"),
        "{}",
        m.lines()
            .filter(|l| l.contains("rotation"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // A restarted agent reconnects with the files it wrote, and the mesh works.
    c.kill_agent("node-b");
    c.start_agent("node-b").unwrap();
    c.wait_agent_ready("node-b", Duration::from_secs(30))
        .unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || connect(
            &c,
            "mesh/prober",
            &plain
        )
        .ok())
        .is_some(),
        "after restarting node-b's agent:\n{}",
        c.agent_log("node-b")
    );
}
