//! HTTP/1.x on the destination side, proxied by weft itself rather than by a
//! hyper server and client pair: one task per connection reads each request head,
//! runs it through [`super::http::on_request`] (normalization, plugins,
//! authorization), writes it to the application in canonical form, forwards the
//! body unchanged once its framing has been checked ([`body`]), and does the same
//! with the response.
//!
//! - Keep-alive and pipelining: requests are answered in order on one connection
//!   to the application, kept open across requests.
//! - The request body streams to the application while its response is read, so
//!   `Expect: 100-continue` and early responses work; interim (1xx) responses are
//!   forwarded. A response that ends before its request body has been forwarded
//!   ends the client's connection after it (there is no way to skip the rest).
//! - Upgrades (`Connection: upgrade` answered with 101, or `CONNECT` answered with
//!   2xx) hand both connections to a byte copy.
//! - A malformed or ambiguous request head is answered with 400 (431 when too
//!   large) and the connection closed; see [`head`] for what is refused. A head
//!   that has not arrived whole within the head timeout of its first bytes is
//!   answered with 408 and the connection closed. The timer is armed only while a
//!   head is incomplete, so a head that arrives in one read costs none.
//! - A connection that waits for a request's first bytes (before the first, or
//!   between two) for the idle timeout is closed without an answer, by the
//!   proxy's idle sweep ([`crate::proxy::idle`]): an exchange marks the connection
//!   busy, so no timer runs per request or per connection.
//! - A request answered locally (403, a plugin's reply) keeps the connection open
//!   when its body has already arrived whole (or it has none); otherwise the answer
//!   says `Connection: close`.
//! - The application's connection is reconnected when it closes; an idempotent
//!   request without a body that finds a reused connection closed before any
//!   response byte is sent once more on a new one (RFC 9112 section 9.3.1).

pub mod body;
pub mod head;

use super::http::{
    on_request, BodyPlan, Exchange, LocalResponse, Pending, Verdict, AMBIGUOUS_HOST_BODY,
};
use super::ConnCtx;
use crate::fields::Fields;
use crate::proxy::counters::NodeCounters;
use crate::wasm::abi::MAX_BODY_BYTES;
use body::{forward, ForwardError, Framing, READ_CHUNK};
use bytes::{Buf, BytesMut};
use head::{HeadError, RequestHead, ResponseHead};
use std::sync::Arc;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::TcpStream;

/// The connection to the application, the bytes read from it not yet used, the
/// buffer its response heads are re-written into, and the buffers of the fields of
/// its responses that plugins see (both reused across responses).
struct AppConn {
    stream: TcpStream,
    buf: BytesMut,
    out: Vec<u8>,
    fields: Fields,
}

/// Drops `out` if it has grown past what a connection keeps between requests
/// ([`Fields::KEPT`], as for the heads' fields; a plugin grew a head).
fn trim(out: &mut Vec<u8>) {
    if out.capacity() > Fields::KEPT {
        *out = Vec::new();
    }
}

/// Serves one HTTP/1.x connection; `prefix`: its bytes already read (sniffing).
pub async fn serve<S>(prefix: BytesMut, io: S, ctx: Arc<ConnCtx>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut dr, mut dw) = tokio::io::split(io);
    let mut dbuf = prefix;
    let mut up: Option<AppConn> = None;
    let mut bufs = Bufs::default();
    loop {
        let read = read_request_head(&mut dr, &mut dbuf, &mut dw, &mut bufs.spare, &ctx);
        let Some(head) = read.await? else {
            return Ok(());
        };
        // Not idle until the exchange ends (the proxy's idle sweep reads this).
        ctx.activity.begin();
        let next = exchange(head, &mut dr, &mut dbuf, &mut dw, &mut up, &mut bufs, &ctx).await;
        ctx.activity.end();
        match next? {
            Next::Request => {
                trim(&mut bufs.out);
                if let Some(u) = &mut up {
                    trim(&mut u.out);
                }
            }
            Next::Close => {
                let _ = dw.shutdown().await;
                return Ok(());
            }
            Next::Splice(mut app) => {
                // Bytes of another protocol from now on: never idle.
                ctx.activity.hold();
                // Bytes each side sent after the upgrade's head go first.
                if !app.buf.is_empty() {
                    dw.write_all(&app.buf).await?;
                }
                if !dbuf.is_empty() {
                    app.stream.write_all(&dbuf).await?;
                }
                let mut down = dr.unsplit(dw);
                crate::proxy::copy::bidirectional(&mut down, &mut app.stream).await?;
                return Ok(());
            }
        }
    }
}

