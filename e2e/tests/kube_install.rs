//! weft installed with real Helm on a real Kubernetes cluster
//! (`weft_e2e::kubecluster`: v1.20.2, 2 nodes sharing this kernel, no registry).
//!
//! weft's images (target/images, built by `images/build --profile debug` when
//! missing or older than the binaries) are imported on every node; then
//! charts/weft is installed with the Helm v4 SDK's release actions
//! (`e2e/kube/helm_release.py`, PyPI helm-python-sdk) with `imagePullPolicy: Never`.
//! The test proves:
//!
//! 1. the CRDs are Established, the control plane's Deployment is Ready and one
//!    replica holds the leader Lease, one agent per node is Ready, the CNI installer
//!    chained `weft-cni` into each node's conflist, and `weftctl check --kubeconfig`
//!    passes every check;
//! 2. in a namespace labelled `weft.dev/mesh=enabled`, a Deployment's pods and a
//!    client pod are enrolled (each node's agent lists its own in `/config_dump`),
//!    the client reaches the Service's ClusterIP, and its node's agent tunnelled it;
//!    the leader writes AuthorizationPolicies' status;
//! 3. `helm upgrade` rolls the agents and the mesh keeps working; `helm uninstall`
//!    removes the release, and the agents remove everything weft put on their
//!    nodes (eBPF programs, links and pins, the CNI chain entry and binary, state
//!    files): the pods that were enrolled keep running and reach each other in
//!    plaintext, and a new pod starts; the cluster's teardown leaves nothing on the
//!    host.
//!
//! Needs root; fails (never skips) without it.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use weft_e2e::helm::chart_dir;
use weft_e2e::kubecluster::{self, host, KubeCluster, APP_IMAGE};
use weft_e2e::kubeweft::{
    check, config_dump, kubectl_json, name_of, ready, wait_for, wait_release_ready, CRDS, NS,
    RELEASE,
};

const APP_NS: &str = "meshed";

fn diagnostics(c: &KubeCluster) -> String {
    weft_e2e::kubeweft::diagnostics_of(c, &[APP_NS])
}

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: meshed, labels: {weft.dev/mesh: enabled}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: meshed}
spec:
  replicas: 2
  selector: {matchLabels: {app: echo}}
  template:
    metadata: {labels: {app: echo}}
    spec:
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {matchLabels: {app: echo}}}
      terminationGracePeriodSeconds: 1
      containers:
      - name: echo
        image: APP_IMAGE
        imagePullPolicy: Never
        command: [weft-testapp, http, --listen, "0.0.0.0:8080"]
        ports: [{containerPort: 8080}]
        readinessProbe:
          tcpSocket: {port: 8080}
          periodSeconds: 1
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: meshed}
spec:
  selector: {app: echo}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: meshed, labels: {app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: APP_IMAGE
    imagePullPolicy: Never
    command: [sleep, "3600"]
"#;

/// A policy that selects nothing (accepted) and one that asks for CUSTOM
/// (refused by the control plane).
const POLICIES: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: audit-nothing, namespace: meshed}
spec:
  selector: {matchLabels: {app: nothing-here}}
  action: AUDIT
  rules: [{}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: meshed}
spec:
  selector: {matchLabels: {app: nothing-here}}
  action: CUSTOM
  rules: [{}]
"#;

/// `kubectl exec` in the client pod until its output contains `want`.
fn exec_until(c: &KubeCluster, cmd: &[&str], want: &str, timeout: Duration) -> String {
    let mut args = vec!["-n", APP_NS, "exec", "client", "--"];
    args.extend_from_slice(cmd);
    wait_for(
        c,
        &format!("client: {cmd:?} answering {want:?}"),
        timeout,
        || {
            let out = c.kubectl(&args)?;
            Ok((out.contains(want).then(|| out.clone()), out))
        },
    )
}

/// GETs through the Service's ClusterIP from the client pod, `n` times.
fn requests_through_service(c: &KubeCluster, cluster_ip: &str, tag: &str, n: usize) {
    for i in 0..n {
        let url = format!("http://{cluster_ip}/{tag}/{i}");
        let body = exec_until(
            c,
            &["timeout", "5", "wget", "-qO-", &url],
            &format!("GET /{tag}/{i}"),
            Duration::from_secs(30),
        );
        assert_eq!(body.trim(), format!("GET /{tag}/{i}"));
    }
}

fn counter(dump: &Value, name: &str) -> u64 {
    dump["proxy"][name].as_u64().unwrap_or(0)
}

