//! Commands that ask running components over their admin HTTP endpoints:
//! `status` (control plane `/debug/status`, `/metrics`; nodes' `/config_dump`),
//! `config-dump` and `certs` (a node's `/config_dump`).

use crate::output::Report;
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::time::{Duration, SystemTime};

pub fn get(addr: &str, path: &str) -> anyhow::Result<String> {
    let url = if addr.starts_with("http://") || addr.starts_with("https://") {
        format!("{}{path}", addr.trim_end_matches('/'))
    } else {
        format!("http://{addr}{path}")
    };
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(&url).call().with_context(|| {
        format!("GET {url}: is the component running and is the address right?")
    })?;
    let status = resp.status().as_u16();
    let body = resp
        .body_mut()
        .read_to_string()
        .with_context(|| format!("GET {url}: reading the body"))?;
    if status != 200 {
        bail!("GET {url}: HTTP {status}: {}", body.trim());
    }
    Ok(body)
}

pub fn get_json(addr: &str, path: &str) -> anyhow::Result<Value> {
    let body = get(addr, path)?;
    serde_json::from_str(&body).with_context(|| format!("{addr}{path}: not JSON"))
}

/// `node=address` pairs for the nodes' admin endpoints.
pub fn parse_node_admin(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(n, a)| (n.to_string(), a.to_string()))
        .filter(|(n, a)| !n.is_empty() && !a.is_empty())
        .ok_or_else(|| format!("{s:?}: expected <node>=<host:port>"))
}

fn parse_rfc3339(s: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(s).ok()
}

fn remaining(t: SystemTime) -> String {
    match t.duration_since(SystemTime::now()) {
        Ok(d) => humantime::format_duration(Duration::from_secs(d.as_secs())).to_string(),
        Err(_) => "EXPIRED".into(),
    }
}

