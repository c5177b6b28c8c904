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

#[cfg(test)]
use crate::route_match::prefix_matches;
use crate::route_match::CompiledMatch;
pub use crate::route_match::RequestView;
use std::collections::HashMap;
use std::sync::Arc;
use weft_proto::pb;

/// Route tables compiled per (Service key, port, client namespace), dropped when a
/// route changes.
#[derive(Default)]
pub struct RouteCache {
    pub(crate) generation: u64,
    pub(crate) tables: HashMap<(String, u16, String), Arc<RouteTable>>,
}

/// Most tables kept: one per Service port and client namespace in use.
pub(crate) const MAX_TABLES: usize = 4096;

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
                prefix: e.m.path_prefix(),
            })
    }
}

#[cfg(test)]
mod tests;
