//! Where the mesh's configuration comes from. A [`ConfigSource`] feeds
//! [`SourceEvent`]s into the model; the standalone directory source is one
//! implementation, the Kubernetes API watcher another.

pub mod directory;
pub mod manifest;

pub use manifest::{parse_manifests, ManifestError, Object, ObjectRef};

use tokio::sync::mpsc;

/// A change reported by a source.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The complete set of objects the source currently holds: anything not in it is
    /// deleted. Sources that cannot tell deltas apart (a re-read directory) use this.
    Snapshot(Vec<Object>),
    /// Objects created or changed, and objects deleted, applied as one batch.
    Changes {
        apply: Vec<Object>,
        delete: Vec<ObjectRef>,
    },
    /// The source's current problems (bad manifests), replacing earlier ones.
    Errors(Vec<ManifestError>),
}

pub type EventSender = mpsc::Sender<SourceEvent>;

/// A producer of configuration. `run` streams events until the source fails or the
/// receiver is gone.
#[async_trait::async_trait]
pub trait ConfigSource: Send + 'static {
    fn name(&self) -> &'static str;
    async fn run(self: Box<Self>, tx: EventSender) -> anyhow::Result<()>;
}
