//! Gateway API routes for the mesh (GAMMA) on a real Kubernetes cluster
//! (`weft_e2e::kubecluster`: v1.20.2, 2 nodes, kubelet + containerd) with weft
//! installed by Helm:
//!
//! 1. weft is installed first, without the Gateway API CRDs: the control plane
//!    starts without the kinds (its log says so); the CRDs (generated from the
//!    `gateway-api` crate's types, `weft_proto::gateway::route_crds_yaml`) are
//!    created afterwards, and the control plane picks the kinds up on its own
//!    (it looks again every 30 s);
//! 2. an enrolled namespace holds echo-v1 (2 replicas, one per node), echo-v2 (1
//!    replica), Services `echo` (all three pods), `echo-v1` and `echo-v2` (port
//!    named `web`: nothing declares HTTP, the source proxy sniffs it), and a client
//!    pod;
//! 3. an HTTPRoute on Service `echo` (a header match to v2, a prefix to the whole
//!    `echo` Service, a prefix to a Service that does not exist, a 90/10 split):
//!    weft writes `status.parents` (`Accepted=True`, `ResolvedRefs=False`,
//!    `BackendNotFound`); 1,000 requests over one HTTP/1.1 keep-alive connection
//!    split 90/10 per request (v2 within 70..=130) and served by both v1 replicas;
//!    3,000 requests over one h2c connection spread within 20% across the three
//!    endpoints; the header rule sends all its requests to v2; the missing backend
//!    answers 500; the client's node agent counts every one of those requests in
//!    `weft_routed_requests_total` by route, rule and backend.
//!
//! Everything this test creates lives in the cluster (CRDs, namespace, workloads,
//! route), which the harness's teardown removes with the cluster; the test also
//! deletes its namespace and the CRDs first, and checks that the teardown left
//! nothing on the host. Needs root; fails (never skips) without it.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::collections::BTreeMap;
use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};
use weft_e2e::kubecluster::{KubeCluster, APP_IMAGE};
use weft_e2e::kubetraffic::enrolled;
use weft_e2e::kubeweft::{kubectl_json, name_of, ready, strip_ansi, wait_for_in, NS as WEFT_NS};

const NS: &str = "routes";
const ROUTE_CRDS: [&str; 2] = [
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

/// The echo server of both versions: `weft-testapp http` naming itself after its
/// pod in `x-served-by`.
fn echo(version: &str, replicas: usize) -> String {
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: echo-{version}, namespace: {NS}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: echo, version: {version}}}}}
  template:
    metadata: {{labels: {{app: echo, version: {version}}}}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: echo, version: {version}}}}}}}
      containers:
      - name: echo
        image: {APP_IMAGE}
        imagePullPolicy: Never
        command: [weft-testapp, http, --listen, "0.0.0.0:8080", --name, "$(POD_NAME)"]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        readinessProbe:
          tcpSocket: {{port: 8080}}
          periodSeconds: 1
"#
    )
}

fn service(name: &str, selector: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {selector}
  ports: [{{name: web, port: 80, targetPort: 8080}}]
"#
    )
}

fn workloads(nodes: usize) -> String {
    [
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{weft.dev/mesh: enabled}}}}\n"
        ),
        echo("v1", nodes),
        echo("v2", 1),
        service("echo", "{app: echo}"),
        service("echo-v1", "{app: echo, version: v1}"),
        service("echo-v2", "{app: echo, version: v2}"),
        format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {NS}, labels: {{app: client}}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: client
    image: {APP_IMAGE}
    imagePullPolicy: Never
    command: [sleep, "36000"]
"#
        ),
    ]
    .join("---\n")
}

const ROUTE: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo, namespace: routes}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, port: 80}]
  rules:
  - name: canary-header
    matches: [{headers: [{name: x-canary, value: "yes"}]}]
    backendRefs: [{name: echo-v2, port: 80}]
  - name: spread
    matches: [{path: {type: PathPrefix, value: /spread}}]
    backendRefs: [{name: echo, port: 80}]
  - name: gone
    matches: [{path: {type: PathPrefix, value: /gone}}]
    backendRefs: [{name: no-such-service, port: 80}]
  - name: split
    backendRefs:
    - {name: echo-v1, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
"#;

fn diagnostics(c: &KubeCluster) -> String {
    let mut out = weft_e2e::kubeweft::diagnostics_of(c, &[NS]);
    out += &format!(
        "--- httproutes\n{}\n",
        c.kubectl(&["-n", NS, "get", "httproutes", "-o", "yaml"])
            .unwrap_or_else(|e| format!("{e:#}"))
    );
    out
}

fn check<T>(c: &KubeCluster, what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}\n\n{}", diagnostics(c)))
}

