//! One routed client connection: served as HTTP (hyper, HTTP/1.1 or HTTP/2 as the
//! client speaks), each request matched against the Service's route table and sent
//! on its own to a backend and endpoint of its own.

use super::filters;
use super::upstream::{BoxError, DialFrom, ReqBody, SendError, Sent, Upstreams};
use crate::proxy::lb::Active;
use crate::proxy::local::LocalPod;
use crate::proxy::route_table::{RequestView, RouteTable, Rule};
use crate::proxy::state::ProxyState;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use weft_proto::pb;
use weft_proto::pb::route_filter::Kind as FilterKind;

/// Largest request body kept in memory so a request can be retried or mirrored; a
/// larger one (or one of unknown length) streams and is neither.
pub const MAX_BUFFERED_BODY: u64 = 64 * 1024;
/// A mirrored exchange is abandoned after this.
pub const MIRROR_TIMEOUT: Duration = Duration::from_secs(10);

/// A response body to the client.
pub type RespBody = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// Everything a routed connection's requests share.
pub struct Routed {
    pub state: Arc<ProxyState>,
    pub source: LocalPod,
    pub upstreams: Arc<Upstreams>,
    pub service: Arc<pb::Service>,
    pub service_key: String,
    /// The Service port the client connected to.
    pub port: u16,
    pub client: SocketAddr,
    /// Whether the client speaks HTTP/2 (requests go upstream the same way).
    pub h2: bool,
    /// What its requests reuse: the route table (with the routes generation it
    /// was built from) and metric handles, so a request builds no label set.
    pub cache: std::sync::Mutex<ConnCache>,
}

/// Per-connection state reused by its requests.
#[derive(Default)]
pub struct ConnCache {
    table: Option<(u64, Arc<RouteTable>)>,
    metrics: Vec<MetricHandles>,
}

/// A routed request's metric handles, by (rule, backend, response code).
struct MetricHandles {
    rule: usize,
    backend: Option<String>,
    code: u16,
    requests: prometheus_client::metrics::counter::Counter,
    duration: prometheus_client::metrics::histogram::Histogram,
}

impl Routed {
    fn cache(&self) -> std::sync::MutexGuard<'_, ConnCache> {
        self.cache.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn table(&self) -> Arc<RouteTable> {
        let generation = self.state.config.snapshot().routes_generation;
        if let Some((g, t)) = &self.cache().table {
            if *g == generation {
                return t.clone();
            }
        }
        let t = self.state.route_table(
            &self.service_key,
            &self.service,
            self.port,
            &self.source.workload().namespace,
        );
        self.cache().table = Some((generation, t.clone()));
        t
    }
}

/// Most metric handle sets one connection keeps (rules x backends x codes).
const MAX_CACHED_HANDLES: usize = 64;

fn local(code: StatusCode, why: &str) -> Response<RespBody> {
    let mut r = Response::new(
        Full::new(Bytes::from(format!("{why}\n")))
            .map_err(|e| match e {})
            .boxed(),
    );
    *r.status_mut() = code;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain"),
    );
    r
}

/// A request body that can be sent more than once, or the stream itself.
enum ReqPayload {
    Buffered(Bytes),
    Streamed(Option<ReqBody>),
}

impl ReqPayload {
    /// Buffers a body known to be small enough; anything else streams.
    async fn from(body: Incoming) -> Result<Self, StatusCode> {
        let small = body
            .size_hint()
            .upper()
            .is_some_and(|u| u <= MAX_BUFFERED_BODY);
        if !small {
            return Ok(ReqPayload::streamed(body));
        }
        match http_body_util::Limited::new(body, MAX_BUFFERED_BODY as usize)
            .collect()
            .await
        {
            Ok(c) => Ok(ReqPayload::Buffered(c.to_bytes())),
            Err(_) => Err(StatusCode::BAD_REQUEST),
        }
    }

