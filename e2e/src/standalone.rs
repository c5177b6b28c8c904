//! A standalone mesh on loopback: one control plane on a manifest directory and
//! any number of node agents, each with its own credential.

use crate::process::{bin_path, free_port, http_get, wait_until, Proc};
use anyhow::{bail, Context};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

pub struct StandaloneMesh {
    pub dir: tempfile::TempDir,
    pub grpc_port: u16,
    pub admin_port: u16,
    pub extra_cp_args: Vec<String>,
    pub control_plane: Option<Proc>,
    pub nodes: BTreeMap<String, NodeAgent>,
    cp_starts: u32,
}

pub struct NodeAgent {
    pub admin_port: u16,
    pub proc: Option<Proc>,
}

impl StandaloneMesh {
    /// A mesh whose config directory starts as a copy of `manifests` (if given).
    pub fn new(manifests: Option<&Path>, extra_cp_args: &[&str]) -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("weft-e2e-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("config"))?;
        if let Some(src) = manifests {
            for e in std::fs::read_dir(src).with_context(|| format!("reading {}", src.display()))? {
                let e = e?;
                std::fs::copy(e.path(), dir.path().join("config").join(e.file_name()))?;
            }
        }
        Ok(Self {
            dir,
            grpc_port: free_port(),
            admin_port: free_port(),
            extra_cp_args: extra_cp_args.iter().map(|s| s.to_string()).collect(),
            control_plane: None,
            nodes: BTreeMap::new(),
            cp_starts: 0,
        })
    }

    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }
    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
    pub fn credential_dir(&self, node: &str) -> PathBuf {
        self.dir.path().join("credentials").join(node)
    }
    pub fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }
    pub fn cp_admin(&self) -> String {
        format!("127.0.0.1:{}", self.admin_port)
    }
    pub fn node_admin(&self, node: &str) -> String {
        format!(
            "127.0.0.1:{}",
            self.nodes.get(node).map(|n| n.admin_port).unwrap_or(0)
        )
    }

    pub fn write_manifest(&self, name: &str, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.path().join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, self.config_dir().join(name))?;
        Ok(())
    }
    pub fn remove_manifest(&self, name: &str) -> anyhow::Result<()> {
        std::fs::remove_file(self.config_dir().join(name))?;
        Ok(())
    }

    pub fn start_control_plane(&mut self) -> anyhow::Result<()> {
        let mut cmd = Command::new(bin_path("weft-control-plane")?);
        cmd.args(["run", "--config-dir"])
            .arg(self.config_dir())
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(["--grpc-addr", &format!("127.0.0.1:{}", self.grpc_port)])
            .args(["--admin-addr", &self.cp_admin()])
            .args(&self.extra_cp_args);
        self.cp_starts += 1;
        let log = self
            .dir
            .path()
            .join(format!("control-plane-{}.log", self.cp_starts));
        self.control_plane = Some(Proc::spawn("control-plane", &mut cmd, &log)?);
        let admin = self.cp_admin();
        wait_until(Duration::from_secs(20), || {
            http_get(&admin, "/healthz/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .with_context(|| format!("control plane not ready; log:\n{}", self.cp_log()))?;
        Ok(())
    }

    pub fn cp_log(&self) -> String {
        self.control_plane
            .as_ref()
            .map(|p| p.log_text())
            .unwrap_or_default()
    }

    pub fn kill_control_plane(&mut self) {
        if let Some(mut p) = self.control_plane.take() {
            p.kill();
        }
    }

    /// Creates the node's credential (once) with the documented command.
    pub fn create_credential(&self, node: &str) -> anyhow::Result<PathBuf> {
        self.create_credential_with(node, &[])
    }

    /// Creates the node's credential (once), with more `node-credential` arguments.
    pub fn create_credential_with(&self, node: &str, extra: &[&str]) -> anyhow::Result<PathBuf> {
        let out = self.credential_dir(node);
        if out.join("node.crt").exists() {
            return Ok(out);
        }
        let status = Command::new(bin_path("weft-control-plane")?)
            .args(["node-credential", "--node", node, "--state-dir"])
            .arg(self.state_dir())
            .arg("--out")
            .arg(&out)
            .args(extra)
            .args(
                self.extra_cp_args
                    .iter()
                    .filter(|a| a.starts_with("--trust-domain")),
            )
            .env("NO_COLOR", "1")
            .output()?;
        if !status.status.success() {
            bail!(
                "node-credential failed: {}",
                String::from_utf8_lossy(&status.stderr)
            );
        }
        Ok(out)
    }

    /// `weft-control-plane revoke-node-credential` with these arguments.
    pub fn revoke_credential(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(bin_path("weft-control-plane")?)
            .arg("revoke-node-credential")
            .arg("--state-dir")
            .arg(self.state_dir())
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "revoke-node-credential failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    pub fn start_node(&mut self, node: &str) -> anyhow::Result<()> {
        let cred = self.create_credential(node)?;
        let port = self
            .nodes
            .get(node)
            .map(|n| n.admin_port)
            .unwrap_or_else(free_port);
        let mut cmd = Command::new(bin_path("weft-node")?);
        cmd.args(["run", "--node", node, "--control-plane", &self.grpc_url()])
            .arg("--credential-dir")
            .arg(&cred)
            .args(["--admin-addr", &format!("127.0.0.1:{port}")])
            .args(["--metrics-addr", "off"]);
        let log = self.dir.path().join(format!("node-{node}.log"));
        let proc = Proc::spawn(&format!("node {node}"), &mut cmd, &log)?;
        self.nodes.insert(
            node.to_string(),
            NodeAgent {
                admin_port: port,
                proc: Some(proc),
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

    /// `/config_dump` of a node.
    pub fn config_dump(&self, node: &str) -> anyhow::Result<serde_json::Value> {
        crate::process::fetch_config_dump(&self.node_admin(node), node)
    }

    /// Waits until `f(config_dump)` holds on `node`.
    pub fn wait_node(
        &self,
        node: &str,
        timeout: Duration,
        what: &str,
        f: impl FnMut(&serde_json::Value) -> bool,
    ) -> anyhow::Result<serde_json::Value> {
        crate::process::wait_config_dump(&self.node_admin(node), node, timeout, what, f, || {
            format!(
                "node log:\n{}\ncontrol plane log:\n{}",
                self.node_log(node),
                self.cp_log()
            )
        })
    }

    pub fn cp_status(&self) -> anyhow::Result<serde_json::Value> {
        let (_, body) = http_get(&self.cp_admin(), "/debug/status")?;
        Ok(serde_json::from_str(&body)?)
    }

    pub fn cp_metrics(&self) -> anyhow::Result<String> {
        Ok(http_get(&self.cp_admin(), "/metrics")?.1)
    }
}

/// Keys of a config dump section (`workloads`, `services`, `policies`, ...).
pub fn keys(dump: &serde_json::Value, section: &str) -> Vec<String> {
    dump[section]
        .as_object()
        .map(|m| m.keys().cloned().collect())
        .unwrap_or_default()
}

/// SPIFFE IDs of the certificates in a config dump.
pub fn cert_ids(dump: &serde_json::Value) -> Vec<String> {
    dump["certificates"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|c| c["spiffe_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}
