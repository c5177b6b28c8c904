//! weft's lifecycle on a real Kubernetes cluster (`weft_e2e::kubecluster`, 2 nodes),
//! with traffic running:
//!
//! 1. pods that were running before weft was installed, and before their namespace
//!    was labelled, join the mesh when it is labelled, without a restart, and leave
//!    it when the label goes, again without a restart, their traffic working
//!    throughout (in plaintext once out);
//! 2. `helm upgrade` that rolls the node agents, while a long-lived connection and
//!    a steady stream of new connections run between enrolled pods: how many new
//!    connections fail and whether the long-lived one survives (the goal, asserted:
//!    none, and it does), and a client the policy denies stays denied throughout;
//! 3. an agent killed with SIGKILL: kubelet restarts it, its pods are enrolled
//!    again, the window in which new connections fail is measured, and the denied
//!    client never gets through.
//!
//! Needs root; fails (never skips) without it.

#![forbid(unsafe_code)]

use serde_json::json;
use std::time::{Duration, Instant};
use weft_e2e::helm::chart_dir;
use weft_e2e::kubecluster::{KubeCluster, APP_IMAGE};
use weft_e2e::kubetraffic::{containers, enrolled, flow, kill_container, Container};
use weft_e2e::kubeweft::{
    check, config_dump, kubectl_json, name_of, wait_release_ready, NS, RELEASE,
};

const APP_NS: &str = "apps";
const OUT_NS: &str = "outsider";
const ECHO_PORT: u16 = 9000;

const APPS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: apps}
---
apiVersion: v1
kind: Namespace
metadata: {name: outsider}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: echo, namespace: apps}
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
        command: [weft-testapp, echo, --listen, "0.0.0.0:9000"]
        readinessProbe:
          tcpSocket: {port: 9000}
          periodSeconds: 2
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: apps}
spec:
  selector: {app: echo}
  ports: [{name: tcp-echo, port: 9000, targetPort: 9000}]
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: apps, labels: {app: client}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: APP_IMAGE
    imagePullPolicy: Never
    command: [sleep, "36000"]
---
apiVersion: v1
kind: Pod
metadata: {name: intruder, namespace: outsider, labels: {app: intruder}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: intruder
    image: APP_IMAGE
    imagePullPolicy: Never
    command: [sleep, "36000"]
"#;

/// Only the `apps` namespace may reach the echo servers.
const POLICY: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-from-apps, namespace: apps}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: [apps]}}]
"#;

fn diagnostics(c: &KubeCluster) -> String {
    weft_e2e::kubeweft::diagnostics_of(c, &[APP_NS, OUT_NS])
}

/// `kubeweft::wait_for` with this test's namespaces in the diagnostics.
fn wait_for<T>(
    c: &KubeCluster,
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<(Option<T>, String)>,
) -> T {
    weft_e2e::kubeweft::wait_for_in(c, &[APP_NS, OUT_NS], what, timeout, f)
}

/// The `apps` pods per node, with their UIDs and container restart counts.
fn app_pods(c: &KubeCluster) -> Vec<(String, String, String, u64)> {
    let pods = check(
        c,
        "listing apps",
        kubectl_json(c, &["-n", APP_NS, "get", "pods"]),
    );
    let mut v: Vec<(String, String, String, u64)> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            let restarts = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|s| s["restartCount"].as_u64())
                .sum();
            (
                p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                format!("{APP_NS}/{}", name_of(p)),
                p["metadata"]["uid"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                restarts,
            )
        })
        .collect();
    v.sort();
    v
}

/// Waits until every node's agent enrolls exactly the `apps` pods on that node
/// (`enrolled`), or none of them.
fn wait_enrolled(c: &KubeCluster, enrolled_wanted: bool, timeout: Duration) {
    let pods = app_pods(c);
    for n in &c.nodes {
        let want: Vec<String> = if enrolled_wanted {
            pods.iter()
                .filter(|p| p.0 == n.name)
                .map(|p| p.1.clone())
                .collect()
        } else {
            Vec::new()
        };
        wait_for(
            c,
            &format!("{}: the agent enrolling {want:?}", n.name),
            timeout,
            || {
                let got = enrolled(c, &n.name)?;
                let apps: Vec<String> =
                    got.into_iter().filter(|p| p.starts_with("apps/")).collect();
                Ok(((apps == want).then_some(()), format!("enrolled {apps:?}")))
            },
        );
    }
}

