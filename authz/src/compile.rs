//! Policies from the wire format into matchers, once per config change.

use super::matchers::{Cidr, StringMatch};
use super::{Action, Attributes};
use std::collections::BTreeMap;
use weft_proto::pb;

/// A policy ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledPolicy {
    pub name: String,
    pub namespace: String,
    /// `namespace/name`, as decisions and metrics name the policy.
    id: std::sync::Arc<str>,
    pub action: Action,
    pub mesh_wide: bool,
    pub selector: BTreeMap<String, String>,
    rules: Vec<Rule>,
    /// Set when the policy could not be compiled: it is then evaluated fail-closed.
    pub broken: Option<String>,
}

#[derive(Debug, Clone, Default)]
struct Rule {
    from: Vec<Source>,
    to: Vec<Operation>,
    when: Vec<Condition>,
}

/// A list of values and its negated twin for one field.
#[derive(Debug, Clone)]
struct Field<T> {
    any: Vec<T>,
    not: Vec<T>,
}

impl<T> Default for Field<T> {
    fn default() -> Self {
        Self {
            any: Vec::new(),
            not: Vec::new(),
        }
    }
}

impl<T> Field<T> {
    fn is_set(&self) -> bool {
        !self.any.is_empty() || !self.not.is_empty()
    }
    /// Positive list matched by one of `v`'s matches, negated list matched by none.
    /// `v = None` (the attribute is absent): a positive list fails, a negated one passes.
    fn check(&self, test: impl Fn(&T) -> bool, present: bool) -> bool {
        if !present {
            return self.any.is_empty();
        }
        (self.any.is_empty() || self.any.iter().any(&test)) && !self.not.iter().any(&test)
    }
}

#[derive(Debug, Clone, Default)]
struct Source {
    principals: Field<StringMatch>,
    namespaces: Field<StringMatch>,
    service_accounts: Field<(String, String)>,
    ip_blocks: Field<Cidr>,
    remote_ip_blocks: Field<Cidr>,
    /// JWT `<iss>/<sub>` of the request (an L7 field).
    request_principals: Field<StringMatch>,
}

#[derive(Debug, Clone, Default)]
struct Operation {
    ports: Field<u16>,
    hosts: Field<StringMatch>,
    methods: Field<StringMatch>,
    paths: Field<StringMatch>,
}

#[derive(Debug, Clone)]
enum Key {
    SourceIp,
    SourceNamespace,
    SourcePrincipal,
    DestinationIp,
    DestinationPort,
    Header(String),
    /// `request.auth.principal`, `.audiences`, `.presenter`, `.claims[a][b]`: the
    /// request's JWT (an L7 field).
    Auth(AuthKey),
    /// SNI, or anything this evaluator cannot see.
    Unsupported,
}

#[derive(Debug, Clone)]
enum AuthKey {
    Principal,
    Audiences,
    Presenter,
    Claim(Vec<String>),
}

#[derive(Debug, Clone)]
struct Condition {
    key: Key,
    values: Vec<String>,
    not_values: Vec<String>,
}

fn strings(v: &[String]) -> Vec<StringMatch> {
    v.iter().map(|s| StringMatch::parse(s)).collect()
}

fn cidrs(v: &[String]) -> Result<Vec<Cidr>, String> {
    v.iter()
        .map(|s| Cidr::parse(s).ok_or_else(|| format!("{s:?} is not an IP or CIDR")))
        .collect()
}

fn ports(v: &[String]) -> Result<Vec<u16>, String> {
    v.iter()
        .map(|s| s.parse::<u16>().map_err(|_| format!("{s:?} is not a port")))
        .collect()
}

fn sas(v: &[String]) -> Result<Vec<(String, String)>, String> {
    v.iter()
        .map(|s| {
            s.split_once('/')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| format!("{s:?} is not <namespace>/<service account>"))
        })
        .collect()
}

