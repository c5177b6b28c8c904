//! The CA as storage holds it, and a CA staged for rotation: PEM texts and the
//! rotation's phase record, and the file layout of standalone mode.

use super::authority::Phase;
use super::ca::{self, Ca, CaError};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use weft_proto::spiffe::TrustDomain;

/// A CA as stored: PEM texts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PemCa {
    /// Signing certificate, then any intermediates above it.
    pub chain: String,
    pub key: String,
    /// Roots, when the signing certificate is an intermediate.
    pub bundle: Option<String>,
}

impl PemCa {
    pub fn load(&self, td: &TrustDomain, svid_ttl: Duration) -> Result<Ca, CaError> {
        Ca::from_pem(&self.chain, &self.key, self.bundle.as_deref(), td, svid_ttl)
    }
}

/// The phase a staged rotation is in, and since when (seconds since the epoch).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record {
    pub phase: Phase,
    pub since: u64,
}

impl Record {
    pub fn now(phase: Phase) -> Self {
        Self {
            phase,
            since: unix(SystemTime::now()),
        }
    }
    pub fn text(&self) -> String {
        format!("{} {}\n", self.phase.as_str(), self.since)
    }
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut it = s.split_whitespace();
        let (Some(p), Some(t), None) = (it.next(), it.next(), it.next()) else {
            return Err(format!("{s:?} is not \"<phase> <unix seconds>\""));
        };
        let phase = Phase::parse(p)
            .filter(|p| *p != Phase::Stable)
            .ok_or_else(|| format!("phase {p:?} is not trusting or reissuing"))?;
        let since = t
            .parse()
            .map_err(|_| format!("{t:?} is not a time in seconds"))?;
        Ok(Self { phase, since })
    }
}

/// What storage holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub current: PemCa,
    pub next: Option<PemCa>,
    /// Absent with a staged CA: the rotation has not been picked up yet (trusting).
    pub record: Option<Record>,
}

/// Loads (or creates) the CA of the state directory as [`Ca::load_or_create`] does,
/// after completing a CA promotion that a crash interrupted, and refusing
/// `--ca-cert` when it names a CA a rotation retired, or another CA than the stored
/// one while a rotation runs (either would undo the rotation without its phases).
pub fn load_or_create(opts: &ca::CaOptions) -> Result<Ca, CaError> {
    let dir = opts.dir();
    let bad = |message: String| CaError::BadFile {
        path: dir.clone(),
        message,
    };
    if dir.is_dir() {
        files::recover(&dir).map_err(bad)?;
    }
    if let Some(c) = &opts.user_cert {
        let read = |p: &Path| files::read_text(p).map_err(bad);
        let first = |pem: &str| {
            ca::pem_blocks(pem, "CERTIFICATE")
                .ok()
                .and_then(|v| v.into_iter().next())
        };
        let chain = read(c)?.unwrap_or_default();
        let cert_path = dir.join("ca.crt");
        if files::next_dir(&dir).join("ca.crt").exists() {
            if let Some(current) = read(&cert_path)? {
                if first(&current) != first(&chain) {
                    return Err(CaError::UserCa(format!(
                        "a CA rotation is under way ({}); start with the CA in force ({}) or without --ca-cert/--ca-key/--ca-bundle until it is done",
                        files::next_dir(&dir).display(),
                        cert_path.display()
                    )));
                }
            }
        }
        let retired = if dir.is_dir() {
            files::retired(&dir).map_err(bad)?
        } else {
            Vec::new()
        };
        if first(&chain).is_some() && retired.iter().any(|r| first(r) == first(&chain)) {
            return Err(CaError::UserCa(format!(
                "{} is the certificate of a CA that a rotation retired; pass the CA in force ({}) or drop --ca-cert/--ca-key/--ca-bundle",
                c.display(),
                cert_path.display()
            )));
        }
    }
    Ca::load_or_create(opts)
}

pub(crate) fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The standalone layout: `<state-dir>/ca/{ca.crt,ca.key,root-bundle.crt}`, a staged
/// CA in `ca/next/` with its phase in `next/phase`, retired CAs' certificates in
/// `ca/retired/`.
pub mod files {
    use super::*;

