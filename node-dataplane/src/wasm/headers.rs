//! A message's headers as plugins see them: its pseudo-headers first (`:method`,
//! `:path`, `:authority`, `:scheme` for a request, `:status` for a response), then
//! its fields.
//!
//! The fields are the message's own [`Fields`] (an HTTP/1 message's, or a copy of
//! an HTTP/2 message's map), moved in while its plugins run and moved back after,
//! so a plugin reads and changes the message itself and nothing is copied unless
//! it asks for it. Names are matched case-insensitively and stored in lower case;
//! fields keep their order, also when one is replaced or removed. A change that would not be a valid
//! HTTP field, or that would add, remove or invent a pseudo-header, is refused
//! and leaves the headers as they were.

use crate::fields::{valid_value, Fields};
use std::borrow::Cow;

/// Why a plugin's change to a header map was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not a valid field name or value, or a pseudo-header this message lacks.
    Invalid,
    /// A pseudo-header can only be replaced: not added a second time or removed.
    Pseudo,
}

/// A message's pseudo-headers and fields; see the module documentation.
#[derive(Debug, Default)]
pub struct Headers {
    pseudo: Pseudo,
    /// The message's fields.
    pub fields: Fields,
}

/// A message's pseudo-headers, in place (a request has four, a response one).
#[derive(Debug, Clone, Default)]
struct Pseudo {
    entries: [(&'static str, Cow<'static, str>); 4],
    len: usize,
}

impl Pseudo {
    /// Where the pseudo-header `name` (any case) is.
    fn position(&self, name: &[u8]) -> Option<usize> {
        // Plugins almost always ask in lower case, as the names are kept.
        let exact = self.iter().position(|(k, _)| k.as_bytes() == name);
        exact.or_else(|| {
            self.iter()
                .position(|(k, _)| k.as_bytes().eq_ignore_ascii_case(name))
        })
    }
}

impl std::ops::Deref for Pseudo {
    type Target = [(&'static str, Cow<'static, str>)];
    fn deref(&self) -> &Self::Target {
        &self.entries[..self.len]
    }
}

impl std::ops::DerefMut for Pseudo {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.entries[..self.len]
    }
}

/// The pseudo-header names a request or response has, in the order plugins see them.
const REQUEST_PSEUDO: [&str; 4] = [":method", ":path", ":authority", ":scheme"];

impl Headers {
    #[cfg(any(test, feature = "testing"))]
    /// A request's headers.
    pub fn request(
        method: &http::Method,
        path: &str,
        authority: &str,
        scheme: &str,
        fields: Fields,
    ) -> Self {
        let mut h = Self {
            fields,
            ..Self::default()
        };
        h.set_request(method, path, authority, scheme);
        h
    }

    /// Makes these the pseudo-headers of a request, as [`Headers::request`] does,
    /// in the buffers an earlier request's values left (a connection's requests
    /// reuse one set of headers). The fields are left as they are.
    pub fn set_request(
        &mut self,
        method: &http::Method,
        path: &str,
        authority: &str,
        scheme: &str,
    ) {
        let [(mk, mv), (pk, pv), (ak, av), (sk, sv)] = &mut self.pseudo.entries;
        [*mk, *pk, *ak, *sk] = REQUEST_PSEUDO;
        // The path and authority vary from request to request, so they keep buffers;
        // the method and scheme are usually one of a few constants.
        set_value(mv, method.as_str(), false);
        set_value(pv, path, true);
        set_value(av, authority, true);
        set_value(sv, scheme, false);
        self.pseudo.len = 4;
    }

