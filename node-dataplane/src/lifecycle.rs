//! Whether a stopping agent is being uninstalled, or only restarted or replaced.
//!
//! An agent that stops for an upgrade, a restart or a node drain must leave the
//! node's capture in place (pods stay enrolled, and with no agent their connections
//! are refused: the mesh fails closed). An agent that stops because weft is being
//! uninstalled must remove everything it put on the node. In Kubernetes mode the
//! agent tells the two apart by watching the node DaemonSets of its release (a label
//! selector in its namespace): `helm uninstall` deletes them before their pods are
//! stopped, so when the agent's shutdown signal arrives the watch has already seen
//! that none is left. An upgrade keeps (or replaces) them.

use futures::TryStreamExt;
use k8s_openapi::api::apps::v1::DaemonSet;
use kube::runtime::watcher;
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::sync::watch;

/// The release's node DaemonSets, as the watch last saw them.
#[derive(Clone)]
pub struct ReleaseWatch {
    /// How many exist (not being deleted); `None` until the first complete list.
    live: watch::Receiver<Option<usize>>,
}

impl ReleaseWatch {
    /// Watches the DaemonSets matching `selector` in `namespace`, from now on.
    pub fn start(namespace: String, selector: String) -> Self {
        let (tx, live) = watch::channel(None);
        tokio::spawn(async move {
            loop {
                if let Err(e) = run(&namespace, &selector, &tx).await {
                    tracing::warn!(%namespace, %selector, error = %format!("{e:#}"), "watching the release's node DaemonSets");
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        Self { live }
    }

    /// Whether the release's node DaemonSets are all gone, waiting up to `grace`
    /// for the watch to report it. `false` when the watch never completed a list:
    /// an agent that cannot tell keeps the node's capture (fail closed).
    pub async fn release_gone(&self, grace: Duration) -> bool {
        let mut live = self.live.clone();
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            if *live.borrow_and_update() == Some(0) {
                return true;
            }
            tokio::select! {
                r = live.changed() => if r.is_err() { return false },
                _ = tokio::time::sleep_until(deadline) => return false,
            }
        }
    }
}

async fn run(
    namespace: &str,
    selector: &str,
    tx: &watch::Sender<Option<usize>>,
) -> anyhow::Result<()> {
    let client = weft_runtime::kube_client(None).await?;
    let api: kube::Api<DaemonSet> = kube::Api::namespaced(client, namespace);
    let stream = watcher(api, watcher::Config::default().labels(selector));
    futures::pin_mut!(stream);
    let mut live = BTreeSet::new();
    let mut listing = BTreeSet::new();
    while let Some(event) = stream.try_next().await? {
        let name = |ds: &DaemonSet| ds.metadata.name.clone().unwrap_or_default();
        let deleting = |ds: &DaemonSet| ds.metadata.deletion_timestamp.is_some();
        match event {
            watcher::Event::Init => listing.clear(),
            watcher::Event::InitApply(ds) => {
                if !deleting(&ds) {
                    listing.insert(name(&ds));
                }
            }
            watcher::Event::InitDone => {
                live = std::mem::take(&mut listing);
                tx.send_replace(Some(live.len()));
            }
            watcher::Event::Apply(ds) => {
                if deleting(&ds) {
                    live.remove(&name(&ds));
                } else {
                    live.insert(name(&ds));
                }
                tx.send_replace(Some(live.len()));
            }
            watcher::Event::Delete(ds) => {
                live.remove(&name(&ds));
                tx.send_replace(Some(live.len()));
            }
        }
    }
    Ok(())
}
