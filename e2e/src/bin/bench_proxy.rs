//! Node proxy benchmark (issue: node mTLS proxy). On the local cluster harness, in
//! one run: plain TCP between two non-enrolled pods on two nodes vs weft between two
//! enrolled pods on the same two nodes (client -> eBPF capture -> node-a proxy ->
//! HBONE mTLS -> node-b proxy -> server). Reports iperf3 throughput with 1 and 8
//! streams, 1 KiB request/response p50/p99 (unpinned, and with every process pinned
//! to one core: client, both agents, server), connect + first byte p50, and the node
//! agents' CPU and RSS. A third mode runs the same path through two minimal relays
//! (blocking copy threads, no TLS): the floor of any design with a user-space hop on
//! each node.

#![forbid(unsafe_code)]

use clap::Parser;
use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::perf::median;
use weft_e2e::{bin_path, wait_until};

#[derive(Parser)]
struct Args {
    /// Record a CPU profile of core 0 (perf, 999 Hz, 2 s) during the pinned weft RR
    /// run and write the hottest symbols per process to this file.
    #[arg(long)]
    profile: Option<std::path::PathBuf>,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    #[arg(long, default_value_t = 20000)]
    rr_count: usize,
    #[arg(long, default_value_t = 2000)]
    cfb_count: usize,
    /// Rounds; the modes are interleaved within each round and every figure is the
    /// median over the rounds (the host's noise moves between runs).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One mode's measurements in one round.
#[derive(Clone)]
struct Row {
    one: f64,
    eight: f64,
    rr: (f64, f64),
    rr_pinned: (f64, f64),
    cfb: (f64, f64),
    cores: f64,
    load_rss: Vec<u64>,
    /// CPU time of the mode's proxies (weft: both agents; relays: the relays) per
    /// pinned round trip.
    proxy_cpu_us: f64,
}

/// Median of each figure over the rounds (RSS: the largest).
fn median_row(rows: &[Row]) -> Row {
    let m = |f: fn(&Row) -> f64| median(rows.iter().map(f).collect());
    Row {
        one: m(|r| r.one),
        eight: m(|r| r.eight),
        rr: (m(|r| r.rr.0), m(|r| r.rr.1)),
        rr_pinned: (m(|r| r.rr_pinned.0), m(|r| r.rr_pinned.1)),
        cfb: (m(|r| r.cfb.0), m(|r| r.cfb.1)),
        cores: m(|r| r.cores),
        proxy_cpu_us: m(|r| r.proxy_cpu_us),
        load_rss: rows
            .iter()
            .flat_map(|r| r.load_rss.iter().copied())
            .max()
            .into_iter()
            .collect(),
    }
}

fn iperf(c: &LocalCluster, pod: &str, to: &str, streams: u32, secs: u32) -> anyhow::Result<f64> {
    let (ip, port) = to.rsplit_once(':').unwrap_or((to, "5201"));
    let (ok, out, err) = c.run_app(
        pod,
        std::path::Path::new("/usr/bin/iperf3"),
        &[
            "-c",
            ip,
            "-p",
            port,
            "-t",
            &secs.to_string(),
            "-P",
            &streams.to_string(),
            "-J",
        ],
    )?;
    anyhow::ensure!(ok, "iperf3: {err}{out}");
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .unwrap_or(0.0)
        / 1e9)
}

fn two(
    c: &LocalCluster,
    pod: &str,
    args: &[&str],
    cpu: Option<usize>,
) -> anyhow::Result<(f64, f64)> {
    let (ok, out, err) = c.run_app_pinned(pod, &bin_path("weft-testapp")?, args, cpu)?;
    anyhow::ensure!(ok, "{err}");
    let mut it = out
        .split_whitespace()
        .map(|x| x.parse::<f64>().unwrap_or(0.0));
    Ok((it.next().unwrap_or(0.0), it.next().unwrap_or(0.0)))
}

/// (cpu seconds, rss KiB) of a process.
fn usage(pid: u32) -> (f64, u64) {
    let cpu = weft_e2e::process::cpu_ns(&[pid]) as f64 / 1e9;
    let rss = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0);
    (cpu, rss)
}

