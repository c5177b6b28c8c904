#![deny(unsafe_code)]
use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use weft_node_dataplane::AccessLogSettings;
use weft_node_dataplane::CertManagerSettings;
use weft_node_dataplane::ControlPlaneTarget;
use weft_node_dataplane::ProxyOptions;
use weft_node_dataplane::{CaptureSettings, Settings};
use weft_runtime::logging::{self, LogFormat};

/// weft node agent.
#[derive(Parser)]
#[command(name = "weft-node", version, about)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "WEFT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, global = true, env = "WEFT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run(Box<RunArgs>),
    /// Remove every eBPF program, link, pin and map weft installed.
    Uninstall {
        /// bpffs directory of weft's pins [default: <bpffs>/weft].
        #[arg(long)]
        bpf_dir: Option<PathBuf>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum Toggle {
    On,
    Off,
}

#[derive(Args)]
struct RunArgs {
    /// This node's name (must match its credential).
    #[arg(long, env = "WEFT_NODE_NAME")]
    node: String,
    /// Control plane gRPC address, e.g. https://127.0.0.1:15012.
    #[arg(
        long,
        env = "WEFT_CONTROL_PLANE",
        default_value = "https://127.0.0.1:15012"
    )]
    control_plane: String,
    /// Name expected in the control plane's serving certificate.
    #[arg(long, default_value = "weft-control-plane")]
    server_name: String,
    /// Directory with node.crt, node.key and ca.crt
    /// (from `weft-control-plane node-credential`).
    #[arg(long, env = "WEFT_CREDENTIAL_DIR")]
    credential_dir: PathBuf,
    /// Kubernetes mode: projected ServiceAccount token sent to the control plane
    /// instead of a client certificate (only ca.crt is then read from --credential-dir).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Admin HTTP address (localhost): /healthz/ready, /config_dump, /metrics.
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_addr: SocketAddr,
    /// Prometheus scrape address (/metrics only); "off" disables it.
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: String,
    /// Capture enrolled pods' traffic with eBPF (needs root and a CNI chain with weft-cni).
    #[arg(long)]
    capture: bool,
    /// cgroup to attach the capture programs to [default: the cgroup2 root, from mountinfo].
    #[arg(long)]
    cgroup: Option<PathBuf>,
    /// bpffs directory for weft's pins [default: <bpffs>/weft].
    #[arg(long)]
    bpf_dir: Option<PathBuf>,
    /// Socket the weft-cni plugin talks to.
    #[arg(long, default_value = weft_node_dataplane::DEFAULT_CNI_SOCKET)]
    cni_socket: PathBuf,
    /// Agent state directory (pod registry).
    #[arg(long, default_value = "/var/run/weft")]
    state_dir: PathBuf,
    /// Also enroll pods the CNI plugin never reported (they ran before weft was
    /// installed or while the agent was down), found by their IP in the host's
    /// /proc: needs the host's PID namespace (hostPID).
    #[arg(long, value_enum, default_value_t = Toggle::On, env = "WEFT_DISCOVER_PODS")]
    discover_pods: Toggle,
    /// Kubernetes mode: a label selector of the release's node DaemonSets (in
    /// --namespace). When none is left at shutdown, weft is being uninstalled: the
    /// agent removes its eBPF programs, its CNI chain entry and its state.
    #[arg(long, env = "WEFT_RELEASE_DAEMONSETS")]
    release_daemonsets: Option<String>,
    /// The agent's namespace (Kubernetes mode). Its pods are never held back by
    /// the CNI plugin (they must start before the control plane is reachable).
    #[arg(long, env = "POD_NAMESPACE", default_value = "weft-system")]
    namespace: String,
    /// Serve the SPIFFE Workload API to the node's enrolled pods on this Unix
    /// socket (relative: under --state-dir); callers are attested by their network
    /// namespace. Unset: not served.
    #[arg(long, env = "WEFT_WORKLOAD_API_SOCKET")]
    workload_api_socket: Option<PathBuf>,
    /// The host's CNI bin directory as mounted in the agent (for the uninstall).
    #[arg(long)]
    cni_bin_dir: Option<PathBuf>,
    /// The host's CNI configuration directory as mounted in the agent.
    #[arg(long)]
    cni_conf_dir: Option<PathBuf>,
    /// On SIGTERM, keep serving until a successor agent on this node is ready, at
    /// most this long, then stop accepting connections (the chart sets 30s, for
    /// upgrades; 0s: stop at once).
    #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
    successor_wait: std::time::Duration,
    /// Then let the connections already open end, at most this long before exiting.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    drain_timeout: std::time::Duration,
    /// SO_MARK of the proxy's own sockets (never captured).
    #[arg(long, default_value_t = 0x5746)]
    proxy_mark: u32,
    /// Service load balancing: least-conn (power of two choices) or round-robin.
    #[arg(long, value_enum, default_value_t = weft_node_dataplane::LbPolicy::LeastConn)]
    lb: weft_node_dataplane::LbPolicy,
    /// Connections the proxy holds at most (more are refused at once) [default: as
    /// many as half the open-file limit allows, at most 100,000].
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    max_connections: Option<u64>,
    /// Plaintext connections from this node's own addresses (the kubelet's health
    /// probes) reach enrolled pods without AuthorizationPolicy or STRICT mTLS, as
    /// in Istio and Cilium. false: they are authorized like any plaintext
    /// connection (probes then need an ALLOW rule for the node's addresses).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    allow_from_node: bool,
    /// Close pooled HBONE connections idle this long.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    hbone_idle_timeout: std::time::Duration,
    /// HBONE: a connection's TLS and HTTP/2 handshakes must be done this long after
    /// it was accepted (or dialled), or it is closed.
    #[arg(long, default_value = "10s", value_parser = parse_timeout)]
    hbone_handshake_timeout: std::time::Duration,
    /// HBONE: close accepted sessions that have had no stream for this long (found
    /// by a sweep every quarter of the shortest idle timeout). Keep it above the
    /// peers' --hbone-idle-timeout.
    #[arg(long, default_value = "2m", value_parser = parse_timeout)]
    hbone_server_idle_timeout: std::time::Duration,
    /// HBONE: connections one source IP may have in their handshake at once; more
    /// are refused at once.
    #[arg(long, default_value_t = weft_node_dataplane::DEFAULT_MAX_HANDSHAKES_PER_SOURCE, value_parser = clap::value_parser!(u32).range(1..))]
    max_handshakes_per_source: u32,
    /// An HTTP/1 request head (on a port parsed at L7) must arrive whole this long
    /// after its first bytes, or the client gets 408 and the connection closes.
    #[arg(long, default_value = "30s", value_parser = parse_timeout)]
    http1_head_timeout: std::time::Duration,
    /// On ports parsed at L7: close a connection that has waited this long for a
    /// request, before its first or between two (found by the same sweep).
    #[arg(long, default_value = "10m", value_parser = parse_timeout)]
    http_idle_timeout: std::time::Duration,
    /// Access log records (per connection and per L7 request, target weft::access).
    #[arg(long, value_enum, default_value_t = Toggle::On, env = "WEFT_ACCESS_LOG")]
    access_log: Toggle,
    /// Access log records per second, per decision (allowed / denied); the rest
    /// are dropped and counted in weft_node_access_log_dropped_total.
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..))]
    access_log_rate: u32,
    /// Give back the code pages startup ran once the agent is ready, then every
    /// interval those mapped since ("off": never); pages map again on use.
    #[arg(long, default_value = "1m", value_parser = parse_interval, env = "WEFT_RELEASE_CODE_PAGES")]
    release_code_pages: Interval,
}

fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => Err("must be more than zero".into()),
        Err(e) => Err(format!("{e} (a duration such as 30s)")),
    }
}

#[derive(Clone, Copy)]
struct Interval(Option<std::time::Duration>);

fn parse_interval(s: &str) -> Result<Interval, String> {
    if s == "off" {
        return Ok(Interval(None));
    }
    match humantime::parse_duration(s) {
        Ok(d) if d >= std::time::Duration::from_secs(1) => Ok(Interval(Some(d))),
        Ok(_) => Err("must be at least 1s, or \"off\"".into()),
        Err(e) => Err(format!("{e} (a duration such as 10m, or \"off\")")),
    }
}

impl RunArgs {
    fn settings(self) -> anyhow::Result<Settings> {
        let capture = if self.capture {
            let cgroup = match self.cgroup {
                Some(c) => c,
                None => weft_node_dataplane::cgroup::cgroup2_root().context("capture")?,
            };
            let bpf_dir = match self.bpf_dir {
                Some(d) => d,
                None => default_bpf_dir().context("capture")?,
            };
            Some(CaptureSettings {
                cgroup,
                bpf_dir,
                cni_socket: self.cni_socket,
                state_dir: self.state_dir,
                discover_pods: self.discover_pods == Toggle::On,
                workload_api_socket: self.workload_api_socket,
                own_namespace: Some(self.namespace.clone()),
                release: self
                    .release_daemonsets
                    .map(|sel| (self.namespace.clone(), sel)),
                cni_dirs: self.cni_bin_dir.zip(self.cni_conf_dir),
                drain: weft_node_dataplane::DrainSettings {
                    successor_wait: self.successor_wait,
                    timeout: self.drain_timeout,
                },
                proxy: ProxyOptions {
                    mark: self.proxy_mark,
                    lb: self.lb,
                    hbone_idle: self.hbone_idle_timeout,
                    hbone_handshake_timeout: self.hbone_handshake_timeout,
                    hbone_server_idle: self.hbone_server_idle_timeout,
                    max_handshakes_per_source: self.max_handshakes_per_source,
                    http1_head_timeout: self.http1_head_timeout,
                    http_idle_timeout: self.http_idle_timeout,
                    max_connections: self.max_connections.unwrap_or_else(default_max_connections),
                    allow_from_node: self.allow_from_node,
                    access_log: AccessLogSettings {
                        enabled: self.access_log == Toggle::On,
                        rate: self.access_log_rate,
                    },
                },
            })
        } else {
            None
        };
        let metrics_addr = match self.metrics_addr.as_str() {
            "off" | "" => None,
            a => Some(a.parse().with_context(|| format!("--metrics-addr {a:?}"))?),
        };
        Ok(Settings {
            node: self.node,
            control_plane: ControlPlaneTarget {
                address: self.control_plane,
                server_name: self.server_name,
                credential_dir: self.credential_dir,
                token_file: self.token_file,
                credential: Default::default(),
                trust: Default::default(),
            },
            admin_addr: self.admin_addr,
            metrics_addr,
            certs: CertManagerSettings::default(),
            capture,
            release_code_pages: self.release_code_pages.0,
        })
    }
}

