//! The L7 path's own cost, in process and on one thread, without the network, the
//! other node or TLS: an HTTP/1.1 keep-alive client writes into an in-memory pipe,
//! the node proxy's destination side serves it, and its upstream connection goes
//! over loopback TCP to a small HTTP server in the same runtime.
//!
//! - `l4`: the proxy copies bytes (what weft does without L7 rules);
//! - `l7`: the proxy runs `proxy::l7::serve` with an ALLOW policy on method and
//!   path, exactly as on the destination node (parse, normalize, authorize, forward,
//!   metrics, access log);
//! - `direct`: the client talks to the server with no proxy (reference);
//! - `hbone-l4`, `hbone-l7`: the same behind an HTTP/2 CONNECT tunnel over an
//!   in-memory pipe (HBONE without TLS), as the destination node receives it;
//! - `mtls-l4`, `mtls-l7`: the tunnel over the agent's mTLS (TLS 1.3, SVIDs from a
//!   control-plane CA), so `mtls-l4 - direct` is the data path's user-space work per
//!   round trip (both nodes' proxies), without the kernel's;
//! - `l7-c`: `l7` plus the C example plugin.
//!
//! The request path's CPU time per request (its one thread; the process's, which adds
//! helper threads such as the Wasm epoch ticker, is printed too), and the difference
//! `l7 - l4`, are the L7 path's cost with nothing else on the machine in the way. Under
//! `valgrind --tool=callgrind` the instruction counts of two request counts give an
//! exact per-request figure: `--requests` sets it.

#![deny(unsafe_code)]

use clap::{Parser, ValueEnum};
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::TokioIo;
use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_e2e::perf::{median, quantile};
use weft_node_dataplane::testing::{
    self as node, ConnCtx, LiveWorkload, LocalPod, PodNetns, ProxyState,
};
use weft_node_dataplane::ConfigStore;
use weft_proto::pb;

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum, Debug)]
enum Mode {
    Direct,
    L4,
    L7,
    /// Through an in-memory HTTP/2 CONNECT tunnel (HBONE without TLS), copied.
    HboneL4,
    /// Through the tunnel, served at L7 on the destination side.
    HboneL7,
    /// `hbone-l4` over the agent's mTLS (TLS 1.3, SVIDs from a control-plane CA):
    /// the node-to-node data path's user-space work without the kernel's.
    #[value(name = "mtls-l4")]
    MtlsL4,
    /// `hbone-l7` over the agent's mTLS.
    #[value(name = "mtls-l7")]
    MtlsL7,
    /// `l7` plus the C example plugin (`make plugins` builds it).
    #[value(name = "l7-c")]
    L7C,
    All,
}

#[derive(Parser)]
struct Args {
    /// The modes to run, comma-separated (`all`: every one).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "all")]
    mode: Vec<Mode>,
    /// Requests per mode (after 1,000 warm-up requests).
    #[arg(long, default_value_t = 50_000)]
    requests: u64,
    /// Rounds per mode (interleaved, each round starting with the next mode); the
    /// median is reported, and each "adds" figure is the median of the per-round
    /// differences, with their quartiles.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Count instructions instead (exact, unlike CPU time on a shared host): runs
    /// this benchmark under `valgrind --tool=callgrind` with 1,000 and 3,000
    /// requests per mode and prints the difference per request.
    #[arg(long)]
    instructions: bool,
    /// With `--instructions`: also write this binary's code run on every request
    /// to this file, a line per address: mode, address (hex, as in the binary and
    /// `nm`, not where it was loaded), instructions executed there in the
    /// 3,000-request run. `node-dataplane/link/gen-hot-text.py` reads it.
    #[arg(long)]
    hot_code: Option<std::path::PathBuf>,
    /// Print where this binary's code was loaded (`code: bias B start S end E`,
    /// hex) on stderr first: `--instructions` passes it to the runs it profiles.
    #[arg(long, hide = true)]
    report_code: bool,
    /// Access log records (stderr). They are rate-limited per second, so their
    /// share per request depends on the request rate (under callgrind, every
    /// request would be logged): off by default.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    access_log: bool,
    /// AuthorizationPolicies in other namespaces, as a mesh has: each selects an
    /// `app` in its own namespace and applies nowhere near the benchmark's server.
    #[arg(long, default_value_t = 0)]
    other_policies: usize,
    /// Before each timed request, write one byte in every cache line of a buffer of
    /// this many KiB, evicting the CPU's caches as the other processes sharing a
    /// node's core do between two requests (0: caches stay warm). Every mode pays
    /// the same eviction, so the differences between modes remain the proxy's.
    #[arg(long, default_value_t = 0)]
    evict_kib: usize,
}