fn hbone_out(c: &KubeCluster, node: &str) -> u64 {
    check(c, "config_dump", config_dump(c, node))["proxy"]["hbone_out"]
        .as_u64()
        .unwrap_or(0)
}

/// The agent's container on `node`.
fn agent_on(c: &KubeCluster, node: &str) -> Container {
    containers(
        c,
        NS,
        "app.kubernetes.io/component=node",
        "node",
        Some(node),
    )
    .into_iter()
    .next()
    .unwrap_or_else(|| panic!("no agent on {node}\n{}", diagnostics(c)))
}

#[test]
fn pods_join_and_leave_without_restarts_and_agent_rolls_and_crashes_fail_closed() {
    weft_e2e::netlab::require_root();
    weft_e2e::kubeweft::prepare_images().unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = KubeCluster::start().unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    assert!(c.nodes.len() >= 2, "this test needs two nodes");

    // Workloads first, in namespaces that are not in the mesh: no weft yet.
    check(
        &c,
        "applying the workloads",
        c.apply(&APPS.replace("APP_IMAGE", APP_IMAGE)),
    );
    for (ns, sel, n) in [
        (APP_NS, "app=echo", 2),
        (APP_NS, "app=client", 1),
        (OUT_NS, "app=intruder", 1),
    ] {
        check(
            &c,
            "workloads Ready",
            c.wait_pods_ready(ns, sel, n, Duration::from_secs(120)),
        );
    }
    let cluster_ip = check(
        &c,
        "the Service's ClusterIP",
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
    let target = format!("{cluster_ip}:{ECHO_PORT}");
    let before_weft = app_pods(&c);
    let f = flow(&c, APP_NS, "client", &target, 3, true);
    assert!(f.new_ok > 0 && f.new_failed == 0, "before weft: {f:?}");

    let helm = check(&c, "Helm", weft_e2e::kubeweft::helm(&c));
    let values = check(&c, "values", weft_e2e::kubeweft::values());
    weft_e2e::kubeweft::install(&c, &helm, &values, "--lb=least-conn");
    let client_node = app_pods(&c)
        .into_iter()
        .find(|p| p.1 == format!("{APP_NS}/client"))
        .map(|p| p.0)
        .unwrap_or_default();

    // 1. Running pods: untouched while their namespace is out of the mesh...
    wait_enrolled(&c, false, Duration::from_secs(10));
    // ...and enrolled without a restart once it is labelled (the CNI plugin never
    // saw them: the agents find them by their IPs).
    let t_join = Instant::now();
    check(
        &c,
        "labelling the namespace",
        c.kubectl(&["label", "namespace", APP_NS, "weft.dev/mesh=enabled"]),
    );
    wait_enrolled(&c, true, Duration::from_secs(60));
    eprintln!(
        "running pods enrolled {:.1} s after their namespace was labelled",
        t_join.elapsed().as_secs_f64()
    );
    assert_eq!(
        app_pods(&c),
        before_weft,
        "the pods were restarted or replaced"
    );
    let h0 = hbone_out(&c, &client_node);
    let f = flow(&c, APP_NS, "client", &target, 3, true);
    assert!(f.new_ok > 0 && f.new_failed == 0, "enrolled: {f:?}");
    let tunnelled = hbone_out(&c, &client_node) - h0;
    assert!(
        tunnelled >= f.new_ok,
        "{client_node}: {} connections, {tunnelled} tunnelled",
        f.new_ok + 1
    );
    // Out of the mesh again: no restart, and plaintext works.
    check(
        &c,
        "unlabelling the namespace",
        c.kubectl(&["label", "namespace", APP_NS, "weft.dev/mesh-"]),
    );
    wait_enrolled(&c, false, Duration::from_secs(60));
    let h0 = hbone_out(&c, &client_node);
    let f = flow(&c, APP_NS, "client", &target, 3, true);
    assert!(f.new_ok > 0 && f.new_failed == 0, "unenrolled: {f:?}");
    assert_eq!(hbone_out(&c, &client_node), h0, "no longer tunnelled");
    assert_eq!(app_pods(&c), before_weft, "the pods were restarted");
    check(
        &c,
        "labelling the namespace again",
        c.kubectl(&["label", "namespace", APP_NS, "weft.dev/mesh=enabled"]),
    );
    wait_enrolled(&c, true, Duration::from_secs(60));

    // Only `apps` may reach the echo servers; the intruder (not in the mesh) is
    // refused by the destination's agent.
    check(&c, "the policy", c.apply(POLICY));
    wait_for(
        &c,
        "the policy denying the intruder",
        Duration::from_secs(30),
        || {
            let f = flow(&c, OUT_NS, "intruder", &target, 1, false);
            Ok(((f.new_ok == 0).then_some(()), format!("{f:?}")))
        },
    );
    let f = flow(&c, APP_NS, "client", &target, 2, true);
    assert!(f.new_ok > 0 && f.new_failed == 0, "allowed: {f:?}");

    // 2. Upgrade with traffic: the agents roll (a changed value), a long-lived
    // connection and new connections every 100 ms run throughout.
    let (client_flow, intruder_flow, rolled) = std::thread::scope(|s| {
        let cl = s.spawn(|| flow(&c, APP_NS, "client", &target, 60, true));
        let intr = s.spawn(|| flow(&c, OUT_NS, "intruder", &target, 60, false));
        std::thread::sleep(Duration::from_secs(5));
        let t = Instant::now();
        let mut upgraded = values.clone();
        upgraded["node"]["loadBalancing"] = json!("round-robin");
        let rel = check(
            &c,
            "helm upgrade",
            helm.upgrade(RELEASE, &chart_dir(), &upgraded, Duration::from_secs(300)),
        );
        assert_eq!(rel["revision"].as_u64(), Some(2), "{rel}");
        wait_release_ready(&c, Duration::from_secs(120), "--lb=round-robin");
        let rolled = t.elapsed();
        (
            cl.join().expect("client flow"),
            intr.join().expect("intruder flow"),
            rolled,
        )
    });
    eprintln!(
        "helm upgrade: new agents Ready on every node {:.1} s after it started; during the roll-out {} new connections succeeded and {} failed {:?}; the long-lived connection survived: {:?}; the denied client got through {} times",
        rolled.as_secs_f64(),
        client_flow.new_ok,
        client_flow.new_failed,
        client_flow.failure_window(),
        client_flow.long_lived_ok,
        intruder_flow.new_ok
    );
    assert_eq!(
        intruder_flow.new_ok, 0,
        "the denied client got through during the upgrade: {intruder_flow:?}"
    );
    assert_eq!(
        (client_flow.new_failed, client_flow.long_lived_ok),
        (0, Some(true)),
        "connections lost during the upgrade: {:?}\n{}",
        client_flow.raw,
        diagnostics(&c)
    );

    // 3. Crash: the agent of an echo replica's node other than the client's is
    // killed (SIGKILL, through containerd); kubelet restarts it.
    let victim_node = c
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .find(|n| *n != client_node)
        .unwrap_or_default();
    let agent = agent_on(&c, &victim_node);
    let (client_flow, intruder_flow, back) = std::thread::scope(|s| {
        let cl = s.spawn(|| flow(&c, APP_NS, "client", &target, 40, false));
        let intr = s.spawn(|| flow(&c, OUT_NS, "intruder", &target, 40, false));
        std::thread::sleep(Duration::from_secs(5));
        let t = Instant::now();
        kill_container(&c, &agent);
        wait_for(
            &c,
            "kubelet restarting the agent",
            Duration::from_secs(60),
            || {
                let r = agent_on(&c, &victim_node).restarts;
                Ok(((r > agent.restarts).then_some(()), format!("restarts {r}")))
            },
        );
        wait_enrolled(&c, true, Duration::from_secs(60));
        let back = t.elapsed();
        (
            cl.join().expect("client flow"),
            intr.join().expect("intruder flow"),
            back,
        )
    });
    eprintln!(
        "agent on {victim_node} killed: restarted and its pods enrolled again {:.1} s later; {} new connections succeeded and {} failed, failures from {:?} ms; the denied client got through {} times",
        back.as_secs_f64(),
        client_flow.new_ok,
        client_flow.new_failed,
        client_flow.failure_window(),
        intruder_flow.new_ok
    );
    assert_eq!(
        intruder_flow.new_ok, 0,
        "the denied client got through during the crash: {intruder_flow:?}"
    );
    assert!(client_flow.new_ok > 0, "{client_flow:?}");
    let f = flow(&c, APP_NS, "client", &target, 3, true);
    assert!(
        f.new_ok > 0 && f.new_failed == 0,
        "after the restart: {f:?}\n{}",
        diagnostics(&c)
    );

    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
}
