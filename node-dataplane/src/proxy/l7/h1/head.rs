//! HTTP/1.x message heads: parsing (httparse) with the checks a proxy in front of
//! an application must make (RFC 9112), and writing them in canonical form.
//!
//! Heads are always re-written, never forwarded as received: the application and
//! the client see CRLF line ends and single spaces whatever leniency the parser
//! allowed, and request field names in lower case (a response's keep the
//! application's case unless a plugin saw it). Requests whose framing is ambiguous
//! are refused: both `Transfer-Encoding` and `Content-Length`, a transfer coding
//! other than a final `chunked`, `Transfer-Encoding` in HTTP/1.0, differing,
//! non-numeric or listed (`3, 3`) `Content-Length` values, and a missing `Host` in
//! HTTP/1.1. So are ambiguous hosts (the host is an authorization attribute): a
//! repeated `Host` (in HTTP/1.0 too), one that is not visible ASCII, or one that
//! names another host or port than an absolute-form or authority-form target
//! ([`HeadError::AmbiguousHost`]). Repeated equal
//! `Content-Length` fields reach the application as one. Responses whose framing is
//! ambiguous (both `Transfer-Encoding` and `Content-Length`, `Transfer-Encoding` in
//! HTTP/1.0, bad `Content-Length` values) get the client a 502 instead.

use super::body::Framing;
use crate::fields::{self, Fields};
use crate::proxy::l7::http::{LocalResponse, RequestMessage, ResponseMessage};
use bytes::BytesMut;
use std::mem::MaybeUninit;

/// Largest head accepted (request line or status line and fields).
pub const MAX_HEAD: usize = 64 * 1024;
/// Most fields in a head.
pub const MAX_FIELDS: usize = 100;

/// A head that cannot be proxied.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HeadError {
    #[error("malformed head: {0}")]
    Malformed(String),
    #[error("head larger than {MAX_HEAD} bytes or with more than {MAX_FIELDS} fields")]
    TooLarge,
    /// The request's host could be read two ways (one authorized, another
    /// forwarded): several `Host` fields, a target authority that `Host`
    /// contradicts, or a `Host` that is not visible ASCII.
    #[error("ambiguous host: {0}")]
    AmbiguousHost(&'static str),
}

fn malformed(why: impl Into<String>) -> HeadError {
    HeadError::Malformed(why.into())
}

/// A request's target as received. Origin-form (`/path?query`), which almost every
/// request has, is kept as text; the other forms (absolute, a CONNECT's authority,
/// `*`) are parsed.
#[derive(Debug, Clone)]
pub enum Target {
    Origin(String),
    Uri(http::Uri),
}

/// The bytes an origin-form target may hold, by byte: in its path (`in_query`
/// false) or its query. Visible ASCII and non-ASCII bytes, but not `#` (no fragment
/// in a request target, RFC 9112 section 3.2), `<` or `>`; a backtick only in the
/// query and a double quote only in the path (the `http` crate's rules).
const fn target_bytes(in_query: bool) -> [bool; 256] {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let c = i as u8;
        t[i] = match c {
            b'#' | b'<' | b'>' => false,
            b'?' => true,
            b'`' => in_query,
            b'"' => !in_query,
            0x21..=0x7e | 0x80..=0xff => true,
            _ => false,
        };
        i += 1;
    }
    t
}

/// [`target_bytes`] of the path (index 0) and of the query (index 1).
const TARGET_BYTES: [[bool; 256]; 2] = [target_bytes(false), target_bytes(true)];

/// Is `t` an origin-form target the `http` crate would accept as is: a `/`, then
/// path bytes and a query (from the first `?`) without the characters that must be
/// percent-encoded, and no fragment? See [`target_bytes`].
fn valid_origin(t: &str) -> bool {
    let b = t.as_bytes();
    if b.first() != Some(&b'/') || b.len() >= u16::MAX as usize {
        return false;
    }
    let mut in_query = false;
    b.iter().all(|&c| {
        in_query |= c == b'?';
        TARGET_BYTES[usize::from(in_query)][usize::from(c)]
    })
}

/// A request head: method, target, version and fields.
#[derive(Debug)]
pub struct Request {
    pub method: http::Method,
    pub target: Target,
    pub version: http::Version,
    pub fields: Fields,
}

/// A value as `http::HeaderValue::to_str` accepts it: visible ASCII.
fn visible_ascii(v: &[u8]) -> Option<&str> {
    v.iter()
        .all(|&b| b == b'\t' || (0x20..0x7f).contains(&b))
        .then(|| std::str::from_utf8(v).ok())
        .flatten()
}

impl RequestMessage for Request {
    fn method(&self) -> &http::Method {
        &self.method
    }

    fn path_and_query(&self) -> &str {
        match &self.target {
            Target::Origin(t) => t,
            Target::Uri(u) => u.path_and_query().map_or("/", |p| p.as_str()),
        }
    }

