//! JWT-SVIDs: the mesh's signer of JSON Web Token SVIDs (SPIFFE JWT-SVID standard),
//! for the Workload API that node agents serve to applications.
//!
//! One EC P-256 key signs every token (ES256). It is generated with rcgen/ring as
//! PKCS#8 and kept beside the CA, so that replicas and restarts sign with the same
//! key: the file `<state-dir>/ca/jwt-key.pem` (mode 0600) in standalone mode, the key
//! `jwt-key.pem` of the CA Secret in Kubernetes mode (see `k8s::ca_secret`).
//!
//! The key ID (`kid`, in each token's header and in the JWKS) is the key's RFC 7638
//! JWK thumbprint with SHA-256: base64url (no padding) of the SHA-256 digest of
//! `{"crv":"P-256","kty":"EC","x":"…","y":"…"}`. Any verifier can recompute it from
//! the published JWK.
//!
//! Tokens carry `sub` (the SPIFFE ID), `aud` (a string for one audience, an array
//! otherwise), `iat` and `exp` (`iat` + the lifetime, 5 minutes unless set), and the
//! header `{"alg":"ES256","kid":…,"typ":"JWT"}`.

use super::ca::{create_private_dir, CaError, CaOptions};
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, Jwk, JwkSet, KeyAlgorithm, PublicKeyUse, ThumbprintHash,
};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::Serialize;
use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use weft_proto::spiffe::{SpiffeId, TrustDomain};

/// File name of the signing key in the CA directory, and key name in the CA Secret.
pub const KEY_FILE: &str = "jwt-key.pem";
/// Lifetime of a JWT-SVID unless configured otherwise.
pub const DEFAULT_TTL: Duration = Duration::from_secs(5 * 60);
/// Bounds of the configurable lifetime.
pub const MIN_TTL: Duration = Duration::from_secs(10);
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// A token names 1 to this many audiences.
pub const MAX_AUDIENCES: usize = 16;
/// Each audience is non-empty and at most this many bytes.
pub const MAX_AUDIENCE_BYTES: usize = 512;
/// A PKCS#8 P-256 key in PEM is about 250 bytes: a larger file is not ours.
pub const MAX_KEY_PEM_BYTES: u64 = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_KEY_PEM_BYTES} bytes: not a JWT-SVID signing key")]
    TooLarge { path: PathBuf },
    #[error(transparent)]
    Dir(#[from] CaError),
    #[error("JWT-SVID signing key: {0}")]
    BadKey(String),
    #[error("JWT-SVID lifetime {0:?} is outside {MIN_TTL:?}..={MAX_TTL:?}")]
    Ttl(Duration),
    #[error("{0} is not a valid SPIFFE ID for a JWT-SVID: {1}")]
    Identity(String, String),
    #[error("audiences: {0}")]
    Audience(String),
    #[error("the clock is before the Unix epoch")]
    Clock,
    #[error("signing a JWT-SVID failed: {0}")]
    Sign(#[from] jsonwebtoken::errors::Error),
    #[error("generating the JWT-SVID signing key failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Signs JWT-SVIDs of one trust domain with one ES256 key.
pub struct JwtSigner {
    key: EncodingKey,
    kid: String,
    jwks: String,
    trust_domain: TrustDomain,
    ttl: Duration,
}

impl std::fmt::Debug for JwtSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSigner")
            .field("kid", &self.kid)
            .field("trust_domain", &self.trust_domain)
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

#[derive(Serialize)]
struct Claims<'a> {
    sub: String,
    aud: Audience<'a>,
    exp: i64,
    iat: i64,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Audience<'a> {
    One(&'a str),
    Many(&'a [String]),
}

impl JwtSigner {
    /// A new P-256 signing key: PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub fn generate_pem() -> Result<String, JwtError> {
        Ok(KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?.serialize_pem())
    }

    /// A signer from a PKCS#8 PEM P-256 key.
    pub fn from_pem(
        key_pem: &str,
        trust_domain: &TrustDomain,
        ttl: Duration,
    ) -> Result<Self, JwtError> {
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(JwtError::Ttl(ttl));
        }
        if key_pem.len() as u64 > MAX_KEY_PEM_BYTES {
            return Err(JwtError::BadKey(format!(
                "larger than {MAX_KEY_PEM_BYTES} bytes"
            )));
        }
        let pair = KeyPair::from_pem(key_pem).map_err(|e| JwtError::BadKey(e.to_string()))?;
        if pair.algorithm() != &PKCS_ECDSA_P256_SHA256 {
            return Err(JwtError::BadKey("not an EC P-256 key".into()));
        }
        let key = EncodingKey::from_ec_der(&pair.serialize_der());
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        if !matches!(jwk.algorithm, AlgorithmParameters::EllipticCurve(_)) {
            return Err(JwtError::BadKey("not an EC key".into()));
        }
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        jwk.common = CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(KeyAlgorithm::ES256),
            key_id: Some(kid.clone()),
            ..Default::default()
        };
        let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] })
            .map_err(|e| JwtError::BadKey(e.to_string()))?;
        Ok(Self {
            key,
            kid,
            jwks,
            trust_domain: trust_domain.clone(),
            ttl,
        })
    }

    /// Standalone mode: the key in `<state-dir>/ca/jwt-key.pem`, created (mode 0600)
    /// when absent. Creation is atomic and never replaces a key: of control planes
    /// that start together on one state directory, all use the first one written.
    pub fn load_or_create(opts: &CaOptions, ttl: Duration) -> Result<Self, JwtError> {
        let dir = opts.dir();
        create_private_dir(&dir)?;
        let path = dir.join(KEY_FILE);
        if !path.exists() {
            let pem = Self::generate_pem()?;
            if create_exclusive(&path, &pem)? {
                tracing::info!(path = %path.display(), "created the JWT-SVID signing key");
            }
        }
        let pem = read_bounded(&path)?;
        Self::from_pem(&pem, &opts.trust_domain, ttl)
    }

    /// The key ID: the key's RFC 7638 thumbprint (SHA-256, base64url).
    pub fn kid(&self) -> &str {
        &self.kid
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// The public JWKS (JSON): `{"keys":[{"kty":"EC","crv":"P-256","x",…,"y",…,
    /// "kid",…,"alg":"ES256","use":"sig"}]}`.
    pub fn jwks(&self) -> String {
        self.jwks.clone()
    }

    /// Signs a JWT-SVID for `id` (a workload of this trust domain) and `audiences`
    /// (1 to 16, each non-empty and at most 512 bytes), issued at `now`. Returns the
    /// token and its expiry (`exp`, seconds since the Unix epoch).
    pub fn sign(
        &self,
        id: &SpiffeId,
        audiences: &[String],
        now: SystemTime,
    ) -> Result<(String, i64), JwtError> {
        if id.trust_domain() != &self.trust_domain {
            return Err(JwtError::Identity(
                id.to_string(),
                format!("trust domain is not {}", self.trust_domain),
            ));
        }
        id.workload()
            .map_err(|e| JwtError::Identity(id.to_string(), e.to_string()))?;
        check_audiences(audiences)?;
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_err(|_| JwtError::Clock)?
            .as_secs();
        let iat = i64::try_from(iat).map_err(|_| JwtError::Clock)?;
        // The lifetime is at most MAX_TTL (checked at construction).
        let exp = iat.saturating_add(self.ttl.as_secs() as i64);
        let aud = match audiences {
            [one] => Audience::One(one),
            many => Audience::Many(many),
        };
        let claims = Claims {
            sub: id.to_string(),
            aud,
            exp,
            iat,
        };
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("JWT".into());
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.key)?;
        Ok((token, exp))
    }
}

