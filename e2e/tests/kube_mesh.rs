//! Opting in to the mesh on a real Kubernetes cluster (`weft_e2e::kubecluster`:
//! v1.20.2, 2 nodes sharing this kernel), with weft installed by Helm:
//!
//! 1. a namespace labelled `weft.dev/mesh=enabled` holds three Deployments (server,
//!    client, other), each with its own ServiceAccount and one replica per node;
//!    every node's agent enrolls exactly its own node's pods of that namespace and
//!    holds an SVID for each of their ServiceAccounts
//!    (`spiffe://cluster.local/ns/mesh/sa/<sa>`, in `/config_dump` `certificates`);
//! 2. client -> server ClusterIP traffic that crosses nodes is mTLS on the wire: a
//!    capture on the destination node's uplink (its `eth0`, in its network
//!    namespace) shows TLS handshakes to the server pod's :15008, no packet to the
//!    application's port, and none of the distinctive text the client sent; the
//!    same capture does show the text an unmeshed client sends to an unmeshed
//!    server on that node (the capture works);
//! 3. AuthorizationPolicies allow the client's ServiceAccount and deny the other's
//!    across nodes (L4), an L7 rule answers `403 RBAC: access denied` to a path it
//!    does not allow while another path is served, the example C Wasm plugin
//!    (served from inside the cluster by a busybox httpd from a ConfigMap, fetched
//!    by the control plane over `http://` with its `sha256`) denies the other
//!    ServiceAccount its protected path and adds its header, and `kubectl get`
//!    shows every policy and the plugin Accepted (printer columns);
//! 4. each agent's metrics (`:15020/metrics` in its node's network namespace) show
//!    those flows: connections opened with the client and server workloads and
//!    principals and `mutual_tls` (both reporters), authorization allows and
//!    denies, requests answered 403, the plugin's local replies;
//! 5. a pod in an unlabelled namespace is untouched: in no agent's enrolled pods,
//!    its node's agent proxies none of its traffic, and it reaches an unmeshed
//!    Service on the other node directly (plaintext to the server's own port).
//!
//! 6. authentication: a PeerAuthentication STRICT on the namespace refuses the
//!    unmeshed client's plaintext (counted in
//!    `weft_plaintext_refused_strict_mtls_total`) while the meshed client keeps
//!    working; a RequestAuthentication answers an expired JWT `401` and lets a valid
//!    one through; `kubectl get wpeer` / `wra` show them Accepted;
//! 7. the SPIFFE Workload API: a pod mounting the agent's socket directory gets its
//!    own X.509-SVID and a JWT-SVID, with a real client;
//! 8. CA rotation: `weft-control-plane rotate-ca --kubernetes` run in a control plane
//!    pod stages a new root in the CA Secret; the replicas go trusting -> reissuing
//!    -> stable, every SVID is re-issued by the new root, the old one leaves the
//!    bundle (nodes and the `weft-ca-root-cert` ConfigMap), and connections across
//!    the nodes never fail meanwhile.
//!
//! Needs root, `make plugins` (target/plugins/peer_gate_c.wasm) and tcpdump;
//! fails (never skips) without them.

#![forbid(unsafe_code)]

use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};
use weft_e2e::kubecluster::{KubeCluster, APP_IMAGE};
use weft_e2e::kubeweft::{config_dump, kubectl_json, name_of};
use weft_e2e::Proc;

const MESH: &str = "mesh";
const PLAIN: &str = "plain";
const MODULES: &str = "modules";
/// Sent by the meshed client: must never be seen on the wire.
const SECRET: &str = "WEFT-KUBE-MESH-SECRET-PAYLOAD-";
/// Sent by the unmeshed client: must be seen (the capture works).
const CLEAR: &str = "WEFT-KUBE-PLAINTEXT-CONTROL-PAYLOAD-";
const TCP_PORT: u16 = 9000;
const HTTP_PORT: u16 = 8080;

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/{MESH}/sa/{sa}")
}

/// Namespaces and ServiceAccounts (applied first: the module ConfigMap goes in
/// between).
const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Namespace
metadata: {name: modules}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: server, namespace: mesh}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: client, namespace: mesh}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: other, namespace: mesh}
"#;

/// A Deployment of `replicas` pods labelled `app: <name>`, one per node at most
/// (spread), running `containers` (YAML list items, indented for the pod spec).
fn deployment(
    ns: &str,
    name: &str,
    sa: Option<&str>,
    extra_spec: &str,
    containers: &str,
) -> String {
    let sa = sa
        .map(|s| format!("      serviceAccountName: {s}\n"))
        .unwrap_or_default();
    format!(
        r#"apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: REPLICAS
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
{sa}      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {{maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: DoNotSchedule, labelSelector: {{matchLabels: {{app: {name}}}}}}}
{extra_spec}      containers:
{containers}"#
    )
}

fn container(name: &str, command: &str, port: Option<u16>) -> String {
    // TCP readiness probes (the kubelet's probes come from the node, which policy
    // does not judge: an HTTP probe would do as well, see below).
    let probe = port
        .map(|p| {
            format!(
                "        readinessProbe:\n          tcpSocket: {{port: {p}}}\n          periodSeconds: 1\n"
            )
        })
        .unwrap_or_default();
    format!(
        "      - name: {name}\n        image: {APP_IMAGE}\n        imagePullPolicy: Never\n        command: {command}\n{probe}"
    )
}

fn service(ns: &str, name: &str, ports: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n  selector: {{app: {name}}}\n  ports: {ports}\n"
    )
}

/// The workloads: the meshed server (an SHA-256 TCP server on 9000, HTTP on 8080),
/// client and other, one replica per node; the unmeshed server pinned to
/// `node_b` and client pinned to `node_a`; the module server.
fn workloads(nodes: usize, node_a: &str, node_b: &str) -> String {
    let sleep = r#"[sleep, "36000"]"#;
    let mesh = [
        deployment(
            MESH,
            "server",
            Some("server"),
            "",
            &(container(
                "tcp",
                r#"[weft-testapp, server, --listen, "0.0.0.0:9000"]"#,
                Some(TCP_PORT),
            ) + &container(
                "http",
                r#"[weft-testapp, http, --listen, "0.0.0.0:8080"]"#,
                Some(HTTP_PORT),
            )),
        )
        .replace("REPLICAS", &nodes.to_string()),
        service(
            MESH,
            "server",
            "[{name: tcp-data, port: 9000, targetPort: 9000}, {name: http, port: 80, targetPort: 8080}]",
        ),
        deployment(MESH, "client", Some("client"), "", &container("client", sleep, None))
            .replace("REPLICAS", &nodes.to_string()),
        deployment(MESH, "other", Some("other"), "", &container("other", sleep, None))
            .replace("REPLICAS", &nodes.to_string()),
    ];
    let pin = |node: &str| format!("      nodeSelector: {{kubernetes.io/hostname: {node}}}\n");
    let plain = [
        deployment(
            PLAIN,
            "server",
            None,
            &pin(node_b),
            &container(
                "tcp",
                r#"[weft-testapp, server, --listen, "0.0.0.0:9000"]"#,
                Some(TCP_PORT),
            ),
        )
        .replace("REPLICAS", "1"),
        service(
            PLAIN,
            "server",
            "[{name: tcp-data, port: 9000, targetPort: 9000}]",
        ),
        deployment(
            PLAIN,
            "client",
            None,
            &pin(node_a),
            &container("client", sleep, None),
        )
        .replace("REPLICAS", "1"),
    ];
    // busybox httpd serving the ConfigMap's files (the plugin module).
    let modules = [
        deployment(
            MODULES,
            "wasm",
            None,
            "      volumes: [{name: modules, configMap: {name: wasm-modules}}]\n",
            &(container(
                "httpd",
                r#"[httpd, -f, -v, -p, "8080", -h, /www]"#,
                Some(HTTP_PORT),
            ) + "        volumeMounts: [{name: modules, mountPath: /www}]\n"),
        )
        .replace("REPLICAS", "1"),
        service(
            MODULES,
            "wasm",
            "[{name: http, port: 80, targetPort: 8080}]",
        ),
    ];
    mesh.iter()
        .chain(plain.iter())
        .chain(modules.iter())
        .cloned()
        .collect::<Vec<_>>()
        .join("---\n")
}

