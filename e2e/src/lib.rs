//! Harnesses for weft's end-to-end tests and demo. They run the real binaries
//! (`weft-control-plane`, `weft-node`) as processes, talk to them over real
//! sockets on loopback, and clean up everything they started when dropped.

#![forbid(unsafe_code)]

pub mod cluster;
pub mod curl;
pub mod helm;
pub mod jwt;
pub mod kubeapi;
pub mod kubecluster;
pub mod kubemesh;
pub mod kubetraffic;
pub mod kubeweft;
pub mod netlab;
pub mod perf;
pub mod process;
pub mod prometheus;
pub mod showcase;
pub mod standalone;

pub use process::{bin_path, free_port, http_get, plugin_path, wait_until, Proc};
pub use standalone::StandaloneMesh;
