//! Gateway API routes for the mesh (GAMMA): `HTTPRoute` and `GRPCRoute` objects whose
//! `parentRefs` name a Service, turned into the [`pb::Route`] resources source nodes
//! route with, and the status each parent gets.
//!
//! - Only Service parents (`group: ""`, `kind: Service`) are weft's; a route's other
//!   parents (Gateways) are left to their controllers and get no status from weft.
//! - A parent is accepted when its Service exists (and has the port the parentRef
//!   names). A route in the Service's namespace is a *producer* route (it applies
//!   to every client); one in another namespace is a *consumer* route (it applies
//!   to clients in its own namespace, which then ignore the producer routes).
//! - A route whose spec cannot be applied as written (an unsupported filter, a
//!   regular expression that does not compile, a bad duration) is refused as a
//!   whole: `Accepted=False`, `UnsupportedValue`; it never half-applies.
//! - Backends are Services of the route's namespace, or of another namespace whose
//!   `ReferenceGrant` lets routes of the route's kind and namespace name them. One
//!   that does not resolve (missing, another kind, another namespace without a
//!   grant) is kept with its weight and marked invalid, so its share of requests
//!   gets a 500, and `ResolvedRefs=False` says why.
//! - `spec.hostnames` is ignored: mesh traffic is routed by the Service the client
//!   connected to, not by its `Host` header.

use crate::manifest::ObjectRef;
use k8s_openapi::api::core::v1::Service;
use std::collections::BTreeMap;
use std::str::FromStr;
use weft_proto::gateway::{grpc, http, GrpcRoute, HttpRoute, ReferenceGrant};
use weft_proto::pb;
use weft_proto::pb::route_filter::Kind as FilterKind;

/// Largest regular expression accepted in a match (bytes of pattern).
pub const MAX_REGEX_LEN: usize = 1024;
/// Compiled size bound for a route's regular expressions (the node uses the same).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;
/// Most retry attempts a rule may ask for.
pub const MAX_ATTEMPTS: i64 = 10;

/// A route's status for one Service parent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentStatus {
    pub service_namespace: String,
    pub service_name: String,
    /// The parentRef's port, if it named one.
    pub port: Option<i32>,
    /// The parentRef's own namespace field, as written (for the status entry's
    /// parentRef, which must equal the spec's).
    pub ref_namespace: Option<String>,
    pub accepted: Condition,
    pub resolved_refs: Condition,
}

/// One condition: status, reason and message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    fn ok(reason: &'static str, message: &str) -> Self {
        Self {
            status: true,
            reason,
            message: message.into(),
        }
    }
    fn no(reason: &'static str, message: String) -> Self {
        Self {
            status: false,
            reason,
            message,
        }
    }
}

/// The status weft gives one route.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteStatus {
    pub generation: Option<i64>,
    pub parents: Vec<ParentStatus>,
}

/// A route object of either kind.
#[derive(Debug, Clone, Copy)]
pub enum AnyRoute<'a> {
    Http(&'a HttpRoute),
    Grpc(&'a GrpcRoute),
}

impl AnyRoute<'_> {
    fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
        match self {
            AnyRoute::Http(r) => &r.metadata,
            AnyRoute::Grpc(r) => &r.metadata,
        }
    }

    pub fn object_ref(&self) -> ObjectRef {
        let m = self.meta();
        ObjectRef {
            kind: match self {
                AnyRoute::Http(_) => "HTTPRoute",
                AnyRoute::Grpc(_) => "GRPCRoute",
            },
            namespace: m.namespace.clone().unwrap_or_default(),
            name: m.name.clone().unwrap_or_default(),
        }
    }
}

/// Everything wrong with a route's spec that makes it impossible to apply as
/// written, by field (references to missing Services are not: they resolve later).
pub fn spec_errors(route: AnyRoute<'_>) -> Vec<weft_proto::validate::FieldError> {
    match rules_of(route) {
        Ok(_) => Vec::new(),
        Err(e) => vec![e],
    }
}

fn field_error(field: String, message: impl Into<String>) -> weft_proto::validate::FieldError {
    weft_proto::validate::FieldError {
        field,
        message: message.into(),
    }
}