fn source(s: &pb::Source) -> Result<Source, String> {
    Ok(Source {
        principals: Field {
            any: strings(&s.principals),
            not: strings(&s.not_principals),
        },
        namespaces: Field {
            any: strings(&s.namespaces),
            not: strings(&s.not_namespaces),
        },
        service_accounts: Field {
            any: sas(&s.service_accounts)?,
            not: sas(&s.not_service_accounts)?,
        },
        ip_blocks: Field {
            any: cidrs(&s.ip_blocks)?,
            not: cidrs(&s.not_ip_blocks)?,
        },
        remote_ip_blocks: Field {
            any: cidrs(&s.remote_ip_blocks)?,
            not: cidrs(&s.not_remote_ip_blocks)?,
        },
        request_principals: Field {
            any: strings(&s.request_principals),
            not: strings(&s.not_request_principals),
        },
    })
}

fn operation(o: &pb::Operation) -> Result<Operation, String> {
    Ok(Operation {
        ports: Field {
            any: ports(&o.ports)?,
            not: ports(&o.not_ports)?,
        },
        hosts: Field {
            any: strings(&o.hosts),
            not: strings(&o.not_hosts),
        },
        methods: Field {
            any: strings(&o.methods),
            not: strings(&o.not_methods),
        },
        paths: Field {
            any: strings(&o.paths),
            not: strings(&o.not_paths),
        },
    })
}

fn condition(c: &pb::Condition) -> Result<Condition, String> {
    let key = match c.key.as_str() {
        "source.ip" | "remote.ip" => Key::SourceIp,
        "source.namespace" => Key::SourceNamespace,
        "source.principal" => Key::SourcePrincipal,
        "destination.ip" => Key::DestinationIp,
        "destination.port" => Key::DestinationPort,
        "request.auth.principal" => Key::Auth(AuthKey::Principal),
        "request.auth.audiences" => Key::Auth(AuthKey::Audiences),
        "request.auth.presenter" => Key::Auth(AuthKey::Presenter),
        k => match (
            k.strip_prefix("request.headers[")
                .and_then(|h| h.strip_suffix(']')),
            weft_proto::validate::claim_path(k),
        ) {
            (Some(h), _) => Key::Header(h.to_ascii_lowercase()),
            (None, Some(path)) => Key::Auth(AuthKey::Claim(
                path.into_iter().map(str::to_string).collect(),
            )),
            (None, None) => Key::Unsupported,
        },
    };
    if matches!(key, Key::SourceIp | Key::DestinationIp) {
        cidrs(&c.values)?;
        cidrs(&c.not_values)?;
    }
    if matches!(key, Key::DestinationPort) {
        ports(&c.values)?;
        ports(&c.not_values)?;
    }
    Ok(Condition {
        key,
        values: c.values.clone(),
        not_values: c.not_values.clone(),
    })
}

/// Compiles a policy. One that does not compile is kept, marked `broken`, and
/// evaluated fail-closed (an ALLOW matches nothing, a DENY matches everything).
pub fn compile(p: &pb::AuthorizationPolicy) -> CompiledPolicy {
    let action = match pb::authorization_policy::Action::try_from(p.action) {
        Ok(pb::authorization_policy::Action::Allow) => Action::Allow,
        Ok(pb::authorization_policy::Action::Audit) => Action::Audit,
        // Unknown actions are treated as DENY: never more permissive.
        _ => Action::Deny,
    };
    let rules: Result<Vec<Rule>, String> = p
        .rules
        .iter()
        .map(|r| {
            Ok(Rule {
                from: r.from.iter().map(source).collect::<Result<_, _>>()?,
                to: r.to.iter().map(operation).collect::<Result<_, _>>()?,
                when: r.when.iter().map(condition).collect::<Result<_, _>>()?,
            })
        })
        .collect();
    let (rules, broken) = match rules {
        Ok(r) => (r, None),
        Err(e) => (Vec::new(), Some(e)),
    };
    CompiledPolicy {
        id: format!("{}/{}", p.namespace, p.name).into(),
        name: p.name.clone(),
        namespace: p.namespace.clone(),
        action,
        mesh_wide: p.mesh_wide,
        selector: p.selector.clone().into_iter().collect(),
        rules,
        broken,
    }
}

impl CompiledPolicy {
    /// `namespace/name`.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// [`id`](Self::id), shared.
    pub fn shared_id(&self) -> std::sync::Arc<str> {
        self.id.clone()
    }

