//! Wires the node agent: config subscription, certificate manager, admin endpoint.

use crate::admin::{self, AdminState};
use crate::certs::{CertManager, CertManagerSettings, CertStore};
use crate::config::ConfigStore;
use crate::control::{channel::ControlPlaneTarget, subscription};
use crate::metrics::Metrics;
use anyhow::Context;
use futures::FutureExt;
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub control_plane: ControlPlaneTarget,
    pub admin_addr: SocketAddr,
    /// Prometheus scrape address (only /metrics); `None` disables it.
    pub metrics_addr: Option<SocketAddr>,
    pub certs: CertManagerSettings,
    /// Transparent capture (eBPF + CNI); `None` runs config and certificates only.
    pub capture: Option<CaptureSettings>,
    /// How often to give back code pages not run since the last time (see
    /// [`crate::memory`]); the first time is once the agent is ready. `None`: never.
    pub release_code_pages: Option<std::time::Duration>,
}

#[derive(Debug, Clone)]
pub struct CaptureSettings {
    /// cgroup the programs attach to (the cgroup2 root on a real node).
    pub cgroup: PathBuf,
    /// bpffs directory for weft's pins.
    pub bpf_dir: PathBuf,
    /// The CNI plugin's socket; `enrollment.json` is written next to it.
    pub cni_socket: PathBuf,
    /// Agent state (the pod registry survives restarts here).
    pub state_dir: PathBuf,
    /// The proxy's tunables (SO_MARK, load balancing, pool idle time, access log).
    pub proxy: crate::proxy::state::ProxyOptions,
    /// What the agent does between its shutdown signal and its exit.
    pub drain: DrainSettings,
    /// Kubernetes mode: the agent's namespace and a label selector of its release's
    /// node DaemonSets. When none is left at shutdown, weft is being uninstalled and
    /// the agent removes what it put on the node ([`crate::lifecycle`]).
    pub release: Option<(String, String)>,
    /// The agent's own namespace: its pods start without waiting for the control
    /// plane (weft's own components are never in the mesh).
    pub own_namespace: Option<String>,
    /// The CNI bin and configuration directories as mounted in the agent, for the
    /// uninstall to take weft-cni out of them.
    pub cni_dirs: Option<(PathBuf, PathBuf)>,
    /// Also enroll pods the CNI plugin never reported, found by their IP in the
    /// host's /proc (pods that ran before weft, or while the agent was down).
    pub discover_pods: bool,
    /// Where to serve the SPIFFE Workload API to the node's enrolled pods (relative:
    /// under `state_dir`); `None`: not served.
    pub workload_api_socket: Option<PathBuf>,
}

/// How the agent hands its pods over to a successor when it is told to stop
/// (docs/operations.md, "Upgrades"): it keeps serving until a successor agent is
/// ready (at most `successor_wait`), then closes its listeners (queued connections
/// move to the successor's) and lets the connections it holds end (at most
/// `timeout`). The pods stay enrolled and the eBPF programs attached throughout.
#[derive(Debug, Clone, Copy)]
pub struct DrainSettings {
    pub successor_wait: std::time::Duration,
    pub timeout: std::time::Duration,
}

/// How long a stopping agent waits for the watch of its release to report that the
/// node DaemonSets are gone (they are deleted before their pods are stopped).
const RELEASE_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// The file a ready agent writes its PID to (in its state directory), so the agent
/// it succeeds knows it can stop accepting connections.
const READY_FILE: &str = "agent.ready";

pub struct Running {
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub admin_addr: SocketAddr,
    pub pods: Option<
        Arc<std::sync::Mutex<std::collections::BTreeMap<String, crate::pods::PodDataplane>>>,
    >,
}