type FieldResult<T> = Result<T, weft_proto::validate::FieldError>;

/// A rule as written, in the one shape both kinds share (backends unresolved).
struct RawRule {
    name: String,
    matches: Vec<pb::RouteMatch>,
    filters: Vec<pb::RouteFilter>,
    backends: Vec<RawBackend>,
    request_timeout_ms: u64,
    backend_request_timeout_ms: u64,
    retry: Option<pb::RouteRetry>,
}

struct RawBackend {
    field: String,
    group: String,
    kind: String,
    namespace: Option<String>,
    name: String,
    port: Option<i32>,
    weight: u32,
    filters: Vec<pb::RouteFilter>,
}

fn regex_ok(field: String, pattern: &str) -> FieldResult<()> {
    if pattern.len() > MAX_REGEX_LEN {
        return Err(field_error(
            field,
            format!("regular expression longer than {MAX_REGEX_LEN} bytes"),
        ));
    }
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map(|_| ())
        .map_err(|e| field_error(field, format!("not a valid regular expression: {e}")))
}

fn duration_ms(field: String, v: &Option<String>) -> FieldResult<u64> {
    let Some(v) = v else { return Ok(0) };
    let d = gateway_api::Duration::from_str(v)
        .map_err(|e| field_error(field, format!("{v:?} is not a Gateway API duration: {e}")))?;
    Ok(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn header_name_ok(field: String, name: &str) -> FieldResult<String> {
    ::http::HeaderName::from_bytes(name.as_bytes())
        .map(|n| n.as_str().to_string())
        .map_err(|_| field_error(field, format!("{name:?} is not a valid header name")))
}

fn header_value_ok(field: String, v: &str) -> FieldResult<()> {
    ::http::HeaderValue::from_str(v)
        .map(|_| ())
        .map_err(|_| field_error(field, format!("{v:?} is not a valid header value")))
}

fn value_match(
    field: String,
    name: String,
    regex: bool,
    value: &str,
) -> FieldResult<pb::ValueMatch> {
    let kind = if regex {
        regex_ok(format!("{field}.value"), value)?;
        pb::MatchKind::Regex
    } else {
        pb::MatchKind::Exact
    };
    Ok(pb::ValueMatch {
        name,
        kind: kind as i32,
        value: value.to_string(),
    })
}

fn http_match(field: &str, m: &http::HttpRouteRulesMatches) -> FieldResult<pb::RouteMatch> {
    let mut out = pb::RouteMatch::default();
    if let Some(p) = &m.path {
        let value = p.value.clone().unwrap_or_else(|| "/".into());
        let kind = match p.r#type {
            Some(http::HttpRouteRulesMatchesPathType::Exact) => pb::MatchKind::Exact,
            Some(http::HttpRouteRulesMatchesPathType::RegularExpression) => {
                regex_ok(format!("{field}.path.value"), &value)?;
                pb::MatchKind::Regex
            }
            _ => pb::MatchKind::Prefix,
        };
        if kind != pb::MatchKind::Regex && !value.starts_with('/') {
            return Err(field_error(
                format!("{field}.path.value"),
                format!("{value:?} must start with '/'"),
            ));
        }
        out.path = Some(pb::PathMatch {
            kind: kind as i32,
            value,
        });
    }
    for (i, h) in m.headers.iter().flatten().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = header_name_ok(format!("{f}.name"), &h.name)?;
        let regex = matches!(
            h.r#type,
            Some(http::HttpRouteRulesMatchesHeadersType::RegularExpression)
        );
        out.headers.push(value_match(f, name, regex, &h.value)?);
    }
    for (i, q) in m.query_params.iter().flatten().enumerate() {
        let f = format!("{field}.queryParams[{i}]");
        let regex = matches!(
            q.r#type,
            Some(http::HttpRouteRulesMatchesQueryParamsType::RegularExpression)
        );
        out.query_params
            .push(value_match(f, q.name.clone(), regex, &q.value)?);
    }
    if let Some(method) = &m.method {
        out.method = serde_json::to_value(method)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
    }
    Ok(out)
}

