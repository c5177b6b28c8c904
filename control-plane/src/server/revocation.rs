//! Revoked standalone node credentials.
//!
//! The list lives in `<state-dir>/revoked-node-credentials.yaml`, written by
//! `weft-control-plane revoke-node-credential` (or by hand):
//!
//! ```yaml
//! revoked:
//! - node: node-a                 # every credential of node-a issued at or before revokedAt
//!   revokedAt: 2025-06-01T12:00:00Z
//!   reason: disk stolen
//! - serial: 5f0c...              # one credential, by serial number (hex)
//!   revokedAt: 2025-06-01T12:05:00Z
//! ```
//!
//! [`Revocations`] owns the list: it is read at start (a list that does not parse stops
//! the control plane), re-read every [`RELOAD_INTERVAL`] (a list that stops parsing
//! keeps the last good one enforced and is logged), and every change is published to
//! the checks of new requests (`CertNodeAuthenticator` in `super::auth`)
//! and to each open connection ([`super::tls::ConnectionGuard`]), which is closed when
//! its credential is revoked or expires.

use crate::identity::ca::{write_private, BACKDATE};
use crate::identity::NODE_ID_PREFIX;
use crate::metrics::{Metrics, ReasonLabel};
use futures::future::BoxFuture;
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use weft_proto::spiffe::SpiffeId;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The list's file name in the state directory.
pub const FILE_NAME: &str = "revoked-node-credentials.yaml";
/// How often the list is re-read.
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(1);
/// Largest list read; a bigger file is refused.
pub const MAX_FILE_BYTES: u64 = 4 << 20;

#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: larger than {MAX_FILE_BYTES} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// The file's content.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationFile {
    #[serde(default)]
    pub revoked: Vec<Revocation>,
}

/// One entry: a node (every credential issued at or before `revoked_at`) or one
/// credential by serial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Revocation {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    /// RFC 3339.
    pub revoked_at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Serial numbers compare as lowercase hex without separators or leading zeros.
fn normalize_serial(s: &str) -> String {
    let hex: String = s
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

/// Whole seconds since the epoch (certificate times have no finer precision).
fn unix_secs(t: SystemTime) -> i64 {
    match t.duration_since(SystemTime::UNIX_EPOCH) {
        Ok(d) => d.as_secs() as i64,
        Err(e) => -(e.duration().as_secs() as i64),
    }
}

/// The list in the form checks use.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct RevocationList {
    serials: HashMap<String, Option<String>>,
    /// node -> (latest revokedAt in unix seconds, reason)
    nodes: HashMap<String, (i64, Option<String>)>,
}

impl RevocationList {
    /// Checks and compiles the file's entries; `Err` names the entry and field.
    pub fn compile(file: &RevocationFile) -> Result<Self, String> {
        let mut list = Self::default();
        for (i, r) in file.revoked.iter().enumerate() {
            let at = humantime::parse_rfc3339_weak(&r.revoked_at)
                .map_err(|e| format!("revoked[{i}].revokedAt {:?}: {e}", r.revoked_at))?;
            match (&r.node, &r.serial) {
                (Some(node), None) if !node.is_empty() => {
                    let at = unix_secs(at);
                    let e = list.nodes.entry(node.clone()).or_insert((at, None));
                    if at >= e.0 {
                        *e = (at, r.reason.clone());
                    }
                }
                (None, Some(serial))
                    if !serial.is_empty()
                        && serial.chars().all(|c| c.is_ascii_hexdigit() || c == ':') =>
                {
                    list.serials
                        .insert(normalize_serial(serial), r.reason.clone());
                }
                (None, Some(serial)) => {
                    return Err(format!(
                        "revoked[{i}].serial {serial:?} is not a hexadecimal serial number"
                    ))
                }
                _ => {
                    return Err(format!(
                        "revoked[{i}]: give exactly one of node (non-empty) and serial"
                    ))
                }
            }
        }
        Ok(list)
    }

    pub fn len(&self) -> usize {
        self.serials.len() + self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Why `c` is revoked, if it is.
    pub fn revokes(&self, c: &NodeCredential) -> Option<String> {
        if let Some(reason) = self.serials.get(&c.serial) {
            return Some(format!(
                "serial {} revoked{}",
                c.serial,
                reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            ));
        }
        let (at, reason) = self.nodes.get(&c.node)?;
        (c.issued_unix <= *at).then(|| {
            format!(
                "credentials of node {} issued at or before {} revoked{}",
                c.node,
                humantime::format_rfc3339_seconds(
                    SystemTime::UNIX_EPOCH + Duration::from_secs((*at).max(0) as u64)
                ),
                reason
                    .as_ref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            )
        })
    }
}

/// What revocation looks at in a node credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeCredential {
    pub node: String,
    /// Normalized hex serial.
    pub serial: String,
    /// Issuance in unix seconds: notBefore plus the CA's backdating.
    pub issued_unix: i64,
    pub not_after: SystemTime,
}

