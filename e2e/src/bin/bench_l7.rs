//! L7 benchmark (issue: L7 + Wasm). On the local cluster harness, in one run:
//! HTTP/1.1 keep-alive requests (wrk, 1 connection, 1 thread) from an enrolled
//! client on node-a to enrolled HTTP servers on node-b, over HBONE mTLS:
//! - L4: no L7 policy (bytes copied);
//! - L7 policy: an ALLOW rule on method and path, so requests are parsed;
//! - L7 + C plugin: the same policy plus the C example plugin;
//! - L7 + AssemblyScript plugin: the same policy plus the AssemblyScript one.
//!
//! `--pinned` runs wrk, both agents and the servers on CPU 0, so differences are
//! CPU work rather than cross-CPU wake-ups. `--split` runs node-b's agent (where
//! the L7 work happens) alone on CPU 1 and everything else on CPU 0, as on a node
//! whose proxy has a core of its own: its caches are not shared with the client,
//! the application and the other agent. Rounds are interleaved, each starting
//! with a different setup. Reported: the median per setup of requests/s, p50 and
//! p99 latency and the agents' CPU per request; then the p50 and CPU each setup
//! adds over L4 and over L7-policy-only as per-round paired differences (median
//! and quartiles), which cancel the host's drift between rounds; then the
//! issue's latency targets and whether the run met them; then the plugins'
//! instance memory from the node's /config_dump, against its 2 MB target. `--compare-agent` runs
//! every setup with a second agent binary in the same rounds and reports what it
//! changes, paired per round (two builds compared on a drifting host).

#![forbid(unsafe_code)]

use clap::Parser;
use std::path::Path;
use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::perf::{median, quantile};
use weft_e2e::{bin_path, plugin_path, wait_until};
use weft_node_dataplane::testing::Fields;

#[derive(Parser)]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    seconds: u32,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run every process of the request path (wrk, both node agents, the servers)
    /// on CPU 0, so the differences between setups are CPU work, not cross-CPU
    /// wake-up latency.
    #[arg(long, conflicts_with = "split")]
    pinned: bool,
    /// Run node-b's agent alone on CPU 1 and every other process of the request
    /// path on CPU 0: the destination proxy keeps its own core and caches.
    #[arg(long)]
    split: bool,
    /// Count the node agents' syscalls and context switches per request (perf stat)
    /// in each run.
    #[arg(long)]
    count_syscalls: bool,
    /// Record a CPU profile (perf, CPU 0, 999 Hz) of each setup's first run into
    /// `<DIR>/<setup>.perf.data` (use with --pinned; the default agent binary only).
    #[arg(long)]
    profile: Option<std::path::PathBuf>,
    /// A second `weft-node` binary to compare with the default one: every round
    /// runs each setup with both, restarting both agents in between (the default
    /// binary first in even rounds), and the report adds what the second binary
    /// changes, paired within each round.
    #[arg(long)]
    compare_agent: Option<std::path::PathBuf>,
    /// Only the in-process costs of each plugin callback class (no cluster, no
    /// root needed).
    #[arg(long)]
    in_process_only: bool,
}

#[derive(Default, Clone, Copy, Debug)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    /// Requests wrk completed.
    requests: f64,
    /// Both node agents' CPU time per request.
    agents_cpu_us: f64,
    /// Both node agents' minor page faults per request.
    agents_faults: f64,
}

