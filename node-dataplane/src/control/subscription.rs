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
use weft_proto::pb::{self, node_config_client::NodeConfigClient, subscribe_request::Kind as Req};

pub async fn run_forever(
    target: ControlPlaneTarget,
    store: Arc<ConfigStore>,
    metrics: Arc<Metrics>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
    loop {
        let started = std::time::Instant::now();
        match subscribe_once(&target, &store, &metrics).await {
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
    while let Some(update) = updates.message().await? {
        let rejected = store.apply(&update);
        metrics.config_updates.inc();
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
    }
    Ok(())
}
