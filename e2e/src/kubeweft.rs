//! weft installed with real Helm on the real cluster of [`crate::kubecluster`]: the
//! values that fit it, waiting for the release to be Ready, reading the agents'
//! state, and everything that helps understand a failure. Shared by the
//! `kube_*` tests.

use crate::helm::{chart_dir, Helm};
use crate::kubecluster::{self, host, poll, KubeCluster};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

/// The release's namespace and name.
pub const NS: &str = "weft-system";
pub const RELEASE: &str = "weft";
pub const CRDS: &[&str] = &[
    "authorizationpolicies.security.weft.dev",
    "peerauthentications.security.weft.dev",
    "requestauthentications.security.weft.dev",
    "wasmplugins.extensions.weft.dev",
];

/// Builds Kubernetes (cached) and weft's images from the binaries the test runs
/// with (when missing or older than them); returns the image archives.
pub fn prepare_images() -> anyhow::Result<Vec<PathBuf>> {
    kubecluster::kube_binaries()?;
    let bin = crate::bin_path("weft-node")?;
    let dir = bin
        .parent()
        .ok_or_else(|| anyhow::anyhow!("{} has no parent", bin.display()))?;
    kubecluster::ensure_weft_images(dir, "debug")
}

/// The chart's values for this cluster: local images, and each agent attached to
/// its own node's cgroup (both nodes share this kernel, so the cgroup2 root would
/// hold the other node's pods too).
pub fn values() -> anyhow::Result<Value> {
    let cg2 = host::cgroup2()?;
    Ok(json!({
        "logFormat": "text",
        "controlPlane": {"image": {"pullPolicy": "Never"}},
        "node": {
            "image": {"pullPolicy": "Never"},
            "cgroupRoot": cg2.display().to_string(),
            "captureCgroup": format!("{}/{}/$(WEFT_NODE_NAME)", cg2.display(), host::CGROUP),
            "cniWaitSeconds": 60,
        },
    }))
}

/// Helm for this cluster. Client-side apply: Helm 4 applies server-side by
/// default, which Kubernetes 1.20 refuses for weft's CRDs
/// (`x-kubernetes-validations` is unknown to its typed schema); a plain create
/// drops the field.
pub fn helm(c: &KubeCluster) -> anyhow::Result<Helm> {
    Ok(Helm::new(&c.kubeconfig(), NS)?.client_side())
}

/// Installs the chart with `values` and waits until every part is Ready (the
/// agents' command lines containing `want_agent_arg`). Returns the leader's name.
pub fn install(c: &KubeCluster, helm: &Helm, values: &Value, want_agent_arg: &str) -> String {
    let rel = check(
        c,
        "helm install",
        helm.install(RELEASE, &chart_dir(), values, Duration::from_secs(300)),
    );
    assert_eq!(
        (rel["revision"].as_u64(), rel["status"].as_str()),
        (Some(1), Some("deployed")),
        "{rel}"
    );
    wait_release_ready(c, Duration::from_secs(240), want_agent_arg)
}

/// Everything that helps understand a failure: weft's pods and events, the logs of
/// every container of weft's pods (and of their previous runs), the kubelets' and
/// containerds' log tails.
pub fn diagnostics(c: &KubeCluster) -> String {
    diagnostics_of(c, &[])
}

/// [`diagnostics`], with the pods and events of `app_namespaces` too.
pub fn diagnostics_of(c: &KubeCluster, app_namespaces: &[&str]) -> String {
    let k = |args: &[&str]| c.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
    let mut out = String::new();
    for ns in std::iter::once(NS).chain(app_namespaces.iter().copied()) {
        out += &format!(
            "--- kubectl -n {ns} get pods -o wide\n{}\n",
            k(&["-n", ns, "get", "pods", "-o", "wide"])
        );
        out += &format!(
            "--- kubectl -n {ns} get events\n{}\n",
            k(&["-n", ns, "get", "events", "--sort-by=.lastTimestamp"])
        );
    }
    let pods: Value =
        serde_json::from_str(&k(&["-n", NS, "get", "pods", "-o", "json"])).unwrap_or(Value::Null);
    for p in pods["items"].as_array().into_iter().flatten() {
        let name = p["metadata"]["name"].as_str().unwrap_or_default();
        let spec = &p["spec"];
        let containers = spec["initContainers"]
            .as_array()
            .into_iter()
            .flatten()
            .chain(spec["containers"].as_array().into_iter().flatten());
        for ctr in containers {
            let ctr = ctr["name"].as_str().unwrap_or_default();
            for prev in [false, true] {
                let mut args = vec!["-n", NS, "logs", name, "-c", ctr, "--tail=40"];
                if prev {
                    args.push("--previous");
                }
                if let Ok(log) = c.kubectl(&args) {
                    out += &format!(
                        "--- kubectl logs {name} -c {ctr}{}\n{log}\n",
                        if prev { " --previous" } else { "" }
                    );
                }
            }
        }
    }
    strip_ansi(&(out + &c.logs(25)))
}

