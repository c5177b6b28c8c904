//! Traffic and faults on the real cluster of [`crate::kubecluster`] with weft
//! installed ([`crate::kubeweft`]): `weft-testapp flow` runs from inside a pod,
//! the agents' enrolled pods, and SIGKILL of a pod's container through its node's
//! containerd. Shared by the `kube_lifecycle` and `kube_chaos` tests.

use crate::kubecluster::KubeCluster;
use crate::kubeweft::{check, config_dump, kubectl_json, name_of};
use serde_json::Value;

/// The result of `weft-testapp flow` (see there).
#[derive(Debug)]
pub struct Flow {
    pub new_ok: u64,
    pub new_failed: u64,
    pub long_lived_ok: Option<bool>,
    pub raw: Value,
}

impl Flow {
    /// The span of the failures, first to last (ms from the flow's start).
    pub fn failure_window(&self) -> Option<(u64, u64)> {
        let f = self.raw["failures"].as_array()?;
        let ms: Vec<u64> = f.iter().filter_map(|x| x[0].as_u64()).collect();
        Some((*ms.iter().min()?, *ms.iter().max()?))
    }
}

/// Runs `weft-testapp flow` in `ns/pod` against `target` for `seconds`: a new
/// connection every 100 ms, and with `long` one long-lived connection throughout.
pub fn flow(c: &KubeCluster, ns: &str, pod: &str, target: &str, seconds: u64, long: bool) -> Flow {
    let secs = seconds.to_string();
    let mut args = vec![
        "-n",
        ns,
        "exec",
        pod,
        "--",
        "weft-testapp",
        "flow",
        "--connect",
        target,
        "--seconds",
        &secs,
        "--interval-ms",
        "100",
    ];
    if !long {
        args.push("--no-long-lived");
    }
    let out = check(c, &format!("{pod}: weft-testapp flow"), c.kubectl(&args));
    let raw: Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{pod}: flow printed {out:?}: {e}"));
    Flow {
        new_ok: raw["new_ok"].as_u64().unwrap_or(0),
        new_failed: raw["new_failed"].as_u64().unwrap_or(0),
        long_lived_ok: raw["long_lived_ok"].as_bool(),
        raw,
    }
}

/// The enrolled pods (`namespace/name`) a node's agent lists.
pub fn enrolled(c: &KubeCluster, node: &str) -> anyhow::Result<Vec<String>> {
    let d = config_dump(c, node)?;
    let mut v: Vec<String> = d["enrolled_pods"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["pod"].as_str().map(String::from))
        .collect();
    v.sort();
    Ok(v)
}

/// A running container of a pod: the pod, its node, containerd id and restarts.
#[derive(Debug, Clone)]
pub struct Container {
    pub pod: String,
    pub node: String,
    pub id: String,
    pub restarts: u64,
}

/// The container `container` of the pods of `ns` matching `selector` (not being
/// deleted), on `node` if given.
pub fn containers(
    c: &KubeCluster,
    ns: &str,
    selector: &str,
    container: &str,
    node: Option<&str>,
) -> Vec<Container> {
    let pods = check(
        c,
        "listing pods",
        kubectl_json(c, &["-n", ns, "get", "pods", "-l", selector]),
    );
    pods["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .filter(|p| node.is_none_or(|n| p["spec"]["nodeName"] == n))
        .map(|p| {
            let s = p["status"]["containerStatuses"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|s| s["name"] == container)
                .cloned()
                .unwrap_or(Value::Null);
            Container {
                pod: name_of(p),
                node: p["spec"]["nodeName"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                id: s["containerID"]
                    .as_str()
                    .unwrap_or_default()
                    .trim_start_matches("containerd://")
                    .to_string(),
                restarts: s["restartCount"].as_u64().unwrap_or(0),
            }
        })
        .collect()
}

/// SIGKILL to a container, through its node's containerd (as a crash would).
pub fn kill_container(c: &KubeCluster, k: &Container) {
    let sock = c
        .node(&k.node)
        .map(|n| n.containerd_socket())
        .unwrap_or_default();
    let out = std::process::Command::new("ctr")
        .arg("--address")
        .arg(&sock)
        .args(["-n", "k8s.io", "task", "kill", "--signal", "SIGKILL", &k.id])
        .output();
    match out {
        Ok(o) if o.status.success() => {}
        other => panic!("killing {} ({}) on {}: {other:?}", k.pod, k.id, k.node),
    }
}
