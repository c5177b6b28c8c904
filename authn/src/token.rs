//! Token locations of a rule, and finding the token in a request.

use std::borrow::Cow;

use crate::{check_len, CompiledRule, JwtHeader, Reason, RequestView, RuleError, TokenLocation};

const DEFAULT_HEADER: &str = "authorization";
const DEFAULT_PREFIX: &str = "Bearer ";
const DEFAULT_PARAM: &str = "access_token";

/// One place a rule looks for a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Source {
    /// Lowercase header name, and the prefix the value must start with (lowercased:
    /// it is matched ASCII case-insensitively).
    Header {
        name: String,
        prefix: String,
    },
    Param(String),
}

impl Source {
    pub(crate) fn location(&self) -> TokenLocation {
        match self {
            Source::Header { name, .. } => TokenLocation::Header(name.clone()),
            Source::Param(name) => TokenLocation::QueryParam(name.clone()),
        }
    }
}

pub(crate) fn compile_sources(
    headers: &[JwtHeader],
    params: &[String],
) -> Result<Vec<Source>, RuleError> {
    if headers.is_empty() && params.is_empty() {
        return Ok(vec![
            Source::Header {
                name: DEFAULT_HEADER.to_string(),
                prefix: DEFAULT_PREFIX.to_ascii_lowercase(),
            },
            Source::Param(DEFAULT_PARAM.to_string()),
        ]);
    }
    check_len("fromHeaders", headers.len())?;
    check_len("fromParams", params.len())?;
    let mut sources = Vec::with_capacity(headers.len() + params.len());
    for (i, h) in headers.iter().enumerate() {
        if !is_header_name(&h.name) {
            return Err(RuleError::new(
                format!("fromHeaders[{i}].name"),
                "not a valid HTTP header name",
            ));
        }
        if !h.prefix.bytes().all(|b| (0x20..0x7f).contains(&b)) {
            return Err(RuleError::new(
                format!("fromHeaders[{i}].prefix"),
                "only printable ASCII characters are allowed",
            ));
        }
        sources.push(Source::Header {
            name: h.name.to_ascii_lowercase(),
            prefix: h.prefix.to_ascii_lowercase(),
        });
    }
    for (i, p) in params.iter().enumerate() {
        if p.is_empty() {
            return Err(RuleError::new(format!("fromParams[{i}]"), "empty"));
        }
        sources.push(Source::Param(p.clone()));
    }
    Ok(sources)
}

/// RFC 9110 `token`: what a header name may be made of.
pub(crate) fn is_header_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// No control characters other than tab.
pub(crate) fn is_header_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b >= 0x20 && b != 0x7f))
}

/// The one token of a request, and every source it was found at.
#[derive(Debug)]
pub(crate) struct Found<'a> {
    pub(crate) token: Cow<'a, str>,
    pub(crate) sources: Vec<Source>,
}

/// Looks for tokens at the sources of all rules. `Ok(None)` when there is none;
/// `Err` when there are several distinct ones.
pub(crate) fn find<'a>(
    rules: &[CompiledRule],
    request: &RequestView<'a>,
) -> Result<Option<Found<'a>>, Reason> {
    let mut found: Option<Found<'a>> = None;
    let mut record = |token: Cow<'a, str>, source: Source| -> Result<(), Reason> {
        match &mut found {
            None => {
                found = Some(Found {
                    token,
                    sources: vec![source],
                })
            }
            Some(f) if f.token == token => {
                if !f.sources.contains(&source) {
                    f.sources.push(source);
                }
            }
            Some(_) => return Err(Reason::MultipleTokens),
        }
        Ok(())
    };

    let all_sources = || rules.iter().flat_map(|r| r.sources.iter());

    // Headers: each header name once, with the longest configured prefix that the
    // value starts with (a rule with prefix `Bearer ` and one with no prefix on the
    // same header then agree on the token).
    let mut seen_headers: Vec<&str> = Vec::new();
    for source in all_sources() {
        let Source::Header { name, .. } = source else {
            continue;
        };
        if seen_headers.contains(&name.as_str()) {
            continue;
        }
        seen_headers.push(name);
        for value in request.header_values(name) {
            let best = all_sources()
                .filter_map(|s| match s {
                    Source::Header { name: n, prefix } if n == name => {
                        strip_prefix_ignore_case(value, prefix).map(|rest| (prefix, rest))
                    }
                    _ => None,
                })
                .max_by_key(|(prefix, _)| prefix.len());
            let Some((prefix, rest)) = best else {
                continue;
            };
            let token = rest.trim();
            if token.is_empty() {
                continue;
            }
            record(
                Cow::Borrowed(token),
                Source::Header {
                    name: name.clone(),
                    prefix: prefix.clone(),
                },
            )?;
        }
    }

    let params: Vec<&str> = all_sources()
        .filter_map(|s| match s {
            Source::Param(p) => Some(p.as_str()),
            Source::Header { .. } => None,
        })
        .collect();
    if let (false, Some(query)) = (params.is_empty(), request.query) {
        for (key, value) in form_urlencoded::parse(query.as_bytes()) {
            if value.is_empty() || !params.contains(&key.as_ref()) {
                continue;
            }
            record(value, Source::Param(key.into_owned()))?;
        }
    }
    Ok(found)
}

/// `value` after `prefix`, compared ASCII case-insensitively (`prefix` is ASCII).
fn strip_prefix_ignore_case<'v>(value: &'v str, prefix: &str) -> Option<&'v str> {
    let head = value.as_bytes().get(..prefix.len())?;
    if !head.eq_ignore_ascii_case(prefix.as_bytes()) {
        return None;
    }
    value.get(prefix.len()..)
}
