//! The manifest parser (weft-model `manifest.rs`) and the model it feeds, from
//! arbitrary text: what the standalone control plane and weftctl read from a
//! directory of YAML files.
//!
//! Properties, besides never panicking:
//! - every object read has a kind, a name, and a namespace unless it is a
//!   Namespace; errors name documents in order;
//! - an object survives a JSON round trip (how it is hashed and sent) unchanged;
//! - a policy the validator accepts compiles in the node's policy engine (a
//!   policy shown valid is enforced as written), and one it refuses is sent
//!   fail-closed: an ALLOW that allows nothing, a DENY that denies everything;
//! - the model built from the objects is the same when built twice, and every
//!   policy it sends to a node compiles as the validator said.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;
use weft_authz::{compile, Action, Attributes};
use weft_model::convert;
use weft_model::manifest::{parse_manifests, Object};
use weft_model::modules::Offline;
use weft_model::{Model, ModelConfig, SourceEvent};
use weft_proto::pb;
use weft_proto::spiffe::TrustDomain;
use weft_proto::validate;

fn round_trip<T>(o: &T)
where
    T: serde::Serialize + serde::de::DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let json = serde_json::to_value(o).expect("an object serializes");
    let back: T = serde_json::from_value(json.clone())
        .unwrap_or_else(|e| panic!("{json} does not read back: {e}"));
    assert_eq!(&back, o, "JSON round trip changed the object");
}

fn attrs() -> [Attributes; 3] {
    let plain = Attributes {
        source_ip: "10.0.0.1".parse().ok(),
        destination_ip: "10.0.0.2".parse().ok(),
        destination_port: 8080,
        ..Default::default()
    };
    let mtls = Attributes {
        principal: Some("cluster.local/ns/shop/sa/web".into()),
        ..plain.clone()
    };
    let http = Attributes {
        request: Some(weft_authz::Request {
            method: "GET".into(),
            path: "/".into(),
            host: "web".into(),
            headers: Vec::new(),
            auth: None,
        }),
        ..mtls.clone()
    };
    [plain, mtls, http]
}

fn model() -> Arc<Model> {
    Model::new(
        ModelConfig {
            trust_domain: TrustDomain::new("cluster.local").expect("trust domain"),
            root_namespace: "weft-system".into(),
            trust_bundle_pem: "PEM".into(),
            jwt_jwks: String::new(),
            default_identity_fallback: false,
        },
        Arc::new(Offline),
    )
}

fn view(objects: &[Object]) -> Vec<(String, String, Option<pb::resource::Kind>)> {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects.to_vec()));
    let mut all = Vec::new();
    for node in ["node-a", "node-b"] {
        for r in m.view_of(node) {
            all.push((r.key.clone(), r.version.clone(), r.kind.clone()));
        }
    }
    all
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (objects, errors) = parse_manifests("fuzz.yaml", text);
    for w in errors.windows(2) {
        assert!(w[0].document <= w[1].document, "errors out of order");
    }
    for o in &objects {
        let r = o.object_ref();
        assert!(!r.name.is_empty(), "{r} without a name");
        assert_eq!(r.namespace.is_empty(), r.kind == "Namespace", "{r}");
        match o {
            Object::Namespace(x) => round_trip(x),
            Object::Pod(x) => {
                round_trip(x.as_ref());
                let _ = convert::pod_facts(x);
                let _ = convert::pod_ready(x);
            }
            Object::Service(x) => {
                round_trip(x);
                let _ = convert::service(x, &[]);
            }
            Object::ServiceAccount(x) => round_trip(x),
            // Routes carry free-form status (any JSON, NaN included): not round-tripped.
            Object::HttpRoute(x) => {
                let route = weft_model::routes::AnyRoute::Http(x.as_ref());
                let _ = weft_model::routes::spec_errors(route);
                let (converted, _) =
                    weft_model::routes::convert(route, &Default::default(), &Default::default());
                // With no Services, no parent accepts it: nothing is distributed.
                assert!(converted.is_none(), "{r}: distributed without a parent");
            }
            Object::GrpcRoute(x) => {
                let route = weft_model::routes::AnyRoute::Grpc(x.as_ref());
                let _ = weft_model::routes::spec_errors(route);
                let (converted, _) =
                    weft_model::routes::convert(route, &Default::default(), &Default::default());
                assert!(converted.is_none(), "{r}: distributed without a parent");
            }
            Object::ReferenceGrant(x) => round_trip(x.as_ref()),
            Object::WasmPlugin(x) => {
                round_trip(x);
                let _ = validate::validate_wasm_plugin(&x.spec);
                let _ = convert::wasm_plugin(x);
            }
            Object::PeerAuthentication(x) => {
                round_trip(x);
                let report = validate::validate_peer_authentication(&x.spec);
                let p = convert::peer_authentication(x, &report, "weft-system");
                if !report.is_valid() {
                    // Fail closed: an invalid one is enforced as STRICT.
                    assert_eq!(
                        p.mode,
                        weft_proto::pb::peer_authentication::MtlsMode::Strict as i32,
                        "invalid {r} is not STRICT"
                    );
                }
            }
            Object::RequestAuthentication(x) => {
                round_trip(x);
                let mut report = validate::validate_request_authentication(&x.spec);
                let ra = convert::request_authentication(x, &mut report, "weft-system", |_| {
                    weft_model::jwks::JwksResolved::Pending
                });
                // Every distributed key set compiles: the node never meets one that
                // the control plane did not check.
                for rule in &ra.rules {
                    if !rule.jwks.is_empty() {
                        assert!(rule.jwks_error.is_empty(), "{r}: keys and an error");
                    }
                }
            }
            Object::AuthorizationPolicy(x) => {
                round_trip(x);
                let report = validate::validate_authorization_policy(&x.spec);
                let Some(p) = convert::authorization_policy(x, &report, "weft-system") else {
                    assert!(!report.is_valid(), "a valid policy was dropped");
                    continue;
                };
                let c = compile(&p);
                if report.is_valid() {
                    assert!(
                        c.broken.is_none(),
                        "validated policy {r} does not compile: {:?}",
                        c.broken
                    );
                } else {
                    for a in attrs() {
                        match c.action {
                            Action::Allow => {
                                assert!(c.matching_rule(&a).is_none(), "invalid ALLOW {r} matches")
                            }
                            Action::Deny => assert!(
                                c.matching_rule(&a).is_some(),
                                "invalid DENY {r} does not match"
                            ),
                            Action::Audit => panic!("invalid AUDIT {r} is sent"),
                        }
                    }
                }
            }
        }
    }
    if objects.len() > 64 {
        return;
    }
    let first = view(&objects);
    assert_eq!(view(&objects), first, "the model is not deterministic");
    let m = model();
    m.apply(SourceEvent::Snapshot(objects.clone()));
    for r in m.view_of("node-a") {
        if let Some(pb::resource::Kind::AuthorizationPolicy(p)) = &r.kind {
            let c = compile(p);
            assert!(
                c.broken.is_none(),
                "the model sends {} that does not compile: {:?}",
                r.key,
                c.broken
            );
        }
    }
});
