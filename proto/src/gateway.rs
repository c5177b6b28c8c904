//! The Gateway API's `HTTPRoute` and `GRPCRoute` (gateway.networking.k8s.io/v1), as
//! weft reads them for mesh routing (GAMMA: routes whose `parentRefs` name a
//! Service). The specs are the `gateway-api` crate's types (its experimental
//! channel, a superset of the standard one that also has `retry`); the objects
//! around them are weft's, so they carry this workspace's `ObjectMeta` and can be
//! watched with its `kube` (the crate binds an older `kube`).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use std::borrow::Cow;

pub use gateway_api::experimental::grpcroutes as grpc;
pub use gateway_api::experimental::httproutes as http;
pub use gateway_api::referencegrants as grants;

pub const GROUP: &str = "gateway.networking.k8s.io";
pub const VERSION: &str = "v1";
/// `controllerName` of weft's entries in a route's `status.parents`.
pub const CONTROLLER_NAME: &str = "weft.dev/mesh";

/// An `HTTPRoute`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HttpRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: http::HttpRouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// A `GRPCRoute`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GrpcRoute {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: grpc::GrpcRouteSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<serde_json::Value>,
}

/// A `ReferenceGrant` (read as gateway.networking.k8s.io/v1beta1, the version every
/// Gateway API release since v0.6 serves): lets routes of other namespaces name
/// Services of its namespace as backends.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ReferenceGrant {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: grants::ReferenceGrantSpec,
}

/// The version `ReferenceGrant`s are watched at.
pub const REFERENCE_GRANT_VERSION: &str = "v1beta1";

macro_rules! route_resource {
    ($t:ty, $kind:literal, $plural:literal) => {
        route_resource!($t, $kind, $plural, VERSION);
    };
    ($t:ty, $kind:literal, $plural:literal, $version:expr) => {
        impl kube::Resource for $t {
            type DynamicType = ();
            type Scope = k8s_openapi::NamespaceResourceScope;

            fn kind(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($kind)
            }
            fn group(_: &()) -> Cow<'_, str> {
                Cow::Borrowed(GROUP)
            }
            fn version(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($version)
            }
            fn plural(_: &()) -> Cow<'_, str> {
                Cow::Borrowed($plural)
            }
            fn meta(&self) -> &ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut ObjectMeta {
                &mut self.metadata
            }
        }
    };
}

route_resource!(HttpRoute, "HTTPRoute", "httproutes");
route_resource!(GrpcRoute, "GRPCRoute", "grpcroutes");
route_resource!(
    ReferenceGrant,
    "ReferenceGrant",
    "referencegrants",
    REFERENCE_GRANT_VERSION
);

/// The upstream CRDs' API approval: the API server refuses a CRD of a `*.k8s.io`
/// group without an `api-approved.kubernetes.io` annotation (Kubernetes 1.16+).
pub const API_APPROVED: &str = "https://github.com/kubernetes-sigs/gateway-api/pull/3328";

/// The CustomResourceDefinitions of both kinds as the `gateway-api` crate generates
/// them (YAML), with the upstream CRDs' `api-approved.kubernetes.io` annotation, for
/// tests and standalone clusters that lack the upstream ones. Users install the
/// Gateway API's own CRDs.
pub fn route_crds_yaml() -> String {
    use gateway_api_kube::CustomResourceExt;
    let mut out = String::new();
    for crd in [
        serde_json::to_value(http::HttpRoute::crd()),
        serde_json::to_value(grpc::GrpcRoute::crd()),
    ] {
        let Ok(mut v) = crd else { continue };
        super::crd::strip_null_enum_values(&mut v);
        v["metadata"]["annotations"]["api-approved.kubernetes.io"] = API_APPROVED.into();
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&v).unwrap_or_default());
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn route_crds_carry_the_api_approval_annotation() {
        let docs: Vec<serde_json::Value> = super::route_crds_yaml()
            .split("---\n")
            .filter(|d| !d.trim().is_empty())
            .map(|d| serde_yaml::from_str(d).expect("CRD YAML"))
            .collect();
        let names: Vec<&str> = docs
            .iter()
            .map(|d| d["metadata"]["name"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            names,
            [
                "httproutes.gateway.networking.k8s.io",
                "grpcroutes.gateway.networking.k8s.io"
            ]
        );
        for d in &docs {
            assert_eq!(
                d["metadata"]["annotations"]["api-approved.kubernetes.io"],
                super::API_APPROVED
            );
        }
    }
}
