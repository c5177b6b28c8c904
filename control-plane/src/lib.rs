//! weft control plane: config sources, the mesh model, the CA and the node-facing
//! gRPC services.
//!
//! Layers, each owning its state: [`config`] (where objects come from),
//! the model (objects -> distributed resources: the `weft-model` crate),
//! [`identity`] (the CA),
//! [`server`] (gRPC: distribution and signing), [`admin`] (HTTP), [`k8s`]
//! (Kubernetes mode: watchers, status, leader election), [`app`] (wiring).

#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod identity;
pub mod jwks;
pub mod k8s;
pub mod metrics;
pub mod oci;
pub mod rotation;
pub mod server;
pub mod wasm;
