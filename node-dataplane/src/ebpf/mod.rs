//! Transparent capture with eBPF: the programs in `ebpf/src/capture.c` (built by
//! build.rs, embedded here), their maps, and the loader that attaches them.

pub mod cgroup;
pub mod inbound;
pub mod loader;
pub mod maps;
pub mod metrics;
pub mod occupancy;

pub use inbound::Inbound;
pub use loader::{Capture, CaptureOptions};

/// The compiled capture programs.
pub static CAPTURE_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/capture.o"));

/// The compiled inbound-capture program (sk_lookup).
pub static INBOUND_OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/inbound.o"));
