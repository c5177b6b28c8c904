//! Validating one token against the rules that cover where it was found.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, Validation};
use serde::de::IgnoredAny;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::jwks::{accepted_algorithm, crypto_provider, Key};
use crate::{CompiledRule, Reason, MAX_JWKS_KEYS};

/// The identity parts of a token that passed every check.
#[derive(Debug)]
pub(crate) struct Verified {
    pub(crate) issuer: String,
    pub(crate) subject: Option<String>,
    pub(crate) claims: Value,
    pub(crate) audiences: Vec<String>,
    pub(crate) presenter: Option<String>,
}

/// A token's header and payload, before its signature is checked.
struct Parsed {
    alg: Algorithm,
    kid: Option<String>,
    claims: Map<String, Value>,
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

/// Audiences compare without an `http://` or `https://` scheme, and then without a
/// trailing `/` (as Envoy's `jwt_authn` does).
pub(crate) fn normalize_audience(aud: &str) -> &str {
    match aud
        .strip_prefix("https://")
        .or_else(|| aud.strip_prefix("http://"))
    {
        Some(rest) => rest.strip_suffix('/').unwrap_or(rest),
        None => aud,
    }
}

/// Checks `token` against `rules` (those covering a location where it was found):
/// only rules whose issuer is the token's `iss` are tried, in order; the first that
/// accepts it wins, else the first rejection is returned.
pub(crate) fn verify<'r>(
    token: &str,
    rules: &[&'r CompiledRule],
    now: u64,
    leeway: u64,
) -> Result<(&'r CompiledRule, Verified), Reason> {
    let parsed = parse(token)?;
    let issuer = match parsed.claims.get("iss") {
        Some(Value::String(iss)) => iss.clone(),
        Some(_) => return Err(Reason::InvalidClaims),
        None => return Err(Reason::IssuerMismatch),
    };
    let mut first_error = Reason::IssuerMismatch;
    let mut tried = false;
    for rule in rules.iter().filter(|r| r.issuer == issuer) {
        match check_rule(token, &parsed, rule, now, leeway) {
            Ok(()) => return Ok((rule, identity(issuer, parsed.claims)?)),
            Err(reason) if !tried => first_error = reason,
            Err(_) => {}
        }
        tried = true;
    }
    Err(first_error)
}

/// Splits and decodes a compact JWS; refuses algorithms that are not accepted.
fn parse(token: &str) -> Result<Parsed, Reason> {
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(Reason::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Reason::Malformed);
    };
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Reason::Malformed)?;
    let header: Header = serde_json::from_slice(&header).map_err(|_| Reason::Malformed)?;
    let alg = accepted_algorithm(&header.alg).ok_or(Reason::AlgorithmNotAllowed)?;
    let payload = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| Reason::Malformed)?;
    let Ok(Value::Object(claims)) = serde_json::from_slice(&payload) else {
        return Err(Reason::Malformed);
    };
    Ok(Parsed {
        alg,
        kid: header.kid,
        claims,
    })
}

/// Signature with the rule's keys, then the time and audience claims.
fn check_rule(
    token: &str,
    parsed: &Parsed,
    rule: &CompiledRule,
    now: u64,
    leeway: u64,
) -> Result<(), Reason> {
    check_signature(token, parsed, &rule.keys)?;
    let claims = &parsed.claims;
    if let Some(exp) = numeric_claim(claims, "exp")? {
        if now > exp.saturating_add(leeway) {
            return Err(Reason::Expired);
        }
    }
    if let Some(nbf) = numeric_claim(claims, "nbf")? {
        if nbf > now.saturating_add(leeway) {
            return Err(Reason::NotYetValid);
        }
    }
    let audiences = audiences(claims)?;
    if !rule.audiences.is_empty()
        && !audiences
            .iter()
            .any(|a| rule.audiences.iter().any(|r| r == normalize_audience(a)))
    {
        return Err(Reason::AudienceMismatch);
    }
    Ok(())
}

/// The key is chosen by `kid` when the token has one (keys without a `kid` stay
/// candidates, as in Envoy), then by algorithm; each candidate is tried.
fn check_signature(token: &str, parsed: &Parsed, keys: &[Key]) -> Result<(), Reason> {
    let by_kid: Vec<&Key> = keys
        .iter()
        .filter(|k| match (&parsed.kid, &k.kid) {
            (Some(want), Some(have)) => want == have,
            _ => true,
        })
        .collect();
    if by_kid.is_empty() {
        return Err(Reason::UnknownKid);
    }
    let candidates: Vec<&Key> = by_kid
        .into_iter()
        .filter(|k| k.fits(parsed.alg))
        .take(MAX_JWKS_KEYS)
        .collect();
    if candidates.is_empty() {
        return Err(Reason::NoMatchingKey);
    }
    if crypto_provider().is_none() {
        return Err(Reason::CryptoUnavailable);
    }
    // Only the signature is checked by the library: claims are checked against the
    // caller's clock.
    let mut validation = Validation::new(parsed.alg);
    validation.required_spec_claims.clear();
    validation.validate_exp = false;
    validation.validate_nbf = false;
    validation.validate_aud = false;
    validation.leeway = 0;
    for key in candidates {
        match jsonwebtoken::decode::<IgnoredAny>(token, &key.decoding, &validation) {
            Ok(_) => return Ok(()),
            Err(e) => match e.kind() {
                ErrorKind::InvalidSignature
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidKeyFormat => continue,
                _ => return Err(Reason::Malformed),
            },
        }
    }
    Err(Reason::BadSignature)
}

/// A NumericDate claim: absent, or a non-negative number (fractions truncated).
fn numeric_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<u64>, Reason> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => match (n.as_u64(), n.as_f64()) {
            (Some(v), _) => Ok(Some(v)),
            (None, Some(f)) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
            _ => Err(Reason::InvalidClaims),
        },
        Some(_) => Err(Reason::InvalidClaims),
    }
}

/// `aud`: absent, a string, or an array of strings.
fn audiences(claims: &Map<String, Value>) -> Result<Vec<String>, Reason> {
    match claims.get("aud") {
        None => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(vec![s.clone()]),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string).ok_or(Reason::InvalidClaims))
            .collect(),
        Some(_) => Err(Reason::InvalidClaims),
    }
}

/// An optional string claim.
fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, Reason> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(Reason::InvalidClaims),
    }
}

fn identity(issuer: String, claims: Map<String, Value>) -> Result<Verified, Reason> {
    Ok(Verified {
        issuer,
        subject: string_claim(&claims, "sub")?,
        audiences: audiences(&claims)?,
        presenter: string_claim(&claims, "azp")?,
        claims: Value::Object(claims),
    })
}
