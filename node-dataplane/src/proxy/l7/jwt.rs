//! JWT request authentication at the destination (RequestAuthentication), before
//! weft's L7 authorization, with Istio's semantics: a request whose token is not
//! valid for the workload's rules is answered `401`; a request without a token
//! passes unauthenticated (AuthorizationPolicy decides, e.g. with
//! `requestPrincipals`); a valid token's principal and claims are what
//! `requestPrincipals` and `request.auth.*` match. The token is removed from what
//! the application receives unless its rule forwards it, and claims the rule names
//! are copied into request headers (replacing any the client sent).

use super::message::{reply, LocalResponse, RequestMessage};
use super::ConnCtx;
use crate::metrics::traffic::JwtLabels;
use std::sync::Arc;
use weft_authn::{Outcome, RequestView, TokenLocation};
use weft_authz::RequestAuth;
use weft_proto::pb;

/// The body of the `401` (Envoy's text).
pub const REJECTED_BODY: &str = "Jwt verification fails";

/// The `401` for a request whose token is not valid.
pub fn rejection() -> LocalResponse {
    reply(
        401,
        REJECTED_BODY,
        &[(
            "www-authenticate".into(),
            "Bearer error=\"invalid_token\"".into(),
        )],
    )
}

/// Verifies the request's token against the rules that apply to `workload`:
/// `Ok(None)` without rules or without a token, `Ok(Some(..))` with a valid one
/// (the request is rewritten as its rule says), `Err(why)` with an invalid one.
pub fn authenticate(
    req: &mut impl RequestMessage,
    ctx: &ConnCtx,
    workload: &Arc<pb::Workload>,
) -> Result<Option<Arc<RequestAuth>>, &'static str> {
    let rules = ctx.authn_rules(workload);
    if rules.is_empty() {
        return Ok(None);
    }
    // Claim headers come only from a verified token: whatever the client sent under
    // those names is dropped first, whatever the outcome.
    if rules.iter().any(|r| r.output_headers().next().is_some()) {
        let mut fields = req.lend_fields();
        for h in rules.iter().flat_map(|r| r.output_headers()) {
            fields.remove(h.as_bytes());
        }
        req.return_fields(fields);
    }
    let pairs = req.field_pairs();
    let pq = req.path_and_query();
    let query = pq
        .split_once('?')
        .map(|(_, q)| q.split('#').next().unwrap_or(q));
    let view = RequestView::new(pairs.iter().map(|(k, v)| (k.as_str(), v.as_str())), query);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let outcome = weft_authn::authenticate(&rules, &view, now);
    let count = |outcome: &'static str, reason: &'static str| {
        let l = JwtLabels { outcome, reason };
        ctx.state.metrics.traffic.jwt.get_or_create(&l).inc();
    };
    match outcome {
        Outcome::NoToken => {
            count("no_token", "");
            Ok(None)
        }
        Outcome::Rejected(reason) => {
            count("rejected", reason.code());
            tracing::debug!(dst = %ctx.dst, peer = ?ctx.attrs.principal, reason = reason.as_str(), "request refused: invalid JWT");
            Err(reason.code())
        }
        Outcome::Authenticated(p) => {
            count("authenticated", "");
            let mut fields = req.lend_fields();
            let mut query_params = Vec::new();
            for loc in &p.remove {
                match loc {
                    TokenLocation::Header(h) => fields.remove(h.as_bytes()),
                    TokenLocation::QueryParam(q) => query_params.push(q.as_str()),
                }
            }
            for (h, v) in &p.add_headers {
                // Names and values were checked by the rule's compiler.
                let _ = fields.insert(h.as_bytes(), v.as_bytes());
            }
            req.return_fields(fields);
            if !query_params.is_empty() {
                let stripped = without_params(req.path_and_query(), &query_params);
                req.set_path_and_query(&stripped);
            }
            Ok(Some(Arc::new(RequestAuth {
                principal: p.principal,
                audiences: p.audiences,
                presenter: p.presenter,
                claims: p.claims,
            })))
        }
    }
}

/// `path_and_query` without the query parameters named `names` (compared decoded),
/// every other parameter kept as it was written.
fn without_params(path_and_query: &str, names: &[&str]) -> String {
    let Some((path, query)) = path_and_query.split_once('?') else {
        return path_and_query.to_string();
    };
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let name = pair.split('=').next().unwrap_or_default();
            let decoded: String = form_urlencoded::parse(name.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            !names.contains(&decoded.as_str())
        })
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

#[cfg(test)]
mod tests {
    use super::without_params;

    #[test]
    fn token_parameters_are_removed_and_the_rest_kept() {
        let t = ["access_token"];
        assert_eq!(without_params("/a?access_token=x", &t), "/a");
        assert_eq!(
            without_params("/a?x=1&access_token=t&y=%20", &t),
            "/a?x=1&y=%20"
        );
        assert_eq!(without_params("/a?access%5Ftoken=t&b", &t), "/a?b");
        assert_eq!(without_params("/a", &t), "/a");
        assert_eq!(without_params("/a?other=1", &t), "/a?other=1");
    }
}
