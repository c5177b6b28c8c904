//! `weftctl authz check`: which decision the destination node proxy would take for a
//! connection or request, and which policy and rule made it. The objects go through
//! the control plane's model and the policies through the same compiler and
//! evaluator (`weft_authz`) the proxy runs.

use crate::inputs::Mesh;
use crate::output::Report;
use anyhow::{bail, Context};
use serde_json::json;
use std::net::IpAddr;
use weft_authz::{self as authz, Attributes, Request};
use weft_proto::pb;

#[derive(clap::Args, Debug, Clone)]
pub struct CheckArgs {
    /// The caller: `<namespace>/<pod>`, a SPIFFE ID, or an IP address.
    #[arg(long)]
    pub from: String,
    /// The destination: `<namespace>/<pod or service>:<port>`.
    #[arg(long)]
    pub to: String,
    /// HTTP method of a request to check (L7); without any request field the
    /// connection (L4) is checked.
    #[arg(long)]
    pub method: Option<String>,
    #[arg(long)]
    pub path: Option<String>,
    /// Host (authority) of the request.
    #[arg(long)]
    pub host: Option<String>,
    /// Request header `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    pub headers: Vec<(String, String)>,
    /// The request carries a valid JWT whose `<iss>/<sub>` is this (what a
    /// RequestAuthentication verified; `requestPrincipals` match it).
    #[arg(long)]
    pub request_principal: Option<String>,
    /// A claim of that JWT, `name=value` (repeatable; `a.b=value` for a nested
    /// claim; a name given twice makes a list), for `request.auth.claims[...]`.
    #[arg(long = "claim", value_parser = parse_claim)]
    pub claims: Vec<(String, String)>,
}

fn parse_claim(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=value"))?;
    if k.is_empty() || k.split('.').any(str::is_empty) {
        return Err(format!("{s:?}: empty claim name"));
    }
    Ok((k.to_string(), v.to_string()))
}

/// The claims object `--claim` flags describe.
fn claims_object(claims: &[(String, String)]) -> serde_json::Value {
    let mut root = serde_json::Map::new();
    for (k, v) in claims {
        let mut path: Vec<&str> = k.split('.').collect();
        let last = path.pop().unwrap_or_default();
        let mut obj = &mut root;
        for p in path {
            let next = obj.entry(p.to_string()).or_insert_with(|| json!({}));
            if !next.is_object() {
                *next = json!({});
            }
            obj = match next.as_object_mut() {
                Some(o) => o,
                None => return serde_json::Value::Object(root),
            };
        }
        match obj.get_mut(last) {
            Some(serde_json::Value::Array(a)) => a.push(json!(v)),
            Some(prev) => *prev = json!([prev.clone(), v]),
            None => {
                obj.insert(last.to_string(), json!(v));
            }
        }
    }
    serde_json::Value::Object(root)
}

fn parse_header(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected name=value"))?;
    if k.is_empty() {
        return Err(format!("{s:?}: empty header name"));
    }
    Ok((k.to_ascii_lowercase(), v.to_string()))
}

/// Who is calling, as the destination proxy would see it.
struct Caller {
    shown: String,
    principal: Option<String>,
    ip: Option<IpAddr>,
}

fn caller(mesh: &Mesh, from: &str) -> anyhow::Result<Caller> {
    let workloads = mesh.workloads();
    let of_workload = |w: &pb::Workload| Caller {
        shown: format!("{}/{}", w.namespace, w.name),
        principal: w
            .enrolled
            .then(|| w.spiffe_id.trim_start_matches("spiffe://").to_string()),
        ip: w.ips.first().and_then(|i| i.parse().ok()),
    };
    if let Some(id) = from.strip_prefix("spiffe://") {
        weft_proto::spiffe::SpiffeId::parse(from).with_context(|| format!("--from {from:?}"))?;
        return Ok(Caller {
            shown: from.to_string(),
            principal: Some(id.to_string()),
            ip: None,
        });
    }
    if let Ok(ip) = from.parse::<IpAddr>() {
        let ip_s = ip.to_string();
        return Ok(match workloads.iter().find(|w| w.ips.contains(&ip_s)) {
            Some(w) => of_workload(w),
            None => Caller {
                shown: ip_s,
                principal: None,
                ip: Some(ip),
            },
        });
    }
    let (ns, name) = from.split_once('/').with_context(|| {
        format!("--from {from:?}: expected <namespace>/<pod>, a SPIFFE ID or an IP")
    })?;
    workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
        .map(of_workload)
        .with_context(|| format!("--from {from:?}: no pod {name} in namespace {ns}"))
}

