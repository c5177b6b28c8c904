//! The capture programs' metrics, read from the loaded programs and maps at each
//! scrape ([`crate::metrics::scrape`]).

use super::{Capture, Inbound};
use crate::metrics::scrape::{family, gauges, Scrape};
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabel {
    program: String,
}
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: String,
}

/// The node's capture programs, as the metrics endpoint reads them.
pub struct CaptureMetrics {
    pub capture: Arc<Mutex<Capture>>,
    pub inbound: Arc<Mutex<Inbound>>,
}

impl Scrape for CaptureMetrics {
    fn scrape(&self, enc: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self;
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
