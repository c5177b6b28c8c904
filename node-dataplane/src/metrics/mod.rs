//! Node metrics (Prometheus text format). Names are documented in docs/metrics.md.
//!
//! Counters the agent updates as things happen live here; [`scrape`] reads the
//! rest (pods, eBPF, plugins) from their owners at scrape time.

pub mod scrape;
pub mod traffic;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::Arc;

/// The decision whose access-log records were dropped (`allow`, `deny`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabel {
    pub decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IdentityLabel {
    pub identity: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub control_plane_connected: Gauge,
    pub config_updates: Counter,
    pub nacks: Counter,
    pub cert_renewals: Counter,
    pub cert_rotations: Counter,
    pub cert_errors: Counter,
    pub cert_expiry: Family<IdentityLabel, Gauge>,
    /// Standalone: expiry of the node's own credential (unix time).
    pub node_credential_expiry: Gauge,
    pub node_credential_renewal_errors: Counter,
    pub traffic: traffic::TrafficMetrics,
    pub scrape: Arc<scrape::StateCollector>,
    pub access_log_dropped: Family<DroppedLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        // Traffic metrics are `weft_*` (as dashboards expect); agent internals `weft_node_*`.
        let mut root = Registry::default();
        root.register_collector(Box::new(weft_runtime::process_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("weft");
        let m = Self {
            registry: Registry::default(),
            cert_rotations: Counter::default(),
            scrape: Arc::default(),
            access_log_dropped: Family::default(),
            control_plane_connected: Gauge::default(),
            config_updates: Counter::default(),
            nacks: Counter::default(),
            cert_renewals: Counter::default(),
            cert_errors: Counter::default(),
            cert_expiry: Family::default(),
            node_credential_expiry: Gauge::default(),
            node_credential_renewal_errors: Counter::default(),
            traffic: Default::default(),
        };
        m.traffic.register(registry);
        registry.register_collector(Box::new(m.scrape.clone()));
        let node = registry.sub_registry_with_prefix("node");
        node.register(
            "control_plane_connected",
            "1 while the config stream to the control plane is open",
            m.control_plane_connected.clone(),
        );
        node.register(
            "config_updates",
            "Config updates received",
            m.config_updates.clone(),
        );
        node.register(
            "config_nacks",
            "Config updates rejected (partly or wholly)",
            m.nacks.clone(),
        );
        node.register(
            "certificate_issuances",
            "Workload certificates obtained (first issue and renewals)",
            m.cert_renewals.clone(),
        );
        node.register(
            "access_log_dropped",
            "Access log records dropped by the rate limit, by decision",
            m.access_log_dropped.clone(),
        );
        node.register(
            "certificate_rotations",
            "Workload certificates replaced before expiry by a renewed one",
            m.cert_rotations.clone(),
        );
        node.register(
            "certificate_errors",
            "Failed certificate requests",
            m.cert_errors.clone(),
        );
        node.register(
            "certificate_expiry_timestamp_seconds",
            "Expiry of each workload certificate held (unix time)",
            m.cert_expiry.clone(),
        );
        node.register(
            "credential_expiry_timestamp_seconds",
            "Standalone: expiry of the node's own credential (unix time)",
            m.node_credential_expiry.clone(),
        );
        node.register(
            "credential_renewal_errors",
            "Standalone: failed renewals of the node's own credential",
            m.node_credential_renewal_errors.clone(),
        );
        for decision in ["allow", "deny"] {
            let _ = m
                .access_log_dropped
                .get_or_create(&DroppedLabel { decision });
        }
        Self {
            registry: root,
            ..m
        }
    }

    pub fn encode(&self) -> String {
        weft_runtime::encode_metrics(&self.registry)
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
