//! Per-request processing on the destination side, on the request and response
//! heads: path normalization, Wasm plugins (AUTHN/AUTHZ phases), L7 authorization,
//! plugins of the later phases, response plugins, and per-request metrics and
//! access log. Shared by the HTTP/1 proxy ([`super::h1`]) and the HTTP/2 one
//! (hyper, [`serve_h2_request`]); neither body is touched here.

pub use super::message::{reply, LocalResponse, RequestMessage, ResponseMessage};
use super::ConnCtx;
use crate::fields::Fields;
use crate::proxy::access_log;
use crate::proxy::counters::NodeCounters;
use crate::wasm::abi::{HttpState, LocalReply};
use crate::wasm::chain::{self, Ran};
use bytes::Bytes;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::sync::Arc;
use std::time::{Duration, Instant};
use weft_authz::path;

pub type RespBody = Either<Incoming, Either<Full<Bytes>, super::upstream::BufferedBody>>;

/// The body of weft's own answer (a local reply).
fn local_body(b: Bytes) -> RespBody {
    Either::Right(Either::Left(Full::new(b)))
}

/// A body read whole (for the plugins), with its trailers.
fn buffered_body(
    data: Vec<u8>,
    trailers: Option<http::HeaderMap>,
) -> super::upstream::BufferedBody {
    let mut frames = vec![Ok(hyper::body::Frame::data(Bytes::from(data)))];
    if let Some(t) = trailers {
        frames.push(Ok(hyper::body::Frame::trailers(t)));
    }
    http_body_util::StreamBody::new(futures::stream::iter(frames))
}

/// The body of a 403 from weft's L7 authorization (Istio's text).
pub const DENIED_BODY: &str = "RBAC: access denied";
/// The body of weft's `400` to a request whose host is ambiguous.
pub const AMBIGUOUS_HOST_BODY: &str = "ambiguous host\n";

/// The body of the reply when the application cannot be reached or closes before
/// answering (Envoy's text).
pub const UPSTREAM_FAILED_BODY: &str =
    "upstream connect error or disconnect/reset before headers\n";

fn local(r: LocalReply) -> LocalResponse {
    reply(r.status, r.body, &r.headers)
}

fn pair(k: &[u8], v: &[u8]) -> (String, String) {
    (
        String::from_utf8_lossy(k).into_owned(),
        String::from_utf8_lossy(v).into_owned(),
    )
}

/// An HTTP/2 message's map is copied for plugins and rebuilt only if they changed it.
fn return_to_map(map: &mut http::HeaderMap, fields: Fields) {
    if fields.changed() {
        *map = fields.to_map();
    }
}

impl<B> RequestMessage for http::Request<B> {
    fn method(&self) -> &http::Method {
        self.method()
    }

    fn path_and_query(&self) -> &str {
        self.uri().path_and_query().map_or("/", |p| p.as_str())
    }

    fn set_path_and_query(&mut self, pq: &str) -> bool {
        match with_path(self.uri(), pq) {
            Some(u) => {
                *self.uri_mut() = u;
                true
            }
            None => false,
        }
    }

    fn authority(&self) -> &str {
        self.uri()
            .authority()
            .map(|a| a.as_str())
            .or_else(|| {
                self.headers()
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
            })
            .unwrap_or_default()
    }

    fn scheme(&self) -> &str {
        self.uri().scheme_str().unwrap_or("http")
    }

    fn lend_fields(&mut self) -> Fields {
        Fields::from_map(self.headers())
    }

    fn return_fields(&mut self, fields: Fields) {
        return_to_map(self.headers_mut(), fields)
    }

    fn field_pairs(&self) -> Vec<(String, String)> {
        self.headers()
            .iter()
            .map(|(k, v)| pair(k.as_str().as_bytes(), v.as_bytes()))
            .collect()
    }
}

impl<B> ResponseMessage for http::Response<B> {
    fn status(&self) -> u16 {
        self.status().as_u16()
    }

