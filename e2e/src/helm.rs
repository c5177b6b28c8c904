//! Real Helm from the tests: the Helm v4 SDK of PyPI `helm-python-sdk` in a
//! virtualenv cached at ~/.cache/weft/venv (WEFT_VENV overrides), used both by the
//! chart's tests (charts/weft/tests, rendering and linting) and, through
//! `e2e/kube/helm_release.py`, for release actions against a real cluster.

use anyhow::{bail, Context};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// The virtualenv's packages (pinned).
pub const PACKAGES: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.3",
];

/// The virtualenv's directory.
pub fn venv_dir() -> PathBuf {
    if let Ok(v) = std::env::var("WEFT_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    Path::new(&home).join(".cache/weft/venv")
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}):\n{}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// The virtualenv's python, creating the virtualenv and installing
/// [`PACKAGES`] when they are not there yet.
pub fn venv_python() -> anyhow::Result<PathBuf> {
    let venv = venv_dir();
    let python = venv.join("bin/python");
    let stamp = venv.join(".weft-packages");
    let wanted = PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        if !python.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv))?;
        }
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PACKAGES))?;
        std::fs::write(&stamp, &wanted).with_context(|| format!("writing {}", stamp.display()))?;
    }
    Ok(python)
}

/// The chart in this repository.
pub fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft")
}

/// Release actions in one namespace of one cluster.
pub struct Helm {
    python: PathBuf,
    script: PathBuf,
    kubeconfig: PathBuf,
    pub namespace: String,
    /// Install and upgrade with server-side apply or not; `None`: Helm's default
    /// (Helm 4 installs server-side).
    pub server_side: Option<bool>,
}

impl Helm {
    pub fn new(kubeconfig: &Path, namespace: &str) -> anyhow::Result<Self> {
        Ok(Self {
            python: venv_python()?,
            script: Path::new(env!("CARGO_MANIFEST_DIR")).join("kube/helm_release.py"),
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
            server_side: None,
        })
    }

    /// Client-side apply, as `helm install --server-side=false`: what Kubernetes
    /// 1.20 to 1.22 need for weft's CRDs (their server-side apply refuses the
    /// `x-kubernetes-validations` fields they do not know; a create drops them).
    pub fn client_side(mut self) -> Self {
        self.server_side = Some(false);
        self
    }

    fn apply_args(&self) -> Vec<String> {
        match self.server_side {
            Some(ssa) => vec!["--server-side".into(), ssa.to_string()],
            None => Vec::new(),
        }
    }

    fn call(&self, args: &[&str], values: Option<&Value>) -> anyhow::Result<Value> {
        let file = match values {
            Some(v) => {
                let f = tempfile::Builder::new()
                    .prefix("weft-helm-values-")
                    .suffix(".json")
                    .tempfile()
                    .context("creating a values file")?;
                std::fs::write(f.path(), serde_json::to_vec_pretty(v)?)
                    .with_context(|| format!("writing {}", f.path().display()))?;
                Some(f)
            }
            None => None,
        };
        let mut cmd = Command::new(&self.python);
        cmd.arg(&self.script)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--namespace")
            .arg(&self.namespace)
            .args(args);
        if let Some(f) = &file {
            cmd.arg("--values").arg(f.path());
        }
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.script.display()))?;
        if !out.status.success() {
            bail!(
                "helm {} failed ({}): {}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        serde_json::from_slice(&out.stdout).with_context(|| {
            format!(
                "helm {}: not JSON: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stdout)
            )
        })
    }

    /// `helm install <release> <chart>` (creating the namespace), not waiting for
    /// the workloads; the release summary.
    pub fn install(
        &self,
        release: &str,
        chart: &Path,
        values: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.release_action("install", release, chart, values, timeout)
    }

    /// `helm upgrade <release> <chart>` with these values (not reused ones).
    pub fn upgrade(
        &self,
        release: &str,
        chart: &Path,
        values: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        self.release_action("upgrade", release, chart, values, timeout)
    }

    fn release_action(
        &self,
        action: &str,
        release: &str,
        chart: &Path,
        values: &Value,
        timeout: Duration,
    ) -> anyhow::Result<Value> {
        let chart = chart.display().to_string();
        let secs = timeout.as_secs().to_string();
        let mut args = vec![action, release, "--chart", &chart, "--timeout", &secs];
        let apply = self.apply_args();
        args.extend(apply.iter().map(String::as_str));
        self.call(&args, Some(values))
    }

    /// `helm uninstall <release>`, waiting (Helm's watcher) until its objects are
    /// gone (the pods of its workloads may still be terminating).
    pub fn uninstall(&self, release: &str, timeout: Duration) -> anyhow::Result<Value> {
        let secs = timeout.as_secs().to_string();
        self.call(
            &[
                "uninstall",
                release,
                "--timeout",
                &secs,
                "--wait",
                "watcher",
            ],
            None,
        )
    }

    /// `helm status <release>`.
    pub fn status(&self, release: &str) -> anyhow::Result<Value> {
        self.call(&["status", release], None)
    }
}