/// Waits until each setup answers as configured (the plugins add their header).
fn ready(c: &LocalCluster, names: &[&str], ips: &[String]) -> anyhow::Result<()> {
    for (name, ip) in names.iter().zip(ips) {
        let url = format!("http://{ip}:8080/bench");
        wait_until(Duration::from_secs(30), || {
            let r = weft_e2e::curl::curl(c, "bench/client", &[], &url).ok()?;
            let want = match *name {
                "c" | "as" => r.header("x-weft-plugin") == Some(name),
                _ => true,
            };
            (r.status == 200 && want).then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("{name} not ready"))?;
    }
    Ok(())
}

/// Pins the agents as `--pinned` or `--split` asks (again after a restart).
fn pin_agents(c: &LocalCluster, args: &Args) -> anyhow::Result<()> {
    if args.pinned || args.split {
        weft_e2e::process::pin_cpu(&c.agent_pids(), Some(0));
    }
    if args.split {
        weft_e2e::process::pin_cpu(&[c.agent_pid("node-b")?], Some(1));
    }
    Ok(())
}

/// The per-round differences `a - b` of `f`.
fn diffs(a: &[Run], b: &[Run], f: impl Fn(&Run) -> f64) -> Vec<f64> {
    a.iter().zip(b).map(|(a, b)| f(a) - f(b)).collect()
}

/// The per-round differences `a - b` of `f`: median [25th-75th percentile], in us.
fn paired(a: &[Run], b: &[Run], f: impl Fn(&Run) -> f64) -> String {
    let d = diffs(a, b, f);
    if d.is_empty() {
        return "n/a".into();
    }
    let at = |q| quantile(d.clone(), q);
    format!("{:+.1} us [{:+.1} to {:+.1}]", at(0.5), at(0.25), at(0.75))
}

/// The issue's latency targets: (setup, the setup it is compared with, the most
/// its p50 may add over that one, in us), as indices into the setups.
const TARGETS: [(usize, usize, f64); 2] = [(1, 0, 10.0), (2, 1, 2.0)];

/// The most linear memory one plugin instance may use (2 MB).
const MAX_INSTANCE_MEMORY: f64 = 2_000_000.0;

/// Whether a measured figure is within its target; `None` without a measurement.
fn verdict(measured: Option<f64>, max: f64) -> &'static str {
    match measured {
        Some(v) if v <= max => "met",
        Some(_) => "not met",
        None => "not measured",
    }
}

fn us(v: &str) -> Option<f64> {
    let v = v.trim();
    let (num, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
    let n: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => n,
        "ms" => n * 1000.0,
        "s" => n * 1e6,
        _ => return None,
    })
}

fn wrk(c: &LocalCluster, url: &str, secs: u32, cpu: Option<usize>) -> anyhow::Result<Run> {
    let (ok, out, err) = c.run_app_pinned(
        "bench/client",
        Path::new("/usr/bin/wrk"),
        &["-t1", "-c1", &format!("-d{secs}s"), "--latency", url],
        cpu,
    )?;
    anyhow::ensure!(ok, "wrk: {err}{out}");
    anyhow::ensure!(!out.contains("Non-2xx"), "wrk saw errors: {out}");
    let mut r = Run::default();
    for l in out.lines() {
        let f: Vec<&str> = l.split_whitespace().collect();
        match f.as_slice() {
            ["50%", v] => r.p50_us = us(v).unwrap_or(0.0),
            ["99%", v] => r.p99_us = us(v).unwrap_or(0.0),
            ["Requests/sec:", v] => r.rps = v.parse().unwrap_or(0.0),
            [n, "requests", "in", ..] => r.requests = n.parse().unwrap_or(0.0),
            _ => {}
        }
    }
    anyhow::ensure!(r.rps > 0.0 && r.p50_us > 0.0, "unparsed wrk output: {out}");
    Ok(r)
}

const POLICY: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: bench}
spec:
  selector: {matchLabels: {tier: l7}}
  action: ALLOW
  rules:
    - to: [{operation: {methods: ["GET"], paths: ["/bench*"]}}]
"#;

fn plugin(name: &str, app: &str, module: &Path) -> String {
    format!(
        "apiVersion: extensions.weft.dev/v1alpha1\nkind: WasmPlugin\n\
         metadata: {{name: {name}, namespace: bench}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  url: file://{}\n  \
         pluginConfig: {{protectedPrefix: /private, allowedPeers: [], header: x-weft-plugin, value: {name}}}\n",
        module.display()
    )
}

/// What an in-process lifecycle sends through a plugin.
#[derive(Clone, Copy)]
struct Lifecycle {
    /// Request and response bodies of this many bytes, given to the body
    /// callbacks (0: headers only).
    body: usize,
    /// Also run the plugin's due root-context calls (ticks) after each request.
    ticks: bool,
}

