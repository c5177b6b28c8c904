//! The node-facing gRPC API over TLS: config distribution and certificate signing.

pub mod auth;
pub mod certificates;
pub mod distribution;
pub mod modules;
pub mod sessions;
pub mod tls;

pub use auth::{CertNodeAuthenticator, NodeAuthenticator};
pub use sessions::Sessions;