    /// Bytes held by the pseudo-headers' own buffers (kept by [`Headers::set_request`]).
    pub fn pseudo_capacity(&self) -> usize {
        let owned = |v: &Cow<'static, str>| match v {
            Cow::Owned(s) => s.capacity(),
            Cow::Borrowed(_) => 0,
        };
        self.pseudo.entries.iter().map(|(_, v)| owned(v)).sum()
    }

    #[cfg(any(test, feature = "testing"))]
    /// A response's headers.
    pub fn response(status: u16, fields: Fields) -> Self {
        let mut h = Self::default();
        h.set_response(status, fields);
        h
    }

    /// Makes these a response's headers, as [`Headers::response`] does, in place.
    pub fn set_response(&mut self, status: u16, fields: Fields) {
        self.pseudo.entries[0] = (":status", status_text(status));
        self.pseudo.len = 1;
        self.fields = fields;
    }

    /// Empties these headers: no pseudo-header, no field (until the next
    /// [`Headers::set_request`] or [`Headers::set_response`]).
    pub fn clear(&mut self) {
        self.pseudo.len = 0;
        self.fields = Fields::default();
    }

    /// Hands the fields back to the message.
    pub fn take_fields(&mut self) -> Fields {
        std::mem::take(&mut self.fields)
    }

    /// Number of entries, pseudo-headers included (each value of a field counts).
    pub fn len(&self) -> usize {
        self.pseudo.len() + self.fields.len()
    }

    #[cfg(any(test, feature = "testing"))]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A pseudo-header's value.
    pub fn pseudo(&self, name: &str) -> Option<&str> {
        self.pseudo
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_ref())
    }

    fn pseudo_slot(&mut self, name: &[u8]) -> Option<(&'static str, &mut Cow<'static, str>)> {
        let i = self.pseudo.position(name)?;
        let (k, v) = &mut self.pseudo[i];
        Some((*k, v))
    }

    /// The first value of `name` (any case).
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        if name.first() == Some(&b':') {
            let i = self.pseudo.position(name)?;
            return Some(self.pseudo[i].1.as_bytes());
        }
        self.fields.get(name)
    }

    /// Every entry, pseudo-headers first.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let pseudo = self
            .pseudo
            .iter()
            .map(|(k, v)| (k.as_bytes(), v.as_bytes()));
        pseudo.chain(self.fields.iter())
    }

    /// Appends a field value.
    pub fn add(&mut self, name: &[u8], value: &[u8]) -> Result<(), Refused> {
        if name.first() == Some(&b':') {
            return Err(Refused::Pseudo);
        }
        self.fields
            .append(name, value)
            .map_err(|_| Refused::Invalid)
    }

    /// Sets `name` to `value`, replacing every value it had.
    pub fn replace(&mut self, name: &[u8], value: &[u8]) -> Result<(), Refused> {
        if name.first() == Some(&b':') {
            let (name, slot) = self.pseudo_slot(name).ok_or(Refused::Invalid)?;
            *slot = Cow::Owned(pseudo_value(name, value)?);
            return Ok(());
        }
        self.fields
            .insert(name, value)
            .map_err(|_| Refused::Invalid)
    }

    /// Removes every value of a field.
    pub fn remove(&mut self, name: &[u8]) -> Result<(), Refused> {
        if name.first() == Some(&b':') {
            return Err(Refused::Pseudo);
        }
        self.fields.remove(name);
        Ok(())
    }

    /// Replaces the whole map: fields become exactly `pairs`' fields; each pseudo-header
    /// in `pairs` replaces this message's, and pseudo-headers `pairs` leaves out keep
    /// their values (a message cannot lose its path or status). Nothing changes if
    /// any pair is refused.
    pub fn set_pairs<'a>(
        &mut self,
        pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    ) -> Result<(), Refused> {
        let mut fields = Fields::default();
        let mut pseudo = self.pseudo.clone();
        for (k, v) in pairs {
            if k.first() == Some(&b':') {
                let i = pseudo.position(k).ok_or(Refused::Invalid)?;
                let slot = &mut pseudo[i];
                slot.1 = Cow::Owned(pseudo_value(slot.0, v)?);
            } else {
                fields.append(k, v).map_err(|_| Refused::Invalid)?;
            }
        }
        self.pseudo = pseudo;
        self.fields.replace_all(fields);
        Ok(())
    }

    /// Length of [`Headers::serialize`]'s output.
    pub fn serialized_len(&self) -> usize {
        serialized_len(self.iter())
    }

    /// The Proxy-Wasm map format of every entry.
    pub fn serialize(&self, out: &mut Vec<u8>) {
        serialize(|| self.iter(), out)
    }
}

/// A status code's text: a constant for the common ones.
fn status_text(status: u16) -> Cow<'static, str> {
    match status {
        200 => Cow::Borrowed("200"),
        204 => Cow::Borrowed("204"),
        301 => Cow::Borrowed("301"),
        302 => Cow::Borrowed("302"),
        304 => Cow::Borrowed("304"),
        400 => Cow::Borrowed("400"),
        403 => Cow::Borrowed("403"),
        404 => Cow::Borrowed("404"),
        500 => Cow::Borrowed("500"),
        503 => Cow::Borrowed("503"),
        s => Cow::Owned(s.to_string()),
    }
}