    fn set_status(&mut self, status: u16) {
        if let Ok(s) = http::StatusCode::from_u16(status) {
            *self.status_mut() = s;
        }
    }

    fn lend_fields(&mut self) -> Fields {
        Fields::from_map(self.headers())
    }

    fn return_fields(&mut self, fields: Fields) {
        return_to_map(self.headers_mut(), fields)
    }
}

/// Fields as (lower-case name, value) pairs, for authorization.
pub fn field_pairs(fields: &Fields) -> Vec<(String, String)> {
    fields.iter().map(|(k, v)| pair(k, v)).collect()
}

/// Runs `f` with the request's own fields lent to the plugins' view.
fn with_request<R>(
    view: &mut Box<HttpState>,
    req: &mut impl RequestMessage,
    f: impl FnOnce(&mut Box<HttpState>) -> R,
) -> R {
    view.request.fields = req.lend_fields();
    let r = f(view);
    req.return_fields(view.request.take_fields());
    r
}

/// Runs `f` with the response's status and own fields lent to the plugins' view,
/// then applies the status they set.
fn with_response<R>(
    view: &mut Box<HttpState>,
    resp: &mut impl ResponseMessage,
    f: impl FnOnce(&mut Box<HttpState>) -> R,
) -> R {
    view.response
        .set_response(resp.status(), resp.lend_fields());
    let r = f(view);
    resp.return_fields(view.response.take_fields());
    // `Headers` only accepts a final status (200-599) as `:status`.
    if let Some(code) = view.response.pseudo(":status").and_then(|s| s.parse().ok()) {
        if code != resp.status() {
            resp.set_status(code);
        }
    }
    r
}

/// Runs `plugins`' request callbacks on the request's own fields, lent to the
/// plugins' view. Returns a local reply, if one sent it.
fn run_request_plugins(
    plugins: &[Arc<crate::wasm::plugin::Plugin>],
    view: &mut Box<HttpState>,
    req: &mut impl RequestMessage,
    end_of_stream: bool,
    ran: &mut Ran,
) -> Option<(LocalReply, String)> {
    with_request(view, req, |v| {
        chain::run_request(plugins, v, end_of_stream, ran)
    })
}

/// Runs the response callbacks of the plugins that saw the request on the
/// response's own fields, and applies the status they set. Returns a local reply,
/// if one sent it.
fn run_response_plugins(
    ran: &Ran,
    view: &mut Box<HttpState>,
    resp: &mut impl ResponseMessage,
    end_of_stream: bool,
) -> Option<(LocalReply, String)> {
    with_response(view, resp, |v| chain::run_response(ran, v, end_of_stream))
}

/// Runs the body callbacks on `body`, moved into the plugins' view for them.
fn run_body(
    ran: &Ran,
    view: &mut Box<HttpState>,
    body: &mut Vec<u8>,
    response: bool,
) -> Option<(LocalReply, String)> {
    fn slot(v: &mut HttpState, response: bool) -> &mut Vec<u8> {
        match response {
            true => &mut v.response_body,
            false => &mut v.request_body,
        }
    }
    std::mem::swap(slot(view, response), body);
    let replied = chain::run_body(ran, view, response);
    std::mem::swap(slot(view, response), body);
    replied
}

/// `uri` with another path and query (keeping its scheme and authority).
pub fn with_path(uri: &http::Uri, path_and_query: &str) -> Option<http::Uri> {
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(path_and_query.parse().ok()?);
    http::Uri::from_parts(parts).ok()
}

/// A bounded method label.
pub fn method_label(m: &http::Method) -> &'static str {
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

/// One request's bookkeeping from its head to its response head: timing, the
/// bounded method label, what decided it locally, and what the access log needs.
pub struct Exchange {
    start: Instant,
    /// When the response head went out, if that was before [`Exchange::end`].
    head_out: Option<Duration>,
    method: &'static str,
    pub decided_by: Option<String>,
    /// When access logging is on: the method, and the path (no query) and authority
    /// as received, in one string (one allocation), split at the index.
    log: Option<(http::Method, String, usize)>,
}

