//! Per-pod dataplane: for every sandbox the CNI plugin reported whose workload the
//! control plane says is enrolled and on this node, the agent opens the pod's
//! netns, has the proxy bind its listeners there ([`crate::proxy::listeners`]),
//! records the netns cookie in the capture map and attaches inbound capture, then
//! has the proxy serve the listeners. A pod that leaves (CNI DEL, deleted, opted
//! out) is torn down. [`PodManager`] owns the [`PodMap`].

pub mod discover;

use crate::cni::protocol::{EnrollmentHint, Sandbox};
use crate::cni::registry::PodRegistry;
use crate::config::ConfigStore;
use crate::ebpf::{Capture, Inbound};
use crate::metrics::scrape::{family, gauges, Scrape};
use crate::netns::PodNetns;
use crate::proxy::counters::PodStats;
use crate::proxy::listeners::PodListeners;
use crate::proxy::local::{LiveWorkload, LocalPod};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio::task::JoinHandle;
use weft_proto::pb;

/// Enrolled pods' dataplanes, by sandbox id. [`PodManager`] owns it; the admin
/// endpoint and the metrics read it.
pub type PodMap = Arc<Mutex<BTreeMap<String, PodDataplane>>>;

pub struct PodDataplane {
    pub sandbox: Sandbox,
    /// The pod's workload as its connections see it (updated on relabelling).
    pub workload: LiveWorkload,
    pub workload_key: String,
    pub cookie: u64,
    pub ip4: Option<Ipv4Addr>,
    /// Its listeners' counters.
    pub stats: PodStats,
    pub netns: Arc<PodNetns>,
    tasks: Vec<JoinHandle<()>>,
}

impl PodDataplane {
    /// Stops accepting new connections (the agent drains): the listeners close;
    /// connections already accepted go on, and the pod stays enrolled.
    pub fn close_listeners(&mut self) {
        for t in self.tasks.drain(..) {
            t.abort();
        }
    }
}

impl Drop for PodDataplane {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

pub struct PodManager {
    pub config: Arc<ConfigStore>,
    pub registry: Arc<PodRegistry>,
    pub capture: Arc<Mutex<Capture>>,
    pub inbound: Arc<Mutex<Inbound>>,
    pub proxy: Arc<crate::proxy::state::ProxyState>,
    /// Where the enrollment hint for the CNI plugin is written.
    pub hint_path: Option<PathBuf>,
    pub pods: PodMap,
    /// Set after the first reconcile following a complete config sync.
    pub ready: Arc<AtomicBool>,
    /// Where to look for enrolled pods the CNI plugin never reported
    /// ([`discover`]); `None`: only the CNI plugin's reports count.
    pub discovery: Option<Discovery>,
    /// The agent's own namespace (weft's release): its pods are never in the mesh
    /// and must start even before the control plane is reachable.
    pub own_namespace: Option<String>,
    /// The last hint written (or, before the first sync, read back from the file):
    /// what the CNI socket falls back on for pods the control plane has not described.
    pub hint: Mutex<EnrollmentHint>,
    /// Bumped after every reconcile: enrollment may have changed.
    pub changed: tokio::sync::watch::Sender<u64>,
}

/// Where [`discover`] looks: the host's `/proc` and the runtime's directories of
/// network namespace bind mounts.
#[derive(Debug, Clone)]
pub struct Discovery {
    pub proc: PathBuf,
    pub netns_dirs: Vec<PathBuf>,
}

impl Default for Discovery {
    fn default() -> Self {
        Self {
            proc: PathBuf::from("/proc"),
            netns_dirs: vec![PathBuf::from("/var/run/netns"), PathBuf::from("/run/netns")],
        }
    }
}

/// How often enrolled pods without a sandbox are looked for while there are any.
const DISCOVERY_INTERVAL: std::time::Duration = std::time::Duration::from_secs(2);

/// Sandboxes found by [`discover`] carry this prefix instead of a container id.
const DISCOVERED: &str = "discovered:";

/// The enrolled workload of this node matching a sandbox (by UID, then name).
fn workload_for<'a>(
    node: &str,
    ws: impl Iterator<Item = (&'a String, &'a Arc<pb::Workload>)>,
    s: &Sandbox,
) -> Option<(String, Arc<pb::Workload>)> {
    let mut by_name = None;
    for (k, w) in ws {
        if w.node != node {
            continue;
        }
        if !s.pod_uid.is_empty() && w.uid == s.pod_uid {
            return Some((k.clone(), w.clone()));
        }
        if w.namespace == s.pod_namespace && w.name == s.pod_name {
            by_name = Some((k.clone(), w.clone()));
        }
    }
    by_name
}

