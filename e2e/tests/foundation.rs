//! Foundation end to end: a real control plane and real node agents as processes,
//! real gRPC over TLS on loopback.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};
use weft_e2e::standalone::{cert_ids, keys};
use weft_e2e::{http_get, StandaloneMesh};
use weft_proto::pb;

fn example() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/standalone"
    ))
}

fn synced(d: &serde_json::Value) -> bool {
    d["synced"] == true
}

fn mesh(extra: &[&str]) -> StandaloneMesh {
    let mut m = StandaloneMesh::new(Some(example()), extra).expect("mesh dir");
    m.start_control_plane().expect("control plane");
    m.start_node("node-a").expect("node-a");
    m.start_node("node-b").expect("node-b");
    for n in ["node-a", "node-b"] {
        m.wait_node(n, Duration::from_secs(20), "initial sync", synced)
            .unwrap();
    }
    m
}

const NEW_POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  name: cart-1
  namespace: shop
  uid: cart-1-uid
  labels: {app: cart}
spec:
  nodeName: node-b
  serviceAccountName: cart
  containers: [{name: cart}]
status:
  podIP: 10.244.2.40
"#;

#[test]
fn each_node_gets_its_view_and_certificates() {
    let m = mesh(&[]);
    let a = m
        .wait_node("node-a", Duration::from_secs(10), "certificate", |d| {
            !cert_ids(d).is_empty()
        })
        .unwrap();
    let b = m
        .wait_node("node-b", Duration::from_secs(10), "certificates", |d| {
            cert_ids(d).len() == 2
        })
        .unwrap();
    // Every node gets every workload and service...
    for d in [&a, &b] {
        assert_eq!(
            keys(d, "workloads"),
            vec![
                "Workload/legacy/batch-1",
                "Workload/payments/ledger-1",
                "Workload/shop/debug",
                "Workload/shop/web-1",
                "Workload/shop/web-2"
            ]
        );
        assert_eq!(
            keys(d, "services"),
            vec!["Service/payments/ledger", "Service/shop/web"]
        );
    }
    // ...but policies and certificates only for its own workloads.
    assert!(keys(&a, "policies").is_empty());
    assert_eq!(
        keys(&b, "policies"),
        vec!["AuthorizationPolicy/payments/ledger-allow-web"]
    );
    assert_eq!(cert_ids(&a), vec!["spiffe://cluster.local/ns/shop/sa/web"]);
    assert_eq!(
        cert_ids(&b),
        vec![
            "spiffe://cluster.local/ns/payments/sa/ledger",
            "spiffe://cluster.local/ns/shop/sa/web"
        ]
    );
    // The dump never contains a private key.
    let text = serde_json::to_string(&a).unwrap();
    assert!(!text.contains("PRIVATE KEY"));
    assert!(text.contains("BEGIN CERTIFICATE"));
    let (status, _) = http_get(&m.node_admin("node-a"), "/healthz/ready").unwrap();
    assert_eq!(status, 200);
}

#[test]
fn a_new_pod_file_reaches_the_right_node_within_a_second() {
    let m = mesh(&[]);
    let t0 = Instant::now();
    m.write_manifest("cart.yaml", NEW_POD).unwrap();
    m.wait_node("node-b", Duration::from_secs(1), "cart workload", |d| {
        keys(d, "workloads").contains(&"Workload/shop/cart-1".to_string())
    })
    .unwrap();
    let took = t0.elapsed();
    // node-b now runs an enrolled shop/cart: it gets that certificate; node-a does not.
    m.wait_node("node-b", Duration::from_secs(5), "cart certificate", |d| {
        cert_ids(d).contains(&"spiffe://cluster.local/ns/shop/sa/cart".to_string())
    })
    .unwrap();
    let a = m.config_dump("node-a").unwrap();
    assert!(keys(&a, "workloads").contains(&"Workload/shop/cart-1".to_string()));
    assert!(!cert_ids(&a).contains(&"spiffe://cluster.local/ns/shop/sa/cart".to_string()));
    eprintln!("pod file -> node-b config in {took:?}");

    // Deleting the file removes the workload and drops the certificate.
    m.remove_manifest("cart.yaml").unwrap();
    m.wait_node("node-b", Duration::from_secs(5), "cart removal", |d| {
        !keys(d, "workloads").contains(&"Workload/shop/cart-1".to_string())
            && !cert_ids(d).contains(&"spiffe://cluster.local/ns/shop/sa/cart".to_string())
    })
    .unwrap();
}