pub async fn start(
    s: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    Running,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let config = ConfigStore::new(&s.node);
    let certs = Arc::new(CertStore::default());
    let metrics = Arc::new(Metrics::new());

    // The node tells the control plane which bundle it uses and whether its
    // certificates are signed by the CA in force (a CA rotation waits for it).
    let report = {
        let (config, certs, target) = (config.clone(), certs.clone(), s.control_plane.clone());
        let computer = crate::certs::StatusComputer::default();
        let standalone = target.token_file.is_none();
        let changes = certs.watch();
        subscription::StatusReport {
            compute: Arc::new(move || {
                let credential = standalone
                    .then(|| target.node_identity().ok().map(|id| id.cert_pem))
                    .flatten();
                computer.compute(&config, &certs, credential)
            }),
            changes,
        }
    };
    let sub = tokio::spawn(subscription::run_forever(
        s.control_plane.clone(),
        config.clone(),
        metrics.clone(),
        Some(report),
    ));
    // Standalone: the node's own credential is renewed before it expires.
    if s.control_plane.token_file.is_none() {
        tokio::spawn(crate::control::renewal::renew_forever(
            s.control_plane.clone(),
            metrics.clone(),
        ));
    }
    let target = s.control_plane.clone();
    let manager = CertManager {
        settings: s.certs.clone(),
        config: config.clone(),
        certs: certs.clone(),
        metrics: metrics.clone(),
        connect: Arc::new(move || {
            let t = target.clone();
            async move { t.connect().await }.boxed()
        }),
    };
    let cm = tokio::spawn(manager.run());

    let mut dataplane_ready = None;
    let mut pods = None;
    let mut proxy_state = None;
    let mut pod_task = None;
    let mut release_watch = None;
    let mut manager_for_shutdown = None;
    if let Some(c) = &s.capture {
        let capture = crate::ebpf::Capture::install(crate::ebpf::CaptureOptions {
            cgroup: c.cgroup.clone(),
            pin_dir: c.bpf_dir.clone(),
            proxy_mark: c.proxy.mark,
            outbound_port: crate::proxy::ports::OUTBOUND_PORT,
        })
        .context("installing the eBPF capture programs")?;
        let inbound = crate::ebpf::Inbound::load(&c.bpf_dir)
            .context("loading the inbound capture program")?;
        std::fs::create_dir_all(&c.state_dir)
            .with_context(|| format!("creating {}", c.state_dir.display()))?;
        let registry = Arc::new(crate::cni::registry::PodRegistry::load(Some(
            c.state_dir.join("pods.json"),
        )));
        let sock = crate::cni::server::bind(&c.cni_socket)
            .with_context(|| format!("binding the CNI socket {}", c.cni_socket.display()))?;
        let ready = Arc::new(AtomicBool::new(false));
        let map = Arc::new(std::sync::Mutex::new(std::collections::BTreeMap::new()));
        let proxy = crate::proxy::state::ProxyState::new(
            config.clone(),
            certs.clone(),
            metrics.clone(),
            c.proxy,
            Some(plugin_registry(&s.control_plane, &c.state_dir, &config)?),
        );
        proxy_state = Some(proxy.clone());
        tokio::spawn(proxy.clone().recheck_forever());
        tokio::spawn(proxy.clone().reap_forever());
        tokio::spawn(proxy.node_addresses.clone().refresh_forever());
        let capture = Arc::new(std::sync::Mutex::new(capture));
        let inbound = Arc::new(std::sync::Mutex::new(inbound));
        release_watch = c
            .release
            .clone()
            .map(|(ns, selector)| crate::lifecycle::ReleaseWatch::start(ns, selector));
        let mut scraped: Vec<Arc<dyn crate::metrics::scrape::Scrape>> = vec![
            Arc::new(crate::pods::PodMetrics {
                config: config.clone(),
                pods: map.clone(),
            }),
            Arc::new(crate::ebpf::metrics::CaptureMetrics {
                capture: capture.clone(),
                inbound: inbound.clone(),
            }),
        ];
        if let Some(p) = &proxy.plugins {
            scraped.push(p.clone());
        }
        metrics.scrape.attach(scraped);
        let hint_path = c.cni_socket.parent().map(|d| d.join("enrollment.json"));
        let manager = crate::pods::PodManager {
            proxy,
            config: config.clone(),
            registry,
            capture,
            inbound,
            hint_path: hint_path.clone(),
            pods: map.clone(),
            ready: ready.clone(),
            discovery: c.discover_pods.then(crate::pods::Discovery::default),
            own_namespace: c.own_namespace.clone(),
            hint: std::sync::Mutex::new(crate::pods::PodManager::load_hint(hint_path.as_deref())),
            changed: tokio::sync::watch::channel(0).0,
        };
        let manager = Arc::new(manager);
        tokio::spawn(crate::cni::server::serve(
            sock,
            manager.registry.clone(),
            manager.clone(),
            crate::cni::server::ADD_WAIT,
        ));
        manager_for_shutdown = Some(manager.clone());
        pod_task = Some(tokio::spawn(manager.run()));
        if let Some(path) = &c.workload_api_socket {
            let path = c.state_dir.join(path);
            let listener = crate::workload_api::bind(&path)
                .with_context(|| format!("binding the Workload API socket {}", path.display()))?;
            let provider = crate::workload_api::agent::AgentProvider::start(
                map.clone(),
                config.clone(),
                certs.clone(),
                s.control_plane.clone(),
            );
            tracing::info!(socket = %path.display(), "serving the SPIFFE Workload API");
            tokio::spawn(async move {
                let served =
                    crate::workload_api::serve(listener, provider, std::future::pending()).await;
                if let Err(e) = served {
                    tracing::error!(error = %e, "the Workload API server failed");
                }
            });
        }
        dataplane_ready = Some(ready);
        pods = Some(map);
    }
    let pods_for_drain = pods.clone();

    let listener = bind_shared(s.admin_addr)
        .with_context(|| format!("binding the admin address {}", s.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let admin_state = AdminState {
        config: config.clone(),
        certs: certs.clone(),
        metrics,
        pods: pods.clone(),
        proxy: proxy_state.clone(),
    };
    // Both HTTP servers stop when the agent starts to drain: a successor binds the
    // same ports, and its probes must reach it.
    let stop_http = tokio_util::sync::CancellationToken::new();
    if let Some(addr) = s.metrics_addr {
        let l = bind_shared(addr).with_context(|| format!("binding the metrics address {addr}"))?;
        let r = admin::metrics_router(admin_state.clone());
        let stop = stop_http.clone();
        tokio::spawn(async move {
            let served = axum::serve(l, r)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
    }
    if let Some(every) = s.release_code_pages {
        tokio::spawn(release_code_pages(
            every,
            config.clone(),
            dataplane_ready.clone(),
        ));
    }
    if let (Some(c), Some(ready)) = (&s.capture, &dataplane_ready) {
        tokio::spawn(announce_ready(c.state_dir.join(READY_FILE), ready.clone()));
    }
    let router = admin::router(admin_state);
    tracing::info!(node = %s.node, control_plane = %s.control_plane.address, admin = %admin_addr, "node agent started");
    let admin = tokio::spawn(
        axum::serve(listener, router)
            .with_graceful_shutdown(stop_http.clone().cancelled_owned())
            .into_future(),
    );
    let capture = s.capture.clone();
    let fut = async move {
        tokio::select! {
            _ = shutdown => {}
            r = admin => {
                sub.abort();
                cm.abort();
                return match r {
                    Ok(r) => r.context("admin server failed"),
                    Err(e) => Err(anyhow::anyhow!("admin server task: {e}")),
                };
            }
        }
        stop_http.cancel();
        if let Some(t) = pod_task {
            t.abort();
        }
        if let (Some(c), Some(pods), Some(proxy), Some(manager)) =
            (capture, pods_for_drain, proxy_state, manager_for_shutdown)
        {
            let uninstalling = match &release_watch {
                Some(w) => w.release_gone(RELEASE_GRACE).await,
                None => false,
            };
            if uninstalling {
                uninstall_node(&c, &pods, &proxy, &manager).await;
            } else {
                drain(&c, &pods, &proxy).await;
            }
        }
        sub.abort();
        cm.abort();
        Ok(())
    };
    Ok((
        Running {
            config,
            certs,
            admin_addr,
            pods,
        },
        fut,
    ))
}

/// The Wasm plugin registry: modules fetched from the control plane over the node's
/// own authenticated channel, cached under `<state-dir>/wasm`.
fn plugin_registry(
    target: &ControlPlaneTarget,
    state_dir: &std::path::Path,
    config: &Arc<ConfigStore>,
) -> anyhow::Result<Arc<crate::wasm::registry::PluginRegistry>> {
    let target = target.clone();
    let fetch: crate::wasm::registry::FetchFn = Arc::new(move |sha: String| {
        let t = target.clone();
        async move {
            let ch = t.connect().await?;
            let mut client = weft_proto::pb::modules_client::ModulesClient::new(ch)
                .max_decoding_message_size(64 << 20);
            let r = client
                .fetch(weft_proto::pb::FetchModuleRequest { sha256: sha })
                .await?;
            Ok(r.into_inner().module)
        }
        .boxed()
    });
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let reg =
        crate::wasm::registry::PluginRegistry::new(workers, Some(state_dir.join("wasm")), fetch);
    tokio::spawn(reg.clone().run(config.clone()));
    Ok(reg)
}

/// Once the agent is ready (first config applied, capture set up) and has settled,
/// gives back its code pages, then again every `every` (see [`crate::memory`]).
async fn release_code_pages(
    every: std::time::Duration,
    config: Arc<ConfigStore>,
    dataplane_ready: Option<Arc<AtomicBool>>,
) {
    let mut versions = config.watch();
    while !config.snapshot().synced {
        if versions.changed().await.is_err() {
            return;
        }
    }
    if let Some(r) = dataplane_ready {
        while !r.load(std::sync::atomic::Ordering::Acquire) {
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
    // Let the startup work that follows readiness (SVIDs, pod set-up) finish.
    tokio::time::sleep(STARTUP_SETTLE).await;
    crate::memory::release_code_pages_every(every).await;
}

const STARTUP_SETTLE: std::time::Duration = std::time::Duration::from_secs(3);

/// A TCP listener that a successor agent may bind too (see
/// [`crate::netns::shared_listener`]).
fn bind_shared(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::from_std(crate::netns::shared_listener(addr)?)
}

/// Once the pods are captured, writes this agent's PID to `path` (see
/// [`DrainSettings`]).
async fn announce_ready(path: std::path::PathBuf, ready: Arc<AtomicBool>) {
    while !ready.load(std::sync::atomic::Ordering::Acquire) {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let tmp = path.with_extension("tmp");
    let written = std::fs::write(&tmp, std::process::id().to_string())
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = written {
        tracing::warn!(path = %path.display(), error = %e, "cannot announce readiness to a draining agent");
    }
}

/// Whether another live agent announced it is ready in `path`.
fn successor_ready(path: &std::path::Path) -> bool {
    let Ok(text) = std::fs::read_to_string(path) else {
        return false;
    };
    match text.trim().parse::<u32>() {
        Ok(pid) => {
            pid != std::process::id() && std::path::Path::new(&format!("/proc/{pid}")).exists()
        }
        Err(_) => false,
    }
}

/// Hands the node's pods over to a successor (see [`DrainSettings`]).
async fn drain(
    c: &CaptureSettings,
    pods: &crate::pods::PodMap,
    proxy: &Arc<crate::proxy::state::ProxyState>,
) {
    let d = c.drain;
    let ready_file = c.state_dir.join(READY_FILE);
    let started = std::time::Instant::now();
    tracing::info!(successor_wait = ?d.successor_wait, timeout = ?d.timeout, "draining: serving until a successor agent is ready");
    while !successor_ready(&ready_file) && started.elapsed() < d.successor_wait {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let handed_over = successor_ready(&ready_file);
    for p in pods.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
        p.close_listeners();
    }
    proxy.draining.cancel();
    let open = || {
        proxy
            .counters
            .open
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    tracing::info!(successor = handed_over, open = open(), waited = ?started.elapsed(), "draining: listeners closed; waiting for open connections to end");
    let deadline = std::time::Instant::now() + d.timeout;
    while open() > 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    tracing::info!(open = open(), took = ?started.elapsed(), "drained");
}

/// weft is being uninstalled: stops serving, lets open connections end (they could
/// not go on once capture is gone), un-enrolls every pod, removes the eBPF programs,
/// links and pins, takes weft-cni out of the node's CNI chain and removes the
/// agent's state. The pods keep running and reach each other in plaintext.
async fn uninstall_node(
    c: &CaptureSettings,
    pods: &crate::pods::PodMap,
    proxy: &Arc<crate::proxy::state::ProxyState>,
    manager: &crate::pods::PodManager,
) {
    tracing::info!("the release's node DaemonSets are gone: uninstalling weft from this node");
    for p in pods.lock().unwrap_or_else(|p| p.into_inner()).values_mut() {
        p.close_listeners();
    }
    proxy.draining.cancel();
    let deadline = std::time::Instant::now() + c.drain.timeout;
    while proxy
        .counters
        .open
        .load(std::sync::atomic::Ordering::Relaxed)
        > 0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    manager.teardown_all();
    if let Err(e) = crate::ebpf::Capture::uninstall(&c.bpf_dir) {
        tracing::error!(pins = %c.bpf_dir.display(), error = %e, "cannot remove the eBPF programs");
    }
    if let Some((bin, conf)) = &c.cni_dirs {
        match crate::cni::install::uninstall(bin, conf) {
            Ok(changed) => {
                tracing::info!(conflists = ?changed, "weft-cni taken out of the CNI chain")
            }
            Err(e) => tracing::error!(error = %e, "cannot take weft-cni out of the CNI chain"),
        }
    }
    for f in ["pods.json", "enrollment.json", READY_FILE] {
        let _ = std::fs::remove_file(c.state_dir.join(f));
    }
    let _ = std::fs::remove_file(&c.cni_socket);
    if let Some(dir) = c.cni_socket.parent() {
        let _ = std::fs::remove_file(dir.join("enrollment.json"));
    }
    let _ = std::fs::remove_dir_all(c.state_dir.join("wasm"));
    if let Some(sock) = &c.workload_api_socket {
        // The Workload API socket, and its directory when nothing else is in it
        // (pods may still have it mounted: they see an empty directory).
        let sock = c.state_dir.join(sock);
        let _ = std::fs::remove_file(&sock);
        if let Some(dir) = sock.parent().filter(|d| *d != c.state_dir) {
            let _ = std::fs::remove_dir(dir);
        }
    }
    let _ = std::fs::remove_dir(&c.state_dir);
    tracing::info!("weft removed from this node");
}
