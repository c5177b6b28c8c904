//! weft in Kubernetes mode against a real API server ([`KubeApi`]): CRDs applied
//! from `crds/`, objects created from YAML (Pods get their `status` patched in, as
//! a kubelet would), control-plane replicas and node agents as processes. Node
//! agents authenticate with real projected-style ServiceAccount tokens (TokenRequest
//! bound to the agent's pod).

use crate::kubeapi::KubeApi;
use crate::process::{bin_path, free_port, http_get, wait_until, Proc};
use anyhow::{bail, Context};
use k8s_openapi::api::authentication::v1::{BoundObjectReference, TokenRequest, TokenRequestSpec};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub const NAMESPACE: &str = "weft-system";
pub const NODE_SA: &str = "weft-node";
/// The node-token audience the control plane expects by default.
pub const AUDIENCE: &str = weft_control_plane::k8s::token_review::DEFAULT_AUDIENCE;

pub struct ControlPlane {
    pub proc: Option<Proc>,
    pub grpc_port: u16,
    pub admin_port: u16,
}

pub struct NodeAgent {
    pub proc: Option<Proc>,
    pub admin_port: u16,
}

pub struct KubeMesh {
    /// Dropped last: the API server outlives the processes that talk to it.
    pub dir: tempfile::TempDir,
    pub control_planes: BTreeMap<String, ControlPlane>,
    pub nodes: BTreeMap<String, NodeAgent>,
    pub api: KubeApi,
}

impl Drop for KubeMesh {
    fn drop(&mut self) {
        self.nodes.clear();
        self.control_planes.clear();
    }
}

/// The API resource of a kind weft's tests create.
fn resource(api_version: &str, kind: &str) -> anyhow::Result<(ApiResource, bool)> {
    let (group, version) = match api_version.split_once('/') {
        Some((g, v)) => (g, v),
        None => ("", api_version),
    };
    let (plural, namespaced) = match kind {
        "Namespace" => ("namespaces", false),
        "Pod" => ("pods", true),
        "Service" => ("services", true),
        "ServiceAccount" => ("serviceaccounts", true),
        "ConfigMap" => ("configmaps", true),
        "AuthorizationPolicy" => ("authorizationpolicies", true),
        "WasmPlugin" => ("wasmplugins", true),
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        other => bail!("the test harness cannot create kind {other}"),
    };
    Ok((
        ApiResource {
            group: group.into(),
            version: version.into(),
            api_version: api_version.into(),
            kind: kind.into(),
            plural: plural.into(),
        },
        namespaced,
    ))
}

fn api_for(client: &Client, o: &DynamicObject) -> anyhow::Result<Api<DynamicObject>> {
    let t = o.types.as_ref().context("object without apiVersion/kind")?;
    let (ar, namespaced) = resource(&t.api_version, &t.kind)?;
    Ok(if namespaced {
        let ns = o.metadata.namespace.as_deref().unwrap_or("default");
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

/// Creates (or replaces) every document of `yaml`. A Pod's
/// `status` is then patched in with phase Running, as a kubelet would report it.
pub async fn apply_yaml(client: &Client, yaml: &str) -> anyhow::Result<()> {
    for doc in serde_yaml::Deserializer::from_str(yaml) {
        let value = serde_json::Value::deserialize(doc)?;
        if value.is_null() {
            continue;
        }
        let mut o: DynamicObject = serde_json::from_value(value.clone())?;
        o.metadata.uid = None;
        let api = api_for(client, &o)?;
        let name = o.metadata.name.clone().context("object without a name")?;
        // Create, or replace what exists. (Not server-side apply: 1.20's drops empty
        // objects such as `rules: [{}]` and a CRD's `subresources: {status: {}}`.)
        match api.create(&PostParams::default(), &o).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let current = api.get(&name).await?;
                o.metadata.resource_version = current.metadata.resource_version;
                api.replace(&name, &PostParams::default(), &o)
                    .await
                    .with_context(|| format!("replacing {name}"))?;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("creating {name}"))),
        }
        if o.types.as_ref().is_some_and(|t| t.kind == "Pod") {
            if let Some(status) = value.get("status") {
                let mut status = status.clone();
                status["phase"] = "Running".into();
                if let Some(ip) = status.get("podIP").cloned() {
                    status["podIPs"] = serde_json::json!([{ "ip": ip }]);
                }
                api.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(serde_json::json!({ "status": status })),
                )
                .await
                .with_context(|| format!("patching the status of pod {name}"))?;
            }
        }
    }
    Ok(())
}

