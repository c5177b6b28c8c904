//! weft's shared API: the domain types both the control plane and the node agent use.
//!
//! - [`spiffe`]: SPIFFE IDs and trust domains.
//! - [`crd`]: the `AuthorizationPolicy` and `WasmPlugin` custom resources.
//! - [`validate`]: field-level validation of those resources.
//! - [`pb`]: the gRPC protocol (`proto/weft/v1/config.proto`).
//! - [`resource`]: keys and content versions of distributed resources.
//! - [`labels`]: the mesh's label conventions.

pub mod authz;
pub mod crd;
pub mod logging;
pub mod mountinfo;
pub mod process_metrics;
pub mod protocol;
pub mod resource;
pub mod runtime;
pub mod spiffe;
pub mod validate;
pub mod wasm_abi;
pub mod x509;

/// Generated from `proto/weft/v1/config.proto`.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("weft.v1");
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
