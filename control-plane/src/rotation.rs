//! CA rotation without downtime. A new CA is *staged* beside the current one
//! (`weft-control-plane ca rotate`); the control plane then moves through
//!
//! 1. `trusting`: the bundle holds both CAs' roots, the current CA still signs;
//! 2. `reissuing`: the new CA signs, nodes re-issue every certificate the old one
//!    signed (SVIDs and node credentials), both roots stay trusted;
//! 3. retirement: the new CA replaces the old one in storage, the bundle holds only
//!    its roots, and the phase is `stable` again.
//!
//! Each step waits at least `min_phase` (counted from when the phase began, or when
//! this replica started or became leader, whichever is later), until the control
//! plane has loaded its configuration, and until every node reports that it uses the
//! current bundle (and, before retirement, holds no certificate the new CA did not
//! sign). The nodes waited for are those connected and every node on which an
//! enrolled workload with an identity is scheduled, connected or not. Only the
//! leader advances; every replica reads the stored state (files standalone, the CA
//! Secret in Kubernetes) every tick and follows it, so all sign with the same CA. In
//! Kubernetes each replica publishes what it has in force and its nodes' reports in
//! the ConfigMap `weft-ca-rotation` (one key per replica), so the leader also waits
//! for the nodes connected to the other replicas, and for the replicas themselves. A
//! staged CA that does not load never starts a rotation: its error is reported and
//! the current CA stays.

use crate::identity::authority::{Authority, Phase, View};
use crate::identity::ca::{self, Ca};
use crate::identity::stored::{files, unix, PemCa, Record, Stored};
use crate::k8s::ca_secret::{CaSecret, CaSecretError};
use crate::metrics::Metrics;
use crate::server::sessions::Sessions;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Patch, PatchParams};
use kube::Api;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use weft_model::Model;
use weft_proto::spiffe::TrustDomain;

/// How often the stored state is read.
pub const TICK: Duration = Duration::from_secs(1);
/// Kubernetes: the ConfigMap through which replicas share their rotation progress.
pub const PROGRESS_CONFIG_MAP: &str = "weft-ca-rotation";
/// A replica's report older than this is ignored (the replica is gone; its nodes
/// reconnect to another one and are waited for there).
pub const REPORT_FRESH: Duration = Duration::from_secs(15);
/// A replica re-publishes an unchanged report this often.
const REPORT_REFRESH: Duration = Duration::from_secs(5);
/// Reports larger than this are ignored (bounded read of a shared object).
const MAX_REPORT_BYTES: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Files(String),
    #[error(transparent)]
    Secret(#[from] CaSecretError),
    #[error("ConfigMap {PROGRESS_CONFIG_MAP}: {0}")]
    Progress(kube::Error),
}

impl StoreError {
    /// A write that lost a race with another replica (read again next tick).
    fn is_conflict(&self) -> bool {
        matches!(
            self,
            StoreError::Secret(CaSecretError::Api { source: kube::Error::Api(s), .. }) if s.code == 409
        )
    }
}

/// Where the CA and a staged one live.
pub enum CaStore {
    /// `<state-dir>/ca/{ca.crt,ca.key,root-bundle.crt}`, the staged CA in
    /// `<state-dir>/ca/next/` with its phase in `next/phase`; retired CAs'
    /// certificates are kept in `<state-dir>/ca/retired/`.
    Files(PathBuf),
    /// The CA Secret, and the progress ConfigMap where this replica (`replica`)
    /// publishes its report (Kubernetes).
    Kube {
        secret: Arc<CaSecret>,
        progress: Box<Api<ConfigMap>>,
        replica: String,
    },
}

