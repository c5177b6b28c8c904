//! The Wasm plugins' metrics, read from the registry at each scrape
//! ([`crate::metrics::scrape`]).

use super::custom_metrics::{HistogramSnapshot, Kind};
use super::registry::PluginRegistry;
use crate::metrics::scrape::{counters, family, gauges, Scrape};
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::MetricType;
use std::sync::atomic::Ordering::Relaxed;

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
struct PluginLabel {
    plugin: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PluginErrorLabel {
    plugin: String,
    kind: String,
}

impl Scrape for PluginRegistry {
    fn scrape(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        encode(self, enc)
    }
}

fn encode(reg: &PluginRegistry, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
    let all = reg.all();
    let mut plugins: Vec<_> = all.values().collect();
    plugins.sort_by(|a, b| a.id.cmp(&b.id));
    let label = |id: &str| PluginLabel {
        plugin: id.to_string(),
    };
    let count = |f: fn(&super::plugin::PluginStats) -> usize| -> Vec<(PluginLabel, u64)> {
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
    counters(
        enc,
        "wasm_plugin_caught_slow",
        "Calls found running past 2 ms (the plugin then runs off the worker threads)",
        &count(|s| s.caught_slow.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_overloaded",
        "Requests answered by the failStrategy because too many waited for a slow plugin",
        &count(|s| s.overloaded.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_ticks",
        "proxy_on_tick calls (root-context timers), all instances",
        &count(|s| s.ticks.load(Relaxed)),
    )?;
    counters(
        enc,
        "wasm_plugin_queue_notifications",
        "proxy_on_queue_ready calls (a shared queue received items)",
        &count(|s| s.queue_notifications.load(Relaxed)),
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
    )?;
    let usage: Vec<_> = plugins
        .iter()
        .map(|p| (label(&p.id), p.shared().data_usage()))
        .collect();
    family(
        enc,
        "wasm_plugin_shared_data_keys",
        "Keys in the plugin's shared data on this node (at most 1024)",
        &gauges(usage.iter().map(|(l, (k, _))| (l.clone(), to_i64(*k)))),
    )?;
    family(
        enc,
        "wasm_plugin_shared_data_bytes",
        "Bytes of keys and values in the plugin's shared data on this node (at most 1 MiB)",
        &gauges(usage.iter().map(|(l, (_, b))| (l.clone(), to_i64(*b)))),
    )?;
    encode_custom(&plugins, enc)
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CustomLabel {
    plugin: String,
    metric: String,
}

/// A histogram's values as read at this scrape.
#[derive(Debug)]
struct ConstHistogram(HistogramSnapshot);

impl EncodeMetric for ConstHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<NoLabelSet>(self.0.sum, self.0.count, &self.0.buckets, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The metrics plugins defined themselves: one family per type, labelled with the
/// plugin and the metric's name (bounded per plugin, see `custom_metrics`).
fn encode_custom(
    plugins: &[&std::sync::Arc<super::plugin::Plugin>],
    enc: &mut DescriptorEncoder,
) -> Result<(), std::fmt::Error> {
    let (mut counts, mut gauge_values, mut hists) = (Vec::new(), Vec::new(), Vec::new());
    for p in plugins {
        for m in p.custom_metrics().all() {
            let l = CustomLabel {
                plugin: p.id.clone(),
                metric: m.name.clone(),
            };
            match m.kind {
                Kind::Counter => counts.push((l, m.value().max(0) as u64)),
                Kind::Gauge => gauge_values.push((l, m.value())),
                Kind::Histogram => hists.push((l, ConstHistogram(m.histogram()))),
            }
        }
    }
    counters(
        enc,
        "wasm_plugin_metric",
        "Counters a Wasm plugin defined (proxy_define_metric), by plugin and metric",
        &counts,
    )?;
    family(
        enc,
        "wasm_plugin_gauge",
        "Gauges a Wasm plugin defined (proxy_define_metric), by plugin and metric",
        &gauges(gauge_values),
    )?;
    let mut e = enc.encode_descriptor(
        "wasm_plugin_histogram",
        "Histograms a Wasm plugin defined (proxy_define_metric), by plugin and metric",
        None,
        MetricType::Histogram,
    )?;
    for (l, h) in &hists {
        h.encode(e.encode_family(l)?)?;
    }
    Ok(())
}
