use super::*;
use crate::manifest::parse_manifests;

fn model() -> Arc<Model> {
    Model::new(
        ModelConfig {
            trust_domain: TrustDomain::new("cluster.local").unwrap(),
            root_namespace: "weft-system".into(),
            trust_bundle_pem: "PEM".into(),
            jwt_jwks: String::new(),
            default_identity_fallback: false,
        },
        std::sync::Arc::new(crate::modules::Offline),
    )
}

fn objects(text: &str) -> Vec<Object> {
    let (o, e) = parse_manifests("t.yaml", text);
    assert!(e.is_empty(), "{e:?}");
    o
}

const BASE: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: legacy}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, uid: u2, labels: {app: db}}
spec: {nodeName: node-b, serviceAccountName: db, containers: [{name: c}]}
status: {podIP: 10.0.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: old-1, namespace: legacy, uid: u3, labels: {app: old}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.0.1.9}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: http}]}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-allow, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/web]}}]}]
"#;

#[test]
fn derives_workloads_services_and_scoped_policies() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    let a: Vec<String> = m.view_of("node-a").iter().map(|r| r.key.clone()).collect();
    let b: Vec<String> = m.view_of("node-b").iter().map(|r| r.key.clone()).collect();
    assert_eq!(
        a,
        vec![
            "Service/shop/web",
            "TrustBundle/-/cluster.local",
            "Workload/legacy/old-1",
            "Workload/shop/db-1",
            "Workload/shop/web-1",
        ]
    );
    assert!(b.contains(&"AuthorizationPolicy/shop/db-allow".to_string()));
    let st = m.read_state();
    let Some(Kind::Service(svc)) = &st.entries["Service/shop/web"].resource.kind else {
        panic!()
    };
    assert_eq!(svc.endpoints.len(), 1);
    assert_eq!(svc.endpoints[0].target_ports[&80], 8080);
    let Some(Kind::Workload(w)) = &st.entries["Workload/legacy/old-1"].resource.kind else {
        panic!()
    };
    assert!(!w.enrolled);
    let Some(Kind::Workload(w)) = &st.entries["Workload/shop/web-1"].resource.kind else {
        panic!()
    };
    assert!(w.enrolled);
    assert_eq!(w.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    drop(st);
    assert!(m.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/web"));
    assert!(!m.node_runs_identity("node-b", "spiffe://cluster.local/ns/shop/sa/web"));
    assert!(!m.node_runs_identity("node-a", "spiffe://cluster.local/ns/legacy/sa/default"));
}

#[test]
fn changes_are_announced_once_and_only_when_content_changes() {
    let m = model();
    let mut rx = m.subscribe();
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    let first = rx.try_recv().unwrap();
    assert!(first.keys.len() >= 5);
    // Same snapshot again: no change batch.
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    assert!(rx.try_recv().is_err());
    // Opt the db pod out: its workload changes, and the policy is no longer visible on node-b.
    let text = BASE.replace(
        "name: db-1, namespace: shop, uid: u2, labels: {app: db}",
        "name: db-1, namespace: shop, uid: u2, labels: {app: db, weft.dev/mesh: disabled}",
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    let b = rx.try_recv().unwrap();
    let mut keys: Vec<&str> = b.keys.iter().map(|k| &**k).collect();
    keys.sort();
    assert_eq!(
        keys,
        vec!["AuthorizationPolicy/shop/db-allow", "Workload/shop/db-1"]
    );
    assert!(!m
        .view_of("node-b")
        .iter()
        .any(|r| r.key == "AuthorizationPolicy/shop/db-allow"));
    assert!(!m.node_runs_identity("node-b", "spiffe://cluster.local/ns/shop/sa/db"));
}

#[test]
fn namespace_label_removal_unenrolls() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    let text = BASE.replace(
        "{name: shop, labels: {weft.dev/mesh: enabled}}",
        "{name: shop}",
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    assert!(!m.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/web"));
    let st = m.read_state();
    let Some(Kind::Workload(w)) = &st.entries["Workload/shop/web-1"].resource.kind else {
        panic!()
    };
    assert!(!w.enrolled);
}

#[test]
fn invalid_policy_is_distributed_fail_closed_with_status() {
    let m = model();
    let text = format!(
        "{BASE}\n---\n{}",
        r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: bad-deny, namespace: shop}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["999.1.1.1"]}}]}]