    fn set_path_and_query(&mut self, pq: &str) -> bool {
        match &mut self.target {
            Target::Origin(t) if valid_origin(pq) => {
                pq.clone_into(t);
                true
            }
            Target::Origin(_) => false,
            Target::Uri(u) => match crate::proxy::l7::http::with_path(u, pq) {
                Some(n) => {
                    *u = n;
                    true
                }
                None => false,
            },
        }
    }

    fn authority(&self) -> &str {
        if let Target::Uri(u) = &self.target {
            if let Some(a) = u.authority() {
                return a.as_str();
            }
        }
        self.fields
            .get(b"host")
            .and_then(visible_ascii)
            .unwrap_or_default()
    }

    fn scheme(&self) -> &str {
        match &self.target {
            Target::Uri(u) => u.scheme_str().unwrap_or("http"),
            Target::Origin(_) => "http",
        }
    }

    fn lend_fields(&mut self) -> Fields {
        std::mem::take(&mut self.fields)
    }

    fn return_fields(&mut self, fields: Fields) {
        self.fields = fields;
    }

    fn field_pairs(&self) -> Vec<(String, String)> {
        crate::proxy::l7::http::field_pairs(&self.fields)
    }
}

/// A response head, when plugins see it: status, version and fields.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub version: http::Version,
    pub fields: Fields,
}

impl ResponseMessage for Response {
    fn status(&self) -> u16 {
        self.status
    }

    fn set_status(&mut self, status: u16) {
        self.status = status;
    }

    fn lend_fields(&mut self) -> Fields {
        std::mem::take(&mut self.fields)
    }

    fn return_fields(&mut self, fields: Fields) {
        self.fields = fields;
    }
}

/// A parsed request head.
#[derive(Debug)]
pub struct RequestHead {
    /// Method, target, version and fields (the body is forwarded separately).
    pub req: Request,
    pub body: Framing,
    /// The client keeps the connection open after this exchange.
    pub keep_alive: bool,
    /// An upgrade (`Connection: upgrade` with `Upgrade`) or `CONNECT`: after a 101
    /// (or a 2xx to CONNECT) the connection carries another protocol.
    pub upgrade: bool,
    /// The head's length as received.
    pub len: usize,
}

/// What the framing and connection fields of a head say.
#[derive(Default)]
struct Semantics<'h> {
    content_length: Option<u64>,
    /// `Content-Length` came as anything but one field of plain digits (a list of
    /// equal values, repeated fields, leading zeros, whitespace).
    content_length_uncanonical: bool,
    /// `Transfer-Encoding` seen; its last coding is `chunked`; `chunked` codings.
    te: bool,
    te_chunked_last: bool,
    te_chunked: usize,
    close: bool,
    keep_alive: bool,
    conn_upgrade: bool,
    upgrade: bool,
    hosts: usize,
    /// The (last) `Host` field's value.
    host: Option<&'h [u8]>,
}

impl<'h> Semantics<'h> {
    fn scan(fields: &[httparse::Header<'h>]) -> Result<Self, HeadError> {
        let mut f = Semantics::default();
        for h in fields {
            let name = h.name.as_bytes();
            // By length first: most fields are none of these, and are passed over
            // without comparing a byte.
            match name.len() {
                14 if name.eq_ignore_ascii_case(b"content-length") => {
                    // A list (`42, 42`) may stand for one value (RFC 9110 8.6), but
                    // hyper, for one, refuses it: so does weft.
                    if h.value.contains(&b',') {
                        return Err(malformed("Content-Length is a list"));
                    }
                    let digits = h.value.trim_ascii();
                    let n = parse_length(digits)
                        .ok_or_else(|| malformed("Content-Length is not a number"))?;
                    // Repeated, with leading zeros or with whitespace around.
                    f.content_length_uncanonical |= f.content_length.is_some()
                        || digits.len() > 1 && digits[0] == b'0'
                        || digits.len() != h.value.len();
                    if f.content_length.is_some_and(|m| m != n) {
                        return Err(malformed("differing Content-Length values"));
                    }
                    f.content_length = Some(n);
                }
                17 if name.eq_ignore_ascii_case(b"transfer-encoding") => {
                    f.te = true;
                    for v in tokens(h.value) {
                        let chunked = v.eq_ignore_ascii_case(b"chunked");
                        f.te_chunked += usize::from(chunked);
                        f.te_chunked_last = chunked;
                    }
                }
                10 if name.eq_ignore_ascii_case(b"connection") => {
                    for v in tokens(h.value) {
                        f.close |= v.eq_ignore_ascii_case(b"close");
                        f.keep_alive |= v.eq_ignore_ascii_case(b"keep-alive");
                        f.conn_upgrade |= v.eq_ignore_ascii_case(b"upgrade");
                    }
                }
                7 if name.eq_ignore_ascii_case(b"upgrade") => f.upgrade = true,
                4 if name.eq_ignore_ascii_case(b"host") => {
                    f.hosts += 1;
                    f.host = Some(h.value);
                }
                _ => {}
            }
        }
        Ok(f)
    }

    /// Whether the sender keeps the connection open, for `version` (0: HTTP/1.0).
    fn persistent(&self, version: u8) -> bool {
        !self.close && (version >= 1 || self.keep_alive)
    }
}

/// The comma-separated elements of a field value, trimmed; empty ones skipped.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
}

