//! JWKS parsing: every signing key is checked when the rule is compiled, so that
//! verification only ever sees well-formed keys.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::crypto::CryptoProvider;
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;

use crate::{RuleError, MAX_JWKS_BYTES, MAX_JWKS_KEYS};

/// Smallest accepted RSA modulus, in bits.
const MIN_RSA_BITS: usize = 2048;
/// Largest accepted RSA modulus, in bits (the RSA backend's own limit).
const MAX_RSA_BITS: usize = 8192;
/// Largest accepted RSA public exponent (the RSA backend's own limit).
const MAX_RSA_EXPONENT: u64 = (1 << 33) - 1;

/// The kind of public key, which fixes the algorithms it can verify.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyKind {
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl KeyKind {
    fn fits(self, alg: Algorithm) -> bool {
        matches!(
            (self, alg),
            (
                KeyKind::Rsa,
                Algorithm::RS256 | Algorithm::RS384 | Algorithm::RS512 | Algorithm::PS256
            ) | (KeyKind::P256, Algorithm::ES256)
                | (KeyKind::P384, Algorithm::ES384)
                | (KeyKind::Ed25519, Algorithm::EdDSA)
        )
    }

    fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa => "RSA",
            KeyKind::P256 => "P-256",
            KeyKind::P384 => "P-384",
            KeyKind::Ed25519 => "Ed25519",
        }
    }
}

/// A usable signing key.
#[derive(Clone)]
pub(crate) struct Key {
    pub(crate) kid: Option<String>,
    /// The JWK's `alg`, when it states one: tokens must then use exactly it.
    pub(crate) alg: Option<Algorithm>,
    pub(crate) kind: KeyKind,
    pub(crate) decoding: DecodingKey,
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Key")
            .field("kid", &self.kid)
            .field("alg", &self.alg)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Whether this key may verify a token signed with `alg`.
    pub(crate) fn fits(&self, alg: Algorithm) -> bool {
        self.kind.fits(alg) && self.alg.is_none_or(|a| a == alg)
    }
}

/// The token algorithms accepted; everything else (`none`, HMAC, ...) is refused.
pub(crate) fn accepted_algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "EdDSA" => Algorithm::EdDSA,
        _ => return None,
    })
}

/// The signature backend: the process default if one is installed or implied by the
/// crate features, else the RustCrypto one, installed as the default.
pub(crate) fn crypto_provider() -> Option<&'static CryptoProvider> {
    if let Some(p) = CryptoProvider::try_get_default() {
        return Some(p);
    }
    // Only when features of both backends are enabled and nothing was installed; a
    // concurrent install winning the race is fine.
    let _ = CryptoProvider::install_default(&jsonwebtoken::crypto::rust_crypto::DEFAULT_PROVIDER);
    CryptoProvider::try_get_default()
}

#[derive(Deserialize)]
struct Document {
    keys: Option<Vec<RawKey>>,
}

