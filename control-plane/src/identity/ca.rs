//! The certificate authority: creates (or loads) the signing key and certificate,
//! persists them under the state directory with 0600 permissions, and issues
//! X.509-SVIDs that meet every MUST of the SPIFFE X509-SVID standard.

use super::csr::{self, CsrError};
use super::NODE_ID_PREFIX;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, SubjectPublicKeyInfo,
    PKCS_ECDSA_P256_SHA256,
};
use std::fs;
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use time::OffsetDateTime;
use weft_proto::spiffe::{SpiffeId, TrustDomain};
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error)]
pub enum CaError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    BadFile { path: PathBuf, message: String },
    #[error("user-provided CA: {0}")]
    UserCa(String),
    #[error("certificate generation failed: {0}")]
    Rcgen(#[from] rcgen::Error),
    #[error(transparent)]
    Csr(#[from] CsrError),
    #[error("{0} is not a valid SPIFFE ID for this use: {1}")]
    Identity(String, String),
}

/// Where the CA comes from and how it signs.
#[derive(Debug, Clone)]
pub struct CaOptions {
    pub state_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// User-provided signing certificate (may be an intermediate, optionally followed
    /// by its own issuers up to but excluding the root) and key.
    pub user_cert: Option<PathBuf>,
    pub user_key: Option<PathBuf>,
    /// Root certificates for the trust bundle; required when `user_cert` is an intermediate.
    pub user_bundle: Option<PathBuf>,
}

impl CaOptions {
    /// The directory the CA's files (and the JWT-SVID signing key) live in:
    /// `<state_dir>/ca`, mode 0700.
    pub fn dir(&self) -> PathBuf {
        self.state_dir.join("ca")
    }
}

/// A freshly issued certificate: PEM chain (leaf first, then intermediates) and metadata.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub chain_pem: String,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// Signing cert and any intermediates above it (PEM), appended to every leaf.
    chain_pem: String,
    /// The signing certificate alone (PEM).
    cert_pem: String,
    bundle_pem: String,
    trust_domain: TrustDomain,
    svid_ttl: Duration,
    not_after: SystemTime,
}

const ROOT_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Every certificate's notBefore is this much before its issuance (clock skew).
pub const BACKDATE: Duration = Duration::from_secs(60);

impl Ca {
    /// Loads the CA from the state directory (or the user-provided files), creating a
    /// new self-signed root on first start.
    /// (Call it through [`super::stored::load_or_create`], which first completes an
    /// interrupted CA rotation and refuses flags naming a retired CA.)
    pub fn load_or_create(opts: &CaOptions) -> Result<Self, CaError> {
        let dir = opts.dir();
        create_private_dir(&dir)?;
        let (cert_path, key_path, bundle_path) = (
            dir.join("ca.crt"),
            dir.join("ca.key"),
            dir.join("root-bundle.crt"),
        );

        if let (Some(c), Some(k)) = (&opts.user_cert, &opts.user_key) {
            let chain = read(c)?;
            let key = read(k)?;
            let bundle = match &opts.user_bundle {
                Some(b) => Some(read(b)?),
                None => None,
            };
            let ca = Self::from_pem(
                &chain,
                &key,
                bundle.as_deref(),
                &opts.trust_domain,
                opts.svid_ttl,
            )?;
            write_private(&cert_path, &ca.chain_pem)?;
            write_private(&key_path, &key)?;
            write_private(&bundle_path, &ca.bundle_pem)?;
            return Ok(ca);
        }
        if opts.user_cert.is_some() || opts.user_key.is_some() {
            return Err(CaError::UserCa(
                "both --ca-cert and --ca-key must be given".into(),
            ));
        }
        if cert_path.exists() && key_path.exists() {
            let chain = read(&cert_path)?;
            let key = read(&key_path)?;
            let bundle = if bundle_path.exists() {
                Some(read(&bundle_path)?)
            } else {
                None
            };
            return Self::from_pem(
                &chain,
                &key,
                bundle.as_deref(),
                &opts.trust_domain,
                opts.svid_ttl,
            );
        }

        let (pem, key_pem) = new_root(&opts.trust_domain)?;
        write_private(&key_path, &key_pem)?;
        write_private(&cert_path, &pem)?;
        write_private(&bundle_path, &pem)?;
        tracing::info!(path = %dir.display(), trust_domain = %opts.trust_domain, "created a new root CA");
        Self::from_pem(
            &pem,
            &key_pem,
            Some(&pem),
            &opts.trust_domain,
            opts.svid_ttl,
        )
    }