impl Exchange {
    /// Starts the bookkeeping of `req`, whose head has just been read.
    pub fn begin(req: &impl RequestMessage, ctx: &ConnCtx) -> Self {
        Self {
            start: Instant::now(),
            head_out: None,
            method: method_label(req.method()),
            decided_by: None,
            log: ctx.state.access_log.active().then(|| {
                let pq = req.path_and_query();
                let path = pq.split(['?', '#']).next().unwrap_or_default();
                let authority = req.authority();
                let mut text = String::with_capacity(path.len() + authority.len());
                text.push_str(path);
                text.push_str(authority);
                (req.method().clone(), text, path.len())
            }),
        }
    }

    /// The response head is being written (its body may stream for long after):
    /// the request's duration ends here.
    pub fn head_out(&mut self) {
        self.head_out.get_or_insert_with(|| self.start.elapsed());
    }

    /// Records the request's metrics (and access log record) with response `code`;
    /// its duration runs from the request head in to the response head out.
    pub fn end(self, ctx: &ConnCtx, code: u16) {
        let took: Duration = self.head_out.unwrap_or_else(|| self.start.elapsed());
        ctx.record_request(self.method, code, took, self.decided_by.as_deref());
        if let Some((method, text, split)) = &self.log {
            let (path, authority) = text.split_at(*split);
            let destination = ctx.target.workload();
            ctx.state.access_log.request(&access_log::RequestRecord {
                source_addr: ctx.props.source,
                destination_addr: ctx.dst,
                source_identity: ctx.props.peer_id.as_deref().unwrap_or("unknown"),
                destination_workload: &destination,
                mtls: ctx.props.peer_id.is_some(),
                method: method.as_str(),
                path,
                authority,
                response_code: code,
                decided_by: self.decided_by.as_deref(),
                duration: took,
            });
        }
    }
}

/// One request's plugin run: the plugins' view of its headers, and the plugins
/// that saw it. A connection keeps one between its requests
/// ([`ConnCtx::take_run`]), so that a request with plugins allocates none of it.
#[derive(Default)]
pub struct PluginRun {
    view: Box<HttpState>,
    ran: Ran,
    /// The request's authority as the client sent it (a plugin may change the
    /// Host field): what authorization matches.
    authority: String,
}

impl ConnCtx {
    /// The connection's spare plugin run, or a new one when it is in use (HTTP/2
    /// requests run concurrently) or none was kept yet.
    fn take_run(&self) -> PluginRun {
        let spare = self.runs.lock().unwrap_or_else(|p| p.into_inner()).take();
        spare.unwrap_or_default()
    }

    /// Ends the contexts of the plugins that saw the request, if any ran, and keeps
    /// the run for the connection's next request. Nothing of the request stays in
    /// it: its response's headers and a local reply are dropped, its request's
    /// pseudo-headers are overwritten by the next request's. A run whose buffers a
    /// long target or authority grew past [`Fields::KEPT`] is dropped instead.
    fn end_run(&self, mut run: PluginRun) {
        chain::finish(&mut run.ran, &mut run.view);
        let held = run.authority.capacity() + run.view.request.pseudo_capacity();
        if held > Fields::KEPT {
            return;
        }
        let v = &mut run.view;
        v.local_reply = None;
        v.response.clear();
        v.request.fields = Default::default();
        *self.runs.lock().unwrap_or_else(|p| p.into_inner()) = Some(run);
    }
}

/// A request allowed through: the plugins that saw it, whose response callbacks
/// and end run later.
pub struct Pending<'a> {
    run: Option<PluginRun>,
    ctx: &'a ConnCtx,
}

