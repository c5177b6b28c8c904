//! `WasmPlugin` (extensions.weft.dev/v1alpha1), with Istio's WasmPlugin field semantics.

use super::{ResourceStatus, WorkloadSelector};
use kube::CustomResource;

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
    group = "extensions.weft.dev",
    version = "v1alpha1",
    kind = "WasmPlugin",
    namespaced,
    derive = "PartialEq",
    derive = "Default",
    status = "ResourceStatus",
    shortname = "wwp",
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".spec.phase"}"#,
    printcolumn = r#"{"name":"Accepted","type":"string","jsonPath":".status.conditions[?(@.type==\"Accepted\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
// CEL rules (Kubernetes 1.25+; older API servers ignore them): the control plane
// validates the same things and reports them in status.
#[schemars(extend("x-kubernetes-validations" = [
    {"rule": "self.url.startsWith('file:///') || self.url.startsWith('http://') || self.url.startsWith('https://') || self.url.startsWith('oci://')",
     "message": "spec.url must be file:///<absolute path>, http://, https:// or oci://"},
    {"rule": "!self.url.startsWith('http') || has(self.sha256)",
     "message": "spec.sha256 is required for http(s) modules"}
]))]
pub struct WasmPluginSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<WorkloadSelector>,
    /// `file://<path on the control plane>`, `http(s)://...` or
    /// `oci://registry/repository[:tag][@sha256:digest]` (fetched by the control
    /// plane).
    pub url: String,
    /// Hex SHA-256 of the module; required for http(s), verified whenever given.
    /// For `oci://`: the image manifest's digest (as Istio reads it) or the
    /// module's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// `oci://` only: `IfNotPresent` (default; `Always` for the tag `latest`) or
    /// `Always` (pulled again at most once a minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<String>,
    /// `oci://` only: a `kubernetes.io/dockerconfigjson` Secret in the plugin's
    /// namespace with the registry's credentials (Kubernetes mode).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_secret: Option<String>,
    /// Root id handed to the plugin (`plugin_root_id`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plugin_name: Option<String>,
    /// Passed to the plugin as its configuration buffer (JSON).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "any_object")]
    pub plugin_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    /// Higher runs first within a phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,
    #[serde(default, skip_serializing_if = "Vec::is_empty", rename = "match")]
    pub match_: Vec<TrafficSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fail_strategy: Option<FailStrategy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<PluginLimits>,
}

fn any_object(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "object",
        "x-kubernetes-preserve-unknown-fields": true
    })
}

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "UPPERCASE")]
pub enum Phase {
    #[serde(rename = "UNSPECIFIED_PHASE")]
    Unspecified,
    Authn,
    Authz,
    Stats,
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
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum FailStrategy {
    #[default]
    FailClose,
    FailOpen,
    FailReload,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TrafficSelector {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<PortSelector>,
}

#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PortSelector {
    pub number: u32,
}

/// Per-plugin resource limits.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PluginLimits {
    /// Time one callback may run before its instance is stopped, ms (default 10, 1 to 1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub cpu_time_per_callback_millis: Option<u64>,
    /// Linear memory cap per instance, in bytes (default 16 MiB, 64 KiB to 256 MiB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 65536, max = 268435456))]
    pub memory_bytes: Option<u64>,
}
