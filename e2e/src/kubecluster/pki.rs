//! The cluster's certificates: one throwaway CA signs the API server's serving
//! certificate, every component's client certificate (the user is the common
//! name, the groups are organizations, as Kubernetes reads them) and each
//! kubelet's serving certificate.

use anyhow::Context;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

pub struct Pki {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
}

/// What a certificate is for.
pub enum Usage {
    Client,
    Server,
}

impl Pki {
    /// Creates the CA (`ca.crt`, `ca.key`) in `dir`.
    pub fn new(dir: &Path) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "weft-e2e kubernetes CA");
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::CrlSign,
        ];
        let cert = params.self_signed(&key)?;
        write(&dir.join("ca.crt"), &cert.pem())?;
        write(&dir.join("ca.key"), &key.serialize_pem())?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer: Issuer::new(params, key),
        })
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }

    /// Issues `<name>.crt` and `<name>.key` for `common_name` in `groups`, valid
    /// for the given DNS names and IP addresses. Returns (certificate, key) paths.
    pub fn issue(
        &self,
        name: &str,
        common_name: &str,
        groups: &[&str],
        dns: &[&str],
        ips: &[IpAddr],
        usage: Usage,
    ) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params =
            CertificateParams::new(dns.iter().map(|s| s.to_string()).collect::<Vec<_>>())?;
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        for g in groups {
            params.distinguished_name.push(DnType::OrganizationName, *g);
        }
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![match usage {
            Usage::Client => ExtendedKeyUsagePurpose::ClientAuth,
            Usage::Server => ExtendedKeyUsagePurpose::ServerAuth,
        }];
        let cert = params
            .signed_by(&key, &self.issuer)
            .with_context(|| format!("signing the certificate of {common_name}"))?;
        let (crt, k) = (
            self.dir.join(format!("{name}.crt")),
            self.dir.join(format!("{name}.key")),
        );
        write(&crt, &cert.pem())?;
        write(&k, &key.serialize_pem())?;
        Ok((crt, k))
    }

    /// A key pair for signing ServiceAccount tokens: `sa.key`, `sa.pub`.
    pub fn service_account_key(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let (private, public) = (self.dir.join("sa.key"), self.dir.join("sa.pub"));
        write(&private, &key.serialize_pem())?;
        write(&public, &key.public_key_pem())?;
        Ok((private, public))
    }
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
