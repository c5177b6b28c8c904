//! Validation of weft's CRDs. Every problem names the field it is about
//! (`spec.rules[0].from[1].source.ipBlocks[2]`), so users can fix it without guessing.

use crate::crd::{
    Action, AuthorizationPolicySpec, Condition, FailStrategy, MtlsMode, Operation,
    PeerAuthenticationSpec, RequestAuthenticationSpec, Source, WasmPluginSpec, WorkloadSelector,
};
use std::fmt;
use std::net::IpAddr;

/// A problem with one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.message)
    }
}

/// Outcome of validating a resource: hard errors (the resource is not accepted) and
/// fields weft accepts but cannot enforce (reported in status; handled fail-closed).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Report {
    pub errors: Vec<FieldError>,
    pub unsupported: Vec<FieldError>,
}

impl Report {
    fn err(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.errors.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    fn unsupported(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.unsupported.push(FieldError {
            field: field.into(),
            message: message.into(),
        });
    }
    pub fn is_valid(&self) -> bool {
        self.errors.is_empty()
    }
    /// One line listing every error.
    pub fn summary(&self) -> String {
        self.errors
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }
}

/// Keys allowed in `when` conditions (Istio names); `request.headers[<name>]` too.
const WHEN_KEYS: &[&str] = &[
    "source.ip",
    "remote.ip",
    "source.namespace",
    "source.principal",
    "destination.ip",
    "destination.port",
    "connection.sni",
];

/// Is `s` a valid string-match form: exact, `prefix*`, `*suffix` or `*`?
pub fn is_string_match(s: &str) -> bool {
    if s.is_empty() {
        return false;
    }
    if s == "*" {
        return true;
    }
    // At most one '*', at the start or at the end.
    let inner = s.strip_prefix('*').unwrap_or(s);
    let inner = inner.strip_suffix('*').unwrap_or(inner);
    s.matches('*').count() <= 1 && !inner.contains('*')
}

/// Parses an IP address or CIDR (`10.0.0.0/8`, `fd00::/8`, `10.1.2.3`).
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (addr, len) = match s.split_once('/') {
        Some((a, l)) => (a, Some(l)),
        None => (s, None),
    };
    let ip: IpAddr = addr.parse().ok()?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    let len = match len {
        Some(l) => l.parse::<u8>().ok().filter(|l| *l <= max)?,
        None => max,
    };
    Some((ip, len))
}

fn parse_port(s: &str) -> bool {
    s.parse::<u16>().is_ok_and(|p| p > 0)
}

pub fn validate_authorization_policy(spec: &AuthorizationPolicySpec) -> Report {
    let mut r = Report::default();
    if spec.action == Some(Action::Custom) {
        r.err(
            "spec.action",
            "CUSTOM (external authorization) is not supported; use ALLOW, DENY or AUDIT",
        );
    }
    selector(&mut r, spec.selector.as_ref());
    for (i, rule) in spec.rules.iter().enumerate() {
        let base = format!("spec.rules[{i}]");
        for (j, f) in rule.from.iter().enumerate() {
            source(&mut r, &format!("{base}.from[{j}].source"), &f.source);
        }
        for (j, t) in rule.to.iter().enumerate() {
            operation(&mut r, &format!("{base}.to[{j}].operation"), &t.operation);
        }
        for (j, c) in rule.when.iter().enumerate() {
            condition(&mut r, &format!("{base}.when[{j}]"), c);
        }
    }
    r
}

fn selector(r: &mut Report, sel: Option<&WorkloadSelector>) {
    for (k, v) in sel.iter().flat_map(|s| &s.match_labels) {
        if !is_label_key(k) {
            r.err(
                format!("spec.selector.matchLabels[{k}]"),
                "not a valid label key",
            );
        }
        if !is_label_value(v) {
            r.err(
                format!("spec.selector.matchLabels[{k}]"),
                format!("{v:?} is not a valid label value"),
            );
        }
    }
}

