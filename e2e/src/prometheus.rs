//! A real Prometheus scraping a [`LocalCluster`]: the control plane and every node
//! agent, every second, from the cluster's fabric network. The binary is Debian's
//! `prometheus` (on PATH, or unpacked by `.ci/setup` into
//! `~/.cache/weft/prometheus`; `WEFT_PROMETHEUS` overrides). Queries go through
//! Prometheus' HTTP API. The process is killed (by PID) and its data removed on drop.

use crate::cluster::LocalCluster;
use crate::process::{wait_until, Proc};
use anyhow::{bail, Context};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

/// Where Prometheus listens, inside the fabric network namespace.
pub const LISTEN: &str = "127.0.0.1:9090";

/// The Prometheus binary, or why there is none.
pub fn binary() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("WEFT_PROMETHEUS") {
        return Ok(PathBuf::from(p));
    }
    for dir in std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
    {
        let p = dir.join("prometheus");
        if p.is_file() {
            return Ok(p);
        }
    }
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    let p = cache.join("weft/prometheus/usr/bin/prometheus");
    if p.is_file() {
        return Ok(p);
    }
    bail!(
        "prometheus not found (looked at $WEFT_PROMETHEUS, PATH and {}); run ./.ci/setup (make test does)",
        p.display()
    )
}

pub struct Prometheus {
    proc: Proc,
    pub dir: PathBuf,
}

/// The scrape configuration for `c`: job `weft-control-plane` and job `weft-node`,
/// each node's target labelled `node=<name>` as the chart's PodMonitor does.
pub fn scrape_config(c: &LocalCluster) -> String {
    let mut nodes = String::new();
    for name in c.nodes.keys() {
        if let Some(ip) = c.node_ip(name) {
            nodes.push_str(&format!(
                "      - targets: [\"{ip}:15020\"]\n        labels: {{node: {name}}}\n"
            ));
        }
    }
    format!(
        "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\n\
         scrape_configs:\n\
         \x20 - job_name: weft-control-plane\n\
         \x20   static_configs:\n\
         \x20     - targets: [\"{}\"]\n\
         \x20 - job_name: weft-node\n\
         \x20   static_configs:\n{nodes}",
        c.control_plane_admin()
    )
}

impl Prometheus {
    /// Starts Prometheus in `c`'s fabric network and waits until it is ready.
    pub fn start(c: &LocalCluster) -> anyhow::Result<Self> {
        let bin = binary()?;
        let dir = c.dir.path().join("prometheus");
        std::fs::create_dir_all(dir.join("data"))?;
        let config = dir.join("prometheus.yml");
        std::fs::write(&config, scrape_config(c))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", c.fabric_netns()))
            .arg("--")
            .arg(bin)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address={LISTEN}"))
            .arg("--storage.tsdb.retention.time=1h")
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", &mut cmd, &dir.join("prometheus.log"))?;
        let p = Self { proc, dir };
        wait_until(Duration::from_secs(30), || {
            c.fabric_http(LISTEN, "/-/ready")
                .ok()
                .filter(|(s, _)| *s == 200)
        })
        .with_context(|| format!("prometheus not ready:\n{}", p.proc.log_text()))?;
        Ok(p)
    }

    pub fn log(&self) -> String {
        self.proc.log_text()
    }

    /// GET an API path with query parameters; returns `data` of a success answer.
    pub fn api(
        &self,
        c: &LocalCluster,
        path: &str,
        params: &[(&str, &str)],
    ) -> anyhow::Result<Value> {
        let query: String = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(params)
            .finish();
        let (status, body) = c.fabric_http(LISTEN, &format!("{path}?{query}"))?;
        let v: Value = serde_json::from_str(&body)
            .with_context(|| format!("{path} answered {status}: {body}"))?;
        if v["status"] != "success" {
            bail!(
                "{path} {params:?}: {} {}",
                v["errorType"].as_str().unwrap_or(""),
                v["error"].as_str().unwrap_or(&body)
            );
        }
        Ok(v["data"].clone())
    }

    /// An instant query: the result vector (or scalar) as JSON.
    pub fn query(&self, c: &LocalCluster, expr: &str) -> anyhow::Result<Value> {
        self.api(c, "/api/v1/query", &[("query", expr)])
    }

    /// Scrape targets and their health (`up` / `down`), by scrape URL.
    pub fn targets(&self, c: &LocalCluster) -> anyhow::Result<Vec<(String, String, String)>> {
        let d = self.api(c, "/api/v1/targets", &[("state", "active")])?;
        Ok(d["activeTargets"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|t| {
                (
                    t["scrapeUrl"].as_str().unwrap_or("").to_string(),
                    t["health"].as_str().unwrap_or("").to_string(),
                    t["lastError"].as_str().unwrap_or("").to_string(),
                )
            })
            .collect())
    }

    /// Values of `label` on series matching `selector` (Grafana's `label_values`).
    pub fn label_values(
        &self,
        c: &LocalCluster,
        label: &str,
        selector: &str,
    ) -> anyhow::Result<Vec<String>> {
        let d = self.api(
            c,
            &format!("/api/v1/label/{label}/values"),
            &[("match[]", selector)],
        )?;
        Ok(d.as_array()
            .into_iter()
            .flatten()
            .filter_map(|v| v.as_str().map(str::to_string))
            .collect())
    }
}