    fn streamed(body: Incoming) -> Self {
        ReqPayload::Streamed(Some(body.map_err(BoxError::from).boxed()))
    }

    /// Gives back the body of a request that was never sent.
    fn restore(&mut self, body: ReqBody) {
        if let ReqPayload::Streamed(s) = self {
            *s = Some(body);
        }
    }

    fn replayable(&self) -> bool {
        matches!(self, ReqPayload::Buffered(_))
    }

    /// The body for one attempt (`None`: a streamed body was already used).
    fn take(&mut self) -> Option<ReqBody> {
        match self {
            ReqPayload::Buffered(b) => Some(Full::new(b.clone()).map_err(|e| match e {}).boxed()),
            ReqPayload::Streamed(s) => s.take(),
        }
    }
}

/// What the filters of a rule and its backend did to a request.
#[derive(Default)]
struct Applied {
    response_headers: Vec<pb::HeaderModifier>,
    mirrors: Vec<pb::RequestMirror>,
}

/// Applies request filters; `Err` is a redirect answered at once.
fn apply_filters(
    list: &[pb::RouteFilter],
    parts: &mut http::request::Parts,
    prefix: Option<&str>,
    port: u16,
    applied: &mut Applied,
) -> Result<(), Response<()>> {
    for f in list {
        match &f.kind {
            Some(FilterKind::RequestHeaders(m)) => filters::modify_headers(&mut parts.headers, m),
            Some(FilterKind::ResponseHeaders(m)) => applied.response_headers.push(m.clone()),
            Some(FilterKind::Redirect(r)) => return Err(filters::redirect(parts, r, prefix, port)),
            Some(FilterKind::Rewrite(r)) => filters::rewrite(parts, r, prefix),
            Some(FilterKind::Mirror(m)) => applied.mirrors.push(m.clone()),
            None => {}
        }
    }
    Ok(())
}

/// The ready endpoints of backend Service `b` for `port` (the backend's port, or the
/// one the client connected to).
fn endpoints(state: &ProxyState, b: &pb::RouteBackend, port: u16) -> Vec<SocketAddr> {
    let snap = state.config.snapshot();
    let Some(svc) = with_service_key(b, |k| snap.services.get(k).cloned()) else {
        return Vec::new();
    };
    let port = if b.port == 0 { u32::from(port) } else { b.port };
    svc.endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let t = e.target_ports.get(&port)?;
            let ip = e.ips.first()?.parse().ok()?;
            Some(SocketAddr::new(ip, u16::try_from(*t).ok()?))
        })
        .collect()
}

thread_local! {
    /// The Service key of the last backend looked up on this thread: requests of a
    /// route mostly go to the same few backends, so the key is not rebuilt each time.
    static LAST_KEY: std::cell::RefCell<(String, String, String)> = Default::default();
}

/// Calls `f` with `Service/<namespace>/<name>` of a backend.
fn with_service_key<T>(b: &pb::RouteBackend, f: impl FnOnce(&str) -> T) -> T {
    LAST_KEY.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != b.service_namespace || c.1 != b.service_name {
            *c = (
                b.service_namespace.clone(),
                b.service_name.clone(),
                weft_proto::resource::key(
                    weft_proto::resource::KIND_SERVICE,
                    &b.service_namespace,
                    &b.service_name,
                ),
            );
        }
        f(&c.2)
    })
}

/// Where the answer to one request came from, for metrics and the access log.
struct Outcome {
    route: Option<Arc<Rule>>,
    backend: Option<String>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
}

/// Handles one request of a routed connection.
pub async fn handle(req: Request<Incoming>, rc: Arc<Routed>) -> Response<RespBody> {
    let started = Instant::now();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut outcome = Outcome {
        route: None,
        backend: None,
        endpoint: None,
        attempts: 0,
    };
    let resp = route(req, &rc, &mut outcome).await;
    record(
        &rc,
        &outcome,
        &method,
        &path,
        resp.status(),
        started.elapsed(),
    );
    resp
}