/// Sets a pseudo-header's value: kept in its own buffer (reused) when `owned` or
/// when it already has one; a constant otherwise (the method and scheme are
/// usually one of a few).
fn set_value(slot: &mut Cow<'static, str>, value: &str, owned: bool) {
    match slot {
        // The same constant as the last request's (its method, its scheme).
        Cow::Borrowed(b) if *b == value => {}
        Cow::Owned(s) => {
            s.clear();
            s.push_str(value);
        }
        _ if owned => *slot = Cow::Owned(value.to_string()),
        _ => {
            *slot = match value {
                "GET" => Cow::Borrowed("GET"),
                "POST" => Cow::Borrowed("POST"),
                "PUT" => Cow::Borrowed("PUT"),
                "DELETE" => Cow::Borrowed("DELETE"),
                "HEAD" => Cow::Borrowed("HEAD"),
                "http" => Cow::Borrowed("http"),
                "https" => Cow::Borrowed("https"),
                v => Cow::Owned(v.to_string()),
            }
        }
    }
}

/// A new value for the pseudo-header `name`: the rule of a field value (no control
/// characters), UTF-8, and for `:status` a final status, 200-599.
fn pseudo_value(name: &str, value: &[u8]) -> Result<String, Refused> {
    if !valid_value(value) {
        return Err(Refused::Invalid);
    }
    let value = String::from_utf8(value.to_vec()).map_err(|_| Refused::Invalid)?;
    if name == ":status" && !matches!(value.parse::<u16>(), Ok(200..=599)) {
        return Err(Refused::Invalid);
    }
    Ok(value)
}

/// Length of the Proxy-Wasm map format of `pairs`: `u32 count`, then `u32 key_len,
/// u32 value_len` per pair, then `key\0value\0` per pair.
pub fn serialized_len<'a>(pairs: impl Iterator<Item = (&'a [u8], &'a [u8])>) -> usize {
    pairs.fold(4, |n, (k, v)| n + 8 + k.len() + v.len() + 2)
}

/// Appends the Proxy-Wasm map format of the pairs `pairs()` yields (it is walked
/// three times) to `out`.
pub fn serialize<'a, I>(pairs: impl Fn() -> I, out: &mut Vec<u8>)
where
    I: Iterator<Item = (&'a [u8], &'a [u8])>,
{
    out.reserve(serialized_len(pairs()));
    out.extend_from_slice(&(pairs().count() as u32).to_le_bytes());
    for (k, v) in pairs() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs() {
        out.extend_from_slice(k);
        out.push(0);
        out.extend_from_slice(v);
        out.push(0);
    }
}

