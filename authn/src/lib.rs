//! Request authentication with JWTs, with Istio `RequestAuthentication` semantics.
//! Pure: no I/O. The caller fetches JWKS documents (`jwksUri`), passes the clock in,
//! and applies the outcome to the request.
//!
//! 1. [`compile`] turns each [`JwtRule`] into a [`CompiledRule`], parsing its JWKS
//!    (bounded: [`MAX_JWKS_BYTES`], [`MAX_JWKS_KEYS`]) and checking every field.
//!    Errors name the field relative to the rule (`jwks.keys[1].kty`,
//!    `fromHeaders[0].name`); the caller prefixes `jwtRules[i].`.
//! 2. [`authenticate`] looks for a token at every location of every rule:
//!    - no token anywhere: [`Outcome::NoToken`]: the request is anonymous and passes
//!      authentication (authorization decides);
//!    - more than one distinct token: rejected;
//!    - one token, valid for a rule that has a location where it was found:
//!      [`Outcome::Authenticated`];
//!    - otherwise [`Outcome::Rejected`] with a fixed, non-secret [`Reason`].
//!
//! Signatures are checked by the `jsonwebtoken` crate. Accepted algorithms: RS256,
//! RS384, RS512, PS256, ES256, ES384, EdDSA (Ed25519). `none`, the HMAC family and
//! anything else are always refused, so an RSA public key can never serve as an HMAC
//! secret. `exp` and `nbf` are checked when present, with a clock skew allowance
//! ([`DEFAULT_LEEWAY_SECS`]).

#![forbid(unsafe_code)]

mod jwks;
mod token;
mod verify;

#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A token longer than this (in bytes) is rejected without being parsed.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest accepted JWKS document, in bytes.
pub const MAX_JWKS_BYTES: usize = 64 * 1024;
/// Most keys a JWKS document may hold (signing and encryption keys together).
pub const MAX_JWKS_KEYS: usize = 32;
/// Clock skew allowed on `exp` and `nbf` by [`authenticate`].
pub const DEFAULT_LEEWAY_SECS: u64 = 60;
/// Most entries in each list of a rule (`audiences`, `fromHeaders`, `fromParams`,
/// `outputClaimToHeaders`).
pub const MAX_LIST_ENTRIES: usize = 64;

/// One `jwtRules` entry of a `RequestAuthentication`, as written in the resource.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", default)]
pub struct JwtRule {
    /// Required: the `iss` a token must carry.
    pub issuer: String,
    /// Accepted `aud` values; empty accepts any audience.
    pub audiences: Vec<String>,
    /// The JWKS document (JSON text), inline or as fetched from `jwksUri`.
    pub jwks: String,
    /// Headers to look in. When both this and `from_params` are empty: header
    /// `authorization` with prefix `Bearer `, and query parameter `access_token`.
    pub from_headers: Vec<JwtHeader>,
    /// Query parameters to look in (see `from_headers` for the default).
    pub from_params: Vec<String>,
    /// Keep the token in the forwarded request; by default it is removed.
    pub forward_original_token: bool,
    /// Copy claims of a valid token into request headers.
    pub output_claim_to_headers: Vec<ClaimToHeader>,
}

/// A header that may carry the token, after `prefix` (matched ASCII
/// case-insensitively; the remainder is trimmed of surrounding whitespace).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct JwtHeader {
    pub name: String,
    pub prefix: String,
}

/// Copy claim `claim` (nested with `.`, e.g. `a.b`) into request header `header`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClaimToHeader {
    pub header: String,
    pub claim: String,
}

/// A rule that failed [`compile`]: `field` is relative to the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct RuleError {
    field: String,
    message: String,
}