    pub fn next_dir(ca_dir: &Path) -> PathBuf {
        ca_dir.join("next")
    }
    pub fn retired_dir(ca_dir: &Path) -> PathBuf {
        ca_dir.join("retired")
    }

    /// CA files are small; a larger one is an error, not read whole.
    const MAX_FILE: u64 = 1 << 20;

    /// A file's text (at most 1 MiB), `None` when it does not exist.
    pub fn read_text(p: &Path) -> Result<Option<String>, String> {
        read_opt(p)
    }

    fn read_opt(p: &Path) -> Result<Option<String>, String> {
        use std::io::Read;
        let f = match std::fs::File::open(p) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("{}: {e}", p.display())),
        };
        let mut text = String::new();
        match f.take(MAX_FILE + 1).read_to_string(&mut text) {
            Ok(n) if n as u64 > MAX_FILE => {
                Err(format!("{}: larger than {MAX_FILE} bytes", p.display()))
            }
            Ok(_) => Ok(Some(text)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("{}: {e}", p.display())),
        }
    }

    fn read_ca(dir: &Path) -> Result<Option<PemCa>, String> {
        let chain = read_opt(&dir.join("ca.crt"))?;
        let key = read_opt(&dir.join("ca.key"))?;
        match (chain, key) {
            (Some(chain), Some(key)) => Ok(Some(PemCa {
                chain,
                key,
                bundle: read_opt(&dir.join("root-bundle.crt"))?,
            })),
            (None, None) => Ok(None),
            _ => Err(format!(
                "{}: ca.crt and ca.key must both be present",
                dir.display()
            )),
        }
    }

    pub fn read(ca_dir: &Path) -> Result<Stored, String> {
        let current = read_ca(ca_dir)?
            .ok_or_else(|| format!("{}: no CA (ca.crt, ca.key)", ca_dir.display()))?;
        let nd = next_dir(ca_dir);
        let next = if nd.is_dir() { read_ca(&nd)? } else { None };
        let record = match read_opt(&nd.join("phase"))? {
            Some(t) if next.is_some() => Some(
                Record::parse(&t).map_err(|e| format!("{}: {e}", nd.join("phase").display()))?,
            ),
            _ => None,
        };
        Ok(Stored {
            current,
            next,
            record,
        })
    }

    fn write(p: &Path, text: &str) -> Result<(), String> {
        ca::write_private(p, text).map_err(|e| e.to_string())
    }

    pub fn set_record(ca_dir: &Path, r: Record) -> Result<(), String> {
        write(&next_dir(ca_dir).join("phase"), &r.text())
    }

    /// Writes `next` as the staged CA (the `ca rotate` command); refuses while one is
    /// staged.
    pub fn stage(ca_dir: &Path, next: &PemCa) -> Result<(), String> {
        let nd = next_dir(ca_dir);
        if nd.join("ca.crt").exists() || nd.join("ca.key").exists() {
            let phase = read_opt(&nd.join("phase"))?.unwrap_or_default();
            return Err(format!(
                "a CA rotation is already under way ({}: {}); wait until it is done",
                nd.display(),
                phase.trim()
            ));
        }
        ca::create_private_dir(&nd).map_err(|e| e.to_string())?;
        let _ = std::fs::remove_file(nd.join("phase"));
        if let Some(b) = &next.bundle {
            write(&nd.join("root-bundle.crt"), b)?;
        }
        write(&nd.join("ca.key"), &next.key)?;
        // Last: a staged CA counts once its certificate is there.
        write(&nd.join("ca.crt"), &next.chain)
    }

    /// Makes the staged CA the current one. Crash-safe: the old certificate is first
    /// kept in `next/previous-ca.crt`; then the bundle, key and certificate are
    /// replaced (each atomically); [`finish_promotion`] completes what a crash left
    /// (a staged CA whose key or certificate is already current).
    pub fn promote(ca_dir: &Path, next: &PemCa, next_bundle: &str) -> Result<(), String> {
        let old = read_ca(ca_dir)?.ok_or("no current CA")?;
        let nd = next_dir(ca_dir);
        write(&nd.join(BUNDLE_WHEN_PROMOTED), next_bundle)?;
        write(&nd.join(PREVIOUS), &old.chain)?;
        write(&ca_dir.join("root-bundle.crt"), next_bundle)?;
        write(&ca_dir.join("ca.key"), &next.key)?;
        write(&ca_dir.join("ca.crt"), &next.chain)?;
        finish_promotion(ca_dir)
    }

    /// The old certificate of a promotion under way.
    const PREVIOUS: &str = "previous-ca.crt";
    /// The bundle a promotion writes (kept so that finishing it writes the same).
    const BUNDLE_WHEN_PROMOTED: &str = "promoted-bundle.crt";

    /// Completes a promotion whose staged CA is already (partly) current: writes
    /// what is missing, keeps the old certificate under `retired/`, removes `next/`.
    pub fn finish_promotion(ca_dir: &Path) -> Result<(), String> {
        let nd = next_dir(ca_dir);
        let Some(next) = read_ca(&nd)? else {
            return drop_next(ca_dir);
        };
        if let Some(bundle) = read_opt(&nd.join(BUNDLE_WHEN_PROMOTED))? {
            write(&ca_dir.join("root-bundle.crt"), &bundle)?;
        }
        write(&ca_dir.join("ca.key"), &next.key)?;
        write(&ca_dir.join("ca.crt"), &next.chain)?;
        if let Some(previous) = read_opt(&nd.join(PREVIOUS))? {
            let rd = retired_dir(ca_dir);
            ca::create_private_dir(&rd).map_err(|e| e.to_string())?;
            write(
                &rd.join(format!("{}-ca.crt", unix(SystemTime::now()))),
                &previous,
            )?;
        }
        drop_next(ca_dir)
    }

    /// A promotion cut short by a crash (the staged CA's key or certificate is
    /// already current) is completed; called before the CA is loaded at start.
    pub fn recover(ca_dir: &Path) -> Result<(), String> {
        let nd = next_dir(ca_dir);
        if !nd.is_dir() {
            return Ok(());
        }
        let (Some(next), Ok(Some(cur_key)), Ok(Some(cur_crt))) = (
            read_ca(&nd).ok().flatten(),
            read_opt(&ca_dir.join("ca.key")),
            read_opt(&ca_dir.join("ca.crt")),
        ) else {
            return Ok(());
        };
        if nd.join(PREVIOUS).exists() && (next.key == cur_key || next.chain == cur_crt) {
            tracing::info!(dir = %ca_dir.display(), "completing a CA promotion that a restart interrupted");
            return finish_promotion(ca_dir);
        }
        Ok(())
    }

    /// Removes the staged CA (and its phase).
    pub fn drop_next(ca_dir: &Path) -> Result<(), String> {
        let nd = next_dir(ca_dir);
        std::fs::remove_dir_all(&nd).map_err(|e| format!("{}: {e}", nd.display()))
    }

    /// Certificates of CAs retired by earlier rotations (PEM texts); an unreadable
    /// one is an error (it could be the CA someone tries to start with).
    pub fn retired(ca_dir: &Path) -> Result<Vec<String>, String> {
        let rd = match std::fs::read_dir(retired_dir(ca_dir)) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(format!("{}: {e}", retired_dir(ca_dir).display())),
        };
        let mut out = Vec::new();
        for e in rd {
            let e = e.map_err(|e| format!("{}: {e}", retired_dir(ca_dir).display()))?;
            if let Some(t) = read_opt(&e.path())? {
                out.push(t);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_bad_ones_are_named() {
        let r = Record {
            phase: Phase::Reissuing,
            since: 1_700_000_000,
        };
        assert_eq!(Record::parse(&r.text()), Ok(r));
        assert_eq!(
            Record::parse("stable 1").unwrap_err(),
            "phase \"stable\" is not trusting or reissuing"
        );
        assert!(Record::parse("trusting").is_err());
        assert!(Record::parse("trusting x").is_err());
    }
}
