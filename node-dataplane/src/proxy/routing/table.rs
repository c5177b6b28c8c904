//! Which route rule a request takes: the routes that apply to one Service port for
//! clients of one namespace, compiled into one list of matches in the Gateway API's
//! precedence order, so the first match that fits is the answer.
//!
//! Which routes apply (GAMMA): consumer routes (in the client's namespace, naming a
//! Service of another namespace) when there are any, else producer routes (in the
//! Service's namespace). Precedence, across every rule of those routes: an Exact
//! path, then the longest PathPrefix, then a RegularExpression path (the spec leaves
//! its place to implementations); then a method condition; then more header
//! conditions; then more query parameter conditions; then the older route, then
//! `namespace/name` alphabetically; then rule and match order within a route.

use regex::Regex;
use std::sync::Arc;
use weft_proto::pb;

/// Compiled size bound of one regular expression (as the control plane checks).
const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn compile(pattern: &str) -> Result<Regex, String> {
    regex::RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| format!("regular expression {pattern:?}: {e}"))
}

/// Can this node use `r`? (Its regular expressions compile within the bound.)
pub fn check(r: &pb::Route) -> Result<(), String> {
    for rule in &r.rules {
        for m in &rule.matches {
            CompiledMatch::new(m)?;
        }
    }
    Ok(())
}

#[derive(Debug)]
enum PathCond {
    Exact(String),
    /// Without a trailing '/' (except the root, "/").
    Prefix(String),
    Regex(Regex),
}

#[derive(Debug)]
enum ValueCond {
    Exact(String),
    Regex(Regex),
}

impl ValueCond {
    fn new(m: &pb::ValueMatch) -> Result<Self, String> {
        if m.kind == pb::MatchKind::Regex as i32 {
            Ok(ValueCond::Regex(compile(&m.value)?))
        } else {
            Ok(ValueCond::Exact(m.value.clone()))
        }
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            ValueCond::Exact(e) => e == v,
            ValueCond::Regex(r) => r.is_match(v),
        }
    }
}

#[derive(Debug)]
struct CompiledMatch {
    path: PathCond,
    headers: Vec<(http::HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    method: Option<http::Method>,
}

impl CompiledMatch {
    fn new(m: &pb::RouteMatch) -> Result<Self, String> {
        let path = match &m.path {
            None => PathCond::Prefix("/".into()),
            Some(p) if p.kind == pb::MatchKind::Exact as i32 => PathCond::Exact(p.value.clone()),
            Some(p) if p.kind == pb::MatchKind::Regex as i32 => PathCond::Regex(compile(&p.value)?),
            Some(p) => {
                let v = p.value.trim_end_matches('/');
                PathCond::Prefix(if v.is_empty() { "/".into() } else { v.into() })
            }
        };
        let headers = m
            .headers
            .iter()
            .map(|h| {
                let name = http::HeaderName::from_bytes(h.name.as_bytes())
                    .map_err(|_| format!("header name {:?}", h.name))?;
                Ok((name, ValueCond::new(h)?))
            })
            .collect::<Result<_, String>>()?;
        let query = m
            .query_params
            .iter()
            .map(|q| Ok((q.name.clone(), ValueCond::new(q)?)))
            .collect::<Result<_, String>>()?;
        let method = if m.method.is_empty() {
            None
        } else {
            Some(
                http::Method::from_bytes(m.method.as_bytes())
                    .map_err(|_| format!("method {:?}", m.method))?,
            )
        };
        Ok(Self {
            path,
            headers,
            query,
            method,
        })
    }

    /// The precedence of this match: larger sorts first. For a GRPCRoute, whose
    /// service and method matches are paths here, a method-only or regular
    /// expression match ranks above the catch-all (`/`), as the spec orders by
    /// service, then method.
    fn rank(&self, kind: pb::route::RouteKind) -> (u8, usize, bool, usize, usize) {
        let grpc = kind == pb::route::RouteKind::Grpc;
        let (kind, len) = match &self.path {
            PathCond::Exact(p) => (3, p.len()),
            PathCond::Prefix(p) if grpc && p == "/" => (0, 1),
            PathCond::Prefix(p) => (2, p.len()),
            PathCond::Regex(_) => (1, 0),
        };
        (
            kind,
            len,
            self.method.is_some(),
            self.headers.len(),
            self.query.len(),
        )
    }

    fn matches(&self, req: &RequestView<'_>) -> bool {
        let path_ok = match &self.path {
            PathCond::Exact(p) => req.path == p,
            PathCond::Prefix(p) => prefix_matches(p, req.path),
            PathCond::Regex(r) => r.is_match(req.path),
        };
        path_ok
            && self.method.as_ref().is_none_or(|m| m == req.method)
            && self.headers.iter().all(|(name, cond)| {
                req.headers
                    .get_all(name)
                    .iter()
                    .any(|v| v.to_str().is_ok_and(|v| cond.matches(v)))
            })
            && self
                .query
                .iter()
                .all(|(name, cond)| query_value(req.query, name).is_some_and(|v| cond.matches(v)))
    }
}

/// Gateway API PathPrefix: whole path elements, so `/a` matches `/a`, `/a/` and
/// `/a/b` but not `/ab`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return path.starts_with('/');
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

/// The first value of query parameter `name` (names and values compared as sent).
fn query_value<'a>(query: &'a str, name: &str) -> Option<&'a str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// What matching looks at in a request.
pub struct RequestView<'a> {
    pub method: &'a http::Method,
    /// The path, without the query.
    pub path: &'a str,
    pub query: &'a str,
    pub headers: &'a http::HeaderMap,
}