/// Without terminal colour sequences (the agent colours its text logs).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(ch) = chars.next() {
        if ch == '\u{1b}' {
            // ESC [ ... final byte in '@'..='~'
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

pub fn check<T>(c: &KubeCluster, what: &str, r: anyhow::Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{what}: {e:#}\n\n{}", diagnostics(c)),
    }
}

pub fn kubectl_json(c: &KubeCluster, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = args.to_vec();
    all.extend(["-o", "json"]);
    Ok(serde_json::from_str(&c.kubectl(&all)?)?)
}

/// Polls `f` (returning `Ok(Some)` when done, `Ok(None)`/`Err` to retry, with a
/// description of the state) until `timeout`; fails with the last state and the
/// cluster's diagnostics.
pub fn wait_for<T>(
    c: &KubeCluster,
    what: &str,
    timeout: Duration,
    f: impl FnMut() -> anyhow::Result<(Option<T>, String)>,
) -> T {
    wait_for_in(c, &[], what, timeout, f)
}

/// [`wait_for`], with the pods and events of `app_namespaces` in the diagnostics.
pub fn wait_for_in<T>(
    c: &KubeCluster,
    app_namespaces: &[&str],
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<(Option<T>, String)>,
) -> T {
    let mut last = String::new();
    let r = poll(timeout, || match f() {
        Ok((v, state)) => {
            last = state;
            v
        }
        Err(e) => {
            last = format!("{e:#}");
            None
        }
    });
    r.unwrap_or_else(|| {
        panic!(
            "{what}: not within {timeout:?}; last: {last}\n\n{}",
            diagnostics_of(c, app_namespaces)
        )
    })
}

pub fn name_of(p: &Value) -> String {
    p["metadata"]["name"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

pub fn ready(p: &Value) -> bool {
    p["metadata"]["deletionTimestamp"].is_null()
        && p["status"]["phase"] == "Running"
        && p["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        })
}

/// Waits until the release is Ready: CRDs Established, every control-plane
/// replica Ready with one holding the Lease, one Ready agent per node whose
/// container runs `want_agent_arg`. Returns the leader's name.
pub fn wait_release_ready(c: &KubeCluster, timeout: Duration, want_agent_arg: &str) -> String {
    wait_for(c, "CRDs Established", timeout, || {
        let mut missing = Vec::new();
        for crd in CRDS {
            let v = kubectl_json(c, &["get", "crd", crd])?;
            let ok = v["status"]["conditions"].as_array().is_some_and(|c| {
                c.iter()
                    .any(|c| c["type"] == "Established" && c["status"] == "True")
            });
            if !ok {
                missing.push(*crd);
            }
        }
        Ok((
            missing.is_empty().then_some(()),
            format!("not Established: {missing:?}"),
        ))
    });
    let nodes: Vec<String> = c.nodes.iter().map(|n| n.name.clone()).collect();
    wait_for(c, "one Ready node agent per node", timeout, || {
        let pods = kubectl_json(
            c,
            &[
                "-n",
                NS,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=node",
            ],
        )?;
        let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
        for p in pods["items"].as_array().into_iter().flatten() {
            let args = p["spec"]["containers"][0]["args"].to_string();
            if ready(p) && args.contains(want_agent_arg) {
                *per_node
                    .entry(p["spec"]["nodeName"].as_str().unwrap_or_default().into())
                    .or_default() += 1;
            }
        }
        // One node DaemonSet (named after its pod spec: an upgrade replaces it).
        let dss = kubectl_json(
            c,
            &[
                "-n",
                NS,
                "get",
                "daemonsets",
                "-l",
                "app.kubernetes.io/component=node",
            ],
        )?;
        let items = dss["items"].as_array().cloned().unwrap_or_default();
        let s = &items
            .first()
            .map(|d| d["status"].clone())
            .unwrap_or(Value::Null);
        let done = items.len() == 1
            && nodes.iter().all(|n| per_node.get(n) == Some(&1))
            && s["desiredNumberScheduled"] == nodes.len()
            && s["numberReady"] == nodes.len()
            && s["updatedNumberScheduled"] == nodes.len();
        Ok((
            done.then_some(()),
            format!(
                "Ready agents per node {per_node:?}; {} node DaemonSet(s), status {s}",
                items.len()
            ),
        ))
    });
    wait_for(c, "the control plane Ready with a leader", timeout, || {
        let d = kubectl_json(c, &["-n", NS, "get", "deployment", "weft-control-plane"])?;
        let want = d["spec"]["replicas"].as_u64().unwrap_or(0);
        let s = &d["status"];
        let pods = kubectl_json(
            c,
            &[
                "-n",
                NS,
                "get",
                "pods",
                "-l",
                "app.kubernetes.io/component=control-plane",
            ],
        )?;
        let ready_pods: Vec<String> = pods["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| ready(p))
            .map(name_of)
            .collect();
        let lease = kubectl_json(c, &["-n", NS, "get", "lease", "weft-control-plane"])
            .map(|l| {
                l["spec"]["holderIdentity"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string()
            })
            .unwrap_or_default();
        let done = want >= 1
            && s["readyReplicas"].as_u64() == Some(want)
            && s["updatedReplicas"].as_u64() == Some(want)
            && ready_pods.len() as u64 == want
            && ready_pods.contains(&lease);
        Ok((
            done.then(|| lease.clone()),
            format!("Deployment status {s}; Ready pods {ready_pods:?}; Lease holder {lease:?}"),
        ))
    })
}

/// The agent's `/config_dump` on a node (hostNetwork: its admin port is on the
/// node's loopback).
pub fn config_dump(c: &KubeCluster, node: &str) -> anyhow::Result<Value> {
    let body = c.node_http_get(node, "http://127.0.0.1:15000/config_dump")?;
    Ok(serde_json::from_str(&body)?)
}

/// The node agents' log lines that explain failed connections: access records
/// with an `error`, and every WARN or ERROR event (at most `max` lines per agent,
/// the latest). Printed by tests that count failed connections, so a failure
/// names its cause.
pub fn agent_failures(c: &KubeCluster, max: usize) -> String {
    let k = |args: &[&str]| c.kubectl(args).unwrap_or_else(|e| format!("{e:#}"));
    let pods: Value =
        serde_json::from_str(&k(&["-n", NS, "get", "pods", "-o", "json"])).unwrap_or(Value::Null);
    let mut out = String::new();
    for p in pods["items"].as_array().into_iter().flatten() {
        let name = name_of(p);
        if !name.starts_with("weft-node") {
            continue;
        }
        let node = p["spec"]["nodeName"].as_str().unwrap_or_default();
        let ctr = p["spec"]["containers"][0]["name"]
            .as_str()
            .unwrap_or_default();
        // Text logs carry ANSI colours around the level: stripped before matching.
        let log = strip_ansi(&k(&["-n", NS, "logs", &name, "-c", ctr, "--tail=20000"]));
        let lines: Vec<&str> = log
            .lines()
            // JSON or text logs (the tests' values use text), and the enrolment
            // changes that close or open a pod's listeners.
            .filter(|l| {
                l.contains("\"error\"")
                    || l.contains("\"WARN\"")
                    || l.contains("\"ERROR\"")
                    || l.contains(" WARN ")
                    || l.contains(" ERROR ")
                    || l.contains(" error=")
                    || (l.contains("un-enrolled") && !l.contains("churn-"))
                    || l.contains("found a running pod")
            })
            .collect();
        // Denials (the tests' intruders make many) are summed per source and
        // destination; everything else is listed.
        let mut denials: std::collections::BTreeMap<(String, String), usize> = Default::default();
        let field = |l: &str, k: &str| -> String {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or("?")
                .trim_matches('"')
                .to_string()
        };
        let mut rest = Vec::new();
        for l in lines {
            if l.contains("decision=\"deny\"") {
                let src = field(l, "source_addr=");
                let src = src
                    .rsplit_once(':')
                    .map_or(src.clone(), |(ip, _)| ip.to_string());
                *denials
                    .entry((src, field(l, "destination_workload=")))
                    .or_default() += 1;
            } else {
                rest.push(l);
            }
        }
        let from = rest.len().saturating_sub(max);
        out += &format!(
            "--- {name} on {node}: {} failure lines (last {})\n{}\n",
            rest.len(),
            rest.len() - from,
            rest[from..].join("\n")
        );
        for ((src, dst), n) in denials {
            out += &format!("denied: {n} connections from {src} to {dst}\n");
        }
    }
    out
}