fn parse_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 19 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    v.iter().try_fold(0u64, |n, d| {
        n.checked_mul(10)?.checked_add(u64::from(d - b'0'))
    })
}

fn version(v: Option<u8>) -> http::Version {
    match v {
        Some(0) => http::Version::HTTP_10,
        _ => http::Version::HTTP_11,
    }
}

/// The length of a complete head from httparse's answer over `read` bytes;
/// `None`: more bytes are needed.
fn head_len(parsed: httparse::Result<usize>, read: usize) -> Result<Option<usize>, HeadError> {
    match parsed {
        // A head that completes past the limit is too large too, however many
        // bytes one read brought (the limit does not depend on read sizes).
        Ok(httparse::Status::Complete(n)) if n > MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Complete(n)) => Ok(Some(n)),
        Ok(httparse::Status::Partial) if read >= MAX_HEAD => Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(HeadError::TooLarge),
        Err(e) => Err(malformed(e.to_string())),
    }
}

/// What a connection's request heads reuse: the buffers of a previous head's
/// fields and origin-form target, given back by [`Spare::keep`] once that head has
/// been written, so that heads need no allocation once the buffers fit them.
#[derive(Default)]
pub struct Spare {
    fields: Fields,
    target: String,
}

impl Spare {
    /// Takes the buffers of `req`, which has been written (its fields and an
    /// origin-form target are left empty), unless they are too large to keep.
    pub fn keep(&mut self, req: &mut Request) {
        self.fields = std::mem::take(&mut req.fields).into_spare();
        if let Target::Origin(t) = &mut req.target {
            if t.capacity() <= Fields::KEPT {
                self.target = std::mem::take(t);
            }
        }
    }
}

/// Parses the request head at the start of `buf` and removes it from `buf`, in
/// buffers taken from `spare`. `Ok(None)`: more bytes are needed.
pub fn parse_request(
    buf: &mut BytesMut,
    spare: &mut Spare,
) -> Result<Option<RequestHead>, HeadError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut r = httparse::Request::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_request_with_uninit_headers(
        &mut r,
        buf,
        &mut storage,
    );
    let Some(n) = head_len(parsed, buf.len())? else {
        return Ok(None);
    };
    let f = Semantics::scan(r.headers)?;
    let v = r.version.unwrap_or(1);
    let method = http::Method::from_bytes(r.method.unwrap_or_default().as_bytes())
        .map_err(|_| malformed("invalid method"))?;
    let target = match r.path.unwrap_or_default() {
        t if t.starts_with('/') => {
            if !valid_origin(t) {
                return Err(malformed("invalid request target"));
            }
            let mut target = std::mem::take(&mut spare.target);
            target.clear();
            target.push_str(t);
            Target::Origin(target)
        }
        t => t
            .parse()
            .ok()
            .and_then(rooted)
            .map(Target::Uri)
            .ok_or_else(|| malformed("invalid request target"))?,
    };
    let body = if f.te {
        if v == 0 {
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 request"));
        }
        if f.content_length.is_some() {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if !f.te_chunked_last || f.te_chunked != 1 {
            return Err(malformed("Transfer-Encoding other than a final chunked"));
        }
        Framing::Chunked
    } else {
        match f.content_length {
            None | Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
        }
    };
    if v >= 1 && f.hosts == 0 {
        return Err(malformed("no Host in an HTTP/1.1 request"));
    }
    check_host(&f, &target)?;
    let old = std::mem::take(&mut spare.fields);
    let mut fields = Fields::from_head_reusing(old, &buf[..n], r.headers);
    if let (Some(len), true) = (f.content_length, f.content_length_uncanonical) {
        // Repeated equal fields or leading zeros: the application gets one value of
        // plain digits, so no parser after weft can read them differently.
        let len = len.to_string();
        fields
            .insert(b"content-length", len.as_bytes())
            .map_err(|_| malformed("Content-Length"))?;
    }
    let mut upgrade = method == http::Method::CONNECT || (f.upgrade && f.conn_upgrade);
    if upgrade && wants_h2c(&fields) {
        // HTTP/2 streams after a 101 would bypass per-request authorization: the
        // request goes on as HTTP/1.1 (servers may ignore the offer, RFC 9113 3.1).
        fields.remove(b"upgrade");
        fields.remove(b"http2-settings");
        upgrade = false;
    }
    let req = Request {
        method,
        target,
        version: version(r.version),
        fields,
    };
    let keep_alive = f.persistent(v);
    bytes::Buf::advance(buf, n);
    Ok(Some(RequestHead {
        req,
        body,
        keep_alive,
        upgrade,
        len: n,
    }))
}

