//! Capture benchmark (issue: eBPF capture). One pod and one server in their own
//! network namespaces joined by a veth; in the same run, three ways for the pod's
//! connections to reach the server:
//!
//! - `plain`: direct;
//! - `ebpf`: weft's capture (connect4 rewrite + SO_ORIGINAL_DST from the sockops /
//!   getsockopt maps) into the in-pod forwarder;
//! - `iptables`: an iptables `REDIRECT` in the pod's netns into the same forwarder
//!   (SO_ORIGINAL_DST from conntrack).
//!
//! The forwarder is the same code in both proxied modes, so the difference between
//! `ebpf` and `iptables` is the capture mechanism. Reports 1 KiB request/response
//! p50/p99 and connect + first byte p50/p99 per mode (rounds interleaved).

#![forbid(unsafe_code)]

use clap::Parser;
use std::sync::Arc;
use weft_e2e::netlab::{require_root, Lab, PrivateBpffs};
use weft_node_dataplane::testing::PodNetns;
use weft_node_dataplane::testing::{cgroup, Capture, CaptureOptions};
use weft_node_dataplane::testing::{serve_outbound_plain, OutboundStats};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 20000)]
    rr_count: usize,
    #[arg(long, default_value_t = 2000)]
    cfb_count: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

const MARK: u32 = 0x5746;
/// One server port per mode, so no mode reuses another's 4-tuples (stale
/// conntrack NAT entries from the iptables mode would skew the others).
const PORTS: [u16; 3] = [9000, 9001, 9002];

fn dst(i: usize) -> String {
    format!("10.203.0.2:{}", PORTS[i])
}

fn measure(pod: &str, app: &std::path::Path, args: &[&str]) -> anyhow::Result<(f64, f64)> {
    let (ok, out, err) = Lab::run_in(pod, app, args)?;
    anyhow::ensure!(ok, "{err}");
    let mut it = out.split_whitespace().map(|v| v.parse::<f64>());
    Ok((it.next().unwrap_or(Ok(0.0))?, it.next().unwrap_or(Ok(0.0))?))
}

fn iptables(pod: &str, op: &str) -> anyhow::Result<()> {
    let rule = [
        "-t",
        "nat",
        op,
        "OUTPUT",
        "-p",
        "tcp",
        "-d",
        "10.203.0.2",
        "--dport",
        "9002",
        "-m",
        "mark",
        "!",
        "--mark",
        &format!("{MARK:#x}"),
        "-j",
        "REDIRECT",
        "--to-ports",
        "15002",
    ];
    let out = std::process::Command::new("nsenter")
        .arg(format!("--net={}", Lab::netns_path(pod)))
        .arg("--")
        .arg("iptables")
        .args(rule)
        .output()?;
    anyhow::ensure!(
        out.status.success(),
        "iptables: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    require_root();
    let app = weft_e2e::bin_path("weft-testapp")?;
    let mut lab = Lab::new("b");
    let pod = lab.netns("pod")?;
    let srv = lab.netns("srv")?;
    lab.link(&pod, "10.203.0.1/24", &srv, "10.203.0.2/24")?;
    for i in 0..PORTS.len() {
        lab.spawn_in(&srv, &app, &["echo", "--listen", &dst(i)])?;
    }
    std::thread::sleep(std::time::Duration::from_millis(300));

    let bpffs = PrivateBpffs::new()?;
    let pin_dir = bpffs
        .path()
        .join(format!("weft-bench-{}", std::process::id()));
    let mut capture = Capture::install(CaptureOptions {
        cgroup: cgroup::cgroup2_root()?,
        pin_dir: pin_dir.clone(),
        proxy_mark: MARK,
        outbound_port: 15001,
    })?;
    let result = (|| -> anyhow::Result<()> {
        let podns = Arc::new(PodNetns::open(Lab::netns_path(&pod))?);
        let cookie = podns.cookie()?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()?;
        for port in [15001u16, 15002] {
            let l = podns.listen(([127, 0, 0, 1], port).into())?;
            let podns = podns.clone();
            rt.spawn(async move {
                if let Ok(l) = tokio::net::TcpListener::from_std(l) {
                    serve_outbound_plain(l, podns, MARK, Arc::new(OutboundStats::default())).await
                }
            });
        }
        let modes = ["plain", "ebpf", "iptables"];
        let mut rr: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 3];
        let mut cf: Vec<Vec<(f64, f64)>> = vec![Vec::new(); 3];
        for round in 0..a.rounds {
            // Rotate the order each round so no mode always runs first or last.
            for k in 0..modes.len() {
                let i = (k + round) % modes.len();
                let mode = &modes[i];
                match *mode {
                    "ebpf" => capture.enroll(cookie, None)?,
                    "iptables" => iptables(&pod, "-A")?,
                    _ => {}
                }
                let d = dst(i);
                let r = measure(
                    &pod,
                    &app,
                    &[
                        "rr",
                        "--connect",
                        &d,
                        "--size",
                        "1024",
                        "--count",
                        &a.rr_count.to_string(),
                    ],
                );
                let c = measure(
                    &pod,
                    &app,
                    &["cfb", "--connect", &d, "--count", &a.cfb_count.to_string()],
                );
                match *mode {
                    "ebpf" => capture.unenroll(cookie)?,
                    "iptables" => iptables(&pod, "-D")?,
                    _ => {}
                }
                rr[i].push(r?);
                cf[i].push(c?);
            }
        }
        let med = |v: &[(f64, f64)], f: fn(&(f64, f64)) -> f64| {
            let mut x: Vec<f64> = v.iter().map(f).collect();
            x.sort_by(|a, b| a.total_cmp(b));
            x[x.len() / 2]
        };
        println!(
            "weft capture benchmark ({} rounds, medians of per-round percentiles)",
            a.rounds
        );
        println!(
            "{:<10} {:>14} {:>14} {:>18} {:>18}",
            "mode", "1KiB RR p50", "1KiB RR p99", "connect+1B p50", "connect+1B p99"
        );
        for (i, m) in modes.iter().enumerate() {
            println!(
                "{:<10} {:>11.1} us {:>11.1} us {:>15.1} us {:>15.1} us",
                m,
                med(&rr[i], |x| x.0),
                med(&rr[i], |x| x.1),
                med(&cf[i], |x| x.0),
                med(&cf[i], |x| x.1)
            );
        }
        let added = |i: usize| med(&rr[i], |x| x.0) - med(&rr[0], |x| x.0);
        let added_c = |i: usize| med(&cf[i], |x| x.0) - med(&cf[0], |x| x.0);
        println!(
            "added over plain, p50: RR ebpf {:+.1} us vs iptables {:+.1} us; connect+1B ebpf {:+.1} us vs iptables {:+.1} us",
            added(1),
            added(2),
            added_c(1),
            added_c(2)
        );
        drop(rt);
        Ok(())
    })();
    drop(capture);
    Capture::uninstall(&pin_dir)?;
    drop(lab);
    result
}
