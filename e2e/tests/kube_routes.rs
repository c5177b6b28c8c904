//! Gateway API routes for the mesh (GAMMA) on a real Kubernetes cluster
//! (`weft_e2e::kubecluster`: v1.20.2, 2 nodes, kubelet + containerd) with weft
//! installed by Helm:
//!
//! 1. weft is installed first, without the Gateway API CRDs: the control plane
//!    starts without the kinds (its log says so); the CRDs (generated from the
//!    `gateway-api` crate's types, `weft_proto::gateway::route_crds_yaml`) are
//!    created afterwards, and the control plane picks the kinds up on its own
//!    (it looks again every 30 s);
//! 2. an enrolled namespace `routes` holds echo-v1 (2 replicas, one per node),
//!    echo-v2 (1 replica), Services `echo` (all three pods), `echo-v1`, `echo-v2`
//!    and `strict` (port named `web`: nothing declares HTTP, the source proxy
//!    sniffs it), a flaky pod failing every other request (Service `flaky`),
//!    three gRPC servers (tonic) behind Service `greeter` (port `grpc`), one of
//!    them also behind `greeter-g3`, and a client pod (the gRPC servers on the
//!    other node than the client: see [`workloads`]); a second enrolled
//!    namespace `routes-web` holds another client;
//! 3. an HTTPRoute on Service `echo` (a header match to v2, a prefix to the whole
//!    `echo` Service, a redirect, a rewrite with request and response header
//!    modifiers, a 300 ms request timeout, a mirror to v2, a prefix to a Service
//!    that does not exist, a 90/10 split), a consumer route in `routes-web` on
//!    `routes/echo` (a response header, no backendRefs), a route on `strict`
//!    matching only `/only`, a route with retries on `flaky`, and a GRPCRoute on
//!    `greeter` (service `weft.test.Other` to g3): weft writes `status.parents`
//!    (on `echo`: `Accepted=True`, `ResolvedRefs=False`, `BackendNotFound`; the
//!    others accepted and resolved);
//! 4. from the client, with every route in force: 1,000 requests over one
//!    HTTP/1.1 keep-alive connection split 90/10 per request (v2 within 70..=130)
//!    and served by both v1 replicas; the header rule sends all its requests to
//!    v2; 3,000 requests over one h2c connection spread within 20% across the
//!    three endpoints; then, with an AuthorizationPolicy denying v2
//!    `/spread/secret`, v2 refuses that path (403) on the spread while v1 serves
//!    it; the redirect answers 301 with the Location the filter builds; the
//!    rewrite reaches v1 as `/store/...` with the request header set, and answers
//!    with the response header added; a 2 s answer is cut with 504 (between
//!    250 ms and 1 s, as the proxy measured it); the consumer route's 300
//!    requests all carry its header and reach all three echo pods, `routes`'
//!    client's requests do not; `strict` answers 404 for another path; every
//!    mirrored request reaches v2 (its request count, read in the pod); the
//!    missing backend answers 500; 100 requests to the flaky pod are all
//!    answered 200 (100 retries); 3,000 gRPC calls over one channel spread
//!    within 20% across the three greeters, all OK, and 100 calls to
//!    `weft.test.Other` all reach g3; the clients' node agents count every one
//!    of those requests in `weft_routed_requests_total` by route, rule, backend
//!    and code (and the retries in `weft_routed_retries_total`).
//!
//! Everything this test creates lives in the cluster (CRDs, namespaces, workloads,
//! routes), which the harness's teardown removes with the cluster; the test also
//! deletes its namespaces and the CRDs first, and checks that the teardown left
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
/// The consumer's namespace: its own client, and a route on `routes/echo`.
const WEB: &str = "routes-web";
const ROUTE_CRDS: [&str; 2] = [
    "httproutes.gateway.networking.k8s.io",
    "grpcroutes.gateway.networking.k8s.io",
];

/// A Deployment in [`NS`] running `weft-testapp <args>` (`$(POD_NAME)` is the
/// pod's name), spread over the nodes (or all on node `on`), Ready once `port`
/// accepts connections.
fn deployment(
    name: &str,
    labels: &str,
    replicas: usize,
    port: u16,
    args: &str,
    on: Option<&str>,
) -> String {
    let placement = match on {
        Some(node) => format!("nodeSelector: {{kubernetes.io/hostname: {node}}}"),
        None => format!(
            "topologySpreadConstraints:\n      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {labels}}}}}"
        ),
    };
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {labels}}}
  template:
    metadata: {{labels: {labels}}}
    spec:
      terminationGracePeriodSeconds: 1
      {placement}
      containers:
      - name: app
        image: {APP_IMAGE}
        imagePullPolicy: Never
        command: [weft-testapp, {args}]
        env: [{{name: POD_NAME, valueFrom: {{fieldRef: {{fieldPath: metadata.name}}}}}}]
        readinessProbe:
          tcpSocket: {{port: {port}}}
          periodSeconds: 1
"#
    )
}