fn check_audiences(audiences: &[String]) -> Result<(), JwtError> {
    if audiences.is_empty() {
        return Err(JwtError::Audience("at least one is required".into()));
    }
    if audiences.len() > MAX_AUDIENCES {
        return Err(JwtError::Audience(format!(
            "{} given, at most {MAX_AUDIENCES}",
            audiences.len()
        )));
    }
    for (i, a) in audiences.iter().enumerate() {
        if a.is_empty() {
            return Err(JwtError::Audience(format!("audience {i} is empty")));
        }
        if a.len() > MAX_AUDIENCE_BYTES {
            return Err(JwtError::Audience(format!(
                "audience {i} is {} bytes long, at most {MAX_AUDIENCE_BYTES}",
                a.len()
            )));
        }
    }
    Ok(())
}

/// Reads the key file, refusing one larger than `MAX_KEY_PEM_BYTES`.
fn read_bounded(path: &Path) -> Result<String, JwtError> {
    let io = |source| JwtError::Io {
        path: path.to_path_buf(),
        source,
    };
    let f = fs::File::open(path).map_err(io)?;
    let mut text = String::new();
    f.take(MAX_KEY_PEM_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(io)?;
    if text.len() as u64 > MAX_KEY_PEM_BYTES {
        return Err(JwtError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(text)
}

/// Writes `contents` to `path` (mode 0600) unless `path` exists: a temporary file
/// is written and synced, then hard-linked to `path`, which fails when another
/// process created it first. Returns whether this call created it.
fn create_exclusive(path: &Path, contents: &str) -> Result<bool, JwtError> {
    let tmp = path.with_file_name(format!(
        ".{KEY_FILE}.{}.{:016x}.tmp",
        std::process::id(),
        rand::random::<u64>()
    ));
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| JwtError::Io { path: p, source }
    };
    let written = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io(&tmp)(e));
    }
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io(path)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{opts, WEB};
    use jsonwebtoken::{decode, decode_header, DecodingKey, Validation};
    use std::os::unix::fs::PermissionsExt;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    fn signer() -> JwtSigner {
        JwtSigner::from_pem(&JwtSigner::generate_pem().unwrap(), &td(), DEFAULT_TTL).unwrap()
    }

    fn id() -> SpiffeId {
        SpiffeId::parse(WEB).unwrap()
    }

    /// The single key of `jwks`, as a verifier parses it.
    fn jwk_of(jwks: &str) -> Jwk {
        let set: JwkSet = serde_json::from_str(jwks).unwrap();
        assert_eq!(set.keys.len(), 1);
        set.keys[0].clone()
    }

    fn validation(aud: &[&str]) -> Validation {
        let mut v = Validation::new(Algorithm::ES256);
        v.set_audience(aud);
        v.set_required_spec_claims(&["exp", "sub", "aud"]);
        v
    }

    #[test]
    fn a_token_verifies_with_the_published_jwks_and_its_claims_are_exact() {
        let s = signer();
        let now = SystemTime::now();
        let (token, exp) = s.sign(&id(), &["svc-a".to_string()], now).unwrap();
        let iat = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert_eq!(exp, iat + 300);

        let jwk = jwk_of(&s.jwks());
        let key = DecodingKey::from_jwk(&jwk).unwrap();
        let data =
            decode::<serde_json::Value>(token.as_bytes(), &key, &validation(&["svc-a"])).unwrap();
        assert_eq!(
            data.claims,
            serde_json::json!({"sub": WEB, "aud": "svc-a", "exp": exp, "iat": iat})
        );
        assert_eq!(data.header.alg, Algorithm::ES256);
        assert_eq!(data.header.kid.as_deref(), Some(s.kid()));
        assert_eq!(data.header.typ.as_deref(), Some("JWT"));

        // The header holds exactly alg, kid and typ.
        let header = decode_header(token.as_bytes()).unwrap();
        assert_eq!(
            serde_json::to_value(&header).unwrap(),
            serde_json::json!({"alg": "ES256", "kid": s.kid(), "typ": "JWT"})
        );

        // Another audience is refused.
        assert!(
            decode::<serde_json::Value>(token.as_bytes(), &key, &validation(&["other"])).is_err()
        );
    }

    #[test]
    fn several_audiences_are_an_array() {
        let s = signer();
        let auds: Vec<String> = vec!["a".into(), "b".into(), "c".into()];
        let (token, _) = s.sign(&id(), &auds, SystemTime::now()).unwrap();
        let key = DecodingKey::from_jwk(&jwk_of(&s.jwks())).unwrap();
        let data =
            decode::<serde_json::Value>(token.as_bytes(), &key, &validation(&["b"])).unwrap();
        assert_eq!(data.claims["aud"], serde_json::json!(["a", "b", "c"]));
    }

    #[test]
    fn the_jwks_is_public_and_the_kid_is_the_rfc7638_thumbprint() {
        let s = signer();
        let v: serde_json::Value = serde_json::from_str(&s.jwks()).unwrap();
        let keys = v["keys"].as_array().unwrap();
        assert_eq!(keys.len(), 1);
        let k = keys[0].as_object().unwrap();
        let mut names: Vec<&str> = k.keys().map(String::as_str).collect();
        names.sort_unstable();
        // No private parameter ("d").
        assert_eq!(names, ["alg", "crv", "kid", "kty", "use", "x", "y"]);
        assert_eq!(k["kty"], "EC");
        assert_eq!(k["crv"], "P-256");
        assert_eq!(k["alg"], "ES256");
        assert_eq!(k["use"], "sig");
        assert_eq!(k["kid"], s.kid());

        // RFC 7638: SHA-256 over the required members in lexicographic order.
        use sha2::{Digest, Sha256};
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            k["x"].as_str().unwrap(),
            k["y"].as_str().unwrap()
        );
        let digest = Sha256::digest(canonical.as_bytes());
        assert_eq!(s.kid(), base64url(&digest));
        assert_eq!(s.kid().len(), 43);
    }

    /// Unpadded base64url, written out so that the test does not share the code
    /// under test's encoder.
    fn base64url(b: &[u8]) -> String {
        const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        let mut out = String::new();
        for c in b.chunks(3) {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            for i in 0..=c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        out
    }

    #[test]
    fn audience_bounds_are_enforced() {
        let s = signer();
        let now = SystemTime::now();
        let refused = |auds: Vec<String>| match s.sign(&id(), &auds, now) {
            Err(JwtError::Audience(m)) => m,
            other => panic!("{auds:?}: {other:?}"),
        };
        assert_eq!(refused(vec![]), "at least one is required");
        assert_eq!(
            refused((0..17).map(|i| format!("a{i}")).collect()),
            "17 given, at most 16"
        );
        assert_eq!(
            refused(vec!["a".into(), String::new()]),
            "audience 1 is empty"
        );
        assert_eq!(
            refused(vec!["x".repeat(513)]),
            "audience 0 is 513 bytes long, at most 512"
        );
        // The bounds themselves are accepted.
        s.sign(
            &id(),
            &(0..16).map(|i| format!("a{i}")).collect::<Vec<_>>(),
            now,
        )
        .unwrap();
        s.sign(&id(), &["x".repeat(512)], now).unwrap();
    }

    #[test]
    fn only_workloads_of_the_trust_domain_get_a_token() {
        let s = signer();
        let aud = ["a".to_string()];
        for bad in [
            "spiffe://other.example/ns/shop/sa/web",
            "spiffe://cluster.local/_weft/node/node-a",
            "spiffe://cluster.local",
        ] {
            let err = s
                .sign(&SpiffeId::parse(bad).unwrap(), &aud, SystemTime::now())
                .unwrap_err();
            assert!(matches!(err, JwtError::Identity(..)), "{bad}: {err}");
        }
    }

    #[test]
    fn the_lifetime_is_a_setting_within_bounds() {
        let pem = JwtSigner::generate_pem().unwrap();
        let s = JwtSigner::from_pem(&pem, &td(), Duration::from_secs(60)).unwrap();
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let (_, exp) = s.sign(&id(), &["a".to_string()], now).unwrap();
        assert_eq!(exp, 1_800_000_060);
        for bad in [Duration::from_secs(1), MAX_TTL + Duration::from_secs(1)] {
            assert!(matches!(
                JwtSigner::from_pem(&pem, &td(), bad),
                Err(JwtError::Ttl(_))
            ));
        }
    }

    #[test]
    fn the_key_persists_across_load_or_create() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let a = JwtSigner::load_or_create(&o, DEFAULT_TTL).unwrap();
        let path = dir.path().join("ca").join(KEY_FILE);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let pem = fs::read_to_string(&path).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----"), "{pem}");

        // A restart (and the CA's own load) keeps the key.
        crate::identity::Ca::load_or_create(&o).unwrap();
        let b = JwtSigner::load_or_create(&o, DEFAULT_TTL).unwrap();
        assert_eq!(a.kid(), b.kid());
        assert_eq!(a.jwks(), b.jwks());
        assert_eq!(fs::read_to_string(&path).unwrap(), pem);
        // A token of one verifies with the other's JWKS.
        let (token, _) = a
            .sign(&id(), &["x".to_string()], SystemTime::now())
            .unwrap();
        let key = DecodingKey::from_jwk(&jwk_of(&b.jwks())).unwrap();
        decode::<serde_json::Value>(token.as_bytes(), &key, &validation(&["x"])).unwrap();
        // No temporary file is left behind.
        let names: Vec<String> = fs::read_dir(dir.path().join("ca"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("jwt"))
            .collect();
        assert_eq!(names, [KEY_FILE]);
    }

    #[test]
    fn an_existing_key_is_never_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        let path = o.dir().join(KEY_FILE);
        create_private_dir(&o.dir()).unwrap();
        let first = JwtSigner::generate_pem().unwrap();
        assert!(create_exclusive(&path, &first).unwrap());
        assert!(!create_exclusive(&path, &JwtSigner::generate_pem().unwrap()).unwrap());
        assert_eq!(fs::read_to_string(&path).unwrap(), first);
        let s = JwtSigner::load_or_create(&o, DEFAULT_TTL).unwrap();
        let expected = JwtSigner::from_pem(&first, &td(), DEFAULT_TTL).unwrap();
        assert_eq!(s.kid(), expected.kid());
    }

    #[test]
    fn unusable_key_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let o = opts(dir.path());
        create_private_dir(&o.dir()).unwrap();
        let path = o.dir().join(KEY_FILE);
        fs::write(&path, "not a key").unwrap();
        assert!(matches!(
            JwtSigner::load_or_create(&o, DEFAULT_TTL),
            Err(JwtError::BadKey(_))
        ));
        fs::write(&path, "x".repeat(20_000)).unwrap();
        assert!(matches!(
            JwtSigner::load_or_create(&o, DEFAULT_TTL),
            Err(JwtError::TooLarge { .. })
        ));
        // An Ed25519 key is not a P-256 key.
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519)
            .unwrap()
            .serialize_pem();
        assert!(matches!(
            JwtSigner::from_pem(&ed, &td(), DEFAULT_TTL),
            Err(JwtError::BadKey(_))
        ));
    }
}