/// Parses the Proxy-Wasm map format into borrowed pairs; `None` if malformed.
pub fn parse(b: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let u32_at = |i: usize| -> Option<usize> {
        Some(u32::from_le_bytes(b.get(i..i.checked_add(4)?)?.try_into().ok()?) as usize)
    };
    let n = u32_at(0)?;
    if n > 10_000 {
        return None;
    }
    let mut at = 4 + 8 * n;
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let (kl, vl) = (u32_at(4 + 8 * i)?, u32_at(8 + 8 * i)?);
        let k = b.get(at..at.checked_add(kl)?)?;
        at += kl + 1;
        let v = b.get(at..at.checked_add(vl)?)?;
        at += vl + 1;
        out.push((k, v));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fields::tests::{owned as pairs, text};

    fn request() -> Headers {
        let mut f = Fields::default();
        f.append(b"user-agent", b"curl").unwrap();
        f.append(b"x-a", b"1").unwrap();
        f.append(b"x-a", b"2").unwrap();
        Headers::request(&http::Method::GET, "/p?q", "svc:80", "http", f)
    }

    fn entries(h: &Headers) -> Vec<(String, String)> {
        text(h.iter())
    }

    #[test]
    fn set_request_overwrites_every_pseudo_header_in_the_buffers_it_has() {
        let mut h = request();
        h.replace(b":method", b"PURGE").unwrap();
        let long = format!("/{}", "a".repeat(999));
        h.set_request(&http::Method::POST, &long, "b:81", "https");
        let path_buf = h.get(b":path").unwrap().as_ptr();
        let held = h.pseudo_capacity();
        assert!(held >= 1000 + 4 + 4, "{held}");
        h.set_request(&http::Method::GET, "/x", "c", "http");
        let pseudo: Vec<_> = entries(&h).into_iter().take(4).collect();
        let want = [
            (":method", "GET"),
            (":path", "/x"),
            (":authority", "c"),
            (":scheme", "http"),
        ];
        assert_eq!(pseudo, want.map(|(k, v)| (k.to_string(), v.to_string())));
        // The path went into the buffer the long one left; nothing new was held.
        assert_eq!(h.get(b":path").unwrap().as_ptr(), path_buf);
        assert_eq!(h.pseudo_capacity(), held);
    }

    #[test]
    fn a_request_shows_pseudo_headers_first_then_its_fields() {
        let h = request();
        assert_eq!(
            entries(&h),
            pairs(&[
                (":method", "GET"),
                (":path", "/p?q"),
                (":authority", "svc:80"),
                (":scheme", "http"),
                ("user-agent", "curl"),
                ("x-a", "1"),
                ("x-a", "2"),
            ])
        );
        assert_eq!(h.len(), 7);
        assert_eq!(h.get(b":PATH"), Some(&b"/p?q"[..]));
        assert_eq!(h.get(b"X-A"), Some(&b"1"[..]));
        assert!(h.get(b"x-none").is_none());
        assert!(h.get(b":status").is_none());
        let r = Headers::response(404, Fields::default());
        assert_eq!(entries(&r), pairs(&[(":status", "404")]));
    }

    #[test]
    fn changes_apply_to_the_fields_in_lower_case() {
        let mut h = request();
        h.add(b"X-New", b"v").unwrap();
        h.replace(b"x-a", b"3").unwrap();
        h.remove(b"User-Agent").unwrap();
        h.replace(b":path", b"/other").unwrap();
        // The fields keep their order: `x-a` replaced in place, `x-new` last.
        assert_eq!(
            entries(&h),
            pairs(&[
                (":method", "GET"),
                (":path", "/other"),
                (":authority", "svc:80"),
                (":scheme", "http"),
                ("x-a", "3"),
                ("x-new", "v"),
            ])
        );
        assert_eq!(h.pseudo(":path"), Some("/other"));
        let f = h.take_fields();
        assert_eq!(f.get(b"x-new"), Some(&b"v"[..]));
        assert!(h.fields.is_empty());
    }

    #[test]
    fn invalid_changes_are_refused_and_change_nothing() {
        let mut h = request();
        let before = entries(&h);
        assert_eq!(h.add(b"bad name", b"v"), Err(Refused::Invalid));
        assert_eq!(h.add(b"x-ok", b"line\nbreak"), Err(Refused::Invalid));
        assert_eq!(h.add(b":path", b"/x"), Err(Refused::Pseudo));
        assert_eq!(h.remove(b":path"), Err(Refused::Pseudo));
        assert_eq!(h.replace(b":status", b"200"), Err(Refused::Invalid));
        let mut r = Headers::response(200, Fields::default());
        for bad in [&b"101"[..], b"600", b"20", b"abc"] {
            assert_eq!(r.replace(b":status", bad), Err(Refused::Invalid));
        }
        r.replace(b":status", b"503").unwrap();
        assert_eq!(r.pseudo(":status"), Some("503"));
        assert_eq!(h.replace(b":path", b"/a\r\n"), Err(Refused::Invalid));
        assert_eq!(h.replace(b":path", b"/\xff"), Err(Refused::Invalid));
        let bad = [(&b"x-fine"[..], &b"1"[..]), (b"bad name", b"2")];
        assert_eq!(h.set_pairs(bad.into_iter()), Err(Refused::Invalid));
        let bad = [(&b":bogus"[..], &b"1"[..])];
        assert_eq!(h.set_pairs(bad.into_iter()), Err(Refused::Invalid));
        assert_eq!(entries(&h), before);
    }

    #[test]
    fn set_pairs_replaces_the_fields_and_keeps_omitted_pseudo_headers() {
        let mut h = request();
        let new = [(&b"X-Only"[..], &b"1"[..]), (b":path", b"/new")];
        h.set_pairs(new.into_iter()).unwrap();
        assert_eq!(
            entries(&h),
            pairs(&[
                (":method", "GET"),
                (":path", "/new"),
                (":authority", "svc:80"),
                (":scheme", "http"),
                ("x-only", "1"),
            ])
        );
    }

    #[test]
    fn the_map_format_round_trips_and_rejects_truncation() {
        let h = request();
        let mut out = Vec::new();
        h.serialize(&mut out);
        assert_eq!(out.len(), h.serialized_len());
        let parsed = parse(&out).unwrap();
        let back: Vec<_> = h.iter().collect();
        assert_eq!(parsed, back);
        for cut in 0..out.len() - 1 {
            // Every prefix lacks a terminator or a value: malformed, or fewer bytes
            // than the header claims.
            if let Some(p) = parse(&out[..cut]) {
                panic!("prefix of {cut} bytes parsed as {p:?}");
            }
        }
        assert!(parse(&u32::MAX.to_le_bytes()).is_none());
    }
}