/// A GRPCRoute method match as the request path it selects (`/service/method`).
fn grpc_match(field: &str, m: &grpc::GrpcRouteRulesMatches) -> FieldResult<pb::RouteMatch> {
    let mut out = pb::RouteMatch::default();
    if let Some(mm) = &m.method {
        let regex = matches!(
            mm.r#type,
            Some(grpc::GrpcRouteRulesMatchesMethodType::RegularExpression)
        );
        let service = mm.service.clone().filter(|s| !s.is_empty());
        let method = mm.method.clone().filter(|s| !s.is_empty());
        let f = format!("{field}.method");
        for (part, v) in [("service", &service), ("method", &method)] {
            if let Some(v) = v {
                if regex {
                    regex_ok(format!("{f}.{part}"), v)?;
                } else if v.contains('/') {
                    return Err(field_error(
                        format!("{f}.{part}"),
                        format!("{v:?} must not contain '/'"),
                    ));
                }
            }
        }
        out.path = match (service, method, regex) {
            (None, None, _) => {
                return Err(field_error(
                    f,
                    "one of service and method must be set".to_string(),
                ))
            }
            (Some(s), Some(m), false) => Some(pb::PathMatch {
                kind: pb::MatchKind::Exact as i32,
                value: format!("/{s}/{m}"),
            }),
            (Some(s), None, false) => Some(pb::PathMatch {
                kind: pb::MatchKind::Prefix as i32,
                value: format!("/{s}/"),
            }),
            (s, m, regex) => {
                let part = |v: Option<String>| match (v, regex) {
                    (Some(v), true) => format!("(?:{v})"),
                    (Some(v), false) => regex::escape(&v),
                    (None, _) => "[^/]+".to_string(),
                };
                Some(pb::PathMatch {
                    kind: pb::MatchKind::Regex as i32,
                    value: format!("/{}/{}", part(s), part(m)),
                })
            }
        };
    }
    for (i, h) in m.headers.iter().flatten().enumerate() {
        let f = format!("{field}.headers[{i}]");
        let name = header_name_ok(format!("{f}.name"), &h.name)?;
        let regex = serde_json::to_value(&h.r#type)
            .ok()
            .is_some_and(|v| v == "RegularExpression");
        out.headers.push(value_match(f, name, regex, &h.value)?);
    }
    // gRPC is always POST; a method condition would add nothing.
    Ok(out)
}

/// Fields a header modifier may not touch: message framing and connection
/// management belong to the proxy (and a route could desynchronize a connection).
const PROTECTED_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
];

fn header_modifier(
    field: &str,
    m: &http::HttpRouteRulesFiltersRequestHeaderModifier,
) -> FieldResult<pb::HeaderModifier> {
    let protected = |f: String, name: &str| -> FieldResult<()> {
        if PROTECTED_HEADERS.contains(&name) {
            return Err(field_error(
                f,
                format!("{name:?} cannot be modified: the proxy manages it"),
            ));
        }
        Ok(())
    };
    for (i, h) in m.set.iter().flatten().enumerate() {
        protected(
            format!("{field}.set[{i}].name"),
            &h.name.to_ascii_lowercase(),
        )?;
    }
    for (i, h) in m.add.iter().flatten().enumerate() {
        protected(
            format!("{field}.add[{i}].name"),
            &h.name.to_ascii_lowercase(),
        )?;
    }
    for (i, n) in m.remove.iter().flatten().enumerate() {
        protected(format!("{field}.remove[{i}]"), &n.to_ascii_lowercase())?;
    }
    let mut out = pb::HeaderModifier::default();
    for (i, h) in m.set.iter().flatten().enumerate() {
        let f = format!("{field}.set[{i}]");
        out.set.push(pb::HeaderValue {
            name: header_name_ok(format!("{f}.name"), &h.name)?,
            value: {
                header_value_ok(format!("{f}.value"), &h.value)?;
                h.value.clone()
            },
        });
    }
    for (i, h) in m.add.iter().flatten().enumerate() {
        let f = format!("{field}.add[{i}]");
        out.add.push(pb::HeaderValue {
            name: header_name_ok(format!("{f}.name"), &h.name)?,
            value: {
                header_value_ok(format!("{f}.value"), &h.value)?;
                h.value.clone()
            },
        });
    }
    for (i, name) in m.remove.iter().flatten().enumerate() {
        out.remove
            .push(header_name_ok(format!("{field}.remove[{i}]"), name)?);
    }
    Ok(out)
}