impl Pending<'_> {
    /// Does a plugin that saw the request read its body? Then the body is
    /// buffered whole (at most [`crate::wasm::abi::MAX_BODY_BYTES`]) and given to
    /// [`Pending::on_request_body`] before the request goes on.
    pub fn has_request_body_callback(&self) -> bool {
        self.run.as_ref().is_some_and(|r| {
            r.ran
                .entries
                .iter()
                .any(|(p, _)| p.has_request_body_callback())
        })
    }

    /// Asks the plugins with a request-body callback whether they read this
    /// request's body ([`crate::wasm::plugin::Plugin::probe_body`]): `Ok(true)`
    /// buffers it for them, `Ok(false)` streams it; or the local reply that
    /// answers the request instead.
    pub fn probe_request_body(
        &mut self,
        req: &mut impl RequestMessage,
        x: &mut Exchange,
    ) -> BodyPlan {
        let Some(run) = self.run.as_mut() else {
            return BodyPlan::Stream;
        };
        let r = with_request(&mut run.view, req, |v| {
            chain::probe_body(&run.ran, v, false)
        });
        BodyPlan::of(r, x)
    }

    /// [`Pending::probe_request_body`] for the response's body.
    pub fn probe_response_body(
        &mut self,
        resp: &mut impl ResponseMessage,
        x: &mut Exchange,
    ) -> BodyPlan {
        let Some(run) = self.run.as_mut() else {
            return BodyPlan::Stream;
        };
        let r = with_response(&mut run.view, resp, |v| {
            chain::probe_body(&run.ran, v, true)
        });
        BodyPlan::of(r, x)
    }

    /// Runs the plugins' request-body callbacks on the whole `body` (which they
    /// may change), with the request's headers readable (and changeable) as in
    /// the headers callbacks. Returns the local reply that answers the request
    /// instead, if a plugin sent one.
    pub fn on_request_body(
        &mut self,
        req: &mut impl RequestMessage,
        body: &mut Vec<u8>,
        x: &mut Exchange,
    ) -> Option<LocalResponse> {
        let run = self.run.as_mut()?;
        let replied = with_request(&mut run.view, req, |v| run_body(&run.ran, v, body, false));
        replied.map(|(r, plugin)| {
            x.decided_by = Some(format!("wasm:{plugin}"));
            local(r)
        })
    }

    /// Will any plugin see the response (so its fields must be parsed)?
    pub fn sees_response(&self) -> bool {
        self.run.as_ref().is_some_and(|r| !r.ran.entries.is_empty())
    }

    /// The response head from the application: runs the response callbacks (which
    /// may change its status and headers). Returns the local reply that replaces
    /// the response, if a plugin sent one. The plugins' contexts end when this is
    /// dropped (after [`Pending::on_response_body`], when a plugin reads bodies).
    pub fn on_response(
        &mut self,
        resp: &mut impl ResponseMessage,
        end_of_stream: bool,
        x: &mut Exchange,
    ) -> Option<LocalResponse> {
        let run = self.run.as_mut()?;
        let replied = (!run.ran.entries.is_empty())
            .then(|| run_response_plugins(&run.ran, &mut run.view, resp, end_of_stream))
            .flatten();
        replied.map(|(r, plugin)| {
            x.decided_by = Some(format!("wasm:{plugin}"));
            local(r)
        })
    }

    /// Does a plugin that saw the request read response bodies? Then the
    /// response's body is buffered whole (at most
    /// [`crate::wasm::abi::MAX_BODY_BYTES`]) for [`Pending::on_response_body`].
    pub fn has_response_body_callback(&self) -> bool {
        self.run.as_ref().is_some_and(|r| {
            r.ran
                .entries
                .iter()
                .any(|(p, _)| p.has_response_body_callback())
        })
    }

    /// Runs the plugins' response-body callbacks (in reverse order) on the whole
    /// `body` (which they may change), with the response's headers readable and
    /// changeable. Returns the local reply that replaces the response, if a
    /// plugin sent one.
    pub fn on_response_body(
        &mut self,
        resp: &mut impl ResponseMessage,
        body: &mut Vec<u8>,
        x: &mut Exchange,
    ) -> Option<LocalResponse> {
        let run = self.run.as_mut()?;
        let replied = with_response(&mut run.view, resp, |v| run_body(&run.ran, v, body, true));
        replied.map(|(r, plugin)| {
            x.decided_by = Some(format!("wasm:{plugin}"));
            local(r)
        })
    }
}