/// The host's cost of one request lifecycle for a plugin, in process (no network):
/// create context, request headers (the plugin reads `:path` and the peer), the
/// bodies when asked, response headers (it adds a header), done/log/delete.
/// Returns (p50, p99) in microseconds and the instance's linear memory.
fn plugin_lifecycle(
    module: &Path,
    name: &str,
    config: &str,
    how: Lifecycle,
) -> anyhow::Result<(f64, f64, usize)> {
    use weft_node_dataplane::testing::Headers;
    use weft_node_dataplane::testing::{ConnProps, HttpState};
    let engine = weft_node_dataplane::testing::WasmEngine::new()?;
    let bytes = std::fs::read(module)?;
    let spec = weft_proto::pb::WasmPlugin {
        name: name.into(),
        namespace: "bench".into(),
        sha256: name.into(),
        plugin_name: name.into(),
        plugin_config: config.into(),
        ..Default::default()
    };
    let p = weft_node_dataplane::testing::Plugin::new(
        Ok(&engine),
        spec,
        Ok(&bytes),
        1,
        Default::default(),
    );
    anyhow::ensure!(p.load_error().is_none(), "{:?}", p.load_error());
    let props = std::sync::Arc::new(ConnProps {
        source: "10.244.1.2:40000".parse()?,
        destination: "10.244.2.2:8080".parse()?,
        peer_id: Some("spiffe://cluster.local/ns/bench/sa/client".into()),
    });
    let body: Vec<u8> = (0..how.body).map(|i| b'a' + (i % 26) as u8).collect();
    let mut lat = Vec::new();
    for i in 0..30_000 {
        let t = std::time::Instant::now();
        let mut fields = Fields::default();
        fields.append(b"user-agent", b"wrk")?;
        let mut http = Box::new(HttpState {
            request: Headers::request(
                &http::Method::GET,
                "/bench",
                "10.244.2.2:8080",
                "http",
                fields,
            ),
            props: Some(props.clone()),
            ..Default::default()
        });
        let (o, h) = p.on_request(&mut http, how.body == 0);
        anyhow::ensure!(
            matches!(o, weft_node_dataplane::testing::Outcome::Continue),
            "{o:?}"
        );
        let h = h.ok_or_else(|| anyhow::anyhow!("no context"))?;
        if how.body > 0 {
            http.request_body.clone_from(&body);
            anyhow::ensure!(
                p.on_body(h, &mut http, false).is_none(),
                "request body refused"
            );
        }
        let mut fields = Fields::default();
        fields.append(b"content-length", b"10")?;
        http.response = Headers::response(200, fields);
        anyhow::ensure!(p.on_response(h, &mut http, how.body == 0).is_none());
        if how.body > 0 {
            http.response_body.clone_from(&body);
            anyhow::ensure!(
                p.on_body(h, &mut http, true).is_none(),
                "response body refused"
            );
        }
        p.finish(h, &mut http);
        if how.ticks {
            p.run_due(std::time::Instant::now() + Duration::from_secs(3600));
        }
        if i >= 5_000 {
            lat.push(t.elapsed().as_nanos() as f64 / 1000.0);
        }
    }
    lat.sort_by(f64::total_cmp);
    let mem = p.instance_memory().into_iter().max().unwrap_or(0);
    Ok((lat[lat.len() / 2], lat[lat.len() * 99 / 100], mem))
}