/// What a connection's request heads reuse across requests.
#[derive(Default)]
struct Bufs {
    /// The buffers of the previous head's fields and target.
    spare: head::Spare,
    /// The request head, re-written, and the body's first bytes.
    out: Vec<u8>,
}

/// What follows an exchange on the client's connection.
enum Next {
    Request,
    Close,
    /// The connection was upgraded: copy bytes to and from this one.
    Splice(AppConn),
}

/// Reads the next request head. `None`: the client closed the connection, or sent
/// a head that could not be proxied, or not in time (answered). A head may take the head timeout to arrive
/// whole once its first bytes have.
async fn read_request_head<S: AsyncRead + AsyncWrite>(
    dr: &mut ReadHalf<S>,
    dbuf: &mut BytesMut,
    dw: &mut WriteHalf<S>,
    spare: &mut head::Spare,
    ctx: &ConnCtx,
) -> anyhow::Result<Option<RequestHead>> {
    let timeout = ctx.state.http1_head_timeout;
    let mut deadline = None;
    loop {
        if !dbuf.is_empty() {
            match head::parse_request(dbuf, spare) {
                Ok(Some(h)) => return Ok(Some(h)),
                Ok(None) => {}
                Err(e) => {
                    let (status, body) = match e {
                        HeadError::TooLarge => (431, "request header fields too large\n"),
                        HeadError::Malformed(_) => (400, "malformed request\n"),
                        HeadError::AmbiguousHost(_) => {
                            NodeCounters::count(&ctx.state.counters.l7_ambiguous_host);
                            tracing::info!(dst = %ctx.dst, peer = ?ctx.attrs.principal, error = %e, "HTTP/1 request refused");
                            (400, AMBIGUOUS_HOST_BODY)
                        }
                    };
                    tracing::debug!(error = %e, "HTTP/1 request refused");
                    refuse(dw, status, body).await;
                    return Ok(None);
                }
            }
        }
        if dbuf.capacity() - dbuf.len() < 1024 {
            dbuf.reserve(READ_CHUNK);
        }
        let read = if dbuf.is_empty() {
            // Idle between requests (or before the first): bounded by the proxy's
            // idle sweep, which cancels the connection.
            dr.read_buf(dbuf).await?
        } else {
            let at = *deadline.get_or_insert_with(|| tokio::time::Instant::now() + timeout);
            match tokio::time::timeout_at(at, dr.read_buf(dbuf)).await {
                Ok(read) => read?,
                Err(_) => {
                    tracing::debug!(after = ?timeout, "HTTP/1 request head not received in time");
                    refuse(dw, 408, "request head not received in time\n").await;
                    return Ok(None);
                }
            }
        };
        if read == 0 {
            return Ok(None);
        }
    }
}

/// Answers a request head that cannot be proxied and closes the connection.
async fn refuse<S: AsyncRead + AsyncWrite>(dw: &mut WriteHalf<S>, status: u16, body: &str) {
    let r = super::http::reply(status, body.to_string(), &[]);
    let _ = answer_locally(dw, &r, false, true).await;
    let _ = dw.shutdown().await;
}

/// RFC 9110 section 9.2.2.
fn idempotent(m: &http::Method) -> bool {
    matches!(
        *m,
        http::Method::GET
            | http::Method::HEAD
            | http::Method::OPTIONS
            | http::Method::TRACE
            | http::Method::PUT
            | http::Method::DELETE
    )
}

