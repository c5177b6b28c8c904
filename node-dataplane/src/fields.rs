//! A message's fields (header lines) in the order they came, held in one buffer:
//! names in lower case and values back to back, each line two spans into it.
//!
//! This is the form the HTTP/1 proxy parses heads into and writes them from, and
//! the form plugins read and change: building it from a parsed head is one copy
//! of the head and one vector of spans (no hashing, no allocation per field), and
//! a field a plugin adds is appended to the buffer. Lookups are linear scans,
//! which for the dozen or so fields of a typical head are cheaper than hashing.
//! HTTP/2 requests (hyper's `http::HeaderMap`) are converted to and from this form
//! only when plugins run on them, and converted back only if a plugin changed them.
//!
//! Every name is a valid field name (RFC 9110 token) and every value a valid field
//! value (no control characters other than tab): parsed heads were checked by the
//! parser, and [`Fields::append`] and [`Fields::insert`] check what plugins add.

/// Why a field was not added: nothing was changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FieldError {
    #[error("not a valid field name or value")]
    Invalid,
    #[error("the fields would exceed {MAX_BYTES} bytes")]
    TooLarge,
}

/// Most bytes a message's fields may hold, replaced values included (plugins add
/// to the buffer; this bounds what a plugin can make the host hold).
pub const MAX_BYTES: usize = 1 << 20;

/// One field line: where its name and value are in the buffer.
#[derive(Debug, Clone, Copy)]
struct Line {
    name: u32,
    name_len: u32,
    value: u32,
    value_len: u32,
}

/// A message's fields; see the module documentation.
#[derive(Debug, Clone, Default)]
pub struct Fields {
    buf: Vec<u8>,
    lines: Vec<Line>,
    /// Changed since it was built (only then is a converted HTTP/2 map rebuilt).
    changed: bool,
}

/// RFC 9110 `tchar`, by byte.
const TCHAR: [bool; 256] = {
    let mut t = [false; 256];
    let mut i = 0;
    while i < 256 {
        let b = i as u8;
        t[i] = b.is_ascii_alphanumeric()
            || matches!(
                b,
                b'!' | b'#'
                    | b'$'
                    | b'%'
                    | b'&'
                    | b'\''
                    | b'*'
                    | b'+'
                    | b'-'
                    | b'.'
                    | b'^'
                    | b'_'
                    | b'`'
                    | b'|'
                    | b'~'
            );
        i += 1;
    }
    t
};

/// Room left in a parsed head's buffer for what plugins add, so adding a field or
/// two does not move it.
const SPARE: usize = 128;

/// A valid field name: one or more token characters.
pub fn valid_name(name: &[u8]) -> bool {
    !name.is_empty() && name.len() <= u16::MAX as usize && name.iter().all(|&b| TCHAR[b as usize])
}

/// A valid field value: no control characters but tab (the `http` crate's rule).
pub fn valid_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