fn wait_for<T>(
    c: &KubeCluster,
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<(Option<T>, String)>,
) -> T {
    wait_for_in(c, &[NS], what, timeout, f)
}

/// `kubectl create -f -` (not apply: the HTTPRoute CRD is larger than the
/// 256 KiB `last-applied-configuration` annotation allows).
fn create(c: &KubeCluster, manifest: &str) -> anyhow::Result<String> {
    let mut child = c
        .kubectl_command()
        .args(["create", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("kubectl stdin"))?
        .write_all(manifest.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "kubectl create failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `weft-testapp <args>` in the client pod; its JSON line.
fn app(c: &KubeCluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["-n", NS, "exec", "client", "--", "weft-testapp"];
    all.extend_from_slice(args);
    let out = c.kubectl(&all)?;
    serde_json::from_str(out.trim()).map_err(|e| anyhow::anyhow!("{e}: {out:?}"))
}

fn counts(v: &Value, field: &str) -> BTreeMap<String, u64> {
    v[field]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
                .collect()
        })
        .unwrap_or_default()
}

/// The `weft_routed_requests_total` series of the text exposition: labels, value.
fn routed_series(metrics: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix("weft_routed_requests_total{"))
        .filter_map(|l| {
            let (labels, value) = l.rsplit_once("} ")?;
            let labels = labels
                .split("\",")
                .filter_map(|kv| {
                    let (k, v) = kv.split_once("=\"")?;
                    Some((k.to_string(), v.trim_end_matches('"').to_string()))
                })
                .collect();
            Some((labels, value.trim().parse().ok()?))
        })
        .collect()
}

