//! Per-request processing of a parsed HTTP connection on the destination side:
//! path normalization, Wasm plugins (AUTHN/AUTHZ phases), L7 authorization,
//! plugins of the later phases, forwarding to the application, response plugins,
//! and per-request metrics.

use super::sniff::Protocol;
use super::ConnCtx;
use crate::proxy::access_log;
use crate::wasm::abi::{HttpState, LocalReply};
use crate::wasm::chain::{self, Ran};
use crate::wasm::headers::Headers;
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use std::sync::Arc;
use std::time::Instant;
use weft_api::authz::{path, Attributes, Request};

pub type RespBody = Either<Incoming, Full<Bytes>>;

/// The body of a 403 from weft's L7 authorization (Istio's text).
pub const DENIED_BODY: &str = "RBAC: access denied";

fn reply(
    status: u16,
    body: impl Into<Bytes>,
    headers: &[(String, String)],
) -> http::Response<RespBody> {
    let mut r = http::Response::new(Either::Right(Full::new(body.into())));
    *r.status_mut() =
        http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            http::HeaderName::from_bytes(k.as_bytes()),
            http::HeaderValue::from_str(v),
        ) {
            r.headers_mut().append(k, v);
        }
    }
    if !r.headers().contains_key(http::header::CONTENT_TYPE) {
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("text/plain"),
        );
    }
    r
}

fn local(r: LocalReply) -> http::Response<RespBody> {
    reply(r.status, r.body, &r.headers)
}

/// A header map as (lower-case name, value) pairs.
fn pairs(map: &http::HeaderMap) -> impl Iterator<Item = (String, String)> + '_ {
    map.iter().map(|(k, v)| {
        (
            k.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned(),
        )
    })
}

/// Runs `plugins`' request callbacks on the request's own fields, moved into the
/// plugins' view and back. Returns a local reply, if one sent it.
fn run_request_plugins(
    plugins: &[Arc<crate::wasm::plugin::Plugin>],
    view: &mut Box<HttpState>,
    req: &mut http::Request<Incoming>,
    end_of_stream: bool,
    ran: &mut Ran,
) -> Option<(LocalReply, String)> {
    view.request.fields = std::mem::take(req.headers_mut());
    let replied = chain::run_request(plugins, view, end_of_stream, ran);
    *req.headers_mut() = view.request.take_fields();
    replied
}

/// Runs the response callbacks of the plugins that saw the request on the
/// response's own fields, and applies the status they set. Returns a local reply,
/// if one sent it.
fn run_response_plugins<B>(
    ran: &Ran,
    view: &mut Box<HttpState>,
    resp: &mut http::Response<B>,
    end_of_stream: bool,
) -> Option<(LocalReply, String)> {
    view.response = Headers::response(resp.status(), std::mem::take(resp.headers_mut()));
    let replied = chain::run_response(ran, view, end_of_stream);
    *resp.headers_mut() = view.response.take_fields();
    // `Headers` only accepts a final status (200-599) as `:status`.
    if let Some(s) = view.response.pseudo(":status") {
        if let Ok(code) = http::StatusCode::from_bytes(s.as_bytes()) {
            *resp.status_mut() = code;
        }
    }
    replied
}

fn authority_of(req: &http::Request<Incoming>) -> String {
    req.uri()
        .authority()
        .map(|a| a.as_str().to_string())
        .or_else(|| {
            req.headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_default()
}

/// Sets the request's path (keeping scheme and authority of an absolute URI).
fn set_path(req: &mut http::Request<Incoming>, path_and_query: &str) -> bool {
    let mut parts = req.uri().clone().into_parts();
    match path_and_query.parse() {
        Ok(pq) => parts.path_and_query = Some(pq),
        Err(_) => return false,
    }
    match http::Uri::from_parts(parts) {
        Ok(u) => {
            *req.uri_mut() = u;
            true
        }
        Err(_) => false,
    }
}

/// A bounded method label.
fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::DELETE => "DELETE",
        http::Method::PATCH => "PATCH",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => "OTHER",
    }
}

/// Handles one request end to end.
pub async fn handle(
    req: http::Request<Incoming>,
    ctx: Arc<ConnCtx>,
    proto: Protocol,
) -> http::Response<RespBody> {
    let start = Instant::now();
    let method = method_label(req.method());
    let mut decided_by: Option<String> = None;
    // Reference-counted clones: nothing is copied unless the record is written.
    let log = ctx.state.access_log.active().then(|| {
        (
            req.method().clone(),
            req.uri().clone(),
            req.headers().get(http::header::HOST).cloned(),
        )
    });
    let resp = process(req, &ctx, proto, &mut decided_by).await;
    let code = resp.status().as_u16();
    let took = start.elapsed();
    ctx.record_request(method, code, took, decided_by.as_deref());
    if let Some((method, uri, host)) = log {
        let authority = uri
            .authority()
            .map(|a| a.as_str())
            .or_else(|| host.as_ref().and_then(|h| h.to_str().ok()))
            .unwrap_or_default();
        ctx.state.access_log.request(&access_log::RequestRecord {
            source_addr: ctx.props.source,
            destination_addr: ctx.dst,
            source_identity: ctx.props.peer_id.as_deref().unwrap_or("unknown"),
            destination_workload: &ctx.target.workload,
            mtls: ctx.props.peer_id.is_some(),
            method: method.as_str(),
            path: uri.path(),
            authority,
            response_code: code,
            decided_by: decided_by.as_deref(),
            duration: took,
        });
    }
    resp
}