/// A PeerAuthentication: a valid selector; `portLevelMtls` keys are port numbers
/// (1-65535) and need a non-empty selector (as in Istio: a port belongs to a
/// workload). DISABLE is accepted and reported as enforced as PERMISSIVE.
pub fn validate_peer_authentication(spec: &PeerAuthenticationSpec) -> Report {
    let mut r = Report::default();
    selector(&mut r, spec.selector.as_ref());
    let has_selector = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if !spec.port_level_mtls.is_empty() && !has_selector {
        r.err(
            "spec.portLevelMtls",
            "needs spec.selector: port-level modes apply to the ports of selected workloads",
        );
    }
    for port in spec.port_level_mtls.keys() {
        if !parse_port(port) {
            r.err(
                format!("spec.portLevelMtls[{port}]"),
                "not a port number (1-65535)",
            );
        }
    }
    let disabled = spec
        .mtls
        .iter()
        .chain(spec.port_level_mtls.values())
        .any(|m| m.mode == Some(MtlsMode::Disable));
    if disabled {
        r.unsupported(
            "spec.mtls.mode",
            "DISABLE is enforced as PERMISSIVE: mesh traffic is always mTLS in weft, and plaintext is accepted",
        );
    }
    r
}

/// Most rules one RequestAuthentication may hold.
pub const MAX_JWT_RULES: usize = 16;

fn is_header_name(n: &str) -> bool {
    !n.is_empty()
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// A RequestAuthentication: an issuer per rule (one rule per issuer), a key set
/// (inline `jwks`, or an http(s) `jwksUri`), valid header names, claims named. The
/// key set itself is checked where it is read (inline: by the control plane's
/// conversion; fetched: by the fetcher).
pub fn validate_request_authentication(spec: &RequestAuthenticationSpec) -> Report {
    let mut r = Report::default();
    selector(&mut r, spec.selector.as_ref());
    if spec.jwt_rules.len() > MAX_JWT_RULES {
        r.err(
            "spec.jwtRules",
            format!("{} rules, at most {MAX_JWT_RULES}", spec.jwt_rules.len()),
        );
    }
    let mut issuers = std::collections::BTreeSet::new();
    for (i, rule) in spec.jwt_rules.iter().enumerate() {
        let base = format!("spec.jwtRules[{i}]");
        if rule.issuer.is_empty() {
            r.err(format!("{base}.issuer"), "required");
        } else if !issuers.insert(rule.issuer.as_str()) {
            r.err(
                format!("{base}.issuer"),
                format!("{:?} has an earlier rule: one rule per issuer", rule.issuer),
            );
        }
        match (&rule.jwks, &rule.jwks_uri) {
            (Some(_), _) => {}
            (None, Some(u)) if u.starts_with("https://") || u.starts_with("http://") => {}
            (None, Some(u)) => r.err(
                format!("{base}.jwksUri"),
                format!("{u:?}: must be an http:// or https:// URL"),
            ),
            (None, None) => r.err(
                format!("{base}.jwksUri"),
                "one of jwksUri or jwks is required",
            ),
        }
        for (j, h) in rule.from_headers.iter().enumerate() {
            if !is_header_name(&h.name) {
                r.err(
                    format!("{base}.fromHeaders[{j}].name"),
                    format!("{:?} is not a header name", h.name),
                );
            }
        }
        for (j, p) in rule.from_params.iter().enumerate() {
            if p.is_empty() {
                r.err(format!("{base}.fromParams[{j}]"), "empty");
            }
        }
        for (j, o) in rule.output_claim_to_headers.iter().enumerate() {
            if !is_header_name(&o.header) {
                r.err(
                    format!("{base}.outputClaimToHeaders[{j}].header"),
                    format!("{:?} is not a header name", o.header),
                );
            }
            if o.claim.is_empty() {
                r.err(
                    format!("{base}.outputClaimToHeaders[{j}].claim"),
                    "required",
                );
            }
        }
    }
    r
}

fn strings(r: &mut Report, field: &str, vals: &[String]) {
    for (k, v) in vals.iter().enumerate() {
        if !is_string_match(v) {
            r.err(
                format!("{field}[{k}]"),
                format!("{v:?} is not a valid match: use an exact value, \"prefix*\", \"*suffix\" or \"*\""),
            );
        }
    }
}

fn source(r: &mut Report, base: &str, s: &Source) {
    for (name, vals) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
    ] {
        strings(r, &format!("{base}.{name}"), vals);
    }
    for (name, vals) in [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
    ] {
        for (k, v) in vals.iter().enumerate() {
            if let Some(rest) = v.strip_prefix("spiffe://") {
                r.err(
                    format!("{base}.{name}[{k}]"),
                    format!("write principals without \"spiffe://\": {rest:?}"),
                );
            }
        }
    }
    for (name, vals) in [
        ("serviceAccounts", &s.service_accounts),
        ("notServiceAccounts", &s.not_service_accounts),
    ] {
        for (k, v) in vals.iter().enumerate() {
            let ok = v
                .split_once('/')
                .is_some_and(|(ns, sa)| !ns.is_empty() && !sa.is_empty() && !sa.contains('/'));
            if !ok {
                r.err(
                    format!("{base}.{name}[{k}]"),
                    format!("{v:?} must be <namespace>/<service account>"),
                );
            }
        }
    }
    for (name, vals) in [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ] {
        for (k, v) in vals.iter().enumerate() {
            if parse_cidr(v).is_none() {
                r.err(
                    format!("{base}.{name}[{k}]"),
                    format!("{v:?} is not an IP address or CIDR"),
                );
            }
        }
    }
    strings(
        r,
        &format!("{base}.requestPrincipals"),
        &s.request_principals,
    );
    strings(
        r,
        &format!("{base}.notRequestPrincipals"),
        &s.not_request_principals,
    );
}

