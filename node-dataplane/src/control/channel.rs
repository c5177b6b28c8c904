//! A gRPC channel to the control plane over TLS: the node credential as client
//! certificate, the control plane verified against the credential's trust bundle.

use anyhow::Context;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

#[derive(Debug, Clone)]
pub struct ControlPlaneTarget {
    /// `https://host:port`
    pub address: String,
    /// Name expected in the control plane's serving certificate.
    pub server_name: String,
    /// Directory holding node.crt, node.key and ca.crt.
    pub credential_dir: PathBuf,
}

fn read(dir: &Path, name: &str) -> anyhow::Result<String> {
    let p = dir.join(name);
    std::fs::read_to_string(&p)
        .with_context(|| format!("reading the node credential {}", p.display()))
}

impl ControlPlaneTarget {
    pub async fn connect(&self) -> anyhow::Result<Channel> {
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&self.credential_dir, "ca.crt")?))
            .identity(Identity::from_pem(
                read(&self.credential_dir, "node.crt")?,
                read(&self.credential_dir, "node.key")?,
            ))
            .domain_name(self.server_name.clone());
        let ep = Endpoint::from_shared(self.address.clone())
            .with_context(|| format!("control plane address {:?}", self.address))?
            .tls_config(tls)?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(20))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        ep.connect()
            .await
            .with_context(|| format!("connecting to the control plane at {}", self.address))
    }
}