async fn route(req: Request<Incoming>, rc: &Arc<Routed>, out: &mut Outcome) -> Response<RespBody> {
    let table = rc.table();
    let (rule, prefix) = {
        let view = RequestView::of(&req);
        match table.select(&view) {
            Some(s) => (s.rule.clone(), s.prefix.map(str::to_string)),
            None => return local(StatusCode::NOT_FOUND, "no route rule matches the request"),
        }
    };
    out.route = Some(rule.clone());
    let (mut parts, body) = req.into_parts();
    let mut applied = Applied::default();
    if let Err(redirect) = apply_filters(
        &rule.rule.filters,
        &mut parts,
        prefix.as_deref(),
        rc.port,
        &mut applied,
    ) {
        return redirect.map(|()| http_body_util::Empty::new().map_err(|e| match e {}).boxed());
    }
    // A rule without backendRefs sends requests where the client sent them: the
    // Service it addressed (GAMMA).
    let parent = pb::RouteBackend {
        service_namespace: rc.service.namespace.clone(),
        service_name: rc.service.name.clone(),
        weight: 1,
        ..Default::default()
    };
    let backend = if rule.rule.backends.is_empty() {
        &parent
    } else {
        match rule.choose_backend() {
            Some(b) => b,
            None => {
                return local(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "no backend of the route rule has a weight",
                )
            }
        }
    };
    out.backend = Some(format!(
        "{}/{}",
        backend.service_namespace, backend.service_name
    ));
    if !backend.invalid.is_empty() {
        return local(
            StatusCode::INTERNAL_SERVER_ERROR,
            "the route's backend is not valid",
        );
    }
    if let Err(redirect) = apply_filters(
        &backend.filters,
        &mut parts,
        prefix.as_deref(),
        rc.port,
        &mut applied,
    ) {
        return redirect.map(|()| http_body_util::Empty::new().map_err(|e| match e {}).boxed());
    }
    let retry = rule.rule.retry.clone().unwrap_or_default();
    let attempts = retry.attempts.max(1);
    let mut payload = if attempts > 1 || !applied.mirrors.is_empty() {
        match ReqPayload::from(body).await {
            Ok(p) => p,
            Err(code) => return local(code, "request body could not be read"),
        }
    } else {
        ReqPayload::streamed(body)
    };
    for m in &applied.mirrors {
        mirror(rc, m, &parts, &payload);
    }
    let request_timeout = ms(rule.rule.request_timeout_ms);
    let per_try = ms(rule.rule.backend_request_timeout_ms);
    let deadline = request_timeout.map(|t| tokio::time::Instant::now() + t);
    let work = attempt_all(
        rc,
        backend,
        &parts,
        &mut payload,
        attempts,
        &retry,
        per_try,
        deadline,
        out,
    );
    let mut resp = match request_timeout {
        Some(t) => match tokio::time::timeout(t, work).await {
            Ok(r) => r,
            Err(_) => local(StatusCode::GATEWAY_TIMEOUT, "request timeout"),
        },
        None => work.await,
    };
    for m in &applied.response_headers {
        filters::modify_headers(resp.headers_mut(), m);
    }
    resp
}

fn ms(v: u64) -> Option<Duration> {
    (v > 0).then(|| Duration::from_millis(v))
}

/// `f`, bounded by `limit` when there is one (no timer otherwise).
async fn within<F: Future>(
    limit: Option<Duration>,
    f: F,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    match limit {
        Some(t) => tokio::time::timeout(t, f).await,
        None => Ok(f.await),
    }
}

/// Whether a result says the endpoint is failing (for outlier ejection): only
/// what the endpoint answers for, never what the client caused.
fn endpoint_failed(code: StatusCode) -> bool {
    matches!(code.as_u16(), 502..=504)
}