"#
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    let st = m.read_state();
    let Some(Kind::AuthorizationPolicy(p)) = &st.entries["AuthorizationPolicy/shop/bad-deny"]
        .resource
        .kind
    else {
        panic!()
    };
    assert_eq!(
        p.rules,
        vec![pb::Rule::default()],
        "invalid DENY must match everything"
    );
    drop(st);
    let statuses = m.statuses();
    let s = statuses
        .iter()
        .find(|(r, _)| r.name == "bad-deny")
        .map(|(_, s)| s)
        .unwrap();
    assert_eq!(
        s.report.errors[0].field,
        "spec.rules[0].from[0].source.ipBlocks[0]"
    );
}

#[test]
fn l7_rules_are_reported_enforced_or_not_enforceable() {
    let m = model();
    let text = format!(
        "{BASE}\n---\n{}",
        r#"apiVersion: v1
kind: Service
metadata: {name: db, namespace: shop}
spec: {clusterIP: 10.96.0.11, selector: {app: db}, ports: [{name: pg, port: 5432, appProtocol: tcp}]}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: l7, namespace: shop}
spec:
  rules:
    - to: [{operation: {ports: ["8080"], methods: ["GET"], paths: ["/api/*"]}}]
    - to: [{operation: {ports: ["5432"], paths: ["/x"]}}]
    - from: [{source: {namespaces: ["shop"]}}]
"#
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    let statuses = m.statuses();
    let s = statuses
        .iter()
        .find(|(r, _)| r.name == "l7")
        .map(|(_, s)| s)
        .unwrap();
    assert!(s.report.is_valid());
    assert_eq!(s.l7_enforced.len(), 2, "{:?}", s.l7_enforced);
    assert!(s.l7_enforced[0].starts_with("spec.rules[0]: methods, paths enforced per request"));
    assert!(s.l7_enforced[0].ends_with("an ALLOW rule never matches it"));
    assert_eq!(s.report.unsupported.len(), 1, "{:?}", s.report.unsupported);
    assert_eq!(
        s.report.unsupported[0].field,
        "spec.rules[1].to[0].operation.ports"
    );
    assert!(s.report.unsupported[0].message.contains("Service db"));
}

#[test]
fn delete_removes_resources() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    let mut rx = m.subscribe();
    m.apply(SourceEvent::Changes {
        apply: vec![],
        delete: vec![ObjectRef {
            kind: "Pod",
            namespace: "shop".into(),
            name: "web-1".into(),
        }],
    });
    let b = rx.try_recv().unwrap();
    let mut keys: Vec<&str> = b.keys.iter().map(|k| &**k).collect();
    keys.sort();
    assert_eq!(keys, vec!["Service/shop/web", "Workload/shop/web-1"]);
    assert!(!m.read_state().entries.contains_key("Workload/shop/web-1"));
}

const DENY_V1: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: db-deny, namespace: shop, generation: 1}
spec:
  selector: {matchLabels: {app: db}}
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
"#;

fn policy_rules(m: &Model, key: &str) -> Option<(String, Vec<pb::Rule>)> {
    let st = m.read_state();
    let e = st.entries.get(key)?;
    let Some(Kind::AuthorizationPolicy(p)) = &e.resource.kind else {
        panic!("{key} is not a policy")
    };
    Some((e.resource.version.clone(), p.rules.clone()))
}

fn db_deny() -> ObjectRef {
    ObjectRef {
        kind: "AuthorizationPolicy",
        namespace: "shop".into(),
        name: "db-deny".into(),
    }
}