// The node agent's allocator, so allocation costs are the agent's.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const WORKLOAD: &str = "Workload/bench/server";
const PRINCIPAL: &str = "td.local/ns/bench/sa/client";
const SERVER_ID: &str = "spiffe://td.local/ns/bench/sa/server";

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.report_code {
        let c = loaded_code().ok_or_else(|| anyhow::anyhow!("no executable segment found"))?;
        eprintln!(
            "code: bias {:x} start {:x} end {:x}",
            c.bias, c.start, c.end
        );
    }
    if args.instructions {
        return count_instructions(&args);
    }
    // The agent's logging (info): without a subscriber, `tracing` hands every
    // disabled span to `log` (kube-client turns that feature on), which costs
    // thousands of instructions per request in h2 that the agent does not pay.
    weft_runtime::logging::init(weft_runtime::logging::LogFormat::Text);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let app = start_app().await?;
    let netns = Arc::new(PodNetns::open("/proc/self/ns/net")?);
    let states = States {
        l4: proxy_state(app, &netns, args.access_log, 0, false)?,
        l7: proxy_state(app, &netns, args.access_log, args.other_policies, true)?,
    };
    let modes = selected(&args.mode);
    let mut cpu: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut process: HashMap<&'static str, Vec<f64>> = HashMap::new();
    let mut wall: HashMap<&'static str, Vec<f64>> = HashMap::new();
    for round in 0..args.rounds {
        // A different mode goes first each round: none always runs first or
        // always after the same one.
        let n = modes.len();
        for &m in modes.iter().cycle().skip(round % n).take(n) {
            let r = measure(m, app, &states, args.requests, args.evict_kib).await?;
            println!(
                "round {}: {:<6} {:>7.2} us CPU/request ({:>7.2} process), {:>7.2} us/request",
                round + 1,
                name(m),
                r.cpu,
                r.process_cpu,
                r.wall
            );
            cpu.entry(name(m)).or_default().push(r.cpu);
            process.entry(name(m)).or_default().push(r.process_cpu);
            wall.entry(name(m)).or_default().push(r.wall);
        }
    }
    println!(
        "\nmedians over {} rounds of {} requests (CPU: the request path's thread; process: all threads):",
        args.rounds, args.requests
    );
    for &m in &modes {
        println!(
            "{:<6} {:>7.2} us CPU/request ({:>7.2} process)  {:>7.2} us/request",
            name(m),
            median(cpu[name(m)].clone()),
            median(process[name(m)].clone()),
            median(wall[name(m)].clone())
        );
    }
    for (l4, l7) in [
        ("l4", "l7"),
        ("hbone-l4", "hbone-l7"),
        ("mtls-l4", "mtls-l7"),
        ("direct", "mtls-l4"),
        ("l7", "l7-c"),
    ] {
        if let (Some(a), Some(b)) = (cpu.get(l4), cpu.get(l7)) {
            // Rounds run minutes apart on a drifting host: each round's difference.
            let d: Vec<f64> = b.iter().zip(a).map(|(b, a)| b - a).collect();
            println!(
                "{l7} adds {:.2} us CPU per request over {l4} [{:.2} to {:.2}]",
                median(d.clone()),
                quantile(d.clone(), 0.25),
                quantile(d, 0.75)
            );
        }
    }
    Ok(())
}