/// The in-process cost of each plugin callback class, against the C plugin's
/// headers-only lifecycle measured in the same run.
fn callback_classes() -> anyhow::Result<()> {
    let gate =
        r#"{"protectedPrefix":"/private","allowedPeers":[],"header":"x-weft-plugin","value":"v"}"#;
    let headers = Lifecycle {
        body: 0,
        ticks: false,
    };
    let cases: [(&str, &str, &str, Lifecycle); 6] = [
        (
            "C peer_gate: headers (baseline)",
            "peer_gate_c",
            gate,
            headers,
        ),
        (
            "AssemblyScript peer_gate: headers",
            "peer_gate_as",
            gate,
            headers,
        ),
        (
            "C rate_limit: headers + shared data (CAS get/set) + metric",
            "rate_limit_c",
            r#"{"requestsPerSecond": 1000000000, "burst": 1000000000}"#,
            headers,
        ),
        (
            "C rate_limit: the same + a due tick per request (root context, off the workers)",
            "rate_limit_c",
            r#"{"requestsPerSecond": 1000000000, "burst": 1000000000}"#,
            Lifecycle {
                body: 0,
                ticks: true,
            },
        ),
        (
            "C body_guard: request + response bodies of 1 KiB",
            "body_guard_c",
            r#"{"blocked": "DROP TABLE", "redact": "secret"}"#,
            Lifecycle {
                body: 1024,
                ticks: false,
            },
        ),
        (
            "C body_guard: request + response bodies of 64 KiB",
            "body_guard_c",
            r#"{"blocked": "DROP TABLE", "redact": "secret"}"#,
            Lifecycle {
                body: 64 * 1024,
                ticks: false,
            },
        ),
    ];
    // The host's own part of a body callback: a plugin that only reads the
    // whole body (one copy into its memory) and continues.
    let reader = std::env::temp_dir().join(format!(
        "weft-bench-body-reader-{}.wasm",
        std::process::id()
    ));
    std::fs::write(&reader, wat::parse_str(BODY_READER)?)?;
    let reading = |body| {
        (
            "WAT body reader",
            "body_reader",
            "",
            Lifecycle { body, ticks: false },
        )
    };
    let mut base = None;
    let all = cases.into_iter().chain([reading(1024), reading(64 * 1024)]);
    for (label, name, config, how) in all {
        let module = match name {
            "body_reader" => reader.clone(),
            n => plugin_path(n)?,
        };
        let label = match name {
            "body_reader" => format!(
                "{label}: request + response bodies of {} KiB, read whole by the plugin",
                how.body / 1024
            ),
            _ => label.to_string(),
        };
        let (p50, p99, mem) = plugin_lifecycle(&module, name, config, how)?;
        let b = *base.get_or_insert(p50);
        println!(
            "{label}: one request lifecycle in process p50 {p50:.2} us ({:.2}x the baseline), p99 {p99:.2} us; instance linear memory {} KiB",
            p50 / b,
            mem / 1024
        );
    }
    let _ = std::fs::remove_file(&reader);
    Ok(())
}