    /// A CA from PEM text: the signing certificate (plus intermediates above it),
    /// its key, and the trust bundle (required when the signer is an intermediate).
    pub fn from_pem(
        chain: &str,
        key_pem: &str,
        bundle: Option<&str>,
        trust_domain: &TrustDomain,
        svid_ttl: Duration,
    ) -> Result<Self, CaError> {
        let certs = pem_blocks(chain, "CERTIFICATE")
            .map_err(|m| CaError::UserCa(format!("CA certificate: {m}")))?;
        let first = certs
            .first()
            .ok_or_else(|| CaError::UserCa("CA certificate file holds no certificate".into()))?;
        let (_, x509) = X509Certificate::from_der(first)
            .map_err(|e| CaError::UserCa(format!("CA certificate does not parse: {e}")))?;
        if !x509.is_ca() {
            return Err(CaError::UserCa(
                "the signing certificate is not a CA (basicConstraints cA=false)".into(),
            ));
        }
        if !x509
            .key_usage()
            .ok()
            .flatten()
            .is_some_and(|ku| ku.value.key_cert_sign())
        {
            return Err(CaError::UserCa(
                "the signing certificate lacks the keyCertSign key usage".into(),
            ));
        }
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| CaError::UserCa(format!("CA key does not parse: {e}")))?;
        if key.public_key_raw() != x509.public_key().subject_public_key.data.as_ref() {
            return Err(CaError::UserCa(
                "the CA key does not belong to the CA certificate".into(),
            ));
        }
        let self_signed = x509.subject() == x509.issuer() && x509.verify_signature(None).is_ok();
        let bundle_pem = match bundle {
            Some(b) => {
                let roots = pem_blocks(b, "CERTIFICATE")
                    .map_err(|m| CaError::UserCa(format!("CA bundle: {m}")))?;
                if roots.is_empty() {
                    return Err(CaError::UserCa("CA bundle holds no certificate".into()));
                }
                b.to_string()
            }
            None if self_signed => pem_of(first),
            None => {
                return Err(CaError::UserCa(
                    "the CA certificate is an intermediate: give the root(s) with --ca-bundle"
                        .into(),
                ))
            }
        };
        let not_after = SystemTime::UNIX_EPOCH
            + Duration::from_secs(x509.validity().not_after.timestamp().max(0) as u64);
        // The chain appended to leaves: the signing cert and its intermediates, never
        // a self-signed root (peers already hold it in the bundle).
        let chain_pem = if self_signed {
            String::new()
        } else {
            certs.iter().map(|c| pem_of(c)).collect()
        };
        let issuer = Issuer::from_ca_cert_der(&first.clone().into(), key)
            .map_err(|e| CaError::UserCa(format!("CA certificate unusable: {e}")))?;
        Ok(Self {
            issuer,
            chain_pem,
            cert_pem: pem_of(first),
            bundle_pem,
            trust_domain: trust_domain.clone(),
            svid_ttl,
            not_after,
        })
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    /// Root certificates peers trust (PEM).
    pub fn bundle_pem(&self) -> &str {
        &self.bundle_pem
    }
    /// The signing certificate (PEM): nodes check which certificates it signed.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }
    pub fn not_after(&self) -> SystemTime {
        self.not_after
    }
    pub fn svid_ttl(&self) -> Duration {
        self.svid_ttl
    }

    /// Verifies `csr_der` (signature, key type, exactly `requested` as its only SAN)
    /// and signs an X.509-SVID for it.
    pub fn sign_svid(&self, csr_der: &[u8], requested: &SpiffeId) -> Result<IssuedCert, CaError> {
        if requested.trust_domain() != &self.trust_domain {
            return Err(CaError::Identity(
                requested.to_string(),
                format!("trust domain is not {}", self.trust_domain),
            ));
        }
        requested
            .workload()
            .map_err(|e| CaError::Identity(requested.to_string(), e.to_string()))?;
        let verified = csr::verify(csr_der, requested)?;
        let spki = SubjectPublicKeyInfo::from_der(&verified.spki_der)?;
        self.issue_leaf(&spki, requested, self.svid_ttl, Leaf::Svid)
    }

    /// Issues a node-agent client credential `spiffe://<td>/_weft/node/<node>`.
    pub fn issue_node_credential(
        &self,
        node: &str,
        ttl: Duration,
    ) -> Result<(IssuedCert, String), CaError> {
        let id = self.node_id(node)?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let issued = self.issue_leaf(&key, &id, ttl, Leaf::Node(node))?;
        Ok((issued, key.serialize_pem()))
    }

    /// Renews a node credential: verifies `csr_der` (signature, key type, exactly the
    /// node's ID as its only SAN) and issues a credential of `node` for its key. The
    /// key never leaves the node.
    pub fn renew_node_credential(
        &self,
        csr_der: &[u8],
        node: &str,
        ttl: Duration,
    ) -> Result<IssuedCert, CaError> {
        let id = self.node_id(node)?;
        let verified = csr::verify(csr_der, &id)?;
        let spki = SubjectPublicKeyInfo::from_der(&verified.spki_der)?;
        self.issue_leaf(&spki, &id, ttl, Leaf::Node(node))
    }

