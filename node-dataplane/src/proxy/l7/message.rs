//! What the L7 steps share about a message: the request and response heads as they
//! see them (weft's HTTP/1 heads and hyper's HTTP/2 messages), and the responses
//! weft writes itself.

use crate::fields::Fields;
use bytes::Bytes;

/// A response weft writes itself (denied, malformed, a plugin's local reply).
pub type LocalResponse = http::Response<Bytes>;

/// A local response: `status`, `body` as text/plain unless `headers` say otherwise.
pub fn reply(status: u16, body: impl Into<Bytes>, headers: &[(String, String)]) -> LocalResponse {
    let mut r = http::Response::new(body.into());
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

/// A request head as the shared steps see it: an HTTP/1 head parsed by weft
/// ([`super::h1::head::Request`]) or an HTTP/2 request from hyper.
pub trait RequestMessage {
    fn method(&self) -> &http::Method;
    /// The target's path and query (`/` when it has none, as a CONNECT's).
    fn path_and_query(&self) -> &str;
    /// Sets the path and query, keeping the scheme and authority of an absolute
    /// target. `false`: not a valid target; nothing changed.
    fn set_path_and_query(&mut self, pq: &str) -> bool;
    /// The target's authority, else the `Host` field, else empty.
    fn authority(&self) -> &str;
    fn scheme(&self) -> &str;
    /// The fields, lent to plugins; [`RequestMessage::return_fields`] gives them back.
    fn lend_fields(&mut self) -> Fields;
    fn return_fields(&mut self, fields: Fields);
    /// Every field as (lower-case name, value), for authorization.
    fn field_pairs(&self) -> Vec<(String, String)>;
}

/// A response head as the shared steps see it.
pub trait ResponseMessage {
    fn status(&self) -> u16;
    /// Sets a final status (200-599, as plugins may set).
    fn set_status(&mut self, status: u16);
    fn lend_fields(&mut self) -> Fields;
    fn return_fields(&mut self, fields: Fields);
}
