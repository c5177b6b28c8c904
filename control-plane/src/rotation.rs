//! CA rotation without downtime. A new CA is *staged* beside the current one
//! (`weft-control-plane ca rotate`); the control plane then moves through
//!
//! 1. `trusting`: the bundle holds both CAs' roots, the current CA still signs;
//! 2. `reissuing`: the new CA signs, nodes re-issue every certificate the old one
//!    signed (SVIDs and node credentials), both roots stay trusted;
//! 3. retirement: the new CA replaces the old one in storage, the bundle holds only
//!    its roots, and the phase is `stable` again.
//!
//! Each step waits at least `min_phase` and until every node connected to this
//! replica reports that it uses the current bundle (and, before retirement, holds no
//! certificate the new CA did not sign). Only the leader advances; every replica
//! reads the stored state (files standalone, the CA Secret in Kubernetes) every tick
//! and follows it, so all sign with the same CA. A staged CA that does not load
//! never starts a rotation: its error is reported and the current CA stays.

use crate::identity::authority::{Authority, Phase, View};
use crate::identity::ca::{self, Ca};
use crate::identity::stored::{files, PemCa, Record, Stored};
use crate::metrics::Metrics;
use crate::server::sessions::Sessions;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use weft_model::Model;
use weft_proto::spiffe::TrustDomain;

/// How often the stored state is read.
pub const TICK: Duration = Duration::from_secs(1);

/// Where the CA and a staged one live.
pub enum CaStore {
    /// `<state-dir>/ca/{ca.crt,ca.key,root-bundle.crt}`, the staged CA in
    /// `<state-dir>/ca/next/` with its phase in `next/phase`; retired CAs'
    /// certificates are kept in `<state-dir>/ca/retired/`.
    Files(PathBuf),
    /// The CA Secret (Kubernetes).
    Secret(Arc<crate::k8s::ca_secret::CaSecret>),
}

impl CaStore {
    pub async fn read(&self) -> Result<Stored, String> {
        match self {
            CaStore::Files(dir) => files::read(dir),
            CaStore::Secret(s) => s.read_rotation().await.map_err(|e| e.to_string()),
        }
    }
    pub async fn set_record(&self, r: Record) -> Result<(), String> {
        match self {
            CaStore::Files(dir) => files::set_record(dir, r),
            CaStore::Secret(s) => s.set_rotation_record(r).await.map_err(|e| e.to_string()),
        }
    }
    /// The staged CA becomes the current one; the current one is retired.
    pub async fn promote(&self, next: &PemCa, next_bundle: &str) -> Result<(), String> {
        match self {
            CaStore::Files(dir) => files::promote(dir, next, next_bundle),
            CaStore::Secret(s) => s
                .promote_rotation(next, next_bundle)
                .await
                .map_err(|e| e.to_string()),
        }
    }
    /// A staged CA identical to the current one (a promotion cut short) is removed.
    pub async fn drop_next(&self) -> Result<(), String> {
        match self {
            CaStore::Files(dir) => files::drop_next(dir),
            CaStore::Secret(s) => s.drop_rotation().await.map_err(|e| e.to_string()),
        }
    }
}

/// A node's part in the rotation, for status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeProgress {
    pub node: String,
    /// The node uses the bundle in force.
    pub has_bundle: bool,
    /// Certificates it holds that the signer did not sign (None: not reported).
    pub stale_certs: Option<u32>,
}

/// The rotation as `/debug/status` and `weftctl status` show it.
#[derive(Debug, Clone, Serialize)]
pub struct RotationStatus {
    pub phase: Phase,
    pub since: String,
    /// Subject of the signing certificate and its SHA-256 fingerprint.
    pub signer: String,
    /// The other CA during a rotation.
    pub other: Option<String>,
    pub roots: usize,
    /// Why the rotation is not advancing (empty when it is, or none runs).
    pub waiting_for: Vec<String>,
    pub nodes: Vec<NodeProgress>,
    /// A stored state that does not load (a bad staged CA), as the last read saw it.
    pub error: Option<String>,
}