#[test]
fn an_update_that_does_not_validate_keeps_the_last_valid_version_in_force() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(&format!(
        "{BASE}---\n{DENY_V1}"
    ))));
    let key = "AuthorizationPolicy/shop/db-deny";
    let good = policy_rules(&m, key).unwrap();
    assert_eq!(good.1[0].from[0].namespaces, vec!["legacy"]);
    assert!(m.stale().is_empty());

    // Generation 2 has an invalid IP block: generation 1 stays in force, unchanged.
    let mut rx = m.subscribe();
    let bad = DENY_V1
        .replace("generation: 1", "generation: 2")
        .replace("namespaces: [legacy]", "ipBlocks: [\"999.1.1.1\"]");
    m.apply(SourceEvent::Changes {
        apply: objects(&bad),
        delete: vec![],
    });
    assert_eq!(policy_rules(&m, key), Some(good.clone()));
    assert!(
        rx.try_recv().is_err(),
        "nothing is pushed to the nodes for the invalid version"
    );
    let stale = m.stale();
    let s = &stale[&db_deny()];
    assert_eq!(s.generation, Some(2));
    assert_eq!(
        s.errors[0].field,
        "spec.rules[0].from[0].source.ipBlocks[0]"
    );
    let st = &m.statuses()[&db_deny()];
    assert!(
        st.report.is_valid(),
        "the status describes the version in force"
    );
    assert_eq!(st.generation, Some(1));
    assert_eq!(st.stale.as_ref(), Some(s));

    // A valid generation 3 replaces it and clears the staleness.
    let fixed = DENY_V1
        .replace("generation: 1", "generation: 3")
        .replace("[legacy]", "[legacy, other]");
    m.apply(SourceEvent::Changes {
        apply: objects(&fixed),
        delete: vec![],
    });
    let (_, rules) = policy_rules(&m, key).unwrap();
    assert_eq!(rules[0].from[0].namespaces, vec!["legacy", "other"]);
    assert!(m.stale().is_empty());
    assert_eq!(m.statuses()[&db_deny()].stale, None);

    // Invalid again, then deleted: deleting still deletes.
    m.apply(SourceEvent::Changes {
        apply: objects(&bad),
        delete: vec![],
    });
    assert!(policy_rules(&m, key).is_some());
    m.apply(SourceEvent::Changes {
        apply: vec![],
        delete: vec![db_deny()],
    });
    assert_eq!(policy_rules(&m, key), None);
    assert!(m.stale().is_empty());
}

#[test]
fn an_object_reported_as_not_parsing_is_kept_and_reported_stale() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(&format!(
        "{BASE}---\n{DENY_V1}"
    ))));
    let key = "AuthorizationPolicy/shop/db-deny";
    let good = policy_rules(&m, key).unwrap();
    let err = |r: ObjectRef, field: &str| ManifestError {
        file: "kubernetes".into(),
        object: Some(r.to_string()),
        object_ref: Some(r),
        generation: Some(7),
        field: Some(field.into()),
        message: "unknown variant `DENNY`".into(),
        ..Default::default()
    };
    let never_parsed = ObjectRef {
        kind: "AuthorizationPolicy",
        namespace: "shop".into(),
        name: "new".into(),
    };
    m.apply(SourceEvent::Errors(vec![
        err(db_deny(), "spec.action"),
        err(never_parsed.clone(), "spec.action"),
    ]));
    // A full snapshot without it (the source could not parse it) does not delete it.
    m.apply(SourceEvent::Snapshot(objects(BASE)));
    assert_eq!(policy_rules(&m, key), Some(good));
    let stale = m.stale();
    assert_eq!(
        stale.keys().cloned().collect::<Vec<_>>(),
        vec![db_deny()],
        "an object that never parsed is only rejected"
    );
    assert_eq!(stale[&db_deny()].generation, Some(7));
    assert_eq!(
        stale[&db_deny()].errors[0].to_string(),
        "spec.action: unknown variant `DENNY`"
    );
    assert!(m.statuses()[&db_deny()].stale.is_some());
    // Fixed at the source: no longer stale.
    m.apply(SourceEvent::Errors(vec![]));
    assert!(m.stale().is_empty());
}

const NO_IDENTITY: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: etcd-node-a
  namespace: shop
  uid: m1
  annotations: {kubernetes.io/config.mirror: "abc"}
  labels: {app: db}
spec: {nodeName: node-a, serviceAccountName: db, containers: [{name: c}]}
status: {podIP: 10.0.1.20}
---
apiVersion: v1
kind: Pod
metadata:
  name: static-node-a
  namespace: shop
  uid: m2
  ownerReferences: [{apiVersion: v1, kind: Node, name: node-a, uid: n1}]
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.0.1.21}
---
apiVersion: v1
kind: Pod
metadata: {name: no-sa, namespace: shop, uid: m3}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.0.1.22}
"#;