/// One callgrind run of a mode: its instructions, and the instructions executed
/// at each code address (this binary's, the libraries', the plugins' compiled code).
struct Profile {
    instructions: u64,
    at: HashMap<u64, u64>,
    /// Where the profiled run's own code was: valgrind loads a position-independent
    /// executable elsewhere than the kernel does, so its addresses are translated.
    code: Code,
}

/// Where this executable's code was loaded: its load bias (runtime address minus
/// the address in the binary) and its executable segments' runtime range.
#[derive(Debug, PartialEq, Eq)]
struct Code {
    bias: u64,
    start: u64,
    end: u64,
}

impl Code {
    fn holds(&self, addr: u64) -> bool {
        (self.start..self.end).contains(&addr)
    }
}

/// This process's executable code ([`Code`]), from the dynamic loader: the first
/// object `dl_iterate_phdr` reports is the executable.
#[allow(unsafe_code)] // dl_iterate_phdr: where the loader put this executable
fn loaded_code() -> Option<Code> {
    unsafe extern "C" fn first(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        data: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: the loader passes a valid record whose `dlpi_phdr` points at
        // `dlpi_phnum` program headers; `data` is the `Option<Code>` below.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Option<Code>)) };
        let phdrs = unsafe { std::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum.into()) };
        let exec = phdrs
            .iter()
            .filter(|p| p.p_type == libc::PT_LOAD && p.p_flags & libc::PF_X != 0);
        let start = exec.clone().map(|p| p.p_vaddr).min();
        let end = exec.map(|p| p.p_vaddr + p.p_memsz).max();
        if let (Some(start), Some(end)) = (start, end) {
            let bias = info.dlpi_addr;
            *out = Some(Code {
                bias,
                start: bias + start,
                end: bias + end,
            });
        }
        1
    }
    let mut code: Option<Code> = None;
    // SAFETY: `first` only reads the records it is given and writes `code`.
    unsafe {
        libc::dl_iterate_phdr(
            Some(first),
            &mut code as *mut Option<Code> as *mut libc::c_void,
        )
    };
    code
}

/// Parses what `--report-code` prints after `code: `.
fn parse_code(line: &str) -> Option<Code> {
    let mut f = line.split_whitespace();
    let mut field = |name: &str| {
        (f.next()? == name)
            .then_some(())
            .and_then(|_| u64::from_str_radix(f.next()?, 16).ok())
    };
    Some(Code {
        bias: field("bias")?,
        start: field("start")?,
        end: field("end")?,
    })
}

