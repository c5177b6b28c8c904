//! The body scanner (node-dataplane `proxy/l7/h1/body.rs`) that decides where a
//! chunked body ends, and so what is forwarded to the application, from arbitrary
//! bytes. The first byte chooses the framing (mostly chunked) and the pieces the
//! body arrives in; the rest is the body and whatever follows it.
//!
//! Properties, besides never panicking:
//! - it finds the same end (or the same error) whether the bytes arrive at once
//!   or a few at a time; a body that has not ended takes every byte given;
//! - it never takes more than it was given, nor more than a `Content-Length`;
//! - a body it accepted is framed the same way by another chunked parser: every
//!   chunk size line it accepted is read as the same size by httparse, and the
//!   body ends where the chunks and the trailer section say;
//! - once the body ended, no further byte is taken.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_fuzz::pieces;
use weft_node_dataplane::fuzzing::body::{BodyError, Framing, Scanner};

/// Scans `data` in `sizes`-long pieces: bytes of the body, and whether it ended.
fn scan_pieces(framing: Framing, data: &[u8], sizes: &[usize]) -> Result<(usize, bool), BodyError> {
    let mut s = Scanner::new(framing);
    let mut at = 0;
    // No bytes at all is still one (empty) read.
    let sizes = if sizes.is_empty() { &[0][..] } else { sizes };
    for &n in sizes {
        let piece = &data[at..at + n];
        let (took, done) = s.scan(piece)?;
        assert!(took <= piece.len());
        at += took;
        if done {
            assert_eq!(s.scan(&data[at..])?, (0, true), "bytes taken after the end");
            return Ok((at, true));
        }
        assert_eq!(
            took,
            piece.len(),
            "an unfinished body left bytes of a piece"
        );
    }
    Ok((at, false))
}

/// Walks an accepted chunked body with httparse's chunk-size parser: where it ends.
fn httparse_end(body: &[u8]) -> Option<usize> {
    let mut at = 0;
    loop {
        let (line, size) = match httparse::parse_chunk_size(&body[at..]) {
            Ok(httparse::Status::Complete(c)) => c,
            other => panic!(
                "httparse reads the size line at {at} as {other:?}: {:?}",
                String::from_utf8_lossy(&body[at..])
            ),
        };
        at += line;
        if size == 0 {
            break;
        }
        at += usize::try_from(size).ok()?;
        assert_eq!(
            body.get(at..at + 2),
            Some(&b"\r\n"[..]),
            "chunk data not followed by CRLF"
        );
        at += 2;
    }
    // The trailer section: lines up to an empty one.
    loop {
        let rest = &body[at..];
        let eol = rest.windows(2).position(|w| w == b"\r\n")?;
        at += eol + 2;
        if eol == 0 {
            return Some(at);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let framing = match mode >> 5 {
        0 => Framing::Length(u64::from(mode & 31) * 7),
        1 => Framing::Empty,
        2 => Framing::UntilClose,
        _ => Framing::Chunked,
    };
    let whole = scan_pieces(framing, data, &[data.len()]);
    let split = scan_pieces(
        framing,
        data,
        &pieces(u64::from(mode) << 32 | data.len() as u64, data.len()),
    );
    let bytes = scan_pieces(framing, data, &vec![1; data.len()]);
    assert_eq!(whole, split, "whole vs pieces");
    assert_eq!(whole, bytes, "whole vs byte by byte");
    match (framing, whole) {
        (Framing::Length(n), r) => {
            let take = (n as usize).min(data.len());
            assert_eq!(r, Ok((take, take as u64 == n)));
        }
        (Framing::Empty, r) => assert_eq!(r, Ok((0, true))),
        (Framing::UntilClose, r) => assert_eq!(r, Ok((data.len(), false))),
        (Framing::Chunked, Ok((end, true))) => {
            assert_eq!(
                httparse_end(&data[..end]),
                Some(end),
                "httparse ends the body elsewhere"
            );
        }
        (Framing::Chunked, Ok((end, false))) => assert_eq!(end, data.len()),
        (Framing::Chunked, Err(_)) => {}
    }
});
