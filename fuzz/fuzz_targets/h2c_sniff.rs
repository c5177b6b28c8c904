//! Protocol sniffing (node-dataplane `proxy/l7/sniff.rs`): how a connection's
//! first bytes are told apart as HTTP/1, HTTP/2 with prior knowledge (h2c) or
//! opaque, from arbitrary bytes. The first byte seeds the pieces the bytes arrive
//! in; the rest is what the client sends.
//!
//! Properties, besides never panicking:
//! - a decision never changes as more bytes arrive: the class of a prefix, once
//!   known, is the class of every longer input;
//! - sniffing waits for at most the h2c preface's length of bytes;
//! - HTTP/2 only after the whole preface, HTTP/1 only after a known method and a
//!   space;
//! - sniffing a connection that delivers the bytes a few at a time decides as
//!   `classify` does on what it read, and replaying what it read in front of the
//!   rest gives back exactly the bytes sent.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::pin::Pin;
use std::sync::OnceLock;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use weft_fuzz::pieces;
use weft_node_dataplane::fuzzing::sniff::{classify, sniff, Protocol, Rewind, H2_PREFACE};

const METHODS: &[&[u8]] = &[
    b"GET", b"HEAD", b"POST", b"PUT", b"DELETE", b"CONNECT", b"OPTIONS", b"TRACE", b"PATCH",
];

/// A connection that delivers its bytes in the given pieces, then EOF.
struct Trickle {
    data: Vec<u8>,
    sizes: Vec<usize>,
    at: usize,
    piece: usize,
}

impl AsyncRead for Trickle {
    fn poll_read(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if let Some(&n) = me.sizes.get(me.piece) {
            let n = n.min(buf.remaining());
            buf.put_slice(&me.data[me.at..me.at + n]);
            me.at += n;
            if n == me.sizes[me.piece] {
                me.piece += 1;
            } else {
                me.sizes[me.piece] -= n;
            }
        }
        Poll::Ready(Ok(()))
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a tokio runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, data)) = data.split_first() else {
        return;
    };
    // Prefix consistency and the bound on waiting.
    let mut known: Option<(usize, Protocol)> = None;
    for n in 0..=data.len().min(64) {
        let c = classify(&data[..n]);
        match (c, known) {
            (None, None) => assert!(n <= H2_PREFACE.len(), "still unknown after {n} bytes"),
            (Some(p), None) => known = Some((n, p)),
            (c, Some((at, p))) => {
                assert_eq!(c, Some(p), "{:?} at {at} bytes, then {c:?} at {n}", p)
            }
        }
    }
    let whole = classify(data);
    if let Some((_, p)) = known {
        assert_eq!(whole, Some(p));
    }
    match whole {
        Some(Protocol::Http2) => assert!(data.starts_with(H2_PREFACE)),
        Some(Protocol::Http1) => {
            assert!(METHODS
                .iter()
                .any(|m| data.starts_with(m) && data.get(m.len()) == Some(&b' ')))
        }
        _ => {}
    }

    // Sniffing a connection, and replaying what it read.
    let conn = Trickle {
        data: data.to_vec(),
        sizes: pieces(u64::from(seed) << 32 | data.len() as u64, data.len()),
        at: 0,
        piece: 0,
    };
    runtime().block_on(async move {
        let mut conn = conn;
        let (p, prefix) = sniff(&mut conn, std::time::Duration::from_secs(5))
            .await
            .expect("sniffing an in-memory connection");
        // Sniffing stops at the first decision; at EOF undecided is opaque.
        match classify(&prefix) {
            Some(c) => assert_eq!(c, p),
            None => {
                assert_eq!(p, Protocol::Opaque);
                assert_eq!(prefix.len(), data.len(), "undecided before EOF");
            }
        }
        assert!(data.starts_with(&prefix));
        let mut all = Vec::new();
        Rewind::new(prefix, conn)
            .read_to_end(&mut all)
            .await
            .expect("replay");
        assert_eq!(all, data, "replayed bytes differ");
    });
});