/// Re-reads one Gateway API type as another with the same JSON shape (the crate
/// generates a distinct type per place a shape appears).
fn reshape<A: serde::Serialize, B: serde::de::DeserializeOwned>(
    field: &str,
    a: &A,
) -> FieldResult<B> {
    serde_json::to_value(a)
        .and_then(serde_json::from_value)
        .map_err(|e| field_error(field.to_string(), e.to_string()))
}

fn path_modifier(
    field: &str,
    kind: &str,
    full: &Option<String>,
    prefix: &Option<String>,
    rule_matches: &[pb::RouteMatch],
) -> FieldResult<pb::PathModifier> {
    if kind == "ReplacePrefixMatch" {
        // Only meaningful when the rule matches on a path prefix.
        // No matches, or a match without a path, is a PathPrefix "/".
        let all_prefix = rule_matches.iter().all(|m| {
            m.path
                .as_ref()
                .is_none_or(|p| p.kind == pb::MatchKind::Prefix as i32)
        });
        if !all_prefix {
            return Err(field_error(
                field.to_string(),
                "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match",
            ));
        }
        return Ok(pb::PathModifier {
            prefix: true,
            value: prefix.clone().unwrap_or_else(|| "/".into()),
        });
    }
    Ok(pb::PathModifier {
        prefix: false,
        value: full.clone().unwrap_or_else(|| "/".into()),
    })
}

fn filter(
    field: &str,
    f: &http::HttpRouteRulesFilters,
    rule_matches: &[pb::RouteMatch],
) -> FieldResult<pb::RouteFilter> {
    use http::HttpRouteRulesFiltersType as T;
    let missing = || {
        field_error(
            field.to_string(),
            "the field its type names is missing".to_string(),
        )
    };
    let kind = match &f.r#type {
        T::RequestHeaderModifier => FilterKind::RequestHeaders(header_modifier(
            &format!("{field}.requestHeaderModifier"),
            f.request_header_modifier.as_ref().ok_or_else(missing)?,
        )?),
        T::ResponseHeaderModifier => {
            let m: http::HttpRouteRulesFiltersRequestHeaderModifier = reshape(
                field,
                f.response_header_modifier.as_ref().ok_or_else(missing)?,
            )?;
            FilterKind::ResponseHeaders(header_modifier(
                &format!("{field}.responseHeaderModifier"),
                &m,
            )?)
        }
        T::RequestRedirect => {
            let r = f.request_redirect.as_ref().ok_or_else(missing)?;
            let path = match &r.path {
                Some(p) => Some(path_modifier(
                    &format!("{field}.requestRedirect.path"),
                    &serde_json::to_value(&p.r#type)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    &p.replace_full_path,
                    &p.replace_prefix_match,
                    rule_matches,
                )?),
                None => None,
            };
            FilterKind::Redirect(pb::RequestRedirect {
                scheme: serde_json::to_value(&r.scheme)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_ascii_lowercase))
                    .unwrap_or_default(),
                hostname: r.hostname.clone().unwrap_or_default(),
                path,
                port: r.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                status_code: r
                    .status_code
                    .and_then(|c| u32::try_from(c).ok())
                    .unwrap_or(302),
            })
        }
        T::UrlRewrite => {
            let r = f.url_rewrite.as_ref().ok_or_else(missing)?;
            let path = match &r.path {
                Some(p) => Some(path_modifier(
                    &format!("{field}.urlRewrite.path"),
                    &serde_json::to_value(&p.r#type)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default(),
                    &p.replace_full_path,
                    &p.replace_prefix_match,
                    rule_matches,
                )?),
                None => None,
            };
            FilterKind::Rewrite(pb::UrlRewrite {
                hostname: r.hostname.clone().unwrap_or_default(),
                path,
            })
        }
        T::RequestMirror => {
            let m = f.request_mirror.as_ref().ok_or_else(missing)?;
            let per_million = match (&m.fraction, m.percent) {
                (Some(fr), _) => {
                    let den = i64::from(fr.denominator.unwrap_or(100).max(1));
                    let num = i64::from(fr.numerator.clamp(0, i32::MAX)).min(den);
                    u32::try_from(num * 1_000_000 / den).unwrap_or(1_000_000)
                }
                (None, Some(p)) => u32::try_from(p.clamp(0, 100)).unwrap_or(100) * 10_000,
                (None, None) => 1_000_000,
            };
            let b = &m.backend_ref;
            FilterKind::Mirror(pb::RequestMirror {
                backend: Some(pb::RouteBackend {
                    // Resolved by the caller, as every backend is.
                    service_namespace: b.namespace.clone().unwrap_or_default(),
                    service_name: b.name.clone(),
                    port: b.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
                    weight: 1,
                    invalid: match (b.group.as_deref(), b.kind.as_deref()) {
                        (None | Some(""), None | Some("Service")) => String::new(),
                        (g, k) => format!(
                            "mirror backend kind {}/{} is not supported: only Services",
                            g.unwrap_or(""),
                            k.unwrap_or("Service")
                        ),
                    },
                    filters: Vec::new(),
                }),
                per_million,
            })
        }
        other => {
            return Err(field_error(
                format!("{field}.type"),
                format!(
                    "{} filters are not supported by weft",
                    serde_json::to_value(other)
                        .ok()
                        .and_then(|v| v.as_str().map(str::to_string))
                        .unwrap_or_default()
                ),
            ))
        }
    };
    Ok(pb::RouteFilter { kind: Some(kind) })
}

