//! Who is in the mesh: a pod is enrolled when its namespace carries
//! `weft.dev/mesh=enabled`, the pod does not carry `weft.dev/mesh=disabled`, and it
//! does not use the host network.

use k8s_openapi::api::core::v1::{Namespace, Pod};
use weft_proto::labels::{DISABLED, ENABLED, MESH};

pub fn namespace_enabled(ns: Option<&Namespace>) -> bool {
    ns.and_then(|n| n.metadata.labels.as_ref())
        .and_then(|l| l.get(MESH))
        .is_some_and(|v| v == ENABLED)
}

pub fn is_enrolled(ns: Option<&Namespace>, pod: &Pod) -> bool {
    let opted_out = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(MESH))
        .is_some_and(|v| v == DISABLED);
    let host_network = pod
        .spec
        .as_ref()
        .and_then(|s| s.host_network)
        .unwrap_or(false);
    namespace_enabled(ns) && !opted_out && !host_network
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::PodSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    fn ns(label: Option<&str>) -> Namespace {
        Namespace {
            metadata: ObjectMeta {
                name: Some("n".into()),
                labels: label.map(|v| [(MESH.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            ..Default::default()
        }
    }
    fn pod(label: Option<&str>, host_network: bool) -> Pod {
        Pod {
            metadata: ObjectMeta {
                name: Some("p".into()),
                labels: label.map(|v| [(MESH.to_string(), v.to_string())].into()),
                ..Default::default()
            },
            spec: Some(PodSpec {
                host_network: Some(host_network),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn rules() {
        let cases = [
            (Some(ns(Some("enabled"))), pod(None, false), true),
            (Some(ns(Some("enabled"))), pod(Some("enabled"), false), true),
            (
                Some(ns(Some("enabled"))),
                pod(Some("disabled"), false),
                false,
            ),
            (Some(ns(Some("enabled"))), pod(None, true), false),
            (Some(ns(Some("disabled"))), pod(None, false), false),
            (Some(ns(Some("Enabled"))), pod(None, false), false),
            (Some(ns(None)), pod(None, false), false),
            (Some(ns(None)), pod(Some("enabled"), false), false),
            (None, pod(None, false), false),
        ];
        for (i, (n, p, want)) in cases.iter().enumerate() {
            assert_eq!(is_enrolled(n.as_ref(), p), *want, "case {i}");
        }
    }
}