fn workload(m: &Model, key: &str) -> pb::Workload {
    let st = m.read_state();
    let Some(Kind::Workload(w)) = &st.entries[key].resource.kind else {
        panic!("{key}")
    };
    w.clone()
}

#[test]
fn mirror_pods_and_pods_without_a_service_account_get_no_identity() {
    let m = model();
    m.apply(SourceEvent::Snapshot(objects(&format!(
        "{BASE}---{NO_IDENTITY}"
    ))));
    for name in ["etcd-node-a", "static-node-a", "no-sa"] {
        let w = workload(&m, &format!("Workload/shop/{name}"));
        assert!(!w.enrolled, "{name} must not be enrolled");
        assert_eq!(w.spiffe_id, "", "{name} must get no identity");
    }
    // No certificate either: the same-node rule finds no enrolled workload.
    assert!(!m.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/default"));
    assert!(!m.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/db"));
    // An ordinary pod of the same namespace is unaffected.
    assert!(workload(&m, "Workload/shop/web-1").enrolled);
    let refused = m.refused_pods();
    let names: Vec<&str> = refused.iter().map(|(p, _)| p.as_str()).collect();
    assert_eq!(
        names,
        vec!["shop/etcd-node-a", "shop/no-sa", "shop/static-node-a"]
    );
    assert!(refused[0].1.contains("kubernetes.io/config.mirror"));
    assert!(refused[1].1.contains("no ServiceAccount"));
    assert!(refused[2].1.contains("owned by a Node"));

    // Opt-in: the old behaviour, `default`'s identity.
    let m = Model::new(
        ModelConfig {
            default_identity_fallback: true,
            ..model().config().clone()
        },
        std::sync::Arc::new(crate::modules::Offline),
    );
    m.apply(SourceEvent::Snapshot(objects(&format!(
        "{BASE}---{NO_IDENTITY}"
    ))));
    let w = workload(&m, "Workload/shop/no-sa");
    assert!(w.enrolled);
    assert_eq!(w.spiffe_id, "spiffe://cluster.local/ns/shop/sa/default");
    assert!(workload(&m, "Workload/shop/static-node-a").enrolled);
    assert!(m.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/db"));
    assert!(m.refused_pods().is_empty());
}

fn peer_authn(m: &Model, key: &str) -> Option<pb::PeerAuthentication> {
    match m.read_state().entries.get(key)?.resource.kind.as_ref()? {
        Kind::PeerAuthentication(p) => Some(p.clone()),
        _ => None,
    }
}

#[test]
fn peer_authentications_are_distributed_with_their_scope_and_fail_closed() {
    use pb::peer_authentication::MtlsMode;
    let m = model();
    let text = format!(
        "{BASE}\n---\n{}",
        r#"apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: mesh, namespace: weft-system, creationTimestamp: "2026-01-02T03:04:05Z"}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: db, namespace: shop}
spec:
  selector: {matchLabels: {app: db}}
  mtls: {mode: UNSET}
  portLevelMtls: {"9090": {mode: PERMISSIVE}}
---
apiVersion: security.weft.dev/v1alpha1
kind: PeerAuthentication
metadata: {name: typo, namespace: shop}
spec:
  portLevelMtls: {"http": {mode: PERMISSIVE}}
"#
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    let mesh = peer_authn(&m, "PeerAuthentication/weft-system/mesh").expect("mesh-wide");
    assert!(mesh.mesh_wide);
    assert_eq!(mesh.mode, MtlsMode::Strict as i32);
    assert_eq!(mesh.created, 1_767_323_045);
    let db = peer_authn(&m, "PeerAuthentication/shop/db").expect("workload-level");
    assert!(!db.mesh_wide);
    assert_eq!(db.mode, MtlsMode::Unset as i32);
    assert_eq!(db.port_modes, [(9090, MtlsMode::Permissive as i32)].into());
    // Only the node running the selected workload gets a workload-level one.
    let st = m.read_state();
    let e = &st.entries["PeerAuthentication/shop/db"];
    assert!(e.visible_to("node-b") && !e.visible_to("node-a"));
    // Mesh-wide: every node that runs an enrolled workload.
    let e = &st.entries["PeerAuthentication/weft-system/mesh"];
    assert!(e.visible_to("node-a") && e.visible_to("node-b"));
    drop(st);
    // Invalid: distributed as STRICT, its status names the field.
    let typo = peer_authn(&m, "PeerAuthentication/shop/typo").expect("invalid, fail closed");
    assert_eq!(typo.mode, MtlsMode::Strict as i32);
    assert!(typo.port_modes.is_empty());
    let statuses = m.statuses();
    let fields: Vec<&str> = statuses
        .iter()
        .find(|(r, _)| r.name == "typo")
        .map(|(_, s)| s.report.errors.iter().map(|e| e.field.as_str()).collect())
        .unwrap();
    assert_eq!(fields, ["spec.portLevelMtls", "spec.portLevelMtls[http]"]);
}

#[test]
fn request_authentications_carry_their_key_sets_and_say_when_one_is_missing() {
    struct Fixed;
    impl crate::jwks::JwksSource for Fixed {
        fn resolve(self: Arc<Self>, _ns: &str, uri: &str) -> crate::jwks::JwksResolved {
            match uri {
                "https://pending.example/keys" => crate::jwks::JwksResolved::Pending,
                _ => crate::jwks::JwksResolved::Failed(format!("GET {uri}: http status: 404")),
            }
        }
        fn set_on_fetched(&self, _f: Box<dyn Fn(String) + Send + Sync>) {}
    }
    let m = model();
    m.set_jwks_source(Arc::new(Fixed));
    let text = format!(
        "{BASE}\n---\n{}",
        r#"apiVersion: security.weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - issuer: "https://pending.example"
    jwksUri: "https://pending.example/keys"
    fromHeaders: [{name: x-token}]
  - issuer: "https://gone.example"
    jwksUri: "https://gone.example/keys"
  - issuer: "https://inline.example"
    jwks: '{"keys": []}'
"#
    );
    m.apply(SourceEvent::Snapshot(objects(&text)));
    let ra = match m.read_state().entries["RequestAuthentication/shop/jwt"]
        .resource
        .kind
        .clone()
    {
        Some(Kind::RequestAuthentication(r)) => r,
        other => panic!("{other:?}"),
    };
    let rules: Vec<(&str, &str, &str)> = ra
        .rules
        .iter()
        .map(|r| (r.issuer.as_str(), r.jwks.as_str(), r.jwks_error.as_str()))
        .collect();
    assert_eq!(
        rules[..2],
        [
            (
                "https://pending.example",
                "",
                "the key set is being fetched"
            ),
            (
                "https://gone.example",
                "",
                "GET https://gone.example/keys: http status: 404"
            ),
        ]
    );
    assert!(rules[2].1.is_empty() && !rules[2].2.is_empty(), "{rules:?}");
    assert_eq!(ra.rules[0].from_headers[0].name, "x-token");
    let statuses = m.statuses();
    let st = statuses
        .iter()
        .find(|(r, _)| r.name == "jwt")
        .map(|(_, s)| s)
        .unwrap();
    let fields: Vec<&str> = st.report.errors.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.jwtRules[1].jwksUri", "spec.jwtRules[2].jwks.keys"],
        "{st:?}"
    );
}

/// A resource's version is the hash of its encoding: two models built from the same
/// objects give every resource the same version, also when it holds maps of several
/// entries (labels, selectors, target ports). With prost's default HashMaps the order
/// of their entries, so the version, changed from one derivation to the next (found by
/// the `manifest` fuzz target).
#[test]
fn versions_do_not_depend_on_map_order() {
    let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web, tier: front, version: v1, pod-template-hash: abc}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c, ports: [{name: http, containerPort: 8080}, {name: admin, containerPort: 9090}]}]}
status: {podIP: 10.0.1.5}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web, tier: front}, ports: [{name: http, port: 80, targetPort: http}, {name: admin, port: 90, targetPort: admin}]}
"#;
    let versions = || -> Vec<(String, String)> {
        let m = model();
        m.apply(SourceEvent::Snapshot(objects(text)));
        let st = m.read_state();
        let mut v: Vec<(String, String)> = st
            .entries
            .iter()
            .map(|(k, e)| (k.to_string(), e.resource.version.clone()))
            .collect();
        v.sort();
        v
    };
    let first = versions();
    assert!(first.len() >= 3, "{first:?}");
    for _ in 0..20 {
        assert_eq!(versions(), first);
    }
}
