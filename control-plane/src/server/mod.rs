//! The node-facing gRPC API over TLS: config distribution, certificate signing and
//! the renewal and revocation of standalone node credentials.

pub mod auth;
pub mod certificates;
pub mod distribution;
pub mod modules;
pub mod node_credentials;
pub mod revocation;
pub mod sessions;
pub mod tls;

pub use auth::{CertNodeAuthenticator, NodeAuthenticator};
pub use sessions::Sessions;
