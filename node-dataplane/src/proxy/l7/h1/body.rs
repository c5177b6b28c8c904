//! Message bodies of HTTP/1.x (RFC 9112 section 6): how each one is framed, a strict
//! scanner that finds where it ends, and forwarding it unchanged.
//!
//! The proxy does not re-frame bodies: it forwards the bytes it received, but only
//! after the scanner has accepted them. A chunked body is forwarded only as far as
//! it is well formed (sizes in hex, CRLF line ends, bounded extensions and
//! trailers), so the application's parser finds the same end as weft's: what weft
//! authorized is what the application receives, and nothing is smuggled after it.

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes the connection (responses only).
    UntilClose,
}

/// A body that cannot be forwarded as is.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BodyError {
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
    #[error("the connection closed before the end of the body")]
    Truncated,
}

/// Longest chunk-size line (hex digits, whitespace, extensions).
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section.
const MAX_TRAILERS: usize = 16 * 1024;
/// Hex digits in a chunk size (a `u64`).
const MAX_SIZE_DIGITS: u8 = 15;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// In the chunk size, `digits` read so far.
    Size {
        digits: u8,
        value: u64,
        line: usize,
    },
    /// Whitespace after the size.
    SizeWs {
        value: u64,
        line: usize,
    },
    /// A chunk extension.
    Ext {
        value: u64,
        line: usize,
    },
    /// After the size line's CR.
    SizeLf {
        value: u64,
    },
    Data {
        left: u64,
    },
    DataCr,
    DataLf,
    /// In the trailer section, `in_name` while reading a field name.
    Trailer {
        in_name: bool,
        line: usize,
        total: usize,
    },
    TrailerLf {
        last: bool,
        total: usize,
    },
    Done,
}

/// Finds where a body ends, a buffer at a time.
#[derive(Debug)]
pub struct Scanner {
    framing: Framing,
    /// `Length`: bytes still to come.
    left: u64,
    chunk: Chunk,
}

impl Scanner {
    pub fn new(framing: Framing) -> Self {
        Self {
            framing,
            left: match framing {
                Framing::Length(n) => n,
                _ => 0,
            },
            chunk: Chunk::Size {
                digits: 0,
                value: 0,
                line: 0,
            },
        }
    }

    /// How many leading bytes of `buf` belong to the body, and whether the body
    /// ends there.
    pub fn scan(&mut self, buf: &[u8]) -> Result<(usize, bool), BodyError> {
        match self.framing {
            Framing::Empty => Ok((0, true)),
            Framing::Length(_) => {
                let n = usize::try_from(self.left)
                    .unwrap_or(usize::MAX)
                    .min(buf.len());
                self.left -= n as u64;
                Ok((n, self.left == 0))
            }
            Framing::UntilClose => Ok((buf.len(), false)),
            Framing::Chunked => self.scan_chunked(buf),
        }
    }

    /// The sender closed the connection: fine only where the body may end so.
    pub fn eof(&self) -> Result<(), BodyError> {
        match self.framing {
            Framing::UntilClose | Framing::Empty => Ok(()),
            _ => Err(BodyError::Truncated),
        }
    }

