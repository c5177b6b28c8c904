//! `make demo`: a weft mesh on this machine.
//!
//! As root: a local cluster (two nodes as network namespaces, pods wired by the real
//! bridge + host-local CNI plugins chained with weft-cni, eBPF capture, a control
//! plane and one weft-node per node). It prints what each node received, the
//! certificates it holds, and which flows the node proxy captured.
//! Without root: the control plane on the bundled manifests and two node agents
//! (config and certificates only).
//! Everything it starts is stopped on exit (Ctrl-C included).

use clap::Parser;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_e2e::standalone::{cert_ids, keys};
use weft_e2e::StandaloneMesh;

static STOP: AtomicBool = AtomicBool::new(false);

#[derive(Parser)]
struct Args {
    /// Manifest directory to start from.
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/standalone"))]
    manifests: PathBuf,
    /// Keep the mesh running (until Ctrl-C) so you can poke at it.
    #[arg(long)]
    keep_running: bool,
    /// Run the config-only demo even as root.
    #[arg(long)]
    standalone: bool,
}

fn main() {
    let args = Args::parse();
    // Ctrl-C / SIGTERM: stop politely so every child process and temp dir is removed.
    std::thread::spawn(|| {
        if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            rt.block_on(async {
                use tokio::signal::unix::{signal, SignalKind};
                let (Ok(mut i), Ok(mut t)) = (
                    signal(SignalKind::interrupt()),
                    signal(SignalKind::terminate()),
                ) else {
                    return;
                };
                tokio::select! { _ = i.recv() => {}, _ = t.recv() => {} }
                STOP.store(true, Ordering::SeqCst);
            });
        }
    });
    let root = nix::unistd::Uid::effective().is_root();
    let res = if root && !args.standalone {
        run_cluster(&args)
    } else {
        if !root {
            println!("(not root: running the config-only demo; run as root to see eBPF capture)");
        }
        run(&args)
    };
    if let Err(e) = res {
        eprintln!("demo failed: {e:#}");
        std::process::exit(1);
    }
}

fn section(title: &str) {
    println!(
        "\n== {title} {}",
        "=".repeat(70usize.saturating_sub(title.len()))
    );
}