/// One request and its response.
async fn exchange<S: AsyncRead + AsyncWrite>(
    head: RequestHead,
    dr: &mut ReadHalf<S>,
    dbuf: &mut BytesMut,
    dw: &mut WriteHalf<S>,
    up: &mut Option<AppConn>,
    bufs: &mut Bufs,
    ctx: &ConnCtx,
) -> anyhow::Result<Next> {
    let RequestHead {
        mut req,
        mut body,
        keep_alive,
        upgrade,
        len,
    } = head;
    let mut x = Exchange::begin(&req, ctx);
    let head_request = req.method == http::Method::HEAD;
    let mut pending = match on_request(&mut req, body == Framing::Empty, ctx, &mut x) {
        Verdict::Forward(p) => Some(p),
        Verdict::Reply(r) => {
            // The body is not forwarded: skipped if it is all here, else the
            // connection closes after the answer.
            let skipped = match body {
                Framing::Empty => true,
                Framing::Length(n) if n <= dbuf.len() as u64 => {
                    dbuf.advance(n as usize);
                    true
                }
                _ => false,
            };
            let close = !keep_alive || !skipped;
            answer_locally(dw, &r, head_request, close).await?;
            x.end(ctx, r.status().as_u16());
            return Ok(if close { Next::Close } else { Next::Request });
        }
    };
    // A plugin that reads request bodies gets the body whole, before the request
    // goes on: read here (bounded), then sent with the head.
    let mut buffered: Option<Vec<u8>> = None;
    let wanted = match pending.as_mut() {
        Some(p) if body != Framing::Empty && p.has_request_body_callback() => {
            match p.probe_request_body(&mut req, &mut x) {
                BodyPlan::Buffer => true,
                BodyPlan::Stream => false,
                BodyPlan::Reply(r) => {
                    // A plugin answered before the body was read: the connection
                    // closes after the answer.
                    answer_locally(dw, &r, head_request, true).await?;
                    x.end(ctx, r.status().as_u16());
                    return Ok(Next::Close);
                }
            }
        }
        _ => false,
    };
    if wanted {
        // A client that waits for `100 Continue` before its body gets it from the
        // proxy (the application sees a request whose body is already here).
        let expects = req
            .fields
            .get(b"expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        if expects {
            req.fields.remove(b"expect");
            if dbuf.is_empty() {
                dw.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
                dw.flush().await?;
            }
        }
        let whole = match body::read_whole(&mut *dr, &mut *dbuf, body, MAX_BODY_BYTES).await {
            Ok(w) => w,
            Err(body::WholeError::TooLarge(_)) => {
                let own = (413, "request body too large for the plugins that read it\n");
                return close_with(own, pending, dw, ctx, x, head_request).await;
            }
            Err(body::WholeError::Body(e)) => {
                tracing::debug!(dst = %ctx.dst, error = %e, "request body malformed");
                let own = (400, "malformed request body\n");
                return close_with(own, pending, dw, ctx, x, head_request).await;
            }
            Err(body::WholeError::Read(_)) => return Ok(Next::Close),
        };
        let mut data = whole.data;
        let replied = pending
            .as_mut()
            .and_then(|p| p.on_request_body(&mut req, &mut data, &mut x));
        if let Some(r) = replied {
            // The body was read whole: the connection can go on.
            answer_locally(dw, &r, head_request, !keep_alive).await?;
            x.end(ctx, r.status().as_u16());
            return Ok(if keep_alive {
                Next::Request
            } else {
                Next::Close
            });
        }
        buffered = Some(reframe(&mut req.fields, data, whole.trailers));
        body = Framing::Empty;
    }
    let out = &mut bufs.out;
    out.clear();
    out.reserve(len + 64 + dbuf.len().min(READ_CHUNK));
    head::write_request(&req, out);
    if let Some(b) = buffered {
        out.extend_from_slice(&b);
    }
    // Written: what is left of it that is used below is its method.
    bufs.spare.keep(&mut req);
    let connect = req.method == http::Method::CONNECT;
    let mut retried = false;
    loop {
        let reused = up.is_some();
        let conn = match up {
            Some(c) => c,
            None => match ctx.upstream.connect().await {
                Ok(stream) => up.insert(AppConn {
                    stream,
                    buf: BytesMut::with_capacity(READ_CHUNK),
                    out: Vec::new(),
                    fields: Fields::default(),
                }),
                Err(e) => {
                    tracing::debug!(dst = %ctx.dst, error = %e, "connecting to the application failed");
                    return close_with(UPSTREAM_FAILED, pending, dw, ctx, x, head_request).await;
                }
            },
        };
        let (mut ur, mut uw) = conn.stream.split();
        let (ubuf, uout) = (&mut conn.buf, (&mut conn.out, &mut conn.fields));
        let asked = Asked {
            head_request,
            connect,
            upgrade,
        };
        let (sent, received) = if body == Framing::Empty {
            // No body: the head goes alone, then the response is awaited.
            let sent = forward(&mut *dr, &mut *dbuf, &mut uw, &mut *out, body).await;
            let received = respond(&mut ur, ubuf, uout, &mut *dw, &mut pending, &mut x, asked);
            (Some(sent), received.await)
        } else {
            // The body streams up while the response is awaited.
            let send = forward(&mut *dr, &mut *dbuf, &mut uw, &mut *out, body);
            let recv = respond(&mut ur, ubuf, uout, &mut *dw, &mut pending, &mut x, asked);
            tokio::pin!(send, recv);
            let mut sent = None;
            loop {
                tokio::select! {
                    biased;
                    r = &mut send, if sent.is_none() => sent = Some(r),
                    r = &mut recv => break (sent, r),
                }
                if let Some(Err(
                    ForwardError::Read(_) | ForwardError::Body(_) | ForwardError::Unsent(_),
                )) = &sent
                {
                    break (sent, Err(Failure::Broken));
                }
            }
        };
        if let Some(Err(ForwardError::Unsent(e))) = &sent {
            // The body is malformed in its first bytes, so nothing reached the
            // application (the body is scanned before any response is awaited):
            // the client learns why, and its connection closes.
            tracing::debug!(dst = %ctx.dst, error = %e, "request body malformed");
            let own = (400, "malformed request body\n");
            return close_with(own, pending, dw, ctx, x, head_request).await;
        }
        if let Some(Err(e @ (ForwardError::Read(_) | ForwardError::Body(_)))) = &sent {
            // The client's body broke off or is malformed: the application holds
            // part of a request; both connections end.
            tracing::debug!(dst = %ctx.dst, error = %e, "request body not forwarded");
            *up = None;
            return Ok(Next::Close);
        }
        let body_sent = matches!(sent, Some(Ok(())));
        match received {
            Ok(resp) => {
                x.end(ctx, resp.status);
                let reusable = resp.keep_alive && resp.complete && body_sent;
                if resp.upgraded {
                    return Ok(match up.take() {
                        Some(u) => Next::Splice(u),
                        None => Next::Close,
                    });
                }
                if !reusable || up.as_ref().is_some_and(|u| !u.buf.is_empty()) {
                    *up = None;
                }
                return Ok(
                    if keep_alive && resp.complete && resp.keep_alive_down && body_sent {
                        Next::Request
                    } else {
                        Next::Close
                    },
                );
            }
            Err(Failure::NoResponse)
                if reused && !retried && body == Framing::Empty && idempotent(&req.method) =>
            {
                // The application closed the idle connection as the request went.
                *up = None;
                retried = true;
            }
            Err(Failure::NoResponse) => {
                *up = None;
                return close_with(UPSTREAM_FAILED, pending, dw, ctx, x, head_request).await;
            }
            Err(Failure::Malformed(e)) => {
                tracing::debug!(dst = %ctx.dst, error = %e, "malformed response from the application");
                *up = None;
                let own = (502, "malformed response from upstream\n");
                return close_with(own, pending, dw, ctx, x, head_request).await;
            }
            Err(Failure::Broken) => {
                *up = None;
                return Ok(Next::Close);
            }
        }
    }
}

