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

    fn read_opt(p: &Path) -> Result<Option<String>, String> {
        match std::fs::read_to_string(p) {
            Ok(s) => Ok(Some(s)),
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

    pub fn promote(ca_dir: &Path, next: &PemCa, next_bundle: &str) -> Result<(), String> {
        let old = read_ca(ca_dir)?.ok_or("no current CA")?;
        let rd = retired_dir(ca_dir);
        ca::create_private_dir(&rd).map_err(|e| e.to_string())?;
        write(
            &rd.join(format!("{}-ca.crt", unix(SystemTime::now()))),
            &old.chain,
        )?;
        write(&ca_dir.join("root-bundle.crt"), next_bundle)?;
        write(&ca_dir.join("ca.key"), &next.key)?;
        write(&ca_dir.join("ca.crt"), &next.chain)?;
        drop_next(ca_dir)
    }

    pub fn drop_next(ca_dir: &Path) -> Result<(), String> {
        let nd = next_dir(ca_dir);
        std::fs::remove_dir_all(&nd).map_err(|e| format!("{}: {e}", nd.display()))
    }

    /// Certificates of CAs retired by earlier rotations (PEM texts).
    pub fn retired(ca_dir: &Path) -> Vec<String> {
        let Ok(rd) = std::fs::read_dir(retired_dir(ca_dir)) else {
            return Vec::new();
        };
        rd.filter_map(|e| e.ok())
            .filter_map(|e| std::fs::read_to_string(e.path()).ok())
            .collect()
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