/// Instructions per request of each mode, from two callgrind runs of this binary,
/// and the code they run: the distinct cache lines (64 bytes) and pages (4 KiB) of
/// code executed on every request. On a node whose caches and TLB
/// are cold at each request, those cost more than the instructions themselves.
fn count_instructions(args: &Args) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let modes = selected(&args.mode);
    let dir = tempfile::tempdir()?;
    let profile = |m: Mode, requests: u64| -> anyhow::Result<Profile> {
        let file = dir.path().join(format!("{}.{requests}", name(m)));
        let out = std::process::Command::new("valgrind")
            .args(["--tool=callgrind", "--dump-instr=yes", "--compress-pos=no"])
            .arg("--compress-strings=no")
            .arg(format!("--callgrind-out-file={}", file.display()))
            .arg(&exe)
            .arg("--report-code")
            .args(["--mode", name(m), "--rounds", "1", "--requests"])
            .arg(requests.to_string())
            .args(["--access-log", &args.access_log.to_string()])
            .args(["--other-policies", &args.other_policies.to_string()])
            .output()
            .map_err(|e| anyhow::anyhow!("running valgrind (apt-get install valgrind): {e}"))?;
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "{} under callgrind: {err}", name(m));
        let instructions = err
            .lines()
            .find_map(|l| l.split("Collected :").nth(1))
            .and_then(|n| n.trim().parse().ok())
            .ok_or_else(|| anyhow::anyhow!("no instruction count from callgrind: {err}"))?;
        let code = err
            .lines()
            .find_map(|l| l.strip_prefix("code: "))
            .and_then(parse_code)
            .ok_or_else(|| {
                anyhow::anyhow!("the profiled run did not say where its code is: {err}")
            })?;
        let text = std::fs::read_to_string(&file)?;
        Ok(Profile {
            instructions,
            at: executed_at(&text),
            code,
        })
    };
    let mut per: HashMap<&'static str, (u64, HashSet<u64>, HashSet<u64>)> = HashMap::new();
    let mut hot_code = String::new();
    println!("per request (callgrind, 3,000 minus 1,000 requests): instructions, and the code run on every request");
    for &m in &modes {
        let (few, many) = (profile(m, 1000)?, profile(m, 3000)?);
        let n = (many.instructions - few.instructions) / 2000;
        // Run on every request: at least 3/4 of a time per extra request.
        let hot: Vec<u64> = many
            .at
            .iter()
            .filter(|(a, c)| **c - few.at.get(*a).copied().unwrap_or(0).min(**c) >= 1500)
            .map(|(a, _)| *a)
            .collect();
        for a in hot.iter().filter(|a| many.code.holds(**a)) {
            let at = many.at.get(a).copied().unwrap_or(0);
            hot_code.push_str(&format!("{} {:x} {at}\n", name(m), a - many.code.bias));
        }
        let distinct = |shift: u32| hot.iter().map(|a| a >> shift).collect::<HashSet<u64>>();
        let code = (n, distinct(6), distinct(12));
        println!(
            "{:<9} {n:>7} instructions  {:>5} code lines  {:>4} code pages",
            name(m),
            code.1.len(),
            code.2.len()
        );
        per.insert(name(m), code);
    }
    if let Some(path) = &args.hot_code {
        std::fs::write(path, hot_code)
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?;
    }
    for (a, b) in [
        ("l4", "l7"),
        ("hbone-l4", "hbone-l7"),
        ("mtls-l4", "mtls-l7"),
        ("direct", "mtls-l4"),
        ("l7", "l7-c"),
    ] {
        if let (Some(x), Some(y)) = (per.get(a), per.get(b)) {
            println!(
                "{b} adds {} instructions per request over {a}, on {} code lines and {} code pages that {a} does not run",
                y.0 as i64 - x.0 as i64,
                y.1.difference(&x.1).count(),
                y.2.difference(&x.2).count()
            );
        }
    }
    Ok(())
}

/// Instructions executed at each code address, from a callgrind output written
/// with `--dump-instr=yes --compress-pos=no --compress-strings=no`. A cost line
/// right after `calls=` is the call's inclusive cost, not the instruction's own,
/// and is skipped. Every object counts: callgrind names code it cannot place
/// (such as this binary's `.text.hot` section) `???`.
fn executed_at(text: &str) -> HashMap<u64, u64> {
    let mut at = HashMap::new();
    let mut after_call = false;
    for line in text.lines() {
        if line.starts_with("calls=") {
            after_call = true;
        } else if let Some(hex) = line.strip_prefix("0x") {
            if std::mem::take(&mut after_call) {
                continue;
            }
            let mut fields = line.split_whitespace();
            let addr = u64::from_str_radix(hex.split_whitespace().next().unwrap_or(""), 16);
            let cost = fields.next_back().and_then(|c| c.parse::<u64>().ok());
            if let (Ok(a), Some(c)) = (addr, cost) {
                *at.entry(a).or_insert(0) += c;
            }
        }
    }
    at
}

/// The modes `ms` stand for, each once (`all`: every one, in the order they are
/// reported).
fn selected(ms: &[Mode]) -> Vec<Mode> {
    let mut out: Vec<Mode> = Vec::new();
    for &m in ms {
        for m in one(m) {
            if !out.contains(&m) {
                out.push(m);
            }
        }
    }
    out
}

fn one(m: Mode) -> Vec<Mode> {
    match m {
        Mode::All => vec![
            Mode::Direct,
            Mode::L4,
            Mode::L7,
            Mode::HboneL4,
            Mode::HboneL7,
            Mode::MtlsL4,
            Mode::MtlsL7,
            Mode::L7C,
        ],
        m => vec![m],
    }
}