pub struct Rotation {
    pub store: CaStore,
    pub authority: Arc<Authority>,
    pub model: Arc<Model>,
    pub sessions: Arc<Sessions>,
    pub metrics: Arc<Metrics>,
    /// True while this replica leads (always, standalone).
    pub leader: tokio::sync::watch::Receiver<bool>,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// Least time in each phase.
    pub min_phase: Duration,
    state: Mutex<DriverState>,
}

#[derive(Default)]
struct DriverState {
    /// The stored state last loaded, and the CAs built from it.
    loaded: Option<(Stored, Arc<Ca>, Option<Arc<Ca>>)>,
    error: Option<String>,
    waiting_for: Vec<String>,
}

impl Rotation {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        store: CaStore,
        authority: Arc<Authority>,
        model: Arc<Model>,
        sessions: Arc<Sessions>,
        metrics: Arc<Metrics>,
        leader: tokio::sync::watch::Receiver<bool>,
        trust_domain: TrustDomain,
        svid_ttl: Duration,
        min_phase: Duration,
    ) -> Arc<Self> {
        Arc::new(Self {
            store,
            authority,
            model,
            sessions,
            metrics,
            leader,
            trust_domain,
            svid_ttl,
            min_phase,
            state: Mutex::default(),
        })
    }

    fn st(&self) -> std::sync::MutexGuard<'_, DriverState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn run(self: Arc<Self>) {
        loop {
            self.step().await;
            tokio::time::sleep(TICK).await;
        }
    }

    /// Reads the stored state, puts it in force, and (leader) advances the phase.
    pub async fn step(&self) {
        let stored = match self.store.read().await {
            Ok(s) => s,
            Err(e) => return self.fail(format!("reading the CA: {e}")),
        };
        let leader = *self.leader.borrow();
        if stored.next.as_ref() == Some(&stored.current) {
            // A promotion was cut short after the new CA became current.
            if leader {
                if let Err(e) = self.store.drop_next().await {
                    self.fail(format!("removing the promoted CA's staged copy: {e}"));
                }
            }
            return;
        }
        let (current, next) = match self.load(&stored) {
            Ok(x) => x,
            Err(e) => return self.fail(e),
        };
        let record = match (&next, stored.record) {
            (None, _) => None,
            (Some(_), Some(r)) => Some(r),
            (Some(_), None) => {
                let r = Record::now(Phase::Trusting);
                if leader {
                    if let Err(e) = self.store.set_record(r).await {
                        return self.fail(format!("starting the rotation: {e}"));
                    }
                    tracing::info!("CA rotation started: the new CA's roots join the trust bundle");
                }
                Some(r)
            }
        };
        let since = |r: &Record| SystemTime::UNIX_EPOCH + Duration::from_secs(r.since);
        let view = match (next.clone(), record) {
            (Some(n), Some(r)) if r.phase == Phase::Reissuing => {
                View::new(Phase::Reissuing, since(&r), n, Some(current.clone()))
            }
            (Some(n), Some(r)) => View::new(Phase::Trusting, since(&r), current.clone(), Some(n)),
            _ => View::new(Phase::Stable, SystemTime::now(), current.clone(), None),
        };
        self.put_in_force(view);
        self.st().error = None;
        if !leader {
            self.st().waiting_for.clear();
            return;
        }
        let view = self.authority.view();
        if view.phase == Phase::Stable {
            self.st().waiting_for.clear();
            return;
        }
        let waiting = self.waiting_for(&view);
        let advance = waiting.is_empty();
        self.st().waiting_for = waiting;
        if !advance {
            return;
        }
        match (view.phase, next, stored.next.as_ref()) {
            (Phase::Trusting, _, _) => match self.store.set_record(Record::now(Phase::Reissuing)).await {
                Ok(()) => tracing::info!("CA rotation: every node trusts the new CA; it signs from now on and nodes re-issue their certificates"),
                Err(e) => self.fail(format!("switching the signer: {e}")),
            },
            (Phase::Reissuing, Some(n), Some(pem)) => {
                match self.store.promote(pem, n.bundle_pem()).await {
                    Ok(()) => tracing::info!("CA rotation done: no node holds a certificate of the old CA; it is retired and no longer trusted"),
                    Err(e) => self.fail(format!("retiring the old CA: {e}")),
                }
            }
            _ => {}
        }
    }

    /// Builds the CAs of `stored`, reusing those of the last read when unchanged.
    #[allow(clippy::type_complexity)]
    fn load(&self, stored: &Stored) -> Result<(Arc<Ca>, Option<Arc<Ca>>), String> {
        if let Some((s, c, n)) = &self.st().loaded {
            if s == stored {
                return Ok((c.clone(), n.clone()));
            }
        }
        let current = stored
            .current
            .load(&self.trust_domain, self.svid_ttl)
            .map_err(|e| format!("the current CA does not load: {e}"))?;
        let next = match &stored.next {
            None => None,
            Some(p) => Some(Arc::new(
                p.load(&self.trust_domain, self.svid_ttl).map_err(|e| {
                    format!("the staged CA does not load (the rotation does not start): {e}")
                })?,
            )),
        };
        let current = Arc::new(current);
        self.st().loaded = Some((stored.clone(), current.clone(), next.clone()));
        Ok((current, next))
    }

    fn fail(&self, error: String) {
        let mut st = self.st();
        if st.error.as_deref() != Some(error.as_str()) {
            tracing::error!(%error, "CA rotation: the stored CA state is unusable; the CA in force stays");
        }
        st.error = Some(error);
    }

    /// Installs `view` when it differs from the one in force, and publishes the bundle.
    fn put_in_force(&self, view: View) {
        let old = self.authority.view();
        // A stable view's `since` is when this replica put it in force.
        let same = old.phase == view.phase
            && (old.since == view.since || view.phase == Phase::Stable)
            && old.signer.cert_pem() == view.signer.cert_pem()
            && old.bundle_pem == view.bundle_pem;
        if same {
            return;
        }
        tracing::info!(
            phase = view.phase.as_str(),
            signer = %describe(&view.signer),
            roots = roots(&view.bundle_pem),
            "CA in force"
        );
        self.metrics.ca_rotation_phase.set(view.phase.gauge());
        self.metrics.ca_expiry.set(
            view.signer
                .not_after()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or(0.0),
        );
        self.model
            .publish_trust_bundle(&view.bundle_pem, view.signer.cert_pem());
        self.authority.set(view);
    }

    /// What keeps the current phase from ending; empty when it may end.
    fn waiting_for(&self, view: &View) -> Vec<String> {
        let mut out = Vec::new();
        let elapsed = view.since.elapsed().unwrap_or_default();
        if elapsed < self.min_phase {
            out.push(format!(
                "{}s of the minimum {}s in this phase",
                elapsed.as_secs(),
                self.min_phase.as_secs()
            ));
        }
        for n in self.progress(view) {
            if !n.has_bundle {
                out.push(format!(
                    "node {} does not use the current trust bundle yet",
                    n.node
                ));
            } else if view.phase == Phase::Reissuing {
                match n.stale_certs {
                    Some(0) => {}
                    Some(k) => out.push(format!(
                        "node {} holds {k} certificate(s) the new CA did not sign",
                        n.node
                    )),
                    None => out.push(format!("node {} has not reported its certificates", n.node)),
                }
            }
        }
        out
    }

    fn progress(&self, view: &View) -> Vec<NodeProgress> {
        let want = weft_proto::x509::sha256_hex(&view.bundle_pem);
        self.sessions
            .list()
            .into_iter()
            .map(|s| {
                let has_bundle = s
                    .status
                    .as_ref()
                    .is_some_and(|st| st.trust_bundle_sha256 == want);
                NodeProgress {
                    node: s.node,
                    has_bundle,
                    stale_certs: s.status.filter(|_| has_bundle).map(|st| st.stale_certs),
                }
            })
            .collect()
    }

    pub fn status(&self) -> RotationStatus {
        let view = self.authority.view();
        let (waiting_for, error) = {
            let st = self.st();
            (st.waiting_for.clone(), st.error.clone())
        };
        RotationStatus {
            phase: view.phase,
            since: humantime::format_rfc3339_seconds(view.since).to_string(),
            signer: describe(&view.signer),
            other: view.other.as_deref().map(describe),
            roots: roots(&view.bundle_pem),
            waiting_for,
            nodes: if view.phase == Phase::Stable {
                Vec::new()
            } else {
                self.progress(&view)
            },
            error,
        }
    }
}