/// An absolute-form target whose path is empty (`http://svc?q`) asks for the root
/// (RFC 9110 section 4.2.3): its path is `/`, for authorization as for the
/// application, which receives the target written with it.
fn rooted(uri: http::Uri) -> Option<http::Uri> {
    match uri.path_and_query() {
        Some(pq) if uri.authority().is_some() && !pq.as_str().starts_with('/') => {
            crate::proxy::l7::http::with_path(&uri, &format!("/{}", pq.as_str()))
        }
        _ => Some(uri),
    }
}

/// Refuses a request whose host could be read two ways: authorization reads the
/// target's authority, else `Host`, while the application may read either, the
/// first or the last `Host`, or decode bytes weft does not take as a host. So:
/// at most one `Host` (in HTTP/1.0 too), visible ASCII, and, with a target in
/// absolute or authority form, naming the same host and port as the target (a
/// port left out is the scheme's default: `CONNECT a:80` with `Host: a` is one
/// host).
fn check_host(f: &Semantics<'_>, target: &Target) -> Result<(), HeadError> {
    if f.hosts > 1 {
        return Err(HeadError::AmbiguousHost("more than one Host"));
    }
    let Some(host) = f.host else { return Ok(()) };
    // httparse lets through field values of tabs, visible ASCII, spaces and bytes
    // from 0x80: so ASCII here is visible ASCII.
    if !host.is_ascii() {
        return Err(HeadError::AmbiguousHost("Host is not visible ASCII"));
    }
    if let Target::Uri(uri) = target {
        if let Some(a) = uri.authority() {
            if !crate::proxy::l7::http::same_authority(a, uri.scheme_str(), host) {
                return Err(HeadError::AmbiguousHost(
                    "Host differs from the request target's authority",
                ));
            }
        }
    }
    Ok(())
}

/// Does the request offer an upgrade to HTTP/2 over cleartext?
fn wants_h2c(fields: &Fields) -> bool {
    fields
        .get_all(b"upgrade")
        .flat_map(tokens)
        .any(|t| t.eq_ignore_ascii_case(b"h2c"))
}

/// Writes a request head: request line, fields, empty line.
pub fn write_request(req: &Request, out: &mut Vec<u8>) {
    out.extend_from_slice(req.method.as_str().as_bytes());
    out.push(b' ');
    match &req.target {
        Target::Origin(t) => out.extend_from_slice(t.as_bytes()),
        Target::Uri(uri) if uri.scheme().is_none() && uri.authority().is_none() => {
            out.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes())
        }
        Target::Uri(uri)
            if req.method == http::Method::CONNECT && uri.path_and_query().is_none() =>
        {
            out.extend_from_slice(uri.authority().map_or("", |a| a.as_str()).as_bytes())
        }
        Target::Uri(uri) => out.extend_from_slice(uri.to_string().as_bytes()),
    }
    out.push(b' ');
    out.extend_from_slice(version_name(req.version));
    out.extend_from_slice(b"\r\n");
    req.fields.write(out);
    out.extend_from_slice(b"\r\n");
}

fn version_name(v: http::Version) -> &'static [u8] {
    if v == http::Version::HTTP_10 {
        b"HTTP/1.0"
    } else {
        b"HTTP/1.1"
    }
}

use fields::write_line as write_field;

fn write_status(v: http::Version, code: u16, reason: &str, out: &mut Vec<u8>) {
    out.extend_from_slice(version_name(v));
    out.push(b' ');
    out.extend_from_slice(&[
        b'0' + (code / 100 % 10) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]);
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Writes a response head (a plugin may have changed it): status line, fields.
pub fn write_response(resp: &Response, out: &mut Vec<u8>) {
    let reason = http::StatusCode::from_u16(resp.status)
        .ok()
        .and_then(|s| s.canonical_reason());
    write_status(resp.version, resp.status, reason.unwrap_or(""), out);
    resp.fields.write(out);
    out.extend_from_slice(b"\r\n");
}

/// Writes a local response whole: `Content-Length` set to its body, `Connection:
/// close` if `close`, no body bytes for a response to HEAD.
pub fn write_local(r: &LocalResponse, head_request: bool, close: bool, out: &mut Vec<u8>) {
    let s = r.status();
    write_status(
        http::Version::HTTP_11,
        s.as_u16(),
        s.canonical_reason().unwrap_or(""),
        out,
    );
    for (k, v) in r.headers() {
        if k != http::header::CONTENT_LENGTH && k != http::header::CONNECTION {
            write_field(k.as_str().as_bytes(), v.as_bytes(), out);
        }
    }
    write_field(
        b"content-length",
        r.body().len().to_string().as_bytes(),
        out,
    );
    if close {
        write_field(b"connection", b"close", out);
    }
    out.extend_from_slice(b"\r\n");
    if !head_request {
        out.extend_from_slice(r.body());
    }
}

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub status: u16,
    pub body: Framing,
    /// The application keeps its connection open after this exchange.
    pub keep_alive: bool,
    /// The parsed head (when a plugin sees the response; the head was not written).
    pub parsed: Option<Response>,
}

