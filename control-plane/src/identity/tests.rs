//! CA tests: persistence, SVID conformance field by field, CSR rejections,
//! user-provided intermediates.

use super::*;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
    SanType, PKCS_ECDSA_P256_SHA256, PKCS_ED25519,
};
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;
use weft_proto::spiffe::{SpiffeId, TrustDomain};
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::oid_registry::{OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY};
use x509_parser::prelude::{FromDer, X509Certificate};

pub(crate) fn opts(dir: &std::path::Path) -> CaOptions {
    CaOptions {
        state_dir: dir.to_path_buf(),
        trust_domain: TrustDomain::new("cluster.local").unwrap(),
        svid_ttl: Duration::from_secs(24 * 3600),
        user_cert: None,
        user_key: None,
        user_bundle: None,
    }
}

pub(crate) fn csr_for(sans: &[&str], key: &KeyPair) -> Vec<u8> {
    let mut p = CertificateParams::default();
    p.distinguished_name = DistinguishedName::new();
    p.subject_alt_names = sans
        .iter()
        .map(|s| SanType::URI((*s).to_string().try_into().unwrap()))
        .collect();
    p.serialize_request(key).unwrap().der().to_vec()
}

pub(crate) fn p256() -> KeyPair {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap()
}

pub(crate) fn der_chain(pem: &str) -> Vec<Vec<u8>> {
    ca::pem_blocks(pem, "CERTIFICATE").unwrap()
}

pub(crate) const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

#[test]
fn creates_persists_and_reloads_with_private_permissions() {
    let dir = tempfile::tempdir().unwrap();
    let a = Ca::load_or_create(&opts(dir.path())).unwrap();
    for f in ["ca.key", "ca.crt", "root-bundle.crt"] {
        let mode = std::fs::metadata(dir.path().join("ca").join(f))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{f}");
    }
    let mode = std::fs::metadata(dir.path().join("ca"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o700);
    let b = Ca::load_or_create(&opts(dir.path())).unwrap();
    assert_eq!(
        a.bundle_pem(),
        b.bundle_pem(),
        "reload must keep the same root"
    );
    // The root is a proper signing certificate whose SPIFFE ID has no path.
    let root = &der_chain(a.bundle_pem())[0];
    let (_, x) = X509Certificate::from_der(root).unwrap();
    assert!(x.is_ca());
    assert!(x.key_usage().unwrap().unwrap().value.key_cert_sign());
    let san = x.subject_alternative_name().unwrap().unwrap();
    assert_eq!(
        san.value.general_names,
        vec![GeneralName::URI("spiffe://cluster.local")]
    );
}

#[test]
fn svid_meets_every_must_of_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
    let key = p256();
    let id = SpiffeId::parse(WEB).unwrap();
    let issued = ca.sign_svid(&csr_for(&[WEB], &key), &id).unwrap();
    let chain = der_chain(&issued.chain_pem);
    assert_eq!(
        chain.len(),
        1,
        "a self-signed root is not appended to the chain"
    );
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();

    assert_eq!(leaf.version().0, 2, "X.509 v3");
    // Exactly one URI SAN, the requested ID; empty subject -> SAN critical.
    let san = leaf.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names, vec![GeneralName::URI(WEB)]);
    assert_eq!(leaf.subject().iter().count(), 0);
    assert!(
        san.critical,
        "SAN must be critical when the subject is empty"
    );
    // cA = false, present.
    let bc = leaf.basic_constraints().unwrap().unwrap();
    assert!(!bc.value.ca);
    // Key usage: present, critical, digitalSignature, never keyCertSign / cRLSign.
    let ku = leaf.key_usage().unwrap().unwrap();
    assert!(ku.critical);
    assert!(ku.value.digital_signature());
    assert!(!ku.value.key_cert_sign());
    assert!(!ku.value.crl_sign());
    // EKU: serverAuth and clientAuth.
    let eku = leaf.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.server_auth && eku.value.client_auth);
    // ECDSA P-256 key, the requester's.
    let alg = &leaf.public_key().algorithm;
    assert_eq!(alg.algorithm, OID_KEY_TYPE_EC_PUBLIC_KEY);
    assert_eq!(
        alg.parameters.as_ref().unwrap().as_oid().unwrap(),
        OID_EC_P256
    );
    assert_eq!(
        leaf.public_key().subject_public_key.data.as_ref(),
        key.public_key_raw()
    );
    // Signed by the CA.
    let root = &der_chain(ca.bundle_pem())[0];
    let (_, root) = X509Certificate::from_der(root).unwrap();
    leaf.verify_signature(Some(root.public_key())).unwrap();
    assert_eq!(leaf.issuer(), root.subject());
    // Default TTL 24 h (minus the 60 s backdate tolerance).
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 24 * 3600 + 60);
    // Authority key identifier present; serial positive and random.
    assert!(leaf.extensions().iter().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    assert_eq!(leaf.raw_serial().len(), 16);
    assert!(leaf.raw_serial()[0] < 0x80);
    let again = ca.sign_svid(&csr_for(&[WEB], &key), &id).unwrap();
    assert_ne!(again.serial_hex, issued.serial_hex);
}

