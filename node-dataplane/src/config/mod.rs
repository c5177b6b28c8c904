//! The node's copy of the mesh configuration: the last good version of every
//! resource the control plane sent, kept while the control plane is away.

mod store;

pub use store::{ConfigStore, StoreSnapshot};
