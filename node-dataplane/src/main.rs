use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use weft_api::logging::{self, LogFormat};
use weft_node::app::{self, CaptureSettings, Settings};
use weft_node::certs::CertManagerSettings;
use weft_node::control::channel::ControlPlaneTarget;

/// weft node agent.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true, env = "WEFT_LOG_FORMAT")]
    log_format: LogFormat,
    /// Runtime worker threads [default: one per CPU].
    #[arg(long, global = true, env = "WEFT_WORKER_THREADS")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Command,
}

// Parsed once at startup; boxing the big variant would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the node agent.
    Run {
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
        #[arg(long, default_value = weft_node::cni::plugin::DEFAULT_SOCKET)]
        cni_socket: PathBuf,
        /// Agent state directory (pod registry).
        #[arg(long, default_value = "/var/run/weft")]
        state_dir: PathBuf,
        /// SO_MARK of the proxy's own sockets (never captured).
        #[arg(long, default_value_t = 0x5746)]
        proxy_mark: u32,
        /// Service load balancing: least-conn (power of two choices) or round-robin.
        #[arg(long, value_enum, default_value_t = weft_node::proxy::lb::LbPolicy::LeastConn)]
        lb: weft_node::proxy::lb::LbPolicy,
        /// Close pooled HBONE connections idle this long.
        #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
        hbone_idle_timeout: std::time::Duration,
    },
    /// Remove every eBPF program, link, pin and map weft installed.
    Uninstall {
        /// bpffs directory of weft's pins [default: <bpffs>/weft].
        #[arg(long)]
        bpf_dir: Option<PathBuf>,
    },
}

fn default_bpf_dir() -> std::io::Result<PathBuf> {
    Ok(weft_node::ebpf::cgroup::bpffs()?.join("weft"))
}

// jemalloc returns memory freed after bursts (initial syncs, big config changes) to the
// OS far better than glibc's per-thread arenas.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc options (overridable with `_RJEM_MALLOC_CONF`): a background thread
/// returns freed pages after 1 s instead of keeping startup and burst memory; this
/// halves the node agent's idle RSS (see BENCHMARKS.md).
#[export_name = "_rjem_malloc_conf"]
pub static MALLOC_CONF: &[u8; 60] =
    b"background_thread:true,dirty_decay_ms:1000,muzzy_decay_ms:0\0";

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let worker_threads = cli.worker_threads;
    let (
        node,
        control_plane,
        server_name,
        credential_dir,
        token_file,
        admin_addr,
        metrics_addr,
        capture,
    ) = match cli.command {
        Command::Uninstall { bpf_dir } => {
            let res = bpf_dir
                .map(Ok)
                .unwrap_or_else(default_bpf_dir)
                .map_err(anyhow::Error::from)
                .and_then(|d| {
                    weft_node::ebpf::Capture::uninstall(&d)
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
        Command::Run {
            node,
            control_plane,
            server_name,
            credential_dir,
            token_file,
            admin_addr,
            metrics_addr,
            capture,
            cgroup,
            bpf_dir,
            cni_socket,
            state_dir,
            proxy_mark,
            lb,
            hbone_idle_timeout,
        } => {
            let capture = if capture {
                let resolved = cgroup
                    .map(Ok)
                    .unwrap_or_else(weft_node::ebpf::cgroup::cgroup2_root)
                    .and_then(|c| Ok((c, bpf_dir.map(Ok).unwrap_or_else(default_bpf_dir)?)));
                match resolved {
                    Ok((cgroup, bpf_dir)) => Some(CaptureSettings {
                        cgroup,
                        bpf_dir,
                        cni_socket,
                        state_dir,
                        mark: proxy_mark,
                        lb,
                        hbone_idle_timeout,
                    }),
                    Err(e) => {
                        eprintln!("weft-node: error: capture: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                }
            } else {
                None
            };
            let metrics_addr = match metrics_addr.as_str() {
                "off" | "" => None,
                a => match a.parse() {
                    Ok(a) => Some(a),
                    Err(e) => {
                        eprintln!("weft-node: error: --metrics-addr {a:?}: {e}");
                        return std::process::ExitCode::FAILURE;
                    }
                },
            };
            (
                node,
                control_plane,
                server_name,
                credential_dir,
                token_file,
                admin_addr,
                metrics_addr,
                capture,
            )
        }
    };
    let settings = Settings {
        node,
        control_plane: ControlPlaneTarget {
            address: control_plane,
            server_name,
            credential_dir,
            token_file,
        },
        admin_addr,
        metrics_addr,
        certs: CertManagerSettings::default(),
        capture,
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
        let (_, fut) = app::start(settings, weft_api::runtime::shutdown_signal()).await?;
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