/// Destination workloads and the port each receives the traffic on.
fn destinations(mesh: &Mesh, to: &str) -> anyhow::Result<(String, Vec<(pb::Workload, u16)>)> {
    let (target, port) = to
        .rsplit_once(':')
        .with_context(|| format!("--to {to:?}: expected <namespace>/<pod or service>:<port>"))?;
    let port: u16 = port
        .parse()
        .with_context(|| format!("--to {to:?}: {port:?} is not a port number"))?;
    let (ns, name) = target
        .split_once('/')
        .with_context(|| format!("--to {to:?}: expected <namespace>/<pod or service>:<port>"))?;
    let workloads = mesh.workloads();
    if let Some(w) = workloads
        .iter()
        .find(|w| w.namespace == ns && w.name == name)
    {
        return Ok((format!("pod {ns}/{name}"), vec![(w.clone(), port)]));
    }
    let svc = mesh
        .services()
        .into_iter()
        .find(|s| s.namespace == ns && s.name == name)
        .with_context(|| format!("--to {to:?}: no pod or service {name} in namespace {ns}"))?;
    if !svc.ports.iter().any(|p| p.port == u32::from(port)) {
        let ports: Vec<String> = svc.ports.iter().map(|p| p.port.to_string()).collect();
        bail!(
            "--to {to:?}: service {ns}/{name} has no port {port} (ports: {})",
            ports.join(", ")
        );
    }
    let mut out = Vec::new();
    for ep in &svc.endpoints {
        let Some(w) = workloads.iter().find(|w| w.uid == ep.workload_uid) else {
            continue;
        };
        let target = ep
            .target_ports
            .get(&u32::from(port))
            .copied()
            .unwrap_or(u32::from(port));
        out.push((w.clone(), u16::try_from(target).unwrap_or(port)));
    }
    if out.is_empty() {
        bail!("--to {to:?}: service {ns}/{name} has no endpoints");
    }
    Ok((format!("service {ns}/{name}:{port}"), out))
}