/// A plugin whose body callbacks read the whole body and continue.
const BODY_READER: &str = r#"(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 3)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (drop (call $buf (i32.const 0) (i32.const 0) (local.get 1) (i32.const 200) (i32.const 204)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (drop (call $buf (i32.const 1) (i32.const 0) (local.get 1) (i32.const 200) (i32.const 204)))
    (i32.const 0)))"#;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    callback_classes()?;
    if args.in_process_only {
        return Ok(());
    }
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"])?;
    c.namespace("bench", true)?;
    let setups = [
        ("L4 (no L7 policy)", "l4", "none"),
        ("L7 policy", "l7", "l7"),
        ("L7 policy + C plugin", "c", "l7"),
        ("L7 policy + AssemblyScript plugin", "as", "l7"),
    ];
    let app = bin_path("weft-testapp")?;
    let mut ips = Vec::new();
    let mut servers = Vec::new();
    for (_, name, tier) in setups {
        let ip = c.add_pod("bench", name, "node-b", &[("app", name), ("tier", tier)])?;
        c.wait_enrolled("node-b", &format!("bench/{name}"))?;
        servers.push(c.spawn_app(
            &format!("bench/{name}"),
            &app,
            &["http", "--listen", "0.0.0.0:8080"],
        )?);
        ips.push(ip);
    }
    c.add_pod("bench", "client", "node-a", &[("app", "client")])?;
    c.wait_enrolled("node-a", "bench/client")?;
    c.write_manifest(
        "bench.yaml",
        &[
            POLICY.to_string(),
            plugin("c", "c", &plugin_path("peer_gate_c")?),
            plugin("as", "as", &plugin_path("peer_gate_as")?),
        ]
        .join("---\n"),
    )?;
    let names: Vec<&str> = setups.iter().map(|s| s.1).collect();
    ready(&c, &names, &ips)?;
    let cpu = (args.pinned || args.split).then_some(0);
    if args.pinned || args.split {
        weft_e2e::process::pin_cpu(&servers, cpu);
    }
    pin_agents(&c, &args)?;
    let binaries: Vec<std::path::PathBuf> = std::iter::once(bin_path("weft-node")?)
        .chain(args.compare_agent.clone())
        .collect();
    let mut running = 0;
    // runs[b][i]: binary b, setup i.
    let mut all_runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); setups.len()]; binaries.len()];
    for round in 0..args.rounds {
        for k in 0..binaries.len() {
            let b = (k + round) % binaries.len();
            if b != running {
                for node in ["node-a", "node-b"] {
                    c.kill_agent(node);
                    c.start_agent_with(node, &binaries[b])?;
                    c.wait_agent_ready(node, Duration::from_secs(30))?;
                }
                ready(&c, &names, &ips)?;
                pin_agents(&c, &args)?;
                running = b;
            }
            let runs = &mut all_runs[b];
            // Each round starts with a different setup, so no setup always runs first
            // or after the same one.
            for i in (0..setups.len()).map(|k| (k + round) % setups.len()) {
                let ip = &ips[i];
                let stat_out = c.dir.path().join("agents.perf.stat");
                let stat = match args.count_syscalls {
                    true => Some(weft_e2e::perf::stat(&c.agent_pids(), &stat_out)?),
                    false => None,
                };
                let rec = match (&args.profile, round) {
                    (Some(dir), 0) if b == 0 => {
                        std::fs::create_dir_all(dir)?;
                        let data = dir.join(format!("{}.perf.data", setups[i].1));
                        Some(weft_e2e::perf::record(
                            &data,
                            Some("0"),
                            args.seconds.saturating_sub(1),
                        )?)
                    }
                    _ => None,
                };
                let agents = c.agent_pids();
                let cpu_before = weft_e2e::process::cpu_ns(&agents);
                let faults_before = weft_e2e::process::minor_faults(&agents);
                let mut r = wrk(&c, &format!("http://{ip}:8080/bench"), args.seconds, cpu)?;
                let cpu_used = weft_e2e::process::cpu_ns(&agents).saturating_sub(cpu_before);
                let faults = weft_e2e::process::minor_faults(&agents).saturating_sub(faults_before);
                r.agents_cpu_us = cpu_used as f64 / 1000.0 / r.requests.max(1.0);
                r.agents_faults = faults as f64 / r.requests.max(1.0);
                if let Some(mut rec) = rec {
                    rec.wait()?;
                }
                let per_request = stat
                    .map(|st| {
                        let (sys, cs) = weft_e2e::perf::stat_done(st, &stat_out);
                        let n = r.rps * f64::from(args.seconds);
                        format!(
                            "  agents per request: {:.1} syscalls, {:.1} context switches",
                            sys / n,
                            cs / n
                        )
                    })
                    .unwrap_or_default();
                eprintln!(
                "round {round} {}{:<36} {:>9.0} req/s  p50 {:>7.1} us  p99 {:>7.1} us  agents' CPU {:>6.1} us/request, {:.3} page faults/request{per_request}",
                if b > 0 { "[compared agent] " } else { "" },
                setups[i].0, r.rps, r.p50_us, r.p99_us, r.agents_cpu_us, r.agents_faults
            );
                runs[i].push(r);
            }
        }
    }
    let runs = &all_runs[0];
    let med: Vec<Run> = runs
        .iter()
        .map(|v| Run {
            rps: median(v.iter().map(|r| r.rps).collect()),
            p50_us: median(v.iter().map(|r| r.p50_us).collect()),
            p99_us: median(v.iter().map(|r| r.p99_us).collect()),
            requests: median(v.iter().map(|r| r.requests).collect()),
            agents_cpu_us: median(v.iter().map(|r| r.agents_cpu_us).collect()),
            agents_faults: median(v.iter().map(|r| r.agents_faults).collect()),
        })
        .collect();
    println!(
        "HTTP/1.1 keep-alive, 1 connection, node-a -> node-b over HBONE mTLS; median of {} x {} s runs{}",
        args.rounds,
        args.seconds,
        match (args.pinned, args.split) {
            (true, _) => "; every process on CPU 0",
            (_, true) => "; node-b's agent on CPU 1, every other process on CPU 0",
            _ => "",
        }
    );
    println!("| setup | requests/s | p50 | p99 | agents' CPU per request |");
    println!("|---|---|---|---|---|");
    for (i, r) in med.iter().enumerate() {
        println!(
            "| {} | {:.0} | {:.1} us | {:.1} us | {:.1} us |",
            setups[i].0, r.rps, r.p50_us, r.p99_us, r.agents_cpu_us
        );
    }
    println!(
        "\nAdded cost, paired within each round (so drift between rounds cancels): median [25th-75th percentile] over {} rounds",
        args.rounds
    );
    println!("| setup | against | p50 added | agents' CPU added |");
    println!("|---|---|---|---|");
    for (i, base) in [(1, 0), (2, 0), (3, 0), (2, 1), (3, 1)] {
        let p50 = paired(&runs[i], &runs[base], |r| r.p50_us);
        let cpu = paired(&runs[i], &runs[base], |r| r.agents_cpu_us);
        println!("| {} | {} | {p50} | {cpu} |", setups[i].0, setups[base].0);
    }
    println!("\nTargets (the median of the paired p50 differences above):");
    for (i, base, max) in TARGETS {
        let d = diffs(&runs[i], &runs[base], |r| r.p50_us);
        let measured = (!d.is_empty()).then(|| median(d));
        println!(
            "- {} adds <= {max} us p50 over {}: {} ({})",
            setups[i].0,
            setups[base].0,
            measured.map_or("n/a".into(), |v| format!("{v:+.1} us")),
            verdict(measured, max)
        );
    }
    if let (Some(other), Some(second)) = (&args.compare_agent, all_runs.get(1)) {
        println!(
            "\n{} minus the default weft-node, paired within each round: median [25th-75th percentile] over {} rounds",
            other.display(),
            args.rounds
        );
        println!("| setup | p50 | agents' CPU | p50 added over L4, default / compared | over L7 policy, default / compared |");
        println!("|---|---|---|---|---|");
        for (i, setup) in setups.iter().enumerate() {
            let p50 = paired(&second[i], &runs[i], |r| r.p50_us);
            let cpu = paired(&second[i], &runs[i], |r| r.agents_cpu_us);
            let over = |base: usize| match i > base {
                true => format!(
                    "{} / {}",
                    paired(&runs[i], &runs[base], |r| r.p50_us),
                    paired(&second[i], &second[base], |r| r.p50_us)
                ),
                false => String::new(),
            };
            println!(
                "| {} | {p50} | {cpu} | {} | {} |",
                setup.0,
                over(0),
                over(1)
            );
        }
    }
    let dump = c.config_dump("node-b")?;
    if let Some(plugins) = dump["proxy"]["wasm_plugins"].as_array() {
        for p in plugins {
            // One figure per instance (one per worker thread that ran the plugin).
            let largest = p["instance_memory_bytes"]
                .as_array()
                .and_then(|v| v.iter().filter_map(|m| m.as_f64()).reduce(f64::max));
            println!(
                "plugin {}: instance linear memory {:?} bytes, calls {}; <= 2 MB per instance: {}",
                p["plugin"],
                p["instance_memory_bytes"],
                p["calls"],
                verdict(largest, MAX_INSTANCE_MEMORY)
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_met_up_to_and_including_its_bound() {
        assert_eq!(verdict(Some(-1.0), 2.0), "met");
        assert_eq!(verdict(Some(2.0), 2.0), "met");
        assert_eq!(verdict(Some(2.1), 2.0), "not met");
        assert_eq!(verdict(None, 2.0), "not measured");
    }

    #[test]
    fn differences_pair_the_rounds_in_order() {
        let run = |p50_us| Run {
            p50_us,
            ..Run::default()
        };
        let a = [run(80.0), run(75.0), run(90.0), run(70.0), run(73.0)];
        let b = [run(78.0), run(76.0), run(85.0), run(70.0), run(70.0)];
        assert_eq!(diffs(&a, &b, |r| r.p50_us), vec![2.0, -1.0, 5.0, 0.0, 3.0]);
        assert_eq!(paired(&a, &b, |r| r.p50_us), "+2.0 us [+0.0 to +3.0]");
        assert_eq!(paired(&[], &b, |r| r.p50_us), "n/a");
    }
}