/// The client's ServiceAccount may use the TCP port; the namespace may GET
/// `/public*` and `/admin*` on the HTTP port (anything else there: 403).
const POLICIES: &str = r#"
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-tcp, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/mesh/sa/client"]}}]
    to: [{operation: {ports: ["9000"]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: server-http, namespace: mesh}
spec:
  selector: {matchLabels: {app: server}}
  action: ALLOW
  rules:
  - from: [{source: {namespaces: ["mesh"]}}]
    to: [{operation: {ports: ["8080"], methods: ["GET"], paths: ["/public*", "/admin*"]}}]
"#;

/// The example C plugin: `/admin*` only for the client's ServiceAccount.
fn plugin_manifest(url: &str, sha256: &str) -> String {
    format!(
        r#"apiVersion: extensions.weft.dev/v1alpha1
kind: WasmPlugin
metadata: {{name: peer-gate, namespace: mesh}}
spec:
  selector: {{matchLabels: {{app: server}}}}
  url: {url}
  sha256: "{sha256}"
  pluginName: peer_gate
  phase: AUTHZ
  match: [{{ports: [{{number: 8080}}]}}]
  pluginConfig:
    protectedPrefix: /admin
    allowedPeers: ["{}"]
    header: x-weft-plugin
    value: c-peer-gate
"#,
        spiffe("client")
    )
}

fn diagnostics(c: &KubeCluster) -> String {
    weft_e2e::kubeweft::diagnostics_of(c, &[MESH, PLAIN, MODULES])
}

/// `kubeweft::check` with this test's namespaces in the diagnostics.
fn check<T>(c: &KubeCluster, what: &str, r: anyhow::Result<T>) -> T {
    r.unwrap_or_else(|e| panic!("{what}: {e:#}\n\n{}", diagnostics(c)))
}

/// `kubeweft::wait_for` with this test's namespaces in the diagnostics: polls `f`
/// (`Ok(Some)` when done, `Ok(None)`/`Err` to retry, with the state it saw).
fn wait_for<T>(
    c: &KubeCluster,
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<(Option<T>, String)>,
) -> T {
    weft_e2e::kubeweft::wait_for_in(c, &[MESH, PLAIN, MODULES], what, timeout, f)
}

/// A running pod: name, node, IP.
#[derive(Clone, Debug)]
struct Pod {
    name: String,
    node: String,
    ip: String,
}

/// The pods of `ns` by (app, node).
fn pods_of(c: &KubeCluster, ns: &str) -> BTreeMap<(String, String), Pod> {
    let v = check(
        c,
        "listing pods",
        kubectl_json(c, &["-n", ns, "get", "pods"]),
    );
    let mut out = BTreeMap::new();
    for p in v["items"].as_array().into_iter().flatten() {
        if !p["metadata"]["deletionTimestamp"].is_null() {
            continue;
        }
        let app = p["metadata"]["labels"]["app"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let pod = Pod {
            name: name_of(p),
            node: p["spec"]["nodeName"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            ip: p["status"]["podIP"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        };
        out.insert((app, pod.node.clone()), pod);
    }
    out
}

/// `kubectl exec` in `pod`: (success, stdout, stderr).
fn exec(c: &KubeCluster, ns: &str, pod: &str, cmd: &[&str]) -> (bool, String, String) {
    let mut args = vec!["-n", ns, "exec", pod, "--"];
    args.extend_from_slice(cmd);
    match c.kubectl_output(&args) {
        Ok(o) => (
            o.status.success(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        ),
        Err(e) => (false, String::new(), format!("{e:#}")),
    }
}

/// `weft-testapp client` in `pod` sending `text` to `addr` (`repeat` connections).
fn send_text(
    c: &KubeCluster,
    ns: &str,
    pod: &str,
    addr: &str,
    text: &str,
    repeat: usize,
) -> (bool, String) {
    let repeat = repeat.to_string();
    let (ok, out, err) = exec(
        c,
        ns,
        pod,
        &[
            "weft-testapp",
            "client",
            "--connect",
            addr,
            "--bytes",
            "65536",
            "--text",
            text,
            "--repeat",
            &repeat,
        ],
    );
    (ok, format!("{}{}", out.trim(), err.trim()))
}

/// `weft-testapp get` in `pod`: the response as JSON (`status`, `headers`, `body`).
fn get(c: &KubeCluster, ns: &str, pod: &str, addr: &str, path: &str) -> anyhow::Result<Value> {
    let (ok, out, err) = exec(
        c,
        ns,
        pod,
        &["weft-testapp", "get", "--connect", addr, "--path", path],
    );
    if !ok {
        anyhow::bail!("{pod}: GET http://{addr}{path} failed: {}", err.trim());
    }
    Ok(serde_json::from_str(out.trim())?)
}

fn status_body(r: &Value) -> (u64, String) {
    (
        r["status"].as_u64().unwrap_or(0),
        r["body"].as_str().unwrap_or_default().to_string(),
    )
}

/// One sample of the Prometheus text format.
#[derive(Debug)]
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse_metrics(text: &str) -> Vec<Sample> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(x) => x,
            None => continue,
        };
        let Ok(value) = value.parse::<f64>() else {
            continue;
        };
        let (name, labels) = match series.split_once('{') {
            Some((n, rest)) => (n, rest.strip_suffix('}').unwrap_or(rest)),
            None => (series, ""),
        };
        let mut map = BTreeMap::new();
        let mut rest = labels;
        while let Some((key, after)) = rest.split_once("=\"") {
            // The value runs to the next unescaped quote.
            let mut val = String::new();
            let mut chars = after.char_indices();
            let mut end = after.len();
            while let Some((i, ch)) = chars.next() {
                match ch {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            val.push(if n == 'n' { '\n' } else { n });
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    _ => val.push(ch),
                }
            }
            map.insert(key.trim_start_matches(',').trim().to_string(), val);
            rest = &after[end..];
        }
        out.push(Sample {
            name: name.to_string(),
            labels: map,
            value,
        });
    }
    out
}

/// The sum of `name`'s samples whose labels include every one of `want`.
fn total(samples: &[Sample], name: &str, want: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            want.iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// The series of `name` (for messages).
fn series(samples: &[Sample], name: &str) -> String {
    samples
        .iter()
        .filter(|s| s.name == name)
        .map(|s| format!("  {:?} {}", s.labels, s.value))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The agent's metrics on `node` (hostNetwork: its metrics port is on the node's
/// loopback).
fn metrics(c: &KubeCluster, node: &str) -> Vec<Sample> {
    let text = check(
        c,
        &format!("{node}: scraping the agent's metrics"),
        c.node_http_get(node, "http://127.0.0.1:15020/metrics"),
    );
    parse_metrics(&text)
}

/// The mesh flow's connection labels (client -> server, mTLS) for `reporter`.
fn mesh_flow(reporter: &'static str) -> Vec<(&'static str, String)> {
    vec![
        ("reporter", reporter.to_string()),
        ("source_workload", "client".into()),
        ("source_namespace", MESH.into()),
        ("source_principal", spiffe("client")),
        ("destination_workload", "server".into()),
        ("destination_namespace", MESH.into()),
        ("destination_principal", spiffe("server")),
        ("connection_security_policy", "mutual_tls".into()),
    ]
}

fn labels<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'a str, &'a str)> {
    v.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

fn opened(c: &KubeCluster, node: &str, reporter: &'static str) -> f64 {
    total(
        &metrics(c, node),
        "weft_tcp_connections_opened_total",
        &labels(&mesh_flow(reporter)),
    )
}

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

/// Packets in `pcap` matching the tcpdump `filter`.
fn pcap_packets(pcap: &Path, filter: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(pcap)
        .arg(filter)
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "tcpdump -r {} '{filter}': {}",
            pcap.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(String::from)
        .collect())
}

/// The agent on `node`: its enrolled pods (`ns/name`) and certificates' SPIFFE IDs.
fn enrolled_and_ids(
    c: &KubeCluster,
    node: &str,
) -> anyhow::Result<(BTreeSet<String>, BTreeSet<String>, Value)> {
    let d = config_dump(c, node)?;
    let pods = d["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pod"].as_str().map(String::from))
        .collect();
    let ids = d["certificates"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["spiffe_id"].as_str().map(String::from))
        .collect();
    Ok((pods, ids, d))
}

fn proxy_counter(d: &Value, name: &str) -> u64 {
    d["proxy"][name].as_u64().unwrap_or(0)
}

/// `kubectl get <kind>` in `mesh`: (table, rows as columns), to read the printer
/// columns.
fn table(c: &KubeCluster, kind: &str) -> (String, Vec<Vec<String>>) {
    let t = check(
        c,
        &format!("kubectl get {kind}"),
        c.kubectl(&["-n", MESH, "get", kind]),
    );
    let rows = t
        .lines()
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect();
    (t, rows)
}

/// The value of `field=` in a text log line (quotes removed).
fn log_field<'a>(line: &'a str, field: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {field}="))? + field.len() + 2;
    let rest = &line[at..];
    let v = match rest.strip_prefix('"') {
        Some(q) => &q[..q.find('"').unwrap_or(q.len())],
        None => rest.split_whitespace().next().unwrap_or(""),
    };
    Some(v)
}

/// The agent's access log on `node`, denials only, counted by who was refused
/// (source address named after `names`, SPIFFE ID, what refused it).
fn denials(
    c: &KubeCluster,
    node: &str,
    names: &BTreeMap<String, String>,
) -> BTreeMap<String, usize> {
    let pods = check(
        c,
        "listing agents",
        kubectl_json(
            c,
            &[
                "-n",
                weft_e2e::kubeweft::NS,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=node",
            ],
        ),
    );
    let agent = pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["spec"]["nodeName"] == node)
        .map(name_of)
        .unwrap_or_default();
    let log = check(
        c,
        "the agent's log",
        c.kubectl(&[
            "-n",
            weft_e2e::kubeweft::NS,
            "logs",
            &agent,
            "-c",
            "node",
            "--tail=20000",
        ]),
    );
    let mut out = BTreeMap::new();
    for line in weft_e2e::kubeweft::strip_ansi(&log).lines() {
        if !line.contains("weft::access") {
            continue;
        }
        let what = match (
            log_field(line, "kind"),
            log_field(line, "decision"),
            log_field(line, "response_code"),
        ) {
            (Some("connection"), Some("deny"), _) => format!(
                "connection refused (policy {})",
                log_field(line, "policy").unwrap_or("none")
            ),
            (Some("request"), _, Some(code)) if code.starts_with('4') => format!(
                "request {} {code} by {}",
                log_field(line, "path").unwrap_or("?"),
                log_field(line, "decided_by").unwrap_or("?")
            ),
            _ => continue,
        };
        let ip = log_field(line, "source_addr")
            .and_then(|a| a.rsplit_once(':'))
            .map(|(ip, _)| ip.to_string())
            .unwrap_or_default();
        let who = names.get(&ip).cloned().unwrap_or(ip);
        let id = log_field(line, "source_identity").unwrap_or("?");
        *out.entry(format!("{who} [{id}]: {what}")).or_default() += 1;
    }
    out
}

#[test]
fn a_labelled_namespace_is_meshed_across_nodes_with_mtls_policies_plugins_and_metrics() {
    weft_e2e::netlab::require_root();
    let t0 = Instant::now();
    let module_path = weft_e2e::plugin_path("peer_gate_c").unwrap_or_else(|e| panic!("{e:#}"));
    let module = std::fs::read(&module_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", module_path.display()));
    let module_sha = hex::encode(Sha256::digest(&module));
    weft_e2e::kubeweft::prepare_images().unwrap_or_else(|e| panic!("{e:#}"));
    let mut c = KubeCluster::start().unwrap_or_else(|e| panic!("starting the cluster: {e:#}"));
    assert!(c.nodes.len() >= 2, "this test needs two nodes");
    let t_cluster = t0.elapsed();
    let node_a = c.nodes[0].name.clone();
    let node_b = c.nodes[1].name.clone();
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();

    let helm = check(&c, "Helm", weft_e2e::kubeweft::helm(&c));
    let values = check(&c, "values", weft_e2e::kubeweft::values());
    let t_install = Instant::now();
    // Short CA rotation phases (section 8); the chart's default is 60 s.
    let mut values = values;
    values["controlPlane"]["caRotationMinPhase"] = Value::from("10s");
    let leader = weft_e2e::kubeweft::install(&c, &helm, &values, "--lb=least-conn");
    let install_secs = t_install.elapsed().as_secs_f64();
    eprintln!(
        "cluster Ready in {:.1} s (start {:.1} s); weft installed and Ready in {install_secs:.1} s (leader {leader})",
        t_cluster.as_secs_f64(),
        c.startup.as_secs_f64()
    );

    // Workloads: the module's ConfigMap between the namespaces and the pods that
    // mount it.
    let t_apps = Instant::now();
    check(&c, "namespaces", c.apply(NAMESPACES));
    let from_file = format!("--from-file=peer_gate_c.wasm={}", module_path.display());
    check(
        &c,
        "the module's ConfigMap",
        c.kubectl(&[
            "-n",
            MODULES,
            "create",
            "configmap",
            "wasm-modules",
            &from_file,
        ]),
    );
    check(
        &c,
        "workloads",
        c.apply(&workloads(nodes.len(), &node_a, &node_b)),
    );
    let n = nodes.len();
    for (ns, sel, count) in [
        (MESH, "app=server", n),
        (MESH, "app=client", n),
        (MESH, "app=other", n),
        (PLAIN, "app=server", 1),
        (PLAIN, "app=client", 1),
        (MODULES, "app=wasm", 1),
    ] {
        check(
            &c,
            "workloads Ready",
            c.wait_pods_ready(ns, sel, count, Duration::from_secs(120)),
        );
    }
    let apps_secs = t_apps.elapsed().as_secs_f64();
    let mesh = pods_of(&c, MESH);
    let plain = pods_of(&c, PLAIN);
    let pod = |pods: &BTreeMap<(String, String), Pod>, app: &str, node: &str| -> Pod {
        pods.get(&(app.to_string(), node.to_string()))
            .cloned()
            .unwrap_or_else(|| panic!("no {app} pod on {node}: {pods:?}\n\n{}", diagnostics(&c)))
    };
    for app in ["server", "client", "other"] {
        for node in &nodes {
            pod(&mesh, app, node);
        }
    }
    let plain_server = pod(&plain, "server", &node_b);
    let plain_client = pod(&plain, "client", &node_a);
    eprintln!(
        "workloads Ready {apps_secs:.1} s after apply: {}",
        mesh.values()
            .chain(plain.values())
            .map(|p| format!("{} on {} ({})", p.name, p.node, p.ip))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // 1. Enrollment and SVIDs: each agent, exactly its node's meshed pods and an
    // SVID for each of their ServiceAccounts; nothing of the other namespaces.
    let t_enrolled = Instant::now();
    for node in &nodes {
        let want_pods: BTreeSet<String> = mesh
            .values()
            .filter(|p| p.node == *node)
            .map(|p| format!("{MESH}/{}", p.name))
            .collect();
        // Each meshed Deployment runs as the ServiceAccount named after it.
        let want_ids: BTreeSet<String> = mesh
            .keys()
            .filter(|(_, n)| n == node)
            .map(|(app, _)| spiffe(app))
            .collect();
        let (pods, ids, _) = wait_for(
            &c,
            &format!("{node}: the agent enrolling {want_pods:?} with SVIDs {want_ids:?}"),
            Duration::from_secs(60),
            || {
                let (pods, ids, d) = enrolled_and_ids(&c, node)?;
                let state = format!(
                    "enrolled {pods:?}, certificates {ids:?}, synced {}",
                    d["synced"]
                );
                Ok((
                    (pods == want_pods && ids == want_ids).then_some((pods, ids, d)),
                    state,
                ))
            },
        );
        eprintln!("{node}: enrolled {pods:?}; SVIDs {ids:?}");
    }
    let enrolled_secs = t_enrolled.elapsed().as_secs_f64();

    let cluster_ip = |ns: &str| {
        check(
            &c,
            "a ClusterIP",
            c.kubectl(&[
                "-n",
                ns,
                "get",
                "service",
                "server",
                "-o",
                "jsonpath={.spec.clusterIP}",
            ]),
        )
    };
    let mesh_ip = cluster_ip(MESH);
    let plain_ip = cluster_ip(PLAIN);
    let server_b = pod(&mesh, "server", &node_b);
    let client_a = pod(&mesh, "client", &node_a);

    // 2. The wire: a capture on node B's uplink (its eth0, in its network
    // namespace) from before any meshed traffic, so the HBONE handshakes are in it.
    let t_capture = Instant::now();
    let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
    let pcap = tmp.path().join("node-b-eth0.pcap");
    let netns = c.node(&node_b).map(|n| n.netns.clone()).unwrap_or_default();
    let mut dump = Proc::spawn(
        "tcpdump",
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{netns}"))
            .args([
                "--",
                "tcpdump",
                // Each packet handed over and written at once: with the default
                // block timeout, a capture shorter than a second may end with its
                // packets still in the kernel ("0 packets captured").
                "--immediate-mode",
                "-U",
                "-n",
                "-B",
                "16384",
                "-s",
                "0",
                "-i",
                "eth0",
                "-w",
            ])
            .arg(&pcap)
            .arg("tcp"),
        &tmp.path().join("tcpdump.log"),
    )
    .unwrap_or_else(|e| panic!("starting tcpdump: {e:#}"));
    wait_for(&c, "tcpdump listening", Duration::from_secs(10), || {
        let log = dump.log_text();
        Ok((log.contains("listening on").then_some(()), log))
    });

    // The control: an unmeshed client (node A) to an unmeshed Service whose only
    // pod is on node B. Its node's agent proxies none of it.
    let before_a = check(&c, "config_dump", config_dump(&c, &node_a));
    let plain_addr = format!("{plain_ip}:{TCP_PORT}");
    let (ok, out) = send_text(&c, PLAIN, &plain_client.name, &plain_addr, CLEAR, 2);
    assert!(
        ok,
        "the unmeshed client -> {plain_addr}: {out}\n\n{}",
        diagnostics(&c)
    );
    let after_a = check(&c, "config_dump", config_dump(&c, &node_a));
    for k in ["hbone_out", "plaintext_out"] {
        assert_eq!(
            proxy_counter(&after_a, k),
            proxy_counter(&before_a, k),
            "{node_a}: the agent proxied the unmeshed client's connections ({k}): {}",
            after_a["proxy"]
        );
    }

    // The meshed client (node A) to the server's ClusterIP, until node B's agent
    // has received some of it (the agent balances over both replicas).
    let mesh_addr = format!("{mesh_ip}:{TCP_PORT}");
    let before_b = opened(&c, &node_b, "destination");
    let mut sent = 0;
    let mut crossed = 0.0;
    for _ in 0..8 {
        let (ok, out) = send_text(&c, MESH, &client_a.name, &mesh_addr, SECRET, 4);
        assert!(
            ok,
            "the meshed client -> {mesh_addr}: {out}\n\n{}",
            diagnostics(&c)
        );
        sent += 4;
        crossed = opened(&c, &node_b, "destination") - before_b;
        if crossed > 0.0 {
            break;
        }
    }
    assert!(
        crossed > 0.0,
        "none of {sent} connections from {node_a} to {mesh_addr} reached {node_b}\n{}",
        series(&metrics(&c, &node_b), "weft_tcp_connections_opened_total")
    );
    std::thread::sleep(Duration::from_millis(500));
    dump.terminate();
    // tcpdump's own count at exit: "N packets captured", "M packets received by
    // filter", "K packets dropped by kernel".
    let dump_stats = dump
        .log_text()
        .lines()
        .filter(|l| l.contains("packets"))
        .collect::<Vec<_>>()
        .join(", ");
    let capture_secs = t_capture.elapsed().as_secs_f64();
    let bytes = std::fs::read(&pcap).unwrap_or_else(|e| panic!("reading {}: {e}", pcap.display()));
    let packets = |f: &str| check(&c, "reading the capture", pcap_packets(&pcap, f));
    let clear_seen = count(&bytes, CLEAR);
    let secret_seen = count(&bytes, SECRET);
    let handshakes = packets(&format!(
        "tcp dst port 15008 and dst host {} and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16",
        server_b.ip
    ));
    let to_hbone = packets(&format!("tcp dst port 15008 and dst host {}", server_b.ip));
    // TCP payload towards :15008 (tcpdump's "length N"): the encrypted text must
    // be in the capture, or its absence would prove nothing.
    let hbone_bytes: u64 = to_hbone
        .iter()
        .filter_map(|l| {
            l.rsplit_once("length ")
                .and_then(|(_, n)| n.trim().parse::<u64>().ok())
        })
        .sum();
    let to_app = packets(&format!("tcp port {TCP_PORT} and host {}", server_b.ip));
    let plain_to_app = packets(&format!(
        "tcp dst port {TCP_PORT} and dst host {}",
        plain_server.ip
    ));
    let plain_to_hbone = packets(&format!("tcp port 15008 and host {}", plain_client.ip));
    eprintln!(
        "capture on {node_b} eth0 ({} bytes, {:.1} s; {dump_stats}): meshed client -> {mesh_addr}: {sent} connections, {crossed} to {node_b}'s replica; {} packets to {}:15008 ({hbone_bytes} bytes of TCP payload; {} TLS handshake records: {:?}), {} to its :{TCP_PORT}, the secret text {secret_seen} times; unmeshed client -> {plain_addr}: {} packets to {}:{TCP_PORT}, its text {clear_seen} times",
        bytes.len(),
        capture_secs,
        to_hbone.len(),
        server_b.ip,
        handshakes.len(),
        handshakes.first(),
        to_app.len(),
        plain_to_app.len(),
        plain_server.ip
    );
    assert!(
        clear_seen > 0 && !plain_to_app.is_empty(),
        "control: the capture should see the unmeshed client's text on {node_b}'s eth0 ({} bytes captured; {} packets to {}:{TCP_PORT}); tcpdump: {}",
        bytes.len(),
        plain_to_app.len(),
        plain_server.ip,
        dump.log_text()
    );
    assert!(
        plain_to_hbone.is_empty(),
        "the unmeshed client's traffic was tunnelled: {plain_to_hbone:?}"
    );
    assert_eq!(
        secret_seen,
        0,
        "the meshed client's text crossed {node_b}'s eth0 in plaintext\n\n{}",
        diagnostics(&c)
    );
    assert!(
        !handshakes.is_empty(),
        "no TLS handshake to {}:15008 on {node_b}'s eth0; packets to :15008: {to_hbone:?}\n\n{}",
        server_b.ip,
        diagnostics(&c)
    );
    let payload = crossed as u64 * 65536;
    assert!(
        hbone_bytes >= payload,
        "the capture holds {hbone_bytes} bytes towards {}:15008, less than the {payload} the client sent there ({dump_stats})",
        server_b.ip
    );
    assert!(
        to_app.is_empty(),
        "meshed traffic reached {}:{TCP_PORT} on the wire: {:?}\n\n{}",
        server_b.ip,
        to_app.iter().take(5).collect::<Vec<_>>(),
        diagnostics(&c)
    );

    // 3. Policies and the plugin. The module is served inside the cluster (busybox
    // httpd from the ConfigMap); the control plane fetches it by URL and checks
    // its sha256.
    let t_policy = Instant::now();
    let url = format!("http://wasm.{MODULES}.svc.cluster.local/peer_gate_c.wasm");
    check(&c, "policies", c.apply(POLICIES));
    check(
        &c,
        "the WasmPlugin",
        c.apply(&plugin_manifest(&url, &module_sha)),
    );
    for (kind, name) in [
        ("authorizationpolicy", "server-tcp"),
        ("authorizationpolicy", "server-http"),
        ("wasmplugin", "peer-gate"),
    ] {
        wait_for(
            &c,
            &format!("{kind} {name} Accepted"),
            Duration::from_secs(60),
            || {
                let v = kubectl_json(&c, &["-n", MESH, "get", kind, name])?;
                let cond = v["status"]["conditions"]
                    .as_array()
                    .and_then(|c| c.iter().find(|c| c["type"] == "Accepted"))
                    .cloned()
                    .unwrap_or(Value::Null);
                Ok((
                    (cond["status"] == "True" && cond["reason"] == "Accepted").then_some(()),
                    format!("status {}", v["status"]),
                ))
            },
        );
    }
    let accepted_secs = t_policy.elapsed().as_secs_f64();
    for (kind, names) in [
        ("authorizationpolicies", vec!["server-tcp", "server-http"]),
        ("wasmplugins", vec!["peer-gate"]),
    ] {
        let (text, rows) = table(&c, kind);
        eprintln!("kubectl -n {MESH} get {kind}\n{text}");
        let header = rows.first().cloned().unwrap_or_default();
        let col = header
            .iter()
            .position(|h| h == "ACCEPTED")
            .unwrap_or_else(|| panic!("no ACCEPTED column:\n{text}"));
        for name in names {
            let row = rows
                .iter()
                .find(|r| r.first().map(String::as_str) == Some(name))
                .unwrap_or_else(|| panic!("no {name}:\n{text}"));
            assert_eq!(row.get(col).map(String::as_str), Some("True"), "{text}");
        }
    }

    // Wait until both agents enforce them: `other` refused at L4 and by the plugin.
    let t_enforced = Instant::now();
    for (node, peer) in [(&node_a, &node_b), (&node_b, &node_a)] {
        let other = pod(&mesh, "other", node);
        let server = pod(&mesh, "server", peer);
        let http = format!("{}:{HTTP_PORT}", server.ip);
        wait_for(
            &c,
            &format!(
                "{node}'s other -> {}: the plugin denying /admin",
                server.name
            ),
            Duration::from_secs(60),
            || {
                let r = get(&c, MESH, &other.name, &http, "/admin/x")?;
                Ok((
                    (r["status"] == 403 && r["body"] == "denied by the peer_gate plugin\n")
                        .then_some(()),
                    r.to_string(),
                ))
            },
        );
        let tcp = format!("{}:{TCP_PORT}", server.ip);
        wait_for(
            &c,
            &format!("{node}'s other -> {tcp} refused"),
            Duration::from_secs(30),
            || {
                let (ok, out) = send_text(&c, MESH, &other.name, &tcp, "denied", 1);
                Ok(((!ok).then_some(()), out))
            },
        );
    }
    let enforced_secs = t_enforced.elapsed().as_secs_f64();

    // Across nodes, each way: the client's ServiceAccount allowed at L4, the other
    // refused; paths by the L7 rule; /admin by the plugin.
    for (node, peer) in [(&node_a, &node_b), (&node_b, &node_a)] {
        let client = pod(&mesh, "client", node);
        let other = pod(&mesh, "other", node);
        let server = pod(&mesh, "server", peer);
        let tcp = format!("{}:{TCP_PORT}", server.ip);
        let http = format!("{}:{HTTP_PORT}", server.ip);
        let (ok, out) = send_text(&c, MESH, &client.name, &tcp, "allowed", 3);
        assert!(
            ok,
            "{} -> {tcp} should be allowed: {out}\n\n{}",
            client.name,
            diagnostics(&c)
        );
        let (ok, out) = send_text(&c, MESH, &other.name, &tcp, "denied", 1);
        assert!(
            !ok,
            "{} -> {tcp} should be denied: {out}\n\n{}",
            other.name,
            diagnostics(&c)
        );
        eprintln!("{node} -> {peer}: client allowed at L4; other refused: {out}");
        let g = |who: &Pod, path: &str| {
            check(
                &c,
                &format!("GET {path}"),
                get(&c, MESH, &who.name, &http, path),
            )
        };
        for (who, path, want_status, want_body) in [
            (&client, "/public/x", 200, "GET /public/x".to_string()),
            (&client, "/private", 403, "RBAC: access denied".to_string()),
            (&client, "/admin/x", 200, "GET /admin/x".to_string()),
            (&other, "/public/y", 200, "GET /public/y".to_string()),
            (
                &other,
                "/admin/x",
                403,
                "denied by the peer_gate plugin\n".to_string(),
            ),
        ] {
            let r = g(who, path);
            assert_eq!(
                status_body(&r),
                (want_status, want_body),
                "{} -> http://{http}{path}: {r}\n\n{}",
                who.name,
                diagnostics(&c)
            );
            // The plugin adds its header to the responses it sees: the application's
            // and its own local replies. (weft's own 403 ends the plugins' run
            // before a response exists: they do not see it.)
            if path != "/private" {
                assert_eq!(r["headers"]["x-weft-plugin"], "c-peer-gate", "{r}");
            }
            eprintln!(
                "{node} -> {peer}: {} GET {path}: {} {:?} (x-weft-plugin: {})",
                who.name,
                r["status"],
                r["body"].as_str().unwrap_or_default().trim(),
                r["headers"]["x-weft-plugin"]
            );
        }
    }
    // Through the Service's HTTP port as well.
    let r = check(
        &c,
        "GET /private through the Service",
        get(
            &c,
            MESH,
            &client_a.name,
            &format!("{mesh_ip}:80"),
            "/private",
        ),
    );
    assert_eq!(
        status_body(&r),
        (403, "RBAC: access denied".into()),
        "{r}\n\n{}",
        diagnostics(&c)
    );
    let r = check(
        &c,
        "GET /public through the Service",
        get(
            &c,
            MESH,
            &client_a.name,
            &format!("{mesh_ip}:80"),
            "/public",
        ),
    );
    assert_eq!(
        status_body(&r),
        (200, "GET /public".into()),
        "{r}\n\n{}",
        diagnostics(&c)
    );

    // 4. Metrics: every node saw the flows from the other node's pods.
    for node in &nodes {
        let m = metrics(&c, node);
        let dst = total(
            &m,
            "weft_tcp_connections_opened_total",
            &labels(&mesh_flow("destination")),
        );
        let src = total(
            &m,
            "weft_tcp_connections_opened_total",
            &labels(&mesh_flow("source")),
        );
        let allow_tcp = total(
            &m,
            "weft_authz_decisions_total",
            &[("decision", "allow"), ("policy", "mesh/server-tcp")],
        );
        let allow_http = total(
            &m,
            "weft_authz_decisions_total",
            &[("decision", "allow"), ("policy", "mesh/server-http")],
        );
        let deny = total(&m, "weft_authz_decisions_total", &[("decision", "deny")]);
        let req = |src: &str, code: &str| {
            total(
                &m,
                "weft_requests_total",
                &[
                    ("source_workload", src),
                    ("source_principal", &spiffe(src)),
                    ("destination_workload", "server"),
                    ("destination_principal", &spiffe("server")),
                    ("connection_security_policy", "mutual_tls"),
                    ("request_method", "GET"),
                    ("response_code", code),
                ],
            )
        };
        let (client_200, client_403, other_403) = (
            req("client", "200"),
            req("client", "403"),
            req("other", "403"),
        );
        let replies = total(
            &m,
            "weft_wasm_plugin_local_replies_total",
            &[("plugin", "mesh/peer-gate")],
        );
        eprintln!(
            "{node} metrics: client->server mutual_tls connections opened: {dst} as destination, {src} as source; authz allow {allow_tcp} (server-tcp) + {allow_http} (server-http), deny {deny}; requests client 200: {client_200}, client 403: {client_403}, other 403: {other_403}; plugin local replies {replies}"
        );
        let all = || {
            format!(
                "{}\n{}\n{}\n{}",
                series(&m, "weft_tcp_connections_opened_total"),
                series(&m, "weft_authz_decisions_total"),
                series(&m, "weft_requests_total"),
                series(&m, "weft_wasm_plugin_local_replies_total")
            )
        };
        assert!(dst >= 3.0 && src >= 3.0, "{node}: connections\n{}", all());
        assert!(
            allow_tcp >= 3.0 && allow_http >= 1.0 && deny >= 2.0,
            "{node}: authz\n{}",
            all()
        );
        assert!(
            client_200 >= 2.0 && client_403 >= 1.0 && other_403 >= 1.0,
            "{node}: requests\n{}",
            all()
        );
        assert!(replies >= 1.0, "{node}: plugin\n{}", all());
    }

    // 5. The unmeshed pods: in no agent's enrolled pods, no SVID for them, and
    // their traffic is not tunnelled, not even to a meshed server, whose agent
    // refuses it at once: no request from outside the mesh can match the
    // namespace rule (docs/policy.md: a connection no request could pass is
    // refused before the first request).
    let before_a = check(&c, "config_dump", config_dump(&c, &node_a));
    let server_b_http = format!("{}:{HTTP_PORT}", server_b.ip);
    let refused = get(&c, PLAIN, &plain_client.name, &server_b_http, "/public/z");
    let after_a = check(&c, "config_dump", config_dump(&c, &node_a));
    assert!(
        refused.is_err(),
        "the unmeshed client reached the meshed server's {server_b_http}: {refused:?}\n\n{}",
        diagnostics(&c)
    );
    for k in ["hbone_out", "plaintext_out"] {
        assert_eq!(
            proxy_counter(&after_a, k),
            proxy_counter(&before_a, k),
            "{node_a}: the agent proxied the unmeshed client's request ({k})"
        );
    }
    eprintln!(
        "unmeshed client ({node_a}) -> meshed server {server_b_http} ({node_b}): refused ({:#}); {node_a}'s agent proxied none of it",
        refused.err().unwrap_or_else(|| anyhow::anyhow!("-"))
    );
    for node in &nodes {
        let m = metrics(&c, node);
        for app in ["server", "client", "other"] {
            let g = total(
                &m,
                "weft_node_enrolled_pods",
                &[("namespace", MESH), ("workload", app)],
            );
            assert_eq!(
                g,
                1.0,
                "{node}: weft_node_enrolled_pods\n{}",
                series(&m, "weft_node_enrolled_pods")
            );
        }
        let foreign: Vec<&Sample> = m
            .iter()
            .filter(|s| s.name == "weft_node_enrolled_pods" && s.value > 0.0)
            .filter(|s| s.labels.get("namespace").map(String::as_str) != Some(MESH))
            .collect();
        assert!(foreign.is_empty(), "{node}: {foreign:?}");
    }
    for node in &nodes {
        let (pods, ids, _) = check(&c, "config_dump", enrolled_and_ids(&c, node));
        let foreign: Vec<&String> = pods.iter().filter(|p| !p.starts_with("mesh/")).collect();
        assert!(foreign.is_empty(), "{node}: enrolled {foreign:?}");
        assert!(
            ids.iter()
                .all(|i| i.starts_with(&format!("spiffe://cluster.local/ns/{MESH}/"))),
            "{node}: {ids:?}"
        );
    }

    // What the kubelet's probes meet: they come from the node's bridge address,
    // in plaintext. Policy does not judge them (docs/policy.md, "Health probes
    // from the node"): the server's ALLOW policy admits only the mesh's client, yet
    // an HTTP probe gets the application's answer. A TCP connect to an enrolled
    // pod reaches the agent's inbound listener whatever the port (printed).
    let server_a = pod(&mesh, "server", &node_a);
    let http_probe = c
        .in_node(
            &node_a,
            "curl",
            &[
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--max-time",
                "3",
                &format!("http://{}:{HTTP_PORT}/public/probe", server_a.ip),
            ],
        )
        .map_or_else(|e| format!("{e:#}"), |code| format!("HTTP {code}"));
    let closed_port = c
        .in_node(
            &node_a,
            "timeout",
            &[
                "3",
                "bash",
                "-c",
                &format!("exec 3<>/dev/tcp/{}/7777", server_a.ip),
            ],
        )
        .map_or_else(|e| format!("not connected: {e:#}"), |_| "connected".into());
    eprintln!(
        "from {node_a}'s network namespace, as the kubelet's probes: GET http://{}:{HTTP_PORT}/public/probe -> {}; TCP connect to {}:7777 (nothing listens there) -> {}",
        server_a.ip,
        http_probe.trim(),
        server_a.ip,
        closed_port.trim()
    );
    assert_eq!(http_probe.trim(), "HTTP 200", "a probe from the node");

    // Who was refused, from the agents' access logs: the other ServiceAccount, from
    // the other node's pod (and, printed, everything else refused).
    let mut names: BTreeMap<String, String> = mesh
        .values()
        .chain(plain.values())
        .map(|p| (p.ip.clone(), p.name.clone()))
        .collect();
    for n in &c.nodes {
        names.insert(n.ip.clone(), format!("{} (the node)", n.name));
        // The pod bridge's address (the first of the node's pod CIDR): the kubelet's
        // probes come from it.
        if let Some(base) = n
            .pod_cidr
            .split('/')
            .next()
            .and_then(|b| b.strip_suffix(".0"))
        {
            names.insert(
                format!("{base}.1"),
                format!("{}'s pod bridge (kubelet)", n.name),
            );
        }
    }
    for (node, peer) in [(&node_a, &node_b), (&node_b, &node_a)] {
        let d = denials(&c, node, &names);
        eprintln!(
            "{node}: denials in the access log:\n  {}",
            d.iter()
                .map(|(k, v)| format!("{v} x {k}"))
                .collect::<Vec<_>>()
                .join("\n  ")
        );
        let other = pod(&mesh, "other", peer);
        let want = format!("{} [{}]: connection refused", other.name, spiffe("other"));
        assert!(
            d.keys().any(|k| k.starts_with(&want)),
            "{node}: no access log record of {peer}'s {} refused: {d:?}",
            other.name
        );
    }

    // 6. Authentication on the real cluster (issue 29): PeerAuthentication STRICT
    // refuses the unmeshed client's plaintext (counted as such) while the meshed
    // client keeps working; RequestAuthentication verifies JWTs at the server's
    // node (401 for an expired token, 200 for a valid one, the app never sees it).
    let server_b = pod(&mesh, "server", &node_b);
    let client_a = pod(&mesh, "client", &node_a);
    let plain_client = pod(&plain, "client", &node_a);
    let tcp_b = format!("{}:{TCP_PORT}", server_b.ip);
    let http_b = format!("{}:{HTTP_PORT}", server_b.ip);
    let strict_count = |c: &KubeCluster| {
        total(
            &metrics(c, &node_b),
            "weft_plaintext_refused_strict_mtls_total",
            &[("peer_authentication", "mesh/strict")],
        )
    };
    check(
        &c,
        "a PeerAuthentication",
        c.apply(
            "apiVersion: security.weft.dev/v1alpha1\nkind: PeerAuthentication\nmetadata: {name: strict, namespace: mesh}\nspec: {mtls: {mode: STRICT}}\n",
        ),
    );
    wait_for(
        &c,
        "plaintext refused by STRICT (counted)",
        Duration::from_secs(30),
        || {
            let (ok, out) = send_text(&c, PLAIN, &plain_client.name, &tcp_b, "strict", 1);
            let n = strict_count(&c);
            Ok((
                (!ok && n >= 1.0).then_some(()),
                format!("{ok} {out} refusals {n}"),
            ))
        },
    );
    let (ok, out) = send_text(&c, MESH, &client_a.name, &tcp_b, "meshed", 3);
    assert!(ok, "the meshed client under STRICT: {out}");
    wait_for(
        &c,
        "kubectl get wpeer: STRICT, Accepted",
        Duration::from_secs(30),
        || {
            let (out, rows) = table(&c, "wpeer");
            let accepted = rows.iter().any(|r| {
                r.first().map(String::as_str) == Some("strict")
                    && r.iter().any(|x| x == "STRICT")
                    && r.iter().any(|x| x == "True")
            });
            Ok((accepted.then_some(()), out))
        },
    );
    check(
        &c,
        "deleting the PeerAuthentication",
        c.kubectl(&["-n", MESH, "delete", "peerauthentication", "strict"]),
    );
    let jwks = weft_e2e::jwt::jwks().replace('\'', "");
    check(
        &c,
        "a RequestAuthentication",
        c.apply(&format!(
            "apiVersion: security.weft.dev/v1alpha1\nkind: RequestAuthentication\nmetadata: {{name: users, namespace: mesh}}\nspec:\n  selector: {{matchLabels: {{app: server}}}}\n  jwtRules:\n  - issuer: \"{}\"\n    jwks: '{jwks}'\n",
            weft_e2e::jwt::ISSUER
        )),
    );
    let bearer = |t: &str| format!("Authorization: Bearer {t}");
    let get_with = |token: &str| -> anyhow::Result<Value> {
        let (ok, out, err) = exec(
            &c,
            MESH,
            &client_a.name,
            &[
                "weft-testapp",
                "get",
                "--connect",
                &http_b,
                "--path",
                "/public/jwt",
                "--header",
                &bearer(token),
            ],
        );
        if !ok {
            anyhow::bail!("GET with a token failed: {}", err.trim());
        }
        Ok(serde_json::from_str(out.trim())?)
    };
    let expired = weft_e2e::jwt::es256(&weft_e2e::jwt::with(
        weft_e2e::jwt::claims("alice"),
        "exp",
        serde_json::json!(weft_e2e::jwt::now() - 3600),
    ));
    wait_for(
        &c,
        "an expired token refused with 401",
        Duration::from_secs(30),
        || {
            let r = get_with(&expired)?;
            Ok(((r["status"] == 401).then_some(()), r.to_string()))
        },
    );
    let r = check(
        &c,
        "GET with a valid token",
        get_with(&weft_e2e::jwt::es256(&weft_e2e::jwt::claims("alice"))),
    );
    assert_eq!(r["status"], 200, "a valid token: {r}");
    wait_for(
        &c,
        "kubectl get wra: Accepted",
        Duration::from_secs(30),
        || {
            let (out, rows) = table(&c, "wra");
            let accepted = rows.iter().any(|r| {
                r.first().map(String::as_str) == Some("users") && r.iter().any(|x| x == "True")
            });
            Ok((accepted.then_some(()), out))
        },
    );
    let jwt_ok = total(
        &metrics(&c, &node_b),
        "weft_request_authentications_total",
        &[("outcome", "authenticated")],
    );
    assert!(
        jwt_ok >= 1.0,
        "{}",
        series(&metrics(&c, &node_b), "weft_request_authentications_total")
    );
    check(
        &c,
        "deleting the RequestAuthentication",
        c.kubectl(&["-n", MESH, "delete", "requestauthentication", "users"]),
    );

    // 7. The SPIFFE Workload API on the real cluster: a pod of the `client`
    // ServiceAccount mounting the agent's socket directory gets its own X.509-SVID
    // and a JWT-SVID (validated) with a real client (the `spiffe` crate).
    check(
        &c,
        "a Workload API client pod",
        c.apply(&format!(
            r#"apiVersion: v1
kind: Pod
metadata: {{name: spiffe-client, namespace: mesh, labels: {{app: spiffe-client}}}}
spec:
  serviceAccountName: client
  terminationGracePeriodSeconds: 1
  nodeSelector: {{kubernetes.io/hostname: {node_a}}}
  containers:
  - name: app
    image: {APP_IMAGE}
    imagePullPolicy: Never
    command: [sleep, "36000"]
    env: [{{name: SPIFFE_ENDPOINT_SOCKET, value: "unix:///run/spiffe/socket"}}]
    volumeMounts: [{{name: spiffe, mountPath: /run/spiffe, readOnly: true}}]
  volumes:
  - name: spiffe
    hostPath: {{path: /var/run/weft/spiffe, type: Directory}}
"#
        )),
    );
    check(
        &c,
        "the Workload API client pod Ready",
        c.wait_pods_ready(MESH, "app=spiffe-client", 1, Duration::from_secs(120)),
    );
    wait_for(
        &c,
        "the pod's own identity from the Workload API",
        Duration::from_secs(60),
        || {
            let (_, out, err) = exec(
                &c,
                MESH,
                "spiffe-client",
                &[
                    "weft-testapp",
                    "spiffe",
                    "--endpoint",
                    "unix:///run/spiffe/socket",
                    "--audience",
                    "billing",
                ],
            );
            let v: Value = serde_json::from_str(out.trim()).unwrap_or(Value::Null);
            let ok = v["x509_spiffe_id"] == spiffe("client")
                && v["jwt_spiffe_id"] == spiffe("client")
                && v["validated_spiffe_id"] == spiffe("client");
            Ok((ok.then_some(()), format!("{out}{err}")))
        },
    );

    // 8. CA rotation on the real cluster, under traffic both ways across the nodes.
    let t_rotation = Instant::now();
    let ns_weft = "weft-system";
    let secret_key = |key: &str| -> Option<String> {
        let v = kubectl_json(
            &c,
            &["-n", ns_weft, "get", "secret", "weft-ca", "-o", "json"],
        )
        .ok()?;
        let b64 = v["data"][key].as_str()?;
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
        String::from_utf8(bytes).ok()
    };
    let old_root = secret_key("ca.crt")
        .unwrap_or_else(|| panic!("the CA Secret has no ca.crt\n{}", diagnostics(&c)));
    let leader_ip = {
        let p = check(
            &c,
            "the leader pod",
            kubectl_json(&c, &["-n", ns_weft, "get", "pod", &leader, "-o", "json"]),
        );
        p["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let ca_status = |c: &KubeCluster| -> anyhow::Result<Value> {
        let body = c.node_http_get(&node_a, &format!("http://{leader_ip}:15014/debug/status"))?;
        Ok(serde_json::from_str::<Value>(&body)?["ca"].clone())
    };
    let st = check(&c, "the leader's CA status", ca_status(&c));
    assert_eq!(st["phase"], "stable", "{st}");
    let server_a = pod(&mesh, "server", &node_a);
    let client_b = pod(&mesh, "client", &node_b);
    let tcp_a = format!("{}:{TCP_PORT}", server_a.ip);
    let stop = std::sync::atomic::AtomicBool::new(false);
    let rotation = std::thread::scope(|scope| {
        let cluster = &c;
        let traffic = |ns: &'static str, from: String, to: String| {
            let stop = &stop;
            scope.spawn(move || {
                let (mut ok, mut failed) = (0u32, Vec::new());
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let (good, out) = send_text(cluster, ns, &from, &to, "rotation", 1);
                    if good {
                        ok += 1
                    } else {
                        failed.push(out)
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                (ok, failed)
            })
        };
        let a_to_b = traffic(MESH, client_a.name.clone(), tcp_b.clone());
        let b_to_a = traffic(MESH, client_b.name.clone(), tcp_a.clone());
        let staged = check(
            cluster,
            "rotate-ca in a control plane pod",
            cluster.kubectl(&[
                "-n",
                ns_weft,
                "exec",
                &leader,
                "--",
                "weft-control-plane",
                "rotate-ca",
                "--kubernetes",
                "--namespace",
                ns_weft,
            ]),
        );
        assert!(staged.starts_with("staged "), "{staged}");
        let mut phases: Vec<String> = vec!["stable".into()];
        let deadline = Instant::now() + Duration::from_secs(180);
        let mut last = Value::Null;
        while !(phases.len() > 1 && phases.last().map(String::as_str) == Some("stable")) {
            assert!(
                Instant::now() < deadline,
                "the rotation did not finish: {phases:?} {last}\n{}",
                diagnostics(cluster)
            );
            if let Ok(st) = ca_status(cluster) {
                let phase = st["phase"].as_str().unwrap_or_default().to_string();
                if phases.last() != Some(&phase) {
                    eprintln!(
                        "CA rotation: {phase} after {:.1} s",
                        t_rotation.elapsed().as_secs_f64()
                    );
                    phases.push(phase);
                }
                last = st;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        // Some traffic after the retirement too.
        std::thread::sleep(Duration::from_secs(3));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (phases, a_to_b.join().unwrap(), b_to_a.join().unwrap(), last)
    });
    let (phases, a_to_b, b_to_a, last) = rotation;
    eprintln!(
        "CA rotation done in {:.1} s; connections during it: {} and {} ok; {last}",
        t_rotation.elapsed().as_secs_f64(),
        a_to_b.0,
        b_to_a.0
    );
    assert_eq!(phases, ["stable", "trusting", "reissuing", "stable"]);
    assert!(
        a_to_b.1.is_empty() && b_to_a.1.is_empty(),
        "failed connections during the rotation: {:?} {:?}\n{}",
        a_to_b.1,
        b_to_a.1,
        weft_e2e::kubeweft::agent_failures(&c, 20)
    );
    assert!(
        a_to_b.0 >= 5 && b_to_a.0 >= 5,
        "too little traffic: {} {}",
        a_to_b.0,
        b_to_a.0
    );
    let new_root = secret_key("ca.crt").unwrap();
    assert_ne!(new_root, old_root);
    assert_eq!(
        secret_key("retired-ca.crt").as_deref(),
        Some(old_root.as_str())
    );
    assert_eq!(secret_key("next-ca.crt"), None);
    let der = |pem: &str| -> Vec<Vec<u8>> {
        x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
            .filter_map(|p| p.ok())
            .map(|p| p.contents)
            .collect()
    };
    let new_ca = der(&new_root).remove(0);
    for node in &nodes {
        wait_for(
            &c,
            "the node holds only the new root and certificates it signed",
            Duration::from_secs(30),
            || {
                let d = config_dump(&c, node)?;
                let roots = d["trust_bundles"]
                    .as_object()
                    .and_then(|m| m.values().next())
                    .and_then(|b| b["roots_pem"].as_str())
                    .unwrap_or_default()
                    .to_string();
                let certs: Vec<String> = d["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|x| x["chain_pem"].as_str().map(String::from))
                    .collect();
                let (_, ca) = x509_parser::parse_x509_certificate(&new_ca)?;
                let all_new = !certs.is_empty()
                    && certs.iter().all(|chain| {
                        der(chain)
                            .first()
                            .and_then(|leaf| {
                                x509_parser::parse_x509_certificate(leaf)
                                    .ok()
                                    .map(|(_, l)| l.verify_signature(Some(ca.public_key())).is_ok())
                            })
                            .unwrap_or(false)
                    });
                Ok((
                    (der(&roots) == vec![new_ca.clone()] && all_new).then_some(()),
                    format!(
                        "{node}: {} roots, {} certificates, all by the new CA: {all_new}",
                        der(&roots).len(),
                        certs.len()
                    ),
                ))
            },
        );
    }
    wait_for(
        &c,
        "the weft-ca-root-cert ConfigMap holds the new root",
        Duration::from_secs(30),
        || {
            let cm = kubectl_json(
                &c,
                &[
                    "-n",
                    MESH,
                    "get",
                    "configmap",
                    "weft-ca-root-cert",
                    "-o",
                    "json",
                ],
            )?;
            let roots = cm["data"]["root-cert.pem"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            Ok(((der(&roots) == vec![new_ca.clone()]).then_some(()), roots))
        },
    );
    // Both replicas published their progress (the leader waited for the follower's
    // nodes too).
    let progress = check(
        &c,
        "the weft-ca-rotation ConfigMap",
        kubectl_json(
            &c,
            &[
                "-n",
                ns_weft,
                "get",
                "configmap",
                "weft-ca-rotation",
                "-o",
                "json",
            ],
        ),
    );
    let replicas = progress["data"].as_object().map(|m| m.len()).unwrap_or(0);
    assert_eq!(replicas, 2, "{progress}");
    let (ok, out) = send_text(&c, MESH, &client_a.name, &tcp_b, "after-rotation", 2);
    assert!(ok, "after the rotation: {out}");
    let rotation_secs = t_rotation.elapsed().as_secs_f64();

    let t_down = Instant::now();
    c.teardown().unwrap_or_else(|e| panic!("{e:#}"));
    eprintln!(
        "timings: cluster {:.1} s, install {install_secs:.1} s, workloads Ready {apps_secs:.1} s, enrolled with SVIDs {enrolled_secs:.1} s, capture {capture_secs:.1} s, policies and plugin Accepted {accepted_secs:.1} s, enforced on both nodes {enforced_secs:.1} s, CA rotation {rotation_secs:.1} s, teardown {:.1} s, whole test {:.1} s",
        t_cluster.as_secs_f64(),
        t_down.elapsed().as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}