impl NodeCredential {
    /// The facts of `der`, which names `node` (checked by the caller).
    pub fn parse(der: &[u8], node: &str) -> Result<Self, String> {
        let (_, x509) = X509Certificate::from_der(der).map_err(|e| e.to_string())?;
        let v = x509.validity();
        Ok(Self {
            node: node.to_string(),
            serial: normalize_serial(&hex::encode(x509.raw_serial())),
            issued_unix: v.not_before.timestamp() + BACKDATE.as_secs() as i64,
            not_after: SystemTime::UNIX_EPOCH
                + Duration::from_secs(v.not_after.timestamp().max(0) as u64),
        })
    }
}

/// The node a node credential names, whatever its trust domain (to watch its
/// connection; authentication checks the trust domain).
fn node_of_credential(der: &[u8]) -> Option<String> {
    let uri = weft_proto::x509::single_uri_san(der).ok()?;
    let id = SpiffeId::parse(uri.as_str()).ok()?;
    id.path()
        .strip_prefix(NODE_ID_PREFIX)
        .filter(|n| !n.is_empty() && !n.contains('/'))
        .map(str::to_owned)
}

/// Reads and compiles the list at `path`; a missing file is an empty list.
pub fn read_list(path: &Path) -> Result<(Vec<u8>, RevocationList), RevocationError> {
    let bytes = read_bytes(path)?;
    let list = parse(&bytes).map_err(|message| RevocationError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    Ok((bytes, list))
}

/// The file's bytes (at most [`MAX_FILE_BYTES`]); none when it is missing.
fn read_bytes(path: &Path) -> Result<Vec<u8>, RevocationError> {
    let io = |source| RevocationError::Io {
        path: path.to_path_buf(),
        source,
    };
    let bytes = match std::fs::File::open(path) {
        Ok(f) => {
            let mut buf = Vec::new();
            f.take(MAX_FILE_BYTES + 1)
                .read_to_end(&mut buf)
                .map_err(io)?;
            if buf.len() as u64 > MAX_FILE_BYTES {
                return Err(RevocationError::TooLarge {
                    path: path.to_path_buf(),
                });
            }
            buf
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(e)),
    };
    Ok(bytes)
}

fn parse(bytes: &[u8]) -> Result<RevocationList, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(RevocationList::default());
    }
    let file: RevocationFile = serde_yaml::from_slice(bytes).map_err(|e| e.to_string())?;
    RevocationList::compile(&file)
}