/// What the plugins want done with a message's body.
pub enum BodyPlan {
    /// None reads it: it streams past them.
    Stream,
    /// One reads it: buffered whole for the body callbacks.
    Buffer,
    /// A plugin answered instead.
    Reply(LocalResponse),
}

impl BodyPlan {
    fn of(r: Result<bool, (LocalReply, String)>, x: &mut Exchange) -> Self {
        match r {
            Ok(true) => BodyPlan::Buffer,
            Ok(false) => BodyPlan::Stream,
            Err((r, plugin)) => {
                x.decided_by = Some(format!("wasm:{plugin}"));
                BodyPlan::Reply(local(r))
            }
        }
    }
}

/// A request abandoned (its connection failed, or the client went away) still ends
/// the contexts of the plugins that saw it.
impl Drop for Pending<'_> {
    fn drop(&mut self) {
        end(self.ctx, self.run.take());
    }
}

/// What the request head decided.
pub enum Verdict<'a> {
    /// Forward the (possibly rewritten) request to the application.
    Forward(Pending<'a>),
    /// Answer with this instead (denied, malformed path, a plugin's local reply).
    Reply(LocalResponse),
}

/// Normalizes, runs the request plugins and authorizes one request head.
/// `end_of_stream`: the request has no body.
pub fn on_request<'a>(
    req: &mut impl RequestMessage,
    end_of_stream: bool,
    ctx: &'a ConnCtx,
    x: &mut Exchange,
) -> Verdict<'a> {
    // Most targets are already normal: nothing is built or changed for them.
    match path::normalize_if_needed(req.path_and_query()) {
        Ok(None) => {}
        Ok(Some(n)) => {
            if !req.set_path_and_query(&n.path_and_query()) {
                return Verdict::Reply(reply(400, "malformed request path\n", &[]));
            }
        }
        Err(e) => {
            tracing::info!(dst = %ctx.dst, error = %e, "request refused: malformed path");
            return Verdict::Reply(reply(400, "malformed request path\n", &[]));
        }
    }
    // From here the request's target is normalized (plugins' rewrites included), so
    // the path to authorize is its path, `path::path_of(req.path_and_query())`.
    let plugins = &ctx.plan.plugins;
    // Plugins are in phase order: AUTHN-phase plugins, then (after JWT
    // verification) AUTHZ-phase ones, then weft's authorization, then the rest.
    let (before, after) = plugins.split_at(plugins.partition_point(|p| p.phase.before_authz()));
    let (authn_phase, authz_phase) =
        before.split_at(before.partition_point(|p| p.phase == crate::wasm::plugin::Phase::Authn));
    // Only with plugins; each callback swaps the view into the plugin's store. The
    // fields are moved in while plugins run (no copy); see `Headers`.
    let mut run = (!plugins.is_empty()).then(|| {
        let mut run = ctx.take_run();
        run.authority.clear();
        run.authority.push_str(req.authority());
        let (method, pq) = (req.method(), req.path_and_query());
        let v = &mut run.view;
        v.request
            .set_request(method, pq, &run.authority, req.scheme());
        v.props.get_or_insert_with(|| ctx.props.clone());
        run
    });
    if let Some(v) = run_before_authz(authn_phase, req, end_of_stream, ctx, x, &mut run) {
        return v;
    }
    let workload = ctx.target.workload();
    // JWT verification (RequestAuthentication): an invalid token ends here.
    let auth = match super::jwt::authenticate(req, ctx, &workload) {
        Ok(auth) => auth,
        Err(why) => {
            x.decided_by = Some(format!("jwt:{why}"));
            end(ctx, run);
            return Verdict::Reply(super::jwt::rejection());
        }
    };
    // A token taken out of the query: later plugins see the path the app will.
    if let Some(r) = run.as_mut() {
        if r.view.request.pseudo(":path") != Some(req.path_and_query()) {
            let (method, pq, scheme) = (req.method(), req.path_and_query(), req.scheme());
            r.view.request.set_request(method, pq, &r.authority, scheme);
        }
    }
    if let Some(v) = run_before_authz(authz_phase, req, end_of_stream, ctx, x, &mut run) {
        return v;
    }
    if ctx.authz_http(&workload) {
        let d = ctx
            .state
            .decide_request(&workload, &ctx.authz, |r, with_headers| {
                r.method.push_str(req.method().as_str());
                r.path.push_str(path::path_of(req.path_and_query()));
                let client = run.as_ref().map(|r| r.authority.as_str());
                r.host.push_str(client.unwrap_or_else(|| req.authority()));
                if with_headers {
                    r.headers = req.field_pairs();
                }
                r.auth = auth;
            });
        ctx.count_decision(&d);
        if !d.allowed {
            tracing::debug!(dst = %ctx.dst, peer = ?ctx.attrs.principal, method = %req.method(), path = %path::path_of(req.path_and_query()), policy = ?d.policy, reason = d.reason, "request denied");
            x.decided_by = Some(d.policy.as_deref().unwrap_or("none").to_string());
            end(ctx, run);
            return Verdict::Reply(reply(403, DENIED_BODY, &[]));
        }
    }
    if let (false, Some(r)) = (after.is_empty(), run.as_mut()) {
        let replied = run_request_plugins(after, &mut r.view, req, end_of_stream, &mut r.ran);
        if let Some((reply, plugin)) = replied {
            x.decided_by = Some(format!("wasm:{plugin}"));
            return Verdict::Reply(finish_local(ctx, reply, run));
        }
    }
    Verdict::Forward(Pending { run, ctx })
}

