//! The node's own credential in standalone mode: `node.crt`/`node.key` in the
//! credential directory (from `weft-control-plane node-credential`), and the renewed
//! one once [`super::renewal`] obtained it. A renewed credential is kept in memory
//! (every new connection presents it) and written back to the directory (`node.key`
//! then `node.crt`, each replaced atomically; an interrupted write is completed or
//! undone at the next load), so a restarted agent presents it too.

use anyhow::Context;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};
use x509_parser::prelude::{FromDer, X509Certificate};

pub const CERT_FILE: &str = "node.crt";
pub const KEY_FILE: &str = "node.key";
const NEXT: &str = "next";

/// A node credential: certificate chain and key (PEM). Not `Debug`: it holds a key.
#[derive(Clone)]
pub struct NodeIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The renewed credential, shared by every clone of a [`ControlPlaneTarget`]; empty
/// until the first renewal (the files are used until then).
#[derive(Clone, Default)]
pub struct CredentialSlot(Arc<RwLock<Option<NodeIdentity>>>);

impl std::fmt::Debug for CredentialSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CredentialSlot(..)")
    }
}

impl CredentialSlot {
    pub fn get(&self) -> Option<NodeIdentity> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    pub fn set(&self, id: NodeIdentity) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Some(id);
    }
}

fn next_path(dir: &Path, file: &str) -> std::path::PathBuf {
    dir.join(format!("{file}.{NEXT}"))
}

/// Reads the credential from `dir`, first finishing (or undoing) a renewal whose
/// write was interrupted: `node.key` is replaced before `node.crt`, so a lone
/// `node.crt.next` belongs to the new `node.key`, while both `.next` files mean
/// neither was replaced yet.
pub fn load(dir: &Path) -> anyhow::Result<NodeIdentity> {
    let (crt_next, key_next) = (next_path(dir, CERT_FILE), next_path(dir, KEY_FILE));
    match (crt_next.exists(), key_next.exists()) {
        (true, false) => {
            std::fs::rename(&crt_next, dir.join(CERT_FILE))
                .with_context(|| format!("completing the renewed {}", crt_next.display()))?;
            tracing::info!(dir = %dir.display(), "completed an interrupted write of the renewed node credential");
        }
        (true, true) | (false, true) => {
            let _ = std::fs::remove_file(&crt_next);
            let _ = std::fs::remove_file(&key_next);
        }
        (false, false) => {}
    }
    let read = |name: &str| {
        let p = dir.join(name);
        std::fs::read_to_string(&p)
            .with_context(|| format!("reading the node credential {}", p.display()))
    };
    Ok(NodeIdentity {
        cert_pem: read(CERT_FILE)?,
        key_pem: read(KEY_FILE)?,
    })
}

fn write_synced(path: &Path, contents: &str, mode: u32) -> std::io::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents.as_bytes())?;
    f.sync_all()
}

/// Replaces `path` with `contents` (mode 0644) atomically: a temporary file beside
/// it, synced, renamed over it.
pub fn replace_file(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension(NEXT);
    write_synced(&tmp, contents, 0o644)?;
    std::fs::rename(&tmp, path)
}

/// Writes `id` to `dir` (see [`load`] for the order).
pub fn persist(dir: &Path, id: &NodeIdentity) -> std::io::Result<()> {
    let (crt_next, key_next) = (next_path(dir, CERT_FILE), next_path(dir, KEY_FILE));
    write_synced(&crt_next, &id.cert_pem, 0o644)?;
    write_synced(&key_next, &id.key_pem, 0o600)?;
    std::fs::rename(&key_next, dir.join(KEY_FILE))?;
    std::fs::rename(&crt_next, dir.join(CERT_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// What renewal needs from a credential's leaf certificate.
#[derive(Debug, Clone, PartialEq)]
pub struct Validity {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    /// The single URI SAN (`spiffe://<td>/_weft/node/<node>`).
    pub san: String,
    pub serial: String,
}

fn from_unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

pub fn validity(cert_pem: &str) -> anyhow::Result<Validity> {
    let leaf = rustls_pemfile::certs(&mut cert_pem.as_bytes())
        .next()
        .context("no certificate in the node credential")??;
    let (_, x509) =
        X509Certificate::from_der(&leaf).context("the node credential does not parse")?;
    let san = weft_proto::x509::single_uri_san(&leaf)
        .map_err(|e| anyhow::anyhow!("the node credential's SAN: {e}"))?;
    let v = x509.validity();
    Ok(Validity {
        not_before: from_unix(v.not_before.timestamp()),
        not_after: from_unix(v.not_after.timestamp()),
        san: san.to_string(),
        serial: x509.raw_serial_as_string().replace(':', ""),
    })
}

/// How long to wait before renewing: `0.5 + jitter * 0.1` of the lifetime left at
/// `now` (`jitter` in [0, 1)). Measured from now, not from notBefore, which the CA
/// backdates for clock skew.
pub fn renew_after(v: &Validity, now: SystemTime, jitter: f64) -> Duration {
    v.not_after
        .duration_since(now)
        .unwrap_or(Duration::ZERO)
        .mul_f64(0.5 + jitter.clamp(0.0, 1.0) * 0.1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(cert: &str, key: &str) -> NodeIdentity {
        NodeIdentity {
            cert_pem: cert.into(),
            key_pem: key.into(),
        }
    }

    #[test]
    fn persist_then_load_and_interrupted_writes_are_completed_or_undone() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        persist(d, &id("crt-1", "key-1")).unwrap();
        let got = load(d).unwrap();
        assert_eq!(
            (got.cert_pem.as_str(), got.key_pem.as_str()),
            ("crt-1", "key-1")
        );
        let mode = std::fs::metadata(d.join(KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);

        // Interrupted after the key was replaced: the lone node.crt.next is the pair's.
        std::fs::write(d.join(KEY_FILE), "key-2").unwrap();
        std::fs::write(next_path(d, CERT_FILE), "crt-2").unwrap();
        let got = load(d).unwrap();
        assert_eq!(
            (got.cert_pem.as_str(), got.key_pem.as_str()),
            ("crt-2", "key-2")
        );
        assert!(!next_path(d, CERT_FILE).exists());

        // Interrupted before anything was replaced: the old pair stays.
        std::fs::write(next_path(d, CERT_FILE), "crt-3").unwrap();
        std::fs::write(next_path(d, KEY_FILE), "key-3").unwrap();
        let got = load(d).unwrap();
        assert_eq!(
            (got.cert_pem.as_str(), got.key_pem.as_str()),
            ("crt-2", "key-2")
        );
        assert!(!next_path(d, CERT_FILE).exists() && !next_path(d, KEY_FILE).exists());
    }

    #[test]
    fn renewal_is_due_between_half_and_six_tenths_of_the_lifetime_left() {
        let nb = SystemTime::UNIX_EPOCH + Duration::from_secs(1000);
        let v = Validity {
            // Backdated: the lifetime that counts is the one left.
            not_before: nb - Duration::from_secs(60),
            not_after: nb + Duration::from_secs(100),
            san: String::new(),
            serial: String::new(),
        };
        assert_eq!(renew_after(&v, nb, 0.0), Duration::from_secs(50));
        assert_eq!(renew_after(&v, nb, 1.0), Duration::from_secs(60));
        assert_eq!(
            renew_after(&v, nb + Duration::from_secs(200), 0.5),
            Duration::ZERO
        );
    }
}
