use crate::manifest::{parse_manifests, Object};
use crate::{Model, ModelConfig, SourceEvent};
use std::sync::Arc;
use weft_proto::pb::{self, resource::Kind};
use weft_proto::spiffe::TrustDomain;

fn model() -> Arc<Model> {
    Model::new(
        ModelConfig {
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            root_namespace: "weft-system".into(),
            trust_bundle_pem: "PEM".into(),
            jwt_jwks: String::new(),
            default_identity_fallback: false,
        },
        Arc::new(crate::modules::Offline),
    )
}

fn objects(text: &str) -> Vec<Object> {
    let (o, e) = parse_manifests("t.yaml", text);
    assert!(e.is_empty(), "{e:?}");
    o
}

const SERVICES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: echo}, ports: [{name: http, port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: echo-v2, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: echo, version: v2}, ports: [{name: http, port: 80, targetPort: 8080}]}
"#;

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: canary, namespace: shop, generation: 2}
spec:
  parentRefs:
  - {group: "", kind: Service, name: echo, port: 80}
  - {name: some-gateway}
  rules:
  - name: v2-by-header
    matches:
    - headers: [{name: X-Canary, value: "yes"}]
      path: {type: PathPrefix, value: /api}
    backendRefs: [{name: echo-v2, port: 80}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier: {add: [{name: x-route, value: canary}]}
  - backendRefs:
    - {name: echo, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
    - {name: gone, port: 80, weight: 5}
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 2, codes: [503], backoff: 100ms}
"#;

fn routes(m: &Model) -> Vec<pb::Route> {
    m.view_of("node-a")
        .iter()
        .filter_map(|r| match &r.kind {
            Some(Kind::Route(r)) => Some(r.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_http_route_on_a_service_is_resolved_distributed_and_given_status() {
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(ROUTE));
    m.apply(SourceEvent::Snapshot(objs));
    let rs = routes(&m);
    assert_eq!(rs.len(), 1, "{rs:#?}");
    let r = &rs[0];
    assert_eq!((r.namespace.as_str(), r.name.as_str()), ("shop", "canary"));
    // Only the Service parent is weft's.
    assert_eq!(r.parents.len(), 1);
    assert_eq!(r.parents[0].service_name, "echo");
    assert_eq!(r.parents[0].port, 80);
    let first = &r.rules[0];
    assert_eq!(first.name, "v2-by-header");
    let m0 = &first.matches[0];
    assert_eq!(
        m0.headers[0].name, "x-canary",
        "header names are lower-cased"
    );
    assert_eq!(m0.path.as_ref().unwrap().kind, pb::MatchKind::Prefix as i32);
    let second = &r.rules[1];
    assert_eq!(second.request_timeout_ms, 2000);
    assert_eq!(second.backend_request_timeout_ms, 500);
    let retry = second.retry.as_ref().unwrap();
    assert_eq!(
        (retry.attempts, retry.codes.clone(), retry.backoff_ms),
        (3, vec![503], 100)
    );
    let weights: Vec<(String, u32, bool)> = second
        .backends
        .iter()
        .map(|b| (b.service_name.clone(), b.weight, b.invalid.is_empty()))
        .collect();
    assert_eq!(
        weights,
        vec![
            ("echo".into(), 90, true),
            ("echo-v2".into(), 10, true),
            ("gone".into(), 5, false)
        ]
    );
    let st = m.route_statuses();
    let (status, stale) = st.values().next().unwrap();
    assert!(stale.is_none());
    assert_eq!(status.generation, Some(2));
    assert_eq!(status.parents.len(), 1);
    let p = &status.parents[0];
    assert!(p.accepted.status, "{p:?}");
    assert!(!p.resolved_refs.status);
    assert_eq!(p.resolved_refs.reason, "BackendNotFound");
    assert!(
        p.resolved_refs
            .message
            .contains("spec.rules[1].backendRefs[2]"),
        "{}",
        p.resolved_refs.message
    );
}

#[test]
fn a_missing_parent_is_not_accepted_and_nothing_is_distributed() {
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(
        &ROUTE.replace("name: echo, port: 80}", "name: nope}"),
    ));
    m.apply(SourceEvent::Snapshot(objs));
    assert!(routes(&m).is_empty());
    let st = m.route_statuses();
    let p = &st.values().next().unwrap().0.parents[0];
    assert!(!p.accepted.status);
    assert_eq!(p.accepted.reason, "NoMatchingParent");
    // The Service appears: the route is accepted without being touched.
    let svc = objects(
        r#"
apiVersion: v1
kind: Service
metadata: {name: nope, namespace: shop}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
"#,
    );
    m.apply(SourceEvent::Changes {
        apply: svc,
        delete: vec![],
    });
    assert_eq!(routes(&m).len(), 1);
}

#[test]
fn an_unsupported_filter_refuses_the_whole_route_and_a_later_one_keeps_the_last_good() {
    let bad = ROUTE.replace(
        "    - type: RequestHeaderModifier\n      requestHeaderModifier: {add: [{name: x-route, value: canary}]}",
        "    - type: ExtensionRef\n      extensionRef: {group: example.com, kind: Thing, name: t}",
    );
    assert_ne!(bad, ROUTE);
    // Never valid: refused, nothing distributed.
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(&bad));
    m.apply(SourceEvent::Snapshot(objs));
    assert!(routes(&m).is_empty());
    let st = m.route_statuses();
    let p = &st.values().next().unwrap().0.parents[0];
    assert_eq!(
        (p.accepted.status, p.accepted.reason),
        (false, "UnsupportedValue")
    );
    assert!(
        p.accepted.message.contains("spec.rules[0].filters[0].type"),
        "{}",
        p.accepted.message
    );
    // Valid, then broken: the valid version stays in force, reported stale.
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(ROUTE));
    m.apply(SourceEvent::Snapshot(objs));
    m.apply(SourceEvent::Changes {
        apply: objects(&bad),
        delete: vec![],
    });
    let rs = routes(&m);
    assert_eq!(rs.len(), 1);
    assert_eq!(rs[0].rules[0].filters.len(), 1, "the last good version");
    let st = m.route_statuses();
    assert!(st.values().next().unwrap().1.is_some(), "reported stale");
}

#[test]
fn grpc_methods_become_paths_and_cross_namespace_backends_are_refused() {
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: g, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - matches: [{method: {service: pkg.Echo, method: Hello}}]
    backendRefs: [{name: echo-v2, port: 80}]
  - matches: [{method: {service: pkg.Echo}}]
    backendRefs: [{name: echo, namespace: other, port: 80}]
  - matches: [{method: {type: RegularExpression, method: "Get.*"}}]
    backendRefs: [{name: echo, port: 80}]
"#,
    ));
    m.apply(SourceEvent::Snapshot(objs));
    let rs = routes(&m);
    assert_eq!(rs.len(), 1);
    let r = &rs[0];
    assert_eq!(r.kind, pb::route::RouteKind::Grpc as i32);
    let path = |i: usize| {
        let p = r.rules[i].matches[0].path.clone().unwrap();
        (p.kind, p.value)
    };
    assert_eq!(
        path(0),
        (pb::MatchKind::Exact as i32, "/pkg.Echo/Hello".into())
    );
    assert_eq!(path(1), (pb::MatchKind::Prefix as i32, "/pkg.Echo/".into()));
    assert_eq!(
        path(2),
        (pb::MatchKind::Regex as i32, "/[^/]+/(?:Get.*)".into())
    );
    assert!(
        r.rules[1].backends[0].invalid.contains("another namespace"),
        "{}",
        r.rules[1].backends[0].invalid
    );
    let st = m.route_statuses();
    assert_eq!(
        st.values().next().unwrap().0.parents[0]
            .resolved_refs
            .reason,
        "RefNotPermitted"
    );
}