/// Applies weft's CRDs from `crds/` and waits until they are Established.
pub async fn install_crds(client: &Client) -> anyhow::Result<()> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    let mut names = Vec::new();
    for e in std::fs::read_dir(&dir)? {
        let text = std::fs::read_to_string(e?.path())?;
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text)?;
        names.push(crd.metadata.name.clone().unwrap_or_default());
        apply_yaml(client, &text).await?;
    }
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in names {
        let mut ok = false;
        for _ in 0..100 {
            let crd = api.get(&name).await?;
            ok = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if !ok {
            bail!("CRD {name} not Established");
        }
    }
    Ok(())
}

/// A ServiceAccount token for `sa`, bound to `pod` (both in `ns`), for `audience`.
pub async fn bound_token(
    client: &Client,
    ns: &str,
    sa: &str,
    pod: &str,
    audience: &str,
) -> anyhow::Result<String> {
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), ns);
    let uid = pods.get(pod).await?.metadata.uid.unwrap_or_default();
    let req = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.to_string()],
            bound_object_ref: Some(BoundObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(pod.into()),
                uid: Some(uid),
            }),
            expiration_seconds: Some(3600),
        },
        ..Default::default()
    };
    let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> = Api::namespaced(client.clone(), ns);
    let out: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await
        .with_context(|| format!("TokenRequest for {ns}/{sa} bound to pod {pod}"))?;
    out.status
        .map(|s| s.token)
        .context("TokenRequest returned no token")
}

impl KubeMesh {
    /// Starts the API server and installs the CRDs and weft's namespace.
    pub async fn new() -> anyhow::Result<Self> {
        let api = tokio::task::spawn_blocking(KubeApi::start).await??;
        let m = Self {
            dir: tempfile::Builder::new().prefix("weft-kmesh-").tempdir()?,
            control_planes: BTreeMap::new(),
            nodes: BTreeMap::new(),
            api,
        };
        let c = m.client().await?;
        install_crds(&c).await?;
        apply_yaml(
            &c,
            &format!("apiVersion: v1\nkind: Namespace\nmetadata: {{name: {NAMESPACE}}}\n---\napiVersion: v1\nkind: ServiceAccount\nmetadata: {{name: {NODE_SA}, namespace: {NAMESPACE}}}\n"),
        )
        .await?;
        Ok(m)
    }

    pub async fn client(&self) -> anyhow::Result<Client> {
        self.api.client().await
    }

    /// Starts a control-plane replica named `name` (its Lease identity).
    pub fn start_control_plane(&mut self, name: &str) -> anyhow::Result<()> {
        let (grpc_port, admin_port) = match self.control_planes.get(name) {
            Some(c) => (c.grpc_port, c.admin_port),
            None => (free_port(), free_port()),
        };
        let state = self.dir.path().join(format!("state-{name}"));
        let mut cmd = Command::new(bin_path("weft-control-plane")?);
        cmd.args(["run", "--kubernetes", "--kubeconfig"])
            .arg(self.api.kubeconfig())
            .args(["--namespace", NAMESPACE, "--identity", name])
            .arg("--state-dir")
            .arg(&state)
            .args(["--grpc-addr", &format!("127.0.0.1:{grpc_port}")])
            .args(["--admin-addr", &format!("127.0.0.1:{admin_port}")]);
        let log = self.dir.path().join(format!("cp-{name}.log"));
        let proc = Proc::spawn(&format!("control plane {name}"), &mut cmd, &log)?;
        self.control_planes.insert(
            name.to_string(),
            ControlPlane {
                proc: Some(proc),
                grpc_port,
                admin_port,
            },
        );
        Ok(())
    }

    pub fn cp_admin(&self, name: &str) -> String {
        format!(
            "127.0.0.1:{}",
            self.control_planes
                .get(name)
                .map(|c| c.admin_port)
                .unwrap_or(0)
        )
    }

    pub fn grpc_url(&self, name: &str) -> String {
        format!(
            "https://127.0.0.1:{}",
            self.control_planes
                .get(name)
                .map(|c| c.grpc_port)
                .unwrap_or(0)
        )
    }