/// The echo server of both versions: `weft-testapp http` naming itself after its
/// pod in `x-served-by` (and echoing the request's `x-*` fields in its body),
/// counting the requests for `/count...` in /tmp/count.
fn echo(version: &str, replicas: usize) -> String {
    deployment(
        &format!("echo-{version}"),
        &format!("{{app: echo, version: {version}}}"),
        replicas,
        8080,
        r#"http, --listen, "0.0.0.0:8080", --name, "$(POD_NAME)", --count-file, /tmp/count"#,
        None,
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

fn grpc_service(name: &str, selector: &str) -> String {
    format!(
        r#"apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {selector}
  ports: [{{name: grpc, port: 50051, targetPort: 50051}}]
"#
    )
}

/// A client pod (`sleep`; the test execs `weft-testapp` in it), on node `on`.
fn client(ns: &str, on: Option<&str>) -> String {
    let placement = on
        .map(|n| format!("  nodeSelector: {{kubernetes.io/hostname: {n}}}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}, labels: {{app: client}}}}
spec:
  terminationGracePeriodSeconds: 1
{placement}  containers:
  - name: client
    image: {APP_IMAGE}
    imagePullPolicy: Never
    command: [sleep, "36000"]
"#
    )
}

/// The workloads on `nodes`: `routes`' client on the first, the three gRPC
/// servers on the second. (With a server on the client's node, the client's
/// agent serves that server's inbound connections too; on a busy two-core host
/// its answers then come later, and the least-requests balancer sends it
/// fewer calls: 684 to 938 of 3,000 in four runs, against 1,030 to 1,160 for
/// each of the other two.)
fn workloads(nodes: &[String]) -> String {
    let (client_node, greeter_node) = (nodes[0].as_str(), nodes[1].as_str());
    let grpc = r#"grpc-server, --listen, "0.0.0.0:50051", --name, "$(POD_NAME)""#;
    [
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NS}, labels: {{weft.dev/mesh: enabled}}}}\n"
        ),
        format!(
            "apiVersion: v1\nkind: Namespace\nmetadata: {{name: {WEB}, labels: {{weft.dev/mesh: enabled}}}}\n"
        ),
        echo("v1", nodes.len()),
        echo("v2", 1),
        deployment(
            "flaky",
            "{app: flaky}",
            1,
            8080,
            r#"http, --listen, "0.0.0.0:8080", --name, "$(POD_NAME)", --fail-every, "2""#,
            None,
        ),
        deployment(
            "greeter",
            "{app: greeter, pick: main}",
            2,
            50051,
            grpc,
            Some(greeter_node),
        ),
        deployment(
            "greeter-g3",
            "{app: greeter, pick: g3}",
            1,
            50051,
            grpc,
            Some(greeter_node),
        ),
        service("echo", "{app: echo}"),
        service("echo-v1", "{app: echo, version: v1}"),
        service("echo-v2", "{app: echo, version: v2}"),
        service("strict", "{app: echo}"),
        service("flaky", "{app: flaky}"),
        grpc_service("greeter", "{app: greeter}"),
        grpc_service("greeter-g3", "{app: greeter, pick: g3}"),
        client(NS, Some(client_node)),
        client(WEB, None),
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
  - name: moved
    matches: [{path: {type: Exact, value: /old}}]
    filters: [{type: RequestRedirect, requestRedirect: {hostname: new.example, statusCode: 301}}]
  - name: rewrite
    matches: [{path: {type: PathPrefix, value: /shop}}]
    filters:
    - {type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /store}}}
    - {type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: x-route, value: rewrite}]}}
    - {type: ResponseHeaderModifier, responseHeaderModifier: {add: [{name: x-resp, value: added}]}}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: slow
    matches: [{path: {type: PathPrefix, value: /delay}}]
    timeouts: {request: 300ms}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: mirrored
    matches: [{path: {type: PathPrefix, value: /count}}]
    filters:
    - {type: RequestMirror, requestMirror: {backendRef: {name: echo-v2, port: 80}}}
    backendRefs: [{name: echo-v1, port: 80}]
  - name: gone
    matches: [{path: {type: PathPrefix, value: /gone}}]
    backendRefs: [{name: no-such-service, port: 80}]
  - name: split
    backendRefs:
    - {name: echo-v1, port: 80, weight: 90}
    - {name: echo-v2, port: 80, weight: 10}
"#;

/// The other routes: a consumer route in [`WEB`] on `routes/echo` (a response header, no
/// backendRefs), a route whose only rule matches `/only`, retries on the flaky
/// Service, and a GRPCRoute sending one gRPC service to the g3 pod.
const ROUTES: &str = r#"
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: consumer, namespace: routes-web}
spec:
  parentRefs: [{group: "", kind: Service, name: echo, namespace: routes}]
  rules:
  - filters:
    - {type: ResponseHeaderModifier, responseHeaderModifier: {set: [{name: x-consumer, value: web}]}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: strict, namespace: routes}
