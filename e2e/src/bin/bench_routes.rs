//! Gateway API routing benchmark (issue: traffic management). On the local cluster
//! harness, in one run, an enrolled client on node-a calls enrolled servers on
//! node-b through Service VIPs, over HBONE mTLS, one connection at a time:
//! - `L4 Service`: a Service without routes (bytes copied at both ends);
//! - `L4 Service, no route anywhere`: the same, measured while no route exists in
//!   the mesh at all (routes are withdrawn for it), so the pair shows what the
//!   existence of routes costs a Service that has none;
//! - `L7 policy`: a Service without routes whose server has an L7 ALLOW policy, so
//!   requests are parsed once, at the destination ("L7 parsing alone");
//! - `routed`: a Service with an HTTPRoute (a path match, one backend), so every
//!   request is parsed, matched and balanced at the source.
//!
//! Each setup runs HTTP/1.1 keep-alive (wrk, 1 connection) and gRPC-shaped HTTP/2
//! (h2c POSTs with `content-type: application/grpc` and response trailers, one
//! connection, one request at a time, weft-testapp). Rounds are interleaved and
//! reported as per-round paired differences (median and quartiles), as
//! `weft-bench-l7` does. `--pinned` runs every process on CPU 0 (requests/s is
//! then what one core does for the whole path, both agents included).

#![forbid(unsafe_code)]

use clap::Parser;
use std::path::Path;
use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::perf::{median, quantile};
use weft_e2e::{bin_path, wait_until};

#[derive(Parser)]
struct Args {
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 4)]
    seconds: u32,
    /// HTTP/2 requests per run.
    #[arg(long, default_value_t = 4000)]
    h2_requests: usize,
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Every process of the request path on CPU 0.
    #[arg(long)]
    pinned: bool,
}

/// (label, Service VIP, server pod, tier)
const SETUPS: [(&str, &str, &str, &str); 3] = [
    ("L4 Service", "10.96.0.70", "l4", "none"),
    ("L7 policy", "10.96.0.71", "l7", "l7"),
    ("routed", "10.96.0.72", "routed", "none"),
];
const NO_ROUTES: &str = "L4 Service, no route anywhere";

fn services() -> String {
    SETUPS
        .iter()
        .map(|(_, vip, name, _)| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: bench}}\n\
                 spec: {{clusterIP: {vip}, selector: {{app: {name}}}, ports: [{{name: web, port: 80, targetPort: 8080}}]}}\n"
            )
        })
        .collect::<Vec<_>>()
        .join("---\n")
}

const POLICY: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: bench}
spec:
  selector: {matchLabels: {tier: l7}}
  action: ALLOW
  rules:
    - to: [{operation: {paths: ["/bench*"]}}]
"#;

const ROUTE: &str = r#"apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: routed, namespace: bench}
spec:
  parentRefs: [{group: "", kind: Service, name: routed, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /bench}}, {path: {type: PathPrefix, value: /bench.Svc}}]
    backendRefs: [{name: routed, port: 80}]
"#;

#[derive(Default, Clone, Copy, Debug)]
struct Run {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
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
            _ => {}
        }
    }
    anyhow::ensure!(r.rps > 0.0 && r.p50_us > 0.0, "unparsed wrk output: {out}");
    Ok(r)
}

fn h2(
    c: &LocalCluster,
    app: &Path,
    vip: &str,
    n: usize,
    cpu: Option<usize>,
) -> anyhow::Result<Run> {
    let (ok, out, err) = c.run_app_pinned(
        "bench/client",
        app,
        &[
            "requests",
            "--connect",
            &format!("{vip}:80"),
            "--h2",
            "--grpc",
            "--path",
            "/bench.Svc/Call",
            "--count",
            &n.to_string(),
            "--warmup",
            "200",
        ],
        cpu,
    )?;
    anyhow::ensure!(ok, "requests: {err}");
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    anyhow::ensure!(
        v["status"]["200"].as_u64() == Some(n as u64),
        "not every request answered 200: {v}"
    );
    Ok(Run {
        rps: v["rps"].as_f64().unwrap_or(0.0),
        p50_us: v["p50_us"].as_f64().unwrap_or(0.0),
        p99_us: v["p99_us"].as_f64().unwrap_or(0.0),
    })
}

fn paired(a: &[Run], b: &[Run]) -> (String, Option<f64>) {
    let d: Vec<f64> = a.iter().zip(b).map(|(a, b)| a.p50_us - b.p50_us).collect();
    if d.is_empty() {
        return ("n/a".into(), None);
    }
    let at = |q| quantile(d.clone(), q);
    (
        format!("{:+.1} us [{:+.1} to {:+.1}]", at(0.5), at(0.25), at(0.75)),
        Some(at(0.5)),
    )
}

fn routes_on(c: &LocalCluster, node: &str) -> usize {
    c.config_dump(node)
        .ok()
        .and_then(|d| d["routes"].as_object().map(|m| m.len()))
        .unwrap_or(usize::MAX)
}

