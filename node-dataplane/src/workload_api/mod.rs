//! The SPIFFE Workload API for the applications of enrolled pods: the node agent
//! serves it on a Unix socket that the pods mount, so an app (or its SPIFFE
//! library, `SPIFFE_ENDPOINT_SOCKET=unix:///...`) gets its own X.509-SVID, trust
//! bundles and JWT-SVIDs without a sidecar.
//!
//! Who is asking is decided by the kernel, never by the request: each accepted
//! connection's peer pid comes from `SO_PEERCRED`, and [`Provider::attest`] maps
//! it to the enrolled pod (and so the SPIFFE ID) the process belongs to, typically
//! by its network namespace ([`netns_inode`]). A connection nobody attests gets
//! `PermissionDenied` on every RPC; the socket file is therefore world-writable
//! (0666): file permissions add nothing.
//!
//! The module is self-contained: the agent supplies certificates, JWT signing
//! and validation through [`Provider`], then runs [`serve`] on a socket from
//! [`bind`].
//!
//! Spec rules kept here: every request must carry the `workload.spiffe.io: true`
//! metadata (`InvalidArgument` otherwise); stream responses are complete
//! snapshots, sent first at once (or as soon as the caller's identity is issued)
//! and then on every change; an identity the provider withdraws (its X.509
//! material goes back to `None`) ends the stream with `PermissionDenied`.

pub mod agent;
mod attest;
mod service;
#[cfg(test)]
mod tests;

use futures::future::BoxFuture;
use std::future::Future;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::sync::CancellationToken;
use weft_proto::workload_api::spiffe_workload_api_server::SpiffeWorkloadApiServer;

pub use attest::{netns_inode, ConnInfo};

/// The metadata key every Workload API request must carry, with value `"true"`
/// (the spec's guard against server-side request forgery).
pub const SECURITY_HEADER: &str = "workload.spiffe.io";
/// At most this many audiences in a JWT-SVID request...
pub const MAX_AUDIENCES: usize = 16;
/// ...of at most this many bytes each (also the bound on a validation audience).
pub const MAX_AUDIENCE_LEN: usize = 512;
/// The longest token `ValidateJWTSVID` accepts.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;
/// The largest request message decoded (requests are a few audiences or one token).
const MAX_REQUEST_BYTES: usize = 32 * 1024;

/// Who a connection's process is: the enrolled pod it runs in and that pod's
/// identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// `spiffe://<trust domain>/ns/<ns>/sa/<sa>`.
    pub spiffe_id: String,
    /// `namespace/name`, for logs.
    pub pod: String,
}

/// An identity's current X.509-SVID and its trust domain's bundle.
#[derive(Clone, PartialEq, Eq)]
pub struct X509Material {
    pub spiffe_id: String,
    /// DER certificates, leaf first, then intermediates.
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's PKCS#8 DER private key.
    pub key_pkcs8_der: Vec<u8>,
    /// DER trust anchors of the SVID's trust domain.
    pub bundle_der: Vec<Vec<u8>>,
    /// The trust domain's name (`cluster.local`); a `spiffe://` prefix is accepted.
    pub trust_domain: String,
}

impl std::fmt::Debug for X509Material {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("X509Material")
            .field("spiffe_id", &self.spiffe_id)
            .field("chain_certs", &self.chain_der.len())
            .field("key", &"<redacted>")
            .field("bundle_certs", &self.bundle_der.len())
            .field("trust_domain", &self.trust_domain)
            .finish()
    }
}

/// JWT bundles: (trust domain name or `spiffe://` ID, JWK set as JSON) pairs.
pub type JwtBundles = Vec<(String, Vec<u8>)>;

/// A validated JWT-SVID's claims (the JSON object of its payload).
pub type Claims = serde_json::Map<String, serde_json::Value>;