/// Sends the request to endpoints of `backend` until it gets an answer to give the
/// client: at most `attempts` tries that reached an endpoint, plus one more for a
/// request that was never sent (no connection, or one that closed before the
/// request was written), whatever the retry policy.
#[allow(clippy::too_many_arguments)]
async fn attempt_all(
    rc: &Arc<Routed>,
    backend: &pb::RouteBackend,
    parts: &http::request::Parts,
    payload: &mut ReqPayload,
    attempts: u32,
    retry: &pb::RouteRetry,
    per_try: Option<Duration>,
    deadline: Option<tokio::time::Instant>,
    out: &mut Outcome,
) -> Response<RespBody> {
    let state = &rc.state;
    let from = DialFrom {
        state,
        source: &rc.source,
    };
    let mut last: Option<Response<RespBody>> = None;
    let mut tries = 0u32;
    let mut spare = 1u32;
    while tries < attempts {
        if out.attempts > 0 {
            if let Some(labels) = route_labels(rc, out, 0) {
                state
                    .metrics
                    .traffic
                    .routed_retries
                    .get_or_create(&labels)
                    .inc();
            }
            if retry.backoff_ms > 0 {
                tokio::time::sleep(Duration::from_millis(retry.backoff_ms)).await;
            }
        }
        out.attempts += 1;
        let eps = endpoints(state, backend, rc.port);
        let Some((ep, active)) = state.balancer.pick(&eps) else {
            return local(
                StatusCode::SERVICE_UNAVAILABLE,
                "the backend has no ready endpoint",
            );
        };
        out.endpoint = Some(ep);
        // A connection first: failing to get one sends nothing and uses no body.
        let conn = match within(per_try, rc.upstreams.connection(&from, ep, rc.h2)).await {
            Ok(Ok(c)) => c,
            Ok(Err(e)) => {
                state.balancer.record_result(ep, false, &eps);
                tracing::debug!(error = %e, "routed request: no connection");
                last = Some(local(StatusCode::SERVICE_UNAVAILABLE, &e.to_string()));
                if spare > 0 {
                    spare -= 1;
                } else {
                    tries += 1;
                }
                continue;
            }
            Err(_) => {
                state.balancer.record_result(ep, false, &eps);
                last = Some(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "backend request timeout",
                ));
                tries += 1;
                continue;
            }
        };
        let Some(body) = payload.take() else {
            break;
        };
        let Some(req) = upstream_request(parts, body, rc.h2, ep) else {
            return local(StatusCode::BAD_REQUEST, "the request cannot be forwarded");
        };
        let result = within(per_try, rc.upstreams.send(conn, ep, req)).await;
        tries += 1;
        match result {
            Err(_) => {
                state.balancer.record_result(ep, false, &eps);
                last = Some(local(
                    StatusCode::GATEWAY_TIMEOUT,
                    "backend request timeout",
                ));
                // Maybe processed: sent again only if the policy retries 504.
                if !(retry.codes.contains(&504) && payload.replayable()) {
                    break;
                }
            }
            Ok(Ok(Sent::NotSent(req))) => {
                tries -= 1;
                payload.restore(req.into_body());
                last = Some(local(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the connection to the endpoint closed",
                ));
                if spare > 0 {
                    spare -= 1;
                } else {
                    tries += 1;
                }
            }
            Ok(Ok(Sent::Response(mut resp))) => {
                let status = resp.status();
                state
                    .balancer
                    .record_result(ep, !endpoint_failed(status), &eps);
                let retryable = retry.codes.contains(&u32::from(status.as_u16()));
                if retryable && tries < attempts && payload.replayable() {
                    last = Some(local(status, "retried"));
                    continue;
                }
                // The endpoint's connection-specific fields are about its connection,
                // not the client's.
                strip_hop_by_hop(resp.headers_mut(), false);
                return resp.map(|b| {
                    Held {
                        inner: b,
                        _active: active,
                        deadline: deadline.map(|d| Box::pin(tokio::time::sleep_until(d))),
                    }
                    .boxed()
                });
            }
            Ok(Err(e)) => {
                // A broken exchange: the client may have caused it (an aborted body),
                // so it does not count against the endpoint.
                tracing::debug!(error = %e, "routed request failed");
                last = Some(local(StatusCode::BAD_GATEWAY, &e.to_string()));
                if !payload.replayable() {
                    break;
                }
            }
        }
    }
    last.unwrap_or_else(|| local(StatusCode::BAD_GATEWAY, "no attempt could be made"))
}