/// The claim path of a `request.auth.claims[a][b]` key (`["a", "b"]`), if it is one.
pub fn claim_path(key: &str) -> Option<Vec<&str>> {
    let mut rest = key.strip_prefix("request.auth.claims")?;
    let mut path = Vec::new();
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let end = inner.find(']')?;
        let name = &inner[..end];
        if name.is_empty() || name.contains('[') {
            return None;
        }
        path.push(name);
        rest = &inner[end + 1..];
    }
    (!path.is_empty() && path.len() <= 8).then_some(path)
}

/// `request.auth.*` keys AuthorizationPolicy conditions may use (claims apart).
pub const AUTH_KEYS: &[&str] = &[
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
];

fn operation(r: &mut Report, base: &str, o: &Operation) {
    for (name, vals) in [("ports", &o.ports), ("notPorts", &o.not_ports)] {
        for (k, v) in vals.iter().enumerate() {
            if !parse_port(v) {
                r.err(
                    format!("{base}.{name}[{k}]"),
                    format!("{v:?} is not a port number (1-65535)"),
                );
            }
        }
    }
    for (name, vals) in [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
        ("paths", &o.paths),
        ("notPaths", &o.not_paths),
    ] {
        strings(r, &format!("{base}.{name}"), vals);
    }
    for (name, vals) in [("paths", &o.paths), ("notPaths", &o.not_paths)] {
        for (k, v) in vals.iter().enumerate() {
            if !(v.starts_with('/') || v.starts_with('*')) {
                r.err(
                    format!("{base}.{name}[{k}]"),
                    format!("{v:?} must start with '/' (or be a \"*suffix\" match)"),
                );
            }
        }
    }
}

