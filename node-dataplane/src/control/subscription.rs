//! The config subscription: reconnects with backoff and jitter, tells the control
//! plane what it already holds (so it resumes without losing or repeating updates),
//! applies updates, and ACKs or NACKs each one. While disconnected the node keeps
//! serving its last good config (fail-static).

use super::backoff::Backoff;
use super::channel::ControlPlaneTarget;
use crate::config::ConfigStore;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use weft_proto::pb::{self, node_config_client::NodeConfigClient, subscribe_request::Kind as Req};

/// How the node tells the control plane what it holds ([`pb::NodeStatus`]): `compute`
/// builds the report; it is sent when it differs from the last one sent, checked
/// after each update, whenever `changes` fires, and every [`STATUS_CHECK`].
#[derive(Clone)]
pub struct StatusReport {
    pub compute: Arc<dyn Fn() -> pb::NodeStatus + Send + Sync>,
    pub changes: tokio::sync::watch::Receiver<u64>,
}

pub const STATUS_CHECK: Duration = Duration::from_secs(2);

pub async fn run_forever(
    target: ControlPlaneTarget,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
    report: Option<StatusReport>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let started = std::time::Instant::now();
        match subscribe_once(&target, &store, &metrics, report.clone()).await {
            Ok(()) => tracing::warn!("control plane closed the config stream; reconnecting"),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "config stream failed; serving the last good config")
            }
        }
        metrics.control_plane_connected.set(0);
        if started.elapsed() > Duration::from_secs(30) {
            backoff.reset();
        }
        tokio::time::sleep(backoff.next_delay()).await;
    }
}

async fn subscribe_once(
    target: &ControlPlaneTarget,
    store: &Arc<ConfigStore>,
    metrics: &Metrics,
    mut report: Option<StatusReport>,
) -> anyhow::Result<()> {
    let channel = target.connect().await?;
    let mut client = NodeConfigClient::new(channel).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(16);
    let hello = pb::SubscribeRequest {
        kind: Some(Req::Hello(pb::Hello {
            node: store.node().to_string(),
            known_versions: store.known_versions(),
        })),
    };
    tx.send(hello).await?;
    let mut updates = client
        .subscribe(ReceiverStream::new(rx))
        .await?
        .into_inner();
    metrics.control_plane_connected.set(1);
    tracing::info!(address = %target.address, "subscribed to the control plane");
    let mut last_status: Option<pb::NodeStatus> = None;
    loop {
        let update = tokio::select! {
            u = updates.next() => match u {
                Some(u) => u?,
                None => break,
            },
            _ = status_due(&mut report) => {
                if !send_status(&tx, report.as_ref(), &mut last_status).await {
                    break;
                }
                continue;
            }
        };
        let rejected = store.apply(&update);
        metrics.config_updates.inc();
        follow_trust(target, store);
        let reply = if rejected.is_empty() {
            Req::Ack(pb::Ack {
                nonce: update.nonce.clone(),
            })
        } else {
            metrics.nacks.inc();
            let reason = rejected
                .iter()
                .map(|(k, why)| format!("{k}: {why}"))
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(%reason, "rejected part of a config update");
            Req::Nack(pb::Nack {
                nonce: update.nonce.clone(),
                reason,
                rejected_keys: rejected.into_iter().map(|(k, _)| k).collect(),
            })
        };
        tracing::debug!(
            sequence = update.sequence,
            upserts = update.upserts.len(),
            removals = update.removals.len(),
            "applied config update"
        );
        if tx
            .send(pb::SubscribeRequest { kind: Some(reply) })
            .await
            .is_err()
        {
            break;
        }
        if !send_status(&tx, report.as_ref(), &mut last_status).await {
            break;
        }
    }
    Ok(())
}

/// Completes when the status should be checked again (never without a reporter).
async fn status_due(report: &mut Option<StatusReport>) {
    match report {
        Some(r) => {
            tokio::select! {
                _ = r.changes.changed() => {}
                _ = tokio::time::sleep(STATUS_CHECK) => {}
            }
        }
        None => std::future::pending().await,
    }
}

/// Sends the node's status when it changed; false when the stream is gone.
async fn send_status(
    tx: &mpsc::Sender<pb::SubscribeRequest>,
    report: Option<&StatusReport>,
    last: &mut Option<pb::NodeStatus>,
) -> bool {
    let Some(r) = report else {
        return true;
    };
    let now = (r.compute)();
    if last.as_ref() == Some(&now) {
        return true;
    }
    *last = Some(now.clone());
    tx.send(pb::SubscribeRequest {
        kind: Some(Req::Status(now)),
    })
    .await
    .is_ok()
}

/// Takes the trust bundle just received as trusted for the control plane too and,
/// standalone, writes it to `ca.crt` so that a restarted agent trusts a rotated CA.
fn follow_trust(target: &ControlPlaneTarget, store: &ConfigStore) {
    let Some(bundle) = store.trust() else {
        return;
    };
    if !target.trust.set(bundle.clone()) || target.token_file.is_some() {
        return;
    }
    let path = target.credential_dir.join("ca.crt");
    if std::fs::read_to_string(&path).is_ok_and(|old| old == bundle.roots_pem) {
        return;
    }
    match crate::control::credential::replace_file(&path, &bundle.roots_pem) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "wrote the trust bundle the control plane sent")
        }
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the trust bundle; a restarted agent trusts the old one")
        }
    }
}