/// Removes connection-specific fields (RFC 9110 7.6.1): the standard ones and
/// those `Connection` names. `Expect` goes too: this proxy already answered it.
fn strip_hop_by_hop(h: &mut http::HeaderMap, request: bool) {
    let named: Vec<http::HeaderName> = h
        .get_all(http::header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| http::HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        "connection",
        "keep-alive",
        "proxy-connection",
        "transfer-encoding",
        "upgrade",
    ] {
        h.remove(n);
    }
    if request {
        h.remove(http::header::EXPECT);
        // `te` may only say `trailers` (gRPC needs it on HTTP/2).
        let trailers = h
            .get(http::header::TE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| {
                v.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("trailers"))
            });
        h.remove(http::header::TE);
        if trailers {
            h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
        }
    }
}

/// The request as sent to an endpoint: HTTP/1.1 in origin form (the client's
/// `Host` kept), HTTP/2 with the client's authority. `None` when it cannot be
/// built (an authority that is not one).
fn upstream_request(
    parts: &http::request::Parts,
    body: ReqBody,
    h2: bool,
    ep: SocketAddr,
) -> Option<Request<ReqBody>> {
    let pq = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let mut b = Request::builder().method(parts.method.clone());
    if h2 {
        let authority = parts
            .uri
            .authority()
            .map(|a| a.as_str().to_string())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_string)
            })
            .unwrap_or_else(|| ep.to_string());
        b = b
            .uri(format!("http://{authority}{pq}"))
            .version(http::Version::HTTP_2);
    } else {
        b = b.uri(pq).version(http::Version::HTTP_11);
    }
    let mut req = b.body(body).ok()?;
    let headers = req.headers_mut();
    for (k, v) in &parts.headers {
        // h2 carries the authority as a pseudo-header.
        if h2 && k == http::header::HOST {
            continue;
        }
        headers.append(k.clone(), v.clone());
    }
    strip_hop_by_hop(headers, true);
    Some(req)
}

/// Sends a copy of the request to a mirror backend and forgets it: only requests
/// whose body is buffered (or empty) are mirrored, and at most
/// [`super::upstream::MAX_MIRRORS_IN_FLIGHT`] at a time.
fn mirror(
    rc: &Arc<Routed>,
    m: &pb::RequestMirror,
    parts: &http::request::Parts,
    payload: &ReqPayload,
) {
    let Some(b) = m.backend.as_ref().filter(|b| b.invalid.is_empty()) else {
        return;
    };
    if m.per_million < 1_000_000 && rand::random_range(0..1_000_000) >= m.per_million {
        return;
    }
    let ReqPayload::Buffered(body) = payload else {
        return;
    };
    let Ok(permit) = rc.upstreams.mirrors.clone().try_acquire_owned() else {
        return;
    };
    let eps = endpoints(&rc.state, b, rc.port);
    let Some((ep, active)) = rc.state.balancer.pick(&eps) else {
        return;
    };
    let Some(req) = upstream_request(
        parts,
        Full::new(body.clone()).map_err(|e| match e {}).boxed(),
        rc.h2,
        ep,
    ) else {
        return;
    };
    let rc = rc.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let _active = active;
        let from = DialFrom {
            state: &rc.state,
            source: &rc.source,
        };
        let exchange = async {
            let conn = rc.upstreams.connection(&from, ep, rc.h2).await?;
            if let Sent::Response(resp) = rc.upstreams.send(conn, ep, req).await? {
                // Read and dropped frame by frame: nothing of it is kept.
                let mut body = resp.into_body();
                while let Some(f) = body.frame().await {
                    if f.is_err() {
                        break;
                    }
                }
            }
            Ok::<_, SendError>(())
        };
        match tokio::time::timeout(MIRROR_TIMEOUT, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::debug!(error = %e, "mirrored request failed"),
            Err(_) => tracing::debug!(endpoint = %ep, "mirrored request timed out"),
        }
    });
}

