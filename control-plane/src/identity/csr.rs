//! Parsing and checking PKCS#10 CSRs with x509-parser before anything is signed.

use weft_proto::spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::FromDer;

/// Why a CSR was refused. `reason()` is the bounded metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    #[error("CSR is not valid DER PKCS#10: {0}")]
    Malformed(String),
    #[error("CSR has trailing bytes after the request")]
    TrailingBytes,
    #[error("CSR signature does not verify with its own public key")]
    BadSignature,
    #[error("CSR key type {0} is not allowed: only ECDSA P-256 keys are signed")]
    KeyType(String),
    #[error("CSR carries no URI SAN; it must carry exactly {0}")]
    NoSan(String),
    #[error("CSR carries {0} SANs; it must carry exactly one URI SAN")]
    MultipleSans(usize),
    #[error("CSR asks for {found:?} but the request is for {requested}")]
    SanMismatch { requested: String, found: String },
}

impl CsrError {
    pub fn reason(&self) -> &'static str {
        match self {
            CsrError::Malformed(_) | CsrError::TrailingBytes => "malformed_csr",
            CsrError::BadSignature => "bad_signature",
            CsrError::KeyType(_) => "key_type",
            CsrError::NoSan(_) | CsrError::MultipleSans(_) | CsrError::SanMismatch { .. } => {
                "san_mismatch"
            }
        }
    }
}

/// A CSR whose signature, key type and SAN were checked.
#[derive(Debug)]
pub struct VerifiedCsr {
    /// DER SubjectPublicKeyInfo of the requester's key.
    pub spki_der: Vec<u8>,
}

/// Checks that `der` is a self-consistent CSR for exactly `requested` with a P-256 key.
pub fn verify(der: &[u8], requested: &SpiffeId) -> Result<VerifiedCsr, CsrError> {
    let (rest, csr) =
        X509CertificationRequest::from_der(der).map_err(|e| CsrError::Malformed(e.to_string()))?;
    if !rest.is_empty() {
        return Err(CsrError::TrailingBytes);
    }
    csr.verify_signature().map_err(|_| CsrError::BadSignature)?;

    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm;
    let is_p256 = alg.algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY
        && alg
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|o| o == OID_EC_P256);
    if !is_p256 {
        return Err(CsrError::KeyType(alg.algorithm.to_id_string()));
    }

    let mut names: Vec<String> = Vec::new();
    if let Some(exts) = csr.requested_extensions() {
        for ext in exts {
            if let ParsedExtension::SubjectAlternativeName(san) = ext {
                for n in &san.general_names {
                    names.push(match n {
                        GeneralName::URI(u) => u.to_string(),
                        other => format!("{other}"),
                    });
                }
            }
        }
    }
    let want = requested.to_string();
    match names.as_slice() {
        [] => Err(CsrError::NoSan(want)),
        [one] if *one == want => Ok(VerifiedCsr {
            spki_der: spki.raw.to_vec(),
        }),
        [one] => Err(CsrError::SanMismatch {
            requested: want,
            found: one.clone(),
        }),
        many => Err(CsrError::MultipleSans(many.len())),
    }
}