/// Appends `entry` to the list at `path` (created when missing), atomically. The
/// existing list must parse: a broken list is never overwritten.
pub fn append(path: &Path, entry: Revocation) -> Result<(), RevocationError> {
    let (bytes, _) = read_list(path)?;
    let mut file: RevocationFile = if bytes.iter().all(u8::is_ascii_whitespace) {
        RevocationFile::default()
    } else {
        serde_yaml::from_slice(&bytes).map_err(|e| RevocationError::Invalid {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?
    };
    file.revoked.push(entry);
    RevocationList::compile(&file).map_err(|message| RevocationError::Invalid {
        path: path.to_path_buf(),
        message,
    })?;
    let text = serde_yaml::to_string(&file).map_err(|e| RevocationError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    write_private(path, &text).map_err(|e| RevocationError::Invalid {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// The owner of the revocation list of a running control plane.
pub struct Revocations {
    path: PathBuf,
    tx: watch::Sender<Arc<RevocationList>>,
    metrics: Arc<Metrics>,
    /// The bytes last read, good or bad: an unchanged file is neither parsed nor
    /// logged again.
    last: std::sync::Mutex<Vec<u8>>,
}

impl Revocations {
    /// Reads the list at `path`; a list that does not parse is an error.
    pub fn load(path: PathBuf, metrics: Arc<Metrics>) -> Result<Arc<Self>, RevocationError> {
        let (bytes, list) = read_list(&path)?;
        if !list.is_empty() {
            tracing::info!(path = %path.display(), entries = list.len(), "revoked node credentials loaded");
        }
        metrics.revoked_node_credentials.set(list.len() as i64);
        Ok(Arc::new(Self {
            path,
            tx: watch::Sender::new(Arc::new(list)),
            metrics,
            last: std::sync::Mutex::new(bytes),
        }))
    }

    pub fn current(&self) -> Arc<RevocationList> {
        self.tx.borrow().clone()
    }

    /// Re-reads the list once; returns whether it changed.
    pub fn reload(&self) -> bool {
        let read = read_bytes(&self.path).and_then(|bytes| {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if *last == bytes {
                return Ok(None);
            }
            let list = parse(&bytes).map_err(|message| RevocationError::Invalid {
                path: self.path.clone(),
                message,
            });
            *last = bytes;
            list.map(Some)
        });
        match read {
            Ok(None) => false,
            Ok(Some(list)) => {
                let changed = self.tx.send_if_modified(|cur| {
                    if **cur == list {
                        return false;
                    }
                    *cur = Arc::new(list);
                    true
                });
                if changed {
                    let n = self.tx.borrow().len();
                    self.metrics.revoked_node_credentials.set(n as i64);
                    tracing::info!(path = %self.path.display(), entries = n, "revoked node credentials reloaded");
                }
                changed
            }
            Err(e) => {
                tracing::error!(error = %e, "the revocation list does not load; the last good one stays enforced");
                false
            }
        }
    }

    /// Re-reads the list every [`RELOAD_INTERVAL`], forever.
    pub async fn reload_forever(self: Arc<Self>) {
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.reload()).await;
        }
    }

    /// Refuses `c` if the list revokes it.
    pub fn check(&self, c: &NodeCredential) -> Result<(), String> {
        match self.tx.borrow().revokes(c) {
            Some(why) => Err(why),
            None => Ok(()),
        }
    }
}

impl super::tls::ConnectionGuard for Revocations {
    fn watch(&self, certs: &[CertificateDer<'static>]) -> Option<BoxFuture<'static, ()>> {
        let der = certs.first()?;
        let node = node_of_credential(der)?;
        let cred = NodeCredential::parse(der, &node).ok()?;
        let mut rx = self.tx.subscribe();
        // A credential revoked before it connected is refused request by request (with
        // a clear error); the connection is closed when a revocation comes later.
        let mut was_revoked = rx.borrow_and_update().revokes(&cred).is_some();
        let metrics = self.metrics.clone();
        Some(Box::pin(async move {
            let left = cred
                .not_after
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            let expiry = tokio::time::sleep(left);
            tokio::pin!(expiry);
            let reason = loop {
                tokio::select! {
                    r = rx.changed() => if r.is_err() { std::future::pending::<()>().await },
                    _ = &mut expiry => {
                        tracing::info!(node = %cred.node, serial = %cred.serial, "closing the connection of an expired node credential");
                        break "expired";
                    }
                }
                let why = rx.borrow_and_update().revokes(&cred);
                if let (Some(why), false) = (&why, was_revoked) {
                    tracing::warn!(node = %cred.node, serial = %cred.serial, %why, "closing a revoked node credential's connection");
                    break "revoked";
                }
                was_revoked = why.is_some();
            };
            metrics
                .node_connections_closed
                .get_or_create(&ReasonLabel {
                    reason: reason.into(),
                })
                .inc();
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::tests::{der_chain, opts};
    use crate::identity::Ca;
    use crate::server::tls::ConnectionGuard;
    use tokio::time::timeout;

    #[tokio::test]
    async fn an_open_connection_is_closed_when_its_credential_is_revoked_or_expires() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(&opts(dir.path())).unwrap();
        let cert = |node: &str, ttl: u64| {
            let (c, _) = ca
                .issue_node_credential(node, Duration::from_secs(ttl))
                .unwrap();
            vec![CertificateDer::from(der_chain(&c.chain_pem).remove(0))]
        };
        let (a, b, c) = (
            cert("node-a", 3600),
            cert("node-b", 3600),
            cert("node-c", 2),
        );
        let path = dir.path().join(FILE_NAME);
        let metrics = Arc::new(Metrics::new());
        let r = Revocations::load(path.clone(), metrics.clone()).unwrap();
        let revoke = |node: &str| {
            append(
                &path,
                Revocation {
                    node: Some(node.into()),
                    serial: None,
                    revoked_at: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
                    reason: None,
                },
            )
            .unwrap();
            assert!(r.reload());
        };
        let short = Duration::from_millis(100);
        let mut fa = r.watch(&a).unwrap();
        let mut fb = r.watch(&b).unwrap();
        assert!(timeout(short, &mut fa).await.is_err(), "open while valid");
        revoke("node-a");
        timeout(Duration::from_secs(1), &mut fa)
            .await
            .expect("closed once revoked");
        assert!(timeout(short, &mut fb).await.is_err(), "another node stays");
        // Connected while already revoked: left open (each request is refused with a
        // clear error instead), also across later changes of the list.
        let mut fa2 = r.watch(&a).unwrap();
        revoke("node-b");
        timeout(Duration::from_secs(1), &mut fb)
            .await
            .expect("closed once revoked");
        assert!(timeout(short, &mut fa2).await.is_err());
        // Expiry closes too.
        let fc = r.watch(&c).unwrap();
        timeout(Duration::from_secs(4), fc)
            .await
            .expect("closed at expiry");
        let m = metrics.encode();
        assert!(
            m.contains("weft_cp_node_connections_closed_total{reason=\"revoked\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("weft_cp_node_connections_closed_total{reason=\"expired\"} 1"),
            "{m}"
        );
        assert!(m.contains("weft_cp_revoked_node_credentials 2"), "{m}");
        // A certificate that is no node credential is not watched.
        let (svid, _) = ca
            .issue_server_cert(&["x".into()], &[], Duration::from_secs(60))
            .unwrap();
        assert!(r
            .watch(&[CertificateDer::from(der_chain(&svid.chain_pem).remove(0))])
            .is_none());
    }

    fn cred(node: &str, serial: &str, issued_unix: i64) -> NodeCredential {
        NodeCredential {
            node: node.into(),
            serial: normalize_serial(serial),
            issued_unix,
            not_after: SystemTime::now() + Duration::from_secs(3600),
        }
    }

    #[test]
    fn a_node_entry_revokes_credentials_issued_up_to_its_second_and_a_serial_entry_one() {
        let list = parse(
            b"revoked:\n- node: node-a\n  revokedAt: 2025-01-01T00:00:10Z\n  reason: stolen\n- serial: 0A:bc\n  revokedAt: 2025-01-01T00:00:00Z\n",
        )
        .unwrap();
        let t = 1_735_689_610; // 2025-01-01T00:00:10Z
        assert!(list
            .revokes(&cred("node-a", "01", t - 5))
            .unwrap()
            .contains("stolen"));
        assert!(list.revokes(&cred("node-a", "01", t)).is_some());
        assert_eq!(list.revokes(&cred("node-a", "01", t + 1)), None);
        assert_eq!(list.revokes(&cred("node-b", "01", t - 5)), None);
        assert!(list.revokes(&cred("node-b", "00abc", t + 100)).is_some());
    }

    #[test]
    fn malformed_lists_name_the_entry_and_field() {
        for (text, want) in [
            (
                "revoked:\n- revokedAt: 2025-01-01T00:00:00Z\n",
                "revoked[0]: give exactly one",
            ),
            (
                "revoked:\n- node: a\n  serial: ab\n  revokedAt: 2025-01-01T00:00:00Z\n",
                "revoked[0]: give exactly one",
            ),
            (
                "revoked:\n- node: a\n  revokedAt: yesterday\n",
                "revoked[0].revokedAt",
            ),
            (
                "revoked:\n- serial: xyz\n  revokedAt: 2025-01-01T00:00:00Z\n",
                "revoked[0].serial",
            ),
            (
                "revoked:\n- node: a\n  revokedAt: 2025-01-01T00:00:00Z\n  nod: b\n",
                "unknown field",
            ),
        ] {
            let e = parse(text.as_bytes()).unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        assert!(parse(b"  \n").unwrap().is_empty());
    }

    #[test]
    fn append_creates_the_file_and_refuses_to_overwrite_a_broken_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        let entry = |node: &str| Revocation {
            node: Some(node.into()),
            serial: None,
            revoked_at: "2025-01-01T00:00:00Z".into(),
            reason: None,
        };
        append(&p, entry("a")).unwrap();
        append(&p, entry("b")).unwrap();
        let (_, list) = read_list(&p).unwrap();
        assert_eq!(list.len(), 2);
        std::fs::write(&p, "revoked: [").unwrap();
        assert!(matches!(
            append(&p, entry("c")),
            Err(RevocationError::Invalid { .. })
        ));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "revoked: [");
    }

    #[test]
    fn a_list_that_stops_parsing_keeps_the_last_good_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(FILE_NAME);
        std::fs::write(
            &p,
            "revoked:\n- node: a\n  revokedAt: 2099-01-01T00:00:00Z\n",
        )
        .unwrap();
        let r = Revocations::load(p.clone(), Arc::new(Metrics::new())).unwrap();
        let a = cred("a", "01", 0);
        assert!(r.check(&a).is_err());
        std::fs::write(&p, "revoked: [").unwrap();
        assert!(!r.reload());
        assert!(r.check(&a).is_err(), "still revoked");
        std::fs::remove_file(&p).unwrap();
        assert!(r.reload());
        assert!(r.check(&a).is_ok(), "an absent list revokes nothing");
        // A file too large is refused, not read whole.
        std::fs::write(&p, vec![b' '; MAX_FILE_BYTES as usize + 1]).unwrap();
        assert!(matches!(
            read_list(&p),
            Err(RevocationError::TooLarge { .. })
        ));
        // A list that does not parse at start is an error.
        std::fs::write(&p, "revoked: [").unwrap();
        assert!(Revocations::load(p, Arc::new(Metrics::new())).is_err());
    }
}