fn filters(
    field: &str,
    list: &[http::HttpRouteRulesFilters],
    rule_matches: &[pb::RouteMatch],
) -> FieldResult<Vec<pb::RouteFilter>> {
    let out: Vec<pb::RouteFilter> = list
        .iter()
        .enumerate()
        .map(|(i, f)| filter(&format!("{field}[{i}]"), f, rule_matches))
        .collect::<FieldResult<_>>()?;
    let redirects = out
        .iter()
        .filter(|f| matches!(f.kind, Some(FilterKind::Redirect(_))))
        .count();
    let rewrites = out
        .iter()
        .filter(|f| matches!(f.kind, Some(FilterKind::Rewrite(_))))
        .count();
    if redirects > 0 && rewrites > 0 {
        return Err(field_error(
            field.to_string(),
            "RequestRedirect and URLRewrite cannot be used together",
        ));
    }
    Ok(out)
}

fn backend(
    field: String,
    b: &http::HttpRouteRulesBackendRefs,
    rule_matches: &[pb::RouteMatch],
) -> FieldResult<RawBackend> {
    let fl: Vec<http::HttpRouteRulesFilters> = match &b.filters {
        Some(f) => reshape(&format!("{field}.filters"), f)?,
        None => Vec::new(),
    };
    let filters = filters(&format!("{field}.filters"), &fl, rule_matches)?;
    if filters
        .iter()
        .any(|f| matches!(f.kind, Some(FilterKind::Redirect(_))))
    {
        return Err(field_error(
            format!("{field}.filters"),
            "RequestRedirect is not supported on a backendRef",
        ));
    }
    Ok(RawBackend {
        field,
        group: b.group.clone().unwrap_or_default(),
        kind: b.kind.clone().unwrap_or_else(|| "Service".into()),
        namespace: b.namespace.clone(),
        name: b.name.clone(),
        port: b.port,
        weight: u32::try_from(b.weight.unwrap_or(1).max(0)).unwrap_or(0),
        filters,
    })
}