fn default_bpf_dir() -> std::io::Result<PathBuf> {
    Ok(weft_node_dataplane::cgroup::bpffs()?.join("weft"))
}

// jemalloc returns memory freed after bursts (initial syncs, big config changes) to the
// OS far better than glibc's per-thread arenas.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options (overridable with `_RJEM_MALLOC_CONF`): a background thread
/// returns freed pages after 1 s instead of keeping startup and burst memory; this
/// halves the node agent's idle RSS (see BENCHMARKS.md).
#[allow(unsafe_code)] // exporting the symbol jemalloc reads its options from
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

/// Raises the soft open-file limit to the hard one (a proxied connection holds two
/// descriptors, and the default soft limit is often 1,024); returns the limit.
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard {
                if let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
                    tracing::warn!(soft, hard, error = %e, "cannot raise the open-file limit");
                    return soft;
                }
            }
            hard
        }
        Err(_) => 1024,
    }
}

/// Room for two descriptors per connection, and some for everything else.
fn default_max_connections() -> u64 {
    let limit = raise_open_file_limit();
    (limit.saturating_sub(512) / 2).clamp(64, 100_000)
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    raise_open_file_limit();
    let worker_threads = cli.worker_threads;
    let settings = match cli.command {
        Command::Uninstall { bpf_dir } => {
            let res = bpf_dir
                .map(Ok)
                .unwrap_or_else(default_bpf_dir)
                .map_err(anyhow::Error::from)
                .and_then(|d| {
                    weft_node_dataplane::Capture::uninstall(&d)
                        .map(|_| d)
                        .map_err(anyhow::Error::from)
                });
            return match res {
                Ok(d) => {
                    println!(
                        "removed weft's eBPF programs, links and maps ({})",
                        d.display()
                    );
                    std::process::ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("weft-node: error: {e:#}");
                    std::process::ExitCode::FAILURE
                }
            };
        }
        Command::Run(args) => match args.settings() {
            Ok(s) => s,
            Err(e) => {
                eprintln!("weft-node: error: {e:#}");
                return std::process::ExitCode::FAILURE;
            }
        },
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n.max(1));
    }
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("weft-node: error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let res = rt.block_on(async move {
        let (_, fut) =
            weft_node_dataplane::start(settings, weft_runtime::shutdown_signal()).await?;
        fut.await
    });
    match res {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("weft-node: error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