/// Certificates of one node's dump, soonest expiry first: (node, id, serial, not_after).
fn certs_of(node: &str, dump: &Value) -> Vec<(String, String, String, String)> {
    let mut v: Vec<(String, String, String, String)> = dump["certificates"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    (
                        node.to_string(),
                        c["spiffe_id"].as_str().unwrap_or_default().to_string(),
                        c["serial"].as_str().unwrap_or_default().to_string(),
                        c["not_after"].as_str().unwrap_or_default().to_string(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    v.sort_by_key(|c| parse_rfc3339(&c.3));
    v
}

pub fn status(cp_admin: &[String], nodes: &[(String, String)]) -> anyhow::Result<(Report, bool)> {
    let mut replicas = Vec::new();
    let mut rows = Vec::new();
    let mut healthy = true;
    let mut node_rows: Vec<Vec<String>> = Vec::new();
    let mut sessions = serde_json::Map::new();
    let mut route_rows: std::collections::BTreeSet<Vec<String>> = Default::default();
    let mut ca_rows: Vec<Vec<String>> = Vec::new();
    let mut ca = Value::Null;
    for addr in cp_admin {
        let st = match get_json(addr, "/debug/status") {
            Ok(s) => s,
            Err(e) => {
                healthy = false;
                rows.push(vec![
                    addr.clone(),
                    "unreachable".into(),
                    "-".into(),
                    format!("{e:#}"),
                ]);
                replicas.push(json!({"admin": addr, "reachable": false}));
                continue;
            }
        };
        let metrics = get(addr, "/metrics").unwrap_or_default();
        let leader = metrics.lines().any(|l| l == "weft_cp_leader 1");
        let ready = st["ready"] == true;
        healthy &= ready;
        rows.push(vec![
            addr.clone(),
            if ready { "ready" } else { "not ready" }.into(),
            if leader { "leader" } else { "follower" }.into(),
            format!(
                "{} node(s) connected",
                st["nodes"].as_array().map(Vec::len).unwrap_or(0)
            ),
        ]);
        for n in st["nodes"].as_array().into_iter().flatten() {
            let name = n["node"].as_str().unwrap_or_default().to_string();
            let sent = n["last_sent_sequence"].as_u64().unwrap_or(0);
            let acked = n["last_acked_sequence"].as_u64().unwrap_or(0);
            let state = match n["last_nack"].as_str() {
                Some(m) if acked < sent => format!("NACK: {m}"),
                _ if acked == sent => "ACK".to_string(),
                _ => "pending".to_string(),
            };
            if state.starts_with("NACK") {
                healthy = false;
            }
            node_rows.push(vec![
                name.clone(),
                addr.clone(),
                format!("{acked}/{sent}"),
                state.clone(),
                n["resources"].to_string(),
            ]);
            sessions.insert(name, json!({"control_plane": addr, "acked": acked, "sent": sent, "state": state, "resources": n["resources"]}));
        }
        for r in st["routes"].as_array().into_iter().flatten() {
            let cond = |ok: &str, reason: &str| {
                format!(
                    "{} ({})",
                    if r[ok].as_bool() == Some(true) {
                        "True"
                    } else {
                        "False"
                    },
                    r[reason].as_str().unwrap_or("")
                )
            };
            let mut accepted = cond("accepted", "accepted_reason");
            if r["stale"].as_bool() == Some(true) {
                accepted.push_str(", stale");
            }
            route_rows.insert(vec![
                r["route"].as_str().unwrap_or("").to_string(),
                r["parent"].as_str().unwrap_or("").to_string(),
                accepted,
                cond("resolved_refs", "resolved_refs_reason"),
            ]);
        }
        // The CA in force and any rotation (the leader drives it; followers follow).
        if let Some(c) = st["ca"].as_object() {
            if leader || ca.is_null() {
                ca = st["ca"].clone();
            }
            if c.get("error").is_some_and(|e| !e.is_null()) {
                healthy = false;
            }
            let waiting: Vec<String> = st["ca"]["waiting_for"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|w| w.as_str().map(str::to_string))
                .chain(st["ca"]["error"].as_str().map(|e| format!("ERROR: {e}")))
                .collect();
            ca_rows.push(vec![
                addr.clone(),
                st["ca"]["phase"].as_str().unwrap_or("-").to_string(),
                st["ca"]["signer"].as_str().unwrap_or("-").to_string(),
                st["ca"]["roots"].to_string(),
                if waiting.is_empty() {
                    "-".into()
                } else {
                    waiting.join("; ")
                },
            ]);
        }
        replicas.push(json!({"admin": addr, "reachable": true, "ready": ready, "leader": leader, "ca": st["ca"], "rejected": st["rejected"], "source_errors": st["source_errors"], "stale": st["stale"], "not_enrolled": st["not_enrolled"], "routes": st["routes"]}));
    }
    let mut certs = Vec::new();
    let mut workloads = Vec::new();
    for (node, addr) in nodes {
        match get_json(addr, "/config_dump") {
            Ok(d) => {
                certs.extend(certs_of(node, &d));
                let enrolled = d["enrolled_pods"].as_array().map(Vec::len).unwrap_or(0);
                workloads.push(vec![
                    node.clone(),
                    enrolled.to_string(),
                    d["synced"].to_string(),
                ]);
            }
            Err(e) => {
                healthy = false;
                workloads.push(vec![
                    node.clone(),
                    "-".into(),
                    format!("unreachable: {e:#}"),
                ]);
            }
        }
    }
    certs.sort_by_key(|c| parse_rfc3339(&c.3));
    let mut report = Report::new(json!({
        "control_plane": replicas,
        "nodes": sessions,
        "certificates": certs.iter().map(|c| json!({"node": c.0, "spiffe_id": c.1, "serial": c.2, "not_after": c.3})).collect::<Vec<_>>(),
        "ca": ca,
        "healthy": healthy,
    }))
    .table(vec!["CONTROL PLANE", "STATE", "ROLE", "NODES"], rows);
    let mut text = String::new();
    if !ca_rows.is_empty() {
        text.push('\n');
        text.push_str(&crate::output::table(
            &[
                "CONTROL PLANE",
                "CA PHASE",
                "SIGNER",
                "ROOTS",
                "WAITING FOR",
            ],
            &ca_rows,
        ));
    }
    if !node_rows.is_empty() {
        text.push('\n');
        text.push_str(&crate::output::table(
            &["NODE", "CONTROL PLANE", "ACKED/SENT", "CONFIG", "RESOURCES"],
            &node_rows,
        ));
    }
    if !route_rows.is_empty() {
        text.push('\n');
        text.push_str(&crate::output::table(
            &["ROUTE", "SERVICE", "ACCEPTED", "RESOLVED REFS"],
            &route_rows.into_iter().collect::<Vec<_>>(),
        ));
    }
    if !workloads.is_empty() {
        text.push('\n');
        text.push_str(&crate::output::table(
            &["NODE", "ENROLLED PODS", "SYNCED"],
            &workloads,
        ));
    }
    if !certs.is_empty() {
        let rows: Vec<Vec<String>> = certs
            .iter()
            .map(|c| {
                vec![
                    c.0.clone(),
                    c.1.clone(),
                    c.3.clone(),
                    parse_rfc3339(&c.3).map(remaining).unwrap_or_default(),
                ]
            })
            .collect();
        text.push('\n');
        text.push_str(&crate::output::table(
            &["NODE", "IDENTITY", "EXPIRES", "IN"],
            &rows,
        ));
    }
    report = report.note(text.trim_end().to_string());
    Ok((report, healthy))
}

pub fn config_dump(node: &str, addr: &str) -> anyhow::Result<Report> {
    let d = get_json(addr, "/config_dump")?;
    if let Some(n) = d["node"].as_str() {
        if n != node {
            bail!("{addr} is node {n:?}, not {node:?}");
        }
    }
    let count = |k: &str| {
        d[k].as_object()
            .map(|m| m.len())
            .or_else(|| d[k].as_array().map(Vec::len))
            .unwrap_or(0)
    };
    let rows = [
        "workloads",
        "services",
        "policies",
        "plugins",
        "certificates",
        "enrolled_pods",
    ]
    .iter()
    .map(|k| vec![k.to_string(), count(k).to_string()])
    .collect();
    Ok(Report::new(d.clone())
        .table(vec!["SECTION", "ENTRIES"], rows)
        .note(format!(
            "node {node}, synced: {} (-o json or -o yaml for everything)",
            d["synced"]
        )))
}

pub fn certs(node: &str, addr: &str) -> anyhow::Result<Report> {
    let d = get_json(addr, "/config_dump")?;
    let list = certs_of(node, &d);
    let rows = list
        .iter()
        .map(|c| {
            vec![
                c.1.clone(),
                c.2.clone(),
                c.3.clone(),
                parse_rfc3339(&c.3).map(remaining).unwrap_or_default(),
            ]
        })
        .collect();
    let data: Vec<Value> = d["certificates"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|mut c| {
            // Only what identifies a certificate; the dump never holds keys anyway.
            if let Some(o) = c.as_object_mut() {
                o.remove("trust_bundle_pem");
            }
            c
        })
        .collect();
    Ok(Report::new(json!({"node": node, "certificates": data}))
        .table(vec!["IDENTITY", "SERIAL", "EXPIRES", "IN"], rows))
}
