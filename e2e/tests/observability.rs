//! Observability on a live mesh (the showcase topology of `make demo`): the access
//! log records each flow with identities, decision and policy, and never a secret;
//! a real Prometheus scrapes the control plane and both nodes; every query of every
//! Grafana dashboard in charts/weft/dashboards parses and returns data with its
//! template variables set to real values; every exported metric is documented.
//! Root; runs in CI.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;
use weft_e2e::curl::curl;
use weft_e2e::netlab::require_root;
use weft_e2e::prometheus::Prometheus;
use weft_e2e::showcase::{Expect, Outcome, Showcase};
use weft_e2e::wait_until;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const LEDGER: &str = "spiffe://cluster.local/ns/payments/sa/ledger";

fn record<'a>(o: &'a Outcome, node: &str, kind: &str, reporter: &str) -> &'a Value {
    o.records
        .iter()
        .find(|(n, r)| n == node && r["kind"] == kind && r["reporter"] == reporter)
        .map(|(_, r)| r)
        .unwrap_or_else(|| {
            panic!(
                "{}: no {kind} record by the {reporter} on {node}; got {:#?}",
                o.flow.title, o.records
            )
        })
}

fn check_access_log(outcomes: &[Outcome]) {
    for o in outcomes {
        assert!(
            o.as_expected(),
            "{}: expected {:?}, got delivered={} reply={:?}",
            o.flow.title,
            o.flow.expect,
            o.delivered,
            o.reply
        );
    }
    // Allowed TCP through the Service: mTLS with both identities on both sides.
    let tcp = &outcomes[0];
    let src = record(tcp, "node-a", "connection", "source");
    assert_eq!(src["source_identity"], WEB);
    assert_eq!(src["destination_identity"], LEDGER);
    assert_eq!(src["destination_workload"], "payments/ledger");
    assert_eq!(src["service"], "payments/ledger");
    assert_eq!(src["mtls"], true);
    assert_eq!(src["sent_bytes"], 1048576);
    let dst = record(tcp, "node-b", "connection", "destination");
    assert_eq!(dst["source_identity"], WEB);
    assert_eq!(dst["decision"], "allow");
    assert_eq!(dst["policy"], "payments/ledger-allow-web");
    assert_eq!(dst["mtls"], true);
    assert!(dst["duration_ms"].as_f64().is_some());
    // The not-enrolled namespace: plaintext, no identity, denied at node-b.
    let denied = record(&outcomes[1], "node-b", "connection", "destination");
    assert_eq!(denied["decision"], "deny");
    assert_eq!(denied["mtls"], false);
    assert_eq!(denied["source_identity"], "unknown");
    // L7: per-request records with the code and what decided.
    let ok = record(&outcomes[2], "node-b", "request", "destination");
    assert_eq!(
        (
            ok["method"].as_str(),
            ok["path"].as_str(),
            ok["response_code"].as_u64()
        ),
        (Some("GET"), Some("/api/orders"), Some(200))
    );
    assert_eq!(ok["source_identity"], WEB);
    assert!(ok.get("decided_by").is_none(), "{ok}");
    let admin = record(&outcomes[3], "node-b", "request", "destination");
    assert_eq!(admin["response_code"], 403);
    assert_eq!(admin["decided_by"], "payments/api-deny-admin");
    let post = record(&outcomes[4], "node-b", "request", "destination");
    assert_eq!(post["response_code"], 403);
    assert_eq!(post["decided_by"], "none", "no ALLOW rule matched");
    let gate = record(&outcomes[5], "node-b", "request", "destination");
    assert_eq!(gate["response_code"], 403);
    assert_eq!(gate["decided_by"], "wasm:payments/private-gate");
    let opened = record(&outcomes[6], "node-b", "request", "destination");
    assert_eq!(opened["response_code"], 200);
    assert_eq!(
        opened["source_identity"],
        "spiffe://cluster.local/ns/shop/sa/ops"
    );
}

/// Grafana's substitution of a multi-value variable in a regex matcher.
fn regex_of(values: &[String]) -> String {
    format!(
        "({})",
        values
            .iter()
            .map(|v| v.replace('.', "\\\\."))
            .collect::<Vec<_>>()
            .join("|")
    )
}

