//! AuthorizationPolicy evaluation with Istio's semantics. The node proxy and
//! `weftctl authz check` share this code.
//!
//! Decision for a connection (or request) to a workload: any matching DENY policy
//! denies; otherwise, if no ALLOW policy applies to the workload, allow; otherwise any
//! matching ALLOW allows; otherwise deny. AUDIT policies never change the decision.
//! Fields that cannot be evaluated here (L7 fields, JWT principals and claims included,
//! on a connection that is not HTTP) make an ALLOW rule not match and a DENY rule
//! match: never more permissive than the policy.

#![forbid(unsafe_code)]

mod compile;
mod matchers;
pub mod mtls;
pub mod path;
#[cfg(test)]
mod tests;

pub use compile::{compile, CompiledPolicy};
pub use matchers::StringMatch;

use std::net::IpAddr;
use std::sync::Arc;

/// What is known about a connection (and, at L7, its request).
#[derive(Debug, Clone, Default)]
pub struct Attributes {
    pub source_ip: Option<IpAddr>,
    pub destination_ip: Option<IpAddr>,
    pub destination_port: u16,
    /// Peer SPIFFE ID without `spiffe://` (`td/ns/<ns>/sa/<sa>`); `None` for plaintext.
    pub principal: Option<String>,
    /// Present when the connection is parsed as HTTP.
    pub request: Option<Request>,
    /// No request yet, but the connection will be parsed as HTTP and every request
    /// checked: L7 fields are then treated optimistically (an ALLOW rule's L7 fields
    /// may match, a DENY rule's may not), so a denial at this stage means every
    /// request would be denied. Without it, a missing request is fail-closed.
    pub l7_pending: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Request {
    pub method: String,
    /// Normalized path.
    pub path: String,
    pub host: String,
    /// Lower-case header names.
    pub headers: Vec<(String, String)>,
    /// The request's verified JWT (RequestAuthentication), if it carried one.
    pub auth: Option<Arc<RequestAuth>>,
}

/// What a verified JSON Web Token says, as `requestPrincipals` and the
/// `request.auth.*` condition keys read it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestAuth {
    /// `<iss>/<sub>`.
    pub principal: String,
    pub audiences: Vec<String>,
    /// The `azp` claim.
    pub presenter: Option<String>,
    /// Every claim.
    pub claims: serde_json::Value,
}

impl Attributes {
    /// `(namespace, service account)` of the peer, from a Kubernetes-style principal.
    fn peer_ns_sa(&self) -> Option<(&str, &str)> {
        let p = self.principal.as_deref()?;
        let mut it = p.split('/');
        let _td = it.next()?;
        match (it.next(), it.next(), it.next(), it.next(), it.next()) {
            (Some("ns"), Some(ns), Some("sa"), Some(sa), None) => Some((ns, sa)),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
    Audit,
}

/// The outcome and what made it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `namespace/name` of the deciding policy; `None` when no policy decided
    /// (allowed: no ALLOW policy applies) or when no ALLOW policy matched (denied).
    /// Shared with the compiled policy (deciding allocates nothing).
    pub policy: Option<Arc<str>>,
    /// Index of the matching rule in that policy.
    pub rule: Option<usize>,
    /// Matching AUDIT policies (logged, never deciding).
    pub audited: Vec<String>,
    pub reason: &'static str,
}

/// Evaluates `policies` (those that apply to the destination workload) for `attrs`.
pub fn evaluate<'a>(
    policies: impl IntoIterator<Item = &'a CompiledPolicy>,
    attrs: &Attributes,
) -> Decision {
    let mut allow_policies = 0;
    let mut allowed_by = None;
    let mut audited = Vec::new();
    let mut denied_by = None;
    for p in policies {
        let hit = p.matching_rule(attrs);
        match p.action {
            Action::Deny => {
                if let (Some(r), None) = (hit, &denied_by) {
                    denied_by = Some((p.shared_id(), r));
                }
            }
            Action::Allow => {
                allow_policies += 1;
                if let (Some(r), None) = (hit, &allowed_by) {
                    allowed_by = Some((p.shared_id(), r));
                }
            }
            Action::Audit => {
                if hit.is_some() {
                    audited.push(p.id().to_string());
                }
            }
        }
    }
    if let Some((policy, rule)) = denied_by {
        return Decision {
            allowed: false,
            policy: Some(policy),
            rule: Some(rule),
            audited,
            reason: "denied by a DENY policy",
        };
    }
    if allow_policies == 0 {
        return Decision {
            allowed: true,
            policy: None,
            rule: None,
            audited,
            reason: "no ALLOW policy applies to the workload",
        };
    }
    match allowed_by {
        Some((policy, rule)) => Decision {
            allowed: true,
            policy: Some(policy),
            rule: Some(rule),
            audited,
            reason: "allowed by an ALLOW policy",
        },
        None => Decision {
            allowed: false,
            policy: None,
            rule: None,
            audited,
            reason: "no ALLOW policy matched",
        },
    }
}
