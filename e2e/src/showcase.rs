//! The showcase mesh: the topology and traffic of `make demo`, also used by the
//! dashboard test (so the demo and the dashboards are proven on the same flows).
//!
//! - node-a: `shop/web` and `shop/ops` (namespace `shop` enrolled), `legacy/batch`
//!   (namespace `legacy` not enrolled).
//! - node-b: `payments/ledger` (a TCP checksum server on :9090, behind the Service
//!   `payments/ledger` at 10.96.0.60:9090) and `payments/api` (HTTP on :8080).
//! - Policies: only `shop/web` may reach the ledger (L4); the api accepts GET from
//!   namespace `shop` and never serves `/admin` (L7). The C example Wasm plugin guards
//!   the api's `/private` paths: only `shop/ops` may read them.
//!
//! Agents log in JSON, so each flow can be shown with the access-log records both
//! node proxies wrote for it.

use crate::cluster::LocalCluster;
use crate::curl::{curl, Reply};
use crate::{bin_path, plugin_path, wait_until};
use anyhow::Context;
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

pub const LEDGER_VIP: &str = "10.96.0.60:9090";
pub const API_VIP: &str = "10.96.0.61:80";

const NAMESPACES: &[(&str, bool)] = &[("shop", true), ("payments", true), ("legacy", false)];

/// (namespace, name, node)
const PODS: &[(&str, &str, &str)] = &[
    ("payments", "ledger", "node-b"),
    ("payments", "api", "node-b"),
    ("shop", "web", "node-a"),
    ("shop", "ops", "node-a"),
    ("legacy", "batch", "node-a"),
];

const POLICIES: &str = r#"apiVersion: v1
kind: Service
metadata: {name: ledger, namespace: payments}
spec:
  clusterIP: 10.96.0.60
  selector: {app: ledger}
  ports: [{name: tcp-ledger, port: 9090, targetPort: 9090}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: payments}
spec:
  clusterIP: 10.96.0.61
  selector: {app: api}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: ledger-allow-web, namespace: payments}