/// What the Workload API serves, supplied by the agent.
///
/// Streams follow the watch channels: every new value is pushed to the open
/// streams of that identity. Setting an identity's X.509 material back to `None`
/// withdraws it (open streams end with `PermissionDenied`); dropping a sender
/// freezes the last value for the streams already open.
pub trait Provider: Send + Sync + 'static {
    /// The identity of the process `pid` (as seen from the agent's pid
    /// namespace), if it runs in an enrolled pod of this node. Called once per
    /// connection, on a blocking thread.
    fn attest(&self, pid: i32) -> Option<Caller>;
    /// The X.509 material of `spiffe_id`: `None` until it is issued.
    fn x509(&self, spiffe_id: &str) -> watch::Receiver<Option<X509Material>>;
    /// A JWT-SVID (compact JWS) for `spiffe_id` with `audiences` as its `aud`.
    fn jwt_svid(
        &self,
        spiffe_id: &str,
        audiences: &[String],
    ) -> BoxFuture<'static, Result<String, tonic::Status>>;
    /// The JWT bundles the node's workloads trust; empty until known.
    fn jwt_bundles(&self) -> watch::Receiver<JwtBundles>;
    /// Validates `token` as a JWT-SVID for `audience`: its SPIFFE ID and claims,
    /// or the status to answer (`InvalidArgument` for a bad token is usual).
    /// Called on a blocking thread.
    fn validate_jwt(&self, token: &str, audience: &str) -> Result<(String, Claims), tonic::Status>;
}

/// A server's bounds.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Open connections at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// Open connections of one pod at once (and of all unattested processes
    /// together), so one pod cannot take every slot.
    pub max_connections_per_pod: usize,
    /// Open streaming RPCs at once (`Unavailable` past it).
    pub max_streams: usize,
    /// Concurrent HTTP/2 streams on one connection.
    pub max_streams_per_connection: u32,
    /// How long a JWT-SVID may take to sign (`Unavailable` past it).
    pub jwt_timeout: Duration,
    /// How long [`serve`] waits, after shutdown, for connections to close.
    pub shutdown_grace: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_connections_per_pod: 32,
            max_streams: 256,
            max_streams_per_connection: 16,
            jwt_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(5),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the socket directory {path}: {source}")]
    CreateDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} exists and is not a socket; not removing it")]
    NotASocket { path: PathBuf },
    #[error("removing the stale socket {path}: {source}")]
    RemoveStale {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("binding {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("making {path} connectable (0666): {source}")]
    Chmod {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("serving the Workload API: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// Binds the Workload API socket at `path`: creates its directory (0755) if
/// missing, removes a stale socket left by an earlier agent (but no other kind
/// of file), binds, and makes the socket connectable by every uid (0666).
/// Must be called within a Tokio runtime.
pub fn bind(path: &Path) -> Result<UnixListener, Error> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            let e = |source| Error::CreateDir {
                path: dir.to_path_buf(),
                source,
            };
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(e)?;
            // The mode above is filtered by the umask; apps must traverse it.
            std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).map_err(e)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            std::fs::remove_file(path).map_err(|source| Error::RemoveStale {
                path: path.to_path_buf(),
                source,
            })?;
        }
        Ok(_) => {
            return Err(Error::NotASocket {
                path: path.to_path_buf(),
            })
        }
        Err(_) => {}
    }
    let listener = UnixListener::bind(path).map_err(|source| Error::Bind {
        path: path.to_path_buf(),
        source,
    })?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666)).map_err(|source| {
        Error::Chmod {
            path: path.to_path_buf(),
            source,
        }
    })?;
    Ok(listener)
}

/// Serves the Workload API on `listener` with the default [`Limits`] until
/// `shutdown` completes.
pub async fn serve(
    listener: UnixListener,
    provider: Arc<dyn Provider>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    serve_with(listener, provider, Limits::default(), shutdown).await
}

/// [`serve`] with explicit limits. On shutdown the server stops accepting,
/// ends the open streams (cleanly: clients reconnect to the next agent) and
/// waits up to [`Limits::shutdown_grace`] for the connections to close.
pub async fn serve_with(
    listener: UnixListener,
    provider: Arc<dyn Provider>,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let stop = CancellationToken::new();
    let api = service::WorkloadApi {
        provider: provider.clone(),
        streams: Arc::new(Semaphore::new(limits.max_streams)),
        stop: stop.clone(),
        jwt_timeout: limits.jwt_timeout,
    };
    let incoming = attest::incoming(listener, provider, &limits);
    let signal = {
        let stop = stop.clone();
        async move {
            shutdown.await;
            stop.cancel();
        }
    };
    let server = tonic::transport::Server::builder()
        .max_concurrent_streams(limits.max_streams_per_connection)
        .add_service(SpiffeWorkloadApiServer::new(api).max_decoding_message_size(MAX_REQUEST_BYTES))
        .serve_with_incoming_shutdown(incoming, signal);
    tokio::pin!(server);
    tokio::select! {
        served = &mut server => served?,
        _ = async {
            stop.cancelled().await;
            tokio::time::sleep(limits.shutdown_grace).await;
        } => {
            tracing::warn!("Workload API connections still open after the shutdown grace period");
        }
    }
    Ok(())
}
