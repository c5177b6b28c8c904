//! `weft-kube-cluster`: a real Kubernetes cluster on this machine (the e2e
//! harness `weft_e2e::kubecluster`), kept running for manual work.
//!
//!   weft-kube-cluster up [--nodes N] [--background] [--no-weft]
//!                                                     start, with weft installed by Helm;
//!                                                     Ctrl-C (or `down`) tears down
//!   weft-kube-cluster down                            stop a running cluster, clean the host
//!   weft-kube-cluster status                          is one running, is anything left over
//!
//! `make cluster-up` / `make cluster-down` run `up --background` and `down`.

#![deny(unsafe_code)]

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use weft_e2e::kubecluster::{self, KubeCluster, Options};

#[derive(Parser)]
#[command(about = "A real Kubernetes v1.20 cluster on this machine for weft")]
struct Args {
    /// The cluster's state directory.
    #[arg(long, env = "WEFT_KUBE_DIR", default_value = kubecluster::DEFAULT_DIR)]
    dir: PathBuf,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a cluster and keep it until Ctrl-C, SIGTERM or `down`.
    Up {
        #[arg(long, default_value_t = 2)]
        nodes: usize,
        /// Do not import target/images/weft-*.oci.tar.
        #[arg(long)]
        no_weft_images: bool,
        /// Do not install weft (its chart, with real Helm and the local images).
        #[arg(long)]
        no_weft: bool,
        /// Return once the cluster is ready, leaving it running in the background
        /// (its output goes to <dir>.log).
        #[arg(long)]
        background: bool,
    },
    /// Stop the running cluster (by the PID it recorded) and clean the host.
    Down,
    /// Whether a cluster runs, and what is left on the host.
    Status,
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn pid_file(dir: &Path) -> PathBuf {
    // Outside the state directory, which a start empties.
    PathBuf::from(format!("{}.pid", dir.display()))
}

fn log_file(dir: &Path) -> PathBuf {
    PathBuf::from(format!("{}.log", dir.display()))
}

/// The PID of a running `weft-kube-cluster up`, from its PID file.
fn running(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pid_file(dir))
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    String::from_utf8_lossy(&cmd)
        .contains("weft-kube-cluster")
        .then_some(pid)
}

fn usage(c: &KubeCluster) -> String {
    format!(
        "Kubernetes v1.20.2 with {} node(s) is up ({:.1} s).\n\
         \n  export KUBECONFIG={}\n  alias kubectl={}\n  kubectl get nodes -o wide\n\
         \nImages (imagePullPolicy: Never): {} (busybox + weft-testapp){}\n\
         Stop it with: make cluster-down (or weft-kube-cluster down)\n",
        c.nodes.len(),
        c.startup.as_secs_f64(),
        c.kubeconfig().display(),
        c.bins.join("kubectl").display(),
        kubecluster::APP_IMAGE,
        if Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/images")
            .is_dir()
        {
            ", and weft's images from target/images"
        } else {
            ""
        }
    )
}

fn up(
    dir: &Path,
    nodes: usize,
    weft_images: bool,
    weft: bool,
    background: bool,
) -> anyhow::Result<()> {
    if let Some(pid) = running(dir) {
        bail!("a cluster is already running (weft-kube-cluster up, PID {pid}); stop it with `weft-kube-cluster down`");
    }
    if background {
        return up_in_background(dir, nodes, weft_images, weft);
    }
    let weft_images = weft_images || weft;
    if weft {
        weft_e2e::kubeweft::prepare_images().context("building weft's images")?;
    }
    // SIGINT/SIGTERM set a flag; the cluster is torn down below, not by the signal.
    // SAFETY: the handler only stores to an atomic.
    #[allow(unsafe_code)]
    unsafe {
        let h = nix::sys::signal::SigHandler::Handler(on_signal);
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGINT, h)?;
        nix::sys::signal::signal(nix::sys::signal::Signal::SIGTERM, h)?;
    }
    let mut c = KubeCluster::start_with(Options {
        nodes,
        dir: dir.to_path_buf(),
        weft_images,
    })?;
    std::fs::write(pid_file(dir), std::process::id().to_string())?;
    if weft {
        if let Err(e) = install_weft(&c) {
            let _ = c.teardown();
            let _ = std::fs::remove_file(pid_file(dir));
            return Err(e);
        }
    }
    std::fs::write(dir.join("ready"), "")?;
    print!("{}", usage(&c));
    if weft {
        print!("{}", weft_usage(&c));
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("weft-kube-cluster: tearing down");
    let r = c.teardown();
    let _ = std::fs::remove_file(pid_file(dir));
    r?;
    eprintln!("weft-kube-cluster: the host is clean");
    Ok(())
}

