//! Control-plane metrics (Prometheus text format). Names are documented in docs/metrics.md.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabel {
    pub node: String,
}

pub struct Metrics {
    pub registry: Registry,
    pub connected_nodes: Gauge,
    pub pushes: Counter,
    pub pushed_resources: Counter,
    pub push_latency: Histogram,
    pub nacks: Family<NodeLabel, Counter>,
    pub resources: Family<KindLabel, Gauge>,
    pub certs_signed: Counter,
    pub cert_refusals: Family<ReasonLabel, Counter>,
    pub ca_expiry: Gauge<f64, AtomicU64>,
    /// 0 stable, 1 trusting, 2 reissuing.
    pub ca_rotation_phase: Gauge,
    pub source_errors: Gauge,
    /// 1 while this replica holds the leader Lease (always 1 in standalone mode).
    pub leader: Gauge,
    pub watch_errors: Family<KindLabel, Counter>,
    pub node_auth_refusals: Family<ReasonLabel, Counter>,
    /// Node connections closed because their credential was revoked or expired.
    pub node_connections_closed: Family<ReasonLabel, Counter>,
    /// Entries of the standalone revocation list.
    pub revoked_node_credentials: Gauge,
    pub node_credentials_renewed: Counter,
}

/// Reasons of `weft_cp_certificate_refusals_total` (see docs/metrics.md).
pub const CERTIFICATE_REFUSAL_REASONS: &[&str] = &[
    "unauthenticated",
    "invalid_id",
    "not_on_node",
    "invalid_audience",
    "malformed_csr",
    "bad_signature",
    "key_type",
    "san_mismatch",
    "wrong_identity",
    "not_ready",
    "internal",
];

/// Reasons of `weft_cp_node_auth_refusals_total`.
pub const NODE_AUTH_REFUSAL_REASONS: &[&str] = &[
    "unauthenticated",
    "permission_denied",
    "unavailable",
    "rate_limited",
];

/// Reasons of `weft_cp_node_connections_closed_total`.
pub const NODE_CONNECTION_CLOSE_REASONS: &[&str] = &["revoked", "expired"];

impl Metrics {
    pub fn new() -> Self {
        let mut root = Registry::default();
        root.register_collector(Box::new(weft_runtime::process_metrics::ProcessCollector));
        let registry = root.sub_registry_with_prefix("weft_cp");
        let m = Self {
            connected_nodes: Gauge::default(),
            pushes: Counter::default(),
            pushed_resources: Counter::default(),
            push_latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            nacks: Family::default(),
            resources: Family::default(),
            certs_signed: Counter::default(),
            cert_refusals: Family::default(),
            ca_expiry: Gauge::default(),
            ca_rotation_phase: Gauge::default(),
            source_errors: Gauge::default(),
            leader: Gauge::default(),
            watch_errors: Family::default(),
            node_auth_refusals: Family::default(),
            node_connections_closed: Family::default(),
            revoked_node_credentials: Gauge::default(),
            node_credentials_renewed: Counter::default(),
            registry: Registry::default(),
        };
        registry.register(
            "connected_nodes",
            "Node agents with an open config stream",
            m.connected_nodes.clone(),
        );
        registry.register("pushes", "Config updates sent to nodes", m.pushes.clone());
        registry.register(
            "pushed_resources",
            "Resources (upserts and removals) sent to nodes",
            m.pushed_resources.clone(),
        );
        registry.register(
            "push_latency_seconds",
            "Time from a model change to its update being queued for a node",
            m.push_latency.clone(),
        );
        registry.register("nacks", "Config updates rejected by nodes", m.nacks.clone());
        registry.register(
            "resources",
            "Distributed resources by kind",
            m.resources.clone(),
        );
        registry.register(
            "certificates_signed",
            "Workload SVIDs signed",
            m.certs_signed.clone(),
        );
        registry.register(
            "certificate_refusals",
            "Certificate requests refused, by reason",
            m.cert_refusals.clone(),
        );
        registry.register(
            "ca_expiry_timestamp_seconds",
            "Expiry of the CA signing certificate (unix time)",
            m.ca_expiry.clone(),
        );
        registry.register(
            "ca_rotation_phase",
            "Where a CA rotation stands: 0 stable, 1 trusting (both CAs trusted, the old one signs), 2 reissuing (the new one signs)",
            m.ca_rotation_phase.clone(),
        );
        registry.register(
            "source_errors",
            "Manifests or objects the config source rejected",
            m.source_errors.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica is the leader (writes status, owns the CA Secret)",
            m.leader.clone(),
        );
        registry.register(
            "watch_errors",
            "Kubernetes watch failures, by kind (each is retried with backoff)",
            m.watch_errors.clone(),
        );
        registry.register(
            "node_auth_refusals",
            "Node agent requests refused by authentication, by reason",
            m.node_auth_refusals.clone(),
        );
        registry.register(
            "node_connections_closed",
            "Node connections closed because their credential was revoked or expired, by reason",
            m.node_connections_closed.clone(),
        );
        registry.register(
            "revoked_node_credentials",
            "Entries of the revocation list of node credentials (standalone mode)",
            m.revoked_node_credentials.clone(),
        );
        registry.register(
            "node_credentials_renewed",
            "Node credentials renewed for their node agent (standalone mode)",
            m.node_credentials_renewed.clone(),
        );
        // Every reason exported from the start (at 0), so that rates and alerts
        // see a series before the first refusal.
        for reason in CERTIFICATE_REFUSAL_REASONS {
            let _ = m.cert_refusals.get_or_create(&ReasonLabel {
                reason: (*reason).to_string(),
            });
        }
        for reason in NODE_AUTH_REFUSAL_REASONS {
            let _ = m.node_auth_refusals.get_or_create(&ReasonLabel {
                reason: (*reason).to_string(),
            });
        }
        for reason in NODE_CONNECTION_CLOSE_REASONS {
            let _ = m.node_connections_closed.get_or_create(&ReasonLabel {
                reason: (*reason).to_string(),
            });
        }
        Self {
            registry: root,
            ..m
        }
    }

    pub fn refuse(&self, reason: &str) {
        self.cert_refusals
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
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