    /// `spiffe://<td>/_weft/node/<node>`.
    fn node_id(&self, node: &str) -> Result<SpiffeId, CaError> {
        if node.is_empty() || node.contains('/') {
            return Err(CaError::Identity(
                node.to_string(),
                "a node name is one non-empty path segment".into(),
            ));
        }
        SpiffeId::parse(&format!(
            "spiffe://{}{NODE_ID_PREFIX}{node}",
            self.trust_domain
        ))
        .map_err(|e| CaError::Identity(node.to_string(), e.to_string()))
    }

    /// Issues the control plane's TLS serving certificate.
    pub fn issue_server_cert(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(IssuedCert, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = self.base_params(ttl);
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "weft-control-plane");
        params.distinguished_name = dn;
        for n in dns_names {
            params
                .subject_alt_names
                .push(SanType::DnsName(n.clone().try_into()?));
        }
        for ip in ips {
            params.subject_alt_names.push(SanType::IpAddress(*ip));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok((self.finish(&params, cert.pem()), key.serialize_pem()))
    }

    fn base_params(&self, ttl: Duration) -> CertificateParams {
        let now = SystemTime::now();
        let not_after = (now + ttl).min(self.not_after);
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.not_before = OffsetDateTime::from(now - BACKDATE);
        params.not_after = OffsetDateTime::from(not_after);
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.use_authority_key_identifier_extension = true;
        params
    }

    fn issue_leaf(
        &self,
        public_key: &impl rcgen::PublicKeyData,
        id: &SpiffeId,
        ttl: Duration,
        kind: Leaf<'_>,
    ) -> Result<IssuedCert, CaError> {
        let mut params = self.base_params(ttl);
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        params.extended_key_usages = match kind {
            Leaf::Svid => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
            Leaf::Node(node) => {
                let mut dn = DistinguishedName::new();
                dn.push(DnType::OrganizationName, "weft nodes");
                dn.push(DnType::CommonName, node);
                params.distinguished_name = dn;
                vec![ExtendedKeyUsagePurpose::ClientAuth]
            }
        };
        let cert = params.signed_by(public_key, &self.issuer)?;
        Ok(self.finish(&params, cert.pem()))
    }

    fn finish(&self, params: &CertificateParams, leaf_pem: String) -> IssuedCert {
        let serial_hex = params
            .serial_number
            .as_ref()
            .map(|s| hex_string(s.as_ref()))
            .unwrap_or_default();
        IssuedCert {
            chain_pem: format!("{leaf_pem}{}", self.chain_pem),
            serial_hex,
            not_after: SystemTime::from(params.not_after),
        }
    }
}

enum Leaf<'a> {
    Svid,
    Node(&'a str),
}

fn hex_string(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn random_serial() -> SerialNumber {
    let mut b: [u8; 16] = rand::random();
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte, so the encoding keeps all 16 bytes
    SerialNumber::from_slice(&b)
}

/// A new self-signed root for `td`: (certificate PEM, private key PEM).
pub fn new_root(td: &TrustDomain) -> Result<(String, String), CaError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "weft");
    dn.push(DnType::CommonName, format!("weft root CA ({})", td));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.subject_alt_names = vec![SanType::URI(td.id().try_into()?)];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_VALIDITY).into();
    params.serial_number = Some(random_serial());
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

/// DER blocks of the given PEM label, in order.
pub fn pem_blocks(pem: &str, label: &str) -> Result<Vec<Vec<u8>>, String> {
    let mut out = Vec::new();
    for p in Pem::iter_from_buffer(pem.as_bytes()) {
        let p = p.map_err(|e| format!("invalid PEM: {e}"))?;
        if p.label == label {
            out.push(p.contents);
        }
    }
    Ok(out)
}

/// A certificate as PEM with LF line endings (as rcgen writes them).
pub fn pem_of(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

fn read(p: &Path) -> Result<String, CaError> {
    fs::read_to_string(p).map_err(|source| CaError::Io {
        path: p.to_path_buf(),
        source,
    })
}

pub(crate) fn create_private_dir(dir: &Path) -> Result<(), CaError> {
    fs::create_dir_all(dir)
        .and_then(|_| fs::set_permissions(dir, fs::Permissions::from_mode(0o700)))
        .map_err(|source| CaError::Io {
            path: dir.to_path_buf(),
            source,
        })
}

/// Writes `contents` to `path` with mode 0600 (atomically, via a temporary file).
pub fn write_private(path: &Path, contents: &str) -> Result<(), CaError> {
    let tmp = path.with_extension("tmp");
    let res = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(contents.as_bytes())?;
        f.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o600))?;
        fs::rename(&tmp, path)
    })();
    res.map_err(|source| CaError::Io {
        path: path.to_path_buf(),
        source,
    })
}