fn rules_of(route: AnyRoute<'_>) -> FieldResult<Vec<RawRule>> {
    let mut out = Vec::new();
    match route {
        AnyRoute::Http(r) => {
            for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
                let field = format!("spec.rules[{i}]");
                let matches = rule
                    .matches
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, m)| http_match(&format!("{field}.matches[{j}]"), m))
                    .collect::<FieldResult<Vec<_>>>()?;
                let filters = filters(
                    &format!("{field}.filters"),
                    rule.filters.as_deref().unwrap_or_default(),
                    &matches,
                )?;
                let backends = rule
                    .backend_refs
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, b)| backend(format!("{field}.backendRefs[{j}]"), b, &matches))
                    .collect::<FieldResult<Vec<_>>>()?;
                let t = rule.timeouts.clone().unwrap_or_default();
                let request_timeout_ms =
                    duration_ms(format!("{field}.timeouts.request"), &t.request)?;
                let backend_request_timeout_ms = duration_ms(
                    format!("{field}.timeouts.backendRequest"),
                    &t.backend_request,
                )?;
                if request_timeout_ms > 0 && backend_request_timeout_ms > request_timeout_ms {
                    return Err(field_error(
                        format!("{field}.timeouts.backendRequest"),
                        "must not be longer than timeouts.request",
                    ));
                }
                let retry = match &rule.retry {
                    None => None,
                    Some(rt) => {
                        let attempts = rt.attempts.unwrap_or(1);
                        if !(0..=MAX_ATTEMPTS).contains(&attempts) {
                            return Err(field_error(
                                format!("{field}.retry.attempts"),
                                format!("{attempts} is not within 0..={MAX_ATTEMPTS}"),
                            ));
                        }
                        let mut codes = Vec::new();
                        for (j, c) in rt.codes.iter().flatten().enumerate() {
                            if !(400..=599).contains(c) {
                                return Err(field_error(
                                    format!("{field}.retry.codes[{j}]"),
                                    format!("{c} is not an HTTP error status (400-599)"),
                                ));
                            }
                            codes.push(u32::try_from(*c).unwrap_or(500));
                        }
                        Some(pb::RouteRetry {
                            // `attempts` counts retries; the proto counts every try.
                            attempts: u32::try_from(attempts).unwrap_or(0) + 1,
                            codes,
                            backoff_ms: duration_ms(format!("{field}.retry.backoff"), &rt.backoff)?,
                        })
                    }
                };
                out.push(RawRule {
                    name: rule.name.clone().unwrap_or_default(),
                    matches,
                    filters,
                    backends,
                    request_timeout_ms,
                    backend_request_timeout_ms,
                    retry,
                });
            }
        }
        AnyRoute::Grpc(r) => {
            for (i, rule) in r.spec.rules.iter().flatten().enumerate() {
                let field = format!("spec.rules[{i}]");
                let matches = rule
                    .matches
                    .iter()
                    .flatten()
                    .enumerate()
                    .map(|(j, m)| grpc_match(&format!("{field}.matches[{j}]"), m))
                    .collect::<FieldResult<Vec<_>>>()?;
                let fl: Vec<http::HttpRouteRulesFilters> = match &rule.filters {
                    Some(f) => reshape(&format!("{field}.filters"), f)?,
                    None => Vec::new(),
                };
                let filters = filters(&format!("{field}.filters"), &fl, &matches)?;
                let mut backends = Vec::new();
                for (j, b) in rule.backend_refs.iter().flatten().enumerate() {
                    let f = format!("{field}.backendRefs[{j}]");
                    let hb: http::HttpRouteRulesBackendRefs = reshape(&f, b)?;
                    backends.push(backend(f, &hb, &matches)?);
                }
                out.push(RawRule {
                    name: rule.name.clone().unwrap_or_default(),
                    matches,
                    filters,
                    backends,
                    request_timeout_ms: 0,
                    backend_request_timeout_ms: 0,
                    retry: None,
                });
            }
        }
    }
    Ok(out)
}

/// A parentRef's (group, kind, namespace, name, port).
type ParentRefFields = (
    Option<String>,
    Option<String>,
    Option<String>,
    String,
    Option<i32>,
);

/// A route's Service parents as written: (namespace field, name, port).
fn service_parents(route: AnyRoute<'_>) -> Vec<(Option<String>, String, Option<i32>)> {
    let refs: Vec<ParentRefFields> = match route {
        AnyRoute::Http(r) => r
            .spec
            .parent_refs
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.group.clone(),
                    p.kind.clone(),
                    p.namespace.clone(),
                    p.name.clone(),
                    p.port,
                )
            })
            .collect(),
        AnyRoute::Grpc(r) => r
            .spec
            .parent_refs
            .iter()
            .flatten()
            .map(|p| {
                (
                    p.group.clone(),
                    p.kind.clone(),
                    p.namespace.clone(),
                    p.name.clone(),
                    p.port,
                )
            })
            .collect(),
    };
    refs.into_iter()
        .filter(|(g, k, ..)| g.as_deref() == Some("") && k.as_deref() == Some("Service"))
        .map(|(_, _, ns, name, port)| (ns, name, port))
        .collect()
}