    pub fn cp_log(&self, name: &str) -> String {
        self.control_planes
            .get(name)
            .and_then(|c| c.proc.as_ref())
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    pub fn cp_running(&mut self, name: &str) -> bool {
        self.control_planes
            .get_mut(name)
            .and_then(|c| c.proc.as_mut())
            .is_some_and(|p| p.is_running())
    }

    /// SIGKILL, as a crash or a lost node would.
    pub fn kill_control_plane(&mut self, name: &str) {
        if let Some(mut p) = self
            .control_planes
            .get_mut(name)
            .and_then(|c| c.proc.take())
        {
            p.kill();
        }
    }

    pub fn wait_cp_ready(&self, name: &str, timeout: Duration) -> anyhow::Result<()> {
        let addr = self.cp_admin(name);
        wait_until(timeout, || {
            http_get(&addr, "/healthz/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .with_context(|| {
            format!(
                "control plane {name} not ready within {timeout:?}; log:\n{}",
                self.cp_log(name)
            )
        })?;
        Ok(())
    }

    /// 1 if replica `name` reports itself leader, 0 if not, None if unreachable.
    pub fn is_leader(&self, name: &str) -> Option<bool> {
        let (_, body) = http_get(&self.cp_admin(name), "/metrics").ok()?;
        body.lines()
            .find(|l| l.starts_with("weft_cp_leader "))
            .map(|l| l.ends_with(" 1"))
    }

    /// Directory with the trust bundle (`ca.crt`) and the node agent's token.
    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("nodes").join(node)
    }

    /// Creates the node agent's pod (SA weft-node, on `node`), mints its bound
    /// token and copies the trust bundle from the `weft-ca-root-cert` ConfigMap.
    pub async fn prepare_node(&self, node: &str) -> anyhow::Result<PathBuf> {
        let c = self.client().await?;
        let pod = format!("weft-node-{node}");
        apply_yaml(
            &c,
            &format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {pod}, namespace: {NAMESPACE}}}\nspec:\n  nodeName: {node}\n  serviceAccountName: {NODE_SA}\n  hostNetwork: true\n  containers: [{{name: agent, image: weft/node}}]\n"),
        )
        .await?;
        let token = bound_token(&c, NAMESPACE, NODE_SA, &pod, AUDIENCE).await?;
        let dir = self.node_dir(node);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("token"), token)?;
        let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(c, NAMESPACE);
        let mut bundle = None;
        for _ in 0..100 {
            if let Some(cm) = cms.get_opt("weft-ca-root-cert").await? {
                bundle = cm.data.and_then(|d| d.get("root-cert.pem").cloned());
                if bundle.is_some() {
                    break;
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let bundle =
            bundle.context("the weft-ca-root-cert ConfigMap did not appear in weft-system")?;
        std::fs::write(dir.join("ca.crt"), bundle)?;
        Ok(dir)
    }

    /// Starts a node agent (no capture) that talks to control plane `cp`.
    pub fn start_node(&mut self, node: &str, cp: &str) -> anyhow::Result<()> {
        let dir = self.node_dir(node);
        let port = free_port();
        let mut cmd = Command::new(bin_path("weft-node")?);
        cmd.args(["run", "--node", node, "--control-plane", &self.grpc_url(cp)])
            .arg("--credential-dir")
            .arg(&dir)
            .arg("--token-file")
            .arg(dir.join("token"))
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", "off"]);
        let log = self.dir.path().join(format!("node-{node}.log"));
        let proc = Proc::spawn(&format!("node {node}"), &mut cmd, &log)?;
        self.nodes.insert(
            node.to_string(),
            NodeAgent {
                proc: Some(proc),
                admin_port: port,
            },
        );
        Ok(())
    }

    pub fn node_log(&self, node: &str) -> String {
        self.nodes
            .get(node)
            .and_then(|n| n.proc.as_ref())
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    fn node_admin(&self, node: &str) -> String {
        format!(
            "127.0.0.1:{}",
            self.nodes.get(node).map(|n| n.admin_port).unwrap_or(0)
        )
    }

    pub fn config_dump(&self, node: &str) -> anyhow::Result<serde_json::Value> {
        crate::process::fetch_config_dump(&self.node_admin(node), node)
    }

    /// Waits until node `node`'s config dump satisfies `f`.
    pub fn wait_node(
        &self,
        node: &str,
        timeout: Duration,
        what: &str,
        f: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        crate::process::wait_config_dump(&self.node_admin(node), node, timeout, what, f, || {
            let cps: Vec<String> = self
                .control_planes
                .keys()
                .map(|n| format!("control plane {n} log:\n{}", self.cp_log(n)))
                .collect();
            format!("node log:\n{}\n{}", self.node_log(node), cps.join("\n"))
        })
    }
}
