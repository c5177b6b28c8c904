//! Standalone source: a directory of manifests ([`weft_model::directory`]),
//! watched for changes. A change to any file is picked up within a second (inotify
//! via `notify`, plus a slow poll as a safety net).

use super::{ConfigSource, EventSender, SourceEvent};
use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use std::path::PathBuf;
use std::time::Duration;
use weft_model::directory::{DirectoryReader, Scan};

const DEBOUNCE: Duration = Duration::from_millis(10);
const POLL: Duration = Duration::from_secs(2);

pub struct DirectorySource {
    dir: PathBuf,
}

impl DirectorySource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

#[async_trait::async_trait]
impl ConfigSource for DirectorySource {
    fn name(&self) -> &'static str {
        "directory"
    }

    async fn run(self: Box<Self>, tx: EventSender) -> anyhow::Result<()> {
        let dir = self.dir.clone();
        anyhow::ensure!(
            dir.is_dir(),
            "config directory {} does not exist",
            dir.display()
        );
        let (wake_tx, mut wake_rx) = tokio::sync::mpsc::channel::<()>(1);
        let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
            if res.is_ok() {
                let _ = wake_tx.try_send(());
            }
        })
        .context("creating the directory watcher")?;
        watcher
            .watch(&dir, RecursiveMode::Recursive)
            .with_context(|| format!("watching {}", dir.display()))?;

        let mut reader = DirectoryReader::default();
        loop {
            let d = dir.clone();
            let (r, result) = tokio::task::spawn_blocking(move || {
                let res = reader.scan(&d);
                (reader, res)
            })
            .await?;
            reader = r;
            match result {
                Ok(Some(Scan { event, errors })) => {
                    for e in &errors {
                        tracing::warn!(error = %e, "manifest rejected");
                    }
                    match &event {
                        SourceEvent::Snapshot(o) => {
                            tracing::info!(dir = %dir.display(), objects = o.len(), errors = errors.len(), "config directory loaded")
                        }
                        SourceEvent::Changes { apply, delete } => tracing::debug!(
                            changed = apply.len(),
                            deleted = delete.len(),
                            "config directory changed"
                        ),
                        SourceEvent::Errors(_) => {}
                    }
                    if tx.send(SourceEvent::Errors(errors)).await.is_err()
                        || tx.send(event).await.is_err()
                    {
                        return Ok(());
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot read config directory")
                }
            }
            tokio::select! {
                _ = wake_rx.recv() => tokio::time::sleep(DEBOUNCE).await,
                _ = tokio::time::sleep(POLL) => {}
            }
            while wake_rx.try_recv().is_ok() {}
        }
    }
}