/// Installs weft's chart with real Helm and waits until it is Ready.
fn install_weft(c: &KubeCluster) -> anyhow::Result<()> {
    let t = Instant::now();
    let helm = weft_e2e::kubeweft::helm(c)?;
    let values = weft_e2e::kubeweft::values()?;
    let leader = weft_e2e::kubeweft::install(c, &helm, &values, "--capture");
    eprintln!(
        "weft installed and Ready in {:.1} s (leader {leader})",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

fn weft_usage(c: &KubeCluster) -> String {
    let weftctl = weft_e2e::bin_path("weftctl")
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| "weftctl".into());
    let app = kubecluster::APP_IMAGE;
    let kc = c.kubeconfig().display().to_string();
    let lines = [
        String::new(),
        "weft is installed (Helm release `weft` in weft-system, chart charts/weft):".into(),
        String::new(),
        "  kubectl -n weft-system get pods -o wide".into(),
        format!("  {weftctl} check --kubeconfig {kc}"),
        "  kubectl create namespace demo && kubectl label namespace demo weft.dev/mesh=enabled"
            .into(),
        format!(
            "  kubectl -n demo create deployment echo --image={app} -- weft-testapp http --listen 0.0.0.0:8080"
        ),
        "  kubectl -n demo expose deployment echo --port 80 --target-port 8080".into(),
        format!("  kubectl -n demo run client --image={app} --image-pull-policy=Never -- sleep 36000"),
        "  kubectl -n demo exec client -- wget -qO- http://echo.demo/hello".into(),
        String::new(),
        "There is no registry: the images are imported on every node (pull policies".into(),
        "IfNotPresent and Never both work). Each agent's admin endpoint is 127.0.0.1:15000".into(),
        "in its node's network namespace:".into(),
        "  nsenter --net=/run/netns/weft-kube-node-1 curl -s 127.0.0.1:15000/config_dump".into(),
        String::new(),
    ];
    lines.join("\n")
}

fn up_in_background(dir: &Path, nodes: usize, weft_images: bool, weft: bool) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    let log = log_file(dir);
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("--dir")
        .arg(dir)
        .args(["up", "--nodes", &nodes.to_string()]);
    if !weft_images {
        cmd.arg("--no-weft-images");
    }
    if !weft {
        cmd.arg("--no-weft");
    }
    // SAFETY: setsid is async-signal-safe; the child leaves the caller's session so
    // that the terminal's Ctrl-C does not reach it.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting weft-kube-cluster up in the background")?;
    eprintln!(
        "weft-kube-cluster: starting in the background (log: {})",
        log.display()
    );
    let end = Instant::now() + Duration::from_secs(3600);
    loop {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the cluster failed to start ({status}); its log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if dir.join("ready").exists() && running(dir) == Some(child.id() as i32) {
            break;
        }
        if Instant::now() > end {
            bail!(
                "the cluster did not start within an hour; see {}",
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    print!("{}", std::fs::read_to_string(&log).unwrap_or_default());
    Ok(())
}

fn down(dir: &Path) -> anyhow::Result<()> {
    if let Some(pid) = running(dir) {
        eprintln!("weft-kube-cluster: stopping the cluster (PID {pid})");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        )?;
        let end = Instant::now() + Duration::from_secs(180);
        while Path::new(&format!("/proc/{pid}")).exists() && running(dir).is_some() {
            if Instant::now() > end {
                bail!("weft-kube-cluster up (PID {pid}) did not stop within 180 s");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _ = std::fs::remove_file(pid_file(dir));
    kubecluster::clean_host_locked(dir)?;
    eprintln!("weft-kube-cluster: the host is clean");
    Ok(())
}

fn status(dir: &Path) -> anyhow::Result<()> {
    match running(dir) {
        Some(pid) => println!(
            "running (PID {pid}); KUBECONFIG={}",
            dir.join("admin.kubeconfig").display()
        ),
        None => {
            let left = kubecluster::host::leftovers(dir, None);
            if left.is_empty() {
                println!("not running; nothing left on the host");
            } else {
                println!(
                    "not running; left on the host (weft-kube-cluster down cleans it):\n  {}",
                    left.join("\n  ")
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::Up {
            nodes,
            no_weft_images,
            no_weft,
            background,
        } => up(&args.dir, nodes, !no_weft_images, !no_weft, background),
        Cmd::Down => down(&args.dir),
        Cmd::Status => status(&args.dir),
    };
    if let Err(e) = r {
        eprintln!("weft-kube-cluster: {e:#}");
        std::process::exit(1);
    }
}
