//! `PeerAuthentication` (security.weft.dev/v1alpha1): whether plaintext may reach a
//! workload, with Istio's field semantics and precedence.

use super::{ResourceStatus, WorkloadSelector};
use kube::CustomResource;
use std::collections::BTreeMap;

#[derive(
    CustomResource,
    Clone,
    Debug,
    Default,
    PartialEq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[kube(
    group = "security.weft.dev",
    version = "v1alpha1",
    kind = "PeerAuthentication",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    status = "ResourceStatus",
    shortname = "wpeer",
    printcolumn = r#"{"name":"Mode","type":"string","jsonPath":".spec.mtls.mode"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerAuthenticationSpec {
    /// Workloads (in the object's namespace) it applies to; without one it applies
    /// to the whole namespace, or, in the root namespace, to the whole mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// The mode for every port of the selected workloads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtls: Option<MutualTls>,
    /// Per workload (container) port, overriding `mtls`; needs a `selector`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub port_level_mtls: BTreeMap<String, MutualTls>,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MutualTls {
    /// UNSET (inherit), PERMISSIVE, STRICT or DISABLE (enforced as PERMISSIVE).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<MtlsMode>,
}

#[derive(
    Clone,
    Copy,
    Debug,
    Default,
    PartialEq,
    Eq,
    serde::Serialize,
    serde::Deserialize,
    schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum MtlsMode {
    /// Inherit from the enclosing scope (the mesh's default is PERMISSIVE).
    #[default]
    Unset,
    /// Plaintext and mesh (mTLS) connections are accepted.
    Permissive,
    /// Only mesh (mTLS over HBONE) connections are accepted; plaintext is refused.
    Strict,
    /// Accepted for Istio compatibility; weft enforces it as PERMISSIVE.
    Disable,
}
