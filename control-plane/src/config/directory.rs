//! Standalone source: a directory of manifests, watched for changes. A change to any
//! file is picked up within a second (inotify via `notify`, plus a slow poll as a
//! safety net); only files whose size or mtime changed are re-parsed.

use super::manifest::{parse_manifests, ManifestError, Object, ObjectRef};
use super::{ConfigSource, EventSender, SourceEvent};
use anyhow::Context;
use notify::{RecursiveMode, Watcher};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

const DEBOUNCE: Duration = Duration::from_millis(50);
const POLL: Duration = Duration::from_secs(2);

pub struct DirectorySource {
    dir: PathBuf,
}

impl DirectorySource {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into() }
    }
}

struct Parsed {
    stamp: (SystemTime, u64),
    objects: Vec<Object>,
    errors: Vec<ManifestError>,
}

/// Reads the directory, re-parsing only changed files, and returns the merged view.
#[derive(Default)]
pub struct DirectoryReader {
    files: BTreeMap<PathBuf, Parsed>,
}

impl DirectoryReader {
    /// Returns `None` when nothing changed since the last call.
    pub fn scan(
        &mut self,
        dir: &Path,
    ) -> std::io::Result<Option<(Vec<Object>, Vec<ManifestError>)>> {
        let mut seen = Vec::new();
        collect_files(dir, &mut seen)?;
        let mut changed =
            self.files.len() != seen.len() || seen.iter().any(|(p, _)| !self.files.contains_key(p));
        let mut next = BTreeMap::new();
        for (path, stamp) in seen {
            match self.files.remove(&path) {
                Some(p) if p.stamp == stamp => {
                    next.insert(path, p);
                }
                _ => {
                    changed = true;
                    let shown = path
                        .strip_prefix(dir)
                        .unwrap_or(&path)
                        .display()
                        .to_string();
                    let (objects, errors) = match std::fs::read_to_string(&path) {
                        Ok(text) => parse_manifests(&shown, &text),
                        Err(e) => (
                            Vec::new(),
                            vec![ManifestError {
                                file: shown,
                                document: 0,
                                object: None,
                                field: None,
                                message: format!("cannot read: {e}"),
                            }],
                        ),
                    };
                    next.insert(
                        path,
                        Parsed {
                            stamp,
                            objects,
                            errors,
                        },
                    );
                }
            }
        }
        self.files = next;
        if !changed {
            return Ok(None);
        }
        Ok(Some(self.merged()))
    }

    fn merged(&self) -> (Vec<Object>, Vec<ManifestError>) {
        let mut owner: HashMap<ObjectRef, String> = HashMap::new();
        let mut objects = Vec::new();
        let mut errors = Vec::new();
        for (path, parsed) in &self.files {
            errors.extend(parsed.errors.iter().cloned());
            for (i, o) in parsed.objects.iter().enumerate() {
                let r = o.object_ref();
                let file = path.display().to_string();
                if let Some(first) = owner.get(&r) {
                    errors.push(ManifestError {
                        file: file.clone(),
                        document: i,
                        object: Some(r.to_string()),
                        field: Some("metadata.name".into()),
                        message: format!(
                            "duplicate: already defined in {first}; this copy is ignored"
                        ),
                    });
                    continue;
                }
                owner.insert(r, file);
                objects.push(o.clone());
            }
        }
        (objects, errors)
    }
}

fn collect_files(dir: &Path, out: &mut Vec<(PathBuf, (SystemTime, u64))>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let name = entry.file_name();
        if name.to_string_lossy().starts_with('.') {
            continue; // editor swap files, hidden state
        }
        let meta = entry.metadata()?;
        if meta.is_dir() {
            collect_files(&path, out)?;
        } else if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("yaml" | "yml" | "json")
        ) {
            out.push((path, (meta.modified()?, meta.len())));
        }
    }
    out.sort();
    Ok(())
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
                Ok(Some((objects, errors))) => {
                    for e in &errors {
                        tracing::warn!(error = %e, "manifest rejected");
                    }
                    tracing::info!(dir = %dir.display(), objects = objects.len(), errors = errors.len(), "config directory loaded");
                    if tx.send(SourceEvent::Errors(errors)).await.is_err()
                        || tx.send(SourceEvent::Snapshot(objects)).await.is_err()
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
