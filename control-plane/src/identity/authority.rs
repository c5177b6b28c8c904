//! The CA in force: which CA signs, which roots peers trust, and where a CA rotation
//! stands. One owner ([`super::rotation`]) changes it; everything that signs or
//! verifies (the gRPC services, the serving certificate, the client-certificate
//! check, the trust bundle pushed to nodes) reads it here, so a rotation reaches
//! all of them at once.

use super::ca::{pem_blocks, pem_of, Ca};
use serde::Serialize;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

/// Where a CA rotation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// One CA: it signs, its roots are the bundle.
    Stable,
    /// A new CA is staged: its roots join the bundle while the current CA still
    /// signs, until every node trusts both.
    Trusting,
    /// The new CA signs and nodes re-issue what the old one signed; both roots stay
    /// in the bundle until no node holds an old certificate. Then the old CA is
    /// retired (removed from the bundle) and the phase is [`Phase::Stable`] again.
    Reissuing,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Stable => "stable",
            Phase::Trusting => "trusting",
            Phase::Reissuing => "reissuing",
        }
    }
    /// The value of the `weft_cp_ca_rotation_phase` gauge.
    pub fn gauge(self) -> i64 {
        match self {
            Phase::Stable => 0,
            Phase::Trusting => 1,
            Phase::Reissuing => 2,
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "stable" => Some(Phase::Stable),
            "trusting" => Some(Phase::Trusting),
            "reissuing" => Some(Phase::Reissuing),
            _ => None,
        }
    }
}

/// One consistent state of the CA.
pub struct View {
    pub phase: Phase,
    /// When the phase began.
    pub since: SystemTime,
    /// The CA that signs every new certificate.
    pub signer: Arc<Ca>,
    /// During a rotation, the other CA: the incoming one while [`Phase::Trusting`],
    /// the outgoing one while [`Phase::Reissuing`].
    pub other: Option<Arc<Ca>>,
    /// The roots peers trust: the signer's and the other CA's, without duplicates.
    pub bundle_pem: String,
}

impl View {
    pub fn new(phase: Phase, since: SystemTime, signer: Arc<Ca>, other: Option<Arc<Ca>>) -> Self {
        let mut bundles = vec![signer.bundle_pem()];
        if let Some(o) = &other {
            bundles.push(o.bundle_pem());
        }
        let bundle_pem = merge_bundles(&bundles);
        Self {
            phase,
            since,
            signer,
            other,
            bundle_pem,
        }
    }
    /// A single CA, no rotation.
    pub fn stable(ca: Arc<Ca>) -> Self {
        Self::new(Phase::Stable, SystemTime::now(), ca, None)
    }
}

/// The CA in force, shared by every user; changes are announced on a watch.
pub struct Authority {
    view: RwLock<Arc<View>>,
    changed: tokio::sync::watch::Sender<u64>,
}

impl Authority {
    pub fn new(view: View) -> Arc<Self> {
        Arc::new(Self {
            view: RwLock::new(Arc::new(view)),
            changed: tokio::sync::watch::channel(0).0,
        })
    }
    pub fn view(&self) -> Arc<View> {
        self.view.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// The CA that signs now.
    pub fn signer(&self) -> Arc<Ca> {
        self.view().signer.clone()
    }
    pub fn bundle_pem(&self) -> String {
        self.view().bundle_pem.clone()
    }
    /// Replaces the view (only the rotation driver calls this).
    pub fn set(&self, view: View) {
        *self.view.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(view);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }
    /// Changes whenever the view is replaced.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// The certificates of several PEM bundles, each once, in order of appearance.
pub fn merge_bundles(bundles: &[&str]) -> String {
    let mut seen: Vec<Vec<u8>> = Vec::new();
    let mut out = String::new();
    for b in bundles {
        for der in pem_blocks(b, "CERTIFICATE").unwrap_or_default() {
            if !seen.contains(&der) {
                out.push_str(&pem_of(&der));
                seen.push(der);
            }
        }
    }
    out
}
