//! Certificate inspection shared by the control plane and the node.

use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The single URI SAN of a DER certificate. SPIFFE requires exactly one; anything
/// else is an error naming what was found.
pub fn single_uri_san(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("certificate does not parse: {e}"))?;
    let san = cert
        .subject_alternative_name()
        .map_err(|e| format!("bad SAN extension: {e}"))?
        .ok_or("certificate has no SAN")?;
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    match uris.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err("certificate has no URI SAN".into()),
        many => Err(format!(
            "certificate has {} URI SANs ({many:?}); exactly one is allowed",
            many.len()
        )),
    }
}

/// Was `leaf_der` signed with the key of `issuer_der`? False when either does not
/// parse or the signature does not verify.
pub fn signed_by(leaf_der: &[u8], issuer_der: &[u8]) -> bool {
    let (Ok((_, leaf)), Ok((_, issuer))) = (
        X509Certificate::from_der(leaf_der),
        X509Certificate::from_der(issuer_der),
    ) else {
        return false;
    };
    leaf.verify_signature(Some(issuer.public_key())).is_ok()
}

/// SHA-256 (lowercase hex) of `text`: how a trust bundle is named in status reports.
pub fn sha256_hex(text: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(text.as_bytes()))
}
