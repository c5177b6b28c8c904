//! A local cluster on one machine, wired as real nodes are:
//!
//! ```text
//!  fabric netns: bridge fab0 10.200.0.1/24, control plane (standalone, manifests written here)
//!     |-- veth --> node netns (eth0 10.200.0.1x): weft-node --capture, bridge cni0 10.244.x.1/24
//!                    |-- pods: netns each, network from Debian's bridge + host-local CNI plugins
//!                    |         chained with weft-cni (the CNI protocol: env vars + stdin JSON)
//! ```
//!
//! Nodes route each other's pod CIDRs over the fabric. Several simulated nodes share
//! one kernel, so each node gets its own cgroup subtree (its pods and its agent) as
//! the capture attach point, and its own bpffs pin directory. Apps run in their
//! pod's netns and cgroup. Everything is torn down on drop, also when a test fails.

use crate::netlab::ip;
use crate::process::{bin_path, wait_until, Proc};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use weft_node_dataplane::testing::PodNetns;

pub const CNI_DIR: &str = "/usr/lib/cni";
const FABRIC_IP: &str = "10.200.0.1";

static SEQ: AtomicU32 = AtomicU32::new(0);

fn in_netns(ns: &str, program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{ns}"))
        .arg("--")
        .arg(program)
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "{program} {} in {ns}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

pub struct Node {
    pub name: String,
    pub index: u8,
    pub netns: String,
    /// The node's interface on the fabric (its "NIC").
    pub uplink: String,
    pub cgroup: PathBuf,
    pub pin_dir: PathBuf,
    pub dir: PathBuf,
    pub agent: Option<Proc>,
    worker: PodNetns,
    agent_starts: u32,
}

pub struct Pod {
    pub namespace: String,
    pub name: String,
    pub node: String,
    pub netns: String,
    pub ip: String,
    pub container_id: String,
    pub cgroup: PathBuf,
    pub labels: BTreeMap<String, String>,
}

pub struct LocalCluster {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub fabric: String,
    pub nodes: BTreeMap<String, Node>,
    pub pods: BTreeMap<String, Pod>,
    pub control_plane: Option<Proc>,
    pub apps: Vec<Proc>,
    netns: Vec<String>,
    cgroup_root: PathBuf,
    fabric_worker: Option<PodNetns>,
    namespaces: BTreeMap<String, bool>,
    /// Sandboxes created so far (a retried pod gets a new one).
    pod_seq: usize,
    cp_args: Vec<String>,
    agent_args: Vec<String>,
    /// The nodes' pins live in this cluster's own bpffs instance.
    bpffs: crate::netlab::PrivateBpffs,
}

impl LocalCluster {
    /// Builds `nodes` nodes and starts the control plane and one agent per node.
    pub fn new(nodes: &[&str]) -> anyhow::Result<Self> {
        Self::with_control_plane_args(nodes, &[])
    }

    /// Like [`new`](Self::new), with extra `weft-control-plane run` arguments.
    pub fn with_control_plane_args(nodes: &[&str], cp_args: &[&str]) -> anyhow::Result<Self> {
        Self::with_args(nodes, cp_args, &[])
    }

    /// Like [`new`](Self::new), with extra `weft-control-plane run` and `weft-node run`
    /// arguments.
    pub fn with_args(
        nodes: &[&str],
        cp_args: &[&str],
        agent_args: &[&str],
    ) -> anyhow::Result<Self> {
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let id = format!("{}{}", std::process::id() % 100000, n);
        let dir = tempfile::Builder::new().prefix("weft-cluster-").tempdir()?;
        let cg2 = weft_node_dataplane::cgroup::cgroup2_root()?;
        let cgroup_root = cg2.join(format!("weft-e2e-{id}"));
        let mut c = Self {
            fabric: format!("wf{id}-fab"),
            id,
            dir,
            nodes: BTreeMap::new(),
            pods: BTreeMap::new(),
            control_plane: None,
            apps: Vec::new(),
            netns: Vec::new(),
            cgroup_root,
            fabric_worker: None,
            namespaces: BTreeMap::new(),
            pod_seq: 0,
            cp_args: cp_args.iter().map(|s| s.to_string()).collect(),
            agent_args: agent_args.iter().map(|s| s.to_string()).collect(),
            bpffs: crate::netlab::PrivateBpffs::new()?,
        };
        std::fs::create_dir_all(&c.cgroup_root)?;
        std::fs::create_dir_all(c.dir.path().join("config"))?;
        let fabric = c.fabric.clone();
        c.add_netns(&fabric)?;
        in_netns(&fabric, "ip", &["link", "add", "fab0", "type", "bridge"])?;
        in_netns(
            &fabric,
            "ip",
            &["addr", "add", &format!("{FABRIC_IP}/24"), "dev", "fab0"],
        )?;
        in_netns(&fabric, "ip", &["link", "set", "fab0", "up"])?;
        c.fabric_worker = Some(PodNetns::open(format!("/var/run/netns/{fabric}"))?);
        for (i, name) in nodes.iter().enumerate() {
            c.add_node(name, i as u8 + 1)?;
        }
        // Routes between nodes' pod CIDRs.
        let all: Vec<(String, u8)> = c
            .nodes
            .values()
            .map(|n| (n.netns.clone(), n.index))
            .collect();
        for (ns, i) in &all {
            for (_, j) in all.iter().filter(|(_, j)| j != i) {
                in_netns(
                    ns,
                    "ip",
                    &[
                        "route",
                        "add",
                        &format!("10.244.{j}.0/24"),
                        "via",
                        &format!("10.200.0.{}", 10 + j),
                    ],
                )?;
            }
        }
        c.write_manifest("00-namespaces.yaml", "")?;
        c.start_control_plane()?;
        for name in nodes {
            c.create_credential(name)?;
            c.start_agent(name)?;
        }
        // Like a kubelet waiting for its CNI: no pods before the agents are ready.
        for name in nodes {
            c.wait_agent_ready(name, Duration::from_secs(30))?;
        }
        Ok(c)
    }

    fn add_netns(&mut self, name: &str) -> anyhow::Result<()> {
        let _ = ip(&["netns", "del", name]);
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_string());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn add_node(&mut self, name: &str, index: u8) -> anyhow::Result<()> {
        let ns = format!("wf{}-n{index}", self.id);
        self.add_netns(&ns)?;
        let (outer, inner) = (
            format!("wf{}f{index}", self.id),
            format!("wf{}e{index}", self.id),
        );
        ip(&[
            "link",
            "add",
            &outer,
            "netns",
            &self.fabric,
            "type",
            "veth",
            "peer",
            "name",
            &inner,
            "netns",
            &ns,
        ])?;
        in_netns(
            &self.fabric,
            "ip",
            &["link", "set", &outer, "master", "fab0", "up"],
        )?;
        in_netns(
            &ns,
            "ip",
            &[
                "addr",
                "add",
                &format!("10.200.0.{}/24", 10 + index),
                "dev",
                &inner,
            ],
        )?;
        in_netns(&ns, "ip", &["link", "set", &inner, "up"])?;
        in_netns(&ns, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        let cgroup = self.cgroup_root.join(name);
        std::fs::create_dir_all(cgroup.join("agent"))?;
        std::fs::create_dir_all(cgroup.join("pods"))?;
        let dir = self.dir.path().join("nodes").join(name);
        std::fs::create_dir_all(&dir)?;
        let pin_dir = self
            .bpffs
            .path()
            .join(format!("weft-e2e-{}-{name}", self.id));
        let worker = PodNetns::open(format!("/var/run/netns/{ns}"))?;
        self.nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                index,
                netns: ns,
                uplink: inner,
                cgroup,
                pin_dir,
                dir,
                agent: None,
                worker,
                agent_starts: 0,
            },
        );
        Ok(())
    }

    /// The agent's `--state-dir` on `node` (a relative `--workload-api-socket` is
    /// under it).
    pub fn agent_state_dir(&self, node: &str) -> Option<PathBuf> {
        self.nodes.get(node).map(|n| n.dir.join("state"))
    }

    /// The node's address on the fabric (its metrics are on `<ip>:15020`).
    pub fn node_ip(&self, node: &str) -> Option<String> {
        self.nodes
            .get(node)
            .map(|n| format!("10.200.0.{}", 10 + n.index))
    }

    /// The control plane's admin address (`/metrics`, `/debug/status`) on the fabric.
    pub fn control_plane_admin(&self) -> String {
        format!("{FABRIC_IP}:15014")
    }

    /// The fabric network namespace's path (to run tools in it with nsenter).
    pub fn fabric_netns(&self) -> String {
        format!("/var/run/netns/{}", self.fabric)
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn write_manifest(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config_dir().join(name))?;
        Ok(())
    }

    /// A command line that joins `cgroup` and `netns` and then runs `program`.
    fn wrapped(cgroup: &Path, netns: &str, program: &Path, args: &[String]) -> Command {
        let mut cmd = Command::new("sh");
        let mut script = format!(
            "echo $$ > {}/cgroup.procs && exec nsenter --net=/var/run/netns/{netns} -- \"$0\" \"$@\"",
            cgroup.display()
        );
        script.push_str("");
        cmd.arg("-c").arg(script).arg(program).args(args);
        cmd
    }

    fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let cp = bin_path("weft-control-plane")?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{}", self.fabric))
            .arg("--")
            .arg(cp)
            .args(["run", "--config-dir"])
            .arg(self.config_dir())
            .arg("--state-dir")
            .arg(self.dir.path().join("cp-state"))
            .args([
                "--grpc-addr",
                &format!("{FABRIC_IP}:15012"),
                "--admin-addr",
                &format!("{FABRIC_IP}:15014"),
            ])
            .args(&self.cp_args);
        self.control_plane = Some(Proc::spawn(
            "control-plane",
            &mut cmd,
            &self.dir.path().join("control-plane.log"),
        )?);
        let ok = wait_until(Duration::from_secs(20), || {
            let (s, _) = self
                .fabric_http(&format!("{FABRIC_IP}:15014"), "/healthz/ready")
                .ok()?;
            (s == 200).then_some(())
        });
        if ok.is_none() {
            bail!(
                "control plane not ready:\n{}",
                self.control_plane
                    .as_ref()
                    .map(|p| p.log_text())
                    .unwrap_or_default()
            );
        }
        Ok(())
    }

    fn create_credential(&self, node: &str) -> anyhow::Result<()> {
        let out = Command::new(bin_path("weft-control-plane")?)
            .args(["node-credential", "--node", node, "--state-dir"])
            .arg(self.dir.path().join("cp-state"))
            .arg("--out")
            .arg(self.dir.path().join("nodes").join(node).join("credential"))
            .output()?;
        if !out.status.success() {
            bail!("node-credential: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    /// (Re)starts the node agent in its node netns and agent cgroup.
    pub fn start_agent(&mut self, node: &str) -> anyhow::Result<()> {
        self.start_agent_with(node, &bin_path("weft-node")?)
    }

    /// (Re)starts the node agent from the `weft-node` binary `bin` (benchmarks
    /// comparing two builds).
    pub fn start_agent_with(&mut self, node: &str, bin: &Path) -> anyhow::Result<()> {
        let n = self.nodes.get_mut(node).context("no such node")?;
        n.agent_starts += 1;
        let args: Vec<String> = vec![
            "run".into(),
            "--node".into(),
            node.into(),
            "--control-plane".into(),
            format!("https://{FABRIC_IP}:15012"),
            "--credential-dir".into(),
            n.dir.join("credential").display().to_string(),
            "--admin-addr".into(),
            "127.0.0.1:15000".into(),
            "--capture".into(),
            "--cgroup".into(),
            n.cgroup.display().to_string(),
            "--bpf-dir".into(),
            n.pin_dir.display().to_string(),
            "--cni-socket".into(),
            n.dir.join("run/cni.sock").display().to_string(),
            "--state-dir".into(),
            n.dir.join("state").display().to_string(),
            // Short, so tests can see idle HBONE connections released.
            "--hbone-idle-timeout".into(),
            "2s".into(),
        ]
        .into_iter()
        .chain(self.agent_args.iter().cloned())
        .collect();
        let mut cmd = Self::wrapped(&n.cgroup.join("agent"), &n.netns, bin, &args);
        let log = n.dir.join(format!("agent-{}.log", n.agent_starts));
        n.agent = Some(Proc::spawn(&format!("agent {node}"), &mut cmd, &log)?);
        Ok(())
    }

    pub fn wait_agent_ready(&self, node: &str, timeout: Duration) -> anyhow::Result<()> {
        wait_until(timeout, || self.node_ready(node).then_some(()))
            .with_context(|| format!("agent on {node} not ready:\n{}", self.agent_log(node)))
    }

    pub fn kill_agent(&mut self, node: &str) {
        if let Some(mut p) = self.nodes.get_mut(node).and_then(|n| n.agent.take()) {
            p.kill();
        }
    }

    pub fn agent_log(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .and_then(|n| n.agent.as_ref())
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    /// HTTP GET from inside a netns (through `worker`), returning (status, body).
    fn http_via(worker: &PodNetns, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        let addr: std::net::SocketAddr = addr.parse()?;
        let mut s = worker
            .run(move || std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)))??;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n")?;
        let mut resp = String::new();
        s.read_to_string(&mut resp)?;
        let status = resp
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        let body = resp
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    /// HTTP GET from the fabric network (where the control plane listens and every
    /// node is reachable at [`node_ip`](Self::node_ip)).
    pub fn fabric_http(&self, addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
        Self::http_via(self.fabric_worker.as_ref().context("fabric")?, addr, path)
    }

    /// GET `path` from the control plane's admin endpoint (`/debug/status`, ...).
    pub fn cp_http(&self, path: &str) -> anyhow::Result<(u16, String)> {
        self.fabric_http(&format!("{FABRIC_IP}:15014"), path)
    }

    pub fn node_http(&self, node: &str, path: &str) -> anyhow::Result<(u16, String)> {
        Self::http_via(
            &self.nodes.get(node).context("no such node")?.worker,
            "127.0.0.1:15000",
            path,
        )
    }

    pub fn config_dump(&self, node: &str) -> anyhow::Result<Value> {
        let (s, body) = self.node_http(node, "/config_dump")?;
        if s != 200 {
            bail!("config_dump {node}: {s}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    pub fn node_ready(&self, node: &str) -> bool {
        self.node_http(node, "/healthz/ready")
            .is_ok_and(|(s, _)| s == 200)
    }

    /// The enrolled-pod entry of `ns/name` in its node's config dump.
    pub fn enrolled_pod(&self, node: &str, pod: &str) -> Option<Value> {
        self.config_dump(node)
            .ok()?
            .get("enrolled_pods")?
            .as_array()?
            .iter()
            .find(|p| p["pod"] == pod)
            .cloned()
    }

    pub fn namespace(&mut self, name: &str, enrolled: bool) -> anyhow::Result<()> {
        self.namespaces.insert(name.into(), enrolled);
        let text: String = self
            .namespaces
            .iter()
            .map(|(n, e)| {
                let labels = if *e { "{weft.dev/mesh: enabled}" } else { "{}" };
                format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {n}, labels: {labels}}}\n")
            })
            .collect();
        self.write_manifest("00-namespaces.yaml", &text)
    }

    fn pod_manifest(p: &Pod) -> String {
        let labels: String = p
            .labels
            .iter()
            .map(|(k, v)| format!("{k}: {v:?}, "))
            .collect();
        let status = if p.ip.is_empty() {
            String::new()
        } else {
            format!("status: {{podIP: {}}}\n", p.ip)
        };
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, uid: {}, labels: {{{labels}}}}}\n\
             spec: {{nodeName: {}, serviceAccountName: {}, containers: [{{name: app}}]}}\n{status}",
            p.name, p.namespace, p.container_id, p.node, p.name
        )
    }

    /// Creates a pod on `node` the way a kubelet would: the Pod object is scheduled,
    /// its sandbox gets a network through the CNI chain, then its IP is reported.
    pub fn add_pod(
        &mut self,
        namespace: &str,
        name: &str,
        node: &str,
        labels: &[(&str, &str)],
    ) -> anyhow::Result<String> {
        let n = self.nodes.get(node).context("no such node")?;
        let (node_ns, index, node_dir, node_cg) =
            (n.netns.clone(), n.index, n.dir.clone(), n.cgroup.clone());
        self.pod_seq += 1;
        let seq = self.pod_seq;
        let netns = format!("wf{}-p{seq}", self.id);
        self.add_netns(&netns)?;
        let cgroup = node_cg.join("pods").join(format!("{namespace}-{name}"));
        std::fs::create_dir_all(&cgroup)?;
        let mut pod = Pod {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            netns: netns.clone(),
            ip: String::new(),
            container_id: format!("sandbox-{}-{seq}", self.id),
            cgroup,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        };
        let file = format!("pod-{namespace}-{name}.yaml");
        self.write_manifest(&file, &Self::pod_manifest(&pod))?;
        // CNI chain: bridge (+ host-local IPAM) then weft-cni, run in the node's netns.
        let plugins = [
            json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                   "ipam": {"type": "host-local", "subnet": format!("10.244.{index}.0/24"),
                            "dataDir": node_dir.join("ipam").display().to_string(),
                            "routes": [{"dst": "0.0.0.0/0"}]}}),
            json!({"type": "weft-cni", "agentSocket": node_dir.join("run/cni.sock").display().to_string()}),
        ];
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={namespace};K8S_POD_NAME={name};K8S_POD_UID={}",
            pod.container_id
        );
        let mut prev: Option<Value> = None;
        for (added, conf) in plugins.iter().enumerate() {
            let mut conf = conf.clone();
            conf["cniVersion"] = json!("1.0.0");
            conf["name"] = json!("podnet");
            if let Some(p) = &prev {
                conf["prevResult"] = p.clone();
            }
            match cni_exec(&node_ns, &conf, "ADD", &pod.container_id, &netns, &args) {
                Ok(out) => prev = Some(out),
                Err(e) => {
                    // As a runtime does with a sandbox whose network failed: DEL what
                    // was added (reverse order), drop the sandbox; the caller may retry.
                    for conf in plugins[..=added].iter().rev() {
                        let mut conf = conf.clone();
                        conf["cniVersion"] = json!("1.0.0");
                        conf["name"] = json!("podnet");
                        let _ = cni_exec(&node_ns, &conf, "DEL", &pod.container_id, &netns, &args);
                    }
                    let _ = ip(&["netns", "del", &netns]);
                    self.netns.retain(|n| n != &netns);
                    return Err(e.context(format!("CNI ADD of pod {namespace}/{name}")));
                }
            }
        }
        let result = prev.context("empty CNI chain")?;
        pod.ip = weft_node_dataplane::testing::ips_of(&result)
            .into_iter()
            .next()
            .context("no IP from IPAM")?;
        self.write_manifest(&file, &Self::pod_manifest(&pod))?;
        let ip = pod.ip.clone();
        self.pods.insert(format!("{namespace}/{name}"), pod);
        Ok(ip)
    }

    /// Waits until `pod` is enrolled (captured) on `node`.
    pub fn wait_enrolled(&self, node: &str, pod: &str) -> anyhow::Result<()> {
        wait_until(Duration::from_secs(20), || self.enrolled_pod(node, pod))
            .map(|_| ())
            .with_context(|| {
                format!(
                    "{pod} was not enrolled on {node}:\n{}",
                    self.agent_log(node)
                )
            })
    }

    /// Waits until `pod` completes a (1-byte, checksummed) exchange with `dst`
    /// (certificates and config may take a moment after enrollment).
    pub fn wait_reachable(&self, pod: &str, dst: &str) -> anyhow::Result<()> {
        let app = bin_path("weft-testapp")?;
        wait_until(Duration::from_secs(10), || {
            self.run_app(pod, &app, &["client", "--connect", dst, "--bytes", "1"])
                .ok()?
                .0
                .then_some(())
        })
        .with_context(|| format!("{pod} cannot reach {dst}"))
    }

    /// The common two-pod topology: namespace `mesh` enrolled, `mesh/server`
    /// (app=server, a checksum server on :8080) on the second node and `mesh/client`
    /// (app=client) on the first, both enrolled and able to talk. Returns the server's
    /// `ip:8080`.
    pub fn mesh_pair(&mut self) -> anyhow::Result<String> {
        let nodes: Vec<String> = self.nodes.keys().cloned().collect();
        let (client_node, server_node) = (
            nodes.first().context("no node")?.clone(),
            nodes.last().context("no node")?.clone(),
        );
        self.namespace("mesh", true)?;
        let ip = self.add_pod("mesh", "server", &server_node, &[("app", "server")])?;
        self.add_pod("mesh", "client", &client_node, &[("app", "client")])?;
        let dst = format!("{ip}:8080");
        self.spawn_app(
            "mesh/server",
            &bin_path("weft-testapp")?,
            &["server", "--listen", &dst],
        )?;
        self.wait_enrolled(&server_node, "mesh/server")?;
        self.wait_enrolled(&client_node, "mesh/client")?;
        self.wait_reachable("mesh/client", &dst)?;
        Ok(dst)
    }

    /// Changes a pod's labels (its manifest is rewritten, as an API update would).
    pub fn relabel_pod(&mut self, key: &str, labels: &[(&str, &str)]) -> anyhow::Result<()> {
        let p = self.pods.get_mut(key).context("no such pod")?;
        p.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (text, file) = (
            Self::pod_manifest(p),
            format!("pod-{}-{}.yaml", p.namespace, p.name),
        );
        self.write_manifest(&file, &text)
    }

    /// Runs the CNI DEL chain (reverse order) for a pod, as the runtime does when
    /// the sandbox goes away.
    pub fn cni_del(&self, key: &str) -> anyhow::Result<()> {
        let p = self.pods.get(key).context("no such pod")?;
        let n = &self.nodes[&p.node];
        let args = format!(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID={}",
            p.namespace, p.name, p.container_id
        );
        let plugins = [
            json!({"type": "weft-cni", "agentSocket": n.dir.join("run/cni.sock").display().to_string()}),
            json!({"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
                   "ipam": {"type": "host-local", "subnet": format!("10.244.{}.0/24", n.index),
                            "dataDir": n.dir.join("ipam").display().to_string()}}),
        ];
        for conf in plugins {
            let mut conf = conf;
            conf["cniVersion"] = json!("1.0.0");
            conf["name"] = json!("podnet");
            cni_exec(&n.netns, &conf, "DEL", &p.container_id, &p.netns, &args)?;
        }
        Ok(())
    }

    /// Is something listening on `port` inside the pod's netns (127.0.0.1 or any)?
    pub fn pod_port_open(&self, key: &str, addr: &str) -> bool {
        let p = &self.pods[key];
        let Ok(w) = PodNetns::open(format!("/var/run/netns/{}", p.netns)) else {
            return false;
        };
        let Ok(addr) = addr.parse::<std::net::SocketAddr>() else {
            return false;
        };
        w.run(move || {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
        })
        .unwrap_or(false)
    }

    pub fn pod(&self, key: &str) -> &Pod {
        &self.pods[key]
    }

    /// The PID of `node`'s agent.
    pub fn agent_pid(&self, node: &str) -> anyhow::Result<u32> {
        self.nodes
            .get(node)
            .and_then(|n| n.agent.as_ref())
            .map(|p| p.pid())
            .with_context(|| format!("node {node} has no running agent"))
    }

    /// PIDs of the running node agents.
    pub fn agent_pids(&self) -> Vec<u32> {
        self.nodes
            .values()
            .filter_map(|n| n.agent.as_ref().map(|p| p.pid()))
            .collect()
    }

    /// Starts `program args` in the pod's netns and cgroup; returns its PID (the
    /// wrapper execs the program, so it is the program's own PID).
    pub fn spawn_app(&mut self, pod: &str, program: &Path, args: &[&str]) -> anyhow::Result<u32> {
        let p = self.pods.get(pod).context("no such pod")?;
        let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let mut cmd = Self::wrapped(&p.cgroup, &p.netns, program, &args);
        let log = self.dir.path().join(format!("app-{}.log", self.apps.len()));
        let proc = Proc::spawn(pod, &mut cmd, &log)?;
        let pid = proc.pid();
        self.apps.push(proc);
        Ok(pid)
    }

    /// Runs `program args` in the pod's netns and cgroup to completion.
    pub fn run_app(
        &self,
        pod: &str,
        program: &Path,
        args: &[&str],
    ) -> anyhow::Result<(bool, String, String)> {
        self.run_app_pinned(pod, program, args, None)
    }

    /// Like [`run_app`](Self::run_app), optionally pinned to one CPU (taskset).
    pub fn run_app_pinned(
        &self,
        pod: &str,
        program: &Path,
        args: &[&str],
        cpu: Option<usize>,
    ) -> anyhow::Result<(bool, String, String)> {
        let p = self.pods.get(pod).context("no such pod")?;
        let mut all: Vec<String> = Vec::new();
        let program = match cpu {
            Some(c) => {
                all.extend([
                    "-c".to_string(),
                    c.to_string(),
                    program.display().to_string(),
                ]);
                Path::new("/usr/bin/taskset")
            }
            None => program,
        };
        all.extend(args.iter().map(|s| s.to_string()));
        let out = Self::wrapped(&p.cgroup, &p.netns, program, &all)
            .stdin(Stdio::null())
            .output()?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }

    /// Names of what this cluster creates on the host, to check that teardown left
    /// nothing behind: (netns names, cgroup dir, pin dirs).
    pub fn footprint(&self) -> (Vec<String>, PathBuf, Vec<PathBuf>) {
        (
            self.netns.clone(),
            self.cgroup_root.clone(),
            self.nodes.values().map(|n| n.pin_dir.clone()).collect(),
        )
    }
}

