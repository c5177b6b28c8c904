//! `make demo`: a standalone weft mesh on this machine. Starts the control plane on
//! the bundled example manifests and two node agents, then prints what each node
//! received and the SPIFFE IDs of the certificates it holds; adds a pod live and
//! shows it arrive. Everything it starts is stopped on exit (Ctrl-C included).

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
    if let Err(e) = run(&args) {
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