fn name(m: Mode) -> &'static str {
    match m {
        Mode::Direct => "direct",
        Mode::L4 => "l4",
        Mode::L7 => "l7",
        Mode::HboneL4 => "hbone-l4",
        Mode::HboneL7 => "hbone-l7",
        Mode::MtlsL4 => "mtls-l4",
        Mode::MtlsL7 => "mtls-l7",
        Mode::L7C => "l7-c",
        Mode::All => "all",
    }
}

/// CPU time (user + system) of the calling thread, which runs the whole request
/// path (client, proxy, application: one current-thread runtime), and of the
/// process, which adds helper threads such as the Wasm epoch ticker.
#[allow(unsafe_code)] // getrusage(RUSAGE_THREAD), which std does not wrap
fn cpu_time() -> (Duration, Duration) {
    let of = |who: libc::c_int| {
        // SAFETY: getrusage fills the struct it is given.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    (of(libc::RUSAGE_THREAD), of(libc::RUSAGE_SELF))
}

/// A minimal HTTP/1.1 application answering every request with 200 and a short body.
async fn start_app() -> anyhow::Result<SocketAddr> {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = l.local_addr()?;
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let _ = s.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(
                        bytes::Bytes::from_static(b"hello from the app\n"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(s), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// The destination node's proxy state for each kind of mode.
struct States {
    /// No policy: connections are copied.
    l4: Arc<ProxyState>,
    /// An ALLOW policy on method and path: requests are parsed and authorized.
    l7: Arc<ProxyState>,
}

/// A node's proxy state holding the server workload as a local pod (reached in
/// `netns`) and, if `l7`, an ALLOW policy on method and path for it (so requests
/// are parsed and authorized) and `other_policies` policies elsewhere.
fn proxy_state(
    app: SocketAddr,
    netns: &Arc<PodNetns>,
    access_log: bool,
    other_policies: usize,
    l7: bool,
) -> anyhow::Result<Arc<ProxyState>> {
    let config = ConfigStore::new("node-b");
    let workload = pb::Workload {
        uid: "server-uid".into(),
        name: "server".into(),
        namespace: "bench".into(),
        service_account: "server".into(),
        node: "node-b".into(),
        ips: vec![app.ip().to_string()],
        enrolled: true,
        spiffe_id: "spiffe://td.local/ns/bench/sa/server".into(),
        labels: [("app".to_string(), "server".to_string())].into(),
        ..Default::default()
    };
    let policy = pb::AuthorizationPolicy {
        name: "l7-allow".into(),
        namespace: "bench".into(),
        selector: [("app".to_string(), "server".to_string())].into(),
        action: pb::authorization_policy::Action::Allow as i32,
        rules: vec![pb::Rule {
            to: vec![pb::Operation {
                methods: vec!["GET".into()],
                paths: vec!["/api/*".into()],
                ..Default::default()
            }],
            ..Default::default()
        }],
        mesh_wide: false,
    };
    let others = (0..other_policies).map(|i| {
        let ns = format!("other-{i}");
        pb::Resource {
            key: format!("AuthorizationPolicy/{ns}/allow"),
            version: "1".into(),
            kind: Some(pb::resource::Kind::AuthorizationPolicy(
                pb::AuthorizationPolicy {
                    name: "allow".into(),
                    namespace: ns,
                    selector: [("app".to_string(), "server".to_string())].into(),
                    ..policy.clone()
                },
            )),
        }
    });
    let rejected = config.apply(&pb::ConfigUpdate {
        initial: true,
        upserts: [
            pb::Resource {
                key: WORKLOAD.into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::Workload(workload)),
            },
            pb::Resource {
                key: "AuthorizationPolicy/bench/l7-allow".into(),
                version: "1".into(),
                kind: Some(pb::resource::Kind::AuthorizationPolicy(policy.clone())),
            },
        ]
        .into_iter()
        .take(if l7 { 2 } else { 1 })
        .chain(others)
        .collect(),
        ..Default::default()
    });
    anyhow::ensure!(rejected.is_empty(), "config rejected: {rejected:?}");
    let state = node::proxy_state(config, |o| o.access_log.enabled = access_log);
    let workload = state
        .config()
        .snapshot()
        .workloads
        .get(WORKLOAD)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no workload"))?;
    let pod = LocalPod {
        workload: LiveWorkload::new(workload),
        netns: netns.clone(),
    };
    state.set_local_pod(app.ip(), Some(pod));
    Ok(state)
}

/// Runs warm-up plus `n` requests through `mode`; returns (CPU us, wall us) per request.
/// Per request, in microseconds.
struct Measured {
    cpu: f64,
    process_cpu: f64,
    wall: f64,
}

async fn measure(
    mode: Mode,
    app: SocketAddr,
    states: &States,
    n: u64,
    evict_kib: usize,
) -> anyhow::Result<Measured> {
    let mut evict = vec![0u8; evict_kib * 1024];
    let mut send = match mode {
        Mode::Direct => {
            let s = tokio::net::TcpStream::connect(app).await?;
            s.set_nodelay(true)?;
            client(s).await?
        }
        Mode::L4 => {
            let (down, proxy_end) = tokio::io::duplex(64 * 1024);
            tokio::spawn(async move {
                let mut proxy_end = proxy_end;
                if let Ok(mut up) = tokio::net::TcpStream::connect(app).await {
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut proxy_end, &mut up).await;
                }
            });
            client(down).await?
        }
        Mode::L7 | Mode::L7C => {
            let (down, proxy_end) = tokio::io::duplex(64 * 1024);
            let mut ctx = l7_ctx(&states.l7, app)?;
            if mode == Mode::L7C {
                ctx.plan.plugins = vec![c_plugin()?];
            }
            tokio::spawn(async move {
                if let Err(e) = node::serve_l7(proxy_end, ctx).await {
                    eprintln!("l7::serve: {e:#}");
                }
            });
            client(down).await?
        }
        Mode::HboneL4 | Mode::HboneL7 | Mode::MtlsL4 | Mode::MtlsL7 => {
            let state = match mode {
                Mode::HboneL7 | Mode::MtlsL7 => &states.l7,
                _ => &states.l4,
            };
            let tls = match mode {
                Mode::MtlsL4 | Mode::MtlsL7 => Some(mtls()?),
                _ => None,
            };
            let tunnel = hbone_pair(state, app, tls.as_ref()).await?;
            // The source side: the client's TCP connection copied into the tunnel.
            let l = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
            let addr = l.local_addr()?;
            tokio::spawn(async move {
                if let Ok((mut s, _)) = l.accept().await {
                    let _ = s.set_nodelay(true);
                    let _ = node::copy_tunnel(&mut s, tunnel).await;
                }
            });
            let s = tokio::net::TcpStream::connect(addr).await?;
            s.set_nodelay(true)?;
            client(s).await?
        }
        Mode::All => unreachable!("expanded by the caller"),
    };
    for _ in 0..1000 {
        request(&mut send).await?;
    }
    let ((c0, p0), t0) = (cpu_time(), Instant::now());
    for _ in 0..n {
        for line in evict.chunks_mut(64) {
            line[0] = line[0].wrapping_add(1);
        }
        std::hint::black_box(&mut evict);
        request(&mut send).await?;
    }
    let ((c, p), t) = (cpu_time(), t0.elapsed());
    let per = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    Ok(Measured {
        cpu: per(c - c0),
        process_cpu: per(p - p0),
        wall: per(t),
    })
}

fn l7_ctx(state: &Arc<ProxyState>, app: SocketAddr) -> anyhow::Result<ConnCtx> {
    let workload = state
        .config()
        .snapshot()
        .workloads
        .get(WORKLOAD)
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no workload"))?;
    let peer: SocketAddr = "127.0.0.2:40000".parse()?;
    node::l7_ctx(
        state,
        workload,
        app,
        peer,
        Some(&format!("spiffe://{PRINCIPAL}")),
    )
}

/// The agent's mTLS configs for a client and a server workload, with SVIDs signed
/// by a control-plane CA made for the run.
struct Mtls {
    client: Arc<rustls::ClientConfig>,
    server: Arc<rustls::ServerConfig>,
}

fn mtls() -> anyhow::Result<Mtls> {
    use weft_control_plane::identity::ca::{Ca, CaOptions};
    use weft_node_dataplane::testing::{Secret, WorkloadCert};
    let dir = tempfile::tempdir()?;
    let ca = Ca::load_or_create(&CaOptions {
        state_dir: dir.path().to_path_buf(),
        trust_domain: weft_proto::spiffe::TrustDomain::new("td.local")?,
        svid_ttl: Duration::from_secs(3600),
        user_cert: None,
        user_key: None,
        user_bundle: None,
    })?;
    let svid = |id: &str| -> anyhow::Result<WorkloadCert> {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let mut p = rcgen::CertificateParams::default();
        p.distinguished_name = rcgen::DistinguishedName::new();
        p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into()?)];
        let csr = p.serialize_request(&key)?;
        let issued = ca.sign_svid(csr.der(), &weft_proto::spiffe::SpiffeId::parse(id)?)?;
        Ok(WorkloadCert {
            spiffe_id: id.into(),
            serial: issued.serial_hex,
            not_before: std::time::SystemTime::now(),
            not_after: issued.not_after,
            chain_pem: issued.chain_pem,
            trust_bundle_pem: ca.bundle_pem().into(),
            key_pem: Secret(key.serialize_pem()),
        })
    };
    let server_id = SERVER_ID;
    let (client, server) = (svid(&format!("spiffe://{PRINCIPAL}"))?, svid(server_id)?);
    Ok(Mtls {
        client: node::client_config(&client, ca.bundle_pem(), server_id)?,
        server: node::server_config(&server, ca.bundle_pem())?,
    })
}