async fn process(
    mut req: http::Request<Incoming>,
    ctx: &Arc<ConnCtx>,
    proto: Protocol,
    decided_by: &mut Option<String>,
) -> http::Response<RespBody> {
    let normalized = {
        let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
        match path::normalize(target) {
            Ok(p) if p.is(target) => p,
            Ok(p) => {
                if !set_path(&mut req, &p.path_and_query()) {
                    return reply(400, "malformed request path\n", &[]);
                }
                p
            }
            Err(e) => {
                tracing::info!(dst = %ctx.dst, error = %e, "request refused: malformed path");
                return reply(400, "malformed request path\n", &[]);
            }
        }
    };
    let authority = authority_of(&req);
    // Only with plugins; boxed: each callback swaps it into the plugin's store. The
    // fields are moved in while plugins run (no copy); see `Headers`.
    let mut view = (!ctx.plan.plugins.is_empty()).then(|| {
        let scheme = req.uri().scheme_str().unwrap_or("http");
        let (method, pq) = (req.method(), normalized.path_and_query());
        Box::new(HttpState {
            request: Headers::request(method, pq, authority.clone(), scheme, Default::default()),
            props: Some(ctx.props.clone()),
            ..Default::default()
        })
    });
    let mut ran = Ran::default();
    let end_of_stream = hyper::body::Body::is_end_stream(req.body());
    // Plugins are in phase order: those before weft's authorization come first.
    let plugins = &ctx.plan.plugins;
    let (before, after) = plugins.split_at(plugins.partition_point(|p| p.phase.before_authz()));
    let mut rewritten = None;
    if let (false, Some(view)) = (before.is_empty(), view.as_mut()) {
        let replied = run_request_plugins(before, view, &mut req, end_of_stream, &mut ran);
        if let Some((r, plugin)) = replied {
            *decided_by = Some(format!("wasm:{plugin}"));
            return finish_local(ctx, r, ran, view);
        }
        // A plugin may have rewritten the path: normalize and authorize the new one.
        if let Some(p) = view.request.pseudo(":path") {
            if !normalized.is(p) {
                match path::normalize(p) {
                    Ok(n) if set_path(&mut req, &n.path_and_query()) => rewritten = Some(n.path),
                    _ => {
                        // The plugins' contexts end here too.
                        chain::finish(ran, view);
                        return reply(400, "malformed request path\n", &[]);
                    }
                }
            }
        }
    }
    let path_now = rewritten.unwrap_or(normalized.path);
    if ctx.plan.authz_http {
        let d = ctx
            .state
            .decide_request(&ctx.target.workload, &ctx.applicable, |with_headers| {
                Attributes {
                    request: Some(Request {
                        method: req.method().as_str().to_string(),
                        path: path_now.clone(),
                        host: authority.clone(),
                        headers: if with_headers {
                            pairs(req.headers()).collect()
                        } else {
                            Vec::new()
                        },
                    }),
                    ..ctx.attrs.clone()
                }
            });
        ctx.count_decision(&d);
        if !d.allowed {
            tracing::debug!(dst = %ctx.dst, peer = ?ctx.attrs.principal, method = %req.method(), path = %path_now, policy = ?d.policy, reason = d.reason, "request denied");
            *decided_by = Some(d.policy.unwrap_or_else(|| "none".into()));
            end(ran, &mut view);
            return reply(403, DENIED_BODY, &[]);
        }
    }
    if let (false, Some(view)) = (after.is_empty(), view.as_mut()) {
        let replied = run_request_plugins(after, view, &mut req, end_of_stream, &mut ran);
        if let Some((r, plugin)) = replied {
            *decided_by = Some(format!("wasm:{plugin}"));
            return finish_local(ctx, r, ran, view);
        }
    }
    // Forward. An upgrade (WebSocket...) is spliced after the 101.
    let downstream_upgrade = req
        .headers()
        .contains_key(http::header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    let mut resp = match ctx.upstream.send(req, proto).await {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(dst = %ctx.dst, error = %format!("{e:#}"), "upstream request failed");
            end(ran, &mut view);
            return reply(
                503,
                "upstream connect error or disconnect/reset before headers\n",
                &[],
            );
        }
    };
    if resp.status() == http::StatusCode::SWITCHING_PROTOCOLS {
        if let Some(down) = downstream_upgrade {
            let up = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(d), Ok(u)) = (down.await, up.await) {
                    let (mut d, mut u) = (TokioIo::new(d), TokioIo::new(u));
                    let _ = crate::proxy::copy::bidirectional(&mut d, &mut u).await;
                }
            });
        }
    }
    if let (false, Some(view)) = (ran.entries.is_empty(), view.as_mut()) {
        let eos = hyper::body::Body::is_end_stream(resp.body());
        if let Some((r, plugin)) = run_response_plugins(&ran, view, &mut resp, eos) {
            *decided_by = Some(format!("wasm:{plugin}"));
            chain::finish(ran, view);
            return local(r);
        }
        chain::finish(ran, view);
    }
    resp.map(Either::Left)
}

/// Ends the contexts of the plugins that saw the request, if any ran.
fn end(ran: Ran, view: &mut Option<Box<HttpState>>) {
    if let Some(v) = view {
        chain::finish(ran, v);
    }
}

/// A plugin replied locally: run the response callbacks of the plugins that saw the
/// request, then end their contexts.
fn finish_local(
    ctx: &ConnCtx,
    r: LocalReply,
    ran: Ran,
    view: &mut Box<HttpState>,
) -> http::Response<RespBody> {
    tracing::debug!(dst = %ctx.dst, status = r.status, details = %r.details, "wasm plugin replied locally");
    let mut resp = local(r);
    let _ = run_response_plugins(&ran, view, &mut resp, true);
    chain::finish(ran, view);
    resp
}