/// Parses the response head at the start of `buf` and removes it from `buf`.
/// `head_request`: it answers a HEAD (no body, whatever the fields say);
/// `connect`: it answers a CONNECT (a 2xx starts a tunnel); `parse`: build the
/// parsed form for plugins instead of writing the head out, its fields in the
/// buffers of these (an earlier response's, [`Fields::into_spare`]). A complete head is
/// re-written into `out` (emptied first; left empty with `parse`), with room for
/// the body's first bytes. `Ok(None)`: more bytes are needed.
pub fn parse_response(
    buf: &mut BytesMut,
    head_request: bool,
    connect: bool,
    parse: Option<&mut Fields>,
    out: &mut Vec<u8>,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_FIELDS];
    let mut r = httparse::Response::new(&mut []);
    let parsed = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut r,
        buf,
        &mut storage,
    );
    let Some(n) = head_len(parsed, buf.len())? else {
        return Ok(None);
    };
    let status = r.code.unwrap_or_default();
    if !(100..=999).contains(&status) {
        return Err(malformed("invalid status code"));
    }
    let f = Semantics::scan(r.headers)?;
    let v = r.version.unwrap_or(1);
    // The body's first bytes, already read, join the head in one write.
    let body_start = (buf.len() - n).min(super::body::READ_CHUNK);
    let body = if head_request
        || (100..200).contains(&status)
        || status == 204
        || status == 304
        || (connect && (200..300).contains(&status))
    {
        Framing::Empty
    } else if f.te {
        if v == 0 {
            // RFC 9112, 6.1: faulty framing.
            return Err(malformed("Transfer-Encoding in an HTTP/1.0 response"));
        }
        if f.content_length.is_some() {
            return Err(malformed("both Transfer-Encoding and Content-Length"));
        }
        if f.te_chunked_last {
            Framing::Chunked
        } else {
            Framing::UntilClose
        }
    } else {
        match f.content_length {
            Some(0) => Framing::Empty,
            Some(n) => Framing::Length(n),
            None => Framing::UntilClose,
        }
    };
    let keep_alive = f.persistent(v) && body != Framing::UntilClose;
    out.clear();
    let parsed = if let Some(spare) = parse {
        out.reserve(n + 64 + body_start);
        let spare = std::mem::take(spare);
        Some(Response {
            status,
            version: version(r.version),
            fields: Fields::from_head_reusing(spare, &buf[..n], r.headers),
        })
    } else {
        out.reserve(n + 16 + body_start);
        write_status(version(r.version), status, r.reason.unwrap_or(""), out);
        let head = &buf[..n];
        let spans = r.headers.iter().map(|h| fields::Span::of(head, h));
        fields::write_spans(head, spans, out);
        out.extend_from_slice(b"\r\n");
        None
    };
    bytes::Buf::advance(buf, n);
    Ok(Some(ResponseHead {
        status,
        body,
        keep_alive,
        parsed,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(raw: &str) -> Result<Option<RequestHead>, HeadError> {
        parse_request(&mut BytesMut::from(raw), &mut Spare::default())
    }

    fn refused(raw: &str) -> String {
        match request(raw) {
            Err(HeadError::Malformed(why)) => why,
            other => panic!("{raw:?} accepted: {other:?}"),
        }
    }

    #[test]
    fn request_framing_and_connection() {
        let h =
            request("POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello")
                .unwrap()
                .unwrap();
        assert_eq!(
            (h.body, h.keep_alive, h.upgrade),
            (Framing::Length(5), true, false)
        );
        assert_eq!(h.req.path_and_query(), "/a?b=1");
        assert_eq!(h.req.fields.get(b"x-a"), Some(&b"1"[..]));
        let h = request(
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.body, h.keep_alive), (Framing::Chunked, false));
        let h = request("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert_eq!((h.body, h.keep_alive), (Framing::Empty, false));
        let h = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = request("GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.upgrade);
        // Repeated equal values and leading zeros reach the application as one
        // value of plain digits, in the first one's place.
        for raw in [
            "GET / HTTP/1.1\r\nContent-Length: 3\r\nHost: x\r\nContent-Length: 3\r\n\r\n",
            "GET / HTTP/1.1\r\nContent-Length: 003\r\nHost: x\r\n\r\n",
        ] {
            let h = request(raw).unwrap().unwrap();
            assert_eq!(h.body, Framing::Length(3));
            let mut out = Vec::new();
            write_request(&h.req, &mut out);
            assert_eq!(
                String::from_utf8(out).unwrap(),
                "GET / HTTP/1.1\r\ncontent-length: 3\r\nhost: x\r\n\r\n"
            );
        }
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
    }

    #[test]
    fn request_targets_in_each_form() {
        let target = |raw: &str| {
            let h = request(raw).unwrap().unwrap();
            let mut out = Vec::new();
            write_request(&h.req, &mut out);
            let line = String::from_utf8(out).unwrap();
            let line = line.split("\r\n").next().unwrap().to_string();
            (
                h.req.path_and_query().to_string(),
                h.req.authority().to_string(),
                line,
            )
        };
        let t = |pq: &str, a: &str, line: &str| (pq.to_string(), a.to_string(), line.to_string());
        for (raw, want) in [
            (
                "GET /a/{\"x\"}?q=` HTTP/1.1\r\nHost: svc:80\r\n\r\n",
                t("/a/{\"x\"}?q=`", "svc:80", "GET /a/{\"x\"}?q=` HTTP/1.1"),
            ),
            (
                "GET http://other:81/p?q HTTP/1.1\r\nHost: other:81\r\n\r\n",
                t("/p?q", "other:81", "GET http://other:81/p?q HTTP/1.1"),
            ),
            (
                "CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
                t("/", "db:5432", "CONNECT db:5432 HTTP/1.1"),
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: svc\r\n\r\n",
                t("*", "svc", "OPTIONS * HTTP/1.1"),
            ),
        ] {
            assert_eq!(target(raw), want, "{raw:?}");
        }
        // A fragment, or characters that must be percent-encoded, are refused.
        for raw in [
            "GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a<b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a?b>c HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a`b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a?\"b HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert_eq!(refused(raw), "invalid request target", "{raw:?}");
        }
        // A new path and query must be a valid origin-form target.
        let mut h = request("GET /a HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.req.set_path_and_query("/a b"));
        assert!(!h.req.set_path_and_query("a"));
        assert!(!h.req.set_path_and_query("/a#b"));
        assert_eq!(h.req.path_and_query(), "/a");
        assert!(h.req.set_path_and_query("/b?c=`d`"));
        assert_eq!(h.req.path_and_query(), "/b?c=`d`");
    }

    /// Found by the `h1_request` fuzz target: an absolute-form target with a query
    /// and an empty path (`http://svc?q`) was authorized with the path `?q` (which
    /// no `paths` rule can match) while the application received `/?q`. The path
    /// authorized is the path forwarded: `/`.
    #[test]
    fn an_empty_absolute_path_is_the_root() {
        for (raw, pq, line) in [
            (
                "GET http://svc?q=1 HTTP/1.1\r\nHost: svc\r\n\r\n",
                "/?q=1",
                "GET http://svc/?q=1 HTTP/1.1",
            ),
            (
                "GET http://svc:81'p?q HTTP/1.1\r\nHost: svc\r\n\r\n",
                "/?q",
                "GET http://svc:81'p/?q HTTP/1.1",
            ),
            (
                "GET http://svc HTTP/1.1\r\nHost: svc\r\n\r\n",
                "/",
                "GET http://svc/ HTTP/1.1",
            ),
        ] {
            let h = request(raw).unwrap().unwrap();
            assert_eq!(h.req.path_and_query(), pq, "{raw:?}");
            let mut out = Vec::new();
            write_request(&h.req, &mut out);
            let out = String::from_utf8(out).unwrap();
            assert_eq!(out.split("\r\n").next().unwrap(), line, "{raw:?}");
            let again = request(&out).unwrap().unwrap();
            assert_eq!(again.req.path_and_query(), pq, "{out:?}");
        }
    }

    /// A host read one way by authorization and maybe another by the application
    /// is refused: before, an HTTP/1.0 request with two `Host` fields, an
    /// absolute-form target with another `Host`, and a `Host` of non-ASCII bytes
    /// (authorized as no host at all) were all forwarded.
    #[test]
    fn ambiguous_hosts_are_refused() {
        let ambiguous = |raw: &str| match request(raw) {
            Err(HeadError::AmbiguousHost(why)) => why,
            other => panic!("{raw:?}: {other:?}"),
        };
        for (raw, why) in [
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: a\r\nHost: a\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET / HTTP/1.0\r\nHost: web\r\nHost: admin\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET http://web/p HTTP/1.0\r\nHost: web\r\nHost: web\r\n\r\n",
                "more than one Host",
            ),
            (
                "GET / HTTP/1.1\r\nHost: adm\u{ed}n\r\n\r\n",
                "Host is not visible ASCII",
            ),
            (
                "GET / HTTP/1.0\r\nHost: \u{e9}\r\n\r\n",
                "Host is not visible ASCII",
            ),
            (
                "GET http://web/p HTTP/1.1\r\nHost: admin\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "GET http://web/p HTTP/1.0\r\nHost: admin\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "GET http://web:8080/p HTTP/1.1\r\nHost: web\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "GET https://web/p HTTP/1.1\r\nHost: web:80\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "GET http://web/p HTTP/1.1\r\nHost: user@web\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "GET http://web/p HTTP/1.1\r\nHost: \r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "CONNECT db:5432 HTTP/1.1\r\nHost: cache:5432\r\n\r\n",
                "Host differs from the request target's authority",
            ),
            (
                "CONNECT db:5432 HTTP/1.1\r\nHost: db\r\n\r\n",
                "Host differs from the request target's authority",
            ),
        ] {
            assert_eq!(ambiguous(raw), why, "{raw:?}");
        }
        // One host, however it is spelled: accepted, and authorized as the target's.
        for (raw, authority) in [
            ("GET http://WEB/p HTTP/1.1\r\nHost: web\r\n\r\n", "WEB"),
            (
                "GET http://web:80/p HTTP/1.1\r\nHost: web\r\n\r\n",
                "web:80",
            ),
            ("GET https://web/p HTTP/1.1\r\nHost: web:443\r\n\r\n", "web"),
            ("GET http://web/p HTTP/1.0\r\n\r\n", "web"),
            ("CONNECT db:80 HTTP/1.1\r\nHost: db\r\n\r\n", "db:80"),
            (
                "CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
                "db:5432",
            ),
            ("GET / HTTP/1.0\r\nHost: web\r\n\r\n", "web"),
            ("GET / HTTP/1.0\r\n\r\n", ""),
        ] {
            let h = request(raw).unwrap().unwrap();
            assert_eq!(h.req.authority(), authority, "{raw:?}");
        }
    }

    #[test]
    fn ambiguous_or_malformed_requests_are_refused() {
        for (raw, why) in [
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", "both Transfer-Encoding and Content-Length"),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", "Transfer-Encoding other than a final chunked"),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, gzip\r\n\r\n", "Transfer-Encoding other than a final chunked"),
            ("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding other than a final chunked"),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", "Transfer-Encoding in an HTTP/1.0 request"),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", "differing Content-Length values"),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +3\r\n\r\n", "Content-Length is not a number"),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3, 3\r\n\r\n", "Content-Length is a list"),
            ("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", "Content-Length is not a number"),
            ("GET / HTTP/1.1\r\n\r\n", "no Host in an HTTP/1.1 request"),
        ] {
            assert_eq!(refused(raw), why, "{raw:?}");
        }
        // httparse's own refusals: whitespace before the colon, a bad name, obs-fold.
        for raw in [
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHo(st: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\x00\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            refused(raw);
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: x\r\n{}\r\n",
            "a: b\r\n".repeat(MAX_FIELDS)
        );
        assert_eq!(request(&many).unwrap_err(), HeadError::TooLarge);
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(MAX_HEAD));
        assert_eq!(request(&long).unwrap_err(), HeadError::TooLarge);
        // A head that completes just past the limit, in a buffer that one read
        // filled past it, is refused too; one of exactly the limit is not.
        let head = |len: usize| {
            let start = "GET / HTTP/1.1\r\nHost: x\r\nx-pad: ";
            let pad = len - start.len() - 4;
            format!("{start}{}\r\n\r\nNEXT", "a".repeat(pad))
        };
        assert_eq!(
            request(&head(MAX_HEAD + 1)).unwrap_err(),
            HeadError::TooLarge
        );
        assert_eq!(request(&head(MAX_HEAD)).unwrap().unwrap().len, MAX_HEAD);
        let r = parse_response(
            &mut BytesMut::from(
                head(MAX_HEAD + 1)
                    .replacen("GET / HTTP/1.1", "HTTP/1.1 200 OK", 1)
                    .as_str(),
            ),
            false,
            false,
            None,
            &mut Vec::new(),
        );
        assert_eq!(r.unwrap_err(), HeadError::TooLarge);
    }

    #[test]
    fn heads_are_written_canonically() {
        let mut buf = BytesMut::from("GET /x HTTP/1.1\nHost:  x \nX-Y: z\n\nNEXT");
        let h = parse_request(&mut buf, &mut Spare::default())
            .unwrap()
            .unwrap();
        assert_eq!(&buf[..], b"NEXT");
        let mut out = Vec::new();
        write_request(&h.req, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "GET /x HTTP/1.1\r\nhost: x\r\nx-y: z\r\n\r\n"
        );

        let mut buf = BytesMut::from("HTTP/1.1 200 OK\nContent-Length: 2\nX-App: t\n\nhi");
        let mut out = b"left over".to_vec();
        let r = parse_response(&mut buf, false, false, None, &mut out)
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.status, r.body, r.keep_alive),
            (200, Framing::Length(2), true)
        );
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nX-App: t\r\n\r\n"
        );
        assert_eq!(&buf[..], b"hi");

        let mut out = Vec::new();
        let local = crate::proxy::l7::http::reply(403, "RBAC: access denied", &[]);
        write_local(&local, false, true, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 403 Forbidden\r\ncontent-type: text/plain\r\ncontent-length: 19\r\nconnection: close\r\n\r\nRBAC: access denied"
        );
    }

    /// The table-driven check agrees with the rules written out byte by byte, for
    /// every target of up to 5 bytes over an alphabet of the bytes that matter.
    #[test]
    fn valid_origin_agrees_with_the_rules() {
        let reference = |b: &[u8]| {
            if b.first() != Some(&b'/') {
                return false;
            }
            let mut query = false;
            b.iter().all(|&c| match c {
                b'?' => {
                    query = true;
                    true
                }
                b'#' | b'<' | b'>' => false,
                b'`' => query,
                b'"' => !query,
                0x21..=0x7e | 0x80..=0xff => true,
                _ => false,
            })
        };
        let alphabet = [
            "/", "?", "`", "\"", "#", "<", "a", " ", "\u{7f}", "\u{e9}", "\t",
        ];
        let mut valid = 0;
        for len in 1..=5u32 {
            for mut k in 0..alphabet.len().pow(len) {
                let mut t = String::new();
                for _ in 0..len {
                    t.push_str(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                assert_eq!(valid_origin(&t), reference(t.as_bytes()), "{t:?}");
                valid += usize::from(reference(t.as_bytes()));
            }
        }
        assert!(valid > 500, "only {valid} valid targets were tried");
    }

    /// A connection's heads reuse the previous head's buffers: nothing of that
    /// head (fields, target, a plugin's change) is left in the next.
    #[test]
    fn reused_buffers_carry_nothing_over() {
        let mut spare = Spare::default();
        let mut buf = BytesMut::from(
            "GET /first/long/path?q=1 HTTP/1.1\r\nHost: a\r\nX-One: 1\r\nX-Two: 2\r\n\r\n\
             POST /b HTTP/1.1\r\nHost: b\r\nContent-Length: 0\r\n\r\n",
        );
        let mut first = parse_request(&mut buf, &mut spare).unwrap().unwrap();
        first.req.fields.append(b"x-plugin", b"added").unwrap();
        let mut out = Vec::new();
        write_request(&first.req, &mut out);
        spare.keep(&mut first.req);
        assert!(first.req.fields.is_empty());
        let second = parse_request(&mut buf, &mut spare).unwrap().unwrap();
        assert!(!second.req.fields.changed());
        out.clear();
        write_request(&second.req, &mut out);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "POST /b HTTP/1.1\r\nhost: b\r\ncontent-length: 0\r\n\r\n"
        );
        assert!(buf.is_empty());
    }

    #[test]
    fn response_framing() {
        let parse = |raw: &str, head: bool, connect: bool| {
            parse_response(
                &mut BytesMut::from(raw),
                head,
                connect,
                Some(&mut Fields::default()),
                &mut Vec::new(),
            )
            .map(|r| r.map(|r| (r.body, r.keep_alive)))
        };
        for (raw, want) in [
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
                (Framing::Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
                (Framing::UntilClose, false),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", (Framing::UntilClose, false)),
            (
                "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n",
                (Framing::Empty, true),
            ),
            ("HTTP/1.1 304 Not Modified\r\n\r\n", (Framing::Empty, true)),
            ("HTTP/1.1 100 Continue\r\n\r\n", (Framing::Empty, true)),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                (Framing::Empty, false),
            ),
            (
                "HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n",
                (Framing::Length(1), false),
            ),
        ] {
            assert_eq!(parse(raw, false, false).unwrap().unwrap(), want, "{raw:?}");
        }
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true, false)
                .unwrap()
                .unwrap(),
            (Framing::Empty, true)
        );
        assert_eq!(
            parse("HTTP/1.1 200 OK\r\n\r\n", false, true)
                .unwrap()
                .unwrap(),
            (Framing::Empty, true)
        );
        assert!(parse(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            false,
            false
        )
        .is_err());
        assert!(parse(
            "HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false,
            false
        )
        .is_err());
        assert!(parse("HTTP/1.1 099 X\r\n\r\n", false, false).is_err());
        // RFC 9112, 6.1 (found by the response differential test).
        let e = parse(
            "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            false,
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("HTTP/1.0 response"), "{e}");
    }
}