/// The sum of the routed-request series whose labels include all of `want`.
fn routed(series: &[(BTreeMap<String, String>, f64)], want: &[(&str, &str)]) -> f64 {
    series
        .iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// Our entry of the route's `status.parents`: (Accepted, ResolvedRefs) conditions.
fn weft_parent(route: &Value) -> Option<(Value, Value, Value)> {
    let e = route["status"]["parents"]
        .as_array()?
        .iter()
        .find(|p| p["controllerName"] == weft_proto::gateway::CONTROLLER_NAME)?;
    let cond = |t: &str| {
        e["conditions"]
            .as_array()
            .and_then(|cs| cs.iter().find(|c| c["type"] == t))
            .cloned()
            .unwrap_or(Value::Null)
    };
    Some((
        e["parentRef"].clone(),
        cond("Accepted"),
        cond("ResolvedRefs"),
    ))
}

#[test]
fn gateway_api_routes_on_a_real_cluster_are_decided_per_request_at_the_source() {
    weft_e2e::netlab::require_root();
    let t0 = Instant::now();
    weft_e2e::kubeweft::prepare_images().unwrap_or_else(|e| panic!("{e:#}"));
    let t_images = t0.elapsed();
    let mut c = KubeCluster::start().unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    assert!(c.nodes.len() >= 2, "this test needs two nodes");
    let dir = c.dir.clone();
    let t_cluster = t0.elapsed();
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();

    // 1. weft first, without the Gateway API CRDs.
    let helm = check(&c, "Helm", weft_e2e::kubeweft::helm(&c));
    let values = check(&c, "values", weft_e2e::kubeweft::values());
    let t_install = Instant::now();
    let leader = weft_e2e::kubeweft::install(&c, &helm, &values, "");
    let install_secs = t_install.elapsed().as_secs_f64();
    for crd in ROUTE_CRDS {
        let r = c.kubectl(&["get", "crd", crd]);
        assert!(r.is_err(), "{crd} exists before the test created it: {r:?}");
    }
    let cp_log = check(
        &c,
        "the leader's log",
        c.kubectl(&["-n", WEFT_NS, "logs", &leader, "--tail=-1"]),
    );
    let cp_log = strip_ansi(&cp_log);
    let absent: Vec<&str> = cp_log
        .lines()
        .filter(|l| l.contains("does not serve this kind"))
        .map(str::trim)
        .collect();
    assert!(
        absent.iter().any(|l| l.contains("HTTPRoute")),
        "the control plane did not report HTTPRoute unserved:\n{cp_log}"
    );
    eprintln!(
        "weft installed and Ready in {install_secs:.1} s without the Gateway API CRDs; {leader}:\n  {}",
        absent.join("\n  ")
    );

    // The CRDs, generated from the gateway-api crate's types (with the upstream
    // CRDs' `api-approved.kubernetes.io` annotation, without which the API server
    // refuses a `*.k8s.io` group). Kubernetes 1.20 takes them as they are: no
    // post-processing (the derived schemas have no `x-kubernetes-validations`).
    let t_crds = Instant::now();
    check(
        &c,
        "creating the Gateway API CRDs",
        create(&c, &weft_proto::gateway::route_crds_yaml()),
    );
    wait_for(
        &c,
        "the Gateway API CRDs Established",
        Duration::from_secs(30),
        || {
            let mut not = Vec::new();
            for crd in ROUTE_CRDS {
                let v = kubectl_json(&c, &["get", "crd", crd])?;
                let ok = v["status"]["conditions"].as_array().is_some_and(|cs| {
                    cs.iter()
                        .any(|x| x["type"] == "Established" && x["status"] == "True")
                });
                if !ok {
                    not.push(crd);
                }
            }
            Ok((
                not.is_empty().then_some(()),
                format!("not Established: {not:?}"),
            ))
        },
    );

    // 2. The workloads.
    let t_apps = Instant::now();
    check(&c, "the workloads", c.apply(&workloads(nodes.len())));
    for (sel, n) in [
        ("app=echo,version=v1", nodes.len()),
        ("app=echo,version=v2", 1),
        ("app=client", 1),
    ] {
        check(
            &c,
            "workloads Ready",
            c.wait_pods_ready(NS, sel, n, Duration::from_secs(120)),
        );
    }
    let pods = check(&c, "pods", kubectl_json(&c, &["-n", NS, "get", "pods"]));
    let pods: Vec<Value> = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| ready(p))
        .cloned()
        .collect();
    let of = |version: &str| -> Vec<(String, String)> {
        pods.iter()
            .filter(|p| p["metadata"]["labels"]["version"] == version)
            .map(|p| {
                (
                    name_of(p),
                    p["spec"]["nodeName"].as_str().unwrap_or("").into(),
                )
            })
            .collect()
    };
    let (v1, v2) = (of("v1"), of("v2"));
    let v1_nodes: std::collections::BTreeSet<&String> = v1.iter().map(|(_, n)| n).collect();
    assert_eq!(
        (v1.len(), v1_nodes.len(), v2.len()),
        (nodes.len(), nodes.len(), 1),
        "v1 one per node, one v2: {v1:?} {v2:?}"
    );
    let v2_pod = v2[0].0.clone();
    let client_node = pods
        .iter()
        .find(|p| name_of(p) == "client")
        .and_then(|p| p["spec"]["nodeName"].as_str())
        .unwrap_or_default()
        .to_string();
    for node in &nodes {
        let want: Vec<String> = pods
            .iter()
            .filter(|p| p["spec"]["nodeName"] == node.as_str())
            .map(|p| format!("{NS}/{}", name_of(p)))
            .collect();
        wait_for(
            &c,
            &format!("{node}: the agent enrolling {want:?}"),
            Duration::from_secs(60),
            || {
                let got = enrolled(&c, node)?;
                Ok((
                    want.iter().all(|w| got.contains(w)).then_some(()),
                    format!("enrolled {got:?}"),
                ))
            },
        );
    }
    let apps_secs = t_apps.elapsed().as_secs_f64();
    eprintln!(
        "workloads Ready and enrolled in {apps_secs:.1} s: v1 {v1:?}, v2 {v2:?}, client on {client_node}"
    );
    let vip = format!(
        "{}:80",
        check(
            &c,
            "echo's ClusterIP",
            c.kubectl(&[
                "-n",
                NS,
                "get",
                "service",
                "echo",
                "-o",
                "jsonpath={.spec.clusterIP}"
            ]),
        )
        .trim()
    );

    // 3. The route: status written by weft's leader once it watches the kind.
    let t_route = Instant::now();
    check(&c, "the HTTPRoute", c.apply(ROUTE));
    let (parent, accepted, resolved) = wait_for(
        &c,
        "weft's status.parents entry on the HTTPRoute",
        Duration::from_secs(90),
        || {
            let r = kubectl_json(&c, &["-n", NS, "get", "httproute", "echo"])?;
            Ok((weft_parent(&r), format!("status {}", r["status"])))
        },
    );
    let status_secs = t_route.elapsed().as_secs_f64();
    let since_crds = t_crds.elapsed().as_secs_f64();
    eprintln!(
        "status.parents written {status_secs:.1} s after the route ({since_crds:.1} s after the CRDs): parentRef {parent}\n  Accepted {accepted}\n  ResolvedRefs {resolved}"
    );
    assert_eq!(
        parent,
        serde_json::json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
    );
    assert_eq!(
        (&accepted["status"], &accepted["reason"]),
        (&Value::from("True"), &Value::from("Accepted")),
        "{accepted}"
    );
    assert_eq!(
        (&resolved["status"], &resolved["reason"]),
        (&Value::from("False"), &Value::from("BackendNotFound")),
        "{resolved}"
    );
    assert!(
        resolved["message"]
            .as_str()
            .is_some_and(|m| m.contains("no-such-service")),
        "{resolved}"
    );
    assert_eq!(accepted["observedGeneration"], 1, "{accepted}");

    // In force on the client's node: the missing backend's rule answers 500 (one
    // request each time, a new connection).
    let gone = |c: &KubeCluster| {
        app(
            c,
            &[
                "get",
                "--connect",
                &vip,
                "--path",
                "/gone",
                "--host",
                "echo",
            ],
        )
    };
    let first = wait_for(
        &c,
        "the route in force on the client's node (GET /gone: 500)",
        Duration::from_secs(60),
        || {
            let r = gone(&c)?;
            Ok(((r["status"] == 500).then(|| r.clone()), r.to_string()))
        },
    );
    eprintln!(
        "route in force {:.1} s after it was applied: GET /gone -> {first}",
        t_route.elapsed().as_secs_f64()
    );
    let metrics = |c: &KubeCluster| {
        let text = check(
            c,
            "the client node agent's metrics",
            c.node_http_get(&client_node, "http://127.0.0.1:15020/metrics"),
        );
        routed_series(&text)
    };
    let before = metrics(&c);

    // The 90/10 split, per request, over one HTTP/1.1 keep-alive connection.
    let t_split = Instant::now();
    let r = check(
        &c,
        "1000 requests, one keep-alive connection",
        app(&c, &["requests", "--connect", &vip, "--count", "1000"]),
    );
    let split_secs = t_split.elapsed().as_secs_f64();
    let by = counts(&r, "served_by");
    eprintln!("1000 requests over one HTTP/1.1 connection in {split_secs:.1} s: {r}");
    assert_eq!(counts(&r, "status").get("200"), Some(&1000), "{r}");
    let n_v2 = by.get(&v2_pod).copied().unwrap_or(0);
    let n_v1: Vec<u64> = v1
        .iter()
        .map(|(p, _)| by.get(p).copied().unwrap_or(0))
        .collect();
    assert_eq!(n_v2 + n_v1.iter().sum::<u64>(), 1000, "{by:?}");
    // 100 expected; 3.2 standard deviations either way.
    assert!(
        (70..=130).contains(&n_v2),
        "v2's share of 1000: {n_v2} ({by:?})"
    );
    // Per request, not per connection: both v1 replicas served this one connection.
    assert!(n_v1.iter().all(|n| *n > 100), "{by:?}");

    // The header rule: every request to v2.
    let r = check(
        &c,
        "50 requests with x-canary: yes",
        app(
            &c,
            &[
                "requests",
                "--connect",
                &vip,
                "--count",
                "50",
                "--header",
                "x-canary:yes",
            ],
        ),
    );
    assert_eq!(
        (counts(&r, "served_by"), counts(&r, "status")),
        (
            BTreeMap::from([(v2_pod.clone(), 50)]),
            BTreeMap::from([("200".to_string(), 50)])
        ),
        "{r}"
    );

    // One h2c connection: 3000 requests spread over the three endpoints.
    let t_h2 = Instant::now();
    let r = check(
        &c,
        "3000 requests, one h2c connection",
        app(
            &c,
            &[
                "requests",
                "--connect",
                &vip,
                "--h2",
                "--count",
                "3000",
                "--concurrency",
                "10",
                "--path",
                "/spread/x",
            ],
        ),
    );
    let h2_secs = t_h2.elapsed().as_secs_f64();
    eprintln!("3000 requests over one h2c connection in {h2_secs:.1} s: {r}");
    assert_eq!(counts(&r, "status").get("200"), Some(&3000), "{r}");
    let by = counts(&r, "served_by");
    let each = 3000 / (v1.len() as u64 + 1);
    for (p, _) in v1.iter().chain(v2.iter()) {
        let n = by.get(p).copied().unwrap_or(0);
        assert!(
            (each * 8 / 10..=each * 12 / 10).contains(&n),
            "{p}: {n} of 3000 (each must be within 20% of {each}): {by:?}"
        );
    }

    // The missing backend: 500, the spec's answer.
    let r = check(&c, "GET /gone", gone(&c));
    assert_eq!(r["status"], 500, "{r}");

    // The client's node agent counted each of those requests by route, rule and
    // backend (the counters' increase since just before).
    let after = metrics(&c);
    let delta = |want: &[(&str, &str)]| routed(&after, want) - routed(&before, want);
    let route = format!("{NS}/echo");
    let svc = |s: &str| format!("{NS}/{s}");
    let got = [
        ("split", svc("echo-v1"), "200"),
        ("split", svc("echo-v2"), "200"),
        ("canary-header", svc("echo-v2"), "200"),
        ("spread", svc("echo"), "200"),
    ]
    .map(|(rule, backend, code)| {
        delta(&[
            ("route", &route),
            ("rule", rule),
            ("backend", &backend),
            ("response_code", code),
            ("service", &svc("echo")),
            ("source_namespace", NS),
        ])
    });
    let gone_500 = delta(&[
        ("route", &route),
        ("rule", "gone"),
        ("response_code", "500"),
    ]);
    eprintln!(
        "{client_node}: weft_routed_requests_total (after):\n  {}",
        after
            .iter()
            .map(|(l, v)| format!("{l:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_eq!(
        (got, gone_500),
        (
            [n_v1.iter().sum::<u64>() as f64, n_v2 as f64, 50.0, 3000.0],
            1.0
        ),
        "routed requests by (split v1, split v2, canary-header v2, spread echo), gone 500"
    );

    // 4. What this test added, removed (the CRDs last: the control plane goes back
    // to not seeing the kinds), then the cluster.
    check(
        &c,
        "deleting the namespace",
        c.kubectl(&["delete", "namespace", NS, "--wait=true", "--timeout=120s"]),
    );
    let mut del = vec!["delete", "crd", "--wait=true", "--timeout=60s"];
    del.extend(ROUTE_CRDS);
    check(&c, "deleting the CRDs", c.kubectl(&del));
    let baseline = c.baseline().clone();
    let t_down = Instant::now();
    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    let left = weft_e2e::kubecluster::host::leftovers(&dir, Some(&baseline));
    assert!(left.is_empty(), "left on the host: {left:?}");
    eprintln!(
        "timings: images {:.1} s, cluster {:.1} s, install {install_secs:.1} s, workloads {apps_secs:.1} s, route status {status_secs:.1} s ({since_crds:.1} s after the CRDs), 1000 h1 requests {split_secs:.1} s, 3000 h2 requests {h2_secs:.1} s, teardown {:.1} s, whole test {:.1} s",
        t_images.as_secs_f64(),
        (t_cluster - t_images).as_secs_f64(),
        t_down.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
