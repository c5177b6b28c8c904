//! A gRPC channel to the control plane over TLS, the control plane verified
//! against the trust bundle (`ca.crt`, plus the bundle the control plane pushed
//! last, see [`PushedTrust`]). The node authenticates with either
//!
//! - a node credential (standalone): `node.crt`/`node.key` as client certificate
//!   (renewed by [`super::renewal`]), or
//! - a projected ServiceAccount token (Kubernetes): `--token-file`, re-read for
//!   every request (the kubelet rotates it) and sent as `authorization: Bearer`.

use super::credential::{self, CredentialSlot, NodeIdentity};
use anyhow::Context;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};
use tonic::{Request, Status};
use weft_proto::pb;

#[derive(Debug, Clone)]
pub struct ControlPlaneTarget {
    /// `https://host:port`
    pub address: String,
    /// Name expected in the control plane's serving certificate.
    pub server_name: String,
    /// Directory holding ca.crt, and node.crt/node.key unless a token is used.
    pub credential_dir: PathBuf,
    /// Projected ServiceAccount token file (Kubernetes mode).
    pub token_file: Option<PathBuf>,
    /// The renewed node credential (standalone), shared by every clone.
    pub credential: CredentialSlot,
    /// The trust bundle the control plane pushed, shared by every clone.
    pub trust: PushedTrust,
}

/// The trust bundle last received from the control plane (over a connection
/// verified with the bundle before it). Its roots are trusted for the control plane
/// too, beside `ca.crt`, so a CA rotation reaches this connection without a new
/// file; its signer tells which certificates must be re-issued.
#[derive(Clone)]
pub struct PushedTrust(Arc<tokio::sync::watch::Sender<Option<Arc<pb::TrustBundle>>>>);

impl Default for PushedTrust {
    fn default() -> Self {
        Self(Arc::new(tokio::sync::watch::Sender::new(None)))
    }
}

impl std::fmt::Debug for PushedTrust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PushedTrust(..)")
    }
}

impl PushedTrust {
    pub fn get(&self) -> Option<Arc<pb::TrustBundle>> {
        self.0.borrow().clone()
    }
    /// Replaces the bundle; true when it changed.
    pub fn set(&self, b: Arc<pb::TrustBundle>) -> bool {
        self.0.send_if_modified(|cur| {
            if cur.as_deref() == Some(&*b) {
                return false;
            }
            *cur = Some(b);
            true
        })
    }
    /// Changes whenever the bundle does.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Option<Arc<pb::TrustBundle>>> {
        self.0.subscribe()
    }
    /// The signing CA's certificate (DER), when the bundle names one.
    pub fn signer_der(&self) -> Option<Vec<u8>> {
        signer_der(self.get()?.as_ref())
    }
}

/// The DER of a bundle's signer certificate, when it names one.
pub fn signer_der(b: &pb::TrustBundle) -> Option<Vec<u8>> {
    rustls_pemfile::certs(&mut b.signer_pem.as_bytes())
        .next()?
        .ok()
        .map(|c| c.to_vec())
}

/// Is the leaf of `chain_pem` signed by a CA other than `signer_der`'s? False when
/// there is no signer to compare with.
pub fn stale(chain_pem: &str, signer_der: Option<&[u8]>) -> bool {
    let Some(signer) = signer_der else {
        return false;
    };
    match rustls_pemfile::certs(&mut chain_pem.as_bytes()).next() {
        Some(Ok(leaf)) => !weft_proto::x509::signed_by(&leaf, signer),
        _ => false,
    }
}

/// A channel whose every request carries the node's token when it has one.
pub type ControlChannel = InterceptedService<Channel, NodeToken>;

/// Adds the bearer token (when configured) to each request.
#[derive(Debug, Clone, Default)]
pub struct NodeToken {
    file: Option<PathBuf>,
}

impl Interceptor for NodeToken {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        let Some(file) = &self.file else {
            return Ok(req);
        };
        let token = std::fs::read_to_string(file).map_err(|e| {
            Status::unauthenticated(format!("reading the token file {}: {e}", file.display()))
        })?;
        let value = MetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
            Status::unauthenticated(format!(
                "the token in {} is not a valid header value",
                file.display()
            ))
        })?;
        req.metadata_mut().insert("authorization", value);
        Ok(req)
    }
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::read_to_string(&p)
        .with_context(|| format!("reading the node credential {}", p.display()))
}

impl ControlPlaneTarget {
    /// The credential to present: the renewed one, else the files.
    pub fn node_identity(&self) -> anyhow::Result<NodeIdentity> {
        match self.credential.get() {
            Some(id) => Ok(id),
            None => credential::load(&self.credential_dir),
        }
    }

    pub async fn connect(&self) -> anyhow::Result<ControlChannel> {
        let mut roots = read(&self.credential_dir, "ca.crt")?;
        if let Some(b) = self.trust.get() {
            roots.push('\n');
            roots.push_str(&b.roots_pem);
        }
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(roots))
            .domain_name(self.server_name.clone());
        if self.token_file.is_none() {
            let id = self.node_identity()?;
            tls = tls.identity(Identity::from_pem(id.cert_pem, id.key_pem));
        }
        let ep = Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("control plane address {:?}", self.address))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        let channel = ep
            .connect()
            .await
            .with_context(|| format!("connecting to the control plane at {}", self.address))?;
        Ok(InterceptedService::new(
            channel,
            NodeToken {
                file: self.token_file.clone(),
            },
        ))
    }
}
