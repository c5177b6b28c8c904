//! HTTP/1 response heads (node-dataplane `proxy/l7/h1/head.rs`) from arbitrary
//! bytes. The first byte chooses how the response is read: bit 0, it answers a
//! HEAD; bit 1, it answers a CONNECT; bit 2, a plugin sees it (parsed form instead
//! of the head re-written). The rest is the application's bytes.
//!
//! Properties, besides never panicking:
//! - the parser takes exactly the head, leaves the rest (the body's first bytes) as
//!   it was, asks for more only below the head size limit;
//! - a prefix of an accepted head parses as "need more";
//! - the head the client receives (re-written, or written from the parsed form)
//!   parses again to the same status, framing and connection handling, and is
//!   re-written to the same bytes;
//! - what the client's parser (httparse) reads of it cannot be framed differently
//!   from how weft forwards the body: a 3-digit status, never both
//!   `Content-Length` and `Transfer-Encoding`, every `Content-Length` equal to the
//!   length weft forwards.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use weft_fuzz::{cut_points, reparse_response_fields, tokens};
use weft_node_dataplane::fuzzing::body::Framing;
use weft_node_dataplane::fuzzing::h1::{parse_response, write_response, ResponseHead, MAX_HEAD};
use weft_node_dataplane::fuzzing::Fields;

#[derive(Clone, Copy)]
struct Mode {
    head: bool,
    connect: bool,
    plugin: bool,
}

fn parse(data: &[u8], m: Mode) -> (BytesMut, Vec<u8>, Result<Option<ResponseHead>, String>) {
    let mut buf = BytesMut::from(data);
    let mut out = b"stale".to_vec();
    let mut spare = Fields::default();
    let r = parse_response(
        &mut buf,
        m.head,
        m.connect,
        m.plugin.then_some(&mut spare),
        &mut out,
    )
    .map_err(|e| e.to_string());
    (buf, out, r)
}

/// The head as the client receives it.
fn client_head(r: &ResponseHead, out: &[u8]) -> Vec<u8> {
    match &r.parsed {
        Some(p) => {
            assert!(out.is_empty(), "a parsed head was also written");
            let mut w = Vec::new();
            write_response(p, &mut w);
            w
        }
        None => out.to_vec(),
    }
}

fn check_client_view(r: &ResponseHead, head: &[u8]) {
    let (status, fields) = reparse_response_fields(head).unwrap_or_else(|| {
        panic!(
            "written head does not parse: {:?}",
            String::from_utf8_lossy(head)
        )
    });
    assert_eq!(status, r.status);
    assert!((100..=999).contains(&status));
    let cl: Vec<&[u8]> = fields
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v.trim_ascii())
        .collect();
    let te = tokens(&fields, "transfer-encoding");
    match r.body {
        Framing::Length(n) => {
            assert!(te.is_empty());
            assert!(!cl.is_empty());
            for v in &cl {
                let v = std::str::from_utf8(v).expect("ASCII Content-Length");
                assert_eq!(v.parse::<u64>().ok(), Some(n), "{v:?} for {n}");
            }
        }
        Framing::Chunked => {
            assert!(cl.is_empty(), "chunked with a Content-Length");
            assert_eq!(te.last().map(Vec::as_slice), Some(&b"chunked"[..]));
        }
        Framing::UntilClose => {
            assert!(cl.is_empty(), "until close with a Content-Length");
            assert!(!r.keep_alive, "until close but kept alive");
        }
        Framing::Empty => {}
    }
}

fn summary(r: &ResponseHead) -> (u16, Framing, bool) {
    (r.status, r.body, r.keep_alive)
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, data)) = data.split_first() else {
        return;
    };
    let m = Mode {
        head: flags & 1 != 0,
        connect: flags & 2 != 0,
        plugin: flags & 4 != 0,
    };
    let (buf, out, r) = parse(data, m);
    let r = match r {
        Ok(None) => {
            assert!(data.len() < MAX_HEAD);
            assert_eq!(&buf[..], data);
            return;
        }
        Err(_) => {
            assert_eq!(&buf[..], data, "a refused head consumed bytes");
            return;
        }
        Ok(Some(r)) => r,
    };
    let len = data.len() - buf.len();
    assert!(len > 0 && len <= MAX_HEAD);
    assert_eq!(&buf[..], &data[len..]);
    assert_eq!(r.parsed.is_some(), m.plugin);

    for cut in cut_points(data, len) {
        let (_, _, p) = parse(&data[..cut], m);
        assert!(
            matches!(p, Ok(None)),
            "the first {cut} of {len} head bytes gave {:?}",
            p.map(|h| h.map(|h| h.status))
        );
    }

    let head = client_head(&r, &out);
    check_client_view(&r, &head);
    // The client's head parses the same way, both as written and through a plugin.
    for plugin in [false, true] {
        let (rest, out2, again) = parse(&head, Mode { plugin, ..m });
        let again = again
            .unwrap_or_else(|e| {
                panic!(
                    "written head refused: {e}: {:?}",
                    String::from_utf8_lossy(&head)
                )
            })
            .expect("written head incomplete");
        assert!(rest.is_empty());
        assert_eq!(
            summary(&again),
            summary(&r),
            "{:?}",
            String::from_utf8_lossy(&head)
        );
        if !plugin && r.parsed.is_none() {
            assert_eq!(out2, head, "re-writing is not a fixpoint");
        }
    }
});