#[test]
fn helm_installs_weft_on_a_real_cluster() {
    weft_e2e::netlab::require_root();
    let t0 = Instant::now();
    let archives = weft_e2e::kubeweft::prepare_images()
        .unwrap_or_else(|e| panic!("building Kubernetes and weft's images: {e:#}"));
    eprintln!(
        "weft images: {archives:?} ({:.1} s)",
        t0.elapsed().as_secs_f64()
    );

    let mut c = KubeCluster::start().unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    eprintln!(
        "cluster of {} node(s) Ready in {:.1} s; weft images on every node: {:?}",
        c.nodes.len(),
        c.startup.as_secs_f64(),
        c.weft_images
    );
    assert_eq!(
        c.weft_images.len(),
        2,
        "weft's two images should have been imported: {:?}",
        c.weft_images
    );
    let helm = check(&c, "preparing Helm", weft_e2e::kubeweft::helm(&c));
    let cg2 = check(&c, "the cgroup2 mount", host::cgroup2());
    let values = check(&c, "the chart's values", weft_e2e::kubeweft::values());

    // 1. Install.
    let t_install = Instant::now();
    let rel = check(
        &c,
        "helm install",
        helm.install(RELEASE, &chart_dir(), &values, Duration::from_secs(300)),
    );
    let helm_secs = t_install.elapsed().as_secs_f64();
    eprintln!(
        "helm install: revision {} {} in {helm_secs:.1} s, {} objects",
        rel["revision"],
        rel["status"],
        rel["objects"].as_array().map_or(0, Vec::len)
    );
    assert_eq!(
        (rel["revision"].as_u64(), rel["status"].as_str()),
        (Some(1), Some("deployed")),
        "{rel}"
    );
    let leader = wait_release_ready(&c, Duration::from_secs(240), "--lb=least-conn");
    let ready_secs = t_install.elapsed().as_secs_f64();
    eprintln!("weft Ready {ready_secs:.1} s after helm install started (leader {leader})");

    // Each agent attached its capture programs to its own node's cgroup, none to
    // the cgroup2 root (which holds the other node, and the host).
    for i in 0..c.nodes.len() {
        let cg = check(&c, "node cgroup", c.node_cgroup(i));
        let progs = check(&c, "bpftool", kubecluster::cgroup_programs(&cg));
        for want in [
            "cgroup_inet4_connect weft_connect4",
            "cgroup_sock_ops weft_sockops",
        ] {
            assert!(
                progs.iter().any(|p| p == want),
                "{}: {want} not attached to {}: {progs:?}",
                c.nodes[i].name,
                cg.display()
            );
        }
    }
    let root = check(&c, "bpftool", kubecluster::cgroup_programs(&cg2));
    assert!(
        !root.iter().any(|p| p.contains("weft_")),
        "weft programs on the cgroup2 root {}: {root:?}",
        cg2.display()
    );

    // The CNI installer chained weft-cni into each node's conflist (containerd's
    // /etc/cni/net.d inside the node) and copied the plugin next to Debian's.
    for n in &c.nodes {
        let conf = n.cni_conf_dir().join("10-weft-kube.conflist");
        let text = check(
            &c,
            "reading the conflist",
            std::fs::read_to_string(&conf).map_err(anyhow::Error::from),
        );
        let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        assert_eq!(
            types,
            ["bridge", "weft-cni"],
            "{}: /etc/cni/net.d/10-weft-kube.conflist: {text}",
            n.name
        );
        assert!(
            n.cni_bin_dir().join("weft-cni").is_file(),
            "{}: no /opt/cni/bin/weft-cni",
            n.name
        );
    }

    // weftctl check: this host can run an agent, and weft is installed and working.
    let weftctl = check(&c, "weftctl", weft_e2e::bin_path("weftctl"));
    let out = check(
        &c,
        "weftctl check",
        std::process::Command::new(&weftctl)
            .arg("check")
            .arg("--kubeconfig")
            .arg(c.kubeconfig())
            .output()
            .map_err(anyhow::Error::from),
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("weftctl check --kubeconfig:\n{text}");
    assert!(
        out.status.success() && text.contains("all checks passed"),
        "weftctl check failed ({}):\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    for want in ["crd", "control-plane", "ca", "trust-bundle"] {
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["ok", want]),
            "weftctl check: no passing {want} check:\n{text}"
        );
    }
    let status = check(&c, "helm status", helm.status(RELEASE));
    assert_eq!(
        (status["revision"].as_u64(), status["status"].as_str()),
        (Some(1), Some("deployed")),
        "{status}"
    );

    // 2. Enrollment: a labelled namespace's pods, on both nodes.
    let t_apps = Instant::now();
    check(
        &c,
        "applying the workloads",
        c.apply(&APPS.replace("APP_IMAGE", APP_IMAGE)),
    );
    let echo = check(
        &c,
        "echo replicas",
        c.wait_pods_ready(APP_NS, "app=echo", 2, Duration::from_secs(120)),
    );
    let client = check(
        &c,
        "client pod",
        c.wait_pods_ready(APP_NS, "app=client", 1, Duration::from_secs(120)),
    );
    eprintln!(
        "workloads Ready {:.1} s after apply",
        t_apps.elapsed().as_secs_f64()
    );
    let mut on_node: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for p in echo.iter().chain(client.iter()) {
        on_node
            .entry(p["spec"]["nodeName"].as_str().unwrap_or_default().into())
            .or_default()
            .push(format!("{APP_NS}/{}", name_of(p)));
    }
    eprintln!("pods per node: {on_node:?}");
    if c.nodes.len() >= 2 {
        assert!(
            on_node.len() >= 2,
            "the echo replicas should be spread over two nodes: {on_node:?}"
        );
    }
    let client_node = client[0]["spec"]["nodeName"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for n in &c.nodes {
        let want = on_node.get(&n.name).cloned().unwrap_or_default();
        let dump = wait_for(
            &c,
            &format!("{}: the agent enrolling {want:?}", n.name),
            Duration::from_secs(60),
            || {
                let d = config_dump(&c, &n.name)?;
                let mut got: Vec<String> = d["enrolled_pods"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|p| p["pod"].as_str().map(String::from))
                    .collect();
                got.sort();
                let mut w = want.clone();
                w.sort();
                let state = format!(
                    "node {}, synced {}, enrolled_pods {got:?}, workloads {}",
                    d["node"],
                    d["synced"],
                    d["workloads"].as_object().map_or(0, |m| m.len())
                );
                Ok(((got == w && d["synced"] == true).then_some(d), state))
            },
        );
        eprintln!(
            "{}: enrolled {:?}",
            n.name,
            dump["enrolled_pods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{} netns {}", p["pod"], p["netns"]))
                .collect::<Vec<_>>()
        );
    }

    // The leader writes policies' status (the chart's RBAC on the status
    // subresource); 1.20 does not enforce the CRD's CEL rules (dropped at install),
    // the control plane refuses CUSTOM itself.
    check(&c, "applying policies", c.apply(POLICIES));
    for (name, want) in [
        ("audit-nothing", "True/Accepted"),
        ("custom", "False/InvalidSpec"),
    ] {
        wait_for(
            &c,
            &format!("AuthorizationPolicy {name} Accepted={want}"),
            Duration::from_secs(30),
            || {
                let p = kubectl_json(&c, &["-n", APP_NS, "get", "authorizationpolicy", name])?;
                let cond = p["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
                    .cloned()
                    .unwrap_or(Value::Null);
                let got = format!(
                    "{}/{}",
                    cond["status"].as_str().unwrap_or("-"),
                    cond["reason"].as_str().unwrap_or("-")
                );
                Ok((
                    (got == want).then_some(()),
                    format!("status {}", p["status"]),
                ))
            },
        );
    }
    check(
        &c,
        "deleting policies",
        c.kubectl(&[
            "-n",
            APP_NS,
            "delete",
            "authorizationpolicy",
            "audit-nothing",
            "custom",
        ]),
    );

    // Pod -> ClusterIP, tunnelled by the client's node agent.
    let cluster_ip = check(
        &c,
        "Service ClusterIP",
        c.kubectl(&[
            "-n",
            APP_NS,
            "get",
            "service",
            "echo",
            "-o",
            "jsonpath={.spec.clusterIP}",
        ]),
    );
    let before = check(&c, "config_dump", config_dump(&c, &client_node));
    requests_through_service(&c, &cluster_ip, "meshed", 6);
    let after = check(&c, "config_dump", config_dump(&c, &client_node));
    eprintln!(
        "{client_node}: proxy counters after 6 requests: {}",
        after["proxy"]
    );
    let tunnelled = counter(&after, "hbone_out") - counter(&before, "hbone_out");
    let plaintext = counter(&after, "plaintext_out") - counter(&before, "plaintext_out");
    assert!(
        tunnelled >= 6,
        "{client_node}: the client's 6 requests to {cluster_ip} should have been tunnelled (HBONE) by its node agent; hbone_out +{tunnelled}, plaintext_out +{plaintext}\n{}",
        after["enrolled_pods"]
    );

    // 3. Upgrade: a changed value rolls the agents; the mesh keeps working.
    let mut upgraded = values.clone();
    upgraded["node"]["loadBalancing"] = json!("round-robin");
    let t_upgrade = Instant::now();
    let rel = check(
        &c,
        "helm upgrade",
        helm.upgrade(RELEASE, &chart_dir(), &upgraded, Duration::from_secs(300)),
    );
    assert_eq!(
        (rel["revision"].as_u64(), rel["status"].as_str()),
        (Some(2), Some("deployed")),
        "{rel}"
    );
    wait_release_ready(&c, Duration::from_secs(240), "--lb=round-robin");
    eprintln!(
        "helm upgrade: agents rolled and Ready in {:.1} s",
        t_upgrade.elapsed().as_secs_f64()
    );
    let before = check(&c, "config_dump", config_dump(&c, &client_node));
    requests_through_service(&c, &cluster_ip, "upgraded", 4);
    let after = check(&c, "config_dump", config_dump(&c, &client_node));
    let tunnelled = counter(&after, "hbone_out") - counter(&before, "hbone_out");
    assert!(
        tunnelled >= 4,
        "{client_node}: after the upgrade, requests should still be tunnelled; hbone_out +{tunnelled}\n{}",
        after["proxy"]
    );

    // 4. Uninstall: the release's objects go; what weft leaves on the nodes is
    // reported (the agent does not clean up yet), and teardown removes it.
    let t_uninstall = Instant::now();
    let rel = check(
        &c,
        "helm uninstall",
        helm.uninstall(RELEASE, Duration::from_secs(300)),
    );
    eprintln!(
        "helm uninstall: {} in {:.1} s",
        rel["info"],
        t_uninstall.elapsed().as_secs_f64()
    );
    wait_for(&c, "weft's pods gone", Duration::from_secs(120), || {
        let pods = kubectl_json(&c, &["-n", NS, "get", "pods"])?;
        let names: Vec<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .map(name_of)
            .collect();
        Ok((names.is_empty().then_some(()), format!("pods {names:?}")))
    });
    let status = helm.status(RELEASE);
    assert!(status.is_err(), "the release should be gone: {status:?}");
    let crds_left: Vec<&str> = CRDS
        .iter()
        .copied()
        .filter(|crd| c.kubectl(&["get", "crd", crd]).is_ok())
        .collect();
    eprintln!("CRDs left after uninstall (Helm never deletes crds/): {crds_left:?}");
    // The agents saw their release's DaemonSets go and removed what weft put on
    // their nodes: no program, link, pin, chain entry, binary or state file is left.
    for i in 0..c.nodes.len() {
        let left = c.weft_node_state(i);
        assert!(
            left.is_empty(),
            "{}: weft state left after helm uninstall:\n  {}\n\n{}",
            c.nodes[i].name,
            left.join("\n  "),
            diagnostics(&c)
        );
    }
    // The pods that were enrolled keep running and reach each other in plaintext.
    let out = exec_until(
        &c,
        &[
            "timeout",
            "5",
            "wget",
            "-qO-",
            &format!("http://{cluster_ip}/after-uninstall"),
        ],
        "after-uninstall",
        Duration::from_secs(30),
    );
    eprintln!("after uninstall: the client reaches the Service in plaintext: {out}");
    wait_for(&c, "the echo pods Ready", Duration::from_secs(30), || {
        let pods = kubectl_json(&c, &["-n", APP_NS, "get", "pods", "-l", "app=echo"])?;
        let items = pods["items"].as_array().cloned().unwrap_or_default();
        let all = items.len() == 2 && items.iter().all(ready);
        Ok((all.then_some(()), format!("{} echo pods", items.len())))
    });
    // A new pod (with the name of one that was enrolled) starts: no chained
    // weft-cni is left to refuse it.
    check(
        &c,
        "deleting the client",
        c.kubectl(&["-n", APP_NS, "delete", "pod", "client", "--wait=true"]),
    );
    check(
        &c,
        "recreating the client",
        c.apply(&APPS.replace("APP_IMAGE", APP_IMAGE)),
    );
    wait_for(
        &c,
        "a new client pod Ready",
        Duration::from_secs(60),
        || {
            let p = kubectl_json(&c, &["-n", APP_NS, "get", "pod", "client"])?;
            Ok((ready(&p).then_some(()), format!("status {}", p["status"])))
        },
    );

    // Teardown restores the host, weft's node state included.
    let t_down = Instant::now();
    let baseline = c.baseline().clone();
    let dir = c.dir.clone();
    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!("teardown in {:.1} s", t_down.elapsed().as_secs_f64());
    let left = host::leftovers(&dir, Some(&baseline));
    assert!(
        left.is_empty(),
        "left on the host after teardown:\n{}",
        left.join("\n")
    );
    eprintln!(
        "timings: helm install {helm_secs:.1} s, install to all Ready {ready_secs:.1} s, whole test {:.1} s",
        t0.elapsed().as_secs_f64()
    );
}