/// Voluntary and involuntary context switches per thread name, summed over the
/// threads of the given processes.
fn switches(pids: &[u32]) -> std::collections::BTreeMap<String, (u64, u64)> {
    let mut m = std::collections::BTreeMap::new();
    for pid in pids {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
            let field = |k: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(k))
                    .map(str::trim)
                    .unwrap_or("")
                    .to_string()
            };
            let e: &mut (u64, u64) = m.entry(field("Name:")).or_default();
            e.0 += field("voluntary_ctxt_switches:")
                .parse::<u64>()
                .unwrap_or(0);
            e.1 += field("nonvoluntary_ctxt_switches:")
                .parse::<u64>()
                .unwrap_or(0);
        }
    }
    m
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    require_root();
    let app = bin_path("weft-testapp")?;
    let mut c = LocalCluster::new(&["node-a", "node-b"])?;
    c.namespace("mesh", true)?;
    c.namespace("plain", false)?;
    let mesh_ip = c.add_pod("mesh", "server", "node-b", &[("app", "server")])?;
    let plain_ip = c.add_pod("plain", "server", "node-b", &[("app", "server")])?;
    c.add_pod("mesh", "client", "node-a", &[("app", "client")])?;
    c.add_pod("plain", "client", "node-a", &[("app", "client")])?;
    let mut servers = Vec::new();
    for (pod, ip) in [("mesh/server", &mesh_ip), ("plain/server", &plain_ip)] {
        c.spawn_app(
            pod,
            std::path::Path::new("/usr/bin/iperf3"),
            &["-s", "-p", "5201"],
        )?;
        servers.push(c.spawn_app(pod, &app, &["echo", "--listen", &format!("{ip}:7000")])?);
    }
    wait_until(Duration::from_secs(20), || {
        c.enrolled_pod("node-b", "mesh/server")
    })
    .ok_or_else(|| anyhow::anyhow!("server not enrolled"))?;
    wait_until(Duration::from_secs(20), || {
        c.enrolled_pod("node-a", "mesh/client")
    })
    .ok_or_else(|| anyhow::anyhow!("client not enrolled"))?;
    for (pod, ip) in [("mesh/client", &mesh_ip), ("plain/client", &plain_ip)] {
        let dst = format!("{ip}:7000");
        wait_until(Duration::from_secs(10), || {
            two(&c, pod, &["rr", "--connect", &dst, "--count", "10"], None).ok()
        })
        .ok_or_else(|| anyhow::anyhow!("{pod} cannot reach {dst}"))?;
    }
    let mut relays = Vec::new();
    // The floor of any design with a user-space hop on each node: two minimal
    // relays (blocking read/write threads, no TLS, no framing) on the same path as
    // weft's (client pod loopback -> node-to-node -> server pod loopback).
    for (listen, next) in [
        ("127.0.0.1:15001".to_string(), format!("{plain_ip}:15008")),
        ("127.0.0.1:15201".to_string(), format!("{plain_ip}:15202")),
    ] {
        relays.push(c.spawn_app(
            "plain/client",
            &app,
            &["relay", "--listen", &listen, "--connect", &next],
        )?);
    }
    for (listen, next) in [
        (format!("{plain_ip}:15008"), format!("{plain_ip}:7000")),
        (format!("{plain_ip}:15202"), format!("{plain_ip}:5201")),
    ] {
        relays.push(c.spawn_app(
            "plain/server",
            &app,
            &["relay", "--listen", &listen, "--connect", &next],
        )?);
    }
    wait_until(Duration::from_secs(10), || {
        two(
            &c,
            "plain/client",
            &["rr", "--connect", "127.0.0.1:15001", "--count", "10"],
            None,
        )
        .ok()
    })
    .ok_or_else(|| anyhow::anyhow!("the relays do not reach the plain server"))?;
    let agents = c.agent_pids();
    std::thread::sleep(Duration::from_secs(1));
    let fresh_rss: Vec<u64> = agents.iter().map(|p| usage(*p).1).collect();
    // The agents give back their startup code pages a few seconds after they are
    // ready (`--release-code-pages`); idle RSS is read once that has happened.
    std::thread::sleep(Duration::from_secs(9));
    let idle_rss: Vec<u64> = agents.iter().map(|p| usage(*p).1).collect();

    // (name, client pod, iperf3 server, echo server)
    let modes = [
        (
            "plain",
            "plain/client",
            format!("{plain_ip}:5201"),
            format!("{plain_ip}:7000"),
        ),
        (
            "relays",
            "plain/client",
            "127.0.0.1:15201".into(),
            "127.0.0.1:15001".into(),
        ),
        (
            "weft",
            "mesh/client",
            format!("{mesh_ip}:5201"),
            format!("{mesh_ip}:7000"),
        ),
    ];
    let mut per_mode: Vec<Vec<Row>> = vec![Vec::new(); modes.len()];
    for round in 0..a.rounds.max(1) {
        for (mi, (name, pod, ip, dst)) in modes.iter().enumerate() {
            let before: Vec<(f64, u64)> = agents.iter().map(|p| usage(*p)).collect();
            let t0 = Instant::now();
            // With --profile: both CPUs during weft's 1-stream iperf3 run.
            let iperf_perf = match (&a.profile, *name == "weft" && round == 0) {
                (Some(p), true) => {
                    let data = p.with_extension("iperf.perf.data");
                    Some((
                        weft_e2e::perf::record(&data, None, a.seconds.saturating_sub(1).max(1))?,
                        data,
                    ))
                }
                _ => None,
            };
            let one = iperf(&c, pod, ip, 1, a.seconds)?;
            if let (Some((rec, data)), Some(p)) = (iperf_perf, &a.profile) {
                let mut text = Vec::new();
                weft_e2e::perf::report(rec, &data, &mut text)?;
                std::fs::write(p.with_extension("iperf.txt"), text)?;
            }
            let eight = iperf(&c, pod, ip, 8, a.seconds)?;
            let wall = t0.elapsed().as_secs_f64();
            let after: Vec<(f64, u64)> = agents.iter().map(|p| usage(*p)).collect();
            let cores: f64 = before
                .iter()
                .zip(&after)
                .map(|(b, a)| a.0 - b.0)
                .sum::<f64>()
                / wall;
            let load_rss: Vec<u64> = after.iter().map(|x| x.1).collect();
            let rr_count = a.rr_count.to_string();
            let round_trips = |cpu| {
                let args = [
                    "rr",
                    "--connect",
                    dst,
                    "--size",
                    "1024",
                    "--count",
                    &rr_count,
                ];
                two(&c, pod, &args, cpu)
            };
            let rr = round_trips(None)?;
            // Every process of the round trip on one core: client, both agents, server.
            weft_e2e::process::pin_cpu(&agents, Some(0));
            weft_e2e::process::pin_cpu(&servers, Some(0));
            weft_e2e::process::pin_cpu(&relays, Some(0));
            // Kept next to the report for `perf report -i` by hand.
            let perf_data = a
                .profile
                .as_ref()
                .map(|p| p.with_extension("perf.data"))
                .unwrap_or_default();
            // Optional CPU profile of core 0 (where the pinned round trip runs).
            let perf = match (&a.profile, *name == "weft" && round == 0) {
                (Some(_), true) => Some(weft_e2e::perf::record(&perf_data, Some("0"), 2)?),
                _ => None,
            };
            // With --profile: syscalls and context switches of the agents per round trip.
            let stat_out = c.dir.path().join("agents.perf.stat");
            let stat = match (&a.profile, *name == "weft" && round == 0) {
                (Some(_), true) => Some(weft_e2e::perf::stat(&agents, &stat_out)?),
                _ => None,
            };
            let switches_before = switches(&agents);
            let proxies: &[u32] = match *name {
                "weft" => &agents,
                "relays" => &relays,
                _ => &[],
            };
            let proxy_cpu = weft_e2e::process::cpu_ns(proxies);
            let rr_pinned = round_trips(Some(0))?;
            let proxy_cpu_us = weft_e2e::process::cpu_ns(proxies).saturating_sub(proxy_cpu) as f64
                / 1000.0
                / a.rr_count as f64;
            if let (Some(rec), Some(out)) = (perf, &a.profile) {
                let mut per_rr = String::new();
                if let Some(st) = stat {
                    let (sys, cs) = weft_e2e::perf::stat_done(st, &stat_out);
                    let n = a.rr_count as f64;
                    per_rr.push_str(&format!(
                        "both agents, per pinned 1 KiB round trip: {:.1} syscalls, {:.1} context switches\n",
                        sys / n,
                        cs / n
                    ));
                }
                for (name, (v, n)) in switches(&agents) {
                    let (v0, n0) = switches_before.get(&name).copied().unwrap_or_default();
                    per_rr.push_str(&format!(
                    "both agents' {name} threads, per pinned round trip: {:.2} voluntary, {:.2} involuntary context switches\n",
                    (v - v0) as f64 / a.rr_count as f64,
                    (n - n0) as f64 / a.rr_count as f64
                ));
                }
                let mut text = per_rr.into_bytes();
                weft_e2e::perf::report(rec, &perf_data, &mut text)?;
                std::fs::write(out, &text)?;
            }
            weft_e2e::process::pin_cpu(&agents, None);
            weft_e2e::process::pin_cpu(&servers, None);
            weft_e2e::process::pin_cpu(&relays, None);
            let cfb = two(
                &c,
                pod,
                &["cfb", "--connect", dst, "--count", &a.cfb_count.to_string()],
                None,
            )?;
            eprintln!(
            "round {round} {name:<6} x1 {one:.2} Gb/s, x8 {eight:.2} Gb/s, RR p50 {:.1} us, pinned {:.1} us, connect+1B {:.1} us",
            rr.0, rr_pinned.0, cfb.0
        );
            per_mode[mi].push(Row {
                one,
                eight,
                rr,
                rr_pinned,
                cfb,
                cores,
                load_rss,
                proxy_cpu_us,
            });
        }
    }
    let rows: Vec<(String, Row)> = modes
        .iter()
        .zip(&per_mode)
        .map(|((name, ..), rs)| (name.to_string(), median_row(rs)))
        .collect();
    println!(
        "weft node proxy benchmark (2 nodes, 1 pod each; agents' CPU during the iperf3 runs; median of {} rounds)",
        a.rounds.max(1)
    );
    println!(
        "{:<6} {:>11} {:>11} {:>16} {:>16} {:>16} {:>15} {:>12}",
        "mode",
        "iperf3 x1",
        "iperf3 x8",
        "1KiB RR p50/p99",
        "RR pinned p50",
        "conn+1B p50",
        "agents CPU",
        "agents RSS"
    );
    for (name, r) in &rows {
        println!(
            "{:<6} {:>7.2} Gb/s {:>7.2} Gb/s {:>7.1}/{:>5.1} us {:>13.1} us {:>13.1} us {:>10.2} cores {:>9} KiB",
            name, r.one, r.eight, r.rr.0, r.rr.1, r.rr_pinned.0, r.cfb.0, r.cores,
            r.load_rss.iter().max().copied().unwrap_or(0)
        );
    }
    let p = &rows[0].1;
    for (name, w) in &rows[1..] {
        println!(
            "ratios {}/plain: throughput x1 {:.2}, x8 {:.2}; added RR p50 {:+.1} us (pinned {:+.1} us); added connect+1B p50 {:+.1} us",
            name,
            w.one / p.one,
            w.eight / p.eight,
            w.rr.0 - p.rr.0,
            w.rr_pinned.0 - p.rr_pinned.0,
            w.cfb.0 - p.cfb.0
        );
    }
    // weft against the floor of two minimal relays (same path, same run).
    let (f, w) = (&rows[1].1, &rows[2].1);
    println!(
        "proxies' CPU per pinned 1 KiB round trip: relays {:.1} us, weft's agents {:.1} us ({:.2}x)",
        f.proxy_cpu_us,
        w.proxy_cpu_us,
        w.proxy_cpu_us / f.proxy_cpu_us
    );
    println!(
        "weft/relays (the floor): throughput x1 {:.2}, x8 {:.2}; added pinned RR {:.2}x the relays'",
        w.one / f.one,
        w.eight / f.eight,
        (w.rr_pinned.0 - p.rr_pinned.0) / (f.rr_pinned.0 - p.rr_pinned.0)
    );
    println!(
        "agent RSS idle: {:?} KiB (max {} KiB per node agent); 1 s after set-up, before the startup code pages were given back: {:?} KiB",
        idle_rss,
        idle_rss.iter().max().copied().unwrap_or(0),
        fresh_rss,
    );
    Ok(())
}
