//! What a policy's L7 fields mean where they apply, for its status: which rules are
//! enforced per request at the destination node proxy, and which cannot be because
//! a Service declares the port they name as not HTTP.

use k8s_openapi::api::core::v1::Service;
use weft_proto::crd::{Action, AuthorizationPolicySpec, Operation};
use weft_proto::protocol::{declared, Declared};
use weft_proto::validate::{FieldError, Report};

fn l7_fields(o: &Operation) -> Vec<&'static str> {
    let mut v = Vec::new();
    if !o.methods.is_empty() || !o.not_methods.is_empty() {
        v.push("methods");
    }
    if !o.paths.is_empty() || !o.not_paths.is_empty() {
        v.push("paths");
    }
    if !o.hosts.is_empty() || !o.not_hosts.is_empty() {
        v.push("hosts");
    }
    v
}

/// Adds L7 notes: returns the "enforced at L7" lines and appends rules that cannot
/// be enforced to `report.unsupported`.
pub fn l7_status(
    spec: &AuthorizationPolicySpec,
    services: &[&Service],
    report: &mut Report,
) -> Vec<String> {
    let deny = matches!(spec.action, Some(Action::Deny));
    let fallback = if deny {
        "a DENY rule always matches (denies) it"
    } else {
        "an ALLOW rule never matches it"
    };
    let mut enforced = Vec::new();
    for (i, r) in spec.rules.iter().enumerate() {
        let mut fields: Vec<&str> = r.to.iter().flat_map(|t| l7_fields(&t.operation)).collect();
        if r.when.iter().any(|c| c.key.starts_with("request.headers[")) {
            fields.push("request.headers");
        }
        fields.sort_unstable();
        fields.dedup();
        if fields.is_empty() {
            continue;
        }
        enforced.push(format!(
            "spec.rules[{i}]: {} enforced per request where the traffic is HTTP; traffic that is not HTTP: {fallback}",
            fields.join(", ")
        ));
        for (j, t) in r.to.iter().enumerate() {
            if l7_fields(&t.operation).is_empty() {
                continue;
            }
            for p in &t.operation.ports {
                let Ok(port) = p.parse::<i32>() else { continue };
                for s in services {
                    let Some(spec) = &s.spec else { continue };
                    for sp in spec.ports.iter().flatten() {
                        let target = match &sp.target_port {
                            Some(
                                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(t),
                            ) => *t,
                            _ => sp.port,
                        };
                        let d = declared(
                            sp.app_protocol.as_deref().unwrap_or(""),
                            sp.name.as_deref().unwrap_or(""),
                        );
                        if target == port && d == Declared::Opaque {
                            report.unsupported.push(FieldError {
                                field: format!("spec.rules[{i}].to[{j}].operation.ports"),
                                message: format!(
                                    "port {port} is declared not HTTP by Service {} (port {:?}, appProtocol {:?}): the L7 fields of this rule cannot be enforced there; {fallback}",
                                    s.metadata.name.as_deref().unwrap_or(""),
                                    sp.name.as_deref().unwrap_or(""),
                                    sp.app_protocol.as_deref().unwrap_or("")
                                ),
                            });
                        }
                    }
                }
            }
        }
    }
    enforced
}