#[test]
fn ttl_is_configurable() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = opts(dir.path());
    o.svid_ttl = Duration::from_secs(600);
    let ca = Ca::load_or_create(&o).unwrap();
    let issued = ca
        .sign_svid(&csr_for(&[WEB], &p256()), &SpiffeId::parse(WEB).unwrap())
        .unwrap();
    let chain = der_chain(&issued.chain_pem);
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let life = leaf.validity().not_after.timestamp() - leaf.validity().not_before.timestamp();
    assert_eq!(life, 600 + 60);
}

#[test]
fn csr_rejections() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
    let id = SpiffeId::parse(WEB).unwrap();
    let key = p256();

    let reason = |r: Result<IssuedCert, CaError>| match r {
        Err(CaError::Csr(e)) => e,
        other => panic!("expected a CSR error, got {other:?}"),
    };
    // Wrong SAN.
    let e = reason(ca.sign_svid(
        &csr_for(&["spiffe://cluster.local/ns/shop/sa/admin"], &key),
        &id,
    ));
    assert!(matches!(e, CsrError::SanMismatch { .. }), "{e}");
    // Two SANs.
    let e = reason(ca.sign_svid(
        &csr_for(&[WEB, "spiffe://cluster.local/ns/x/sa/y"], &key),
        &id,
    ));
    assert_eq!(e, CsrError::MultipleSans(2));
    // No SAN.
    let e = reason(ca.sign_svid(&csr_for(&[], &key), &id));
    assert!(matches!(e, CsrError::NoSan(_)));
    // Bad signature: flip a bit in the signature (the last bytes of the DER).
    let mut der = csr_for(&[WEB], &key);
    let n = der.len();
    der[n - 3] ^= 0x01;
    assert_eq!(reason(ca.sign_svid(&der, &id)), CsrError::BadSignature);
    // Garbage.
    let e = reason(ca.sign_svid(b"definitely not a CSR", &id));
    assert!(matches!(e, CsrError::Malformed(_)));
    assert_eq!(e.reason(), "malformed_csr");
    // Trailing bytes.
    let mut der = csr_for(&[WEB], &key);
    der.extend_from_slice(b"xx");
    assert_eq!(reason(ca.sign_svid(&der, &id)), CsrError::TrailingBytes);
    // Key type not allowed.
    let ed = KeyPair::generate_for(&PKCS_ED25519).unwrap();
    let e = reason(ca.sign_svid(&csr_for(&[WEB], &ed), &id));
    assert!(matches!(e, CsrError::KeyType(_)), "{e}");
    // Other trust domain, non-workload ID.
    let other = SpiffeId::parse("spiffe://evil.example/ns/shop/sa/web").unwrap();
    assert!(matches!(
        ca.sign_svid(&csr_for(&[&other.to_string()], &key), &other),
        Err(CaError::Identity(..))
    ));
    let node_like = SpiffeId::parse("spiffe://cluster.local/_weft/node/node-a").unwrap();
    assert!(matches!(
        ca.sign_svid(&csr_for(&[&node_like.to_string()], &key), &node_like),
        Err(CaError::Identity(..))
    ));
}

