//! A line format for AuthorizationPolicies and the connection they are evaluated
//! for, so that the authz target's seeds can be read and written by hand:
//!
//! ```text
//! policy DENY name=shop/deny-admin mesh
//! rule
//! from principals=cluster.local/ns/shop/sa/web notNamespaces=legacy
//! to methods=POST,PUT paths=/admin* ports=8080
//! when request.headers[x-user] values=admin notValues=guest
//! conn src=10.0.0.1 dst=10.0.0.2 port=8080 principal=cluster.local/ns/shop/sa/web pending
//! req method=POST path=/admin/x host=svc:8080 header=x-user:admin jwt=iss/sub claim=groups:admins
//! ```
//!
//! `policy` takes an action (`ALLOW`, `DENY`, `AUDIT` or a number), `rule` starts a
//! rule, `from`/`to`/`when` add a source, an operation or a condition to it (one
//! implied where missing). Values are comma-separated and `%XX`-decoded, so any
//! string can be written. Unknown words are skipped: every input means something.

use weft_authz::{Attributes, Request};
use weft_proto::pb;

/// Policies and the connection (and request) to evaluate them for.
#[derive(Debug, Default)]
pub struct Case {
    pub policies: Vec<pb::AuthorizationPolicy>,
    pub attrs: Attributes,
}

fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Some(v) = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok())
            {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn values(v: &str) -> Vec<String> {
    v.split(',').map(decode).collect()
}

fn rule(policy: &mut pb::AuthorizationPolicy) -> &mut pb::Rule {
    if policy.rules.is_empty() {
        policy.rules.push(pb::Rule::default());
    }
    policy.rules.last_mut().expect("a rule")
}

impl Case {
    fn policy(&mut self) -> &mut pb::AuthorizationPolicy {
        if self.policies.is_empty() {
            self.policies.push(pb::AuthorizationPolicy {
                name: "p0".into(),
                namespace: "fuzz".into(),
                ..Default::default()
            });
        }
        self.policies.last_mut().expect("a policy")
    }

    /// Reads a case; never fails.
    pub fn parse(text: &str) -> Case {
        let mut c = Case::default();
        for line in text.lines() {
            let mut words = line.split_ascii_whitespace();
            let Some(verb) = words.next() else { continue };
            let pairs = words.map(|w| w.split_once('=').unwrap_or((w, "")));
            match verb {
                "policy" => {
                    let n = c.policies.len();
                    let mut p = pb::AuthorizationPolicy {
                        name: format!("p{n}"),
                        namespace: "fuzz".into(),
                        ..Default::default()
                    };
                    for (k, v) in pairs {
                        match k {
                            "ALLOW" => p.action = 0,
                            "DENY" => p.action = 1,
                            "AUDIT" => p.action = 2,
                            "mesh" => p.mesh_wide = true,
                            "name" => {
                                let v = decode(v);
                                let (ns, name) = v.split_once('/').unwrap_or(("fuzz", &v));
                                p.namespace = ns.to_string();
                                p.name = name.to_string();
                            }
                            "selector" => {
                                if let Some((a, b)) = v.split_once(':') {
                                    p.selector.insert(decode(a), decode(b));
                                }
                            }
                            k => {
                                if let Ok(a) = k.parse::<i32>() {
                                    p.action = a;
                                }
                            }
                        }
                    }
                    c.policies.push(p);
                }
                "rule" => c.policy().rules.push(pb::Rule::default()),
                "from" => {
                    let mut s = pb::Source::default();
                    for (k, v) in pairs {
                        let list = match k {
                            "principals" => &mut s.principals,
                            "notPrincipals" => &mut s.not_principals,
                            "requestPrincipals" => &mut s.request_principals,
                            "notRequestPrincipals" => &mut s.not_request_principals,
                            "namespaces" => &mut s.namespaces,
                            "notNamespaces" => &mut s.not_namespaces,
                            "serviceAccounts" => &mut s.service_accounts,
                            "notServiceAccounts" => &mut s.not_service_accounts,
                            "ipBlocks" => &mut s.ip_blocks,
                            "notIpBlocks" => &mut s.not_ip_blocks,
                            "remoteIpBlocks" => &mut s.remote_ip_blocks,
                            "notRemoteIpBlocks" => &mut s.not_remote_ip_blocks,
                            _ => continue,
                        };
                        list.extend(values(v));
                    }
                    rule(c.policy()).from.push(s);
                }
                "to" => {
                    let mut o = pb::Operation::default();
                    for (k, v) in pairs {
                        let list = match k {
                            "hosts" => &mut o.hosts,
                            "notHosts" => &mut o.not_hosts,
                            "ports" => &mut o.ports,
                            "notPorts" => &mut o.not_ports,
                            "methods" => &mut o.methods,
                            "notMethods" => &mut o.not_methods,
                            "paths" => &mut o.paths,
                            "notPaths" => &mut o.not_paths,
                            _ => continue,
                        };
                        list.extend(values(v));
                    }
                    rule(c.policy()).to.push(o);
                }
                "when" => {
                    let mut cond = pb::Condition::default();
                    for (k, v) in pairs {
                        match k {
                            "values" => cond.values.extend(values(v)),
                            "notValues" => cond.not_values.extend(values(v)),
                            k => cond.key = decode(k),
                        }
                    }
                    rule(c.policy()).when.push(cond);
                }
                "conn" => {
                    let a = &mut c.attrs;
                    for (k, v) in pairs {
                        match k {
                            "src" => a.source_ip = v.parse().ok(),
                            "dst" => a.destination_ip = v.parse().ok(),
                            "port" => a.destination_port = v.parse().unwrap_or_default(),
                            "principal" => a.principal = Some(decode(v)),
                            "pending" => a.l7_pending = true,
                            _ => {}
                        }
                    }
                }
                "req" => {
                    let mut r = Request::default();
                    for (k, v) in pairs {
                        match k {
                            "method" => r.method = decode(v),
                            "path" => r.path = decode(v),
                            "host" => r.host = decode(v),
                            "header" => {
                                let v = decode(v);
                                let (h, val) = v.split_once(':').unwrap_or((&v, ""));
                                r.headers.push((h.to_ascii_lowercase(), val.to_string()));
                            }
                            // A verified JWT: its principal, and claims (`a.b:value`).
                            "jwt" => {
                                let auth = std::sync::Arc::make_mut(
                                    r.auth.get_or_insert_with(Default::default),
                                );
                                auth.principal = decode(v);
                            }
                            "claim" => {
                                let v = decode(v);
                                let (k, val) = v.split_once(':').unwrap_or((&v, ""));
                                let auth = std::sync::Arc::make_mut(
                                    r.auth.get_or_insert_with(Default::default),
                                );
                                if !auth.claims.is_object() {
                                    auth.claims = serde_json::json!({});
                                }
                                let mut at = &mut auth.claims;
                                for part in k.split('.') {
                                    if !at.is_object() {
                                        *at = serde_json::json!({});
                                    }
                                    at = &mut at[part];
                                }
                                *at = serde_json::json!(val);
                            }
                            _ => {}
                        }
                    }
                    c.attrs.request = Some(r);
                }
                _ => {}
            }
        }
        c
    }
}