#[derive(Deserialize)]
struct RawKey {
    kty: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
    n: Option<String>,
    e: Option<String>,
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

/// Parses a JWKS document into its usable signing keys. Keys with `use: enc` are
/// skipped; any other key that is not a supported, well-formed signing key is an
/// error, and so is a document without any usable key.
pub(crate) fn parse(text: &str) -> Result<Vec<Key>, RuleError> {
    if text.trim().is_empty() {
        return Err(RuleError::new("jwks", "required"));
    }
    if text.len() > MAX_JWKS_BYTES {
        return Err(RuleError::new(
            "jwks",
            format!("document is {} bytes, at most {MAX_JWKS_BYTES}", text.len()),
        ));
    }
    let doc: Document = serde_json::from_str(text)
        .map_err(|e| RuleError::new("jwks", format!("not a JWKS document: {e}")))?;
    let raw = doc
        .keys
        .ok_or_else(|| RuleError::new("jwks.keys", "required"))?;
    if raw.len() > MAX_JWKS_KEYS {
        return Err(RuleError::new(
            "jwks.keys",
            format!("{} keys, at most {MAX_JWKS_KEYS}", raw.len()),
        ));
    }
    let provider = crypto_provider()
        .ok_or_else(|| RuleError::new("jwks", "no signature backend available"))?;
    let mut keys = Vec::with_capacity(raw.len());
    for (i, k) in raw.iter().enumerate() {
        if let Some(key) = parse_key(k, &format!("jwks.keys[{i}]"), provider)? {
            keys.push(key);
        }
    }
    if keys.is_empty() {
        return Err(RuleError::new("jwks.keys", "no usable signing key"));
    }
    Ok(keys)
}

fn parse_key(k: &RawKey, field: &str, provider: &CryptoProvider) -> Result<Option<Key>, RuleError> {
    let err = |name: &str, msg: String| RuleError::new(format!("{field}.{name}"), msg);
    match k.use_.as_deref() {
        None | Some("sig") => {}
        Some("enc") => return Ok(None),
        Some(other) => return Err(err("use", format!("unsupported use {}", quote(other)))),
    }
    let kty = k
        .kty
        .as_deref()
        .ok_or_else(|| err("kty", "required".into()))?;
    let (kind, decoding) = match kty {
        "RSA" => {
            let n = decode_b64(k.n.as_deref(), "n", &err)?;
            let e = decode_b64(k.e.as_deref(), "e", &err)?;
            check_rsa(&n, &e, &err)?;
            (KeyKind::Rsa, DecodingKey::from_rsa_raw_components(&n, &e))
        }
        "EC" => {
            let (kind, len) = match k.crv.as_deref() {
                Some("P-256") => (KeyKind::P256, 32),
                Some("P-384") => (KeyKind::P384, 48),
                Some(other) => {
                    return Err(err("crv", format!("unsupported curve {}", quote(other))))
                }
                None => return Err(err("crv", "required".into())),
            };
            let x = decode_b64(k.x.as_deref(), "x", &err)?;
            let y = decode_b64(k.y.as_deref(), "y", &err)?;
            if x.len() != len {
                return Err(err("x", format!("must be {len} bytes")));
            }
            if y.len() != len {
                return Err(err("y", format!("must be {len} bytes")));
            }
            let mut point = Vec::with_capacity(1 + 2 * len);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            (kind, DecodingKey::from_ec_der(&point))
        }
        "OKP" => {
            match k.crv.as_deref() {
                Some("Ed25519") => {}
                Some(other) => {
                    return Err(err("crv", format!("unsupported curve {}", quote(other))))
                }
                None => return Err(err("crv", "required".into())),
            }
            let x = decode_b64(k.x.as_deref(), "x", &err)?;
            // Checked here: the backend would panic on a shorter key.
            if x.len() != 32 {
                return Err(err("x", "must be 32 bytes".into()));
            }
            (KeyKind::Ed25519, DecodingKey::from_ed_der(&x))
        }
        other => return Err(err("kty", format!("unsupported key type {}", quote(other)))),
    };
    let alg = match k.alg.as_deref() {
        None => None,
        Some(name) => {
            let alg = accepted_algorithm(name)
                .ok_or_else(|| err("alg", format!("unsupported algorithm {}", quote(name))))?;
            if !kind.fits(alg) {
                return Err(err(
                    "alg",
                    format!("{} does not fit this {} key", quote(name), kind.name()),
                ));
            }
            Some(alg)
        }
    };
    // Building a verifier parses EC and Ed25519 points: an invalid one fails here
    // rather than on every request.
    let probe = match kind {
        KeyKind::Rsa => Algorithm::RS256,
        KeyKind::P256 => Algorithm::ES256,
        KeyKind::P384 => Algorithm::ES384,
        KeyKind::Ed25519 => Algorithm::EdDSA,
    };
    if (provider.verifier_factory)(&probe, &decoding).is_err() {
        return Err(RuleError::new(
            field,
            format!("not a valid {} public key", kind.name()),
        ));
    }
    Ok(Some(Key {
        kid: k.kid.clone(),
        alg,
        kind,
        decoding,
    }))
}

fn decode_b64(
    value: Option<&str>,
    name: &str,
    err: &impl Fn(&str, String) -> RuleError,
) -> Result<Vec<u8>, RuleError> {
    let value = value.ok_or_else(|| err(name, "required".into()))?;
    let bytes = URL_SAFE_NO_PAD
        .decode(value)
        .map_err(|_| err(name, "not unpadded base64url".into()))?;
    if bytes.is_empty() {
        return Err(err(name, "empty".into()));
    }
    Ok(bytes)
}

/// The checks the RSA backend makes when verifying, plus a minimum size.
fn check_rsa(
    n: &[u8],
    e: &[u8],
    err: &impl Fn(&str, String) -> RuleError,
) -> Result<(), RuleError> {
    let n = strip_leading_zeros(n);
    let bits = match n.first() {
        Some(first) => (n.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    };
    if !(MIN_RSA_BITS..=MAX_RSA_BITS).contains(&bits) {
        return Err(err(
            "n",
            format!("modulus is {bits} bits, must be {MIN_RSA_BITS} to {MAX_RSA_BITS}"),
        ));
    }
    if n.last().is_some_and(|b| b % 2 == 0) {
        return Err(err("n", "modulus must be odd".into()));
    }
    let e = strip_leading_zeros(e);
    let exponent = if e.len() > 8 {
        None
    } else {
        Some(e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    };
    match exponent {
        Some(v) if (3..=MAX_RSA_EXPONENT).contains(&v) && v % 2 == 1 => Ok(()),
        _ => Err(err(
            "e",
            format!("exponent must be odd, from 3 to {MAX_RSA_EXPONENT}"),
        )),
    }
}

fn strip_leading_zeros(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    &bytes[start..]
}

/// A configuration value in an error message, quoted and cut short.
fn quote(value: &str) -> String {
    let short: String = value.chars().take(32).collect();
    format!("{short:?}")
}