impl CaStore {
    pub async fn read(&self) -> Result<Stored, StoreError> {
        match self {
            CaStore::Files(dir) => files::read(dir).map_err(StoreError::Files),
            CaStore::Kube { secret, .. } => Ok(secret.read_rotation().await?),
        }
    }
    /// Records `r`, provided the staged CA is still `next` and the record `before`.
    pub async fn set_record(
        &self,
        next: &PemCa,
        before: Option<Record>,
        r: Record,
    ) -> Result<(), StoreError> {
        match self {
            CaStore::Files(dir) => files::set_record(dir, r).map_err(StoreError::Files),
            CaStore::Kube { secret, .. } => Ok(secret.set_rotation_record(next, before, r).await?),
        }
    }
    /// The staged CA becomes the current one; the current one is retired.
    pub async fn promote(&self, next: &PemCa, next_bundle: &str) -> Result<(), StoreError> {
        match self {
            CaStore::Files(dir) => {
                files::promote(dir, next, next_bundle).map_err(StoreError::Files)
            }
            CaStore::Kube { secret, .. } => Ok(secret.promote_rotation(next, next_bundle).await?),
        }
    }
    /// A staged CA identical to the current one (a promotion cut short) is removed.
    pub async fn drop_next(&self) -> Result<(), StoreError> {
        match self {
            CaStore::Files(dir) => files::finish_promotion(dir).map_err(StoreError::Files),
            CaStore::Kube { secret, .. } => Ok(secret.drop_rotation().await?),
        }
    }
    /// Kubernetes: shares this replica's report. Standalone: nothing to share.
    async fn publish(&self, report: &ReplicaReport) -> Result<(), StoreError> {
        let CaStore::Kube {
            progress, replica, ..
        } = self
        else {
            return Ok(());
        };
        let text = serde_json::to_string(report).unwrap_or_default();
        let cm = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": PROGRESS_CONFIG_MAP, "labels": {"app.kubernetes.io/part-of": "weft"}},
            "data": { replica.as_str(): text },
        });
        // One field manager per replica: each owns its key, no conflicts.
        let manager: String = format!("weft-rotation-{replica}")
            .chars()
            .take(128)
            .collect();
        progress
            .patch(
                PROGRESS_CONFIG_MAP,
                &PatchParams::apply(&manager).force(),
                &Patch::Apply(&cm),
            )
            .await
            .map_err(StoreError::Progress)?;
        Ok(())
    }
    /// Kubernetes: the other replicas' reports.
    async fn others(&self) -> Result<Vec<(String, ReplicaReport)>, StoreError> {
        let CaStore::Kube {
            progress, replica, ..
        } = self
        else {
            return Ok(Vec::new());
        };
        let cm = progress
            .get_opt(PROGRESS_CONFIG_MAP)
            .await
            .map_err(StoreError::Progress)?;
        Ok(cm
            .and_then(|c| c.data)
            .unwrap_or_default()
            .into_iter()
            .filter(|(k, v)| k != replica && v.len() <= MAX_REPORT_BYTES)
            .filter_map(|(k, v)| Some((k, serde_json::from_str(&v).ok()?)))
            .collect())
    }
}

/// What one replica has in force and what its nodes report, during a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaReport {
    /// When it was published (seconds since the epoch).
    pub at: u64,
    /// SHA-256 of the trust bundle this replica has in force.
    pub bundle: String,
    pub nodes: BTreeMap<String, NodeReport>,
}

/// A node's last `NodeStatus`, as a replica saw it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeReport {
    /// SHA-256 of the bundle the node uses.
    pub bundle: String,
    /// SHA-256 of the signer `stale` was counted against.
    pub signer: String,
    pub stale: u32,
}

/// A node's part in the rotation, for status.
#[derive(Debug, Clone, Serialize)]
pub struct NodeProgress {
    pub node: String,
    /// The node uses the bundle in force.
    pub has_bundle: bool,
    /// Certificates it holds that the signer did not sign (None: not reported
    /// against the signer in force).
    pub stale_certs: Option<u32>,
    /// Connected to this replica (false: another replica's report, or none).
    pub connected_here: bool,
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
    /// Why the rotation is not advancing (empty when it is, or none runs; only the
    /// leader decides).
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
    /// True once the configuration is loaded (the nodes to wait for are known).
    pub ready: tokio::sync::watch::Receiver<bool>,
    pub trust_domain: TrustDomain,
    pub svid_ttl: Duration,
    /// Least time in each phase.
    pub min_phase: Duration,
    state: Mutex<DriverState>,
}

struct DriverState {
    /// The stored state last loaded, and the CAs built from it.
    loaded: Option<(Stored, Arc<Ca>, Option<Arc<Ca>>)>,
    error: Option<String>,
    waiting_for: Vec<String>,
    /// Phases are counted from no earlier than this: when the driver started or
    /// this replica last became leader.
    clock_from: SystemTime,
    was_leader: bool,
    /// A staged CA without a phase record yet, and since when this replica saw it.
    staged_seen: Option<(String, SystemTime)>,
    /// The report last published, and when.
    published: Option<(ReplicaReport, Instant)>,
}