/// Runs request plugins of a phase before weft's authorization; a plugin's local
/// reply, or a path it rewrote into a malformed one, ends the request here.
fn run_before_authz<'a>(
    plugins: &[Arc<crate::wasm::plugin::Plugin>],
    req: &mut impl RequestMessage,
    end_of_stream: bool,
    ctx: &'a ConnCtx,
    x: &mut Exchange,
    run: &mut Option<PluginRun>,
) -> Option<Verdict<'a>> {
    let r = run.as_mut().filter(|_| !plugins.is_empty())?;
    let replied = run_request_plugins(plugins, &mut r.view, req, end_of_stream, &mut r.ran);
    if let Some((reply, plugin)) = replied {
        x.decided_by = Some(format!("wasm:{plugin}"));
        return Some(Verdict::Reply(finish_local(ctx, reply, run.take())));
    }
    // A plugin may have rewritten the path: normalize and authorize the new one.
    if let Some(p) = r.view.request.pseudo(":path") {
        if p != req.path_and_query() {
            let set = path::normalize(p).is_ok_and(|n| req.set_path_and_query(&n.path_and_query()));
            if !set {
                // The plugins' contexts end here too.
                end(ctx, run.take());
                return Some(Verdict::Reply(reply(400, "malformed request path\n", &[])));
            }
        }
    }
    None
}

/// Ends the plugins' run of a request answered without its response, if any ran.
fn end(ctx: &ConnCtx, run: Option<PluginRun>) {
    if let Some(run) = run {
        ctx.end_run(run);
    }
}

/// A plugin replied locally: run the response callbacks of the plugins that saw the
/// request, then end their contexts.
fn finish_local(ctx: &ConnCtx, r: LocalReply, run: Option<PluginRun>) -> LocalResponse {
    tracing::debug!(dst = %ctx.dst, status = r.status, details = %r.details, "wasm plugin replied locally");
    let mut resp = local(r);
    if let Some(mut run) = run {
        let _ = run_response_plugins(&run.ran, &mut run.view, &mut resp, true);
        ctx.end_run(run);
    }
    resp
}

