//! weft control plane: config sources, the mesh model, the CA and the node-facing
//! gRPC services.
//!
//! Layers, each owning its state: [`config`] (where objects come from),
//! [`model`] (objects -> distributed resources), [`identity`] (the CA),
//! [`server`] (gRPC: distribution and signing), [`admin`] (HTTP), [`k8s`]
//! (Kubernetes mode: watchers, status, leader election), [`app`] (wiring).

pub mod admin;
pub mod app;
pub mod config;
pub mod identity;
pub mod k8s;
pub mod metrics;
pub mod model;
pub mod server;
pub mod wasm;
