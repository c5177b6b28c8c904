//! `make demo`: a weft mesh on this machine.
//!
//! As root: a local cluster (two nodes as network namespaces, pods wired by the real
//! bridge + host-local CNI plugins chained with weft-cni, eBPF capture, a control
//! plane and one weft-node per node). It prints what each node received, the
//! certificates it holds, and which flows the node proxy captured.
//! Without root: the control plane on the bundled manifests and two node agents
//! (config and certificates only).
//! Everything it starts is stopped on exit (Ctrl-C included).

#![forbid(unsafe_code)]

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

fn stopped() -> anyhow::Result<()> {
    if STOP.load(Ordering::SeqCst) {
        anyhow::bail!("interrupted");
    }
    Ok(())
}

fn short(id: &str) -> &str {
    id.strip_prefix("spiffe://cluster.local/").unwrap_or(id)
}

/// One access-log record, readably.
fn describe(node: &str, r: &serde_json::Value) -> String {
    let s = |k: &str| r[k].as_str().unwrap_or("-").to_string();
    let mtls = if r["mtls"] == true {
        "mTLS"
    } else {
        "plaintext"
    };
    if r["kind"] == "request" {
        let by = match r["decided_by"].as_str() {
            Some(d) if d.starts_with("wasm:") => format!(", answered by plugin {}", &d[5..]),
            Some("none") => ", denied: no ALLOW policy matched".into(),
            Some(p) => format!(", denied by policy {p}"),
            None => String::new(),
        };
        return format!(
            "{node} proxy  {} {} from {} over {mtls} -> {}{by}",
            s("method"),
            s("path"),
            short(&s("source_identity")),
            r["response_code"]
        );
    }
    let decision = match (r["decision"].as_str(), r["policy"].as_str()) {
        (Some("allow"), Some(p)) => format!("allowed by {p}"),
        (Some("allow"), None) => "allowed (no policy selects it)".into(),
        (Some("deny"), Some(p)) => format!("DENIED by {p}"),
        (Some("deny"), None) => "DENIED: no ALLOW policy matched".into(),
        _ => "sent on; the destination's proxy authorizes".into(),
    };
    let bytes = match (r["sent_bytes"].as_u64(), r["received_bytes"].as_u64()) {
        (Some(a), Some(b)) => format!(", {a} B sent, {b} B received"),
        _ => String::new(),
    };
    let service = r["service"]
        .as_str()
        .map(|s| format!(" (Service {s})"))
        .unwrap_or_default();
    format!(
        "{node} proxy  {} -> {}{service} over {}: {decision}{bytes}",
        short(&s("source_identity")),
        short(&s("destination_identity")),
        if r["mtls"] == true {
            "mTLS (HBONE :15008)"
        } else {
            "plaintext"
        },
    )
}

