//! Wires the node agent: config subscription, certificate manager, admin endpoint.

use crate::admin::{self, AdminState};
use crate::certs::{CertManager, CertManagerSettings, CertStore};
use crate::config::ConfigStore;
use crate::control::{channel::ControlPlaneTarget, subscription};
use crate::metrics::Metrics;
use anyhow::Context;
use futures::FutureExt;
use std::net::SocketAddr;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Settings {
    pub node: String,
    pub control_plane: ControlPlaneTarget,
    pub admin_addr: SocketAddr,
    pub certs: CertManagerSettings,
}

pub struct Running {
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub admin_addr: SocketAddr,
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

    let listener = tokio::net::TcpListener::bind(s.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", s.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let router = admin::router(AdminState {
        config: config.clone(),
        certs: certs.clone(),
        metrics,
    });
    tracing::info!(node = %s.node, control_plane = %s.control_plane.address, admin = %admin_addr, "node agent started");
    let fut = async move {
        let r = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown)
            .await
            .context("admin server failed");
        sub.abort();
        cm.abort();
        r
    };
    Ok((
        Running {
            config,
            certs,
            admin_addr,
        },
        fut,
    ))
}
