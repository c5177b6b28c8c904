//! HTTP/1 request heads (node-dataplane `proxy/l7/h1/head.rs`) from arbitrary bytes.
//!
//! Properties, besides never panicking:
//! - the parser takes exactly the head and leaves the rest (pipelined bytes) as it
//!   was; it asks for more bytes only below the head size limit, and accepts no
//!   head larger than it;
//! - a head arriving a piece at a time is not complete (nor refused) before its
//!   last byte: a prefix of an accepted head always parses as "need more";
//! - the head written to the application parses again to the same method, target,
//!   version, fields, framing and connection handling, and writes to the same bytes;
//! - what the application's parser (httparse) reads of it cannot be framed
//!   differently: one `Host` in HTTP/1.1, never both `Content-Length` and
//!   `Transfer-Encoding`, one `Content-Length` equal to the framing, a final
//!   `chunked`; an upgrade is never an h2c upgrade;
//! - the next head on the connection, parsed into the previous head's reused
//!   buffers, is the same as parsed into new ones;
//! - the path normalization that authorization uses is idempotent on its target.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use weft_fuzz::{cut_points, reparse_request_fields, tokens};
use weft_node_dataplane::fuzzing::body::Framing;
use weft_node_dataplane::fuzzing::h1::{
    parse_request, write_request, RequestHead, Spare, MAX_HEAD,
};
use weft_node_dataplane::fuzzing::RequestMessage;

fn parse(data: &[u8], spare: &mut Spare) -> (BytesMut, Result<Option<RequestHead>, String>) {
    let mut buf = BytesMut::from(data);
    let r = parse_request(&mut buf, spare).map_err(|e| e.to_string());
    (buf, r)
}

/// What of a parsed head must survive writing it and parsing it again.
fn summary(h: &RequestHead) -> impl PartialEq + std::fmt::Debug {
    (
        h.req.method.clone(),
        h.req.version,
        h.req.path_and_query().to_string(),
        h.req.authority().to_string(),
        h.req.scheme().to_string(),
        h.req
            .fields
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect::<Vec<_>>(),
        h.body,
        h.keep_alive,
        h.upgrade,
    )
}

fn written(h: &RequestHead) -> Vec<u8> {
    let mut out = Vec::new();
    write_request(&h.req, &mut out);
    out
}

/// The written head as the application reads it.
fn check_application_view(h: &RequestHead, out: &[u8]) {
    let fields = reparse_request_fields(out).unwrap_or_else(|| {
        panic!(
            "written head does not parse: {:?}",
            String::from_utf8_lossy(out)
        )
    });
    let count = |n: &str| fields.iter().filter(|(k, _)| k == n).count();
    if h.req.version == http::Version::HTTP_11 {
        assert_eq!(
            count("host"),
            1,
            "HTTP/1.1 with {} Host fields",
            count("host")
        );
    }
    let cl: Vec<&[u8]> = fields
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();
    let te = tokens(&fields, "transfer-encoding");
    assert!(
        cl.is_empty() || te.is_empty(),
        "both Content-Length and Transfer-Encoding"
    );
    assert!(cl.len() <= 1, "{} Content-Length fields", cl.len());
    match h.body {
        Framing::Length(n) => assert_eq!(cl, [n.to_string().as_bytes()]),
        Framing::Chunked => {
            assert_eq!(te.last().map(Vec::as_slice), Some(&b"chunked"[..]));
            assert_eq!(te.iter().filter(|t| t.as_slice() == b"chunked").count(), 1);
        }
        Framing::Empty => {
            assert!(te.is_empty());
            assert!(cl.is_empty() || cl == [b"0"], "{cl:?}");
        }
        Framing::UntilClose => panic!("a request framed until close"),
    }
    let connection_upgrade = tokens(&fields, "connection")
        .iter()
        .any(|t| t.as_slice() == b"upgrade");
    if connection_upgrade || h.upgrade {
        assert!(
            !tokens(&fields, "upgrade")
                .iter()
                .any(|t| t.as_slice() == b"h2c"),
            "an h2c upgrade offer reaches the application"
        );
    }
}

fn check_path(target: &str) {
    use weft_authz::path::{normalize, normalize_if_needed};
    let Ok(n) = normalize(target) else {
        assert!(normalize_if_needed(target).is_err());
        return;
    };
    match normalize_if_needed(target) {
        Ok(None) => assert!(n.is(target), "{target:?} -> {n:?} said unchanged"),
        Ok(Some(m)) => assert_eq!(m, n),
        Err(e) => panic!("{target:?}: normalize ok, normalize_if_needed {e}"),
    }
    let again = normalize(&n.path_and_query()).expect("a normalized path normalizes");
    assert_eq!(again, n, "normalization of {target:?} is not idempotent");
    if target.starts_with('/') {
        assert!(n.path.starts_with('/'));
        assert!(!n.path.contains("//") && !n.path.contains("/./") && !n.path.contains("/../"));
        assert!(!n.path.ends_with("/.") && !n.path.ends_with("/.."), "{n:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    let (buf, r) = parse(data, &mut Spare::default());
    let h = match r {
        Ok(None) => {
            assert!(data.len() < MAX_HEAD, "asked for more past the limit");
            assert_eq!(&buf[..], data);
            return;
        }
        Err(_) => {
            assert_eq!(&buf[..], data, "a refused head consumed bytes");
            return;
        }
        Ok(Some(h)) => h,
    };
    assert!(
        h.len > 0 && h.len <= data.len() && h.len <= MAX_HEAD,
        "head length {}",
        h.len
    );
    assert_eq!(&buf[..], &data[h.len..], "bytes after the head changed");

    for cut in cut_points(data, h.len) {
        let (_, r) = parse(&data[..cut], &mut Spare::default());
        assert!(
            matches!(r, Ok(None)),
            "the first {cut} of {} head bytes gave {:?}",
            h.len,
            r.map(|h| h.map(|h| h.len))
        );
    }

    let out = written(&h);
    check_application_view(&h, &out);
    let (rest, again) = parse(&out, &mut Spare::default());
    let again = again
        .unwrap_or_else(|e| {
            panic!(
                "written head refused: {e}: {:?}",
                String::from_utf8_lossy(&out)
            )
        })
        .expect("written head incomplete");
    assert!(rest.is_empty());
    assert_eq!(
        summary(&again),
        summary(&h),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
    assert_eq!(written(&again), out, "writing is not a fixpoint");

    check_path(h.req.path_and_query());

    // The next head, in the buffers this one leaves.
    let mut first = h;
    let mut spare = Spare::default();
    spare.keep(&mut first.req);
    let (_, reused) = parse(&data[first.len..], &mut spare);
    let (_, fresh) = parse(&data[first.len..], &mut Spare::default());
    match (reused, fresh) {
        (Ok(Some(a)), Ok(Some(b))) => {
            assert_eq!(summary(&a), summary(&b));
            assert_eq!(written(&a), written(&b));
        }
        (Ok(None), Ok(None)) | (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "reused buffers: {:?}, new: {:?}",
            a.map(|h| h.map(|h| h.len)),
            b.map(|h| h.map(|h| h.len))
        ),
    }
});