fn condition(r: &mut Report, base: &str, c: &Condition) {
    let header = c
        .key
        .strip_prefix("request.headers[")
        .and_then(|h| h.strip_suffix(']'));
    if let Some(h) = header {
        if h.is_empty() {
            r.err(
                format!("{base}.key"),
                "request.headers[] needs a header name",
            );
        }
    } else if c.key.starts_with("request.auth.") {
        if !AUTH_KEYS.contains(&c.key.as_str()) && claim_path(&c.key).is_none() {
            r.err(
                format!("{base}.key"),
                format!(
                    "unknown key {:?}; JWT keys: {}, request.auth.claims[<name>] (nested: [<a>][<b>], at most 8)",
                    c.key,
                    AUTH_KEYS.join(", ")
                ),
            );
        }
    } else if !WHEN_KEYS.contains(&c.key.as_str()) {
        r.err(
            format!("{base}.key"),
            format!(
                "unknown key {:?}; supported: {}, request.headers[<name>]",
                c.key,
                WHEN_KEYS.join(", ")
            ),
        );
    }
    if c.values.is_empty() && c.not_values.is_empty() {
        r.err(base.to_string(), "needs values or notValues");
    }
    for (name, vals) in [("values", &c.values), ("notValues", &c.not_values)] {
        for (k, v) in vals.iter().enumerate() {
            let field = format!("{base}.{name}[{k}]");
            match c.key.as_str() {
                "source.ip" | "remote.ip" | "destination.ip" => {
                    if parse_cidr(v).is_none() {
                        r.err(field, format!("{v:?} is not an IP address or CIDR"));
                    }
                }
                "destination.port" => {
                    if !parse_port(v) {
                        r.err(field, format!("{v:?} is not a port number (1-65535)"));
                    }
                }
                _ => {
                    if !is_string_match(v) {
                        r.err(field, format!("{v:?} is not a valid match: use an exact value, \"prefix*\", \"*suffix\" or \"*\""));
                    }
                }
            }
        }
    }
}

pub fn validate_wasm_plugin(spec: &WasmPluginSpec) -> Report {
    let mut r = Report::default();
    let url = spec.url.as_str();
    let is_http = url.starts_with("http://") || url.starts_with("https://");
    if let Some(rest) = url.strip_prefix("oci://") {
        if !rest
            .split_once('/')
            .is_some_and(|(reg, repo)| !reg.is_empty() && !repo.is_empty())
        {
            r.err(
                "spec.url",
                format!(
                    "{url:?}: an OCI reference is oci://registry/repository[:tag][@sha256:digest]"
                ),
            );
        }
    } else if !(url.starts_with("file://") || is_http) {
        r.err(
            "spec.url",
            format!("{url:?}: the scheme must be file://, http://, https:// or oci://"),
        );
    }
    if let Some(p) = &spec.image_pull_policy {
        if p != "IfNotPresent" && p != "Always" {
            r.err(
                "spec.imagePullPolicy",
                format!("{p:?} is not IfNotPresent or Always"),
            );
        }
    }
    match &spec.sha256 {
        Some(d) if !(d.len() == 64 && d.bytes().all(|b| b.is_ascii_hexdigit())) => {
            r.err("spec.sha256", "must be 64 hexadecimal digits");
        }
        None if is_http => r.err("spec.sha256", "is required for http(s) URLs"),
        _ => {}
    }
    for (i, m) in spec.match_.iter().enumerate() {
        for (j, p) in m.ports.iter().enumerate() {
            if p.number == 0 || p.number > 65535 {
                r.err(
                    format!("spec.match[{i}].ports[{j}].number"),
                    format!("{} is not a port number (1-65535)", p.number),
                );
            }
        }
    }
    if let Some(l) = &spec.limits {
        use crate::wasm_abi::{MAX_CPU_MILLIS_PER_CALLBACK, MAX_MEMORY_BYTES, MIN_MEMORY_BYTES};
        if let Some(ms) = l.cpu_time_per_callback_millis {
            if !(1..=MAX_CPU_MILLIS_PER_CALLBACK).contains(&ms) {
                r.err(
                    "spec.limits.cpuTimePerCallbackMillis",
                    format!(
                        "{ms} is out of range: 1 to {MAX_CPU_MILLIS_PER_CALLBACK} (milliseconds)"
                    ),
                );
            }
        }
        if let Some(m) = l.memory_bytes {
            if !(MIN_MEMORY_BYTES..=MAX_MEMORY_BYTES).contains(&m) {
                r.err(
                    "spec.limits.memoryBytes",
                    format!(
                        "{m} is out of range: {MIN_MEMORY_BYTES} (one Wasm page) to {MAX_MEMORY_BYTES} (256 MiB)"
                    ),
                );
            }
        }
    }
    if let Some(cfg) = &spec.plugin_config {
        if !cfg.is_object() {
            r.err("spec.pluginConfig", "must be an object");
        }
    }
    let _ = FailStrategy::default();
    r
}

