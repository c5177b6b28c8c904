//! Route matches (Gateway API HTTPRoute/GRPCRoute): compiled once from a `pb::Route`
//! (regular expressions bounded in size) and checked against a request. Used by the
//! configuration store, which refuses a route this node cannot compile, and by the
//! route tables of the proxy ([`crate::proxy::routing`]).

use regex::Regex;
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
pub(crate) struct CompiledMatch {
    path: PathCond,
    headers: Vec<(http::HeaderName, ValueCond)>,
    query: Vec<(String, ValueCond)>,
    method: Option<http::Method>,
}

impl CompiledMatch {
    pub(crate) fn new(m: &pb::RouteMatch) -> Result<Self, String> {
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
    pub(crate) fn rank(&self, kind: pb::route::RouteKind) -> (u8, usize, bool, usize, usize) {
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

    /// The path prefix this match requires, when it is a PathPrefix match.
    pub(crate) fn path_prefix(&self) -> Option<&str> {
        match &self.path {
            PathCond::Prefix(p) => Some(p.as_str()),
            _ => None,
        }
    }

    pub(crate) fn matches(&self, req: &RequestView<'_>) -> bool {
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
