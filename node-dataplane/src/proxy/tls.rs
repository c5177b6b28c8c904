//! mTLS between node proxies with SPIFFE identities: TLS 1.3, ALPN h2. The client
//! presents the source workload's SVID and accepts the server only if its chain leads
//! to the trust bundle *and* its single URI SAN is the destination workload's
//! expected SPIFFE ID. The server presents the destination workload's SVID (read at
//! each handshake, so rotation applies to new connections at once) and requires a
//! client certificate chained to the trust bundle.

use crate::certs::WorkloadCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::{DigitallySignedStruct, SignatureScheme};
use std::sync::Arc;

pub const ALPN_H2: &[u8] = b"h2";

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("trust bundle: {0}")]
    Bundle(String),
    #[error("certificate or key: {0}")]
    Cert(String),
    #[error(transparent)]
    Rustls(#[from] rustls::Error),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

pub fn certs_of(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Cert(e.to_string()))
}

fn key_of(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    rustls_pemfile::private_key(&mut pem.as_bytes())
        .map_err(|e| TlsError::Cert(e.to_string()))?
        .ok_or_else(|| TlsError::Cert("no private key".into()))
}

/// The SPIFFE ID of a certificate: its single URI SAN, which must be a SPIFFE ID.
pub fn spiffe_id_of(der: &[u8]) -> Result<String, String> {
    let uri = weft_proto::x509::single_uri_san(der)?;
    if uri.starts_with("spiffe://") {
        Ok(uri)
    } else {
        Err(format!("URI SAN {uri:?} is not a SPIFFE ID"))
    }
}

/// Verifies a server: chain to the bundle (serverAuth) and exactly the expected ID.
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Vec<rustls::pki_types::TrustAnchor<'static>>,
    expected: String,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = webpki::EndEntityCert::try_from(end_entity)
            .map_err(|e| rustls::Error::General(format!("server certificate: {e}")))?;
        cert.verify_for_usage(
            webpki::ALL_VERIFICATION_ALGS,
            &self.roots,
            intermediates,
            now,
            webpki::KeyUsage::server_auth(),
            None,
            None,
        )
        .map_err(|e| rustls::Error::General(format!("server certificate not trusted: {e}")))?;
        let id = spiffe_id_of(end_entity).map_err(rustls::Error::General)?;
        if id != self.expected {
            return Err(rustls::Error::General(format!(
                "server identity {id} is not the expected {}",
                self.expected
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::General("TLS 1.2 is not allowed".into()))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

fn anchors(bundle_pem: &str) -> Result<Vec<rustls::pki_types::TrustAnchor<'static>>, TlsError> {
    let certs = certs_of(bundle_pem)?;
    if certs.is_empty() {
        return Err(TlsError::Bundle("no root certificate".into()));
    }
    certs
        .iter()
        .map(|c| {
            webpki::anchor_from_trusted_cert(c)
                .map(|a| a.to_owned())
                .map_err(|e| TlsError::Bundle(e.to_string()))
        })
        .collect()
}

/// Client config: present `source`, accept only `expected_server` chained to `bundle_pem`.
pub fn client_config(
    source: &WorkloadCert,
    bundle_pem: &str,
    expected_server: &str,
) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let provider = provider();
    let verifier = SpiffeServerVerifier {
        roots: anchors(bundle_pem)?,
        expected: expected_server.to_string(),
        provider: provider.clone(),
    };
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(certs_of(&source.chain_pem)?, key_of(&source.key_pem.0)?)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}

/// Server config: present `local` (the destination workload's SVID), require a
/// client certificate chained to `bundle_pem`.
pub fn server_config(
    local: &WorkloadCert,
    bundle_pem: &str,
) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let provider = provider();
    let mut roots = rustls::RootCertStore::empty();
    for c in certs_of(bundle_pem)? {
        roots.add(c).map_err(|e| TlsError::Bundle(e.to_string()))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| TlsError::Bundle(e.to_string()))?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs_of(&local.chain_pem)?, key_of(&local.key_pem.0)?)?;
    cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(cfg))
}