fn run_cluster(args: &Args) -> anyhow::Result<()> {
    use weft_e2e::showcase::{Expect, Showcase};
    let t0 = Instant::now();
    section("weft local cluster demo");
    println!("building 2 nodes (network namespaces), pods wired by the real bridge CNI plugin + weft-cni,");
    println!("a control plane and one weft-node (eBPF capture + mTLS proxy) per node...");
    let mut s = Showcase::start()?;
    stopped()?;
    println!("ready in {:.1} s", t0.elapsed().as_secs_f64());

    section("the mesh");
    for node in ["node-a", "node-b"] {
        let d = s.cluster.config_dump(node)?;
        println!("{node}:");
        if let Some(ws) = d["workloads"].as_object() {
            for w in ws.values().filter(|w| w["node"] == node) {
                println!(
                    "  pod {:<16} {:<12} {}",
                    format!(
                        "{}/{}",
                        w["namespace"].as_str().unwrap_or(""),
                        w["name"].as_str().unwrap_or("")
                    ),
                    w["ips"][0].as_str().unwrap_or("-"),
                    if w["enrolled"] == true {
                        format!("in the mesh as {}", w["spiffe_id"].as_str().unwrap_or(""))
                    } else {
                        "not in the mesh (namespace not labelled weft.dev/mesh=enabled)".into()
                    }
                );
            }
        }
    }
    println!("policies (payments):");
    println!("  ledger-allow-web      ALLOW shop/sa/web to the ledger on 9090          (L4)");
    println!("  api-allow-shop-reads  ALLOW GET from namespace shop to the api         (L7)");
    println!("  api-deny-admin        DENY /admin and /admin/* on the api              (L7)");
    println!("Wasm plugin payments/private-gate (examples/plugins/c/peer_gate.c) on the api:");
    println!("  /private/* only for spiffe://cluster.local/ns/shop/sa/ops; adds x-weft-plugin");

    section("flows");
    let mut all_ok = true;
    for (i, flow) in s.flows().iter().enumerate() {
        stopped()?;
        let o = s.run(flow)?;
        let result = match (&flow.expect, &o.reply) {
            (Expect::Status(_), Some(r)) => {
                let body = r.body.lines().next().unwrap_or("").trim();
                let header = r
                    .header("x-weft-plugin")
                    .map(|v| format!(" [x-weft-plugin: {v}]"))
                    .unwrap_or_default();
                format!("HTTP {} {body:?}{header}", r.status)
            }
            _ if o.delivered => "ALLOWED: 1 MiB delivered, checksum ok".into(),
            _ => "DENIED: connection reset".into(),
        };
        all_ok &= o.as_expected();
        println!(
            "[{}] {}\n    => {result}{}",
            i + 1,
            flow.title,
            if o.as_expected() {
                ""
            } else {
                "   (NOT what the demo expects!)"
            }
        );
        // Source side first, then the destination's connection and request records.
        let mut records = o.records.clone();
        records.sort_by_key(|(_, r)| (r["reporter"] != "source", r["kind"] == "request"));
        for (node, r) in &records {
            println!("    {}", describe(node, r));
        }
    }

    section("where to look next");
    let fab = s.cluster.fabric_netns();
    let cp = s.cluster.control_plane_admin();
    let weftctl = weft_e2e::bin_path("weftctl")?;
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={fab}"))
        .arg("--")
        .arg(&weftctl)
        .args(["status", "--control-plane", &cp])
        .output()?;
    println!(
        "$ weftctl status --control-plane {cp}\n{}",
        String::from_utf8_lossy(&out.stdout).trim_end()
    );
    println!();
    println!("The demo's networks live in network namespaces; reach them with nsenter:");
    println!(
        "  nsenter --net={fab} {} status --control-plane {cp}",
        weftctl.display()
    );
    for node in ["node-a", "node-b"] {
        if let Some(ip) = s.cluster.node_ip(node) {
            println!(
                "  nsenter --net={fab} curl -s http://{ip}:15020/metrics     # {node}'s metrics"
            );
        }
    }
    println!("  nsenter --net={fab} curl -s http://{cp}/metrics     # control plane");
    let prom = match weft_e2e::prometheus::Prometheus::start(&s.cluster) {
        Ok(p) => {
            let q = "sum by (response_code) (weft_requests_total)";
            let found = weft_e2e::wait_until(Duration::from_secs(15), || {
                p.query(&s.cluster, q)
                    .ok()
                    .filter(|d| d["result"].as_array().is_some_and(|r| !r.is_empty()))
            });
            if let Some(d) = found {
                println!("Prometheus ({}): {q}", weft_e2e::prometheus::LISTEN);
                for r in d["result"].as_array().into_iter().flatten() {
                    println!(
                        "  response_code={} -> {}",
                        r["metric"]["response_code"].as_str().unwrap_or("?"),
                        r["value"][1].as_str().unwrap_or("?")
                    );
                }
            }
            println!(
                "  nsenter --net={fab} curl -s 'http://{}/api/v1/query?query=weft_tcp_connections_opened_total'",
                weft_e2e::prometheus::LISTEN
            );
            Some(p)
        }
        Err(e) => {
            println!("(Prometheus not started: {e:#})");
            None
        }
    };
    println!(
        "Access logs: JSON lines with target weft::access in the agents' logs, {}/*/agent-1.log",
        s.cluster.dir.path().join("nodes").display()
    );
    if !args.keep_running {
        println!(
            "(all of this is removed on exit; keep it up with: make demo DEMO_ARGS=--keep-running)"
        );
    }
    println!("Docs: README.md, docs/operations.md (weftctl, troubleshooting), docs/metrics.md, charts/weft/dashboards");
    if args.keep_running {
        section("running: press Ctrl-C to stop");
        while !STOP.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    section("cleaning up");
    drop(prom);
    drop(s);
    println!(
        "removed every namespace, cgroup, eBPF program, pin and process the demo created ({:.1} s total)",
        t0.elapsed().as_secs_f64()
    );
    if !all_ok {
        anyhow::bail!("some flows did not behave as the demo expects (see above)");
    }
    Ok(())
}