/// Runs the check; the report and whether every destination allows it.
pub fn check(mesh: &Mesh, a: &CheckArgs) -> anyhow::Result<(Report, bool)> {
    let from = caller(mesh, &a.from)?;
    let (to_shown, dsts) = destinations(mesh, &a.to)?;
    let auth = (a.request_principal.is_some() || !a.claims.is_empty()).then(|| {
        std::sync::Arc::new(authz::RequestAuth {
            principal: a.request_principal.clone().unwrap_or_default(),
            audiences: Vec::new(),
            presenter: None,
            claims: claims_object(&a.claims),
        })
    });
    let request = (a.method.is_some()
        || a.path.is_some()
        || a.host.is_some()
        || !a.headers.is_empty()
        || auth.is_some())
    .then(|| Request {
        method: a
            .method
            .clone()
            .unwrap_or_else(|| "GET".into())
            .to_ascii_uppercase(),
        path: a
            .path
            .as_deref()
            .map(|p| {
                authz::path::normalize(p)
                    .map(|n| n.path)
                    .unwrap_or_else(|_| p.to_string())
            })
            .unwrap_or_else(|| "/".into()),
        host: a.host.clone().unwrap_or_default(),
        headers: a.headers.clone(),
        auth: auth.clone(),
    });
    let compiled: Vec<authz::CompiledPolicy> = mesh.policies().iter().map(authz::compile).collect();
    let peer_authns = mesh.peer_authentications();
    let mut rows = Vec::new();
    let mut results = Vec::new();
    let mut all_allowed = true;
    let mut notes = Vec::new();
    for (w, port) in &dsts {
        let dst = format!("{}/{}:{port}", w.namespace, w.name);
        if !w.enrolled {
            rows.push(vec![
                dst.clone(),
                "ALLOW".into(),
                "-".into(),
                "-".into(),
                "destination is not in the mesh: weft does not authorize its traffic".into(),
            ]);
            results.push(json!({"destination": dst, "enrolled": false, "allowed": true}));
            continue;
        }
        let applicable: Vec<&authz::CompiledPolicy> = compiled
            .iter()
            .filter(|p| p.applies_to_labels(&w.namespace, &w.labels))
            .collect();
        let http = applicable.iter().any(|p| p.needs_http(*port));
        if http && request.is_none() {
            notes.push(format!("{dst}: policies here have L7 fields, so this port is parsed as HTTP and every request is checked; give --method/--path to check one (without, L7 rules are evaluated as for traffic that is not HTTP)"));
        }
        let attrs = Attributes {
            source_ip: from.ip,
            destination_ip: w.ips.first().and_then(|i| i.parse().ok()),
            destination_port: *port,
            principal: from.principal.clone(),
            request: request.clone(),
            l7_pending: false,
        };
        let mtls = authz::mtls::effective(&peer_authns, w, *port);
        let strict_by = mtls.policy_id().filter(|_| mtls.strict);
        let d = match &strict_by {
            // What the proxy does first: plaintext to a STRICT port never reaches
            // the AuthorizationPolicies.
            Some(id) if from.principal.is_none() => authz::Decision {
                allowed: false,
                policy: Some(format!("PeerAuthentication {id}").into()),
                rule: None,
                audited: Vec::new(),
                reason: "plaintext refused: STRICT mTLS (PeerAuthentication)",
            },
            _ => authz::evaluate(applicable.iter().copied(), &attrs),
        };
        all_allowed &= d.allowed;
        rows.push(vec![
            dst.clone(),
            if d.allowed { "ALLOW" } else { "DENY" }.into(),
            d.policy.as_deref().unwrap_or("-").to_string(),
            d.rule
                .map(|r| format!("spec.rules[{r}]"))
                .unwrap_or_else(|| "-".into()),
            d.reason.to_string(),
        ]);
        results.push(json!({
            "destination": dst,
            "enrolled": true,
            "allowed": d.allowed,
            "policy": d.policy.as_deref(),
            "rule": d.rule,
            "reason": d.reason,
            "audited_by": d.audited,
            "policies_considered": applicable.iter().map(|p| p.id()).collect::<Vec<_>>(),
            "mtls": {
                "mode": if mtls.strict { "STRICT" } else { "PERMISSIVE" },
                "peer_authentication": mtls.policy_id(),
            },
        }));
    }
    let mut report = Report::new(json!({
        "from": {"caller": from.shown, "principal": from.principal, "ip": from.ip.map(|i| i.to_string()), "mtls": from.principal.is_some()},
        "to": to_shown,
        "request": request.as_ref().map(|r| json!({"method": r.method, "path": r.path, "host": r.host, "headers": r.headers})),
        "allowed": all_allowed,
        "results": results,
    }))
    .table(vec!["DESTINATION", "DECISION", "POLICY", "RULE", "REASON"], rows)
    .note(format!(
        "caller: {} ({})",
        from.shown,
        match &from.principal {
            Some(p) => format!("mTLS as spiffe://{p}"),
            None => "plaintext: no identity".into(),
        }
    ));
    for n in notes {
        report = report.note(n);
    }
    Ok((report, all_allowed))
}