fn route_labels(
    rc: &Routed,
    out: &Outcome,
    code: u16,
) -> Option<crate::metrics::traffic::RouteLabels> {
    let w = rc.source.workload();
    let (source_workload, source_namespace, _) = crate::metrics::traffic::workload_name(Some(&w));
    Some(crate::metrics::traffic::RouteLabels {
        source_workload,
        source_namespace,
        service: format!("{}/{}", rc.service.namespace, rc.service.name),
        route: out
            .route
            .as_ref()
            .map(|r| r.route.to_string())
            .unwrap_or_else(|| "none".into()),
        rule: out
            .route
            .as_ref()
            .map(|r| r.name.to_string())
            .unwrap_or_else(|| "none".into()),
        backend: out.backend.clone().unwrap_or_else(|| "none".into()),
        response_code: code,
    })
}

fn record(
    rc: &Routed,
    out: &Outcome,
    method: &http::Method,
    path: &str,
    code: StatusCode,
    took: Duration,
) {
    let rule = out.route.as_ref().map_or(0, |r| Arc::as_ptr(r) as usize);
    let code16 = code.as_u16();
    let mut cache = rc.cache();
    let hit = cache.metrics.iter().position(|h| {
        h.rule == rule && h.code == code16 && h.backend.as_deref() == out.backend.as_deref()
    });
    let i = match hit {
        Some(i) => Some(i),
        None => route_labels(rc, out, code16).map(|l| {
            let t = &rc.state.metrics.traffic;
            if cache.metrics.len() >= MAX_CACHED_HANDLES {
                cache.metrics.clear();
            }
            cache.metrics.push(MetricHandles {
                rule,
                backend: out.backend.clone(),
                code: code16,
                requests: t.routed_requests.get_or_create(&l).clone(),
                duration: t.routed_duration.get_or_create(&l).clone(),
            });
            cache.metrics.len() - 1
        }),
    };
    if let Some(h) = i.and_then(|i| cache.metrics.get(i)) {
        h.requests.inc();
        h.duration.observe(took.as_secs_f64());
    }
    drop(cache);
    let w = rc.source.workload();
    rc.state
        .access_log
        .routed(&crate::proxy::access_log::RoutedRecord {
            source_addr: rc.client,
            source_identity: &w.spiffe_id,
            service: &rc.service,
            method: method.as_str(),
            path,
            route: out.route.as_ref().map(|r| &*r.route),
            rule: out.route.as_ref().map(|r| &*r.name),
            backend: out.backend.as_deref(),
            endpoint: out.endpoint,
            attempts: out.attempts,
            response_code: code.as_u16(),
            duration: took,
        });
}

/// A response body that holds its endpoint's active-request count until it ends,
/// and ends it with an error if the rule's request timeout passes first (the
/// timeout covers the whole exchange, the response body included).
struct Held<B> {
    inner: B,
    _active: Active,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<B> Body for Held<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        if let Some(d) = this.deadline.as_mut() {
            if d.as_mut().poll(cx).is_ready() {
                this.deadline = None;
                return Poll::Ready(Some(Err(
                    "request timeout: the response body took too long".into(),
                )));
            }
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(Some(Ok(f))) => Poll::Ready(Some(Ok(f))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