spec:
  parentRefs: [{group: "", kind: Service, name: strict}]
  rules:
  - matches: [{path: {type: Exact, value: /only}}]
    backendRefs: [{name: echo-v1, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: flaky, namespace: routes}
spec:
  parentRefs: [{group: "", kind: Service, name: flaky}]
  rules:
  - backendRefs: [{name: flaky, port: 80}]
    retry: {attempts: 1, codes: [503]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: routes}
spec:
  parentRefs: [{group: "", kind: Service, name: greeter}]
  rules:
  - matches: [{method: {service: weft.test.Other}}]
    backendRefs: [{name: greeter-g3, port: 50051}]
  - backendRefs: [{name: greeter, port: 50051}]
"#;

/// The destination still decides every routed request: v2 refuses `/spread/secret`.
/// Applied after the spread over three endpoints: an endpoint whose agent
/// inspects requests answers a little later, and the least-requests balancer
/// sends it fewer.
const POLICY: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: v2-no-secret, namespace: routes}
spec:
  selector: {matchLabels: {version: v2}}
  action: DENY
  rules: [{to: [{operation: {paths: [/spread/secret]}}]}]
"#;

fn diagnostics(c: &KubeCluster) -> String {
    let mut out = weft_e2e::kubeweft::diagnostics_of(c, &[NS, WEB]);
    for kind in ["httproutes", "grpcroutes"] {
        out += &format!(
            "--- {kind}\n{}\n",
            c.kubectl(&["get", kind, "--all-namespaces", "-o", "yaml"])
                .unwrap_or_else(|e| format!("{e:#}"))
        );
    }
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
    wait_for_in(c, &[NS, WEB], what, timeout, f)
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

/// `weft-testapp <args>` in the client pod of `ns`; its JSON line.
fn app_in(c: &KubeCluster, ns: &str, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["-n", ns, "exec", "client", "--", "weft-testapp"];
    all.extend_from_slice(args);
    let out = c.kubectl(&all)?;
    serde_json::from_str(out.trim()).map_err(|e| anyhow::anyhow!("{e}: {out:?}"))
}

/// `weft-testapp <args>` in [`NS`]'s client pod.
fn app(c: &KubeCluster, args: &[&str]) -> anyhow::Result<Value> {
    app_in(c, NS, args)
}

/// One request (`weft-testapp get`) from [`NS`]'s client.
fn get(c: &KubeCluster, vip: &str, path: &str, host: &str) -> anyhow::Result<Value> {
    app(
        c,
        &["get", "--connect", vip, "--path", path, "--host", host],
    )
}

/// The requests for `/count...` an echo pod has seen (its /tmp/count; none yet: 0).
fn counted(c: &KubeCluster, pod: &str) -> anyhow::Result<u64> {
    let out = c.kubectl(&[
        "-n",
        NS,
        "exec",
        pod,
        "--",
        "sh",
        "-c",
        "cat /tmp/count 2>/dev/null || echo 0",
    ])?;
    out.trim()
        .parse()
        .map_err(|e| anyhow::anyhow!("{pod}'s /tmp/count: {e}: {out:?}"))
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

type Series = Vec<(BTreeMap<String, String>, f64)>;

/// The series of `name` (e.g. `weft_routed_requests_total`) in a text
/// exposition: labels, value.
fn series_of(metrics: &str, name: &str) -> Series {
    let prefix = format!("{name}{{");
    metrics
        .lines()
        .filter_map(|l| l.strip_prefix(prefix.as_str()))
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

/// What a node agent's metrics say about routed requests.
struct Routed {
    requests: Series,
    retries: Series,
    /// `weft_routed_request_duration_seconds_bucket`.
    buckets: Series,
}

impl Routed {
    fn of(metrics: &str) -> Self {
        Routed {
            requests: series_of(metrics, "weft_routed_requests_total"),
            retries: series_of(metrics, "weft_routed_retries_total"),
            buckets: series_of(metrics, "weft_routed_request_duration_seconds_bucket"),
        }
    }
}

/// The sum of the routed-request series whose labels include all of `want`.
fn routed(series: &Series, want: &[(&str, &str)]) -> f64 {
    series
        .iter()
        .filter(|(l, _)| {
            want.iter()
                .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, v)| v)
        .sum()
}

/// The sum of the histogram bucket series with upper bound `le` whose labels
/// include all of `want`.
fn bucket(series: &Series, want: &[(&str, &str)], le: f64) -> f64 {
    series
        .iter()
        .filter(|(l, _)| {
            l.get("le").and_then(|v| v.parse::<f64>().ok()) == Some(le)
                && want
                    .iter()
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
    check(&c, "the workloads", c.apply(&workloads(&nodes)));
    for (ns, sel, n) in [
        (NS, "app=echo,version=v1", nodes.len()),
        (NS, "app=echo,version=v2", 1),
        (NS, "app=flaky", 1),
        (NS, "app=greeter,pick=main", 2),
        (NS, "app=greeter,pick=g3", 1),
        (NS, "app=client", 1),
        (WEB, "app=client", 1),
    ] {
        check(
            &c,
            "workloads Ready",
            c.wait_pods_ready(ns, sel, n, Duration::from_secs(180)),
        );
    }
    let mut pods: Vec<(String, Value)> = Vec::new();
    for ns in [NS, WEB] {
        let all = check(&c, "pods", kubectl_json(&c, &["-n", ns, "get", "pods"]));
        pods.extend(
            all["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|p| ready(p))
                .map(|p| (ns.to_string(), p.clone())),
        );
    }
    let with = |label: &str, value: &str| -> Vec<(String, String)> {
        pods.iter()
            .filter(|(ns, p)| ns == NS && p["metadata"]["labels"][label] == value)
            .map(|(_, p)| {
                (
                    name_of(p),
                    p["spec"]["nodeName"].as_str().unwrap_or("").into(),
                )
            })
            .collect()
    };
    let (v1, v2) = (with("version", "v1"), with("version", "v2"));
    let (greeters, g3) = (with("app", "greeter"), with("pick", "g3"));
    let v1_nodes: std::collections::BTreeSet<&String> = v1.iter().map(|(_, n)| n).collect();
    assert_eq!(
        (v1.len(), v1_nodes.len(), v2.len(), greeters.len(), g3.len()),
        (nodes.len(), nodes.len(), 1, 3, 1),
        "v1 one per node, one v2, three greeters (one g3): {v1:?} {v2:?} {greeters:?}"
    );
    let v2_pod = v2[0].0.clone();
    let g3_pod = g3[0].0.clone();
    let node_of = |ns: &str, name: &str| -> String {
        pods.iter()
            .find(|(n, p)| n == ns && name_of(p) == name)
            .and_then(|(_, p)| p["spec"]["nodeName"].as_str())
            .unwrap_or_default()
            .to_string()
    };
    let client_node = node_of(NS, "client");
    let web_node = node_of(WEB, "client");
    for node in &nodes {
        let want: Vec<String> = pods
            .iter()
            .filter(|(_, p)| p["spec"]["nodeName"] == node.as_str())
            .map(|(ns, p)| format!("{ns}/{}", name_of(p)))
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
        "workloads Ready and enrolled in {apps_secs:.1} s: v1 {v1:?}, v2 {v2:?}, greeters {greeters:?} (g3 {g3_pod}), client on {client_node}, {WEB}/client on {web_node}"
    );
    let cluster_ip = |svc: &str| -> String {
        check(
            &c,
            &format!("{svc}'s ClusterIP"),
            c.kubectl(&[
                "-n",
                NS,
                "get",
                "service",
                svc,
                "-o",
                "jsonpath={.spec.clusterIP}",
            ]),
        )
        .trim()
        .to_string()
    };
    let vip = format!("{}:80", cluster_ip("echo"));
    let strict_vip = format!("{}:80", cluster_ip("strict"));
    let flaky_vip = format!("{}:80", cluster_ip("flaky"));
    let grpc_vip = format!("{}:50051", cluster_ip("greeter"));

    // 3. The routes: status written by weft's leader once it watches the kinds.
    let t_route = Instant::now();
    check(&c, "the routes", c.apply(&format!("{ROUTE}---\n{ROUTES}")));
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
    // The other routes: accepted, every reference resolved.
    for (ns, kind, name, parent_ref) in [
        (
            WEB,
            "httproute",
            "consumer",
            serde_json::json!({"group": "", "kind": "Service", "name": "echo", "namespace": NS}),
        ),
        (
            NS,
            "httproute",
            "strict",
            serde_json::json!({"group": "", "kind": "Service", "name": "strict"}),
        ),
        (
            NS,
            "httproute",
            "flaky",
            serde_json::json!({"group": "", "kind": "Service", "name": "flaky"}),
        ),
        (
            NS,
            "grpcroute",
            "greeter",
            serde_json::json!({"group": "", "kind": "Service", "name": "greeter"}),
        ),
    ] {
        let (parent, accepted, resolved) = wait_for(
            &c,
            &format!("weft's status.parents entry on {kind} {ns}/{name}"),
            Duration::from_secs(30),
            || {
                let r = kubectl_json(&c, &["-n", ns, "get", kind, name])?;
                Ok((weft_parent(&r), format!("status {}", r["status"])))
            },
        );
        assert_eq!(
            (
                parent,
                &accepted["status"],
                &accepted["reason"],
                &resolved["status"],
                &resolved["reason"]
            ),
            (
                parent_ref,
                &Value::from("True"),
                &Value::from("Accepted"),
                &Value::from("True"),
                &Value::from("ResolvedRefs")
            ),
            "{kind} {ns}/{name}: Accepted {accepted}, ResolvedRefs {resolved}"
        );
    }

    // In force on the client's node: the missing backend's rule answers 500 (one
    // request each time, a new connection).
    let gone = |c: &KubeCluster| get(c, &vip, "/gone", "echo");
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
    // The other routes in force too, each shown by
    // what only it does.
    wait_for(
        &c,
        "the strict route in force (GET /other: 404)",
        Duration::from_secs(60),
        || {
            let r = get(&c, &strict_vip, "/other", "strict")?;
            Ok(((r["status"] == 404).then_some(()), r.to_string()))
        },
    );
    wait_for(
        &c,
        "the GRPCRoute in force (20 calls to weft.test.Other, all on g3)",
        Duration::from_secs(60),
        || {
            let r = app(
                &c,
                &[
                    "grpc-calls",
                    "--connect",
                    &grpc_vip,
                    "--method",
                    "/weft.test.Other/Call",
                    "--count",
                    "20",
                ],
            )?;
            let done = counts(&r, "served_by") == BTreeMap::from([(g3_pod.clone(), 20)]);
            Ok((done.then_some(()), r.to_string()))
        },
    );
    wait_for(
        &c,
        "the consumer route in force for routes-web's client (x-consumer: web)",
        Duration::from_secs(60),
        || {
            let r = app_in(
                &c,
                WEB,
                &[
                    "requests",
                    "--connect",
                    &vip,
                    "--count",
                    "5",
                    "--show-header",
                    "x-consumer",
                ],
            )?;
            let done = counts(&r, "header").get("web") == Some(&5);
            Ok((done.then_some(()), r.to_string()))
        },
    );
    let metrics = |c: &KubeCluster, node: &str| {
        let text = check(
            c,
            "a node agent's metrics",
            c.node_http_get(node, "http://127.0.0.1:15020/metrics"),
        );
        Routed::of(&text)
    };
    // The flaky route: in force once a request is counted under it (routed, a
    // request leaves the flaky pod's count even: each one that follows fails once,
    // then succeeds).
    wait_for(
        &c,
        "the flaky route in force (a request counted under routes/flaky)",
        Duration::from_secs(60),
        || {
            let r = get(&c, &flaky_vip, "/", "flaky")?;
            let m = metrics(&c, &client_node);
            let n = routed(&m.requests, &[("route", "routes/flaky")]);
            Ok(((n > 0.0).then_some(()), format!("{r}; {n} routed")))
        },
    );
    let routes_secs = t_route.elapsed().as_secs_f64();
    eprintln!("every route in force {routes_secs:.1} s after they were applied");
    let before = metrics(&c, &client_node);
    let web_before = metrics(&c, &web_node);

    // 4. The traffic. The 90/10 split, per request, over one HTTP/1.1 keep-alive
    // connection.
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
    let (mut split_v1, mut split_v2) = (n_v1.iter().sum::<u64>(), n_v2);

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

    // The destination's policy still decides each routed request: v2 refuses the
    // path (403), v1 serves it. In force on v2's node once v2 refuses all of 30
    // (those requests are counted too).
    check(&c, "the AuthorizationPolicy", c.apply(POLICY));
    let (mut probe_200, mut probe_403) = (0, 0);
    wait_for(
        &c,
        "v2 refusing /spread/secret (the AuthorizationPolicy in force)",
        Duration::from_secs(60),
        || {
            let r = app(
                &c,
                &[
                    "requests",
                    "--connect",
                    &vip,
                    "--h2",
                    "--count",
                    "30",
                    "--concurrency",
                    "5",
                    "--path",
                    "/spread/secret",
                ],
            )?;
            let status = counts(&r, "status");
            probe_200 += status.get("200").copied().unwrap_or(0);
            probe_403 += status.get("403").copied().unwrap_or(0);
            let done = !counts(&r, "served_by").contains_key(&v2_pod) && status.contains_key("403");
            Ok((done.then_some(()), r.to_string()))
        },
    );
    let r = check(
        &c,
        "300 requests for /spread/secret, one h2c connection",
        app(
            &c,
            &[
                "requests",
                "--connect",
                &vip,
                "--h2",
                "--count",
                "300",
                "--concurrency",
                "5",
                "--path",
                "/spread/secret",
            ],
        ),
    );
    eprintln!("300 requests for /spread/secret: {r}");
    let status = counts(&r, "status");
    let (secret_200, secret_403) = (
        status.get("200").copied().unwrap_or(0),
        status.get("403").copied().unwrap_or(0),
    );
    assert!(
        !counts(&r, "served_by").contains_key(&v2_pod),
        "v2 must refuse every request: {r}"
    );
    assert_eq!(secret_200 + secret_403, 300, "{r}");
    // 100 expected.
    assert!(secret_403 > 30, "{r}");
    // The 200s from v1, the 403s from v2's node agent (no `x-served-by`).
    let by = counts(&r, "served_by");
    let from_v1: u64 = v1
        .iter()
        .map(|(p, _)| by.get(p).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        (from_v1, by.get("-").copied().unwrap_or(0)),
        (secret_200, secret_403),
        "{r}"
    );

    // Redirect: answered at the source with the filter's status and Location.
    let r = check(&c, "GET /old?x=1", get(&c, &vip, "/old?x=1", "echo"));
    eprintln!("GET /old?x=1 -> {r}");
    assert_eq!(
        (&r["status"], &r["headers"]["location"]),
        (
            &Value::from(301),
            &Value::from("http://new.example/old?x=1")
        ),
        "{r}"
    );

    // Rewrite, and request and response header modifiers.
    let r = check(
        &c,
        "GET /shop/cart?id=7",
        get(&c, &vip, "/shop/cart?id=7", "echo"),
    );
    eprintln!("GET /shop/cart?id=7 -> {r}");
    assert_eq!(r["status"], 200, "{r}");
    let body = r["body"].as_str().unwrap_or_default();
    assert!(body.starts_with("GET /store/cart?id=7\n"), "{r}");
    assert!(
        body.split_whitespace().any(|w| w == "x-route=rewrite"),
        "{r}"
    );
    assert_eq!(r["headers"]["x-resp"], "added", "{r}");
    let served_by = r["headers"]["x-served-by"].as_str().unwrap_or_default();
    assert!(v1.iter().any(|(p, _)| p == served_by), "{r}");

    // Timeout: a 2 s answer cut at 300 ms with 504 (how long the proxy took is in
    // the duration histogram, below).
    let t_slow = Instant::now();
    let r = check(&c, "GET /delay/2000", get(&c, &vip, "/delay/2000", "echo"));
    let slow_secs = t_slow.elapsed().as_secs_f64();
    eprintln!("GET /delay/2000 -> {r} ({slow_secs:.2} s with kubectl exec)");
    assert_eq!(r["status"], 504, "{r}");

    // A consumer route (namespace routes-web, on Service routes/echo) applies to
    // routes-web's clients only, and replaces the producer route for them: no split,
    // every endpoint of echo, and its response header; routes' client is unaffected.
    let r = check(
        &c,
        "300 requests from routes-web's client",
        app_in(
            &c,
            WEB,
            &[
                "requests",
                "--connect",
                &vip,
                "--count",
                "300",
                "--show-header",
                "x-consumer",
            ],
        ),
    );
    eprintln!("300 requests from {WEB}/client: {r}");
    let by = counts(&r, "served_by");
    assert_eq!(
        (
            counts(&r, "status"),
            counts(&r, "header"),
            by.values().sum::<u64>()
        ),
        (
            BTreeMap::from([("200".to_string(), 300)]),
            BTreeMap::from([("web".to_string(), 300)]),
            300
        ),
        "{r}"
    );
    for (p, _) in v1.iter().chain(v2.iter()) {
        assert!(by.get(p).copied().unwrap_or(0) > 0, "{p} served none: {r}");
    }
    let r = check(
        &c,
        "20 requests from routes' client",
        app(
            &c,
            &[
                "requests",
                "--connect",
                &vip,
                "--count",
                "20",
                "--show-header",
                "x-consumer",
            ],
        ),
    );
    assert_eq!(
        (counts(&r, "status"), counts(&r, "header")),
        (
            BTreeMap::from([("200".to_string(), 20)]),
            BTreeMap::from([("-".to_string(), 20)])
        ),
        "{r}"
    );
    // The producer's split served those.
    let by = counts(&r, "served_by");
    split_v2 += by.get(&v2_pod).copied().unwrap_or(0);
    split_v1 += v1
        .iter()
        .map(|(p, _)| by.get(p).copied().unwrap_or(0))
        .sum::<u64>();

    // No rule matches: 404; the one that does is served.
    let r = check(
        &c,
        "GET /other (strict)",
        get(&c, &strict_vip, "/other", "strict"),
    );
    assert_eq!(r["status"], 404, "{r}");
    let r = check(
        &c,
        "GET /only (strict)",
        get(&c, &strict_vip, "/only", "strict"),
    );
    assert_eq!(r["status"], 200, "{r}");
    let served_by = r["headers"]["x-served-by"].as_str().unwrap_or_default();
    assert!(v1.iter().any(|(p, _)| p == served_by), "{r}");

    // Mirror: every /count request served by v1 is also sent to v2 (whose answer
    // is dropped).
    let r = check(
        &c,
        "50 requests for /count/x",
        app(
            &c,
            &[
                "requests",
                "--connect",
                &vip,
                "--count",
                "50",
                "--path",
                "/count/x",
            ],
        ),
    );
    let by = counts(&r, "served_by");
    let v1_served: u64 = v1
        .iter()
        .map(|(p, _)| by.get(p).copied().unwrap_or(0))
        .sum();
    assert_eq!(
        (counts(&r, "status").get("200").copied(), v1_served),
        (Some(50), 50),
        "{r}"
    );
    let v1_counted: u64 = v1
        .iter()
        .map(|(p, _)| check(&c, "a v1 pod's count", counted(&c, p)))
        .sum();
    let mirrored = wait_for(
        &c,
        "v2 receiving the 50 mirrored requests",
        Duration::from_secs(10),
        || {
            let n = counted(&c, &v2_pod)?;
            Ok(((n == 50).then_some(n), format!("{n} of 50")))
        },
    );
    eprintln!("/count: v1 pods counted {v1_counted}, v2 (the mirror) {mirrored}");
    assert_eq!(v1_counted, 50, "v1 pods' /tmp/count");

    // The missing backend: 500, the spec's answer.
    let r = check(&c, "GET /gone", gone(&c));
    assert_eq!(r["status"], 500, "{r}");

    // Retries: the flaky pod fails every other request; each failure is retried.
    let r = check(
        &c,
        "100 requests to flaky",
        app(&c, &["requests", "--connect", &flaky_vip, "--count", "100"]),
    );
    eprintln!("100 requests to flaky: {r}");
    assert_eq!(
        counts(&r, "status"),
        BTreeMap::from([("200".to_string(), 100)]),
        "{r}"
    );

    // gRPC (real tonic client and servers): one channel spreads 3,000 calls across
    // the three endpoints, and the GRPCRoute's method match sends a service to g3.
    let t_grpc = Instant::now();
    let r = check(
        &c,
        "3000 gRPC calls, one channel",
        app(
            &c,
            &[
                "grpc-calls",
                "--connect",
                &grpc_vip,
                "--count",
                "3000",
                "--concurrency",
                "10",
            ],
        ),
    );
    let grpc_secs = t_grpc.elapsed().as_secs_f64();
    eprintln!("3000 gRPC calls over one channel in {grpc_secs:.1} s: {r}");
    assert_eq!(
        counts(&r, "codes"),
        BTreeMap::from([("OK".to_string(), 3000)]),
        "{r}"
    );
    let by = counts(&r, "served_by");
    for (p, _) in &greeters {
        let n = by.get(p).copied().unwrap_or(0);
        assert!(
            (800..=1200).contains(&n),
            "gRPC {p}: {n} of 3000 (each must be within 20% of 1000): {by:?}"
        );
    }
    let r = check(
        &c,
        "100 calls to weft.test.Other",
        app(
            &c,
            &[
                "grpc-calls",
                "--connect",
                &grpc_vip,
                "--method",
                "/weft.test.Other/Call",
                "--count",
                "100",
                "--concurrency",
                "4",
            ],
        ),
    );
    assert_eq!(
        (counts(&r, "served_by"), counts(&r, "codes")),
        (
            BTreeMap::from([(g3_pod.clone(), 100)]),
            BTreeMap::from([("OK".to_string(), 100)])
        ),
        "{r}"
    );

    // The clients' node agents counted each of those requests by route, rule and
    // backend (the counters' increase since just before).
    let after = metrics(&c, &client_node);
    let web_after = metrics(&c, &web_node);
    let delta =
        |want: &[(&str, &str)]| routed(&after.requests, want) - routed(&before.requests, want);
    let svc = |s: &str| format!("{NS}/{s}");
    let from_routes = |service: &str, route: &str, rule: &str, backend: &str, code: &str| {
        delta(&[
            ("service", &svc(service)),
            ("route", route),
            ("rule", rule),
            ("backend", backend),
            ("response_code", code),
            ("source_namespace", NS),
        ])
    };
    let (echo_route, none) = (svc("echo"), "none");
    let got = vec![
        (
            "split v1",
            from_routes("echo", &echo_route, "split", &svc("echo-v1"), "200"),
        ),
        (
            "split v2",
            from_routes("echo", &echo_route, "split", &svc("echo-v2"), "200"),
        ),
        (
            "canary-header",
            from_routes("echo", &echo_route, "canary-header", &svc("echo-v2"), "200"),
        ),
        (
            "spread 200",
            from_routes("echo", &echo_route, "spread", &svc("echo"), "200"),
        ),
        (
            "spread 403",
            from_routes("echo", &echo_route, "spread", &svc("echo"), "403"),
        ),
        (
            "moved 301",
            from_routes("echo", &echo_route, "moved", none, "301"),
        ),
        (
            "rewrite",
            from_routes("echo", &echo_route, "rewrite", &svc("echo-v1"), "200"),
        ),
        (
            "slow 504",
            from_routes("echo", &echo_route, "slow", &svc("echo-v1"), "504"),
        ),
        (
            "mirrored",
            from_routes("echo", &echo_route, "mirrored", &svc("echo-v1"), "200"),
        ),
        (
            "gone 500",
            delta(&[
                ("route", &echo_route),
                ("rule", "gone"),
                ("response_code", "500"),
            ]),
        ),
        ("strict 404", from_routes("strict", none, none, none, "404")),
        (
            "strict /only",
            from_routes("strict", &svc("strict"), "0", &svc("echo-v1"), "200"),
        ),
        (
            "flaky 200",
            from_routes("flaky", &svc("flaky"), "0", &svc("flaky"), "200"),
        ),
        (
            "greeter default",
            from_routes("greeter", &svc("greeter"), "1", &svc("greeter"), "200"),
        ),
        (
            "greeter Other",
            from_routes("greeter", &svc("greeter"), "0", &svc("greeter-g3"), "200"),
        ),
        (
            "flaky retries",
            routed(&after.retries, &[("route", &svc("flaky"))])
                - routed(&before.retries, &[("route", &svc("flaky"))]),
        ),
        (
            "consumer (routes-web's node)",
            routed(
                &web_after.requests,
                &[
                    ("service", &svc("echo")),
                    ("route", &format!("{WEB}/consumer")),
                    ("rule", "0"),
                    ("backend", &svc("echo")),
                    ("response_code", "200"),
                    ("source_namespace", WEB),
                ],
            ) - routed(
                &web_before.requests,
                &[
                    ("service", &svc("echo")),
                    ("route", &format!("{WEB}/consumer")),
                    ("rule", "0"),
                    ("backend", &svc("echo")),
                    ("response_code", "200"),
                    ("source_namespace", WEB),
                ],
            ),
        ),
    ];
    let want = vec![
        ("split v1", split_v1 as f64),
        ("split v2", split_v2 as f64),
        ("canary-header", 50.0),
        ("spread 200", (3000 + probe_200 + secret_200) as f64),
        ("spread 403", (probe_403 + secret_403) as f64),
        ("moved 301", 1.0),
        ("rewrite", 1.0),
        ("slow 504", 1.0),
        ("mirrored", 50.0),
        ("gone 500", 1.0),
        ("strict 404", 1.0),
        ("strict /only", 1.0),
        ("flaky 200", 100.0),
        ("greeter default", 3000.0),
        ("greeter Other", 100.0),
        ("flaky retries", 100.0),
        ("consumer (routes-web's node)", 300.0),
    ];
    eprintln!(
        "{client_node}: weft_routed_requests_total (after):\n  {}",
        after
            .requests
            .iter()
            .map(|(l, v)| format!("{l:?} {v}"))
            .collect::<Vec<_>>()
            .join("\n  ")
    );
    assert_eq!(
        got, want,
        "routed requests (increase) by route, rule, backend and code"
    );
    // The timeout, as the proxy measured it: the 504 came after 250 ms and within
    // 1 s (the endpoint answers after 2 s).
    let slow = [
        ("route", echo_route.as_str()),
        ("rule", "slow"),
        ("response_code", "504"),
    ];
    let cut = [0.25, 1.0]
        .map(|le| bucket(&after.buckets, &slow, le) - bucket(&before.buckets, &slow, le));
    assert_eq!(
        cut,
        [0.0, 1.0],
        "the 504's duration buckets (le 0.25, le 1)"
    );

    // 5. What this test added, removed (the CRDs last: the control plane goes back
    // to not seeing the kinds), then the cluster.
    let t_delete = Instant::now();
    check(
        &c,
        "deleting the namespaces",
        c.kubectl(&["delete", "namespace", NS, WEB, "--wait=false"]),
    );
    wait_for(
        &c,
        "the namespaces deleted",
        Duration::from_secs(240),
        || {
            let all = kubectl_json(&c, &["get", "namespaces"])?;
            let left: Vec<String> = all["items"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|n| [NS, WEB].contains(&name_of(n).as_str()))
                .map(|n| format!("{}: {}", name_of(n), n["status"]))
                .collect();
            let kcm = std::fs::read_to_string(dir.join("logs/kube-controller-manager.log"))
                .unwrap_or_default();
            let kcm: Vec<&str> = kcm
                .lines()
                .filter(|l| {
                    l.contains("namespace_controller") || l.contains("namespaced_resources_deleter")
                })
                .collect();
            Ok((
                left.is_empty().then_some(()),
                format!(
                    "{left:?}\nkube-controller-manager, namespace lines (last 20):\n{}",
                    kcm[kcm.len().saturating_sub(20)..].join("\n")
                ),
            ))
        },
    );
    let delete_secs = t_delete.elapsed().as_secs_f64();
    let mut del = vec!["delete", "crd", "--wait=true", "--timeout=60s"];
    del.extend(ROUTE_CRDS);
    check(&c, "deleting the CRDs", c.kubectl(&del));
    let baseline = c.baseline().clone();
    let t_down = Instant::now();
    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    let left = weft_e2e::kubecluster::host::leftovers(&dir, Some(&baseline));
    assert!(left.is_empty(), "left on the host: {left:?}");
    eprintln!(
        "timings: images {:.1} s, cluster {:.1} s, install {install_secs:.1} s, workloads {apps_secs:.1} s, route status {status_secs:.1} s ({since_crds:.1} s after the CRDs), every route in force {routes_secs:.1} s, 1000 h1 requests {split_secs:.1} s, 3000 h2 requests {h2_secs:.1} s, 3000 gRPC calls {grpc_secs:.1} s, namespaces deleted {delete_secs:.1} s, teardown {:.1} s, whole test {:.1} s",
        t_images.as_secs_f64(),
        (t_cluster - t_images).as_secs_f64(),
        t_down.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