/// Runs one CNI plugin (through the CNI protocol) inside `node_ns`.
pub fn cni_exec(
    node_ns: &str,
    conf: &Value,
    command: &str,
    container: &str,
    netns: &str,
    args: &str,
) -> anyhow::Result<Value> {
    let ty = conf["type"].as_str().context("plugin type")?;
    let program = if ty == "weft-cni" {
        bin_path("weft-cni")?
    } else {
        PathBuf::from(CNI_DIR).join(ty)
    };
    let mut child = Command::new("nsenter")
        .arg(format!("--net=/var/run/netns/{node_ns}"))
        .arg("--")
        .arg(&program)
        .env_clear()
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_NETNS", format!("/var/run/netns/{netns}"))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_ARGS", args)
        .env("CNI_PATH", CNI_DIR)
        .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running CNI plugin {}", program.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI {command} {ty} failed: {stdout} {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    if stdout.trim().is_empty() {
        return Ok(Value::Null);
    }
    serde_json::from_str(&stdout).with_context(|| format!("CNI {ty} output {stdout:?}"))
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        self.apps.clear(); // kills apps
        for n in self.nodes.values_mut() {
            if let Some(mut a) = n.agent.take() {
                a.kill();
            }
        }
        if let Some(mut cp) = self.control_plane.take() {
            cp.kill();
        }
        self.fabric_worker = None;
        for n in self.nodes.values() {
            if let Err(e) = weft_node_dataplane::Capture::uninstall(&n.pin_dir) {
                eprintln!("cleanup: {}: {e}", n.pin_dir.display());
            }
        }
        // Namespaces take their veths and bridges with them.
        for ns in self.netns.drain(..) {
            let _ = ip(&["netns", "del", &ns]);
        }
        teardown_cgroups(&self.cgroup_root);
    }
}

/// Kills whatever still runs in the cluster's own cgroup subtree (only processes the
/// test started live there, e.g. a client a failing test left behind), waits until
/// the subtree is empty, then removes it, leaves first.
fn teardown_cgroups(root: &Path) {
    if root.join("cgroup.kill").exists() {
        let _ = std::fs::write(root.join("cgroup.kill"), "1");
    }
    let empty = wait_until(Duration::from_secs(5), || {
        std::fs::read_to_string(root.join("cgroup.events"))
            .ok()?
            .lines()
            .any(|l| l == "populated 0")
            .then_some(())
    });
    if empty.is_none() && root.exists() {
        eprintln!("cleanup: processes remain in {}", root.display());
    }
    remove_cgroups(root);
}

/// Removes a cgroup subtree, leaves first.
fn remove_cgroups(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroups(&e.path());
            }
        }
    }
    for _ in 0..50 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("cleanup: cannot remove cgroup {}", dir.display());
}