/// Does the route name any Service as a parent (is it weft's to handle)?
pub fn is_mesh_route(route: AnyRoute<'_>) -> bool {
    !service_parents(route).is_empty()
}

/// Converts a route, resolving its references against `services` (every namespace).
/// `None` when no parent accepted it (nothing to distribute).
pub fn convert(
    route: AnyRoute<'_>,
    services: &BTreeMap<(String, String), Service>,
    grants: &BTreeMap<(String, String), ReferenceGrant>,
) -> (Option<pb::Route>, RouteStatus) {
    let refs = Refs {
        services,
        grants,
        route_kind: route.object_ref().kind,
    };
    let meta = route.meta();
    let ns = meta.namespace.clone().unwrap_or_default();
    let mut status = RouteStatus {
        generation: meta.generation,
        parents: Vec::new(),
    };
    let rules = rules_of(route);
    let mut pb_rules = Vec::new();
    let mut refs_problem: Option<(&'static str, String)> = None;
    if let Ok(rules) = &rules {
        for r in rules {
            let mut backends = Vec::new();
            for b in &r.backends {
                let (resolved, problem) = resolve_backend(&ns, b, &refs);
                if let (Some(p), None) = (problem, &refs_problem) {
                    refs_problem = Some(p);
                }
                backends.push(resolved);
            }
            let mut filters = r.filters.clone();
            resolve_mirrors(&ns, &mut filters, &refs);
            for b in &mut backends {
                resolve_mirrors(&ns, &mut b.filters, &refs);
            }
            pb_rules.push(pb::RouteRule {
                name: r.name.clone(),
                matches: r.matches.clone(),
                filters,
                backends,
                request_timeout_ms: r.request_timeout_ms,
                backend_request_timeout_ms: r.backend_request_timeout_ms,
                retry: r.retry.clone(),
            });
        }
    }
    let mut parents = Vec::new();
    for (ref_ns, name, port) in service_parents(route) {
        let svc_ns = ref_ns.clone().unwrap_or_else(|| ns.clone());
        let svc = services.get(&(svc_ns.clone(), name.clone()));
        let accepted = match (&rules, svc) {
            (Err(e), _) => Condition::no("UnsupportedValue", e.to_string()),
            (Ok(_), None) => Condition::no(
                "NoMatchingParent",
                format!("Service {svc_ns}/{name} does not exist"),
            ),
            (Ok(_), Some(s)) => match port {
                Some(p) if !service_ports(s).contains(&p) => Condition::no(
                    "NoMatchingParent",
                    format!("Service {svc_ns}/{name} has no port {p}"),
                ),
                _ => Condition::ok("Accepted", "routed by the source node's proxy"),
            },
        };
        let resolved_refs = match &refs_problem {
            Some((reason, message)) => Condition::no(reason, message.clone()),
            None => Condition::ok("ResolvedRefs", "every backend resolved"),
        };
        if accepted.status {
            parents.push(pb::RouteParent {
                service_namespace: svc_ns.clone(),
                service_name: name.clone(),
                port: port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
            });
        }
        status.parents.push(ParentStatus {
            service_namespace: svc_ns,
            service_name: name,
            port,
            ref_namespace: ref_ns,
            accepted,
            resolved_refs,
        });
    }
    if parents.is_empty() {
        return (None, status);
    }
    let created = meta
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
        .unwrap_or(0);
    let kind = match route {
        AnyRoute::Http(_) => pb::route::RouteKind::Http,
        AnyRoute::Grpc(_) => pb::route::RouteKind::Grpc,
    };
    (
        Some(pb::Route {
            name: meta.name.clone().unwrap_or_default(),
            namespace: ns,
            kind: kind as i32,
            parents,
            rules: pb_rules,
            created,
        }),
        status,
    )
}

fn service_ports(s: &Service) -> Vec<i32> {
    s.spec
        .as_ref()
        .and_then(|sp| sp.ports.as_ref())
        .map(|ps| ps.iter().map(|p| p.port).collect())
        .unwrap_or_default()
}

/// What backend references resolve against.
struct Refs<'a> {
    services: &'a BTreeMap<(String, String), Service>,
    grants: &'a BTreeMap<(String, String), ReferenceGrant>,
    /// `HTTPRoute` or `GRPCRoute`.
    route_kind: &'static str,
}

