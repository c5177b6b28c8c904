//! The node's RequestAuthentications, compiled once per change: each object's JWT
//! rules with their key sets ([`weft_authn`]). A rule whose key set is missing or
//! does not compile still finds its tokens and refuses every one of them: a token
//! is never believed unverified, nor taken for a request without one.

use std::collections::HashMap;
use std::sync::Arc;
use weft_authn::CompiledRule;
use weft_proto::pb;

struct Compiled {
    namespace: String,
    selector: HashMap<String, String>,
    mesh_wide: bool,
    rules: Vec<CompiledRule>,
}

/// Every RequestAuthentication the node holds, compiled.
pub struct CompiledAuthn {
    all: Vec<Compiled>,
}

impl CompiledAuthn {
    pub fn new<'a>(objects: impl IntoIterator<Item = &'a pb::RequestAuthentication>) -> Self {
        let all = objects
            .into_iter()
            .map(|o| Compiled {
                namespace: o.namespace.clone(),
                selector: o.selector.clone(),
                mesh_wide: o.mesh_wide,
                rules: o
                    .rules
                    .iter()
                    .filter_map(|r| {
                        let id = format!("{}/{}", o.namespace, o.name);
                        let rule = rule_of(r);
                        if !r.jwks.is_empty() {
                            match weft_authn::compile(&rule) {
                                Ok(c) => return Some(c),
                                Err(e) => {
                                    tracing::warn!(object = %id, issuer = %r.issuer, error = %e, "JWT rule's key set does not compile: tokens of its issuer are refused");
                                }
                            }
                        } else {
                            tracing::debug!(object = %id, issuer = %r.issuer, why = %r.jwks_error, "JWT rule without keys: tokens of its issuer are refused");
                        }
                        // Still finds its tokens, and refuses them; a rule that does
                        // not compile at all refuses its issuer's tokens where tokens
                        // are found by default.
                        match weft_authn::compile_without_keys(&rule) {
                            Ok(c) => Some(c),
                            Err(e) => {
                                tracing::warn!(object = %id, issuer = %r.issuer, error = %e, "JWT rule does not compile: its issuer's tokens are refused");
                                weft_authn::compile_without_keys(&weft_authn::JwtRule {
                                    issuer: r.issuer.clone(),
                                    ..Default::default()
                                })
                                .ok()
                            }
                        }
                    })
                    .collect(),
            })
            .collect();
        Self { all }
    }

    /// Does any RequestAuthentication apply to `w`?
    pub fn applies(&self, w: &pb::Workload) -> bool {
        self.all.iter().any(|c| selects(c, w))
    }

    /// The rules of every RequestAuthentication that applies to `w` (mesh-wide,
    /// its namespace's, those selecting its labels), in one list.
    pub fn rules_for(&self, w: &pb::Workload) -> Arc<[CompiledRule]> {
        self.all
            .iter()
            .filter(|c| selects(c, w))
            .flat_map(|c| c.rules.iter().cloned())
            .collect()
    }
}

fn selects(c: &Compiled, w: &pb::Workload) -> bool {
    (c.mesh_wide || c.namespace == w.namespace)
        && c.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v))
}

fn rule_of(r: &pb::JwtRule) -> weft_authn::JwtRule {
    weft_authn::JwtRule {
        issuer: r.issuer.clone(),
        audiences: r.audiences.clone(),
        jwks: r.jwks.clone(),
        from_headers: r
            .from_headers
            .iter()
            .map(|h| weft_authn::JwtHeader {
                name: h.name.clone(),
                prefix: h.prefix.clone(),
            })
            .collect(),
        from_params: r.from_params.clone(),
        forward_original_token: r.forward_original_token,
        output_claim_to_headers: r
            .output_claim_to_headers
            .iter()
            .map(|o| weft_authn::ClaimToHeader {
                header: o.header.clone(),
                claim: o.claim.clone(),
            })
            .collect(),
    }
}