impl PodManager {
    pub async fn run(self: Arc<Self>) {
        let mut cfg = self.config.watch();
        let mut reg = self.registry.watch();
        loop {
            let missing = self.reconcile().await;
            let retry = async {
                match missing {
                    true => tokio::time::sleep(DISCOVERY_INTERVAL).await,
                    false => std::future::pending().await,
                }
            };
            tokio::select! {
                r = cfg.changed() => if r.is_err() { return },
                r = reg.changed() => if r.is_err() { return },
                _ = retry => self.discover().await,
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Brings the enrolled pods' dataplanes in line with the config and the
    /// sandboxes known. Returns whether some enrolled pod of this node has no
    /// sandbox yet (so [`PodManager::discover`] should look for it).
    pub async fn reconcile(&self) -> bool {
        let snap = self.config.snapshot();
        let node = self.config.node().to_string();
        self.write_hint(&snap, &node);
        let mut wanted: BTreeMap<String, (Sandbox, String, Arc<pb::Workload>)> = BTreeMap::new();
        let mut covered = std::collections::HashSet::new();
        let mut sandboxes = self.registry.all();
        // The CNI plugin's sandboxes first: a pod it reported needs no discovered one.
        sandboxes.sort_by_key(|s| s.container_id.starts_with(DISCOVERED));
        for s in sandboxes {
            match workload_for(&node, snap.workloads.iter(), &s) {
                Some((key, _))
                    if s.container_id.starts_with(DISCOVERED) && covered.contains(&key) =>
                {
                    self.registry.remove(&s.container_id);
                }
                Some((key, w)) if w.enrolled => {
                    covered.insert(key.clone());
                    wanted.insert(s.container_id.clone(), (s, key, w));
                }
                // A discovered sandbox is only kept while its pod is enrolled here
                // (the CNI plugin's DEL never names it).
                _ if s.container_id.starts_with(DISCOVERED) => {
                    self.registry.remove(&s.container_id);
                }
                _ => {}
            }
        }
        self.registry.forget_deleted(|ns, name| {
            snap.workloads
                .values()
                .any(|w| w.node == node && w.namespace == ns && w.name == name)
        });
        let missing = self.discovery.is_some()
            && snap.workloads.iter().any(|(k, w)| {
                w.enrolled
                    && w.node == node
                    && !w.ips.is_empty()
                    && !covered.contains(k)
                    && !self.registry.was_deleted(&w.namespace, &w.name)
            });
        // Tear down what is no longer wanted.
        let gone: Vec<String> = Self::lock(&self.pods)
            .keys()
            .filter(|k| !wanted.contains_key(*k))
            .cloned()
            .collect();
        for id in gone {
            if let Some(p) = Self::lock(&self.pods).remove(&id) {
                self.teardown(&p);
            }
        }
        // Set up what is new; what is enrolled already sees its workload's changes
        // (labels select policies and plugins).
        let mut relabelled = false;
        for (id, (s, key, w)) in wanted {
            if let Some(p) = Self::lock(&self.pods).get(&id) {
                if p.workload.set(&w) {
                    tracing::info!(pod = %format!("{}/{}", s.pod_namespace, s.pod_name), "pod's workload changed: its connections are checked against the policies that apply now");
                    relabelled = true;
                }
                continue;
            }
            match self.setup(s.clone(), key, &w).await {
                Ok(p) => {
                    tracing::info!(pod = %format!("{}/{}", s.pod_namespace, s.pod_name), identity = %w.spiffe_id, cookie = p.cookie, "pod enrolled: traffic captured");
                    Self::lock(&self.pods).insert(id, p);
                }
                Err(e) => {
                    tracing::warn!(pod = %format!("{}/{}", s.pod_namespace, s.pod_name), error = %format!("{e:#}"), "cannot enroll pod")
                }
            }
        }
        if relabelled {
            // The proxy re-checks on every config change too, but maybe before the
            // workloads above were replaced: once more now that they are.
            self.proxy.recheck_open();
        }
        if snap.synced {
            self.ready.store(true, Ordering::Release);
        }
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
        missing
    }

    /// Looks for the network namespaces of enrolled pods of this node that have no
    /// sandbox (their CNI ADD never reached the agent) and records those found.
    async fn discover(&self) {
        let Some(d) = self.discovery.clone() else {
            return;
        };
        let snap = self.config.snapshot();
        let node = self.config.node().to_string();
        let sandboxes = self.registry.all();
        let missing: Vec<Arc<pb::Workload>> = snap
            .workloads
            .values()
            .filter(|w| w.enrolled && w.node == node)
            .filter(|w| !self.registry.was_deleted(&w.namespace, &w.name))
            .filter(|w| {
                !sandboxes.iter().any(|s| {
                    (!s.pod_uid.is_empty() && s.pod_uid == w.uid)
                        || (s.pod_namespace == w.namespace && s.pod_name == w.name)
                })
            })
            .cloned()
            .collect();
        let wanted: std::collections::HashSet<IpAddr> = missing
            .iter()
            .flat_map(|w| w.ips.iter().filter_map(|ip| ip.parse().ok()))
            .collect();
        let found = tokio::task::spawn_blocking(move || {
            let dirs: Vec<&std::path::Path> = d.netns_dirs.iter().map(PathBuf::as_path).collect();
            discover::find_netns(&d.proc, &dirs, &wanted)
        })
        .await;
        let found = match found {
            Ok(Ok(f)) => f,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cannot look for pods' network namespaces in /proc");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "pod discovery failed");
                return;
            }
        };
        for w in missing {
            let Some(netns) = w
                .ips
                .iter()
                .filter_map(|ip| ip.parse::<IpAddr>().ok())
                .find_map(|ip| found.get(&ip))
            else {
                continue;
            };
            tracing::info!(pod = %format!("{}/{}", w.namespace, w.name), netns = %netns.display(), "found a running pod the CNI plugin never reported");
            self.registry.add(Sandbox {
                container_id: format!("{DISCOVERED}{}", w.uid),
                netns: netns.display().to_string(),
                ifname: String::new(),
                pod_namespace: w.namespace.clone(),
                pod_name: w.name.clone(),
                pod_uid: w.uid.clone(),
                ips: w.ips.clone(),
            });
        }
    }

    async fn setup(
        &self,
        s: Sandbox,
        workload_key: String,
        w: &Arc<pb::Workload>,
    ) -> anyhow::Result<PodDataplane> {
        let path = s.netns.clone();
        let netns = Arc::new(tokio::task::spawn_blocking(move || PodNetns::open(path)).await??);
        let cookie = netns.cookie()?;
        let ip4 = s
            .ips
            .iter()
            .chain(w.ips.iter())
            .filter_map(|ip| ip.parse::<IpAddr>().ok())
            .find_map(|ip| match ip {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            });
        let listeners = PodListeners::bind(&netns)?;
        // Everything that can fail happens before any task starts, so a failed
        // attempt leaves no listener behind and can simply be retried.
        if let Some(ip) = ip4 {
            Self::lock(&self.inbound).enroll(
                std::path::Path::new(&s.netns),
                ip,
                listeners.inbound_plain(),
            )?;
        }
        let undo = |capture: bool| {
            if capture {
                let _ = Self::lock(&self.capture).unenroll(cookie);
            }
            if let Some(ip) = ip4 {
                let _ = Self::lock(&self.inbound).unenroll(ip);
            }
        };
        if let Err(e) = Self::lock(&self.capture).enroll(cookie, ip4) {
            undo(false);
            return Err(e.into());
        }
        let stats = PodStats::default();
        let workload = LiveWorkload::new(w.clone());
        let local = LocalPod {
            workload: workload.clone(),
            netns: netns.clone(),
        };
        let tasks = match listeners.serve(&self.proxy, &local, &stats) {
            Ok(t) => t,
            Err(e) => {
                undo(true);
                return Err(e.into());
            }
        };
        for ip in s.ips.iter().filter_map(|i| i.parse::<IpAddr>().ok()) {
            self.proxy.local.set(ip, Some(local.clone()));
        }
        Ok(PodDataplane {
            sandbox: s,
            workload,
            workload_key,
            cookie,
            ip4,
            stats,
            netns,
            tasks,
        })
    }

    /// Un-enrolls every pod (weft is being uninstalled from the node).
    pub fn teardown_all(&self) {
        let all = std::mem::take(&mut *Self::lock(&self.pods));
        for p in all.values() {
            self.teardown(p);
        }
    }

    fn teardown(&self, p: &PodDataplane) {
        for ip in p
            .sandbox
            .ips
            .iter()
            .filter_map(|i| i.parse::<IpAddr>().ok())
        {
            self.proxy.local.set(ip, None);
        }
        if let Err(e) = Self::lock(&self.capture).unenroll(p.cookie) {
            tracing::warn!(error = %e, "unenrolling netns cookie");
        }
        if let Some(ip) = p.ip4 {
            if let Err(e) = Self::lock(&self.inbound).unenroll(ip) {
                tracing::warn!(error = %e, "detaching inbound capture");
            }
        }
        tracing::info!(pod = %format!("{}/{}", p.sandbox.pod_namespace, p.sandbox.pod_name), "pod un-enrolled: listeners closed");
    }

    /// Reads back the hint an earlier run wrote (bounded; a bad file counts as none).
    pub fn load_hint(path: Option<&std::path::Path>) -> EnrollmentHint {
        use std::io::Read;
        let mut text = String::new();
        path.and_then(|p| std::fs::File::open(p).ok())
            .and_then(|f| f.take(16 << 20).read_to_string(&mut text).ok())
            .and_then(|_| serde_json::from_str(&text).ok())
            .unwrap_or_default()
    }

    /// Writes what the CNI plugin falls back on when the agent is unreachable. Only
    /// from a view in sync with the control plane: an agent that restarted and has
    /// not synced yet keeps the last hint rather than an empty one.
    fn write_hint(&self, snap: &crate::config::StoreSnapshot, node: &str) {
        if !snap.synced {
            return;
        }
        let hint = hint_of(snap.workloads.values(), node, self.own_namespace.as_deref());
        {
            let mut last = Self::lock(&self.hint);
            if *last == hint {
                return;
            }
            *last = hint.clone();
        }
        let Some(path) = &self.hint_path else { return };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string(&hint).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the CNI enrollment hint");
        }
    }
}

/// The enrollment hint from the workloads known: this node's enrolled pods, and per
/// namespace whether its new pods are enrolled (some pod of it is; or some pod that
/// neither opted out nor uses the host network is not). The agent's own namespace
/// is outside the mesh.
fn hint_of<'a>(
    workloads: impl Iterator<Item = &'a Arc<pb::Workload>>,
    node: &str,
    own_namespace: Option<&str>,
) -> EnrollmentHint {
    let mut hint = EnrollmentHint::default();
    for w in workloads {
        if w.enrolled && w.node == node {
            hint.enrolled_pods
                .push(format!("{}/{}", w.namespace, w.name));
        }
        let opted_out = w
            .labels
            .get(weft_proto::labels::MESH)
            .is_some_and(|v| v == weft_proto::labels::DISABLED);
        if w.enrolled {
            hint.namespaces.insert(w.namespace.clone(), true);
        } else if !opted_out && !w.host_network {
            hint.namespaces.entry(w.namespace.clone()).or_insert(false);
        }
    }
    if let Some(ns) = own_namespace {
        hint.namespaces.insert(ns.to_string(), false);
    }
    hint.enrolled_pods.sort();
    hint
}

