//! weft's shared domain types and protocol: what the control plane, the node
//! agent and weftctl all speak. No I/O and no process plumbing (that is
//! `weft-runtime`); the policy engine is `weft-authz`.
//!
//! - [`pb`]: the gRPC protocol (`proto/weft/v1/config.proto`): config resources,
//!   SVID signing, module fetches.
//! - [`workload_api`]: the SPIFFE Workload API served to applications.
//! - [`crd`]: the `AuthorizationPolicy` and `WasmPlugin` custom resources.
//! - [`gateway`]: the Gateway API's `HTTPRoute` and `GRPCRoute`, for mesh routing.
//! - [`validate`]: field-level validation of those resources.
//! - [`spiffe`]: SPIFFE IDs and trust domains; [`x509`]: reading SPIFFE IDs from
//!   certificates.
//! - [`resource`]: keys and content versions of distributed resources.
//! - [`protocol`]: the application protocol a Service port declares.
//! - [`wasm_abi`]: the Proxy-Wasm ABI versions a module can export.
//! - [`labels`]: the mesh's label conventions.

#![forbid(unsafe_code)]

pub mod crd;
pub mod gateway;
pub mod protocol;
pub mod resource;
pub mod spiffe;
pub mod validate;
pub mod wasm_abi;
pub mod x509;

/// Generated from `proto/weft/v1/config.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.v1");
}

/// The SPIFFE Workload API (`proto/spiffe/workload.proto`): the service the node
/// agent serves to applications. Its messages have no protobuf package (the
/// standard's wire names), hence the `_` file.
pub mod workload_api {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("_");
}

mod serde_enums {
    /// Serializes `AuthorizationPolicy.action` by name (`"DENY"`), not number.
    pub fn action<S: serde::Serializer>(v: &i32, s: S) -> Result<S::Ok, S::Error> {
        let name = crate::pb::authorization_policy::Action::try_from(*v)
            .map(|a| a.as_str_name())
            .unwrap_or("UNKNOWN");
        s.serialize_str(name)
    }
}

/// Label conventions.
pub mod labels {
    /// Namespace label that enrolls the namespace's pods (`enabled`); on a pod,
    /// `disabled` opts that pod out.
    pub const MESH: &str = "weft.dev/mesh";
    pub const ENABLED: &str = "enabled";
    pub const DISABLED: &str = "disabled";
}
