//! The connection to the control plane: TLS channel with the node credential,
//! the config subscription, and backoff.

pub mod backoff;
pub mod channel;
pub mod credential;
pub mod renewal;
pub mod subscription;
