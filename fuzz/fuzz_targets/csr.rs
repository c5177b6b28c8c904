//! CSR parsing and checking (control-plane `identity/csr.rs`) before anything is
//! signed, for the identity `spiffe://cluster.local/ns/shop/sa/web`.
//!
//! The first byte chooses the mode. Below 0x80 the rest is a DER CSR as a client
//! sends it. From 0x80 on the rest lists the SANs of a CSR that the target builds
//! and signs itself (so the checks after the signature are reached), one per line
//! (`U:<uri>`, `D:<dns name>`, `E:<email>`, `I:<ip>`), with a P-256 key, or an
//! Ed25519 one when bit 0 is set.
//!
//! Properties, besides never panicking:
//! - the answer is deterministic; a CSR accepted for one identity is refused for
//!   any other;
//! - an accepted CSR parses, is self-signed correctly, has a P-256 key whose
//!   SubjectPublicKeyInfo is what is returned, and names exactly the requested URI
//!   and nothing else;
//! - a CSR built with a given key and SANs is accepted exactly when the key is
//!   P-256 and the SANs are the one requested URI.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rcgen::{
    CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use std::sync::OnceLock;
use weft_control_plane::identity::csr::verify;
use weft_control_plane::identity::CsrError;
use weft_proto::spiffe::SpiffeId;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::FromDer;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const OTHER: &str = "spiffe://cluster.local/ns/shop/sa/db";

fn keys() -> &'static (KeyPair, KeyPair) {
    static K: OnceLock<(KeyPair, KeyPair)> = OnceLock::new();
    K.get_or_init(|| {
        (
            KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key"),
            KeyPair::generate_for(&PKCS_ED25519).expect("Ed25519 key"),
        )
    })
}

fn check_accepted(der: &[u8], spki: &[u8]) {
    let (rest, csr) = X509CertificationRequest::from_der(der).expect("an accepted CSR parses");
    assert!(rest.is_empty());
    csr.verify_signature()
        .expect("an accepted CSR is signed by its key");
    let info = &csr.certification_request_info;
    assert_eq!(info.subject_pki.raw, spki, "returned key is not the CSR's");
    let mut names = Vec::new();
    for ext in csr.requested_extensions().into_iter().flatten() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext {
            names.extend(san.general_names.iter().cloned());
        }
    }
    assert!(
        matches!(names.as_slice(), [GeneralName::URI(u)] if *u == WEB),
        "accepted with SANs {names:?}"
    );
}

fn raw(der: &[u8]) {
    let web = SpiffeId::parse(WEB).expect("id");
    let other = SpiffeId::parse(OTHER).expect("id");
    let r = verify(der, &web);
    let again = verify(der, &web);
    assert_eq!(
        r.as_ref().map(|v| &v.spki_der),
        again.as_ref().map(|v| &v.spki_der)
    );
    assert_eq!(r.as_ref().err(), again.as_ref().err());
    if let Ok(v) = &r {
        check_accepted(der, &v.spki_der);
        assert!(
            matches!(verify(der, &other), Err(CsrError::SanMismatch { .. })),
            "accepted for two identities"
        );
    }
}

fn built(ed25519: bool, sans: &str) {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    let mut list = Vec::new();
    for line in sans.lines().take(8) {
        let san = match line.split_at_checked(2) {
            Some(("U:", v)) => v.to_string().try_into().ok().map(SanType::URI),
            Some(("D:", v)) => v.to_string().try_into().ok().map(SanType::DnsName),
            Some(("E:", v)) => v.to_string().try_into().ok().map(SanType::Rfc822Name),
            Some(("I:", v)) => v.parse().ok().map(SanType::IpAddress),
            _ => None,
        };
        match san {
            Some(s) => list.push((line.to_string(), s)),
            None => return,
        }
    }
    p.subject_alt_names = list.iter().map(|(_, s)| s.clone()).collect();
    let (p256, ed) = keys();
    let key = if ed25519 { ed } else { p256 };
    let Ok(csr) = p.serialize_request(key) else {
        return;
    };
    let der = csr.der().to_vec();
    raw(&der);
    let r = verify(&der, &SpiffeId::parse(WEB).expect("id"));
    let want_ok = !ed25519 && list.len() == 1 && list[0].0 == format!("U:{WEB}");
    match (&r, want_ok) {
        (Ok(_), true) => {}
        (Err(e), false) => {
            if ed25519 {
                assert!(matches!(e, CsrError::KeyType(_)), "{e}");
            }
        }
        (r, _) => panic!("SANs {list:?} (Ed25519: {ed25519}) gave {r:?}"),
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode < 0x80 {
        raw(rest);
    } else {
        built(mode & 1 == 1, &String::from_utf8_lossy(rest));
    }
});
