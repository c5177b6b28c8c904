//! HTTP path normalization before policy matching, so that `/admin` cannot be
//! reached as `/./admin`, `//admin`, `/%61dmin` or `/x/../admin`.
//!
//! Steps, in order (RFC 3986 section 6.2.2 plus slash merging):
//! 1. the query (`?...`) and fragment (`#...`) are split off; policies match the path only;
//! 2. percent-encoded *unreserved* characters (`A-Z a-z 0-9 - . _ ~`) are decoded; other
//!    escapes are kept, with upper-case hex digits (`%2f` -> `%2F`), so an encoded slash
//!    is never turned into a path separator;
//! 3. runs of `/` are merged into one;
//! 4. `.` and `..` segments are resolved (`..` above the root stays at the root).
//!
//! A path that is not origin-form (does not start with `/`, e.g. `*` for `OPTIONS *`)
//! is returned unchanged. Malformed escapes (`%zz`, a trailing `%`) and control bytes
//! are errors: such a request is refused rather than guessed at.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum PathError {
    #[error("malformed percent-encoding at byte {0}")]
    BadEscape(usize),
    #[error("control character in path at byte {0}")]
    Control(usize),
}

/// A normalized request target: the path to match and the query to forward.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NormalizedPath {
    pub path: String,
    /// Including the leading `?`, or empty.
    pub query: String,
}

impl NormalizedPath {
    /// Path and query, as forwarded to the application.
    pub fn path_and_query(&self) -> String {
        let mut s = String::with_capacity(self.path.len() + self.query.len());
        s.push_str(&self.path);
        s.push_str(&self.query);
        s
    }

    /// Is `target` exactly this path and query (nothing was normalized)?
    pub fn is(&self, target: &str) -> bool {
        target.len() == self.path.len() + self.query.len()
            && target.starts_with(&self.path)
            && target.ends_with(&self.query)
    }
}

/// Is an origin-form path already normal: no escapes, no control bytes, no empty,
/// `.` or `..` segments (a trailing `/` is kept as is)? Most requests' are, and
/// they skip the general algorithm, which would return them unchanged.
fn already_normal(raw: &str) -> bool {
    let b = raw.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    // One pass; `seg` is where the current segment starts (just after its `/`).
    let mut seg = 1;
    for i in 1..=b.len() {
        let c = b.get(i).copied();
        match c {
            Some(b'%') => return false,
            Some(c) if c < 0x20 || c == 0x7f => return false,
            Some(b'/') | None => {
                let s = &b[seg..i];
                // Only the last segment may be empty (`/` or a trailing slash).
                if s == b"." || s == b".." || (s.is_empty() && c.is_some()) {
                    return false;
                }
                seg = i + 1;
            }
            _ => {}
        }
    }
    true
}