fn run(args: &Args) -> anyhow::Result<()> {
    let mut mesh = StandaloneMesh::new(Some(&args.manifests), &[])?;
    section("weft standalone demo");
    println!("manifests:      {}", args.manifests.display());
    println!("working dir:    {}", mesh.dir.path().display());
    mesh.start_control_plane()?;
    println!(
        "control plane:  gRPC {}  admin http://{}",
        mesh.grpc_url(),
        mesh.cp_admin()
    );
    for node in ["node-a", "node-b"] {
        mesh.start_node(node)?;
        println!(
            "{node}:         admin http://{}/config_dump",
            mesh.node_admin(node)
        );
    }
    for node in ["node-a", "node-b"] {
        mesh.wait_node(
            node,
            Duration::from_secs(20),
            "sync and certificates",
            |d| d["synced"] == true && !cert_ids(d).is_empty(),
        )?;
    }
    // Give node-b a moment for its second identity.
    std::thread::sleep(Duration::from_millis(300));

    for node in ["node-a", "node-b"] {
        let d = mesh.config_dump(node)?;
        section(&format!("{node} received"));
        println!("workloads ({}):", keys(&d, "workloads").len());
        if let Some(ws) = d["workloads"].as_object() {
            for (_, w) in ws {
                let ip = w["ips"][0].as_str().unwrap_or("-");
                let enrolled = if w["enrolled"] == true {
                    "in mesh "
                } else {
                    "not in mesh"
                };
                println!(
                    "  {:<22} {:<8} {:<14} {:<11} {}",
                    format!(
                        "{}/{}",
                        w["namespace"].as_str().unwrap_or(""),
                        w["name"].as_str().unwrap_or("")
                    ),
                    w["node"].as_str().unwrap_or(""),
                    ip,
                    enrolled,
                    w["spiffe_id"]
                        .as_str()
                        .filter(|_| w["enrolled"] == true)
                        .unwrap_or("")
                );
            }
        }
        println!("services: {}", keys(&d, "services").join(", "));
        let pols = keys(&d, "policies");
        println!(
            "policies: {}",
            if pols.is_empty() {
                "(none: no local workload is selected by a policy)".to_string()
            } else {
                pols.join(", ")
            }
        );
        println!("certificates held:");
        for c in d["certificates"].as_array().into_iter().flatten() {
            println!(
                "  {:<46} serial {}  expires {}",
                c["spiffe_id"].as_str().unwrap_or(""),
                &c["serial"].as_str().unwrap_or("")
                    [..12.min(c["serial"].as_str().unwrap_or("").len())],
                c["not_after"].as_str().unwrap_or("")
            );
        }
    }

    section("live change: a new pod scheduled on node-b");
    let t0 = Instant::now();
    mesh.write_manifest(
        "demo-cart.yaml",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: cart-1, namespace: shop, labels: {app: cart}}\n\
         spec: {nodeName: node-b, serviceAccountName: cart, containers: [{name: cart}]}\n\
         status: {podIP: 10.244.2.40}\n",
    )?;
    mesh.wait_node("node-b", Duration::from_secs(5), "cart certificate", |d| {
        cert_ids(d).contains(&"spiffe://cluster.local/ns/shop/sa/cart".to_string())
    })?;
    println!(
        "wrote demo-cart.yaml -> node-b holds spiffe://cluster.local/ns/shop/sa/cart after {:?}",
        t0.elapsed()
    );
    let refused = mesh
        .cp_metrics()?
        .lines()
        .filter(|l| l.starts_with("weft_cp_certificates_signed_total"))
        .collect::<Vec<_>>()
        .join(" ");
    println!("control plane metrics: {refused}");

    if args.keep_running {
        section("running: press Ctrl-C to stop");
        println!("try: curl -s http://{}/debug/status", mesh.cp_admin());
        println!(
            "     curl -s http://{}/config_dump",
            mesh.node_admin("node-a")
        );
        println!("     edit files in {}", mesh.config_dir().display());
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    section("cleaning up");
    drop(mesh);
    println!("stopped all processes and removed the working directory");
    Ok(())
}