/// An HBONE tunnel (HTTP/2 CONNECT, the agent's HTTP/2 settings) between a source
/// and a destination side over an in-memory pipe, with the agent's mTLS if given.
/// The destination side is the agent's own HBONE server ([`node::serve_hbone_streams`]
/// over `state`), which authorizes the stream and serves it at L4 or L7 as the
/// state's policies say. Returns the source side's tunnel.
async fn hbone_pair(
    state: &Arc<ProxyState>,
    app: SocketAddr,
    tls: Option<&Mtls>,
) -> anyhow::Result<node::Tunnel> {
    let (a, b) = tokio::io::duplex(256 * 1024);
    let peer: SocketAddr = "127.0.0.2:40000".parse()?;
    let peer_id = format!("spiffe://{PRINCIPAL}");
    let state = state.clone();
    match tls {
        None => {
            tokio::spawn(async move {
                if let Err(e) =
                    node::serve_hbone_streams(b, peer, &peer_id, SERVER_ID, &state).await
                {
                    eprintln!("HBONE: {e:#}");
                }
            });
            open_hbone(a, app).await
        }
        Some(m) => {
            let acceptor = tokio_rustls::TlsAcceptor::from(m.server.clone());
            tokio::spawn(async move {
                let served = match acceptor.accept(b).await {
                    Ok(s) => node::serve_hbone_streams(s, peer, &peer_id, SERVER_ID, &state).await,
                    Err(e) => Err(e.into()),
                };
                if let Err(e) = served {
                    eprintln!("HBONE over mTLS: {e:#}");
                }
            });
            let name = rustls::pki_types::ServerName::IpAddress(app.ip().into());
            let s = tokio_rustls::TlsConnector::from(m.client.clone())
                .connect(name, a)
                .await?;
            open_hbone(s, app).await
        }
    }
}