/// Splits a request target into its path and its query (with the `?`), dropping a
/// fragment: the first `?` or `#` ends the path, and a `#` ends the query.
fn split_target(target: &str) -> (&str, &str) {
    let b = target.as_bytes();
    let Some(p) = b.iter().position(|&c| c == b'?' || c == b'#') else {
        return (target, "");
    };
    if b[p] == b'#' {
        return (&target[..p], "");
    }
    let q = b[p..]
        .iter()
        .position(|&c| c == b'#')
        .map_or(b.len(), |q| p + q);
    (&target[..p], &target[p..q])
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

fn hex(b: u8) -> Option<u8> {
    (b as char).to_digit(16).map(|d| d as u8)
}

/// Normalizes a request target (`/a/b?q`).
pub fn normalize(target: &str) -> Result<NormalizedPath, PathError> {
    Ok(normalize_if_needed(target)?.unwrap_or_else(|| {
        let (path, query) = split_target(target);
        NormalizedPath {
            path: path.to_string(),
            query: query.to_string(),
        }
    }))
}

/// [`normalize`] without building anything for a target that normalization leaves
/// as it is (most are): `None` then, and the path to match is [`path_of`] the
/// target, the query the rest of it. The request path does not allocate for them.
pub fn normalize_if_needed(target: &str) -> Result<Option<NormalizedPath>, PathError> {
    let (raw, query) = split_target(target);
    if !raw.starts_with('/') || already_normal(raw) {
        // A dropped fragment still changes the target.
        if raw.len() + query.len() == target.len() {
            return Ok(None);
        }
        return Ok(Some(NormalizedPath {
            path: raw.to_string(),
            query: query.to_string(),
        }));
    }
    normalize_origin_form(raw, query).map(Some)
}

/// The path of a request target: what comes before its query or fragment.
pub fn path_of(target: &str) -> &str {
    split_target(target).0
}

/// The general algorithm for an origin-form path (steps 2-4).
fn normalize_origin_form(raw: &str, query: &str) -> Result<NormalizedPath, PathError> {
    // 2. Decode unreserved escapes; canonicalize the others.
    let bytes = raw.as_bytes();
    let mut decoded = String::with_capacity(raw.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b < 0x20 || b == 0x7f {
            return Err(PathError::Control(i));
        }
        if b == b'%' {
            let (h, l) = match (bytes.get(i + 1), bytes.get(i + 2)) {
                (Some(&h), Some(&l)) => (hex(h), hex(l)),
                _ => return Err(PathError::BadEscape(i)),
            };
            let (Some(h), Some(l)) = (h, l) else {
                return Err(PathError::BadEscape(i));
            };
            let v = h * 16 + l;
            if unreserved(v) {
                decoded.push(v as char);
            } else {
                decoded.push_str(&format!("%{v:02X}"));
            }
            i += 3;
            continue;
        }
        // Non-ASCII bytes are kept as they came (the target is a &str: valid UTF-8).
        let ch_len = utf8_len(b);
        decoded.push_str(&raw[i..i + ch_len]);
        i += ch_len;
    }
    // 3 + 4. Merge slashes and resolve dot segments.
    let trailing = decoded.ends_with('/')
        || decoded.ends_with("/.")
        || decoded.ends_with("/..")
        || decoded == "/";
    let mut out: Vec<&str> = Vec::new();
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
    }
    let mut path = String::with_capacity(decoded.len());
    for s in &out {
        path.push('/');
        path.push_str(s);
    }
    if path.is_empty() || (trailing && !path.ends_with('/')) {
        path.push('/');
    }
    Ok(NormalizedPath {
        path,
        query: query.to_string(),
    })
}