impl crate::cni::server::Enrollment for PodManager {
    fn state(&self, s: &Sandbox) -> crate::cni::server::PodState {
        use crate::cni::server::PodState;
        let snap = self.config.snapshot();
        match workload_for(self.config.node(), snap.workloads.iter(), s) {
            Some((_, w)) if w.enrolled => {
                match Self::lock(&self.pods).contains_key(&s.container_id) {
                    true => PodState::Captured,
                    false => PodState::Pending,
                }
            }
            Some(_) => PodState::Outside,
            None if self.own_namespace.as_deref() == Some(s.pod_namespace.as_str()) => {
                PodState::Outside
            }
            None => PodState::Unknown,
        }
    }

    fn namespace_enrolled(&self, namespace: &str) -> Option<bool> {
        Self::lock(&self.hint).namespaces.get(namespace).copied()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    /// As in the traffic metrics: the `app` label, else the pod name.
    workload: String,
}

/// The enrolled pods, as the metrics endpoint reads them.
pub struct PodMetrics {
    pub config: Arc<ConfigStore>,
    pub pods: PodMap,
}

impl Scrape for PodMetrics {
    fn scrape(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self;
        let snap = s.config.snapshot();
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        for p in s.pods.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let workload = match snap.workloads.get(&p.workload_key) {
                Some(w) => crate::metrics::traffic::workload_name(Some(w)).0,
                None => p.sandbox.pod_name.clone(),
            };
            *counts
                .entry((p.sandbox.pod_namespace.clone(), workload))
                .or_default() += 1;
        }
        let f = gauges(counts.into_iter().map(|((namespace, workload), n)| {
            (
                PodLabels {
                    namespace,
                    workload,
                },
                n,
            )
        }));
        family(
            enc,
            "node_enrolled_pods",
            "Pods on this node whose traffic the mesh captures, by namespace and workload",
            &f,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(ns: &str, name: &str, node: &str, enrolled: bool) -> Arc<pb::Workload> {
        Arc::new(pb::Workload {
            namespace: ns.into(),
            name: name.into(),
            node: node.into(),
            enrolled,
            ..Default::default()
        })
    }

    #[test]
    fn the_hint_knows_which_namespaces_enroll_their_new_pods() {
        let mut opted_out = (*w("mixed", "legacy", "n1", false)).clone();
        opted_out.labels.insert(
            weft_proto::labels::MESH.into(),
            weft_proto::labels::DISABLED.into(),
        );
        let mut host = (*w("hostonly", "agent", "n1", false)).clone();
        host.host_network = true;
        let ws = [
            w("shop", "web-1", "n1", true),
            w("shop", "web-2", "n2", true),
            w("plain", "db", "n2", false),
            Arc::new(opted_out),
            Arc::new(host),
            w("mixed", "api", "n2", true),
        ];
        let h = hint_of(ws.iter(), "n1", Some("weft-system"));
        assert_eq!(h.enrolled_pods, vec!["shop/web-1".to_string()]);
        let expected: BTreeMap<String, bool> = [
            ("shop", true),
            ("plain", false),
            ("mixed", true),
            ("weft-system", false),
        ]
        .into_iter()
        .map(|(n, e)| (n.to_string(), e))
        .collect();
        assert_eq!(
            h.namespaces, expected,
            "an opted-out or host-network pod says nothing of its namespace"
        );
        use crate::cni::protocol::HintDecision;
        assert_eq!(h.decide("shop", "new"), HintDecision::MustEnroll);
        assert_eq!(h.decide("plain", "new"), HintDecision::Outside);
        assert_eq!(h.decide("hostonly", "x"), HintDecision::Unknown);
        assert_eq!(h.decide("weft-system", "cp"), HintDecision::Outside);
    }
}