/// The source side of [`hbone_pair`]: one CONNECT stream to `app`.
async fn open_hbone<T>(io: T, app: SocketAddr) -> anyhow::Result<node::Tunnel>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut send, conn) = node::h2::client().handshake::<_, bytes::Bytes>(io).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    let req = http::Request::builder()
        .method(http::Method::CONNECT)
        .uri(app.to_string())
        .body(())?;
    let (resp, stream) = send.send_request(req, false)?;
    let resp = resp.await?;
    anyhow::ensure!(resp.status() == 200, "CONNECT: {}", resp.status());
    Ok(node::Tunnel {
        send: stream,
        recv: resp.into_body(),
    })
}

/// The C example plugin, configured to let the client through and add its header.
fn c_plugin() -> anyhow::Result<Arc<node::Plugin>> {
    let bytes = std::fs::read(weft_e2e::plugin_path("peer_gate_c")?)?;
    let engine = node::WasmEngine::new()?;
    let spec = pb::WasmPlugin {
        name: "c".into(),
        namespace: "bench".into(),
        sha256: "c".into(),
        plugin_name: "c".into(),
        plugin_config: r#"{"protectedPrefix":"/private","allowedPeers":[],"header":"x-weft-plugin","value":"c"}"#.into(),
        ..Default::default()
    };
    let p = node::Plugin::new(Ok(&engine), spec, Ok(&bytes), 1, Default::default());
    anyhow::ensure!(p.load_error().is_none(), "{:?}", p.load_error());
    Ok(Arc::new(p))
}