fn utf8_len(first: u8) -> usize {
    match first {
        0x00..=0x7f => 1,
        0xc0..=0xdf => 2,
        0xe0..=0xef => 3,
        _ => 4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> String {
        normalize(s).unwrap().path
    }

    #[test]
    fn bypass_attempts_collapse_to_the_canonical_path() {
        for attempt in [
            "/admin",
            "/./admin",
            "//admin",
            "///admin",
            "/%61dmin",
            "/%61%64%6D%69%6e",
            "/x/../admin",
            "/x/y/../../admin",
            "/../admin",
            "/./x/./../admin",
            "/admin?x=1",
            "/admin#frag",
        ] {
            assert_eq!(n(attempt), "/admin", "{attempt}");
        }
    }

    #[test]
    fn keeps_what_it_must_not_decode() {
        // An encoded slash is not a separator, and its hex is canonicalized.
        assert_eq!(n("/admin%2fsecret"), "/admin%2Fsecret");
        assert_eq!(n("/a%20b"), "/a%20b");
        assert_eq!(n("/a/b/"), "/a/b/");
        assert_eq!(n("/a/b/."), "/a/b/");
        assert_eq!(n("/a/b/.."), "/a/");
        assert_eq!(n("/"), "/");
        assert_eq!(n("/.."), "/");
        assert_eq!(n("/caf\u{e9}"), "/caf\u{e9}");
        assert_eq!(n("*"), "*");
    }

    #[test]
    fn query_is_kept_for_forwarding() {
        let p = normalize("//a/./b?x=/../y#f").unwrap();
        assert_eq!(p.path, "/a/b");
        assert_eq!(p.query, "?x=/../y");
        assert_eq!(p.path_and_query(), "/a/b?x=/../y");
    }

    #[test]
    fn the_fast_path_agrees_with_the_general_algorithm() {
        // Every path of up to 7 characters over an alphabet that makes escapes,
        // dot segments and slash runs: where the fast path answers, the general
        // algorithm must give the same path.
        let alphabet = [b'/', b'.', b'a', b'%', b'6', b'1'];
        let mut fast = 0;
        for len in 1..=7u32 {
            for mut k in 0..alphabet.len().pow(len) {
                let mut raw = vec![b'/'];
                for _ in 0..len {
                    raw.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                let raw = String::from_utf8(raw).unwrap();
                if already_normal(&raw) {
                    fast += 1;
                    let general = normalize_origin_form(&raw, "").unwrap();
                    assert_eq!(general.path, raw, "{raw}");
                }
            }
        }
        assert!(fast > 1000, "the fast path was taken {fast} times");
        for p in ["/", "/a", "/a/", "/api/items", "/a.b/c..d/.e"] {
            assert!(already_normal(p), "{p}");
        }
        for p in ["//", "/./a", "/a/..", "/a//b", "/%61", "/a\u{1}"] {
            assert!(!already_normal(p), "{p}");
        }
    }

    #[test]
    fn the_target_splits_at_the_first_query_or_fragment_mark() {
        // Against the definition: drop the fragment (from the first `#`), then the
        // query starts at the first `?` of what is left. Every target of up to 6
        // characters over `/ ? # a`.
        let reference = |t: &str| {
            let rest = t.split_once('#').map_or(t, |(r, _)| r);
            match rest.find('?') {
                Some(i) => (rest[..i].to_string(), rest[i..].to_string()),
                None => (rest.to_string(), String::new()),
            }
        };
        let alphabet = ['/', '?', '#', 'a'];
        for len in 0..=6u32 {
            for mut k in 0..alphabet.len().pow(len) {
                let mut t = String::new();
                for _ in 0..len {
                    t.push(alphabet[k % alphabet.len()]);
                    k /= alphabet.len();
                }
                let (p, q) = split_target(&t);
                assert_eq!((p.to_string(), q.to_string()), reference(&t), "{t:?}");
            }
        }
        assert_eq!(split_target("/a?x=1#f?y"), ("/a", "?x=1"));
        assert_eq!(split_target("/a#f?y"), ("/a", ""));
    }

    #[test]
    fn is_compares_path_and_query_without_building_them() {
        let p = normalize("/a/b?x=1").unwrap();
        assert!(p.is("/a/b?x=1"));
        assert!(!p.is("/a/b?x=2"));
        assert!(!normalize("//a/b?x=1").unwrap().is("//a/b?x=1"));
    }

    #[test]
    fn only_targets_that_change_are_built() {
        for t in ["/a/b?x=1", "/", "/a/", "*", "/a?x=/../y", "/caf\u{e9}?q"] {
            assert_eq!(normalize_if_needed(t), Ok(None), "{t}");
            assert!(normalize(t).unwrap().is(t), "{t}");
            assert_eq!(path_of(t), normalize(t).unwrap().path, "{t}");
        }
        for (t, want) in [
            ("//a?x=1", "/a?x=1"),
            ("/a#f", "/a"),
            ("/a?x#f", "/a?x"),
            ("/%61", "/a"),
            ("*#f", "*"),
        ] {
            let n = normalize_if_needed(t).unwrap().unwrap();
            assert_eq!(n.path_and_query(), want, "{t}");
            assert_eq!(n, normalize(t).unwrap(), "{t}");
        }
        assert_eq!(normalize_if_needed("/a%zz"), Err(PathError::BadEscape(2)));
    }

    #[test]
    fn malformed_targets_are_errors() {
        assert_eq!(normalize("/a%zz"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a%2"), Err(PathError::BadEscape(2)));
        assert_eq!(normalize("/a\u{1}"), Err(PathError::Control(2)));
    }
}