/// Whether `host` (a `Host` value) names the host and port of `a`, the
/// authority of a target with `scheme` (none: authority form, as `http`).
pub(crate) fn same_authority(a: &http::uri::Authority, scheme: Option<&str>, host: &[u8]) -> bool {
    let default = if scheme.is_some_and(|s| s.eq_ignore_ascii_case("https")) {
        443
    } else {
        80
    };
    let Ok(h) = http::uri::Authority::try_from(host.trim_ascii()) else {
        return false;
    };
    !h.as_str().contains('@')
        && h.host().eq_ignore_ascii_case(a.host())
        && h.port_u16().unwrap_or(default) == a.port_u16().unwrap_or(default)
}

/// Why an HTTP/2 request's host is ambiguous, if it is: authorization reads
/// `:authority`, else `host`, and the application may read either. So at most one
/// `host` field, visible ASCII, naming the host and port of `:authority` if both
/// are sent (RFC 9113 section 8.3.1).
pub fn ambiguous_h2_host<B>(req: &http::Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(http::header::HOST).iter();
    let host = hosts.next()?;
    if hosts.next().is_some() {
        return Some("more than one host field");
    }
    let Ok(host) = host.to_str() else {
        return Some("host is not visible ASCII");
    };
    let uri = req.uri();
    match uri.authority() {
        Some(a) if !same_authority(a, uri.scheme_str(), host.as_bytes()) => {
            Some("host differs from :authority")
        }
        _ => None,
    }
}

/// Handles one HTTP/2 request end to end (hyper's server and client carry the
/// streams and bodies). One whose host is ambiguous gets 400.
pub async fn serve_h2_request(
    mut req: http::Request<Incoming>,
    ctx: Arc<ConnCtx>,
) -> http::Response<RespBody> {
    let mut x = Exchange::begin(&req, &ctx);
    if let Some(why) = ambiguous_h2_host(&req) {
        NodeCounters::count(&ctx.state.counters.l7_ambiguous_host);
        tracing::info!(dst = %ctx.dst, peer = ?ctx.attrs.principal, why, "HTTP/2 request refused: ambiguous host");
        x.end(&ctx, 400);
        return reply(400, AMBIGUOUS_HOST_BODY, &[]).map(local_body);
    }
    let eos = hyper::body::Body::is_end_stream(req.body());
    let resp = match on_request(&mut req, eos, &ctx, &mut x) {
        Verdict::Reply(r) => r.map(local_body),
        Verdict::Forward(mut pending) => {
            let mut req = req;
            let plan = match !eos && pending.has_request_body_callback() {
                true => pending.probe_request_body(&mut req, &mut x),
                false => BodyPlan::Stream,
            };
            let wanted = match plan {
                BodyPlan::Reply(r) => {
                    x.end(&ctx, r.status().as_u16());
                    return r.map(local_body);
                }
                BodyPlan::Buffer => true,
                BodyPlan::Stream => false,
            };
            let req = if wanted {
                match buffer_for_plugins(req, &mut pending, &mut x).await {
                    Ok(req) => req,
                    Err(resp) => {
                        x.end(&ctx, resp.status().as_u16());
                        return resp;
                    }
                }
            } else {
                req.map(Either::Left)
            };
            forward_h2(req, pending, &ctx, &mut x).await
        }
    };
    x.end(&ctx, resp.status().as_u16());
    resp
}

/// Why an HTTP/2 body could not be read whole.
enum Whole {
    /// Past [`crate::wasm::abi::MAX_BODY_BYTES`].
    TooLarge,
    /// The stream broke off.
    Broken,
}

/// An HTTP/2 body read whole, at most [`crate::wasm::abi::MAX_BODY_BYTES`]: its
/// data and its trailers.
async fn collect_whole(body: Incoming) -> Result<(Vec<u8>, Option<http::HeaderMap>), Whole> {
    use http_body_util::BodyExt;
    let limit = crate::wasm::abi::MAX_BODY_BYTES;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(c) => {
            let trailers = c.trailers().cloned();
            Ok((c.to_bytes().to_vec(), trailers))
        }
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            Err(Whole::TooLarge)
        }
        Err(_) => Err(Whole::Broken),
    }
}

