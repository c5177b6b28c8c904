//! weft control plane: config sources, the mesh model, the CA and the node-facing
//! gRPC services.
//!
//! Layers, each owning its state: [`config`] (where objects come from),
//! [`model`] (objects -> distributed resources), [`identity`] (the CA),
//! [`server`] (gRPC: distribution and signing), [`admin`] (HTTP), [`app`] (wiring).

pub mod admin;
pub mod app;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod model;
pub mod server;
pub mod wasm;
