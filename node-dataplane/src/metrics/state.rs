//! Metrics read from the node's live state at each scrape: enrolled pods, the eBPF
//! programs and maps, and the Wasm plugins. Their owners keep plain counters and
//! tables; this collector only reads them, so no state is duplicated.

use crate::admin::PodMap;
use crate::ebpf::{Capture, Inbound};
use crate::wasm::registry::PluginRegistry;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, OnceLock};

/// What the collector reads; set once the dataplane is up (nodes without capture
/// export none of these metrics).
pub struct Sources {
    pub config: Arc<crate::config::ConfigStore>,
    pub pods: PodMap,
    pub capture: Arc<Mutex<Capture>>,
    pub inbound: Arc<Mutex<Inbound>>,
    pub plugins: Option<Arc<PluginRegistry>>,
}

#[derive(Default)]
pub struct StateCollector {
    sources: OnceLock<Sources>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("attached", &self.sources.get().is_some())
            .finish()
    }
}

impl StateCollector {
    /// Called once when the dataplane starts; later calls are ignored.
    pub fn attach(&self, s: Sources) {
        let _ = self.sources.set(s);
    }
}

/// Every failure kind a plugin can report, exported even at zero so that alerts and
/// dashboards see a series before the first failure.
pub const PLUGIN_ERROR_KINDS: &[&str] = &[
    "trap",
    "deadline",
    "memory",
    "proc_exit",
    "paused",
    "instantiate",
    "configure",
    "compile",
    "abi",
    "unavailable",
];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PodLabels {
    namespace: String,
    /// As in the traffic metrics: the `app` label, else the pod name.
    workload: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabel {
    program: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginLabel {
    plugin: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginErrorLabel {
    plugin: String,
    kind: String,
}

/// Encodes a family built for this scrape (families drop series that no longer exist).
fn family<L>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    f: &Family<L, Gauge>,
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug,
{
    f.encode(enc.encode_descriptor(name, help, None, MetricType::Gauge)?)
}

fn gauges<L, I>(items: I) -> Family<L, Gauge>
where
    L: EncodeLabelSet + Clone + std::hash::Hash + Eq + std::fmt::Debug,
    I: IntoIterator<Item = (L, i64)>,
{
    let f = Family::<L, Gauge>::default();
    for (l, v) in items {
        f.get_or_create(&l).set(v);
    }
    f
}

fn counters<L>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    items: &[(L, u64)],
) -> Result<(), std::fmt::Error>
where
    L: EncodeLabelSet,
{
    let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (l, v) in items {
        ConstCounter::new(*v).encode(m.encode_family(l)?)?;
    }
    Ok(())
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(s) = self.sources.get() else {
            return Ok(());
        };
        self.encode_pods(s, &mut enc)?;
        self.encode_ebpf(s, &mut enc)?;
        if let Some(p) = &s.plugins {
            encode_plugins(p, &mut enc)?;
        }
        Ok(())
    }
}

impl StateCollector {
    fn encode_pods(&self, s: &Sources, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snap = s.config.snapshot();
        let mut counts: BTreeMap<(String, String), i64> = BTreeMap::new();
        for p in s.pods.lock().unwrap_or_else(|p| p.into_inner()).values() {
            let workload = match snap.workloads.get(&p.workload_key) {
                Some(w) => crate::proxy::metrics::workload_name(Some(w)).0,
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

    fn encode_ebpf(&self, s: &Sources, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let (programs, mut maps) = {
            let c = s.capture.lock().unwrap_or_else(|p| p.into_inner());
            (c.programs(), c.occupancy())
        };
        let (inbound_links, inbound_maps) = {
            let i = s.inbound.lock().unwrap_or_else(|p| p.into_inner());
            (i.links(), i.occupancy())
        };
        maps.extend(inbound_maps);
        let f = gauges(programs.into_iter().map(|(p, attached)| {
            (
                ProgramLabel {
                    program: p.to_string(),
                },
                i64::from(attached),
            )
        }));
        family(
            enc,
            "node_ebpf_program_attached",
            "1 while the capture program is attached, 0 when it is not",
            &f,
        )?;
        let links = Gauge::<i64>::default();
        links.set(i64::try_from(inbound_links).unwrap_or(i64::MAX));
        links.encode(enc.encode_descriptor(
            "node_ebpf_inbound_links",
            "sk_lookup links attached (one per enrolled pod network namespace)",
            None,
            MetricType::Gauge,
        )?)?;
        let label = |m: &str| MapLabel { map: m.to_string() };
        let entries = gauges(
            maps.iter()
                .map(|m| (label(m.map), i64::try_from(m.entries).unwrap_or(i64::MAX))),
        );
        family(
            enc,
            "node_ebpf_map_entries",
            "Entries in each eBPF map",
            &entries,
        )?;
        let capacity = gauges(
            maps.iter()
                .map(|m| (label(m.map), i64::try_from(m.capacity).unwrap_or(i64::MAX))),
        );
        family(
            enc,
            "node_ebpf_map_capacity",
            "Maximum entries of each eBPF map",
            &capacity,
        )
    }
}

fn encode_plugins(
    reg: &PluginRegistry,
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let all = reg.all();
    let mut plugins: Vec<_> = all.values().collect();
    plugins.sort_by(|a, b| a.id.cmp(&b.id));
    let label = |id: &str| PluginLabel {
        plugin: id.to_string(),
    };
    let count = |f: fn(&crate::wasm::plugin::PluginStats) -> usize| -> Vec<(PluginLabel, u64)> {
        plugins
            .iter()
            .map(|p| (label(&p.id), f(&p.stats) as u64))
            .collect()
    };
    counters(
        enc,
        "wasm_plugin_calls",
        "Requests a Wasm plugin was asked to handle",
        &count(|s| s.calls.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_local_replies",
        "Requests a Wasm plugin answered itself (e.g. denied)",
        &count(|s| s.local_replies.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_failed_requests",
        "Requests refused because the plugin failed (FAIL_CLOSE / FAIL_RELOAD)",
        &count(|s| s.failed_requests.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_skipped",
        "Requests that bypassed a failed FAIL_OPEN plugin",
        &count(|s| s.skipped.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_restarts",
        "Instances started again after a failure",
        &count(|s| s.restarts.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_recycled",
        "Instances replaced because their memory kept growing",
        &count(|s| s.recycled.load(Relaxed)),
    )?;
    let mut errors = Vec::new();
    for p in &plugins {
        let by_kind = p.stats.errors.lock().map(|e| e.clone()).unwrap_or_default();
        for kind in PLUGIN_ERROR_KINDS {
            errors.push((
                PluginErrorLabel {
                    plugin: p.id.clone(),
                    kind: (*kind).to_string(),
                },
                by_kind.get(kind).copied().unwrap_or(0),
            ));
        }
    }
    counters(
        enc,
        "wasm_plugin_errors",
        "Plugin failures by kind (trap, deadline = CPU limit hit, memory = memory limit hit, proc_exit, ...)",
        &errors,
    )?;
    let to_i64 = |v: usize| i64::try_from(v).unwrap_or(i64::MAX);
    // One read of each plugin's instances for both gauges.
    let instances: Vec<(PluginLabel, Vec<usize>)> = plugins
        .iter()
        .map(|p| (label(&p.id), p.instance_memory()))
        .collect();
    let memory = gauges(
        instances
            .iter()
            .map(|(l, m)| (l.clone(), to_i64(m.iter().sum()))),
    );
    family(
        enc,
        "wasm_plugin_memory_bytes",
        "Linear memory of the plugin's live instances, summed",
        &memory,
    )?;
    let live = gauges(instances.iter().map(|(l, m)| (l.clone(), to_i64(m.len()))));
    family(
        enc,
        "wasm_plugin_instances",
        "Live instances of the plugin (at most one per proxy worker thread)",
        &live,
    )?;
    let loaded = gauges(
        plugins
            .iter()
            .map(|p| (label(&p.id), i64::from(p.load_error().is_none()))),
    );
    family(
        enc,
        "wasm_plugin_loaded",
        "1 when the plugin's module is compiled and linked, 0 when it cannot run",
        &loaded,
    )
}