/// Evaluates every panel query of every dashboard; returns the failures.
fn check_dashboards(s: &Showcase, prom: &Prometheus) -> (usize, Vec<String>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/dashboards");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 4,
        "expected at least 4 dashboards in {dir:?}"
    );
    let c = &s.cluster;
    let mut checked = 0;
    let mut failures = Vec::new();
    for f in files {
        let board: Value = serde_json::from_str(&std::fs::read_to_string(&f).unwrap()).unwrap();
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        // Variables: each one's own query must find values; the panels then use all
        // of them, as Grafana's "All" on a multi-value variable would list them.
        let mut vars: Vec<(String, String)> = Vec::new();
        for v in board["templating"]["list"].as_array().unwrap() {
            if v["type"] != "query" {
                continue;
            }
            let q = v["query"]["query"].as_str().unwrap();
            let mut text = q.to_string();
            for (k, val) in &vars {
                text = text.replace(&format!("${k}"), val);
            }
            let inner = text
                .strip_prefix("label_values(")
                .and_then(|t| t.strip_suffix(')'))
                .unwrap_or_else(|| panic!("{name}: unexpected variable query {q}"));
            let (selector, label) = inner.rsplit_once(',').unwrap();
            let values = prom
                .label_values(c, label.trim(), selector.trim())
                .unwrap_or_else(|e| panic!("{name}: variable {}: {e}", v["name"]));
            if values.is_empty() {
                failures.push(format!(
                    "{name}: variable {} has no values ({q})",
                    v["name"]
                ));
                continue;
            }
            vars.push((v["name"].as_str().unwrap().to_string(), regex_of(&values)));
        }
        for p in board["panels"].as_array().unwrap() {
            for t in p["targets"].as_array().unwrap() {
                let mut expr = t["expr"].as_str().unwrap().to_string();
                for (k, val) in &vars {
                    expr = expr.replace(&format!("${k}"), val);
                }
                checked += 1;
                match prom.query(c, &expr) {
                    Ok(d) if d["result"].as_array().is_some_and(|r| !r.is_empty()) => {}
                    Ok(_) => {
                        failures.push(format!("{name}: panel {:?}: no data: {expr}", p["title"]))
                    }
                    Err(e) => failures.push(format!("{name}: panel {:?}: {e}: {expr}", p["title"])),
                }
            }
        }
    }
    (checked, failures)
}

/// Metric names Prometheus holds from weft's targets that docs/metrics.md does not list.
fn undocumented(s: &Showcase, prom: &Prometheus) -> Vec<String> {
    let doc =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/metrics.md"))
            .unwrap();
    let names = prom
        .label_values(&s.cluster, "__name__", "{job=~\"weft-.*\"}")
        .unwrap();
    let mut missing = BTreeSet::new();
    for n in names {
        if n.starts_with("scrape_") || n == "up" {
            continue;
        }
        let base = ["_total", "_bucket", "_sum", "_count", "_created"]
            .iter()
            .find_map(|s| n.strip_suffix(s))
            .unwrap_or(&n);
        if !doc.contains(&format!("`{base}")) {
            missing.insert(n.clone());
        }
    }
    missing.into_iter().collect()
}

#[test]
fn access_log_metrics_and_dashboards_on_a_real_prometheus() {
    require_root();
    let mut s = Showcase::start().unwrap();
    let prom = Prometheus::start(&s.cluster).unwrap();

    let outcomes = s.run_all().unwrap();
    check_access_log(&outcomes);
    for o in &outcomes {
        assert!(
            !matches!(o.flow.expect, Expect::Status(_)) || o.reply.is_some(),
            "{o:?}"
        );
    }

    // Secrets never reach the log: query strings and headers are left out.
    let r = curl(
        &s.cluster,
        "shop/web",
        &["-H", "authorization: Bearer sekrit-token"],
        &s.api_url("/api/orders?api_key=sekrit-key"),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    std::thread::sleep(Duration::from_millis(300));
    for node in ["node-a", "node-b"] {
        let log = s.cluster.agent_log(node);
        assert!(log.contains("\"kind\":\"request\"") || node == "node-a");
        assert!(!log.contains("sekrit"), "{node} logged a secret");
    }

    // More traffic for rates, then let Prometheus scrape it.
    for _ in 0..2 {
        s.run_all().unwrap();
    }
    let targets = wait_until(Duration::from_secs(20), || {
        let t = prom.targets(&s.cluster).ok()?;
        (t.len() == 3 && t.iter().all(|(_, h, _)| h == "up")).then_some(t)
    })
    .unwrap_or_else(|| {
        panic!(
            "scrape targets not all up: {:?}\n{}",
            prom.targets(&s.cluster),
            prom.log()
        )
    });
    assert_eq!(targets.len(), 3, "control plane + 2 nodes");
    wait_until(Duration::from_secs(20), || {
        let d = prom
            .query(&s.cluster, "sum(weft_wasm_plugin_local_replies_total)")
            .ok()?;
        let v = d["result"][0]["value"][1].as_str()?.parse::<f64>().ok()?;
        (v >= 3.0).then_some(())
    })
    .expect("Prometheus did not scrape the plugin's replies");
    // rate() over [5m] needs two samples of a series after it appeared.
    std::thread::sleep(Duration::from_secs(3));

    let (checked, failures) = check_dashboards(&s, &prom);
    assert!(
        failures.is_empty(),
        "{} of {checked} dashboard queries failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(checked >= 40, "only {checked} queries checked");

    let missing = undocumented(&s, &prom);
    assert!(
        missing.is_empty(),
        "metrics missing from docs/metrics.md: {missing:?}"
    );

    // A few values that must be exact for this traffic.
    let q = |e: &str| -> f64 {
        prom.query(&s.cluster, e).unwrap()["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(
        q("sum(weft_node_enrolled_pods)"),
        4.0,
        "web, ops, ledger, api"
    );
    assert_eq!(
        q("min(weft_node_ebpf_program_attached)"),
        1.0,
        "every capture program attached"
    );
    assert!(q("max(weft_node_ebpf_map_entries{map=\"weft_enrolled\"})") >= 2.0);
    assert_eq!(q("max(weft_cp_connected_nodes)"), 2.0);
    assert!(q("sum(weft_wasm_plugin_calls_total)") >= 6.0);
}
