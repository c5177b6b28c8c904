//! weft node agent: holds the node's view of the mesh (fail-static), obtains and
//! renews the SVIDs of local workloads, and (later) runs the eBPF capture and the
//! mTLS proxy.

pub mod admin;
pub mod app;
pub mod certs;
pub mod cni;
pub mod config;
pub mod control;
pub mod ebpf;
pub mod memory;
pub mod metrics;
pub mod netns;
pub mod pods;
pub mod proxy;
pub mod wasm;
