//! Helpers shared by weft's fuzz targets (`fuzz_targets/`).

pub mod policy_text;

/// Where to cut a message of `len` bytes to check that parsing it as it arrives,
/// a piece at a time, agrees with parsing it whole: every cut of a short message,
/// and for a longer one the cuts around each line end and a spread of others.
pub fn cut_points(data: &[u8], len: usize) -> Vec<usize> {
    if len <= 96 {
        return (0..len).collect();
    }
    let mut cuts: Vec<usize> = (0..48).map(|i| i * len / 48).collect();
    for (i, b) in data[..len].iter().enumerate() {
        if *b == b'\n' || *b == b'\r' {
            cuts.push(i);
            cuts.push(i + 1);
        }
    }
    cuts.retain(|c| *c < len);
    cuts.sort_unstable();
    cuts.dedup();
    cuts.truncate(512);
    cuts
}

/// Piece sizes (1 to 16 bytes) drawn from `seed`, for feeding bytes a few at a time.
pub fn pieces(seed: u64, len: usize) -> Vec<usize> {
    let mut s = seed | 1;
    let mut out = Vec::new();
    let mut left = len;
    while left > 0 {
        // xorshift64
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        let n = ((s % 16) as usize + 1).min(left);
        out.push(n);
        left -= n;
    }
    out
}

/// The fields of a head as an application's parser (httparse) reads them, by
/// lower-case name; `None` if the head does not parse completely as exactly `len`
/// bytes.
pub fn reparse_request_fields(head: &[u8]) -> Option<Vec<(String, Vec<u8>)>> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut r = httparse::Request::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => Some(
            r.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        ),
        _ => None,
    }
}

/// [`reparse_request_fields`] for a response head.
pub fn reparse_response_fields(head: &[u8]) -> Option<(u16, Vec<(String, Vec<u8>)>)> {
    let mut headers = [httparse::EMPTY_HEADER; 256];
    let mut r = httparse::Response::new(&mut headers);
    match r.parse(head) {
        Ok(httparse::Status::Complete(n)) if n == head.len() => Some((
            r.code?,
            r.headers
                .iter()
                .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
                .collect(),
        )),
        _ => None,
    }
}

/// The comma-separated, trimmed, non-empty elements of the values of `name`.
pub fn tokens<'a>(fields: &'a [(String, Vec<u8>)], name: &'a str) -> Vec<Vec<u8>> {
    fields
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(|b| *b == b','))
        .map(|t| t.trim_ascii().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}