    fn scan_chunked(&mut self, buf: &[u8]) -> Result<(usize, bool), BodyError> {
        use Chunk::*;
        let bad = BodyError::Chunked;
        let mut i = 0;
        while i < buf.len() {
            let b = buf[i];
            self.chunk = match self.chunk {
                Size {
                    digits,
                    value,
                    line,
                } => match (hex(b), digits) {
                    (Some(d), n) if n < MAX_SIZE_DIGITS => Size {
                        digits: n + 1,
                        value: value << 4 | u64::from(d),
                        line: line + 1,
                    },
                    (Some(_), _) => return Err(bad("chunk size too large")),
                    (None, 0) => return Err(bad("chunk size is not hexadecimal")),
                    (None, _) => after_size(b, value, line)?,
                },
                SizeWs { value, line } => after_size(b, value, line)?,
                Ext { value, line } => match b {
                    b'\r' => SizeLf { value },
                    _ if line >= MAX_CHUNK_LINE => return Err(bad("chunk line too long")),
                    b'\t' | b' '..=b'~' | 0x80..=0xff => Ext {
                        value,
                        line: line + 1,
                    },
                    _ => return Err(bad("control character in a chunk extension")),
                },
                SizeLf { value } => match (b, value) {
                    (b'\n', 0) => Trailer {
                        in_name: true,
                        line: 0,
                        total: 0,
                    },
                    (b'\n', n) => Data { left: n },
                    _ => return Err(bad("chunk size line not ended by CRLF")),
                },
                Data { left } => {
                    let n = usize::try_from(left)
                        .unwrap_or(usize::MAX)
                        .min(buf.len() - i);
                    i += n;
                    self.chunk = match left - n as u64 {
                        0 => DataCr,
                        left => Data { left },
                    };
                    continue;
                }
                DataCr if b == b'\r' => DataLf,
                DataLf if b == b'\n' => Size {
                    digits: 0,
                    value: 0,
                    line: 0,
                },
                DataCr | DataLf => return Err(bad("chunk data not followed by CRLF")),
                Trailer {
                    in_name,
                    line,
                    total,
                } => {
                    if total >= MAX_TRAILERS {
                        return Err(bad("trailer section too large"));
                    }
                    let total = total + 1;
                    match b {
                        b'\r' if line == 0 => TrailerLf { last: true, total },
                        b'\r' if in_name => return Err(bad("trailer field without a colon")),
                        b'\r' => TrailerLf { last: false, total },
                        b'\n' => return Err(bad("trailer line not ended by CRLF")),
                        b':' if in_name && line > 0 => Trailer {
                            in_name: false,
                            line: line + 1,
                            total,
                        },
                        _ if in_name && is_tchar(b) => Trailer {
                            in_name,
                            line: line + 1,
                            total,
                        },
                        _ if in_name => return Err(bad("invalid trailer field name")),
                        b'\t' | b' '..=b'~' | 0x80..=0xff => Trailer {
                            in_name,
                            line: line + 1,
                            total,
                        },
                        _ => return Err(bad("control character in a trailer field")),
                    }
                }
                TrailerLf { last, total } => match (b, last) {
                    (b'\n', true) => Done,
                    (b'\n', false) => Trailer {
                        in_name: true,
                        line: 0,
                        total,
                    },
                    _ => return Err(bad("trailer line not ended by CRLF")),
                },
                Done => return Ok((i, true)),
            };
            i += 1;
        }
        Ok((i, self.chunk == Done))
    }
}