/// The framing of a body the plugins have read whole (and may have changed),
/// set in its message's `fields`: `Content-Length` when it had no trailers, else
/// chunked with its trailers, as one chunk. Returns the body's bytes as they go on
/// the wire.
fn reframe(fields: &mut Fields, data: Vec<u8>, trailers: Option<Vec<u8>>) -> Vec<u8> {
    fields.remove(b"content-length");
    fields.remove(b"transfer-encoding");
    match trailers.filter(|t| t.as_slice() != b"\r\n") {
        None => {
            let len = data.len().to_string();
            let _ = fields.insert(b"content-length", len.as_bytes());
            data
        }
        Some(t) => {
            let _ = fields.insert(b"transfer-encoding", b"chunked");
            let mut out = Vec::with_capacity(data.len() + t.len() + 16);
            if !data.is_empty() {
                out.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
                out.extend_from_slice(&data);
                out.extend_from_slice(b"\r\n");
            }
            out.extend_from_slice(b"0\r\n");
            out.extend_from_slice(&t);
            out
        }
    }
}

/// The application could not be reached or closed without answering (its request
/// may have been partly sent).
const UPSTREAM_FAILED: (u16, &str) = (503, super::http::UPSTREAM_FAILED_BODY);

/// Ends the exchange with weft's own answer, `(status, body)`, and the client's
/// connection with it.
async fn close_with<S: AsyncRead + AsyncWrite>(
    (status, body): (u16, &'static str),
    pending: Option<Pending<'_>>,
    dw: &mut WriteHalf<S>,
    ctx: &ConnCtx,
    x: Exchange,
    head_request: bool,
) -> anyhow::Result<Next> {
    drop(pending); // ends the plugins' contexts
    let r = super::http::reply(status, body, &[]);
    answer_locally(dw, &r, head_request, true).await?;
    x.end(ctx, status);
    Ok(Next::Close)
}

async fn answer_locally<W: AsyncWrite + Unpin>(
    dw: &mut W,
    r: &LocalResponse,
    head_request: bool,
    close: bool,
) -> std::io::Result<()> {
    let mut out = Vec::with_capacity(128 + r.body().len());
    head::write_local(r, head_request, close, &mut out);
    dw.write_all(&out).await?;
    dw.flush().await
}

/// What the request asked for that shapes its response.
#[derive(Clone, Copy)]
struct Asked {
    /// A HEAD: the response has no body.
    head_request: bool,
    /// A CONNECT: a 2xx starts a tunnel.
    connect: bool,
    /// An upgrade: a 101 may answer it.
    upgrade: bool,
}

/// How a response was forwarded.
struct Forwarded {
    status: u16,
    /// The application's connection can carry another request.
    keep_alive: bool,
    /// The client's connection can (a plugin's reply that replaced the response
    /// leaves the application's body unread).
    keep_alive_down: bool,
    /// The body was forwarded whole.
    complete: bool,
    upgraded: bool,
}

#[derive(Debug)]
enum Failure {
    /// The application closed (or reset) the connection before any response byte.
    NoResponse,
    /// Its response head cannot be proxied.
    Malformed(String),
    /// Either connection failed after the response head was forwarded.
    Broken,
}

/// Reads the response (forwarding interim 1xx heads), runs the plugins that saw
/// the request on its head, and forwards it with its body.
async fn respond<W: AsyncWrite + Unpin>(
    ur: &mut tokio::net::tcp::ReadHalf<'_>,
    ubuf: &mut BytesMut,
    (out, spare): (&mut Vec<u8>, &mut Fields),
    dw: &mut W,
    pending: &mut Option<Pending<'_>>,
    x: &mut Exchange,
    asked: Asked,
) -> Result<Forwarded, Failure> {
    let Asked {
        head_request,
        connect,
        upgrade,
    } = asked;
    let sees = pending.as_ref().is_some_and(Pending::sees_response);
    let mut got_any = !ubuf.is_empty();
    let head: ResponseHead = loop {
        if !ubuf.is_empty() {
            let parse = sees.then_some(&mut *spare);
            match head::parse_response(ubuf, head_request, connect, parse, out) {
                Ok(Some(h)) if (100..200).contains(&h.status) && h.status != 101 => {
                    if let Some(p) = h.parsed {
                        head::write_response(&p, out);
                        *spare = p.fields.into_spare();
                    }
                    dw.write_all(out).await.map_err(|_| Failure::Broken)?;
                    dw.flush().await.map_err(|_| Failure::Broken)?;
                    continue;
                }
                Ok(Some(h)) => break h,
                Ok(None) => {}
                Err(e) => return Err(Failure::Malformed(e.to_string())),
            }
        }
        if ubuf.capacity() - ubuf.len() < 1024 {
            ubuf.reserve(READ_CHUNK);
        }
        match ur.read_buf(ubuf).await {
            Ok(0) | Err(_) if !got_any => return Err(Failure::NoResponse),
            Ok(0) => return Err(Failure::Malformed("closed within the head".into())),
            Err(e) => return Err(Failure::Malformed(e.to_string())),
            Ok(_) => got_any = true,
        }
    };
    let upgraded = head.status == 101 || (connect && (200..300).contains(&head.status));
    if head.status == 101 && !upgrade {
        return Err(Failure::Malformed(
            "101 to a request that asked for no upgrade".into(),
        ));
    }
    let ResponseHead {
        mut status,
        body,
        keep_alive,
        parsed,
    } = head;
    if let (Some(mut resp), Some(mut p)) = (parsed, pending.take()) {
        let mut replied = p.on_response(&mut resp, body == Framing::Empty, x);
        let mut reads_body = false;
        if replied.is_none()
            && body != Framing::Empty
            && !upgraded
            && p.has_response_body_callback()
        {
            match p.probe_response_body(&mut resp, x) {
                BodyPlan::Buffer => reads_body = true,
                BodyPlan::Stream => {}
                BodyPlan::Reply(r) => replied = Some(r),
            }
        }
        if replied.is_none() && reads_body {
            // The plugins read the response's body whole before any of it goes.
            let limit = MAX_BODY_BYTES;
            match body::read_whole(&mut *ur, &mut *ubuf, body, limit).await {
                Ok(whole) => {
                    let mut data = whole.data;
                    replied = p.on_response_body(&mut resp, &mut data, x);
                    if replied.is_none() {
                        drop(p);
                        status = resp.status;
                        let bytes = reframe(&mut resp.fields, data, whole.trailers);
                        head::write_response(&resp, out);
                        out.extend_from_slice(&bytes);
                        *spare = resp.fields.into_spare();
                        x.head_out();
                        dw.write_all(out).await.map_err(|_| Failure::Broken)?;
                        dw.flush().await.map_err(|_| Failure::Broken)?;
                        return Ok(Forwarded {
                            status,
                            keep_alive: keep_alive && body != Framing::UntilClose,
                            keep_alive_down: true,
                            complete: true,
                            upgraded: false,
                        });
                    }
                }
                Err(body::WholeError::TooLarge(_)) => {
                    let body = "response body too large for the plugins that read it\n";
                    replied = Some(super::http::reply(500, body, &[]));
                }
                Err(body::WholeError::Body(e)) => return Err(Failure::Malformed(e.to_string())),
                Err(body::WholeError::Read(_)) => return Err(Failure::Broken),
            }
        }
        if let Some(r) = replied {
            // A plugin replaced the response: the application's body is left
            // unread (or was read), and the connection closes.
            drop(p);
            let mut local = Vec::new();
            head::write_local(&r, head_request, true, &mut local);
            dw.write_all(&local).await.map_err(|_| Failure::Broken)?;
            dw.flush().await.map_err(|_| Failure::Broken)?;
            return Ok(Forwarded {
                status: r.status().as_u16(),
                keep_alive: false,
                keep_alive_down: false,
                complete: true,
                upgraded: false,
            });
        }
        drop(p);
        status = resp.status;
        head::write_response(&resp, out);
        *spare = resp.fields.into_spare();
    }
    drop(pending.take());
    x.head_out();
    if upgraded {
        dw.write_all(out).await.map_err(|_| Failure::Broken)?;
        dw.flush().await.map_err(|_| Failure::Broken)?;
        return Ok(Forwarded {
            status,
            keep_alive: false,
            keep_alive_down: false,
            complete: true,
            upgraded: true,
        });
    }
    let complete = match forward(ur, ubuf, dw, out, body).await {
        Ok(()) => body != Framing::UntilClose,
        // Nothing reached the client yet: it gets a 502 instead of a closed
        // connection.
        Err(ForwardError::Unsent(e)) => return Err(Failure::Malformed(e.to_string())),
        Err(e) => {
            tracing::debug!(error = %e, "response body not forwarded whole");
            return Err(Failure::Broken);
        }
    };
    Ok(Forwarded {
        status,
        keep_alive,
        keep_alive_down: true,
        complete,
        upgraded: false,
    })
}

#[cfg(test)]
mod differential;
#[cfg(test)]
mod differential_response;
#[cfg(test)]
pub(super) mod tests;
