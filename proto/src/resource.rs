//! Resource keys and content versions used by config distribution.

use crate::pb;
use prost::Message;
use sha2::{Digest, Sha256};

pub const KIND_WORKLOAD: &str = "Workload";
pub const KIND_SERVICE: &str = "Service";
pub const KIND_AUTHZ: &str = "AuthorizationPolicy";
pub const KIND_WASM: &str = "WasmPlugin";
pub const KIND_TRUST_BUNDLE: &str = "TrustBundle";
pub const KIND_HTTP_ROUTE: &str = "HTTPRoute";
pub const KIND_GRPC_ROUTE: &str = "GRPCRoute";
pub const KIND_PEER_AUTHN: &str = "PeerAuthentication";
pub const KIND_REQUEST_AUTHN: &str = "RequestAuthentication";

/// `<kind>/<namespace>/<name>`; cluster-scoped resources use `-` as namespace.
pub fn key(kind: &str, namespace: &str, name: &str) -> String {
    let ns = if namespace.is_empty() { "-" } else { namespace };
    format!("{kind}/{ns}/{name}")
}

/// Kind part of a key.
pub fn kind_of(key: &str) -> &str {
    key.split('/').next().unwrap_or("")
}

/// Builds a `Resource` whose version is the SHA-256 (first 16 hex digits) of its
/// encoded content: equal versions mean equal content, across control-plane restarts.
pub fn make(key: String, kind: pb::resource::Kind) -> pb::Resource {
    let mut r = pb::Resource {
        key,
        version: String::new(),
        kind: Some(kind),
    };
    let bytes = r.encode_to_vec();
    let digest = Sha256::digest(&bytes);
    r.version = hex::encode(&digest[..8]);
    r
}

/// The version as a number (first 8 bytes of the content hash); 0 if unparsable,
/// which never equals a real version.
pub fn version_number(version: &str) -> u64 {
    u64::from_str_radix(version, 16).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_content_hash() {
        let w = |ip: &str| {
            pb::resource::Kind::Workload(pb::Workload {
                name: "a".into(),
                ips: vec![ip.into()],
                ..Default::default()
            })
        };
        let a = make(key(KIND_WORKLOAD, "ns", "a"), w("10.0.0.1"));
        let b = make(key(KIND_WORKLOAD, "ns", "a"), w("10.0.0.1"));
        let c = make(key(KIND_WORKLOAD, "ns", "a"), w("10.0.0.2"));
        assert_eq!(a.version, b.version);
        assert_ne!(a.version, c.version);
        assert_eq!(
            version_number(&a.version),
            u64::from_str_radix(&a.version, 16).unwrap()
        );
        assert_eq!(version_number("zz"), 0);
        assert_eq!(a.key, "Workload/ns/a");
        assert_eq!(key(KIND_TRUST_BUNDLE, "", "root"), "TrustBundle/-/root");
        assert_eq!(kind_of(&a.key), "Workload");
    }
}