#[test]
fn routes_without_a_service_parent_are_not_weft_s() {
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: ingress, namespace: shop}
spec:
  parentRefs: [{name: public-gateway}]
  rules: [{backendRefs: [{name: echo, port: 80}]}]
"#,
    ));
    m.apply(SourceEvent::Snapshot(objs));
    assert!(routes(&m).is_empty());
    assert!(m.route_statuses().is_empty());
}

#[test]
fn a_reference_grant_lets_a_route_name_another_namespace_s_service() {
    let route = r#"
apiVersion: v1
kind: Namespace
metadata: {name: web}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: web}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: shop}]
  rules:
  - backendRefs: [{name: echo-v2, namespace: shop, port: 80}]
"#;
    let grant = |kind: &str, name: &str| {
        format!(
            r#"
apiVersion: gateway.networking.k8s.io/v1beta1
kind: ReferenceGrant
metadata: {{name: g, namespace: shop}}
spec:
  from: [{{group: gateway.networking.k8s.io, kind: {kind}, namespace: web}}]
  to: [{{group: "", kind: Service, name: {name}}}]
"#
        )
    };
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(route));
    m.apply(SourceEvent::Snapshot(objs));
    let invalid = |m: &Model| routes(m)[0].rules[0].backends[0].invalid.clone();
    assert!(invalid(&m).contains("no ReferenceGrant"), "{}", invalid(&m));
    // A grant for another kind, or another Service, does not help.
    for (kind, name) in [("GRPCRoute", "echo-v2"), ("HTTPRoute", "echo")] {
        m.apply(SourceEvent::Changes {
            apply: objects(&grant(kind, name)),
            delete: vec![],
        });
        assert!(!invalid(&m).is_empty(), "{kind} {name}");
    }
    m.apply(SourceEvent::Changes {
        apply: objects(&grant("HTTPRoute", "echo-v2")),
        delete: vec![],
    });
    assert_eq!(invalid(&m), "");
    let st = m.route_statuses();
    assert!(
        st.values().next().unwrap().0.parents[0]
            .resolved_refs
            .status
    );
    // Withdrawn: refused again.
    m.apply(SourceEvent::Changes {
        apply: vec![],
        delete: vec![crate::manifest::ObjectRef {
            kind: "ReferenceGrant",
            namespace: "shop".into(),
            name: "g".into(),
        }],
    });
    assert!(!invalid(&m).is_empty());
}

