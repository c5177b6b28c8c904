//! Control-plane benchmark (issue: foundation). A real `weft-control-plane` process on
//! a manifest directory of N pods / S services across 100 namespaces, and M simulated
//! nodes in this process, each running the real node subscription code
//! (`weft_node_dataplane::testing::subscribe`) over its own TLS connection on loopback.
//!
//! Reports: time until every node holds its complete initial view; propagation of one
//! pod change (a manifest file rewritten) until *all* nodes hold it (p50/p99 over
//! `--changes` changes); CSR signing throughput on one core (parse + verify + sign);
//! control plane RSS.

#![forbid(unsafe_code)]

use clap::Parser;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_e2e::{bin_path, free_port, http_get, wait_until, Proc};
use weft_node_dataplane::ConfigStore;
use weft_node_dataplane::ControlPlaneTarget;

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 1_000)]
    services: usize,
    #[arg(long, default_value_t = 100)]
    nodes: usize,
    #[arg(long, default_value_t = 100)]
    changes: usize,
    #[arg(long, default_value_t = 5_000)]
    sign: usize,
}

const NAMESPACES: usize = 100;

fn manifests(dir: &std::path::Path, a: &Args) -> anyhow::Result<()> {
    let pods_per_ns = a.pods / NAMESPACES;
    let svcs_per_ns = a.services / NAMESPACES;
    for n in 0..NAMESPACES {
        let mut s = String::new();
        writeln!(s, "apiVersion: v1\nkind: Namespace\nmetadata: {{name: ns-{n}, labels: {{weft.dev/mesh: enabled}}}}")?;
        for p in 0..pods_per_ns {
            let i = n * pods_per_ns + p;
            writeln!(
                s,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: pod-{p}, namespace: ns-{n}, uid: u-{i}, labels: {{app: app-{app}}}}}\n\
                 spec: {{nodeName: node-{node}, serviceAccountName: sa-{app}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: 10.{a}.{b}.{c}}}",
                app = p % svcs_per_ns.max(1),
                node = i % a.nodes,
                a = 10 + i / 65536,
                b = (i / 256) % 256,
                c = i % 256
            )?;
        }
        for v in 0..svcs_per_ns {
            let i = n * svcs_per_ns + v;
            writeln!(
                s,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{v}, namespace: ns-{n}}}\n\
                 spec: {{clusterIP: 10.96.{}.{}, selector: {{app: app-{v}}}, ports: [{{port: 80, targetPort: http}}]}}",
                i / 256,
                i % 256
            )?;
        }
        writeln!(
            s,
            "---\napiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {{name: allow-ns, namespace: ns-{n}}}\n\
             spec: {{rules: [{{from: [{{source: {{namespaces: [ns-{n}]}}}}]}}]}}"
        )?;
        std::fs::write(dir.join(format!("ns-{n}.yaml")), s)?;
    }
    write_probe(dir, 0)?;
    Ok(())
}

