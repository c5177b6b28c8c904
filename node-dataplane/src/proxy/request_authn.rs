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
    selector: std::collections::BTreeMap<String, String>,
    mesh_wide: bool,
    rules: Vec<CompiledRule>,
}

/// (object `ns/name`, issuer, jwksUri) of a rule compiled with keys.
type RuleKey = (String, String, String);

/// Every RequestAuthentication the node holds, compiled.
pub struct CompiledAuthn {
    all: Vec<Compiled>,
    /// The rules that were compiled with keys, for the next compilation: a rule
    /// whose key set is being fetched again (a control-plane restart) keeps them.
    with_keys: HashMap<RuleKey, CompiledRule>,
}

impl CompiledAuthn {
    /// Compiles `objects`; `prev` is the compilation they replace.
    pub fn new<'a>(
        objects: impl IntoIterator<Item = &'a pb::RequestAuthentication>,
        prev: Option<&CompiledAuthn>,
    ) -> Self {
        let mut with_keys = HashMap::new();
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
                        let key = (id.clone(), r.issuer.clone(), r.jwks_uri.clone());
                        let rule = rule_of(r);
                        if r.jwks.is_empty() && r.jwks_pending {
                            if let Some(c) = prev.and_then(|p| p.with_keys.get(&key)) {
                                tracing::debug!(object = %id, issuer = %r.issuer, "JWT rule's key set is being fetched again: the keys held stay in use");
                                with_keys.insert(key, c.clone());
                                return Some(c.clone());
                            }
                        }
                        if !r.jwks.is_empty() {
                            match weft_authn::compile(&rule) {
                                Ok(c) => {
                                    with_keys.insert(key, c.clone());
                                    return Some(c);
                                }
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
        Self { all, with_keys }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The P-256 public key of RFC 7517's example.
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU","y":"x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0","kid":"1"}]}"#;

    fn object(jwks: &str, pending: bool) -> pb::RequestAuthentication {
        pb::RequestAuthentication {
            name: "users".into(),
            namespace: "shop".into(),
            rules: vec![pb::JwtRule {
                issuer: "https://issuer.example".into(),
                jwks: jwks.into(),
                jwks_uri: "https://issuer.example/keys".into(),
                jwks_pending: pending,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn keys(c: &CompiledAuthn) -> Vec<usize> {
        let w = pb::Workload {
            namespace: "shop".into(),
            ..Default::default()
        };
        c.rules_for(&w).iter().map(|r| r.key_count()).collect()
    }

    #[test]
    fn keys_being_fetched_again_keep_the_ones_held() {
        let with = CompiledAuthn::new([&object(JWKS, false)], None);
        assert_eq!(keys(&with), [1]);
        // A control-plane restart: the same rule, its keys being fetched.
        let pending = object("", true);
        let kept = CompiledAuthn::new([&pending], Some(&with));
        assert_eq!(keys(&kept), [1]);
        // And again after that (the keys are carried on).
        assert_eq!(keys(&CompiledAuthn::new([&pending], Some(&kept))), [1]);
        // Never held: no keys, so its tokens are refused.
        assert_eq!(keys(&CompiledAuthn::new([&pending], None)), [0]);
        // Not pending but failed: the keys held are not kept.
        let failed = object("", false);
        assert_eq!(keys(&CompiledAuthn::new([&failed], Some(&with))), [0]);
        // Another key set URI: not the same rule.
        let mut other = object("", true);
        other.rules[0].jwks_uri = "https://issuer.example/other".into();
        assert_eq!(keys(&CompiledAuthn::new([&other], Some(&with))), [0]);
    }
}