const LEDGER_POLICY: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-allow-web, namespace: payments}
spec:
  selector: {matchLabels: {app: ledger}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
      to: [{operation: {ports: ["9090"]}}]
"#;

fn run_cluster(args: &Args) -> anyhow::Result<()> {
    use weft_e2e::cluster::LocalCluster;
    let t0 = Instant::now();
    section("weft local cluster demo");
    println!(
        "building 2 nodes (network namespaces), a control plane and one weft-node per node..."
    );
    let mut c = LocalCluster::new(&["node-a", "node-b"])?;
    c.namespace("shop", true)?;
    c.namespace("payments", true)?;
    c.namespace("legacy", false)?;
    c.write_manifest("policy.yaml", LEDGER_POLICY)?;
    let app = weft_e2e::bin_path("weft-testapp")?;
    let ledger_ip = c.add_pod("payments", "ledger", "node-b", &[("app", "ledger")])?;
    c.add_pod("shop", "web", "node-a", &[("app", "web")])?;
    c.add_pod(
        "shop",
        "debug",
        "node-a",
        &[("app", "debug"), ("weft.dev/mesh", "disabled")],
    )?;
    c.add_pod("legacy", "batch", "node-a", &[("app", "batch")])?;
    let ledger = format!("{ledger_ip}:9090");
    c.spawn_app("payments/ledger", &app, &["server", "--listen", &ledger])?;
    for (node, pod) in [("node-a", "shop/web"), ("node-b", "payments/ledger")] {
        weft_e2e::wait_until(Duration::from_secs(20), || c.enrolled_pod(node, pod))
            .ok_or_else(|| anyhow::anyhow!("{pod} was not enrolled on {node}"))?;
    }
    weft_e2e::wait_until(Duration::from_secs(10), || {
        c.run_app(
            "shop/web",
            &app,
            &["client", "--connect", &ledger, "--bytes", "1"],
        )
        .ok()?
        .0
        .then_some(())
    })
    .ok_or_else(|| anyhow::anyhow!("ledger not reachable"))?;
    println!("ready in {:.1} s", t0.elapsed().as_secs_f64());

    for node in ["node-a", "node-b"] {
        let d = c.config_dump(node)?;
        section(node);
        if let Some(ws) = d["workloads"].as_object() {
            for w in ws.values().filter(|w| w["node"] == node) {
                let state = if w["enrolled"] == true {
                    "in mesh"
                } else {
                    "not in mesh"
                };
                println!(
                    "  pod {:<18} {:<14} {:<12} {}",
                    format!(
                        "{}/{}",
                        w["namespace"].as_str().unwrap_or(""),
                        w["name"].as_str().unwrap_or("")
                    ),
                    w["ips"][0].as_str().unwrap_or("-"),
                    state,
                    w["spiffe_id"]
                        .as_str()
                        .filter(|_| w["enrolled"] == true)
                        .unwrap_or("")
                );
            }
        }
        let pols = keys(&d, "policies");
        println!(
            "  policies for local workloads: {}",
            if pols.is_empty() {
                "(none)".into()
            } else {
                pols.join(", ")
            }
        );
        for id in cert_ids(&d) {
            println!("  certificate held: {id}");
        }
    }

    section("flows to payments/ledger (node-b)");
    for (pod, what) in [
        ("shop/web", "enrolled"),
        ("shop/debug", "opted out (weft.dev/mesh=disabled)"),
        ("legacy/batch", "namespace not enrolled"),
    ] {
        let (ok, out, _) = c.run_app(
            pod,
            &app,
            &["client", "--connect", &ledger, "--bytes", "1048576"],
        )?;
        let peer = out
            .lines()
            .find_map(|l| l.strip_prefix("peer="))
            .unwrap_or("?");
        let path = match c.enrolled_pod("node-a", pod) {
            Some(p) if p["outbound"]["tunneled"].as_u64().unwrap_or(0) > 0 => {
                "captured at node-a, sent over mTLS (HBONE) as spiffe://cluster.local/ns/shop/sa/web".to_string()
            }
            Some(_) => "captured at node-a".to_string(),
            None => "plaintext, not captured at the source".to_string(),
        };
        let outcome = if ok {
            format!("ALLOWED: 1 MiB delivered, checksum ok, app sees peer {peer}")
        } else {
            "DENIED at node-b by payments/ledger-allow-web (plaintext has no identity)".to_string()
        };
        println!("  {pod:<13} ({what})\n      {path}\n      {outcome}");
    }
    if let Ok(d) = c.config_dump("node-b") {
        println!(
            "  node-b: {} HBONE connections accepted, {} denied; {} plaintext connections denied",
            d["proxy"]["hbone_in"],
            d["proxy"]["hbone_in_denied"],
            d["proxy"]["plaintext_in_denied"]
        );
    }
    if let Ok((_, m)) = c.node_http("node-b", "/metrics") {
        for l in m
            .lines()
            .filter(|l| l.starts_with("weft_authz_decisions_total"))
        {
            println!("  {l}");
        }
    }
    println!("\nEnrolled traffic is captured by eBPF (connect4 + sockops + getsockopt) into node-a's proxy and");
    println!("crosses to node-b over mTLS (HBONE, HTTP/2 CONNECT on :15008) with both workloads' SPIFFE identities;");
    println!("the ledger's AuthorizationPolicy is enforced at node-b.");
    println!("Where to look next: docs/capture.md, docs/architecture.md, BENCHMARKS.md");
    if args.keep_running {
        section("running: press Ctrl-C to stop");
        println!(
            "node agents listen on 127.0.0.1:15000 inside their node netns ({})",
            c.nodes
                .values()
                .map(|n| n.netns.clone())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "try: nsenter --net=/var/run/netns/{} curl -s 127.0.0.1:15000/config_dump",
            c.nodes["node-a"].netns
        );
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    section("cleaning up");
    drop(c);
    println!(
        "removed every namespace, cgroup, eBPF program and pin the demo created ({:.1} s total)",
        t0.elapsed().as_secs_f64()
    );
    Ok(())
}