fn write_probe(dir: &std::path::Path, rev: usize) -> anyhow::Result<()> {
    let tmp = dir.join(".probe.tmp");
    std::fs::write(
        &tmp,
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: probe, namespace: ns-0, uid: probe, labels: {{app: probe, rev: \"{rev}\"}}}}\n\
             spec: {{nodeName: node-0, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.250.0.1}}\n"
        ),
    )?;
    std::fs::rename(tmp, dir.join("probe.yaml"))?;
    Ok(())
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = tempfile::Builder::new().prefix("weft-bench-").tempdir()?;
    let cfg = tmp.path().join("config");
    let state = tmp.path().join("state");
    std::fs::create_dir_all(&cfg)?;
    manifests(&cfg, &a)?;

    let grpc = free_port();
    let admin = format!("127.0.0.1:{}", free_port());
    let cp_bin = bin_path("weft-control-plane")?;
    let mut creds = Vec::new();
    for n in 0..a.nodes {
        let out = tmp.path().join(format!("cred/node-{n}"));
        let st = std::process::Command::new(&cp_bin)
            .args([
                "node-credential",
                "--node",
                &format!("node-{n}"),
                "--state-dir",
            ])
            .arg(&state)
            .arg("--out")
            .arg(&out)
            .output()?;
        anyhow::ensure!(st.status.success(), "node-credential failed");
        creds.push(out);
    }
    let t_cp = Instant::now();
    let mut cp = Proc::spawn(
        "control-plane",
        std::process::Command::new(&cp_bin)
            .args(["run", "--config-dir"])
            .arg(&cfg)
            .arg("--state-dir")
            .arg(&state)
            .args([
                "--grpc-addr",
                &format!("127.0.0.1:{grpc}"),
                "--admin-addr",
                &admin,
            ])
            .env("RUST_LOG", "warn"),
        &tmp.path().join("cp.log"),
    )?;
    wait_until(Duration::from_secs(60), || {
        http_get(&admin, "/healthz/ready")
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .ok_or_else(|| anyhow::anyhow!("control plane not ready: {}", cp.log_text()))?;
    let load_time = t_cp.elapsed();
    let rss_loaded = rss_kib(cp.pid(), "VmRSS");

    let rt = tokio::runtime::Runtime::new()?;
    let (initial, lat, rss_synced) = rt.block_on(async {
        let metrics = Arc::new(weft_node_dataplane::testing::Metrics::new());
        let mut stores = Vec::new();
        let t0 = Instant::now();
        for (n, cred) in creds.iter().enumerate() {
            let store = ConfigStore::new(format!("node-{n}"));
            let target = ControlPlaneTarget {
                address: format!("https://127.0.0.1:{grpc}"),
                server_name: "weft-control-plane".into(),
                credential_dir: cred.clone(),
                token_file: None,
                credential: Default::default(),
                trust: Default::default(),
            };
            tokio::spawn(weft_node_dataplane::testing::subscribe(
                target,
                store.clone(),
                metrics.clone(),
                None,
            ));
            stores.push(store);
        }
        // Initial sync of all nodes.
        let mut synced_at = vec![None; stores.len()];
        while synced_at.iter().any(Option::is_none) {
            for (i, s) in stores.iter().enumerate() {
                if synced_at[i].is_none() && s.snapshot().synced {
                    synced_at[i] = Some(t0.elapsed());
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            if t0.elapsed() > Duration::from_secs(300) {
                anyhow::bail!("initial sync did not finish");
            }
        }
        let initial = synced_at
            .iter()
            .flatten()
            .max()
            .copied()
            .unwrap_or_default();
        let rss_synced = rss_kib(cp.pid(), "VmRSS");

        // Watchers: report when each node sees a probe revision.
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(usize, usize, Instant)>();
        for (i, s) in stores.iter().enumerate() {
            let s = s.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut w = s.watch();
                let mut last = 0usize;
                loop {
                    let rev = s
                        .snapshot()
                        .workloads
                        .get("Workload/ns-0/probe")
                        .and_then(|w| w.labels.get("rev").and_then(|r| r.parse().ok()))
                        .unwrap_or(0);
                    if rev != last {
                        last = rev;
                        let _ = tx.send((i, rev, Instant::now()));
                    }
                    if w.changed().await.is_err() {
                        return;
                    }
                }
            });
        }
        let mut lat = Vec::new();
        for rev in 1..=a.changes {
            let t = Instant::now();
            write_probe(&cfg, rev)?;
            let mut seen: HashMap<usize, Instant> = HashMap::new();
            while seen.len() < stores.len() {
                match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
                    Ok(Some((i, r, at))) if r == rev => {
                        seen.insert(i, at);
                    }
                    Ok(Some(_)) => {}
                    _ => anyhow::bail!(
                        "change {rev} did not reach all nodes ({} of {})",
                        seen.len(),
                        stores.len()
                    ),
                }
            }
            lat.push(
                seen.values()
                    .max()
                    .map(|m| m.duration_since(t))
                    .unwrap_or_default(),
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        lat.sort();
        Ok::<_, anyhow::Error>((initial, lat, rss_synced))
    })?;
    let rss_end = rss_kib(cp.pid(), "VmRSS");
    let hwm = rss_kib(cp.pid(), "VmHWM");
    cp.kill();

    // Signing throughput on one core: parse + verify CSR, sign, encode.
    let ca = weft_control_plane::identity::Ca::load_or_create(
        &weft_control_plane::identity::CaOptions {
            state_dir: state.clone(),
            trust_domain: weft_proto::spiffe::TrustDomain::new("cluster.local")?,
            svid_ttl: Duration::from_secs(86400),
            user_cert: None,
            user_key: None,
            user_bundle: None,
        },
    )?;
    let id = weft_proto::spiffe::SpiffeId::parse("spiffe://cluster.local/ns/ns-0/sa/sa-0")?;
    let csrs: Vec<Vec<u8>> = (0..200)
        .map(|_| {
            let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
            let mut p = rcgen::CertificateParams::default();
            p.distinguished_name = rcgen::DistinguishedName::new();
            p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
            Ok(p.serialize_request(&key)?.der().to_vec())
        })
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    for i in 0..a.sign {
        ca.sign_svid(&csrs[i % csrs.len()], &id)?;
    }
    let per_sec = a.sign as f64 / t.elapsed().as_secs_f64();

    println!("weft control-plane benchmark");
    println!("  topology: {} pods, {} services, {} namespaces, {} simulated nodes (real gRPC over TLS on loopback)", a.pods, a.services, NAMESPACES, a.nodes);
    println!(
        "  control plane load + ready:           {:>9.1} ms",
        load_time.as_secs_f64() * 1e3
    );
    println!(
        "  initial sync of all nodes:            {:>9.1} ms",
        initial.as_secs_f64() * 1e3
    );
    println!(
        "  one pod change at all nodes (n={}):   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms   (target p99 < 50 ms)",
        lat.len(),
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3
    );
    println!(
        "  CSR signing, one core:                {per_sec:>9.0} certificates/s   (target >= 5000)"
    );
    println!(
        "  control plane RSS: loaded {} MiB, synced {} MiB, end {} MiB, peak {} MiB   (target < 300 MB)",
        rss_loaded / 1024,
        rss_synced / 1024,
        rss_end / 1024,
        hwm / 1024
    );
    Ok(())
}