    /// Does any rule read request headers (`when: request.headers[...]`)? Only
    /// then does a request's evaluation need its headers.
    pub fn reads_request_headers(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.when.iter().any(|c| matches!(c.key, Key::Header(_))))
    }

    /// Does the policy apply to a workload in `namespace` with `labels`?
    pub fn applies_to(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        (self.mesh_wide || self.namespace == namespace)
            && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// [`applies_to`](Self::applies_to) with a workload's label map as the wire
    /// format carries it (no copy).
    pub fn applies_to_labels(
        &self,
        namespace: &str,
        labels: &std::collections::BTreeMap<String, String>,
    ) -> bool {
        (self.mesh_wide || self.namespace == namespace)
            && self.selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// Index of the first matching rule.
    pub fn matching_rule(&self, a: &Attributes) -> Option<usize> {
        if self.broken.is_some() {
            // Fail closed: a broken DENY matches everything, a broken ALLOW nothing.
            return (self.action == Action::Deny).then_some(0);
        }
        // `unknown` is what a field this evaluator cannot see evaluates to.
        let unknown = Unknown {
            other: self.action == Action::Deny,
            l7: if a.l7_pending {
                self.action != Action::Deny
            } else {
                self.action == Action::Deny
            },
        };
        self.rules.iter().position(|r| rule_matches(r, a, unknown))
    }

    /// Does the policy have L7 fields (methods, paths, hosts, request headers) that
    /// can apply to traffic on `port`? Such traffic is then parsed as HTTP.
    pub fn needs_http(&self, port: u16) -> bool {
        self.broken.is_none()
            && self.rules.iter().any(|r| {
                let header_cond = r.reads_request();
                let l7_to =
                    r.to.iter()
                        .any(|o| o.is_l7() && o.ports.check(|p| *p == port, true));
                let port_ok =
                    r.to.is_empty() || r.to.iter().any(|o| o.ports.check(|p| *p == port, true));
                l7_to || (header_cond && port_ok)
            })
    }

    /// Human-readable list of the rules with L7 fields (`rules[0]`), for status.
    pub fn l7_rules(&self) -> Vec<usize> {
        self.rules
            .iter()
            .enumerate()
            .filter(|(_, r)| r.to.iter().any(Operation::is_l7) || r.reads_request())
            .map(|(i, _)| i)
            .collect()
    }
}

/// What fields that cannot be evaluated count as: L7 fields without a request, and
/// everything else this evaluator cannot see.
#[derive(Clone, Copy)]
struct Unknown {
    other: bool,
    l7: bool,
}

impl Rule {
    /// Does the rule read the request beyond its operation: its headers or its JWT
    /// (request principals, `request.auth.*`)?
    fn reads_request(&self) -> bool {
        self.from.iter().any(|s| s.request_principals.is_set())
            || self
                .when
                .iter()
                .any(|c| matches!(c.key, Key::Header(_) | Key::Auth(_)))
    }
}

impl Operation {
    fn is_l7(&self) -> bool {
        self.hosts.is_set() || self.methods.is_set() || self.paths.is_set()
    }
}

fn rule_matches(r: &Rule, a: &Attributes, unknown: Unknown) -> bool {
    (r.from.is_empty() || r.from.iter().any(|s| source_matches(s, a, unknown)))
        && (r.to.is_empty() || r.to.iter().any(|o| operation_matches(o, a, unknown.l7)))
        && r.when.iter().all(|c| condition_matches(c, a, unknown))
}

fn source_matches(s: &Source, a: &Attributes, unknown: Unknown) -> bool {
    if s.request_principals.is_set() {
        let jwt_ok = match &a.request {
            // Not HTTP (yet): the request principal cannot be seen.
            None => unknown.l7,
            Some(req) => {
                let p = req
                    .auth
                    .as_deref()
                    .map(|x| x.principal.as_str())
                    .filter(|p| !p.is_empty());
                s.request_principals
                    .check(|m| p.is_some_and(|p| m.matches(p)), p.is_some())
            }
        };
        if !jwt_ok {
            return false;
        }
    }
    let principal = a.principal.as_deref();
    let ns_sa = a.peer_ns_sa();
    let src = a.source_ip;
    s.principals.check(
        |m| principal.is_some_and(|p| m.matches(p)),
        principal.is_some(),
    ) && s.namespaces.check(
        |m| ns_sa.is_some_and(|(ns, _)| m.matches(ns)),
        ns_sa.is_some(),
    ) && s.service_accounts.check(
        |(n, sa)| ns_sa == Some((n.as_str(), sa.as_str())),
        ns_sa.is_some(),
    ) && s
        .ip_blocks
        .check(|c| src.is_some_and(|ip| c.contains(ip)), src.is_some())
        && s.remote_ip_blocks
            .check(|c| src.is_some_and(|ip| c.contains(ip)), src.is_some())
}

fn operation_matches(o: &Operation, a: &Attributes, unknown: bool) -> bool {
    let port_ok = o.ports.check(|p| *p == a.destination_port, true);
    if o.is_l7() && a.request.is_none() {
        // The L7 part cannot be evaluated; the port still must match.
        return port_ok && unknown;
    }
    match &a.request {
        Some(req) => {
            port_ok
                && o.hosts.check(
                    |m| {
                        m.matches_ignore_case(&req.host)
                            || strip_port(&req.host).is_some_and(|h| m.matches_ignore_case(h))
                    },
                    true,
                )
                && o.methods.check(|m| m.matches(&req.method), true)
                && o.paths.check(|m| m.matches(&req.path), true)
        }
        None => port_ok,
    }
}

fn condition_matches(c: &Condition, a: &Attributes, unknown: Unknown) -> bool {
    let test = |v: &str| -> Option<bool> {
        Some(match &c.key {
            Key::SourceIp => Cidr::parse(v)?.contains(a.source_ip?),
            Key::DestinationIp => Cidr::parse(v)?.contains(a.destination_ip?),
            Key::DestinationPort => v.parse::<u16>().ok()? == a.destination_port,
            Key::SourceNamespace => StringMatch::parse(v).matches(a.peer_ns_sa()?.0),
            Key::SourcePrincipal => StringMatch::parse(v).matches(a.principal.as_deref()?),
            Key::Header(h) => {
                let req = a.request.as_ref()?;
                let m = StringMatch::parse(v);
                req.headers.iter().any(|(k, val)| k == h && m.matches(val))
            }
            Key::Auth(_) | Key::Unsupported => return None,
        })
    };
    match &c.key {
        Key::Unsupported => unknown.other,
        Key::Header(_) | Key::Auth(_) if a.request.is_none() => unknown.l7,
        Key::Auth(k) => {
            // The request's JWT values for the key: none without a token.
            let auth = a.request.as_ref().and_then(|r| r.auth.as_deref());
            let have: Vec<String> = match (auth, k) {
                (None, _) => Vec::new(),
                (Some(x), AuthKey::Principal) => vec![x.principal.clone()]
                    .into_iter()
                    .filter(|p| !p.is_empty())
                    .collect(),
                (Some(x), AuthKey::Audiences) => x.audiences.clone(),
                (Some(x), AuthKey::Presenter) => x.presenter.clone().into_iter().collect(),
                (Some(x), AuthKey::Claim(path)) => {
                    let path: Vec<&str> = path.iter().map(String::as_str).collect();
                    weft_authn::claim_values(&x.claims, &path)
                }
            };
            let hit = |v: &String| {
                let m = StringMatch::parse(v);
                have.iter().any(|h| m.matches(h))
            };
            (c.values.is_empty() || c.values.iter().any(hit)) && !c.not_values.iter().any(hit)
        }
        _ => {
            // An absent attribute matches no value (so `values` fails, `notValues` passes).
            let any = c.values.is_empty() || c.values.iter().any(|v| test(v) == Some(true));
            let none = !c.not_values.iter().any(|v| test(v) == Some(true));
            any && none
        }
    }
}

/// `host` without a trailing `:port` (IPv6 literals keep their brackets).
fn strip_port(host: &str) -> Option<&str> {
    let (h, p) = host.rsplit_once(':')?;
    (!p.is_empty()
        && p.bytes().all(|b| b.is_ascii_digit())
        && (!h.contains(':') || h.ends_with(']')))
    .then_some(h)
}
