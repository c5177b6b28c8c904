//! JSON Web Tokens for tests, minted by a real JOSE library (`jsonwebtoken`) with
//! the test-only keys of `authn/tests/keys/`, and the key set (JWKS) that verifies
//! them.

use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

const EC_P256: &[u8] = include_bytes!("../../authn/tests/keys/ec_p256.pem");
const RSA_A: &[u8] = include_bytes!("../../authn/tests/keys/rsa_a.pem");
/// RSA key A's public key in PEM, as an attacker would use it as an HMAC secret.
pub const RSA_A_PUB: &[u8] = include_bytes!("../../authn/tests/keys/rsa_a.pub.pem");
const RSA_B: &[u8] = include_bytes!("../../authn/tests/keys/rsa_b.pem");

/// The issuer the helpers' claims name.
pub const ISSUER: &str = "https://issuer.example";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn key(pem: &[u8], ec: bool) -> EncodingKey {
    let k = if ec {
        EncodingKey::from_ec_pem(pem)
    } else {
        EncodingKey::from_rsa_pem(pem)
    };
    k.unwrap_or_else(|e| panic!("test key: {e}"))
}

pub fn p256() -> EncodingKey {
    key(EC_P256, true)
}

pub fn rsa_a() -> EncodingKey {
    key(RSA_A, false)
}

/// A key the JWKS does not hold.
pub fn rsa_b() -> EncodingKey {
    key(RSA_B, false)
}

fn jwk(key: &EncodingKey, alg: Algorithm, kid: &str) -> Value {
    let mut v = Jwk::from_encoding_key(key, alg)
        .ok()
        .and_then(|j| serde_json::to_value(j).ok())
        .unwrap_or(Value::Null);
    v["kid"] = json!(kid);
    v
}

/// The public keys of the P-256 key (`kid: p256`) and RSA key A (`kid: rsa-a`).
pub fn jwks() -> String {
    json!({"keys": [jwk(&p256(), Algorithm::ES256, "p256"), jwk(&rsa_a(), Algorithm::RS256, "rsa-a")]})
        .to_string()
}

/// Claims of a valid token for `sub`: [`ISSUER`], audience `shop`, ten minutes
/// left, groups `[admins]`, `org.team: payments`.
pub fn claims(sub: &str) -> Value {
    json!({
        "iss": ISSUER,
        "sub": sub,
        "aud": "shop",
        "exp": now() + 600,
        "groups": ["admins"],
        "org": {"team": "payments"},
    })
}

/// `claims` with `k` set to `v`.
pub fn with(mut claims: Value, k: &str, v: Value) -> Value {
    claims[k] = v;
    claims
}

pub fn mint(alg: Algorithm, key: &EncodingKey, kid: &str, claims: &Value) -> String {
    let mut h = Header::new(alg);
    h.kid = Some(kid.into());
    encode(&h, claims, key).unwrap_or_else(|e| panic!("minting a token: {e}"))
}

/// An ES256 token signed with the P-256 key.
pub fn es256(claims: &Value) -> String {
    mint(Algorithm::ES256, &p256(), "p256", claims)
}
