//! weft control plane: config sources, the mesh model, the CA and the node-facing
//! gRPC services.

pub mod config;
pub mod identity;
pub mod model;