/// "<subject> (sha256 <first 16 hex digits>)" of a CA's signing certificate.
pub fn describe(ca: &Ca) -> String {
    let der = ca::pem_blocks(ca.cert_pem(), "CERTIFICATE")
        .ok()
        .and_then(|v| v.into_iter().next())
        .unwrap_or_default();
    let subject = x509_parser::parse_x509_certificate(&der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default();
    let fp = {
        use sha2::Digest;
        let d = sha2::Sha256::digest(&der);
        d.iter()
            .take(8)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    };
    format!("{subject} (sha256 {fp})")
}

fn roots(bundle: &str) -> usize {
    ca::pem_blocks(bundle, "CERTIFICATE")
        .map(|v| v.len())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ca::{new_root, write_private};
    use crate::server::sessions::ReportedStatus;
    use weft_model::ModelConfig;

    fn td() -> TrustDomain {
        TrustDomain::new("cluster.local").unwrap()
    }

    struct Fixture {
        dir: tempfile::TempDir,
        rotation: Arc<Rotation>,
        sessions: Arc<Sessions>,
        model: Arc<Model>,
    }

    fn fixture(min_phase: Duration) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca::create_private_dir(&ca_dir).unwrap();
        let (cert, key) = new_root(&td()).unwrap();
        write_private(&ca_dir.join("ca.crt"), &cert).unwrap();
        write_private(&ca_dir.join("ca.key"), &key).unwrap();
        let ca =
            Arc::new(Ca::from_pem(&cert, &key, None, &td(), Duration::from_secs(3600)).unwrap());
        let authority = Authority::new(View::stable(ca.clone()));
        let model = Model::new(
            ModelConfig {
                trust_domain: td(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: ca.bundle_pem().into(),
                jwt_jwks: String::new(),
                default_identity_fallback: false,
            },
            Arc::new(weft_model::modules::Offline),
        );
        let sessions = Arc::new(Sessions::default());
        let rotation = Rotation::new(
            CaStore::Files(ca_dir),
            authority,
            model.clone(),
            sessions.clone(),
            Arc::new(Metrics::new()),
            tokio::sync::watch::channel(true).1,
            td(),
            Duration::from_secs(3600),
            min_phase,
        );
        Fixture {
            dir,
            rotation,
            sessions,
            model,
        }
    }

    fn stage(f: &Fixture) -> String {
        let (cert, key) = new_root(&td()).unwrap();
        files::stage(
            &f.dir.path().join("ca"),
            &PemCa {
                chain: cert.clone(),
                key,
                bundle: None,
            },
        )
        .unwrap();
        cert
    }

    fn report(f: &Fixture, node: &str, stale: u32) {
        let bundle = f.rotation.authority.bundle_pem();
        f.sessions.reported(
            node,
            ReportedStatus {
                trust_bundle_sha256: weft_proto::x509::sha256_hex(&bundle),
                certs: 3,
                stale_certs: stale,
            },
        );
    }

    #[tokio::test]
    async fn a_staged_ca_goes_through_trusting_and_reissuing_to_stable() {
        let f = fixture(Duration::ZERO);
        f.rotation.step().await;
        let old = f.rotation.authority.view();
        assert_eq!(old.phase, Phase::Stable);
        let old_cert = old.signer.cert_pem().to_string();
        let new_cert = stage(&f);
        f.sessions.connected("node-a");

        // Picked up: both roots trusted, the old CA still signs; the node has not
        // reported the new bundle, so the phase holds.
        f.rotation.step().await;
        let v = f.rotation.authority.view();
        assert_eq!(v.phase, Phase::Trusting);
        assert_eq!(v.signer.cert_pem(), old_cert);
        assert_eq!(roots(&v.bundle_pem), 2);
        let pushed = f.model.trust_bundle().unwrap();
        assert_eq!(pushed.roots_pem, v.bundle_pem);
        assert_eq!(pushed.signer_pem, old_cert);
        f.rotation.step().await;
        assert_eq!(f.rotation.authority.view().phase, Phase::Trusting);
        assert_eq!(
            f.rotation.status().waiting_for,
            vec!["node node-a does not use the current trust bundle yet".to_string()]
        );

        // The node uses the bundle: the new CA signs.
        report(&f, "node-a", 0);
        f.rotation.step().await;
        f.rotation.step().await;
        let v = f.rotation.authority.view();
        assert_eq!(v.phase, Phase::Reissuing);
        assert_eq!(v.signer.cert_pem(), new_cert);
        assert_eq!(roots(&v.bundle_pem), 2);
        assert_eq!(f.model.trust_bundle().unwrap().signer_pem, new_cert);

        // Still holding an old certificate: no retirement.
        report(&f, "node-a", 1);
        f.rotation.step().await;
        assert_eq!(f.rotation.authority.view().phase, Phase::Reissuing);
        assert_eq!(
            f.rotation.status().waiting_for,
            vec!["node node-a holds 1 certificate(s) the new CA did not sign".to_string()]
        );
        report(&f, "node-a", 0);
        f.rotation.step().await;
        f.rotation.step().await;
        let v = f.rotation.authority.view();
        assert_eq!(v.phase, Phase::Stable);
        assert_eq!(v.signer.cert_pem(), new_cert);
        assert_eq!(v.bundle_pem, new_cert);
        assert_eq!(f.model.trust_bundle().unwrap().roots_pem, new_cert);

        // Storage: the new CA is the current one, the old one's certificate retired.
        let ca_dir = f.dir.path().join("ca");
        assert_eq!(
            std::fs::read_to_string(ca_dir.join("ca.crt")).unwrap(),
            new_cert
        );
        assert!(!files::next_dir(&ca_dir).exists());
        assert_eq!(files::retired(&ca_dir), vec![old_cert]);
    }

    #[tokio::test]
    async fn phases_last_at_least_the_minimum_and_a_bad_staged_ca_changes_nothing() {
        let f = fixture(Duration::from_secs(3600));
        f.rotation.step().await;
        let before = f.rotation.authority.view();
        let ca_dir = f.dir.path().join("ca");
        let nd = files::next_dir(&ca_dir);
        ca::create_private_dir(&nd).unwrap();
        std::fs::write(nd.join("ca.crt"), "not a certificate").unwrap();
        std::fs::write(nd.join("ca.key"), "not a key").unwrap();
        f.rotation.step().await;
        let st = f.rotation.status();
        assert_eq!(st.phase, Phase::Stable);
        assert!(
            st.error
                .as_deref()
                .unwrap()
                .starts_with("the staged CA does not load"),
            "{:?}",
            st.error
        );
        assert_eq!(f.rotation.authority.view().bundle_pem, before.bundle_pem);
        assert_eq!(f.model.trust_bundle().unwrap().roots_pem, before.bundle_pem);

        files::drop_next(&ca_dir).unwrap();
        stage(&f);
        f.rotation.step().await;
        f.rotation.step().await;
        let st = f.rotation.status();
        assert_eq!(st.phase, Phase::Trusting);
        assert_eq!(st.error, None);
        assert_eq!(
            st.waiting_for,
            vec!["0s of the minimum 3600s in this phase".to_string()]
        );
        // A second rotation cannot be staged over one under way.
        let (cert, key) = new_root(&td()).unwrap();
        let err = files::stage(
            &ca_dir,
            &PemCa {
                chain: cert,
                key,
                bundle: None,
            },
        )
        .unwrap_err();
        assert!(err.contains("already under way"), "{err}");
    }

    #[tokio::test]
    async fn a_restart_in_the_reissuing_phase_signs_with_the_new_ca() {
        let f = fixture(Duration::ZERO);
        let new_cert = stage(&f);
        files::set_record(&f.dir.path().join("ca"), Record::now(Phase::Reissuing)).unwrap();
        // A fresh driver (as after a restart) with a node that is still behind.
        f.sessions.connected("node-a");
        f.rotation.step().await;
        let v = f.rotation.authority.view();
        assert_eq!(v.phase, Phase::Reissuing);
        assert_eq!(v.signer.cert_pem(), new_cert);
    }
}