/// Stored PEM texts that name the same CA (the bundle may be written differently).
fn same_ca(a: &PemCa, b: &PemCa) -> bool {
    a.chain == b.chain && a.key == b.key
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
        ready: tokio::sync::watch::Receiver<bool>,
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
            ready,
            trust_domain,
            svid_ttl,
            min_phase,
            state: Mutex::new(DriverState {
                loaded: None,
                error: None,
                waiting_for: Vec::new(),
                clock_from: SystemTime::now(),
                was_leader: false,
                staged_seen: None,
                published: None,
            }),
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

    /// The first read at start: retried until storage answers, so that a replica
    /// never serves nodes with a CA view it has not read.
    pub async fn start(&self) {
        let mut logged = false;
        loop {
            match self.store.read().await {
                Ok(_) => break,
                Err(e) => {
                    if !logged {
                        tracing::warn!(error = %e, "reading the CA state failed; retrying before serving");
                        logged = true;
                    }
                    tokio::time::sleep(TICK).await;
                }
            }
        }
        self.step().await;
    }

    /// Reads the stored state, puts it in force, publishes this replica's report
    /// and (leader) advances the phase.
    pub async fn step(&self) {
        let stored = match self.store.read().await {
            Ok(s) => s,
            Err(e) => return self.fail(format!("reading the CA: {e}")),
        };
        let leader = *self.leader.borrow();
        {
            let mut st = self.st();
            if leader && !st.was_leader {
                st.clock_from = SystemTime::now();
            }
            st.was_leader = leader;
        }
        if stored
            .next
            .as_ref()
            .is_some_and(|n| same_ca(n, &stored.current))
        {
            // A promotion was cut short after the new CA became current.
            if leader {
                if let Err(e) = self.store.drop_next().await {
                    self.fail(format!("finishing the promotion of the new CA: {e}"));
                }
            }
            return;
        }
        let (current, next) = match self.load(&stored) {
            Ok(x) => x,
            Err(e) => return self.fail(e),
        };
        let record = match (&stored.next, stored.record) {
            (None, _) => None,
            (Some(_), Some(r)) => Some(r),
            (Some(n), None) => {
                // Not picked up yet: trusting, since this replica first saw it.
                let seen = {
                    let mut st = self.st();
                    match &st.staged_seen {
                        Some((chain, t)) if *chain == n.chain => *t,
                        _ => {
                            let t = SystemTime::now();
                            st.staged_seen = Some((n.chain.clone(), t));
                            t
                        }
                    }
                };
                let r = Record {
                    phase: Phase::Trusting,
                    since: unix(seen),
                };
                if leader {
                    match self.store.set_record(n, None, r).await {
                        Ok(()) => tracing::info!(
                            "CA rotation started: the new CA's roots join the trust bundle"
                        ),
                        Err(e) => return self.write_failed("starting the rotation", e),
                    }
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
        let view = self.authority.view();
        if view.phase == Phase::Stable {
            self.st().waiting_for.clear();
            return;
        }
        self.publish(&view).await;
        if !leader {
            self.st().waiting_for.clear();
            return;
        }
        let waiting = self.waiting_for(&view).await;
        let advance = waiting.is_empty();
        self.st().waiting_for = waiting;
        if !advance {
            return;
        }
        let (Some(n), Some(pem)) = (next, stored.next.as_ref()) else {
            return;
        };
        match view.phase {
            Phase::Trusting => match self
                .store
                .set_record(pem, record, Record::now(Phase::Reissuing))
                .await
            {
                Ok(()) => tracing::info!("CA rotation: every node trusts the new CA; it signs from now on and nodes re-issue their certificates"),
                Err(e) => self.write_failed("switching the signer", e),
            },
            Phase::Reissuing => match self.store.promote(pem, n.bundle_pem()).await {
                Ok(()) => tracing::info!("CA rotation done: no node holds a certificate of the old CA; it is retired and no longer trusted"),
                Err(e) => self.write_failed("retiring the old CA", e),
            },
            Phase::Stable => {}
        }
    }

    fn write_failed(&self, what: &str, e: StoreError) {
        if e.is_conflict() {
            tracing::info!(error = %e, "CA rotation: {what} raced another write; reading again");
        } else {
            self.fail(format!("{what}: {e}"));
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

    /// Installs `view` when it differs from the one in force, and publishes the bundle
    /// (after the authority: a node that sees the new bundle finds its signer here).
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
        let (bundle, signer) = (view.bundle_pem.clone(), view.signer.cert_pem().to_string());
        self.authority.set(view);
        self.model.publish_trust_bundle(&bundle, &signer);
    }

    /// The reports of the nodes connected to this replica.
    fn local_reports(&self) -> BTreeMap<String, NodeReport> {
        self.sessions
            .list()
            .into_iter()
            .filter_map(|s| {
                let st = s.status?;
                Some((
                    s.node,
                    NodeReport {
                        bundle: st.trust_bundle_sha256,
                        signer: st.signer_sha256,
                        stale: st.stale_certs,
                    },
                ))
            })
            .collect()
    }

    /// Kubernetes: publishes this replica's report when it changed, and every few
    /// seconds (so the leader knows it is alive).
    async fn publish(&self, view: &View) {
        let report = ReplicaReport {
            at: unix(SystemTime::now()),
            bundle: weft_proto::x509::sha256_hex(&view.bundle_pem),
            nodes: self.local_reports(),
        };
        let due = match &self.st().published {
            Some((last, when)) => {
                last.bundle != report.bundle
                    || last.nodes != report.nodes
                    || when.elapsed() >= REPORT_REFRESH
            }
            None => true,
        };
        if !due {
            return;
        }
        match self.store.publish(&report).await {
            Ok(()) => self.st().published = Some((report, Instant::now())),
            Err(e) => {
                tracing::warn!(error = %e, "publishing this replica's CA rotation progress failed; retrying")
            }
        }
    }

    /// Every node's report, from this replica's sessions and the other replicas'
    /// fresh reports; and the other replicas not in step with `bundle`.
    async fn all_reports(
        &self,
        bundle: &str,
    ) -> Result<(BTreeMap<String, (NodeReport, bool)>, Vec<String>), StoreError> {
        let mut nodes: BTreeMap<String, (NodeReport, bool)> = self
            .local_reports()
            .into_iter()
            .map(|(n, r)| (n, (r, true)))
            .collect();
        let mut behind = Vec::new();
        let fresh_after = unix(SystemTime::now()).saturating_sub(REPORT_FRESH.as_secs());
        for (replica, report) in self.store.others().await? {
            if report.at < fresh_after {
                continue;
            }
            if report.bundle != bundle {
                behind.push(replica);
            }
            for (node, r) in report.nodes {
                // A report matching the bundle in force wins over an older one.
                let better = nodes
                    .get(&node)
                    .is_none_or(|(have, _)| have.bundle != bundle && r.bundle == bundle);
                if better {
                    nodes.insert(node, (r, false));
                }
            }
        }
        Ok((nodes, behind))
    }

    /// Each node to wait for, with its progress.
    async fn progress(&self, view: &View) -> Result<(Vec<NodeProgress>, Vec<String>), StoreError> {
        let bundle = weft_proto::x509::sha256_hex(&view.bundle_pem);
        let signer = weft_proto::x509::sha256_hex(view.signer.cert_pem());
        let (reports, behind) = self.all_reports(&bundle).await?;
        let mut known: BTreeSet<String> = self.model.nodes_with_identities();
        known.extend(reports.keys().cloned());
        known.extend(self.sessions.list().into_iter().map(|s| s.node));
        let nodes = known
            .into_iter()
            .map(|node| {
                let r = reports.get(&node);
                let has_bundle = r.is_some_and(|(r, _)| r.bundle == bundle);
                NodeProgress {
                    stale_certs: r
                        .filter(|(r, _)| has_bundle && r.signer == signer)
                        .map(|(r, _)| r.stale),
                    connected_here: r.is_some_and(|(_, here)| *here),
                    has_bundle,
                    node,
                }
            })
            .collect();
        Ok((nodes, behind))
    }

    /// What keeps the current phase from ending; empty when it may end.
    async fn waiting_for(&self, view: &View) -> Vec<String> {
        let mut out = Vec::new();
        if !*self.ready.borrow() {
            out.push("the control plane has not loaded its configuration yet".to_string());
        }
        let from = view.since.max(self.st().clock_from);
        let elapsed = from.elapsed().unwrap_or_default();
        if elapsed < self.min_phase {
            out.push(format!(
                "{}s of the minimum {}s in this phase",
                elapsed.as_secs(),
                self.min_phase.as_secs()
            ));
        }
        let (nodes, behind) = match self.progress(view).await {
            Ok(x) => x,
            Err(e) => {
                out.push(format!("the other replicas' progress: {e}"));
                return out;
            }
        };
        for r in behind {
            out.push(format!("replica {r} has another CA in force"));
        }
        for n in nodes {
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

    pub async fn status(&self) -> RotationStatus {
        let view = self.authority.view();
        let (waiting_for, error) = {
            let st = self.st();
            (st.waiting_for.clone(), st.error.clone())
        };
        let nodes = if view.phase == Phase::Stable {
            Vec::new()
        } else {
            self.progress(&view)
                .await
                .map(|(n, _)| n)
                .unwrap_or_default()
        };
        RotationStatus {
            phase: view.phase,
            since: humantime::format_rfc3339_seconds(view.since).to_string(),
            signer: describe(&view.signer),
            other: view.other.as_deref().map(describe),
            roots: roots(&view.bundle_pem),
            waiting_for,
            nodes,
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
        hex::encode(&sha2::Sha256::digest(&der)[..8])
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
        let view = f.rotation.authority.view();
        f.sessions.reported(
            node,
            ReportedStatus {
                trust_bundle_sha256: weft_proto::x509::sha256_hex(&view.bundle_pem),
                signer_sha256: weft_proto::x509::sha256_hex(view.signer.cert_pem()),
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
            f.rotation.status().await.waiting_for,
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
            f.rotation.status().await.waiting_for,
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
        assert_eq!(files::retired(&ca_dir).unwrap(), vec![old_cert]);
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
        let st = f.rotation.status().await;
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
        let st = f.rotation.status().await;
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

    /// `web-1` runs on node-b: node-b holds certificates.
    const SHOP: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1}
spec: {nodeName: node-b, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.0.1.5}
"#;

    #[tokio::test]
    async fn a_node_with_workloads_holds_the_rotation_while_it_is_not_connected() {
        let f = fixture(Duration::ZERO);
        let (objs, errs) = weft_model::manifest::parse_manifests("t.yaml", SHOP);
        assert!(errs.is_empty(), "{errs:?}");
        f.model.apply(weft_model::SourceEvent::Snapshot(objs));
        stage(&f);
        f.rotation.step().await;
        f.rotation.step().await;
        assert_eq!(f.rotation.authority.view().phase, Phase::Trusting);
        assert_eq!(
            f.rotation.status().await.waiting_for,
            vec!["node node-b does not use the current trust bundle yet".to_string()]
        );
        // It connects and reports: the rotation goes on.
        f.sessions.connected("node-b");
        report(&f, "node-b", 0);
        f.rotation.step().await;
        f.rotation.step().await;
        assert_eq!(f.rotation.authority.view().phase, Phase::Reissuing);
        // It goes away before re-issuing: the old CA is not retired without it.
        f.sessions.disconnected("node-b");
        f.rotation.step().await;
        f.rotation.step().await;
        assert_eq!(f.rotation.authority.view().phase, Phase::Reissuing);
        let st = f.rotation.status().await;
        assert_eq!(
            st.waiting_for,
            vec!["node node-b does not use the current trust bundle yet".to_string()]
        );
        assert_eq!(st.nodes.len(), 1);
        assert!(!st.nodes[0].connected_here);
    }

    #[tokio::test]
    async fn the_minimum_phase_counts_from_a_restart() {
        let f = fixture(Duration::from_secs(3600));
        stage(&f);
        // Recorded long ago: a driver that just started still waits the minimum.
        files::set_record(
            &f.dir.path().join("ca"),
            Record {
                phase: Phase::Trusting,
                since: 1,
            },
        )
        .unwrap();
        f.rotation.step().await;
        let st = f.rotation.status().await;
        assert_eq!(st.phase, Phase::Trusting);
        assert_eq!(
            st.waiting_for,
            vec!["0s of the minimum 3600s in this phase".to_string()]
        );
    }

    #[test]
    fn a_promotion_cut_short_is_completed_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let ca_dir = dir.path().join("ca");
        ca::create_private_dir(&ca_dir).unwrap();
        let (old_cert, old_key) = new_root(&td()).unwrap();
        write_private(&ca_dir.join("ca.crt"), &old_cert).unwrap();
        write_private(&ca_dir.join("ca.key"), &old_key).unwrap();
        let (cert, key) = new_root(&td()).unwrap();
        let next = PemCa {
            chain: cert.clone(),
            key: key.clone(),
            bundle: None,
        };
        files::stage(&ca_dir, &next).unwrap();
        // As `promote` does, cut short after the key was replaced.
        let nd = files::next_dir(&ca_dir);
        write_private(&nd.join("promoted-bundle.crt"), &cert).unwrap();
        write_private(&nd.join("previous-ca.crt"), &old_cert).unwrap();
        write_private(&ca_dir.join("ca.key"), &key).unwrap();
        // The current CA does not load (key and certificate differ) until recovery.
        assert!(Ca::from_pem(&old_cert, &key, None, &td(), Duration::from_secs(60)).is_err());
        files::recover(&ca_dir).unwrap();
        let stored = files::read(&ca_dir).unwrap();
        assert_eq!(
            (stored.current.chain.as_str(), stored.current.key.as_str()),
            (cert.as_str(), key.as_str())
        );
        assert_eq!(stored.next, None);
        assert_eq!(files::retired(&ca_dir).unwrap(), vec![old_cert]);
        // Nothing to recover: a no-op.
        files::recover(&ca_dir).unwrap();
    }
}