type Sender = hyper::client::conn::http1::SendRequest<Empty<bytes::Bytes>>;

async fn client<S>(io: S) -> anyhow::Result<Sender>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

async fn request(send: &mut Sender) -> anyhow::Result<()> {
    let req = http::Request::get("/api/items?id=7")
        .header(http::header::HOST, "server.bench.svc")
        .header(http::header::USER_AGENT, "weft-bench")
        .body(Empty::new())?;
    send.ready().await?;
    let resp = send.send_request(req).await?;
    anyhow::ensure!(resp.status() == 200, "status {}", resp.status());
    let body = resp.into_body().collect().await?.to_bytes();
    anyhow::ensure!(body.len() == 19, "body {} bytes", body.len());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::{executed_at, loaded_code, parse_code, selected, Code, Mode};

    #[test]
    fn modes_are_expanded_and_run_once_each() {
        assert_eq!(
            selected(&[Mode::L7C, Mode::L7, Mode::L7C]),
            vec![Mode::L7C, Mode::L7]
        );
        let all = selected(&[Mode::L4, Mode::All]);
        assert_eq!(all.len(), 8);
        assert_eq!(all[..2], [Mode::L4, Mode::Direct]);
        assert!(!all.contains(&Mode::All));
    }

    #[test]
    fn loaded_code_holds_this_binarys_functions_and_round_trips() {
        let code = loaded_code().expect("the executable has code");
        let f = parse_code as *const () as u64;
        assert!(code.holds(f), "{f:x} not in {code:?}");
        assert!(
            !code.holds(&code as *const Code as u64),
            "a stack address is not code"
        );
        let line = format!(
            "bias {:x} start {:x} end {:x}",
            code.bias, code.start, code.end
        );
        assert_eq!(parse_code(&line), Some(code));
        assert_eq!(parse_code("bias 1 start 2"), None);
        assert_eq!(parse_code("start 1 bias 2 end 3"), None);
    }

    #[test]
    fn executed_at_sums_own_costs_and_skips_calls_inclusive_costs() {
        let text = "\
events: Ir
ob=/bin/x
fl=???
fn=f
0x1000 0 3
0x1004 0 2
cob=/lib/libc.so.6
cfn=memcpy
calls=2 0x9000 0
0x1004 0 500
0x1008 0 1
ob=???
fn=g
0x2000 0 7
0x1000 0 4
";
        let at = executed_at(text);
        assert_eq!(at.get(&0x1000), Some(&7));
        assert_eq!(at.get(&0x1004), Some(&2));
        assert_eq!(at.get(&0x1008), Some(&1));
        assert_eq!(at.get(&0x2000), Some(&7));
        assert_eq!(at.len(), 4);
    }
}