fn write(dir: &std::path::Path, name: &str, s: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, s).unwrap();
    p
}

#[test]
fn user_provided_intermediate() {
    let dir = tempfile::tempdir().unwrap();
    // An offline root and an intermediate for the mesh.
    let root_key = p256();
    let mut rp = CertificateParams::default();
    rp.distinguished_name.push(DnType::CommonName, "corp root");
    rp.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    rp.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let root = rp.self_signed(&root_key).unwrap();
    let root_issuer = rcgen::Issuer::new(rp, &root_key);
    let int_key = p256();
    let mut ip = CertificateParams::default();
    ip.distinguished_name
        .push(DnType::CommonName, "mesh intermediate");
    ip.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ip.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let int = ip.signed_by(&int_key, &root_issuer).unwrap();

    let mut o = opts(dir.path());
    o.user_cert = Some(write(dir.path(), "int.crt", &int.pem()));
    o.user_key = Some(write(dir.path(), "int.key", &int_key.serialize_pem()));
    // Without the root bundle: refused with a clear message.
    let err = Ca::load_or_create(&o).err().unwrap().to_string();
    assert!(err.contains("--ca-bundle"), "{err}");
    o.user_bundle = Some(write(dir.path(), "root.crt", &root.pem()));
    let ca = Ca::load_or_create(&o).unwrap();
    assert_eq!(ca.bundle_pem(), root.pem());
    let issued = ca
        .sign_svid(&csr_for(&[WEB], &p256()), &SpiffeId::parse(WEB).unwrap())
        .unwrap();
    let chain = der_chain(&issued.chain_pem);
    assert_eq!(chain.len(), 2, "leaf + intermediate");
    let (_, leaf) = X509Certificate::from_der(&chain[0]).unwrap();
    let (_, inter) = X509Certificate::from_der(&chain[1]).unwrap();
    let (_, r) = X509Certificate::from_der(root.der()).unwrap();
    leaf.verify_signature(Some(inter.public_key())).unwrap();
    inter.verify_signature(Some(r.public_key())).unwrap();
    let mode = std::fs::metadata(dir.path().join("ca/ca.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // A key that does not belong to the certificate is refused.
    o.user_key = Some(write(dir.path(), "other.key", &p256().serialize_pem()));
    let err = Ca::load_or_create(&o).err().unwrap().to_string();
    assert!(err.contains("does not belong"), "{err}");
    // A non-CA certificate is refused.
    let leaf_key = p256();
    let lp = CertificateParams::new(vec!["x.example".to_string()]).unwrap();
    let leaf_cert = lp.self_signed(&leaf_key).unwrap();
    o.user_cert = Some(write(dir.path(), "leaf.crt", &leaf_cert.pem()));
    o.user_key = Some(write(dir.path(), "leaf.key", &leaf_key.serialize_pem()));
    let err = Ca::load_or_create(&o).err().unwrap().to_string();
    assert!(err.contains("not a CA"), "{err}");
}

#[test]
fn node_credentials_are_client_only_and_named() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
    let (c, _key) = ca
        .issue_node_credential("node-a", Duration::from_secs(3600))
        .unwrap();
    let chain = der_chain(&c.chain_pem);
    let (_, x) = X509Certificate::from_der(&chain[0]).unwrap();
    let eku = x.extended_key_usage().unwrap().unwrap();
    assert!(eku.value.client_auth && !eku.value.server_auth);
    assert!(ca
        .issue_node_credential("bad/name", Duration::from_secs(60))
        .is_err());
}