spec:
  selector: {matchLabels: {app: ledger}}
  action: ALLOW
  rules:
    - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
      to: [{operation: {ports: ["9090"]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-allow-shop-reads, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  action: ALLOW
  rules:
    - from: [{source: {namespaces: ["shop"]}}]
      to: [{operation: {methods: ["GET"]}}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: api-deny-admin, namespace: payments}
spec:
  selector: {matchLabels: {app: api}}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin", "/admin/*"]}}]
"#;

fn plugin_manifest(module: &std::path::Path) -> String {
    format!(
        "apiVersion: extensions.weft.dev/v1alpha1\nkind: WasmPlugin\n\
         metadata: {{name: private-gate, namespace: payments}}\n\
         spec:\n  selector: {{matchLabels: {{app: api}}}}\n  url: file://{}\n  phase: AUTHZ\n\
         \x20 pluginConfig: {{protectedPrefix: /private, allowedPeers: [\"spiffe://cluster.local/ns/shop/sa/ops\"], header: x-weft-plugin, value: private-gate}}\n",
        module.display()
    )
}

pub struct Showcase {
    pub cluster: LocalCluster,
    /// Pod IP by `namespace/name`.
    pub ips: BTreeMap<String, String>,
    app: PathBuf,
    /// How far each node's agent log was read (access records).
    log_offsets: BTreeMap<String, usize>,
}

/// What a flow is meant to show.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    Allowed,
    Denied,
    Status(u16),
}

#[derive(Debug, Clone)]
pub struct Flow {
    pub from: &'static str,
    pub title: &'static str,
    pub kind: FlowKind,
    pub expect: Expect,
}

#[derive(Debug, Clone)]
pub enum FlowKind {
    /// 1 MiB through the checksum server at this address.
    Tcp(String),
    /// An HTTP request: method and URL.
    Http(&'static str, String),
}

/// What happened to a flow, and the access records both proxies wrote for it.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub flow: Flow,
    /// TCP: the exchange completed with a correct checksum.
    pub delivered: bool,
    pub reply: Option<Reply>,
    /// `(node, record)`.
    pub records: Vec<(String, Value)>,
}

impl Outcome {
    pub fn as_expected(&self) -> bool {
        match self.flow.expect {
            Expect::Allowed => self.delivered,
            Expect::Denied => !self.delivered,
            Expect::Status(s) => self.reply.as_ref().is_some_and(|r| r.status == s),
        }
    }
}

impl Showcase {
    /// Builds the topology and waits until every pod is enrolled and reachable.
    pub fn start() -> anyhow::Result<Self> {
        let app = bin_path("weft-testapp")?;
        let module = plugin_path("peer_gate_c")?;
        let mut c = LocalCluster::with_args(&["node-a", "node-b"], &[], &["--log-format", "json"])?;
        for (ns, enrolled) in NAMESPACES {
            c.namespace(ns, *enrolled)?;
        }
        c.write_manifest("showcase.yaml", POLICIES)?;
        c.write_manifest("showcase-plugin.yaml", &plugin_manifest(&module))?;
        let mut ips = BTreeMap::new();
        for (ns, name, node) in PODS {
            let ip = c.add_pod(ns, name, node, &[("app", name)])?;
            ips.insert(format!("{ns}/{name}"), ip);
        }
        for (ns, name, node) in PODS {
            if *ns != "legacy" {
                c.wait_enrolled(node, &format!("{ns}/{name}"))?;
            }
        }
        let ledger = format!("{}:9090", ips["payments/ledger"]);
        c.spawn_app("payments/ledger", &app, &["server", "--listen", &ledger])?;
        c.spawn_app("payments/api", &app, &["http", "--listen", "0.0.0.0:8080"])?;
        let mut s = Self {
            cluster: c,
            ips,
            app,
            log_offsets: BTreeMap::new(),
        };
        // Certificates, policies and the plugin module reach the nodes shortly after
        // enrollment: wait for the flows that need each of them.
        s.cluster.wait_reachable("shop/web", LEDGER_VIP)?;
        // The plugin's module is fetched from the control plane; until it is loaded the
        // plugin (FAIL_CLOSE) answers 503.
        wait_until(Duration::from_secs(20), || {
            let d = s.cluster.config_dump("node-b").ok()?;
            d["proxy"]["wasm_plugins"]
                .as_array()?
                .iter()
                .any(|p| {
                    p["plugin"] == "payments/private-gate"
                        && p["load_error"].is_null()
                        && !p["abi"].is_null()
                })
                .then_some(())
        })
        .context("the Wasm plugin payments/private-gate was not loaded on node-b")?;
        let api = s.api_url("/api/orders");
        wait_until(Duration::from_secs(20), || {
            let r = curl(&s.cluster, "shop/ops", &[], &s.api_url("/private/report")).ok()?;
            let ok = r.status == 200 && r.header("x-weft-plugin").is_some();
            (ok && curl(&s.cluster, "shop/web", &[], &api).ok()?.status == 200).then_some(())
        })
        .context("the api (L7 policy and Wasm plugin) did not become ready")?;
        s.skip_logs();
        Ok(s)
    }

    pub fn api_url(&self, path: &str) -> String {
        format!("http://{API_VIP}{path}")
    }

    /// The flows the demo shows and the dashboard test drives.
    pub fn flows(&self) -> Vec<Flow> {
        let ledger_pod = format!("{}:9090", self.ips["payments/ledger"]);
        vec![
            Flow {
                from: "shop/web",
                title: "shop/web -> Service payments/ledger (TCP)",
                kind: FlowKind::Tcp(LEDGER_VIP.into()),
                expect: Expect::Allowed,
            },
            Flow {
                from: "legacy/batch",
                title: "legacy/batch (namespace not in the mesh) -> payments/ledger (TCP)",
                kind: FlowKind::Tcp(ledger_pod),
                expect: Expect::Denied,
            },
            Flow {
                from: "shop/web",
                title: "shop/web -> GET /api/orders on payments/api",
                kind: FlowKind::Http("GET", self.api_url("/api/orders")),
                expect: Expect::Status(200),
            },
            Flow {
                from: "shop/web",
                title: "shop/web -> GET /admin/users on payments/api",
                kind: FlowKind::Http("GET", self.api_url("/admin/users")),
                expect: Expect::Status(403),
            },
            Flow {
                from: "shop/web",
                title: "shop/web -> POST /api/orders on payments/api",
                kind: FlowKind::Http("POST", self.api_url("/api/orders")),
                expect: Expect::Status(403),
            },
            Flow {
                from: "shop/web",
                title: "shop/web -> GET /private/report (Wasm plugin private-gate)",
                kind: FlowKind::Http("GET", self.api_url("/private/report")),
                expect: Expect::Status(403),
            },
            Flow {
                from: "shop/ops",
                title: "shop/ops -> GET /private/report (Wasm plugin private-gate)",
                kind: FlowKind::Http("GET", self.api_url("/private/report")),
                expect: Expect::Status(200),
            },
        ]
    }

    /// Runs one flow and collects the access records it produced.
    pub fn run(&mut self, flow: &Flow) -> anyhow::Result<Outcome> {
        self.skip_logs();
        let (delivered, reply, expected_records) = match &flow.kind {
            FlowKind::Tcp(addr) => {
                let (ok, _, _) = self.cluster.run_app(
                    flow.from,
                    &self.app,
                    &["client", "--connect", addr, "--bytes", "1048576"],
                )?;
                (ok, None, 2)
            }
            FlowKind::Http(method, url) => {
                let r = curl(&self.cluster, flow.from, &["-X", method], url)?;
                (r.status < 400, Some(r), 3)
            }
        };
        // The destination proxy logs when its side of the connection ends, a moment
        // after the client returns.
        let mut records = Vec::new();
        wait_until(Duration::from_secs(2), || {
            records.extend(self.new_records());
            (records.len() >= expected_records).then_some(())
        });
        Ok(Outcome {
            flow: flow.clone(),
            delivered,
            reply,
            records,
        })
    }

    /// Every flow once.
    pub fn run_all(&mut self) -> anyhow::Result<Vec<Outcome>> {
        self.flows().iter().map(|f| self.run(f)).collect()
    }

    fn skip_logs(&mut self) {
        let _ = self.new_records();
    }

    /// Access records written since the last call, from both agents' logs.
    fn new_records(&mut self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        for (name, node) in &self.cluster.nodes {
            let Some(agent) = &node.agent else { continue };
            let text = agent.log_text();
            let from = self.log_offsets.get(name).copied().unwrap_or(0);
            let Some(new) = text.get(from..) else {
                continue;
            };
            // Only whole lines: a record may be half written.
            let end = new.rfind('\n').map(|i| i + 1).unwrap_or(0);
            for line in new[..end].lines() {
                if let Ok(v) = serde_json::from_str::<Value>(line) {
                    if v["target"] == crate::showcase::ACCESS_TARGET {
                        out.push((name.clone(), v));
                    }
                }
            }
            self.log_offsets.insert(name.clone(), from + end);
        }
        out
    }
}

/// The access log's tracing target (`weft_node_dataplane::testing::ACCESS_LOG_TARGET`).
pub const ACCESS_TARGET: &str = weft_node_dataplane::testing::ACCESS_LOG_TARGET;