impl RuleError {
    pub(crate) fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        RuleError {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The offending field, relative to the rule: `issuer`, `jwks`,
    /// `jwks.keys[2].kty`, `fromHeaders[1].name`, ...
    pub fn field(&self) -> &str {
        &self.field
    }

    /// What is wrong with it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

/// Where a token was found; what the proxy strips when the token is not forwarded.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum TokenLocation {
    /// A request header (lowercase name): remove the whole header.
    Header(String),
    /// A query parameter: remove every occurrence of it from the query string.
    QueryParam(String),
}

/// A validated [`JwtRule`].
#[derive(Debug, Clone)]
pub struct CompiledRule {
    issuer: String,
    /// Normalized (see `verify::normalize_audience`).
    audiences: Vec<String>,
    keys: Vec<jwks::Key>,
    sources: Vec<token::Source>,
    forward_original_token: bool,
    /// (header name, claim path).
    output: Vec<(String, Vec<String>)>,
}

impl CompiledRule {
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// Number of usable signing keys in the JWKS.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// Where this rule looks for tokens (the defaults applied).
    pub fn locations(&self) -> Vec<TokenLocation> {
        self.sources.iter().map(token::Source::location).collect()
    }

    pub fn forward_original_token(&self) -> bool {
        self.forward_original_token
    }

    /// The (lower-case) headers this rule sets from claims: a proxy removes them
    /// from every request first, so a client can never send them itself.
    pub fn output_headers(&self) -> impl Iterator<Item = &str> {
        self.output.iter().map(|(h, _)| h.as_str())
    }
}

/// Headers a claim may never be copied into: they frame or route the message
/// (a claim in them could desynchronize the proxy and the application).
pub const RESERVED_OUTPUT_HEADERS: &[&str] = &[
    "content-length",
    "transfer-encoding",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
];

/// The parts of a request that authentication reads.
#[derive(Debug, Clone, Default)]
pub struct RequestView<'a> {
    /// `(name, value)` pairs; names match ASCII case-insensitively. A header sent
    /// several times appears several times.
    pub headers: Vec<(&'a str, &'a str)>,
    /// The raw query string, without the `?`.
    pub query: Option<&'a str>,
}

impl<'a> RequestView<'a> {
    pub fn new(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        query: Option<&'a str>,
    ) -> Self {
        RequestView {
            headers: headers.into_iter().collect(),
            query,
        }
    }

    /// Every value of header `name` (ASCII case-insensitive).
    pub fn header_values<'s>(&'s self, name: &'s str) -> impl Iterator<Item = &'a str> + 's {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| *v)
    }
}

/// The result of [`authenticate`].
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// No rule found a token: the request is anonymous (not rejected here).
    NoToken,
    /// One token, valid for a rule covering where it was found.
    Authenticated(Principal),
    /// A token was present but is not valid (or several were present).
    Rejected(Reason),
}

/// The identity of a request with a valid token, and what the proxy must change in
/// the request before forwarding it.
#[derive(Debug, Clone, PartialEq)]
pub struct Principal {
    /// `<iss>/<sub>` (`request.auth.principal`, matched by `requestPrincipals`);
    /// empty when the token has no `sub`.
    pub principal: String,
    pub issuer: String,
    pub subject: Option<String>,
    /// The whole payload (`request.auth.claims`; see [`claim_values`]).
    pub claims: Value,
    /// The `aud` claim (string or array of strings), as in the token.
    pub audiences: Vec<String>,
    /// The `azp` claim (`request.auth.presenter`).
    pub presenter: Option<String>,
    /// Where to strip the token from (empty when the rule forwards it).
    pub remove: Vec<TokenLocation>,
    /// Headers to set, replacing any value the client sent, from
    /// `outputClaimToHeaders`.
    pub add_headers: Vec<(String, String)>,
}

/// Why a token was rejected. The text ([`Reason::as_str`]) is fixed and never
/// contains any part of the token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    /// Distinct tokens in more than one place (or several values of one header).
    MultipleTokens,
    /// Longer than [`MAX_TOKEN_BYTES`].
    TokenTooLarge,
    /// Not a compact JWS with a JSON header and a JSON object payload.
    Malformed,
    /// `none`, HMAC, or any algorithm not accepted.
    AlgorithmNotAllowed,
    /// The token names a `kid` no key of the issuer has.
    UnknownKid,
    /// No key of the issuer fits the token's algorithm.
    NoMatchingKey,
    /// No candidate key verifies the signature.
    BadSignature,
    /// No rule covering the token's location has its `iss`.
    IssuerMismatch,
    /// `aud` does not intersect the rule's audiences.
    AudienceMismatch,
    /// `exp` is past (beyond the leeway).
    Expired,
    /// `nbf` is in the future (beyond the leeway).
    NotYetValid,
    /// A registered claim (`iss`, `sub`, `exp`, `nbf`, `aud`, `azp`) has the wrong type.
    InvalidClaims,
    /// No signature backend is available in this process.
    CryptoUnavailable,
}

