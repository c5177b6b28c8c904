//! Kubernetes mode against a real kube-apiserver (v1.20.2) and etcd on loopback:
//! watchers, CRD status, TokenReview node authentication, the CA Secret and trust
//! bundle, API-server restarts and leader handover. See e2e/src/kubeapi.rs.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};
use weft_e2e::kubemesh::{apply_yaml, bound_token, KubeMesh, AUDIENCE, NAMESPACE, NODE_SA};
use weft_e2e::standalone::{cert_ids, keys};
use weft_e2e::wait_until;
use weft_proto::pb;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn example(file: &str) -> String {
    std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../examples/standalone")
            .join(file),
    )
    .unwrap()
}

/// The standalone example's objects, created in the API server.
async fn apply_example(m: &KubeMesh) {
    let c = m.client().await.unwrap();
    for f in [
        "namespaces.yaml",
        "shop.yaml",
        "payments.yaml",
        "legacy.yaml",
    ] {
        apply_yaml(&c, &example(f)).await.unwrap();
    }
}

async fn channel(m: &KubeMesh, cp: &str) -> tonic::transport::Channel {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};
    let ca = std::fs::read_to_string(m.node_dir("node-a").join("ca.crt")).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("weft-control-plane");
    Endpoint::from_shared(m.grpc_url(cp))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn with_token<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

fn csr(id: &str) -> Vec<u8> {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name = rcgen::DistinguishedName::new();
    p.subject_alt_names = vec![rcgen::SanType::URI(id.to_string().try_into().unwrap())];
    p.serialize_request(&key).unwrap().der().to_vec()
}

/// The `Accepted` condition of an AuthorizationPolicy: (status, reason, observedGeneration).
async fn accepted(m: &KubeMesh, ns: &str, name: &str) -> Option<(String, String, i64)> {
    use kube::api::{ApiResource, DynamicObject};
    let ar = ApiResource::erase::<weft_proto::crd::AuthorizationPolicy>(&());
    let api: kube::Api<DynamicObject> = kube::Api::namespaced_with(m.client().await.ok()?, ns, &ar);
    let o = api.get(name).await.ok()?;
    let c = o.data["status"]["conditions"]
        .as_array()?
        .iter()
        .find(|c| c["type"] == "Accepted")?
        .clone();
    Some((
        c["status"].as_str()?.to_string(),
        c["reason"].as_str()?.to_string(),
        o.data["status"]["observedGeneration"].as_i64()?,
    ))
}

