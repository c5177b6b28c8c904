//! Workload certificates held by the node: one key and X.509-SVID per identity of
//! the enrolled workloads scheduled here, renewed at half life.

mod manager;
mod store;

pub use manager::{CertManager, CertManagerSettings};
pub use store::{zeroizing, CertStore, WorkloadCert};
