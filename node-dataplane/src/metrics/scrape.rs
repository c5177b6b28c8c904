//! Metrics read from the node's live state at each scrape (enrolled pods, the eBPF
//! programs and maps, the Wasm plugins). Their owners keep plain counters and
//! tables and implement [`Scrape`]; the collector only asks them, so no state is
//! duplicated and this module depends on none of them.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use std::sync::{Arc, OnceLock};

/// A part of the node that exports metrics read from its own state.
pub trait Scrape: Send + Sync {
    /// Encodes this part's metric families (called once per scrape).
    fn scrape(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error>;
}

/// Asks every attached [`Scrape`] at each scrape; set once the dataplane is up
/// (nodes without capture export none of these metrics).
#[derive(Default)]
pub struct StateCollector {
    sources: OnceLock<Vec<Arc<dyn Scrape>>>,
}

impl std::fmt::Debug for StateCollector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateCollector")
            .field("attached", &self.sources.get().map(Vec::len))
            .finish()
    }
}

impl StateCollector {
    /// Called once when the dataplane starts; later calls are ignored.
    pub fn attach(&self, sources: Vec<Arc<dyn Scrape>>) {
        let _ = self.sources.set(sources);
    }
}

impl Collector for StateCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for s in self.sources.get().into_iter().flatten() {
            s.scrape(&mut enc)?;
        }
        Ok(())
    }
}

/// Encodes a family built for this scrape (families drop series that no longer exist).
pub(crate) fn family<L>(
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

pub(crate) fn gauges<L, I>(items: I) -> Family<L, Gauge>
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

pub(crate) fn counters<L>(
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
