//! weft's CustomResourceDefinitions as Rust types. The YAML in `crds/` is generated
//! from these (`weft-control-plane crds`), and a test keeps the two identical.

mod authz;
mod peer_authn;
mod request_authn;
mod status;
mod wasm;

pub use authz::*;
pub use peer_authn::*;
pub use request_authn::*;
pub use status::*;
pub use wasm::*;

use kube::CustomResourceExt;
use std::collections::BTreeMap;

/// `selector.matchLabels` on the destination workload, as Istio writes it.
#[derive(
    Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSelector {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Every CRD weft owns, as `(file name, YAML)`.
pub fn all_crd_yaml() -> Vec<(&'static str, String)> {
    let render = |crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition| {
        let mut value = serde_json::to_value(&crd).unwrap_or_default();
        strip_null_enum_values(&mut value);
        let body = serde_yaml::to_string(&value).unwrap_or_default();
        format!("# Generated from the Rust types by `weft-control-plane crds`. Do not edit.\n{body}")
    };
    vec![
        (
            "authorizationpolicies.security.weft.dev.yaml",
            render(AuthorizationPolicy::crd()),
        ),
        (
            "peerauthentications.security.weft.dev.yaml",
            render(PeerAuthentication::crd()),
        ),
        (
            "requestauthentications.security.weft.dev.yaml",
            render(RequestAuthentication::crd()),
        ),
        (
            "wasmplugins.extensions.weft.dev.yaml",
            render(WasmPlugin::crd()),
        ),
    ]
}

/// An optional enum field's schema lists `null` among its values (it is already
/// `nullable`); API servers up to at least 1.20 reject such a CRD with a misleading
/// error, so the value is dropped.
pub(crate) fn strip_null_enum_values(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            if let Some(serde_json::Value::Array(values)) = m.get_mut("enum") {
                values.retain(|x| !x.is_null());
            }
            m.values_mut().for_each(strip_null_enum_values);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_null_enum_values),
        _ => {}
    }
}
