//! Where the mesh's configuration comes from. A [`ConfigSource`] feeds
//! [`SourceEvent`]s into the model ([`weft_model`]); the standalone directory
//! source is one implementation, the Kubernetes API watcher another.

pub mod directory;

pub use weft_model::manifest::{parse_manifests, ManifestError, Object, ObjectRef};
pub use weft_model::SourceEvent;

use tokio::sync::mpsc;

pub type EventSender = mpsc::Sender<SourceEvent>;

/// A producer of configuration. `run` streams events until the source fails or the
/// receiver is gone.
#[async_trait::async_trait]
pub trait ConfigSource: Send + 'static {
    fn name(&self) -> &'static str;
    async fn run(self: Box<Self>, tx: EventSender) -> anyhow::Result<()>;
}