impl<'a> RequestView<'a> {
    pub fn of<B>(req: &'a http::Request<B>) -> Self {
        Self {
            method: req.method(),
            path: req.uri().path(),
            query: req.uri().query().unwrap_or(""),
            headers: req.headers(),
        }
    }
}

/// One rule of one route, as requests that take it need it.
#[derive(Debug)]
pub struct Rule {
    /// `namespace/name` of its route.
    pub route: Arc<str>,
    pub kind: pb::route::RouteKind,
    /// The rule's name, or its index in the route.
    pub name: Arc<str>,
    pub rule: pb::RouteRule,
    /// Sum of its backends' weights.
    pub total_weight: u64,
}

impl Rule {
    /// Chooses a backend by weight (`None`: no backend has weight, so nothing can
    /// serve the request). `pick` is a number in `0..total_weight`.
    pub fn backend_at(&self, pick: u64) -> Option<&pb::RouteBackend> {
        let mut left = pick;
        for b in &self.rule.backends {
            let w = u64::from(b.weight);
            if left < w {
                return Some(b);
            }
            left -= w;
        }
        None
    }

    pub fn choose_backend(&self) -> Option<&pb::RouteBackend> {
        if self.total_weight == 0 {
            return None;
        }
        self.backend_at(rand::random_range(0..self.total_weight))
    }
}

#[derive(Debug)]
struct Entry {
    m: CompiledMatch,
    rule: Arc<Rule>,
}

/// The routes of one Service port for one client namespace, in precedence order.
#[derive(Debug, Default)]
pub struct RouteTable {
    entries: Vec<Entry>,
}

/// Which route and match a request took: the matched path prefix is needed by
/// `ReplacePrefixMatch`.
pub struct Selected<'a> {
    pub rule: &'a Arc<Rule>,
    /// The PathPrefix that matched, if the match was one.
    pub prefix: Option<&'a str>,
}

impl RouteTable {
    /// Compiles the routes of `routes` that apply to Service `svc_ns/svc_name` port
    /// `port` for clients in `client_ns`. Empty when none apply.
    pub fn build<'a>(
        routes: impl Iterator<Item = &'a Arc<pb::Route>>,
        svc_ns: &str,
        svc_name: &str,
        port: u16,
        client_ns: &str,
    ) -> Self {
        let attached = |r: &pb::Route| {
            r.parents.iter().any(|p| {
                p.service_namespace == svc_ns
                    && p.service_name == svc_name
                    && (p.port == 0 || p.port == u32::from(port))
            })
        };
        let mut consumer = Vec::new();
        let mut producer = Vec::new();
        for r in routes.filter(|r| attached(r)) {
            if r.namespace == svc_ns {
                producer.push(r.clone());
            } else if r.namespace == client_ns {
                consumer.push(r.clone());
            }
        }
        let chosen = if consumer.is_empty() {
            producer
        } else {
            consumer
        };
        let mut ranked = Vec::new();
        for r in &chosen {
            let route: Arc<str> = format!("{}/{}", r.namespace, r.name).into();
            for (i, rule) in r.rules.iter().enumerate() {
                let name: Arc<str> = if rule.name.is_empty() {
                    i.to_string().into()
                } else {
                    rule.name.as_str().into()
                };
                let compiled = Arc::new(Rule {
                    route: route.clone(),
                    kind: pb::route::RouteKind::try_from(r.kind)
                        .unwrap_or(pb::route::RouteKind::Http),
                    name,
                    total_weight: rule.backends.iter().map(|b| u64::from(b.weight)).sum(),
                    rule: rule.clone(),
                });
                let implicit = [pb::RouteMatch::default()];
                let matches: &[pb::RouteMatch] = if rule.matches.is_empty() {
                    &implicit
                } else {
                    &rule.matches
                };
                for (j, m) in matches.iter().enumerate() {
                    // Checked when the route was received.
                    let Ok(m) = CompiledMatch::new(m) else {
                        continue;
                    };
                    let rank = m.rank(compiled.kind);
                    ranked.push((
                        rank,
                        (r.created, route.clone(), i, j),
                        Entry {
                            m,
                            rule: compiled.clone(),
                        },
                    ));
                }
            }
        }
        // Larger rank first; then older, then by name, then in order.
        ranked.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        Self {
            entries: ranked.into_iter().map(|(_, _, e)| e).collect(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rule a request takes, or `None` (no rule matches: 404).
    pub fn select(&self, req: &RequestView<'_>) -> Option<Selected<'_>> {
        self.entries
            .iter()
            .find(|e| e.m.matches(req))
            .map(|e| Selected {
                rule: &e.rule,
                prefix: match &e.m.path {
                    PathCond::Prefix(p) => Some(p.as_str()),
                    _ => None,
                },
            })
    }
}

#[cfg(test)]
mod tests;
