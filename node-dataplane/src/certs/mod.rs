//! Workload certificates held by the node: one key and X.509-SVID per identity of
//! the enrolled workloads scheduled here, renewed at half life.

mod manager;
mod status;
mod store;

pub use manager::{CertManager, CertManagerSettings};
pub use status::StatusComputer;
#[cfg(any(test, feature = "testing"))]
pub use store::zeroizing;
pub use store::{CertStore, WorkloadCert};
