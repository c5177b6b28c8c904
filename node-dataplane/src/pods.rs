//! Per-pod dataplane: for every sandbox the CNI plugin reported whose workload the
//! control plane says is enrolled and on this node, the agent opens the pod's
//! netns, has the proxy bind its listeners there ([`crate::proxy::listeners`]),
//! records the netns cookie in the capture map and attaches inbound capture, then
//! has the proxy serve the listeners. A pod that leaves (CNI DEL, deleted, opted
//! out) is torn down. [`PodManager`] owns the [`PodMap`].

use crate::cni::protocol::{EnrollmentHint, Sandbox};
use crate::cni::registry::PodRegistry;
use crate::config::ConfigStore;
use crate::ebpf::{Capture, Inbound};
use crate::metrics::scrape::{family, gauges, Scrape};
use crate::netns::PodNetns;
use crate::proxy::counters::PodStats;
use crate::proxy::listeners::PodListeners;
use crate::proxy::local::LocalPod;
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
    pub workload_key: String,
    pub cookie: u64,
    pub ip4: Option<Ipv4Addr>,
    /// Its listeners' counters.
    pub stats: PodStats,
    pub netns: Arc<PodNetns>,
    tasks: Vec<JoinHandle<()>>,
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
}

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
    pub async fn run(self) {
        let mut cfg = self.config.watch();
        let mut reg = self.registry.watch();
        loop {
            self.reconcile().await;
            tokio::select! {
                r = cfg.changed() => if r.is_err() { return },
                r = reg.changed() => if r.is_err() { return },
            }
        }
    }

    fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub async fn reconcile(&self) {
        let snap = self.config.snapshot();
        let node = self.config.node().to_string();
        self.write_hint(&snap, &node);
        let mut wanted: BTreeMap<String, (Sandbox, String, Arc<pb::Workload>)> = BTreeMap::new();
        for s in self.registry.all() {
            if let Some((key, w)) = workload_for(&node, snap.workloads.iter(), &s) {
                if w.enrolled {
                    wanted.insert(s.container_id.clone(), (s, key, w));
                }
            }
        }
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
        // Set up what is new.
        for (id, (s, key, w)) in wanted {
            if Self::lock(&self.pods).contains_key(&id) {
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
        if snap.synced {
            self.ready.store(true, Ordering::Release);
        }
    }

    async fn setup(
        &self,
        s: Sandbox,
        workload_key: String,
        w: &pb::Workload,
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
        let local = LocalPod {
            workload: Arc::new(w.clone()),
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
            workload_key,
            cookie,
            ip4,
            stats,
            netns,
            tasks,
        })
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

    fn write_hint(&self, snap: &crate::config::StoreSnapshot, node: &str) {
        let Some(path) = &self.hint_path else { return };
        let hint = EnrollmentHint {
            enrolled_pods: snap
                .workloads
                .values()
                .filter(|w| w.enrolled && w.node == node)
                .map(|w| format!("{}/{}", w.namespace, w.name))
                .collect(),
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string(&hint).unwrap_or_default();
        if let Err(e) = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)) {
            tracing::warn!(path = %path.display(), error = %e, "cannot write the CNI enrollment hint");
        }
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