impl Fields {
    #[cfg(any(test, feature = "testing"))]
    /// The fields httparse found in `head` (the slices in `parsed` point into it):
    /// one copy of the head, names lower-cased in place.
    pub fn from_head(head: &[u8], parsed: &[httparse::Header<'_>]) -> Self {
        Self::from_head_reusing(Self::default(), head, parsed)
    }

    /// [`Fields::from_head`] in the buffers of `old` (a previous message's fields,
    /// whose content is dropped), so a connection's heads need no allocation once
    /// its buffers have grown to fit.
    pub fn from_head_reusing(old: Fields, head: &[u8], parsed: &[httparse::Header<'_>]) -> Self {
        let Fields {
            mut buf, mut lines, ..
        } = old;
        buf.clear();
        lines.clear();
        buf.reserve(head.len() + SPARE);
        buf.extend_from_slice(head);
        lines.reserve(parsed.len() + 2);
        for h in parsed {
            let s = Span::of(head, h);
            buf[s.name..s.name + s.name_len].make_ascii_lowercase();
            lines.push(Line {
                name: s.name as u32,
                name_len: s.name_len as u32,
                value: s.value as u32,
                value_len: s.value_len as u32,
            });
        }
        Self {
            buf,
            lines,
            changed: false,
        }
    }

    /// Most bytes of buffer a connection keeps between messages for
    /// [`Fields::from_head_reusing`]; larger ones (a plugin grew them) are dropped.
    pub const KEPT: usize = 16 * 1024;

    /// These fields' buffers, to reuse for the next message's, unless either holds
    /// more than [`Fields::KEPT`] bytes (then empty ones).
    pub fn into_spare(self) -> Fields {
        let lines = self.lines.capacity() * std::mem::size_of::<Line>();
        if self.buf.capacity() > Self::KEPT || lines > Self::KEPT {
            return Fields::default();
        }
        self
    }

    /// A copy of an `http::HeaderMap`'s fields, in its order.
    pub fn from_map(map: &http::HeaderMap) -> Self {
        let mut f = Self {
            buf: Vec::with_capacity(map.len() * 32),
            lines: Vec::with_capacity(map.len() + 2),
            changed: false,
        };
        for (k, v) in map {
            f.push(k.as_str().as_bytes(), v.as_bytes());
        }
        f
    }

    /// The fields as an `http::HeaderMap`.
    pub fn to_map(&self) -> http::HeaderMap {
        let mut map = http::HeaderMap::with_capacity(self.lines.len());
        for (k, v) in self.iter() {
            // Both were checked on the way in; nothing is skipped.
            if let (Ok(k), Ok(v)) = (
                http::HeaderName::from_bytes(k),
                http::HeaderValue::from_bytes(v),
            ) {
                map.append(k, v);
            }
        }
        map
    }

    /// Has anything been added, replaced or removed since it was built?
    pub fn changed(&self) -> bool {
        self.changed
    }

    /// Number of field lines.
    pub fn len(&self) -> usize {
        self.lines.len()
    }

    #[cfg(any(test, feature = "testing", feature = "fuzzing"))]
    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    fn name(&self, l: &Line) -> &[u8] {
        name_of(&self.buf, l)
    }

    fn value(&self, l: &Line) -> &[u8] {
        &self.buf[l.value as usize..(l.value + l.value_len) as usize]
    }

    /// Every (lower-case name, value), in order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> + '_ {
        self.lines.iter().map(|l| (self.name(l), self.value(l)))
    }

    /// Every value of `name` (any case), in order.
    pub fn get_all<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> + 'a {
        self.iter()
            .filter(move |(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// The first value of `name` (any case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Appends a line without checking it (its name is lower-cased).
    fn push(&mut self, name: &[u8], value: &[u8]) {
        let at = self.buf.len() as u32;
        self.buf.extend_from_slice(name);
        self.buf[at as usize..].make_ascii_lowercase();
        self.buf.extend_from_slice(value);
        self.lines.push(Line {
            name: at,
            name_len: name.len() as u32,
            value: at + name.len() as u32,
            value_len: value.len() as u32,
        });
    }

    /// Checks a field a plugin adds.
    fn check(&self, name: &[u8], value: &[u8]) -> Result<(), FieldError> {
        if !valid_name(name) || !valid_value(value) {
            return Err(FieldError::Invalid);
        }
        if self.buf.len() + name.len() + value.len() > MAX_BYTES {
            return Err(FieldError::TooLarge);
        }
        Ok(())
    }

    /// Appends a field (its name in lower case).
    pub fn append(&mut self, name: &[u8], value: &[u8]) -> Result<(), FieldError> {
        self.check(name, value)?;
        self.push(name, value);
        self.changed = true;
        Ok(())
    }

    /// Sets `name` to `value`: the first line of `name` takes the value (keeping its
    /// place) and the others are removed; appended if there was none.
    pub fn insert(&mut self, name: &[u8], value: &[u8]) -> Result<(), FieldError> {
        self.check(name, value)?;
        let first = self
            .lines
            .iter()
            .position(|l| self.name(l).eq_ignore_ascii_case(name));
        let Some(first) = first else {
            self.push(name, value);
            self.changed = true;
            return Ok(());
        };
        let at = self.buf.len() as u32;
        self.buf.extend_from_slice(value);
        self.lines[first].value = at;
        self.lines[first].value_len = value.len() as u32;
        let mut i = 0;
        let buf = &self.buf;
        self.lines.retain(|l| {
            let keep = i <= first || !name_of(buf, l).eq_ignore_ascii_case(name);
            i += 1;
            keep
        });
        self.changed = true;
        Ok(())
    }

    /// Removes every line of `name` (any case); the others keep their order.
    pub fn remove(&mut self, name: &[u8]) {
        let buf = &self.buf;
        let before = self.lines.len();
        self.lines
            .retain(|l| !name_of(buf, l).eq_ignore_ascii_case(name));
        self.changed |= self.lines.len() != before;
    }

    /// Replaces every line with `other`'s.
    pub fn replace_all(&mut self, other: Fields) {
        *self = other;
        self.changed = true;
    }

    /// Writes every field line (`name: value` CRLF).
    pub fn write(&self, out: &mut Vec<u8>) {
        let spans = self.lines.iter().map(|l| Span {
            name: l.name as usize,
            name_len: l.name_len as usize,
            value: l.value as usize,
            value_len: l.value_len as usize,
        });
        write_spans(&self.buf, spans, out);
    }
}

/// Where a field line's name and value are in a buffer.
pub struct Span {
    pub name: usize,
    pub name_len: usize,
    pub value: usize,
    pub value_len: usize,
}

impl Span {
    /// Where the field `h` that httparse found in `head` is (its slices point into it).
    pub fn of(head: &[u8], h: &httparse::Header<'_>) -> Self {
        let base = head.as_ptr() as usize;
        Span {
            name: h.name.as_ptr() as usize - base,
            name_len: h.name.len(),
            value: h.value.as_ptr() as usize - base,
            value_len: h.value.len(),
        }
    }
}

/// Writes the field lines whose names and values are `spans` of `buf`, as
/// [`write_line`] would one by one. Lines already in that form in `buf` (name,
/// `": "`, value, CRLF) and back to back, as most received heads' are, are copied
/// as one run: the bytes copied are exactly those [`write_line`] would write.
pub fn write_spans(buf: &[u8], spans: impl Iterator<Item = Span>, out: &mut Vec<u8>) {
    // The run of canonical lines not yet written, as a range of `buf`.
    let mut run = 0..0;
    for s in spans {
        let (name_end, value_end) = (s.name + s.name_len, s.value + s.value_len);
        let canonical = s.value == name_end + 2
            && buf.get(name_end..s.value) == Some(b": ")
            && buf.get(value_end..value_end + 2) == Some(b"\r\n");
        if canonical && run.end == s.name && !run.is_empty() {
            run.end = value_end + 2;
            continue;
        }
        out.extend_from_slice(&buf[run]);
        if canonical {
            run = s.name..value_end + 2;
        } else {
            run = 0..0;
            write_line(&buf[s.name..name_end], &buf[s.value..value_end], out);
        }
    }
    out.extend_from_slice(&buf[run]);
}

/// A line's name in `buf` (a free function, for closures that borrow the lines).
fn name_of<'a>(buf: &'a [u8], l: &Line) -> &'a [u8] {
    &buf[l.name as usize..(l.name + l.name_len) as usize]
}

/// One field line.
pub fn write_line(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::mem::MaybeUninit;

    fn parsed(head: &[u8]) -> Fields {
        let mut storage = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; 16];
        let mut r = httparse::Request::new(&mut []);
        let n = httparse::ParserConfig::default()
            .parse_request_with_uninit_headers(&mut r, head, &mut storage)
            .unwrap();
        assert!(n.is_complete());
        Fields::from_head(head, r.headers)
    }