impl Reason {
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::MultipleTokens => "more than one token",
            Reason::TokenTooLarge => "token too large",
            Reason::Malformed => "malformed token",
            Reason::AlgorithmNotAllowed => "algorithm not allowed",
            Reason::UnknownKid => "unknown key id",
            Reason::NoMatchingKey => "no key for the token algorithm",
            Reason::BadSignature => "invalid signature",
            Reason::IssuerMismatch => "issuer not allowed",
            Reason::AudienceMismatch => "audience not allowed",
            Reason::Expired => "token expired",
            Reason::NotYetValid => "token not yet valid",
            Reason::InvalidClaims => "invalid claims",
            Reason::CryptoUnavailable => "no crypto provider",
        }
    }
}

impl Reason {
    /// A short snake_case code for metric labels (`expired`, `bad_signature`, ...).
    pub fn code(self) -> &'static str {
        match self {
            Reason::MultipleTokens => "multiple_tokens",
            Reason::TokenTooLarge => "too_large",
            Reason::Malformed => "malformed",
            Reason::AlgorithmNotAllowed => "algorithm_not_allowed",
            Reason::UnknownKid => "unknown_kid",
            Reason::NoMatchingKey => "no_matching_key",
            Reason::BadSignature => "bad_signature",
            Reason::IssuerMismatch => "issuer",
            Reason::AudienceMismatch => "audience",
            Reason::Expired => "expired",
            Reason::NotYetValid => "not_yet_valid",
            Reason::InvalidClaims => "invalid_claims",
            Reason::CryptoUnavailable => "crypto_unavailable",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Validates a rule and parses its JWKS.
pub fn compile(rule: &JwtRule) -> Result<CompiledRule, RuleError> {
    let keys = jwks::parse(&rule.jwks)?;
    compile_with(rule, keys)
}

/// A rule whose key set is not available (not fetched yet, or not valid): it finds
/// tokens where the rule says and rejects every one of its issuer, so such a token
/// is never mistaken for a request without a token. `rule.jwks` is ignored.
pub fn compile_without_keys(rule: &JwtRule) -> Result<CompiledRule, RuleError> {
    compile_with(rule, Vec::new())
}

fn compile_with(rule: &JwtRule, keys: Vec<jwks::Key>) -> Result<CompiledRule, RuleError> {
    if rule.issuer.trim().is_empty() {
        return Err(RuleError::new("issuer", "required"));
    }
    check_len("audiences", rule.audiences.len())?;
    let mut audiences = Vec::with_capacity(rule.audiences.len());
    for (i, aud) in rule.audiences.iter().enumerate() {
        if aud.is_empty() {
            return Err(RuleError::new(format!("audiences[{i}]"), "empty"));
        }
        audiences.push(verify::normalize_audience(aud).to_string());
    }
    let sources = token::compile_sources(&rule.from_headers, &rule.from_params)?;
    check_len("outputClaimToHeaders", rule.output_claim_to_headers.len())?;
    let mut output = Vec::with_capacity(rule.output_claim_to_headers.len());
    for (i, o) in rule.output_claim_to_headers.iter().enumerate() {
        if !token::is_header_name(&o.header) {
            return Err(RuleError::new(
                format!("outputClaimToHeaders[{i}].header"),
                "not a valid HTTP header name",
            ));
        }
        if RESERVED_OUTPUT_HEADERS.contains(&o.header.to_ascii_lowercase().as_str()) {
            return Err(RuleError::new(
                format!("outputClaimToHeaders[{i}].header"),
                format!(
                    "{:?} frames or routes the message: not a claim header",
                    o.header
                ),
            ));
        }
        let path: Vec<String> = o.claim.split('.').map(str::to_string).collect();
        if path.iter().any(String::is_empty) {
            return Err(RuleError::new(
                format!("outputClaimToHeaders[{i}].claim"),
                "empty claim name",
            ));
        }
        output.push((o.header.to_ascii_lowercase(), path));
    }
    Ok(CompiledRule {
        issuer: rule.issuer.clone(),
        audiences,
        keys,
        sources,
        forward_original_token: rule.forward_original_token,
        output,
    })
}

pub(crate) fn check_len(field: &str, len: usize) -> Result<(), RuleError> {
    if len > MAX_LIST_ENTRIES {
        return Err(RuleError::new(
            field,
            format!("{len} entries, at most {MAX_LIST_ENTRIES}"),
        ));
    }
    Ok(())
}

/// [`authenticate_with_leeway`] with [`DEFAULT_LEEWAY_SECS`]. `now` is the current
/// time in seconds since the Unix epoch.
pub fn authenticate(rules: &[CompiledRule], request: &RequestView<'_>, now: u64) -> Outcome {
    authenticate_with_leeway(rules, request, now, DEFAULT_LEEWAY_SECS)
}

/// Authenticates `request` against all rules of the `RequestAuthentication`s that
/// apply to the workload; `leeway` is the allowed clock skew in seconds.
pub fn authenticate_with_leeway(
    rules: &[CompiledRule],
    request: &RequestView<'_>,
    now: u64,
    leeway: u64,
) -> Outcome {
    let found = match token::find(rules, request) {
        Ok(Some(found)) => found,
        Ok(None) => return Outcome::NoToken,
        Err(reason) => return Outcome::Rejected(reason),
    };
    if found.token.len() > MAX_TOKEN_BYTES {
        return Outcome::Rejected(Reason::TokenTooLarge);
    }
    let candidates: Vec<&CompiledRule> = rules
        .iter()
        .filter(|r| r.sources.iter().any(|s| found.sources.contains(s)))
        .collect();
    let (rule, verified) = match verify::verify(&found.token, &candidates, now, leeway) {
        Ok(v) => v,
        Err(reason) => return Outcome::Rejected(reason),
    };

    let mut remove = Vec::new();
    if !rule.forward_original_token {
        for source in found.sources.iter().filter(|s| rule.sources.contains(s)) {
            let location = source.location();
            if !remove.contains(&location) {
                remove.push(location);
            }
        }
    }
    let mut add_headers = Vec::new();
    for (header, path) in &rule.output {
        let path: Vec<&str> = path.iter().map(String::as_str).collect();
        let values = claim_values(&verified.claims, &path);
        if values.is_empty() {
            continue;
        }
        let value = values.join(",");
        if token::is_header_value(&value) {
            add_headers.push((header.clone(), value));
        }
    }
    let principal = match &verified.subject {
        Some(sub) => format!("{}/{}", verified.issuer, sub),
        None => String::new(),
    };
    Outcome::Authenticated(Principal {
        principal,
        issuer: verified.issuer,
        subject: verified.subject,
        claims: verified.claims,
        audiences: verified.audiences,
        presenter: verified.presenter,
        remove,
        add_headers,
    })
}

/// The values of claim `path` (`request.auth.claims[a][b]` is `["a", "b"]`) for
/// AuthorizationPolicy matching: a string gives itself, a number or boolean its JSON
/// text, an array each of its string, number and boolean elements; anything else
/// (missing, null, object) nothing.
pub fn claim_values(claims: &Value, path: &[&str]) -> Vec<String> {
    let mut value = claims;
    for name in path {
        match value.get(*name) {
            Some(v) => value = v,
            None => return Vec::new(),
        }
    }
    match value {
        Value::Array(items) => items.iter().filter_map(scalar_text).collect(),
        other => scalar_text(other).into_iter().collect(),
    }
}

fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}