async fn wait_accepted(
    m: &KubeMesh,
    ns: &str,
    name: &str,
    want: (&str, &str),
) -> (String, String, i64) {
    let end = Instant::now() + Duration::from_secs(15);
    loop {
        let got = accepted(m, ns, name).await;
        if let Some(g) = &got {
            if g.0 == want.0 && g.1 == want.1 {
                return g.clone();
            }
        }
        if Instant::now() > end {
            panic!(
                "policy {ns}/{name}: wanted Accepted={want:?}, got {got:?}\ncontrol plane log:\n{}",
                m.cp_log("cp-1")
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[test]
fn kube_mode_end_to_end() {
    let rt = rt();
    let mut m = rt.block_on(KubeMesh::new()).expect("API server");
    rt.block_on(apply_example(&m));
    m.start_control_plane("cp-1").unwrap();
    m.wait_cp_ready("cp-1", Duration::from_secs(30)).unwrap();
    assert_eq!(m.is_leader("cp-1"), Some(true));

    // The leader created the CA Secret and published the trust bundle to every
    // enrolled namespace and its own; the bundle is the Secret's root.
    let root = rt.block_on(async {
        let c = m.client().await.unwrap();
        let secrets: kube::Api<k8s_openapi::api::core::v1::Secret> =
            kube::Api::namespaced(c.clone(), NAMESPACE);
        let s = secrets.get("weft-ca").await.unwrap();
        let root = String::from_utf8(s.data.unwrap()["root-cert.pem"].0.clone()).unwrap();
        for ns in ["shop", "payments", NAMESPACE] {
            let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
                kube::Api::namespaced(c.clone(), ns);
            let mut got = None;
            for _ in 0..100 {
                got = cms
                    .get_opt("weft-ca-root-cert")
                    .await
                    .unwrap()
                    .and_then(|cm| cm.data)
                    .and_then(|d| d.get("root-cert.pem").cloned());
                if got.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(got.as_deref(), Some(root.as_str()), "trust bundle in {ns}");
        }
        let cms: kube::Api<k8s_openapi::api::core::v1::ConfigMap> =
            kube::Api::namespaced(c.clone(), "legacy");
        assert!(cms.get_opt("weft-ca-root-cert").await.unwrap().is_none());
        root
    });
    assert!(root.contains("BEGIN CERTIFICATE"));

    // Node agents authenticate with tokens bound to their pods and get their view.
    rt.block_on(m.prepare_node("node-a")).unwrap();
    rt.block_on(m.prepare_node("node-b")).unwrap();
    m.start_node("node-a", "cp-1").unwrap();
    m.start_node("node-b", "cp-1").unwrap();
    let a = m
        .wait_node("node-a", Duration::from_secs(20), "web certificate", |d| {
            d["synced"] == true && !cert_ids(d).is_empty()
        })
        .unwrap();
    let b = m
        .wait_node("node-b", Duration::from_secs(20), "two certificates", |d| {
            d["synced"] == true && cert_ids(d).len() == 2
        })
        .unwrap();
    let workloads = vec![
        "Workload/legacy/batch-1",
        "Workload/payments/ledger-1",
        "Workload/shop/debug",
        "Workload/shop/web-1",
        "Workload/shop/web-2",
    ];
    // weft-system holds the node agents' own pods (not enrolled); leave them out.
    let apps = |d: &serde_json::Value| -> Vec<String> {
        keys(d, "workloads")
            .into_iter()
            .filter(|k| !k.starts_with("Workload/weft-system/"))
            .collect()
    };
    assert_eq!(apps(&a), workloads);
    assert_eq!(apps(&b), workloads);
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
    assert_eq!(
        a["workloads"]["Workload/shop/web-1"]["ips"][0],
        "10.244.1.10"
    );

    // Refusals: another ServiceAccount's token, a wrong audience, no token, and
    // node-a asking for an identity that only runs on node-b.
    rt.block_on(async {
        let c = m.client().await.unwrap();
        apply_yaml(
            &c,
            &format!("apiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: intruder, namespace: {NAMESPACE}}}\n---\napiVersion: v1\nkind: Pod\nmetadata: {{name: intruder, namespace: {NAMESPACE}}}\nspec:\n  nodeName: node-a\n  serviceAccountName: intruder\n  containers: [{{name: x, image: x}}]\n"),
        )
        .await
        .unwrap();
        let intruder = bound_token(&c, NAMESPACE, "intruder", "intruder", AUDIENCE)
            .await
            .unwrap();
        let wrong_audience =
            bound_token(&c, NAMESPACE, NODE_SA, "weft-node-node-a", "some-other-api")
                .await
                .unwrap();
        let node_a = std::fs::read_to_string(m.node_dir("node-a").join("token")).unwrap();
        let ch = channel(&m, "cp-1").await;
        let mut cfg = pb::node_config_client::NodeConfigClient::new(ch.clone());
        let sub = |t: Option<&str>| {
            let req = pb::SubscribeRequest::default();
            let s = tokio_stream::iter(vec![req]);
            let mut r = tonic::Request::new(s);
            if let Some(t) = t {
                r.metadata_mut()
                    .insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            r
        };
        let e = cfg.subscribe(sub(Some(&intruder))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        // What the API server said is logged by the control plane, never told the caller.
        assert!(!e.message().contains("intruder"), "{e:?}");
        let log = m.cp_log("cp-1");
        assert!(
            log.lines().any(|l| l.contains("node token refused")
                && l.contains("system:serviceaccount:weft-system:intruder")),
            "{log}"
        );
        let e = cfg.subscribe(sub(Some(&wrong_audience))).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");
        let e = cfg.subscribe(sub(None)).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::Unauthenticated, "{e:?}");

        let mut certs = pb::certificates_client::CertificatesClient::new(ch);
        let ledger = "spiffe://cluster.local/ns/payments/sa/ledger";
        let e = certs
            .sign(with_token(
                pb::SignRequest {
                    spiffe_id: ledger.into(),
                    csr_der: csr(ledger),
                },
                &node_a,
            ))
            .await
            .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        let web = "spiffe://cluster.local/ns/shop/sa/web";
        let ok = certs
            .sign(with_token(
                pb::SignRequest {
                    spiffe_id: web.into(),
                    csr_der: csr(web),
                },
                &node_a,
            ))
            .await
            .unwrap()
            .into_inner();
        assert!(ok.cert_chain_pem.contains("BEGIN CERTIFICATE"));
    });
    let (_, metrics) = weft_e2e::http_get(&m.cp_admin("cp-1"), "/metrics").unwrap();
    assert!(
        metrics.contains("weft_cp_node_auth_refusals_total{reason=\"permission_denied\"}"),
        "{metrics}"
    );

    // CRD status: the example policy is accepted; one with an invalid selector is not.
    rt.block_on(async {
        let (_, _, generation) =
            wait_accepted(&m, "payments", "ledger-allow-web", ("True", "Accepted")).await;
        assert_eq!(generation, 1);
        let c = m.client().await.unwrap();
        apply_yaml(
            &c,
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: bad-selector, namespace: shop}\nspec:\n  selector:\n    matchLabels: {\"-bad key\": web}\n  rules: [{}]\n",
        )
        .await
        .unwrap();
        wait_accepted(&m, "shop", "bad-selector", ("False", "InvalidSelector")).await;
    });

    // A label removal un-enrolls the pod at its node.
    rt.block_on(async {
        let c = m.client().await.unwrap();
        let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(c, "payments");
        pods.patch(
            "ledger-1",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(
                serde_json::json!({"metadata": {"labels": {"weft.dev/mesh": "disabled"}}}),
            ),
        )
        .await
        .unwrap();
    });
    m.wait_node(
        "node-b",
        Duration::from_secs(10),
        "ledger un-enrolled",
        |d| {
            d["workloads"]["Workload/payments/ledger-1"]["enrolled"] == false
                && keys(d, "policies").is_empty()
                && !cert_ids(d)
                    .contains(&"spiffe://cluster.local/ns/payments/sa/ledger".to_string())
        },
    )
    .unwrap();

    // weftctl against the cluster: preflight passes; authz check reads the same
    // objects from the API server.
    let kc = m.api.kubeconfig();
    let kc = kc.to_str().unwrap();
    let weftctl = |args: &[&str]| {
        let out = std::process::Command::new(weft_e2e::bin_path("weftctl").unwrap())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, out) = weftctl(&["check", "--skip-host", "--kubeconfig", kc]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("leader cp-1"), "{out}");
    assert!(out.contains("Kubernetes 1.20"), "{out}");
    let (code, out) = weftctl(&[
        "authz",
        "check",
        "--kubeconfig",
        kc,
        "--from",
        "shop/web-1",
        "--to",
        "payments/ledger:9090",
        "-o",
        "json",
    ]);
    // ledger-1 was just un-enrolled: weft does not authorize its traffic any more.
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("\"enrolled\": false"), "{out}");

    // The API server restarts: the control plane keeps serving and picks up
    // changes made after it is back.
    m.api.stop_apiserver();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        m.cp_running("cp-1"),
        "control plane exited:\n{}",
        m.cp_log("cp-1")
    );
    let (status, _) = weft_e2e::http_get(&m.cp_admin("cp-1"), "/healthz/ready").unwrap();
    assert_eq!(status, 200);
    m.api.start_apiserver().unwrap();
    rt.block_on(async {
        let c = m.client().await.unwrap();
        apply_yaml(
            &c,
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: web-3\n  namespace: shop\n  labels: {app: web}\nspec:\n  nodeName: node-a\n  serviceAccountName: web\n  containers: [{name: web, image: example/web}]\nstatus:\n  podIP: 10.244.1.13\n",
        )
        .await
        .unwrap();
    });
    m.wait_node(
        "node-a",
        Duration::from_secs(30),
        "web-3 after the restart",
        |d| d["workloads"]["Workload/shop/web-3"]["ips"][0] == "10.244.1.13",
    )
    .unwrap();
    assert!(m.cp_running("cp-1"));
}

#[test]
fn leader_handover_between_replicas() {
    let rt = rt();
    let mut m = rt.block_on(KubeMesh::new()).expect("API server");
    rt.block_on(apply_example(&m));
    m.start_control_plane("cp-1").unwrap();
    m.wait_cp_ready("cp-1", Duration::from_secs(30)).unwrap();
    m.start_control_plane("cp-2").unwrap();
    m.wait_cp_ready("cp-2", Duration::from_secs(30)).unwrap();
    // Exactly one leader; both serve (same CA from the Secret).
    let leaders = |m: &KubeMesh| {
        (
            m.is_leader("cp-1").unwrap_or(false),
            m.is_leader("cp-2").unwrap_or(false),
        )
    };
    assert_eq!(leaders(&m), (true, false));
    rt.block_on(m.prepare_node("node-a")).unwrap();
    m.start_node("node-a", "cp-2").unwrap();
    m.wait_node(
        "node-a",
        Duration::from_secs(20),
        "certificate from the follower",
        |d| !cert_ids(d).is_empty(),
    )
    .unwrap();

    // The leader dies: the follower takes over within 15 s and writes status.
    let killed = Instant::now();
    m.kill_control_plane("cp-1");
    let took = wait_until(Duration::from_secs(15), || {
        m.is_leader("cp-2").filter(|l| *l).map(|_| killed.elapsed())
    })
    .unwrap_or_else(|| panic!("cp-2 did not take over within 15 s:\n{}", m.cp_log("cp-2")));
    eprintln!("leader handover took {took:?}");
    rt.block_on(async {
        let c = m.client().await.unwrap();
        apply_yaml(
            &c,
            "apiVersion: security.weft.dev/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: after-handover, namespace: shop}\nspec:\n  action: DENY\n  rules: [{from: [{source: {namespaces: [legacy]}}]}]\n",
        )
        .await
        .unwrap();
        let end = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some((s, r, _)) = accepted(&m, "shop", "after-handover").await {
                assert_eq!((s.as_str(), r.as_str()), ("True", "Accepted"));
                break;
            }
            assert!(Instant::now() < end, "no status after handover:\n{}", m.cp_log("cp-2"));
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    // A clean shutdown hands over at once: restart cp-1, stop cp-2 gracefully.
    m.start_control_plane("cp-1").unwrap();
    m.wait_cp_ready("cp-1", Duration::from_secs(30)).unwrap();
    assert_eq!(leaders(&m), (false, true));
    let stopped = Instant::now();
    if let Some(p) = m
        .control_planes
        .get_mut("cp-2")
        .and_then(|c| c.proc.as_mut())
    {
        p.terminate();
    }
    let took = wait_until(Duration::from_secs(6), || {
        m.is_leader("cp-1")
            .filter(|l| *l)
            .map(|_| stopped.elapsed())
    })
    .unwrap_or_else(|| {
        panic!(
            "cp-1 did not take over after a clean stop:\n{}",
            m.cp_log("cp-1")
        )
    });
    eprintln!("handover after a clean stop took {took:?}");
}