impl Refs<'_> {
    /// May a route of `route_ns` name Service `name` of namespace `ns`?
    fn permitted(&self, route_ns: &str, ns: &str, name: &str) -> bool {
        ns == route_ns
            || self
                .grants
                .range((ns.to_string(), String::new())..)
                .take_while(|((gns, _), _)| gns == ns)
                .any(|(_, g)| {
                    g.spec.from.iter().any(|f| {
                        f.group == weft_proto::gateway::GROUP
                            && f.kind == self.route_kind
                            && f.namespace == route_ns
                    }) && g.spec.to.iter().any(|t| {
                        t.group.is_empty()
                            && t.kind == "Service"
                            && t.name.as_deref().is_none_or(|n| n == name)
                    })
                })
    }
}

fn resolve_backend(
    route_ns: &str,
    b: &RawBackend,
    refs: &Refs<'_>,
) -> (pb::RouteBackend, Option<(&'static str, String)>) {
    let services = refs.services;
    let ns = b.namespace.clone().unwrap_or_else(|| route_ns.to_string());
    let mut out = pb::RouteBackend {
        service_namespace: ns.clone(),
        service_name: b.name.clone(),
        port: b.port.and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        weight: b.weight,
        invalid: String::new(),
        filters: b.filters.clone(),
    };
    let problem = if !b.group.is_empty() || b.kind != "Service" {
        Some((
            "InvalidKind",
            format!(
                "{}: kind {}/{} is not supported: backends are Services",
                b.field, b.group, b.kind
            ),
        ))
    } else if !refs.permitted(route_ns, &ns, &b.name) {
        Some((
            "RefNotPermitted",
            format!(
                "{}: Service {ns}/{} is in another namespace and no ReferenceGrant there lets {}s of namespace {route_ns} name it",
                b.field, b.name, refs.route_kind
            ),
        ))
    } else {
        match services.get(&(ns.clone(), b.name.clone())) {
            None => Some((
                "BackendNotFound",
                format!("{}: Service {ns}/{} does not exist", b.field, b.name),
            )),
            Some(s) => match b.port {
                Some(p) if !service_ports(s).contains(&p) => Some((
                    "BackendNotFound",
                    format!("{}: Service {ns}/{} has no port {p}", b.field, b.name),
                )),
                _ => None,
            },
        }
    };
    if let Some((_, m)) = &problem {
        out.invalid = m.clone();
    }
    (out, problem)
}

/// Resolves (and checks the permission of) every mirror among `filters`.
fn resolve_mirrors(route_ns: &str, filters: &mut [pb::RouteFilter], refs: &Refs<'_>) {
    for f in filters {
        if let Some(FilterKind::Mirror(m)) = &mut f.kind {
            if let Some(b) = m.backend.as_mut() {
                resolve_mirror(route_ns, b, refs);
            }
        }
    }
}

fn resolve_mirror(route_ns: &str, b: &mut pb::RouteBackend, refs: &Refs<'_>) {
    let services = refs.services;
    if b.service_namespace.is_empty() {
        b.service_namespace = route_ns.to_string();
    }
    if !b.invalid.is_empty() {
        return;
    }
    if !refs.permitted(route_ns, &b.service_namespace, &b.service_name) {
        b.invalid = format!(
            "mirror Service {}/{} is in another namespace and no ReferenceGrant there permits it",
            b.service_namespace, b.service_name
        );
    } else if !services.contains_key(&(b.service_namespace.clone(), b.service_name.clone())) {
        b.invalid = format!(
            "mirror Service {}/{} does not exist",
            b.service_namespace, b.service_name
        );
    }
}

#[cfg(test)]
mod tests;