/// Reads a request's body whole (at most [`crate::wasm::abi::MAX_BODY_BYTES`],
/// else 413) for the plugins that read bodies, runs their body callbacks, and
/// gives back the request with the body they left, its `content-length` set and
/// its trailers kept; or the answer instead (a plugin's local reply, 413, 400).
async fn buffer_for_plugins(
    req: http::Request<Incoming>,
    pending: &mut Pending<'_>,
    x: &mut Exchange,
) -> Result<http::Request<super::upstream::UpBody>, http::Response<RespBody>> {
    let (parts, body) = req.into_parts();
    let (mut data, trailers) = match collect_whole(body).await {
        Ok(whole) => whole,
        Err(Whole::TooLarge) => {
            let body = "request body too large for the plugins that read it\n";
            return Err(reply(413, body, &[]).map(local_body));
        }
        Err(Whole::Broken) => {
            return Err(reply(400, "request body not received\n", &[]).map(local_body))
        }
    };
    let mut req = http::Request::from_parts(parts, ());
    if let Some(r) = pending.on_request_body(&mut req, &mut data, x) {
        return Err(r.map(local_body));
    }
    req.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(data.len()),
    );
    let body = buffered_body(data, trailers);
    Ok(req.map(|()| Either::Right(body)))
}

/// Reads a response's body whole (at most [`crate::wasm::abi::MAX_BODY_BYTES`],
/// else 500, as Envoy answers) for the plugins that read bodies and runs their
/// body callbacks: the response goes on with the body they left, its
/// `content-length` set and its trailers kept (gRPC's status among them); or a
/// plugin's local reply replaces it.
async fn buffer_response(
    resp: http::Response<Incoming>,
    pending: &mut Pending<'_>,
    x: &mut Exchange,
) -> http::Response<RespBody> {
    let (parts, body) = resp.into_parts();
    let (mut data, trailers) = match collect_whole(body).await {
        Ok(whole) => whole,
        Err(Whole::TooLarge) => {
            let body = "response body too large for the plugins that read it\n";
            return reply(500, body, &[]).map(local_body);
        }
        Err(Whole::Broken) => return reply(502, UPSTREAM_FAILED_BODY, &[]).map(local_body),
    };
    let mut resp = http::Response::from_parts(parts, ());
    if let Some(r) = pending.on_response_body(&mut resp, &mut data, x) {
        return r.map(local_body);
    }
    resp.headers_mut().insert(
        http::header::CONTENT_LENGTH,
        http::HeaderValue::from(data.len()),
    );
    let body = buffered_body(data, trailers);
    resp.map(|()| Either::Right(Either::Right(body)))
}

/// Sends a request to the application and runs the response plugins.
async fn forward_h2(
    req: http::Request<super::upstream::UpBody>,
    mut pending: Pending<'_>,
    ctx: &ConnCtx,
    x: &mut Exchange,
) -> http::Response<RespBody> {
    match ctx.upstream.send_h2(req).await {
        Ok(mut resp) => {
            let eos = hyper::body::Body::is_end_stream(resp.body());
            match pending.on_response(&mut resp, eos, x) {
                Some(r) => r.map(local_body),
                None if !eos && pending.has_response_body_callback() => {
                    match pending.probe_response_body(&mut resp, x) {
                        BodyPlan::Reply(r) => r.map(local_body),
                        BodyPlan::Buffer => buffer_response(resp, &mut pending, x).await,
                        BodyPlan::Stream => resp.map(Either::Left),
                    }
                }
                None => resp.map(Either::Left),
            }
        }
        Err(e) => {
            tracing::debug!(dst = %ctx.dst, error = %format!("{e:#}"), "upstream request failed");
            drop(pending); // ends the plugins' contexts
            reply(503, UPSTREAM_FAILED_BODY, &[]).map(local_body)
        }
    }
}
