//! weft's node agent (`weft-node`), one per node. It holds the node's view of the
//! mesh ([`config`], fail-static), obtains and renews the SVIDs of the node's
//! enrolled workloads ([`certs`]), captures the enrolled pods' traffic with eBPF
//! ([`ebpf`], [`cni`], [`pods`]) and runs the mTLS proxy ([`proxy`]) with its L7
//! path and Proxy-Wasm plugins ([`wasm`]).
//!
//! Dependencies point one way (docs/architecture.md draws the map):
//! `app` -> `admin` -> `pods` -> `proxy` -> `wasm` -> `fields`, with `metrics`,
//! `config`, `certs`, `control`, `netns` and `ebpf` below them; `metrics` depends
//! on none of its users (they implement [`metrics::scrape::Scrape`]).
//!
//! Modules are crate-private; the binaries (`weft-node`, `weft-cni`) use the items
//! re-exported here, and the e2e crate's tests and benchmarks those of [`testing`]
//! (feature `testing`); the fuzz targets (`fuzz/`) those of `fuzzing` (feature
//! `fuzzing`).

#![deny(unsafe_code)]

pub(crate) mod admin;
pub mod app;
pub(crate) mod certs;
pub(crate) mod cni;
pub(crate) mod config;
pub(crate) mod control;
pub(crate) mod ebpf;
pub(crate) mod fields;
pub(crate) mod lifecycle;
pub(crate) mod memory;
pub(crate) mod metrics;
pub(crate) mod netns;
pub(crate) mod pods;
pub(crate) mod proxy;
pub(crate) mod route_match;
pub(crate) mod wasm;
pub mod workload_api;

pub use app::{start, CaptureSettings, DrainSettings, Running, Settings};
pub use certs::{CertManagerSettings, CertStore};
pub use cni::{
    install::install as install_cni, install::uninstall as uninstall_cni,
    plugin::run as run_cni_plugin,
};
pub use config::ConfigStore;
pub use control::channel::ControlPlaneTarget;
pub use ebpf::{cgroup, Capture};
pub use pods::PodMap;
pub use proxy::access_log::AccessLogSettings;
pub use proxy::lb::LbPolicy;
pub use proxy::state::{ProxyOptions, DEFAULT_MAX_HANDSHAKES_PER_SOURCE};

/// The CNI plugin's default socket path.
pub const DEFAULT_CNI_SOCKET: &str = cni::plugin::DEFAULT_SOCKET;

#[cfg(any(test, feature = "testing"))]
pub mod testing {
    //! Internals that the e2e crate's tests and benchmarks drive directly (feature
    //! `testing`; never in the shipped binaries).

    pub use crate::certs::{zeroizing::Secret, WorkloadCert};
    pub use crate::cni::plugin::ips_of;
    pub use crate::control::subscription::run_forever as subscribe;
    pub use crate::ebpf::{cgroup, Capture, CaptureOptions, Inbound};
    pub use crate::fields::Fields;
    pub use crate::metrics::Metrics;
    pub use crate::netns::PodNetns;
    pub use crate::proxy::access_log::TARGET as ACCESS_LOG_TARGET;
    pub use crate::proxy::counters::OutboundStats;
    pub use crate::proxy::inbound::serve_streams as serve_hbone_streams;
    pub use crate::proxy::l7::{serve as serve_l7, test_ctx as l7_ctx, ConnCtx};
    pub use crate::proxy::local::{LiveWorkload, LocalPod};
    pub use crate::proxy::outbound::serve_plain as serve_outbound_plain;
    pub use crate::proxy::state::{test_state_with as proxy_state, ProxyState};
    pub use crate::proxy::tls::{client_config, server_config};
    pub use crate::proxy::tunnel::{copy as copy_tunnel, Tunnel};
    pub use crate::proxy::{h2, ports};
    pub use crate::wasm::abi::{ConnProps, HttpState};
    pub use crate::wasm::engine::WasmEngine;
    pub use crate::wasm::headers::Headers;
    pub use crate::wasm::plugin::{Outcome, Plugin};
}

#[cfg(feature = "fuzzing")]
pub mod fuzzing;
