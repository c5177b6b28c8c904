//! `weftctl analyze`: lints the mesh's configuration (a manifest directory or a
//! cluster) for mistakes that are valid YAML but almost certainly not what was meant.

use crate::inputs::Mesh;
use crate::output::Report;
use serde_json::json;
use std::collections::BTreeSet;
use weft_authz as authz;
use weft_model::manifest::Object;
use weft_proto::crd::{Action, AuthorizationPolicy};
use weft_proto::pb;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Error,
    Warning,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Finding {
    pub level: Level,
    pub code: &'static str,
    pub object: String,
    pub field: String,
    pub message: String,
}

fn warning(
    code: &'static str,
    object: impl Into<String>,
    field: impl Into<String>,
    message: impl Into<String>,
) -> Finding {
    Finding {
        level: Level::Warning,
        code,
        object: object.into(),
        field: field.into(),
        message: message.into(),
    }
}

fn policies(mesh: &Mesh) -> Vec<&AuthorizationPolicy> {
    mesh.objects
        .iter()
        .filter_map(|o| match o {
            Object::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
        .collect()
}

fn name_of(p: &AuthorizationPolicy) -> (String, String) {
    (
        p.metadata.namespace.clone().unwrap_or_default(),
        p.metadata.name.clone().unwrap_or_default(),
    )
}

pub fn analyze(mesh: &Mesh) -> Vec<Finding> {
    let mut out = Vec::new();
    for e in &mesh.errors {
        out.push(Finding {
            level: Level::Error,
            code: "InvalidManifest",
            object: e
                .object
                .clone()
                .unwrap_or_else(|| format!("{} document {}", e.file, e.document)),
            field: e.field.clone().unwrap_or_default(),
            message: e.message.clone(),
        });
    }
    for (obj, st) in mesh.model.statuses() {
        for e in &st.report.errors {
            out.push(Finding {
                level: Level::Error,
                code: "Invalid",
                object: obj.to_string(),
                field: e.field.clone(),
                message: e.message.clone(),
            });
        }
        for e in &st.report.unsupported {
            let l7 = e.field.ends_with(".operation.ports");
            out.push(Finding {
                level: Level::Warning,
                code: if l7 {
                    "L7OnNonHttpPort"
                } else {
                    "UnsupportedField"
                },
                object: obj.to_string(),
                field: e.field.clone(),
                message: e.message.clone(),
            });
        }
    }

    let namespaces: BTreeSet<String> = mesh
        .objects
        .iter()
        .filter_map(|o| match o {
            Object::Namespace(n) => n.metadata.name.clone(),
            _ => None,
        })
        .collect();
    // Service accounts that exist: declared, or used by a pod; `default` always does.
    let mut accounts: BTreeSet<(String, String)> = BTreeSet::new();
    for o in &mesh.objects {
        match o {
            Object::ServiceAccount(s) => {
                accounts.insert((
                    s.metadata.namespace.clone().unwrap_or_default(),
                    s.metadata.name.clone().unwrap_or_default(),
                ));
            }
            Object::Pod(p) => {
                let sa = p
                    .spec
                    .as_ref()
                    .and_then(|s| s.service_account_name.clone())
                    .unwrap_or_else(|| "default".into());
                accounts.insert((p.metadata.namespace.clone().unwrap_or_default(), sa));
            }
            _ => {}
        }
    }
    let workloads = mesh.workloads();
    let compiled: Vec<(String, authz::CompiledPolicy)> = mesh
        .policies()
        .iter()
        .map(|p| (format!("{}/{}", p.namespace, p.name), authz::compile(p)))
        .collect();

    let peer_authns = mesh.peer_authentications();
    // STRICT on every port: plaintext never reaches the workload's policies.
    let strict_everywhere = |w: &pb::Workload| -> Option<String> {
        let ports = peer_authns
            .iter()
            .filter(|p| p.namespace == w.namespace)
            .flat_map(|p| p.port_modes.keys())
            .filter_map(|p| u16::try_from(*p).ok());
        let mut by = None;
        for port in std::iter::once(0).chain(ports) {
            let e = authz::mtls::effective(&peer_authns, w, port);
            if !e.strict {
                return None;
            }
            by = by.or(e.policy_id());
        }
        by
    };

    for p in policies(mesh) {
        let (ns, name) = name_of(p);
        let obj = format!("AuthorizationPolicy {ns}/{name}");
        if !namespaces.contains(&ns) {
            out.push(warning(
                "UnknownNamespace",
                obj.clone(),
                "metadata.namespace",
                format!("namespace {ns} does not exist"),
            ));
        }
        if let Some((_, c)) = compiled
            .iter()
            .find(|(id, _)| *id == format!("{ns}/{name}"))
        {
            let selected_workloads: Vec<&pb::Workload> = workloads
                .iter()
                .filter(|w| w.enrolled && c.applies_to_labels(&w.namespace, &w.labels))
                .collect();
            let selected = selected_workloads.len();
            let strict: Vec<String> = selected_workloads
                .iter()
                .map(|w| strict_everywhere(w))
                .collect::<Option<Vec<String>>>()
                .unwrap_or_default();
            let allow = p.spec.action.unwrap_or_default() == Action::Allow;
            if allow && selected > 0 && !strict.is_empty() {
                for (i, r) in p.spec.rules.iter().enumerate() {
                    for (j, f) in r.from.iter().enumerate() {
                        let s = &f.source;
                        let by_ip = !s.ip_blocks.is_empty() || !s.remote_ip_blocks.is_empty();
                        let by_identity = !s.principals.is_empty()
                            || !s.namespaces.is_empty()
                            || !s.service_accounts.is_empty();
                        if by_ip && !by_identity {
                            let mut by: Vec<String> = strict.clone();
                            by.sort();
                            by.dedup();
                            out.push(warning(
                                "PlaintextRuleOnStrictWorkload",
                                obj.clone(),
                                format!("spec.rules[{i}].from[{j}].source.ipBlocks"),
                                format!("every workload it selects is STRICT (PeerAuthentication {}): plaintext never reaches this rule, so the addresses can only match mesh clients", by.join(", ")),
                            ));
                        }
                    }
                }
            }
            if selected == 0 {
                out.push(warning(
                    "SelectsNothing",
                    obj.clone(),
                    "spec.selector",
                    "selects no enrolled workload: it has no effect",
                ));
            }
        }
        for (i, r) in p.spec.rules.iter().enumerate() {
            for (j, f) in r.from.iter().enumerate() {
                let base = format!("spec.rules[{i}].from[{j}].source");
                for n in f.source.namespaces.iter().chain(&f.source.not_namespaces) {
                    if !n.contains('*') && !namespaces.contains(n) {
                        out.push(warning(
                            "UnknownNamespace",
                            obj.clone(),
                            format!("{base}.namespaces"),
                            format!("namespace {n} does not exist"),
                        ));
                    }
                }
                for pr in f.source.principals.iter().chain(&f.source.not_principals) {
                    let parts: Vec<&str> = pr.split('/').collect();
                    if let [_, "ns", pns, "sa", psa] = parts.as_slice() {
                        if pr.contains('*') {
                            continue;
                        }
                        if !namespaces.contains(*pns) {
                            out.push(warning(
                                "UnknownNamespace",
                                obj.clone(),
                                format!("{base}.principals"),
                                format!("{pr}: namespace {pns} does not exist"),
                            ));
                        } else if *psa != "default"
                            && !accounts.contains(&(pns.to_string(), psa.to_string()))
                        {
                            out.push(warning("UnknownServiceAccount", obj.clone(), format!("{base}.principals"), format!("{pr}: service account {pns}/{psa} does not exist and no pod uses it")));
                        }
                    }
                }
            }
        }
    }
    out.extend(shadowing(&policies(mesh)));
    out.sort_by(|a, b| (a.level, &a.object, &a.field).cmp(&(b.level, &b.object, &b.field)));
    out
}

/// A rule that matches every request: no from, no to, no when.
fn matches_all(r: &weft_proto::crd::Rule) -> bool {
    r.from.is_empty() && r.to.is_empty() && r.when.is_empty()
}

/// Policies whose effect another policy on the same workloads already decides.
fn shadowing(ps: &[&AuthorizationPolicy]) -> Vec<Finding> {
    let mut out = Vec::new();
    for a in ps {
        let (ns, name) = name_of(a);
        let action = a.spec.action.unwrap_or_default();
        for b in ps {
            let (bns, bname) = name_of(b);
            if (bns.as_str(), bname.as_str()) == (ns.as_str(), name.as_str())
                || bns != ns
                || a.spec.selector != b.spec.selector
            {
                continue;
            }
            let b_action = b.spec.action.unwrap_or_default();
            let b_all = b.spec.rules.iter().any(matches_all);
            if b_action == Action::Deny && b_all && action == Action::Allow {
                out.push(warning("Shadowed", format!("AuthorizationPolicy {ns}/{name}"), "spec.rules", format!("DENY policy {bns}/{bname} on the same workloads denies everything: this ALLOW policy never takes effect")));
            }
            if b_action == Action::Allow
                && b_all
                && action == Action::Allow
                && !a.spec.rules.iter().any(matches_all)
                && bname < name
            {
                out.push(warning("Shadowed", format!("AuthorizationPolicy {ns}/{name}"), "spec.rules", format!("ALLOW policy {bns}/{bname} on the same workloads allows everything: this ALLOW policy adds nothing")));
            }
        }
        // The same rule twice in one policy.
        for (i, r) in a.spec.rules.iter().enumerate() {
            if let Some(j) = a.spec.rules[..i].iter().position(|q| q == r) {
                out.push(warning(
                    "DuplicateRule",
                    format!("AuthorizationPolicy {ns}/{name}"),
                    format!("spec.rules[{i}]"),
                    format!("identical to spec.rules[{j}]"),
                ));
            }
        }
    }
    out
}

pub fn report(findings: &[Finding]) -> Report {
    let rows = findings
        .iter()
        .map(|f| {
            vec![
                format!("{:?}", f.level).to_ascii_lowercase(),
                f.code.to_string(),
                f.object.clone(),
                f.field.clone(),
                f.message.clone(),
            ]
        })
        .collect();
    let errors = findings.iter().filter(|f| f.level == Level::Error).count();
    Report::new(
        json!({"findings": findings, "errors": errors, "warnings": findings.len() - errors}),
    )
    .table(vec!["LEVEL", "CODE", "OBJECT", "FIELD", "MESSAGE"], rows)
    .note(if findings.is_empty() {
        "no findings".to_string()
    } else {
        format!(
            "{} error(s), {} warning(s)",
            errors,
            findings.len() - errors
        )
    })
}
