//! The chained CNI plugin (`weft-cni`) and the agent's side of it. The plugin runs
//! after the cluster's network plugin, tells the node agent about each pod sandbox
//! (netns path, pod namespace/name/UID, IPs) over a unix socket, and passes the
//! previous result through unchanged.

pub mod install;
pub mod plugin;
pub mod protocol;
pub mod registry;
pub mod server;