/// The byte after a chunk size's digits (or its whitespace).
fn after_size(b: u8, value: u64, line: usize) -> Result<Chunk, BodyError> {
    Ok(match b {
        b' ' | b'\t' => Chunk::SizeWs {
            value,
            line: line + 1,
        },
        b';' => Chunk::Ext {
            value,
            line: line + 1,
        },
        b'\r' => Chunk::SizeLf { value },
        _ => return Err(BodyError::Chunked("invalid character after a chunk size")),
    })
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// A token character (RFC 9110 section 5.6.2).
pub fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// How a forwarded body ended, if not as its framing says.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Reading from the sender failed, or what it sent is not a well-formed body.
    #[error("reading the body: {0}")]
    Read(std::io::Error),
    #[error("{0}")]
    Body(#[from] BodyError),
    /// The body is malformed within its first bytes: nothing was written, not
    /// even the head.
    #[error("{0} (nothing forwarded)")]
    Unsent(BodyError),
    /// Writing to the receiver failed.
    #[error("writing the body: {0}")]
    Write(std::io::Error),
}

/// Bytes read from a connection at a time.
pub const READ_CHUNK: usize = 16 * 1024;

/// Writes `head` (a message head, empty or not) followed by the body framed by
/// `framing`, whose first bytes may already be in `buf` (read from `src`); the head
/// and the body's first bytes go in one write (appended to `head`, which is given
/// back as it came). Returns when the body has ended; bytes after it stay in `buf`.
/// Whatever the receiver may be waiting for is written before `src` is read again.
pub async fn forward<R, W>(
    src: &mut R,
    buf: &mut BytesMut,
    dst: &mut W,
    head: &mut Vec<u8>,
    framing: Framing,
) -> Result<(), ForwardError>
where
    R: AsyncRead + Unpin + ?Sized,
    W: AsyncWrite + Unpin + ?Sized,
{
    let mut scan = Scanner::new(framing);
    let mut head_written = head.is_empty();
    loop {
        let (n, done) = match scan.scan(buf) {
            Ok(r) => r,
            Err(e) if !head_written => return Err(ForwardError::Unsent(e)),
            Err(e) => return Err(e.into()),
        };
        if head_written {
            if n > 0 {
                dst.write_all(&buf[..n])
                    .await
                    .map_err(ForwardError::Write)?;
            }
        } else {
            let len = head.len();
            head.extend_from_slice(&buf[..n]);
            let written = dst.write_all(head).await;
            head.truncate(len);
            written.map_err(ForwardError::Write)?;
            head_written = true;
        }
        buf.advance(n);
        if done {
            dst.flush().await.map_err(ForwardError::Write)?;
            return Ok(());
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        if src.read_buf(buf).await.map_err(ForwardError::Read)? == 0 {
            scan.eof()?;
            dst.flush().await.map_err(ForwardError::Write)?;
            return Ok(());
        }
    }
}

/// A body read whole: its data (chunked framing removed) and, for a chunked
/// body, its trailer section as sent (the field lines and the final CRLF).
#[derive(Debug, PartialEq, Eq)]
pub struct Whole {
    pub data: Vec<u8>,
    pub trailers: Option<Vec<u8>>,
}

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum WholeError {
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("reading the body: {0}")]
    Read(std::io::Error),
    #[error("{0}")]
    Body(#[from] BodyError),
}

/// Reads a whole body framed by `framing` (`Length` or `Chunked`), whose first
/// bytes may be in `buf`; bytes after it stay in `buf`. Its data may be at most
/// `limit` bytes (a chunked body's framing and trailers at most as much again).
pub async fn read_whole<R>(
    src: &mut R,
    buf: &mut BytesMut,
    framing: Framing,
    limit: usize,
) -> Result<Whole, WholeError>
where
    R: AsyncRead + Unpin + ?Sized,
{
    if let Framing::Length(n) = framing {
        if n > limit as u64 {
            return Err(WholeError::TooLarge(limit));
        }
    }
    let raw_limit = limit.saturating_mul(2).saturating_add(MAX_TRAILERS);
    let mut scan = Scanner::new(framing);
    let mut raw = Vec::new();
    loop {
        let (n, done) = scan.scan(buf)?;
        if raw.len() + n > raw_limit {
            return Err(WholeError::TooLarge(limit));
        }
        raw.extend_from_slice(&buf[..n]);
        buf.advance(n);
        if done {
            break;
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        if src.read_buf(buf).await.map_err(WholeError::Read)? == 0 {
            scan.eof()?;
            break;
        }
    }
    if framing != Framing::Chunked {
        return Ok(Whole {
            data: raw,
            trailers: None,
        });
    }
    // The scanner accepted the framing; this takes the data out of it.
    let mut data = Vec::new();
    let mut i = 0;
    loop {
        let (used, size) = match httparse::parse_chunk_size(&raw[i..]) {
            Ok(httparse::Status::Complete(c)) => c,
            _ => return Err(BodyError::Chunked("a chunk size line").into()),
        };
        i += used;
        if size == 0 {
            break;
        }
        let size = usize::try_from(size).map_err(|_| WholeError::TooLarge(limit))?;
        let end = i.checked_add(size).filter(|e| *e + 2 <= raw.len());
        let Some(end) = end else {
            return Err(BodyError::Chunked("a chunk shorter than its size").into());
        };
        data.extend_from_slice(&raw[i..end]);
        if data.len() > limit {
            return Err(WholeError::TooLarge(limit));
        }
        i = end + 2;
    }
    Ok(Whole {
        data,
        trailers: Some(raw[i..].to_vec()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Scans `input` in pieces of `step` bytes; returns (bytes of the body, done).
    fn scan_in_steps(
        framing: Framing,
        input: &[u8],
        step: usize,
    ) -> Result<(usize, bool), BodyError> {
        let mut s = Scanner::new(framing);
        let mut total = 0;
        for piece in input.chunks(step) {
            let (n, done) = s.scan(piece)?;
            total += n;
            if done {
                return Ok((total, true));
            }
            assert_eq!(
                n,
                piece.len(),
                "a body that has not ended takes the whole piece"
            );
        }
        Ok((total, false))
    }

    #[test]
    fn chunked_bodies_end_where_their_last_chunk_and_trailers_end() {
        let cases: &[(&[u8], usize)] = &[
            (b"0\r\n\r\nGET", 5),
            (b"5\r\nhello\r\n0\r\n\r\n", 15),
            (b"5;name=value\r\nhello\r\n0\r\n\r\nx", 26),
            (b"A \r\n0123456789\r\n0\r\n\r\n", 21),
            (b"3\r\nabc\r\n0\r\nx-sum: 1\r\nx-b: 2\r\n\r\nNEXT", 31),
            (b"00000000000000f\r\n0123456789abcde\r\n0\r\n\r\n", 39),
        ];
        for (input, end) in cases {
            for step in [1, 2, 7, input.len()] {
                assert_eq!(
                    scan_in_steps(Framing::Chunked, input, step),
                    Ok((*end, true)),
                    "{} in steps of {step}",
                    String::from_utf8_lossy(input)
                );
            }
        }
        // Not ended yet.
        assert_eq!(
            scan_in_steps(Framing::Chunked, b"5\r\nhel", 2),
            Ok((6, false))
        );
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        for (input, why) in [
            (&b"\r\n"[..], "chunk size is not hexadecimal"),
            (b"x\r\n", "chunk size is not hexadecimal"),
            (b"-1\r\n", "chunk size is not hexadecimal"),
            (b"5\nhello\r\n", "invalid character after a chunk size"),
            (b"5\r\rhello\r\n", "chunk size line not ended by CRLF"),
            (b"5\r\nhelloX\r\n", "chunk data not followed by CRLF"),
            (b"5\r\nhello\n0\r\n\r\n", "chunk data not followed by CRLF"),
            (b"1000000000000000\r\n", "chunk size too large"),
            (b"5x\r\n", "invalid character after a chunk size"),
            (b"5 x\r\n", "invalid character after a chunk size"),
            (b"5;a\x00\r\n", "control character in a chunk extension"),
            (b"0\r\nx-a 1\r\n\r\n", "invalid trailer field name"),
            (b"0\r\n x: 1\r\n\r\n", "invalid trailer field name"),
            (b"0\r\nx-a\r\n\r\n", "trailer field without a colon"),
            (b"0\r\nx: 1\n\r\n", "trailer line not ended by CRLF"),
            (
                b"0\r\nx: \x01\r\n\r\n",
                "control character in a trailer field",
            ),
            (b"0\r\n\n", "trailer line not ended by CRLF"),
        ] {
            assert_eq!(
                scan_in_steps(Framing::Chunked, input, 1),
                Err(BodyError::Chunked(why)),
                "{}",
                String::from_utf8_lossy(input)
            );
        }
        let long = [b"1;".as_slice(), &[b'a'; MAX_CHUNK_LINE]].concat();
        assert_eq!(
            scan_in_steps(Framing::Chunked, &long, 100),
            Err(BodyError::Chunked("chunk line too long"))
        );
    }

    #[test]
    fn lengths_empty_and_until_close() {
        assert_eq!(
            scan_in_steps(Framing::Length(5), b"helloGET /", 3),
            Ok((5, true))
        );
        assert_eq!(scan_in_steps(Framing::Length(5), b"hel", 3), Ok((3, false)));
        assert_eq!(scan_in_steps(Framing::Empty, b"GET /", 3), Ok((0, true)));
        assert_eq!(
            scan_in_steps(Framing::UntilClose, b"abcdef", 4),
            Ok((6, false))
        );
        assert_eq!(
            Scanner::new(Framing::Length(1)).eof(),
            Err(BodyError::Truncated)
        );
        assert_eq!(
            Scanner::new(Framing::Chunked).eof(),
            Err(BodyError::Truncated)
        );
        assert_eq!(Scanner::new(Framing::UntilClose).eof(), Ok(()));
    }

    #[tokio::test]
    async fn forward_writes_head_and_body_and_leaves_the_rest() {
        let (mut client, mut src) = tokio::io::duplex(1024);
        let (mut dst, mut sink) = tokio::io::duplex(1024);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\n"[..]);
        client.write_all(b"0\r\n\r\nNEXT").await.unwrap();
        let mut head = b"HEAD\r\n".to_vec();
        forward(&mut src, &mut buf, &mut dst, &mut head, Framing::Chunked)
            .await
            .unwrap();
        assert_eq!(head, b"HEAD\r\n", "the head is given back as it came");
        assert_eq!(&buf[..], b"NEXT");
        drop(dst);
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"HEAD\r\n3\r\nabc\r\n0\r\n\r\n");
        // A body cut short is an error, after forwarding what was well formed.
        let (client, mut src) = tokio::io::duplex(1024);
        drop(client);
        let (mut dst, _sink) = tokio::io::duplex(1024);
        let mut buf = BytesMut::from(&b"ab"[..]);
        let r = forward(
            &mut src,
            &mut buf,
            &mut dst,
            &mut Vec::new(),
            Framing::Length(3),
        )
        .await;
        assert!(
            matches!(r, Err(ForwardError::Body(BodyError::Truncated))),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_body_malformed_in_its_first_bytes_forwards_nothing() {
        let (_client, mut src) = tokio::io::duplex(1024);
        let (mut dst, mut sink) = tokio::io::duplex(1024);
        let mut buf = BytesMut::from(&b"3\r\nabc\r\nzz\r\n"[..]);
        let mut head = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
        let r = forward(&mut src, &mut buf, &mut dst, &mut head, Framing::Chunked).await;
        assert!(matches!(r, Err(ForwardError::Unsent(_))), "{r:?}");
        drop(dst);
        let mut got = Vec::new();
        sink.read_to_end(&mut got).await.unwrap();
        assert!(
            got.is_empty(),
            "nothing written, not even the head: {got:?}"
        );
    }
}
