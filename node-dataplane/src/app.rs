//! Wires the node agent: config subscription, certificate manager, admin endpoint.

use crate::admin::{self, AdminState};
use crate::certs::{CertManager, CertManagerSettings, CertStore};
use crate::config::ConfigStore;
use crate::control::{channel::ControlPlaneTarget, subscription};
use crate::metrics::Metrics;
use anyhow::Context;
use futures::FutureExt;
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
    /// Also enroll pods the CNI plugin never reported, found by their IP in the
    /// host's /proc (pods that ran before weft, or while the agent was down).
    pub discover_pods: bool,
}

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

    let sub = tokio::spawn(subscription::run_forever(
        s.control_plane.clone(),
        config.clone(),
        metrics.clone(),
    ));
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
        let cfg = config.clone();
        let node = s.node.clone();
        let enrolled: crate::cni::server::EnrolledFn = Arc::new(move |ns: &str, name: &str| {
            cfg.snapshot()
                .workloads
                .values()
                .any(|w| w.enrolled && w.node == node && w.namespace == ns && w.name == name)
        });
        tokio::spawn(crate::cni::server::serve(sock, registry.clone(), enrolled));
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
        let capture = Arc::new(std::sync::Mutex::new(capture));
        let inbound = Arc::new(std::sync::Mutex::new(inbound));
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
        let manager = crate::pods::PodManager {
            proxy,
            config: config.clone(),
            registry,
            capture,
            inbound,
            hint_path: c.cni_socket.parent().map(|d| d.join("enrollment.json")),
            pods: map.clone(),
            ready: ready.clone(),
            discovery: c.discover_pods.then(crate::pods::Discovery::default),
        };
        pod_task = Some(tokio::spawn(manager.run()));
        dataplane_ready = Some(ready);
        pods = Some(map);
    }

    let listener = tokio::net::TcpListener::bind(s.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", s.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let admin_state = AdminState {
        config: config.clone(),
        certs: certs.clone(),
        metrics,
        pods: pods.clone(),
        proxy: proxy_state,
    };
    if let Some(addr) = s.metrics_addr {
        let l = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics address {addr}"))?;
        let r = admin::metrics_router(admin_state.clone());
        tokio::spawn(async move {
            if let Err(e) = axum::serve(l, r).await {
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
    let router = admin::router(admin_state);
    tracing::info!(node = %s.node, control_plane = %s.control_plane.address, admin = %admin_addr, "node agent started");
    let fut = async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("admin server failed");
        sub.abort();
        cm.abort();
        if let Some(t) = pod_task {
            t.abort();
        }
        r
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