    fn lines(f: &Fields) -> Vec<(String, String)> {
        text(f.iter())
    }

    /// Byte pairs (fields, or a plugin's view of headers) as text, to compare.
    pub(crate) fn text<'a>(
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Vec<(String, String)> {
        pairs
            .map(|(k, v)| {
                (
                    String::from_utf8(k.to_vec()).unwrap(),
                    String::from_utf8(v.to_vec()).unwrap(),
                )
            })
            .collect()
    }

    /// Pairs of text, owned, to compare with [`text`].
    pub(crate) fn owned(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const HEAD: &[u8] = b"GET / HTTP/1.1\r\nHost: svc\r\nX-A: 1\r\nAccept: */*\r\nx-a: 2\r\n\r\n";

    /// Writing copies runs of lines already in canonical form; whatever the head
    /// looked like and whatever was changed, the output is each line written out.
    #[test]
    fn writing_is_line_by_line_whatever_was_copied_whole() {
        let line_by_line = |f: &Fields| {
            let mut out = Vec::new();
            for (k, v) in f.iter() {
                write_line(k, v, &mut out);
            }
            out
        };
        let heads: [&[u8]; 5] = [
            HEAD,
            b"GET / HTTP/1.1\nHost: svc\nX-A:1\r\nB:  2 \r\nC: 3\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: svc\r\nE:\r\nF: \r\nG: g\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost:svc\r\n\r\n",
            b"GET / HTTP/1.1\r\n\r\n",
        ];
        type Change = fn(&mut Fields);
        let changes: [Change; 6] = [
            |_| {},
            |f| f.remove(b"x-a"),
            |f| f.insert(b"host", b"other").unwrap(),
            |f| f.append(b"x-new", b"v").unwrap(),
            |f| f.insert(b"x-new", b": ").unwrap(),
            |f| {
                f.remove(b"host");
                f.append(b"host", b"again").unwrap();
                f.insert(b"c", b"").unwrap();
            },
        ];
        let mut copied_whole = 0;
        for head in heads {
            for change in changes {
                let mut f = parsed(head);
                change(&mut f);
                let mut out = Vec::new();
                f.write(&mut out);
                let want = line_by_line(&f);
                assert_eq!(
                    String::from_utf8_lossy(&out),
                    String::from_utf8_lossy(&want),
                    "{}",
                    String::from_utf8_lossy(head)
                );
                // Inputs where every line was already canonical (names aside).
                let lower = head.to_ascii_lowercase();
                let whole =
                    !want.is_empty() && lower.windows(want.len()).any(|w| w == want.as_slice());
                copied_whole += usize::from(whole);
            }
        }
        assert!(copied_whole >= 1, "{copied_whole}");
    }

    #[test]
    fn a_parsed_head_keeps_its_order_with_names_in_lower_case() {
        let f = parsed(HEAD);
        assert_eq!(
            lines(&f),
            owned(&[
                ("host", "svc"),
                ("x-a", "1"),
                ("accept", "*/*"),
                ("x-a", "2")
            ])
        );
        assert_eq!(f.get(b"X-a"), Some(&b"1"[..]));
        assert_eq!(f.get_all(b"x-a").collect::<Vec<_>>(), [b"1", b"2"]);
        assert_eq!(f.get(b"x-none"), None);
        assert!(!f.changed());
        let mut out = Vec::new();
        f.write(&mut out);
        assert_eq!(out, b"host: svc\r\nx-a: 1\r\naccept: */*\r\nx-a: 2\r\n");
    }

    #[test]
    fn changes_keep_the_order_of_the_other_lines() {
        let mut f = parsed(HEAD);
        f.append(b"X-New", b"v").unwrap();
        assert!(f.changed());
        f.insert(b"x-A", b"3").unwrap();
        assert_eq!(
            lines(&f),
            owned(&[
                ("host", "svc"),
                ("x-a", "3"),
                ("accept", "*/*"),
                ("x-new", "v")
            ])
        );
        f.insert(b"x-other", b"o").unwrap();
        f.remove(b"HOST");
        f.remove(b"absent");
        assert_eq!(
            lines(&f),
            owned(&[
                ("x-a", "3"),
                ("accept", "*/*"),
                ("x-new", "v"),
                ("x-other", "o")
            ])
        );
    }

    #[test]
    fn invalid_names_and_values_are_refused_and_change_nothing() {
        let mut f = parsed(HEAD);
        for (k, v) in [
            (&b""[..], &b"v"[..]),
            (b"bad name", b"v"),
            (b"a:b", b"v"),
            (b"\xc3\xa9", b"v"),
            (b"ok", b"line\nbreak"),
            (b"ok", b"cr\r"),
            (b"ok", b"nul\0"),
            (b"ok", b"del\x7f"),
        ] {
            assert_eq!(f.append(k, v), Err(FieldError::Invalid), "{k:?} {v:?}");
            assert_eq!(f.insert(k, v), Err(FieldError::Invalid), "{k:?} {v:?}");
        }
        assert!(!f.changed());
        assert_eq!(f.len(), 4);
        // Tabs, obs-text and an empty value are valid.
        f.append(b"x-t", b"a\tb \xff").unwrap();
        f.append(b"x-e", b"").unwrap();
        assert_eq!(f.len(), 6);
    }

    #[test]
    fn the_buffer_is_bounded_replaced_values_included() {
        let mut f = parsed(HEAD);
        let big = vec![b'v'; MAX_BYTES / 4];
        for _ in 0..3 {
            f.insert(b"x-big", &big).unwrap();
        }
        // One line, but the replaced values still count.
        assert_eq!(f.get_all(b"x-big").count(), 1);
        assert_eq!(f.insert(b"x-big", &big), Err(FieldError::TooLarge));
        assert_eq!(f.append(b"x-other", &big), Err(FieldError::TooLarge));
        f.append(b"x-small", b"1").unwrap();
        assert_eq!(f.get(b"x-big").map(<[u8]>::len), Some(MAX_BYTES / 4));
    }

    #[test]
    fn converts_to_and_from_a_header_map() {
        let mut map = http::HeaderMap::new();
        map.append("x-a", "1".parse().unwrap());
        map.append("x-a", "2".parse().unwrap());
        map.append("host", "svc".parse().unwrap());
        let mut f = Fields::from_map(&map);
        assert_eq!(
            lines(&f),
            owned(&[("x-a", "1"), ("x-a", "2"), ("host", "svc")])
        );
        assert_eq!(f.to_map(), map);
        f.append(b"X-B", b"\xff").unwrap();
        let back = f.to_map();
        assert_eq!(back.len(), 4);
        assert_eq!(back["x-b"].as_bytes(), b"\xff");
    }
}