#[test]
fn backend_mirrors_need_a_grant_and_framing_headers_cannot_be_modified() {
    let m = model();
    let mut objs = objects(SERVICES);
    objs.extend(objects(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: m, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - backendRefs:
    - name: echo
      port: 80
      filters:
      - {type: RequestMirror, requestMirror: {backendRef: {name: secrets, namespace: vault, port: 80}}}
"#,
    ));
    m.apply(SourceEvent::Snapshot(objs));
    let rs = routes(&m);
    let f = &rs[0].rules[0].backends[0].filters[0];
    match &f.kind {
        Some(pb::route_filter::Kind::Mirror(mi)) => {
            let b = mi.backend.as_ref().unwrap();
            assert_eq!(b.service_namespace, "vault");
            assert!(b.invalid.contains("no ReferenceGrant"), "{}", b.invalid);
        }
        other => panic!("{other:?}"),
    }
    let bad = objects(
        r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: framing, namespace: shop}
spec:
  parentRefs: [{group: "", kind: Service, name: echo}]
  rules:
  - filters:
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: Content-Length, value: "0"}]}}
"#,
    );
    m.apply(SourceEvent::Changes {
        apply: bad,
        delete: vec![],
    });
    let st = m.route_statuses();
    let (_, (s, _)) = st.iter().find(|(r, _)| r.name == "framing").unwrap();
    assert_eq!(s.parents[0].accepted.reason, "UnsupportedValue");
    assert!(
        s.parents[0].accepted.message.contains("content-length"),
        "{}",
        s.parents[0].accepted.message
    );
}