/// Kubernetes label key: optional DNS prefix + '/' + name (<= 63, alnum ends, `-_.` inside).
pub fn is_label_key(k: &str) -> bool {
    let (prefix, name) = match k.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, k),
    };
    if let Some(p) = prefix {
        if p.is_empty()
            || p.len() > 253
            || !p.split('.').all(|l| {
                !l.is_empty()
                    && l.bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            })
        {
            return false;
        }
    }
    !name.is_empty() && is_label_value(name)
}

/// Kubernetes label value: empty, or <= 63 chars, alnum at both ends, `-_.` inside.
pub fn is_label_value(v: &str) -> bool {
    if v.is_empty() {
        return true;
    }
    let b = v.as_bytes();
    v.len() <= 63
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::{From, Rule, To, WorkloadSelector};

    #[test]
    fn string_match_forms() {
        for ok in ["a", "abc*", "*abc", "*", "/api/*"] {
            assert!(is_string_match(ok), "{ok}");
        }
        for bad in ["", "a*b", "**", "*a*"] {
            assert!(!is_string_match(bad), "{bad}");
        }
    }

    #[test]
    fn peer_authentication_fields() {
        use crate::crd::MutualTls;
        let mode = |m| MutualTls { mode: Some(m) };
        let sel = Some(WorkloadSelector {
            match_labels: [("app".to_string(), "db".to_string())].into(),
        });
        let ok = PeerAuthenticationSpec {
            selector: sel.clone(),
            mtls: Some(mode(MtlsMode::Strict)),
            port_level_mtls: [("9090".to_string(), mode(MtlsMode::Permissive))].into(),
        };
        assert_eq!(validate_peer_authentication(&ok), Report::default());
        let no_selector = PeerAuthenticationSpec {
            selector: None,
            ..ok.clone()
        };
        let r = validate_peer_authentication(&no_selector);
        assert_eq!(
            r.errors
                .iter()
                .map(|e| e.field.as_str())
                .collect::<Vec<_>>(),
            ["spec.portLevelMtls"]
        );
        let bad_port = PeerAuthenticationSpec {
            port_level_mtls: [
                ("0".to_string(), mode(MtlsMode::Strict)),
                ("http".to_string(), mode(MtlsMode::Strict)),
                ("65536".to_string(), mode(MtlsMode::Strict)),
            ]
            .into(),
            ..ok.clone()
        };
        let r = validate_peer_authentication(&bad_port);
        assert_eq!(
            r.errors
                .iter()
                .map(|e| e.field.as_str())
                .collect::<Vec<_>>(),
            [
                "spec.portLevelMtls[0]",
                "spec.portLevelMtls[65536]",
                "spec.portLevelMtls[http]"
            ]
        );
        let disable = PeerAuthenticationSpec {
            mtls: Some(mode(MtlsMode::Disable)),
            ..Default::default()
        };
        let r = validate_peer_authentication(&disable);
        assert!(r.is_valid());
        assert_eq!(r.unsupported.len(), 1, "{r:?}");
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8").map(|x| x.1), Some(8));
        assert_eq!(parse_cidr("10.1.2.3").map(|x| x.1), Some(32));
        assert_eq!(parse_cidr("fd00::/8").map(|x| x.1), Some(8));
        assert!(parse_cidr("10.0.0.0/33").is_none());
        assert!(parse_cidr("nope").is_none());
    }

    #[test]
    fn errors_name_the_field() {
        let spec = AuthorizationPolicySpec {
            selector: Some(WorkloadSelector {
                match_labels: [("app".to_string(), "bad value!".to_string())].into(),
            }),
            action: Some(Action::Allow),
            rules: vec![Rule {
                from: vec![From {
                    source: Source {
                        ip_blocks: vec!["10.0.0.0/8".into(), "10.0.0.0/99".into()],
                        service_accounts: vec!["justsa".into()],
                        principals: vec!["spiffe://cluster.local/ns/a/sa/b".into()],
                        request_principals: vec!["iss/sub".into()],
                        ..Default::default()
                    },
                }],
                to: vec![To {
                    operation: Operation {
                        ports: vec!["8080".into(), "http".into()],
                        paths: vec!["/a*b".into()],
                        ..Default::default()
                    },
                }],
                when: vec![
                    Condition {
                        key: "source.nonsense".into(),
                        values: vec!["x".into()],
                        not_values: vec![],
                    },
                    Condition {
                        key: "destination.port".into(),
                        values: vec!["0".into()],
                        not_values: vec![],
                    },
                ],
            }],
        };
        let r = validate_authorization_policy(&spec);
        let fields: Vec<&str> = r.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            vec![
                "spec.selector.matchLabels[app]",
                "spec.rules[0].from[0].source.principals[0]",
                "spec.rules[0].from[0].source.serviceAccounts[0]",
                "spec.rules[0].from[0].source.ipBlocks[1]",
                "spec.rules[0].to[0].operation.ports[1]",
                "spec.rules[0].to[0].operation.paths[0]",
                "spec.rules[0].when[0].key",
                "spec.rules[0].when[1].values[0]",
            ]
        );
        // JWT request principals are enforced (with RequestAuthentication).
        assert!(r.unsupported.is_empty(), "{:?}", r.unsupported);
    }

    #[test]
    fn jwt_condition_keys() {
        assert_eq!(
            claim_path("request.auth.claims[groups]"),
            Some(vec!["groups"])
        );
        assert_eq!(
            claim_path("request.auth.claims[a][b]"),
            Some(vec!["a", "b"])
        );
        for bad in [
            "request.auth.claims",
            "request.auth.claims[]",
            "request.auth.claims[a",
            "request.auth.claims[a]x",
            "request.auth.claims[a[b]]",
        ] {
            assert_eq!(claim_path(bad), None, "{bad}");
        }
        let with = |key: &str| AuthorizationPolicySpec {
            rules: vec![Rule {
                when: vec![Condition {
                    key: key.into(),
                    values: vec!["x".into()],
                    not_values: vec![],
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        for ok in [
            "request.auth.principal",
            "request.auth.audiences",
            "request.auth.presenter",
            "request.auth.claims[iss]",
        ] {
            assert!(validate_authorization_policy(&with(ok)).is_valid(), "{ok}");
        }
        let r = validate_authorization_policy(&with("request.auth.nope"));
        assert_eq!(r.errors[0].field, "spec.rules[0].when[0].key");
    }

    #[test]
    fn request_authentication_fields() {
        use crate::crd::{ClaimToHeader, JwtHeader, JwtRule};
        let ok = RequestAuthenticationSpec {
            selector: None,
            jwt_rules: vec![JwtRule {
                issuer: "https://issuer.example".into(),
                jwks_uri: Some("https://issuer.example/keys".into()),
                ..Default::default()
            }],
        };
        assert_eq!(validate_request_authentication(&ok), Report::default());
        let bad = RequestAuthenticationSpec {
            selector: None,
            jwt_rules: vec![
                JwtRule::default(),
                JwtRule {
                    issuer: "a".into(),
                    jwks_uri: Some("ftp://x".into()),
                    from_headers: vec![JwtHeader {
                        name: "bad header".into(),
                        prefix: None,
                    }],
                    output_claim_to_headers: vec![ClaimToHeader {
                        header: "x-sub".into(),
                        claim: String::new(),
                    }],
                    ..Default::default()
                },
                JwtRule {
                    issuer: "a".into(),
                    jwks: Some("{}".into()),
                    ..Default::default()
                },
            ],
        };
        let r = validate_request_authentication(&bad);
        let fields: Vec<&str> = r.errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "spec.jwtRules[0].issuer",
                "spec.jwtRules[0].jwksUri",
                "spec.jwtRules[1].jwksUri",
                "spec.jwtRules[1].fromHeaders[0].name",
                "spec.jwtRules[1].outputClaimToHeaders[0].claim",
                "spec.jwtRules[2].issuer",
            ]
        );
    }

    #[test]
    fn custom_action_refused() {
        let spec = AuthorizationPolicySpec {
            action: Some(Action::Custom),
            ..Default::default()
        };
        let r = validate_authorization_policy(&spec);
        assert_eq!(r.errors[0].field, "spec.action");
    }

    #[test]
    fn wasm_plugin_rules() {
        let mut spec = WasmPluginSpec {
            url: "https://example.invalid/p.wasm".into(),
            ..Default::default()
        };
        let r = validate_wasm_plugin(&spec);
        assert_eq!(r.errors[0].field, "spec.sha256");
        spec.url = "oci://registry/p:1".into();
        spec.sha256 = Some("00".repeat(32));
        assert!(validate_wasm_plugin(&spec).is_valid());
        spec.url = "oci://registry-only".into();
        assert_eq!(validate_wasm_plugin(&spec).errors[0].field, "spec.url");
        spec.url = "oci://registry/p:1".into();
        spec.image_pull_policy = Some("Never".into());
        assert_eq!(
            validate_wasm_plugin(&spec).errors[0].field,
            "spec.imagePullPolicy"
        );
        spec.image_pull_policy = Some("Always".into());
        assert!(validate_wasm_plugin(&spec).is_valid());
        spec.url = "file:///plugins/p.wasm".into();
        assert!(validate_wasm_plugin(&spec).is_valid());
        spec.sha256 = Some("zz".into());
        assert_eq!(validate_wasm_plugin(&spec).errors[0].field, "spec.sha256");
    }

    /// The limits have bounds on both sides; each error names its field.
    #[test]
    fn wasm_plugin_limits_are_bounded() {
        use crate::crd::PluginLimits;
        use crate::wasm_abi::{MAX_CPU_MILLIS_PER_CALLBACK, MAX_MEMORY_BYTES, MIN_MEMORY_BYTES};
        let with = |cpu: Option<u64>, mem: Option<u64>| {
            validate_wasm_plugin(&WasmPluginSpec {
                url: "file:///plugins/p.wasm".into(),
                limits: Some(PluginLimits {
                    cpu_time_per_callback_millis: cpu,
                    memory_bytes: mem,
                }),
                ..Default::default()
            })
        };
        for ok in [
            with(Some(1), Some(MIN_MEMORY_BYTES)),
            with(Some(MAX_CPU_MILLIS_PER_CALLBACK), Some(MAX_MEMORY_BYTES)),
            with(None, None),
        ] {
            assert!(ok.is_valid(), "{ok:?}");
        }
        for (cpu, mem, field, says) in [
            (
                Some(0),
                None,
                "spec.limits.cpuTimePerCallbackMillis",
                "0 is out of range: 1 to 1000",
            ),
            (
                Some(1001),
                None,
                "spec.limits.cpuTimePerCallbackMillis",
                "1001 is out of range",
            ),
            (
                Some(u64::MAX),
                None,
                "spec.limits.cpuTimePerCallbackMillis",
                "out of range",
            ),
            (
                None,
                Some(65535),
                "spec.limits.memoryBytes",
                "65535 is out of range: 65536",
            ),
            (
                None,
                Some(MAX_MEMORY_BYTES + 1),
                "spec.limits.memoryBytes",
                "to 268435456 (256 MiB)",
            ),
            (
                None,
                Some(u64::MAX),
                "spec.limits.memoryBytes",
                "out of range",
            ),
        ] {
            let r = with(cpu, mem);
            assert_eq!(r.errors.len(), 1, "{r:?}");
            assert_eq!(r.errors[0].field, field);
            assert!(r.errors[0].message.contains(says), "{:?}", r.errors[0]);
        }
    }

    #[test]
    fn label_syntax() {
        assert!(is_label_key("weft.dev/mesh"));
        assert!(is_label_key("app"));
        assert!(!is_label_key("/app"));
        assert!(!is_label_key("Weft.dev/mesh"));
        assert!(is_label_value(""));
        assert!(!is_label_value("-a"));
    }
}