#[test]
fn opt_out_label_unenrolls_and_moves_policy_visibility() {
    let m = mesh(&[]);
    let text = std::fs::read_to_string(example().join("payments.yaml"))
        .unwrap()
        .replace(
            "labels: {app: ledger}",
            "labels: {app: ledger, weft.dev/mesh: disabled}",
        );
    m.write_manifest("payments.yaml", &text).unwrap();
    let b = m
        .wait_node("node-b", Duration::from_secs(5), "ledger opt-out", |d| {
            d["workloads"]["Workload/payments/ledger-1"]["enrolled"] == false
                && keys(d, "policies").is_empty()
        })
        .unwrap();
    m.wait_node(
        "node-b",
        Duration::from_secs(5),
        "ledger cert dropped",
        |d| !cert_ids(d).contains(&"spiffe://cluster.local/ns/payments/sa/ledger".to_string()),
    )
    .unwrap();
    assert_eq!(
        b["workloads"]["Workload/payments/ledger-1"]["enrolled"],
        false
    );
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

async fn channel(m: &StandaloneMesh, node: &str, with_identity: bool) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let dir = m.credential_dir(node);
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")))
        .domain_name("weft-control-plane");
    if with_identity {
        tls = tls.identity(Identity::from_pem(read("node.crt"), read("node.key")));
    }
    Endpoint::from_shared(m.grpc_url())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn csr(id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    p.serialize_request(&key).unwrap().der().to_vec()
}

#[test]
fn same_node_rule_and_node_authentication() {
    let m = mesh(&[]);
    rt().block_on(async {
        let mut a =
            pb::certificates_client::CertificatesClient::new(channel(&m, "node-a", true).await);
        // ledger runs only on node-b: node-a may not have its identity.
        let ledger = "spiffe://cluster.local/ns/payments/sa/ledger";
        let err = a
            .sign(pb::SignRequest {
                spiffe_id: ledger.into(),
                csr_der: csr(ledger),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
        assert!(
            err.message().contains("node \"node-a\""),
            "{}",
            err.message()
        );
        // web runs on node-a: fine.
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let ok = a
            .sign(pb::SignRequest {
                spiffe_id: web.into(),
                csr_der: csr(web),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(ok.cert_chain_pem.contains("BEGIN CERTIFICATE"));
        // A CSR for another identity than the one requested.
        let err = a
            .sign(pb::SignRequest {
                spiffe_id: web.into(),
                csr_der: csr(ledger),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        // Garbage CSR.
        let err = a
            .sign(pb::SignRequest {
                spiffe_id: web.into(),
                csr_der: b"garbage".to_vec(),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);

        // node-a's credential cannot subscribe as node-b.
        let mut cfg =
            pb::node_config_client::NodeConfigClient::new(channel(&m, "node-a", true).await);
        let hello = pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
                node: "node-b".into(),
                known_versions: Default::default(),
            })),
        };
        let err = cfg.subscribe(tokio_stream_once(hello)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);

        // No client certificate at all.
        let mut anon =
            pb::certificates_client::CertificatesClient::new(channel(&m, "node-a", false).await);
        let err = anon
            .sign(pb::SignRequest {
                spiffe_id: web.into(),
                csr_der: csr(web),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated);
    });
    // Refusals are logged with node and identity, and counted by reason.
    let metrics = m.cp_metrics().unwrap();
    assert!(
        metrics.contains("weft_cp_certificate_refusals_total{reason=\"not_on_node\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("weft_cp_certificate_refusals_total{reason=\"san_mismatch\"} 1"));
    assert!(metrics.contains("weft_cp_certificate_refusals_total{reason=\"malformed_csr\"} 1"));
    assert!(metrics.contains("weft_cp_certificate_refusals_total{reason=\"unauthenticated\"} 1"));
    let log = m.cp_log();
    assert!(
        log.lines()
            .any(|l| l.contains("certificate request refused")
                && l.contains("node-a")
                && l.contains("spiffe://cluster.local/ns/payments/sa/ledger")),
        "{log}"
    );
}

fn tokio_stream_once(
    m: pb::SubscribeRequest,
) -> impl tonic::codegen::tokio_stream::Stream<Item = pb::SubscribeRequest> {
    tonic::codegen::tokio_stream::iter(vec![m])
}

#[test]
fn certificates_are_renewed_before_expiry() {
    let m = mesh(&["--svid-ttl", "6s"]);
    let first = m
        .wait_node("node-a", Duration::from_secs(10), "certificate", |d| {
            !cert_ids(d).is_empty()
        })
        .unwrap();
    let serial = first["certificates"][0]["serial"]
        .as_str()
        .unwrap()
        .to_string();
    // Not renewed too early (no renewal storm)...
    std::thread::sleep(Duration::from_millis(2000));
    let d = m.config_dump("node-a").unwrap();
    assert_eq!(
        d["certificates"][0]["serial"].as_str(),
        Some(serial.as_str()),
        "renewed before half life"
    );
    // ...but at half life (3 s) plus up to 10 % jitter, well before expiry.
    let renewed = m
        .wait_node("node-a", Duration::from_secs(4), "renewal", |d| {
            d["certificates"][0]["serial"]
                .as_str()
                .is_some_and(|s| s != serial)
        })
        .unwrap();
    assert_eq!(
        renewed["certificates"][0]["spiffe_id"],
        "spiffe://cluster.local/ns/shop/sa/web"
    );
    // Over ~5 s with a 6 s TTL: three identities issued once, and renewed about once each.
    let metrics = m.cp_metrics().unwrap();
    let signed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("weft_cp_certificates_signed_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    assert!(
        (3..=8).contains(&signed),
        "signed {signed} certificates: renewal storm?"
    );
}

#[test]
fn control_plane_restart_loses_no_update() {
    let mut m = mesh(&[]);
    m.kill_control_plane();
    // Nodes keep serving their last good config (fail-static).
    for n in ["node-a", "node-b"] {
        let d = m.config_dump(n).unwrap();
        assert!(synced(&d));
        assert_eq!(keys(&d, "workloads").len(), 5);
    }
    // Changes made while the control plane is down: one pod added, one service removed.
    m.write_manifest("cart.yaml", NEW_POD).unwrap();
    let shop = std::fs::read_to_string(example().join("shop.yaml")).unwrap();
    let without_svc = shop
        .split("---")
        .filter(|d| !d.contains("kind: Service"))
        .collect::<Vec<_>>()
        .join("---");
    m.write_manifest("shop.yaml", &without_svc).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(m.config_dump("node-b").unwrap()["workloads"]["Workload/shop/cart-1"].is_null());

    m.start_control_plane().unwrap();
    for n in ["node-a", "node-b"] {
        m.wait_node(
            n,
            Duration::from_secs(20),
            "convergence after restart",
            |d| {
                keys(d, "workloads").contains(&"Workload/shop/cart-1".to_string())
                    && keys(d, "services") == vec!["Service/payments/ledger"]
            },
        )
        .unwrap();
    }
    // The node resumed with its known versions: the control plane sent only the difference.
    let log = m.cp_log();
    assert!(log.contains("known=8") || log.contains("known=9"), "{log}");
    // And it still issues certificates for the new workload.
    m.wait_node("node-b", Duration::from_secs(10), "cart certificate", |d| {
        cert_ids(d).contains(&"spiffe://cluster.local/ns/shop/sa/cart".to_string())
    })
    .unwrap();
}

#[test]
fn bad_manifests_are_reported_and_the_rest_is_served() {
    let m = mesh(&[]);
    m.write_manifest(
        "broken.yaml",
        r#"
apiVersion: v1
kind: Service
metadata: {name: bad, namespace: shop}
spec:
  ports: [{port: "eighty"}]
---
apiVersion: v1
kind: Pod
metadata: {name: cart-2, namespace: shop, labels: {app: cart}}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.244.1.50}
"#,
    )
    .unwrap();
    m.wait_node(
        "node-a",
        Duration::from_secs(5),
        "good document of a file with a bad one",
        |d| keys(d, "workloads").contains(&"Workload/shop/cart-2".to_string()),
    )
    .unwrap();
    let status = m.cp_status().unwrap();
    let errs: Vec<String> = status["source_errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e.as_str().unwrap().to_string())
        .collect();
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(
        errs[0].starts_with("broken.yaml document 0 (Service shop/bad) field spec.ports[0].port:"),
        "{}",
        errs[0]
    );
    // Invalid YAML in another file breaks nothing else.
    m.write_manifest("garbage.yaml", "kind: [unterminated\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(400));
    let d = m.config_dump("node-a").unwrap();
    assert_eq!(keys(&d, "services").len(), 2);
    let status = m.cp_status().unwrap();
    assert_eq!(status["source_errors"].as_array().unwrap().len(), 2);
}

#[test]
fn a_nacked_update_does_not_wedge_the_stream() {
    let m = mesh(&[]);
    // The control plane accepts any string as podIP; the node rejects a non-IP (NACK)...
    m.write_manifest(
        "weird.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata: {name: weird, namespace: legacy}
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: "not-an-ip"}
"#,
    )
    .unwrap();
    let admin = m.cp_admin();
    weft_e2e::wait_until(Duration::from_secs(5), || {
        let (_, body) = http_get(&admin, "/debug/status").ok()?;
        body.contains("not-an-ip").then_some(())
    })
    .expect("NACK reason reported in status");
    assert!(m.cp_log().contains("node rejected an update (NACK)"));
    // ...and the next update still arrives.
    m.write_manifest("cart.yaml", NEW_POD).unwrap();
    let d = m
        .wait_node("node-a", Duration::from_secs(5), "update after NACK", |d| {
            keys(d, "workloads").contains(&"Workload/shop/cart-1".to_string())
        })
        .unwrap();
    assert!(d["workloads"]["Workload/legacy/weird"].is_null());
}

const DENY_LEGACY: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-deny-legacy, namespace: payments}
spec:
  selector: {matchLabels: {app: ledger}}
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
"#;

/// The control plane's stale objects: (object, first error).
fn stale(m: &StandaloneMesh) -> Vec<(String, String)> {
    m.cp_status().unwrap()["stale"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["object"].as_str().unwrap().to_string(),
                s["errors"][0].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[test]
fn a_policy_edited_into_an_invalid_form_stays_in_force() {
    let m = mesh(&[]);
    m.write_manifest("deny.yaml", DENY_LEGACY).unwrap();
    let d = m
        .wait_node("node-b", Duration::from_secs(5), "deny policy", |d| {
            keys(d, "policies").len() == 2
        })
        .unwrap();
    let policies = d["policies"].clone();

    // A typo: the DENY document no longer parses. A field the schema rejects: the
    // ALLOW policy no longer validates. Both stay in force on the node, unchanged.
    m.write_manifest(
        "deny.yaml",
        &DENY_LEGACY.replace("namespaces:", "namespacez:"),
    )
    .unwrap();
    let payments = std::fs::read_to_string(example().join("payments.yaml"))
        .unwrap()
        .replace("ports: [\"9090\"]", "ports: [\"90x90\"]");
    m.write_manifest("payments.yaml", &payments).unwrap();
    // A change reaches the nodes within tens of milliseconds (see above): watch for 1.5 s.
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            m.config_dump("node-b").unwrap()["policies"],
            policies,
            "the node's policies changed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let s = weft_e2e::wait_until(Duration::from_secs(5), || {
        let s = stale(&m);
        (s.len() == 2).then_some(s)
    })
    .unwrap_or_else(|| panic!("both reported stale: {:?}", stale(&m)));
    assert_eq!(s[0].0, "AuthorizationPolicy payments/ledger-allow-web");
    assert!(
        s[0].1
            .starts_with("spec.rules[0].to[0].operation.ports[0]:"),
        "{}",
        s[0].1
    );
    assert_eq!(s[1].0, "AuthorizationPolicy payments/ledger-deny-legacy");
    assert!(
        s[1].1
            .starts_with("spec.rules[0].from[0].source.namespacez: deny.yaml document 0:"),
        "{}",
        s[1].1
    );
    assert!(m.cp_log().contains("the last valid version stays in force"));

    // Deleting the file still deletes the policy.
    m.remove_manifest("deny.yaml").unwrap();
    m.wait_node(
        "node-b",
        Duration::from_secs(5),
        "deny policy removed",
        |d| keys(d, "policies") == vec!["AuthorizationPolicy/payments/ledger-allow-web"],
    )
    .unwrap();
    assert_eq!(stale(&m).len(), 1);
}

#[test]
fn a_mirror_pod_gets_no_identity() {
    let m = mesh(&[]);
    // A static pod's mirror, as a node could create it in any namespace.
    m.write_manifest(
        "mirror.yaml",
        r#"
apiVersion: v1
kind: Pod
metadata:
  name: sneaky-node-a
  namespace: shop
  uid: mirror-1
  annotations: {kubernetes.io/config.mirror: "0123"}
  ownerReferences: [{apiVersion: v1, kind: Node, name: node-a, uid: node-a-uid}]
spec: {nodeName: node-a, containers: [{name: c}]}
status: {podIP: 10.244.1.60}
"#,
    )
    .unwrap();
    let d = m
        .wait_node(
            "node-a",
            Duration::from_secs(5),
            "mirror pod workload",
            |d| !d["workloads"]["Workload/shop/sneaky-node-a"].is_null(),
        )
        .unwrap();
    let w = &d["workloads"]["Workload/shop/sneaky-node-a"];
    assert_eq!(w["enrolled"], false, "{w}");
    assert_eq!(w["spiffe_id"], "", "{w}");
    let status = m.cp_status().unwrap();
    assert_eq!(status["not_enrolled"][0]["pod"], "shop/sneaky-node-a");
    assert!(status["not_enrolled"][0]["reason"]
        .as_str()
        .unwrap()
        .contains("mirror pod"));
    // node-a cannot obtain the namespace's default identity through it.
    rt().block_on(async {
        let mut a =
            pb::certificates_client::CertificatesClient::new(channel(&m, "node-a", true).await);
        let id = "spiffe://cluster.local/ns/shop/sa/default";
        let err = a
            .sign(pb::SignRequest {
                spiffe_id: id.into(),
                csr_der: csr(id),
            })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err}");
    });
    assert!(m
        .cp_log()
        .contains("pod not enrolled: it gets no mesh identity"));
}

/// A counter or gauge of the control plane's /metrics (0 when absent).
fn cp_metric(m: &StandaloneMesh, series: &str) -> u64 {
    m.cp_metrics()
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
        .unwrap_or(0)
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool, log: impl Fn() -> String) {
    let end = Instant::now() + timeout;
    while !f() {
        assert!(
            Instant::now() < end,
            "timed out waiting for {what}\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn pod_on(name: &str, node: &str, ip: &str) -> String {
    NEW_POD
        .replace("cart-1", name)
        .replace("node-b", node)
        .replace("10.244.2.40", ip)
}

/// Every node's view holds every workload.
fn holds_pod(d: &serde_json::Value, name: &str) -> bool {
    keys(d, "workloads").contains(&format!("Workload/shop/{name}"))
}

#[test]
fn node_credentials_are_renewed_and_a_revoked_node_is_cut_off() {
    let mut m = StandaloneMesh::new(Some(example()), &["--node-credential-ttl", "20s"]).unwrap();
    // node-a starts with a credential that expires in 12 s; node-b with the default.
    m.create_credential_with("node-a", &["--ttl", "12s"])
        .unwrap();
    m.start_control_plane().unwrap();
    m.start_node("node-a").unwrap();
    m.start_node("node-b").unwrap();
    for n in ["node-a", "node-b"] {
        m.wait_node(n, Duration::from_secs(20), "initial sync", synced)
            .unwrap();
    }
    let crt_path = m.credential_dir("node-a").join("node.crt");
    let crt = || std::fs::read_to_string(&crt_path).unwrap();
    let logs = || {
        format!(
            "node-a:\n{}\ncontrol plane:\n{}",
            m.node_log("node-a"),
            m.cp_log()
        )
    };
    let first = crt();

    // Renewed at half its remaining life and written back to the credential directory.
    wait_for(
        "the renewed credential",
        Duration::from_secs(15),
        || crt() != first,
        logs,
    );
    assert!(cp_metric(&m, "weft_cp_node_credentials_renewed_total") >= 1);
    // The first credential's connection is closed when it expires; the agent is back
    // with the renewed one and still receives updates.
    wait_for(
        "the expired credential's connection to be closed",
        Duration::from_secs(15),
        || {
            cp_metric(
                &m,
                "weft_cp_node_connections_closed_total{reason=\"expired\"}",
            ) >= 1
        },
        logs,
    );
    m.write_manifest(
        "after-expiry.yaml",
        &pod_on("after-expiry", "node-a", "10.244.1.50"),
    )
    .unwrap();
    m.wait_node(
        "node-a",
        Duration::from_secs(15),
        "an update after the expiry",
        |d| holds_pod(d, "after-expiry"),
    )
    .unwrap();

    // Revoked by node: every credential of node-a so far, the renewed ones included.
    m.revoke_credential(&["--node", "node-a", "--reason", "e2e"])
        .unwrap();
    wait_for(
        "the revoked node's connection to be closed",
        Duration::from_secs(5),
        || {
            cp_metric(
                &m,
                "weft_cp_node_connections_closed_total{reason=\"revoked\"}",
            ) >= 1
        },
        logs,
    );
    wait_for(
        "node-a to leave the connected nodes",
        Duration::from_secs(5),
        || {
            let st = m.cp_status().unwrap_or_default();
            let nodes = st["nodes"].as_array().cloned().unwrap_or_default();
            nodes.iter().all(|n| n["node"] != "node-a")
                && nodes.iter().any(|n| n["node"] == "node-b")
        },
        logs,
    );
    rt().block_on(async {
        // Refused on the next request, with whatever credential the agent holds now.
        let mut cfg =
            pb::node_config_client::NodeConfigClient::new(channel(&m, "node-a", true).await);
        let hello = pb::SubscribeRequest {
            kind: Some(pb::subscribe_request::Kind::Hello(pb::Hello {
                node: "node-a".into(),
                known_versions: Default::default(),
            })),
        };
        let err = cfg.subscribe(tokio_stream_once(hello)).await.unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
        assert!(err.message().contains("revoked"), "{err}");
        // And it cannot renew itself out of the revocation.
        let mut renew = pb::node_credentials_client::NodeCredentialsClient::new(
            channel(&m, "node-a", true).await,
        );
        let id = "spiffe://cluster.local/_weft/node/node-a";
        let err = renew
            .renew(pb::RenewNodeCredentialRequest { csr_der: csr(id) })
            .await
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::Unauthenticated, "{err}");
    });
    // node-a keeps its last config but gets no more updates; node-b is unaffected.
    m.write_manifest(
        "after-revocation.yaml",
        &pod_on("after-revocation", "node-b", "10.244.2.51"),
    )
    .unwrap();
    m.wait_node(
        "node-b",
        Duration::from_secs(10),
        "an update after the revocation",
        |d| holds_pod(d, "after-revocation"),
    )
    .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let a = m.config_dump("node-a").unwrap();
    assert!(
        holds_pod(&a, "after-expiry"),
        "node-a keeps its last config"
    );
    assert!(
        !holds_pod(&a, "after-revocation"),
        "a revoked node receives no update"
    );
    assert!(cp_metric(&m, "weft_cp_revoked_node_credentials") == 1);
}