/// Writes or withdraws the route and waits until both agents agree.
fn set_route(c: &LocalCluster, on: bool) -> anyhow::Result<()> {
    c.write_manifest("route.yaml", if on { ROUTE } else { "" })?;
    let want = usize::from(on);
    wait_until(Duration::from_secs(20), || {
        (routes_on(c, "node-a") == want && routes_on(c, "node-b") == want).then_some(())
    })
    .ok_or_else(|| {
        anyhow::anyhow!(
            "route {} did not reach the nodes",
            if on { "add" } else { "removal" }
        )
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    require_root();
    let app = bin_path("weft-testapp")?;
    let mut c = LocalCluster::new(&["node-a", "node-b"])?;
    c.namespace("bench", true)?;
    let mut servers = Vec::new();
    for (_, _, name, tier) in SETUPS {
        c.add_pod("bench", name, "node-b", &[("app", name), ("tier", tier)])?;
        c.wait_enrolled("node-b", &format!("bench/{name}"))?;
        servers.push(c.spawn_app(
            &format!("bench/{name}"),
            &app,
            &["http", "--listen", "0.0.0.0:8080"],
        )?);
    }
    c.add_pod("bench", "client", "node-a", &[("app", "client")])?;
    c.wait_enrolled("node-a", "bench/client")?;
    c.write_manifest("bench.yaml", &format!("{}---\n{POLICY}", services()))?;
    set_route(&c, true)?;
    for (label, vip, _, _) in SETUPS {
        let url = format!("http://{vip}/bench");
        wait_until(Duration::from_secs(30), || {
            let r = weft_e2e::curl::curl(&c, "bench/client", &[], &url).ok()?;
            (r.status == 200).then_some(())
        })
        .ok_or_else(|| anyhow::anyhow!("{label} not ready"))?;
    }
    let cpu = args.pinned.then_some(0);
    if args.pinned {
        weft_e2e::process::pin_cpu(&servers, cpu);
        weft_e2e::process::pin_cpu(&c.agent_pids(), cpu);
    }
    let labels: Vec<&str> = SETUPS
        .iter()
        .map(|s| s.0)
        .chain(std::iter::once(NO_ROUTES))
        .collect();
    // runs[protocol][setup]: protocol 0 HTTP/1.1, 1 HTTP/2.
    let mut runs: Vec<Vec<Vec<Run>>> = vec![vec![Vec::new(); labels.len()]; 2];
    for round in 0..args.rounds {
        // Half the rounds measure "no route anywhere" first.
        let order: Vec<bool> = if round % 2 == 0 {
            vec![true, false]
        } else {
            vec![false, true]
        };
        for with_routes in order {
            set_route(&c, with_routes)?;
            let idx: Vec<usize> = if with_routes {
                (0..SETUPS.len())
                    .map(|k| (k + round) % SETUPS.len())
                    .collect()
            } else {
                vec![SETUPS.len()]
            };
            for i in idx {
                let vip = SETUPS[if i == SETUPS.len() { 0 } else { i }].1;
                let r1 = wrk(&c, &format!("http://{vip}/bench"), args.seconds, cpu)?;
                let r2 = h2(&c, &app, vip, args.h2_requests, cpu)?;
                eprintln!(
                    "round {round} {:<32} HTTP/1.1 {:>7.0} req/s p50 {:>6.1} us p99 {:>7.1} us | HTTP/2 gRPC-shaped {:>7.0} req/s p50 {:>6.1} us p99 {:>7.1} us",
                    labels[i], r1.rps, r1.p50_us, r1.p99_us, r2.rps, r2.p50_us, r2.p99_us
                );
                runs[0][i].push(r1);
                runs[1][i].push(r2);
            }
        }
    }
    for (p, proto) in [
        "HTTP/1.1 keep-alive (wrk)",
        "HTTP/2, gRPC-shaped (weft-testapp)",
    ]
    .iter()
    .enumerate()
    {
        println!(
            "\n{proto}, 1 connection, node-a -> node-b over HBONE mTLS; median of {} rounds{}",
            args.rounds,
            if args.pinned {
                "; every process on CPU 0"
            } else {
                ""
            }
        );
        println!("| setup | requests/s | p50 | p99 |");
        println!("|---|---|---|---|");
        for (i, l) in labels.iter().enumerate() {
            let v = &runs[p][i];
            println!(
                "| {l} | {:.0} | {:.1} us | {:.1} us |",
                median(v.iter().map(|r| r.rps).collect()),
                median(v.iter().map(|r| r.p50_us).collect()),
                median(v.iter().map(|r| r.p99_us).collect())
            );
        }
        println!("\n| p50 added (paired per round) | median [25th-75th percentile] |");
        println!("|---|---|");
        for (a, b) in [(2, 0), (1, 0), (2, 1), (0, 3)] {
            println!(
                "| {} over {} | {} |",
                labels[a],
                labels[b],
                paired(&runs[p][a], &runs[p][b]).0
            );
        }
        let (_, over_l7) = paired(&runs[p][2], &runs[p][1]);
        let verdict = match over_l7 {
            Some(v) if v <= 10.0 => "met",
            Some(_) => "not met",
            None => "not measured",
        };
        println!(
            "- target: a route match and backend choice add <= 10 us p50 over L7 parsing alone (routed minus L7 policy): {} ({verdict})",
            over_l7.map_or("n/a".into(), |v| format!("{v:+.1} us"))
        );
    }
    Ok(())
}
