//! Process plumbing shared by weft's binaries: [`logging`] set-up, the shutdown
//! signal, Prometheus text exposition and [`process_metrics`], facts about the
//! host's mounts ([`mountinfo`]), and (feature `kube-client`) a Kubernetes client.

#![forbid(unsafe_code)]

pub mod logging;
pub mod mountinfo;
pub mod process_metrics;

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// Prometheus text exposition of a registry (empty on the impossible format error).
pub fn encode_metrics(registry: &prometheus_client::registry::Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}

/// A Kubernetes client from `kubeconfig`, else the usual inference (KUBECONFIG,
/// ~/.kube/config, in-cluster).
#[cfg(feature = "kube-client")]
pub async fn kube_client(kubeconfig: Option<&std::path::Path>) -> anyhow::Result<kube::Client> {
    use anyhow::Context;
    let config = match kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => kube::Config::infer()
            .await
            .context("no kubeconfig given and no in-cluster configuration found")?,
    };
    kube::Client::try_from(config).context("creating the Kubernetes client")
}
