//! Traffic metrics. Labels are bounded: workloads are named by their `app` label
//! (or pod name), never by IPs or ports; principals are SPIFFE IDs; policies by name.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use weft_proto::pb;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    pub reporter: &'static str,
    pub source_workload: String,
    pub source_namespace: String,
    pub source_principal: String,
    pub destination_workload: String,
    pub destination_namespace: String,
    pub destination_principal: String,
    pub connection_security_policy: &'static str,
}

/// Per-request labels: the connection's traffic labels (reporter is always
/// `destination`: requests are parsed there) plus method and response code.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    #[prometheus(flatten)]
    pub connection: TcpLabels,
    pub request_method: &'static str,
    pub response_code: u16,
}

/// Per-request labels of requests routed at the source by a Gateway API route.
/// Bounded: routes, rules and backends are configuration, not traffic.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub source_workload: String,
    pub source_namespace: String,
    /// `namespace/name` of the Service the client addressed.
    pub service: String,
    /// `namespace/name` of the route, `none` when no rule matched.
    pub route: String,
    pub rule: String,
    /// `namespace/name` of the backend Service, `none` when none was chosen.
    pub backend: String,
    pub response_code: u16,
}

fn duration_histogram() -> Histogram {
    Histogram::new([
        0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    ])
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AuthzLabels {
    pub decision: &'static str,
    pub policy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JwtLabels {
    /// `authenticated`, `no_token` or `rejected`.
    pub outcome: &'static str,
    /// Why a token was rejected (a fixed, short reason); empty otherwise.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrictLabels {
    /// `namespace/name` of the PeerAuthentication that set STRICT.
    pub peer_authentication: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PoolLabels {
    pub source_principal: String,
    pub destination_principal: String,
    pub destination_node: String,
}

pub struct TrafficMetrics {
    pub routed_requests: Family<RouteLabels, Counter>,
    pub routed_duration: Family<RouteLabels, Histogram, fn() -> Histogram>,
    pub routed_retries: Family<RouteLabels, Counter>,
    pub requests: Family<RequestLabels, Counter>,
    pub request_duration: Family<RequestLabels, Histogram, fn() -> Histogram>,
    pub opened: Family<TcpLabels, Counter>,
    pub closed: Family<TcpLabels, Counter>,
    pub failed: Family<TcpLabels, Counter>,
    pub sent: Family<TcpLabels, Counter>,
    pub received: Family<TcpLabels, Counter>,
    pub authz: Family<AuthzLabels, Counter>,
    pub strict_refused: Family<StrictLabels, Counter>,
    pub jwt: Family<JwtLabels, Counter>,
    pub pool_connections: Family<PoolLabels, Gauge>,
    pub pool_streams: Family<PoolLabels, Gauge>,
}

impl Default for TrafficMetrics {
    fn default() -> Self {
        Self {
            routed_requests: Family::default(),
            routed_duration: Family::new_with_constructor(duration_histogram),
            routed_retries: Family::default(),
            requests: Family::default(),
            request_duration: Family::new_with_constructor(duration_histogram),
            opened: Family::default(),
            closed: Family::default(),
            failed: Family::default(),
            sent: Family::default(),
            received: Family::default(),
            authz: Family::default(),
            strict_refused: Family::default(),
            jwt: Family::default(),
            pool_connections: Family::default(),
            pool_streams: Family::default(),
        }
    }
}

impl TrafficMetrics {
    /// Counts a connection opened. Its `failed` series starts at 0 alongside, so
    /// failure rates and dashboards see the connection's labels before any failure.
    pub fn open(&self, l: &TcpLabels) {
        self.opened.get_or_create(l).inc();
        let _ = self.failed.get_or_create(l);
    }

    pub fn register(&self, r: &mut Registry) {
        r.register(
            "routed_requests",
            "HTTP and gRPC requests routed at the source by Gateway API routes, by route, backend and response code",
            self.routed_requests.clone(),
        );
        r.register(
            "routed_request_duration_seconds",
            "Time from request headers to response headers of routed requests at the source proxy, retries included",
            self.routed_duration.clone(),
        );
        r.register(
            "routed_retries",
            "Attempts beyond the first of routed requests (route retry policies)",
            self.routed_retries.clone(),
        );
        r.register(
            "requests",
            "HTTP requests handled at L7 on the destination side, by response code",
            self.requests.clone(),
        );
        r.register(
            "request_duration_seconds",
            "Time from request headers to response headers at the destination proxy",
            self.request_duration.clone(),
        );
        r.register(
            "tcp_connections_opened",
            "TCP connections opened through the node proxy",
            self.opened.clone(),
        );
        r.register(
            "tcp_connections_closed",
            "TCP connections closed",
            self.closed.clone(),
        );
        r.register(
            "tcp_connections_failed",
            "TCP connections that failed (upstream error or reset)",
            self.failed.clone(),
        );
        r.register(
            "tcp_sent_bytes",
            "Bytes sent towards the destination",
            self.sent.clone(),
        );
        r.register(
            "tcp_received_bytes",
            "Bytes received from the destination",
            self.received.clone(),
        );
        r.register(
            "authz_decisions",
            "Authorization decisions by decision and deciding policy",
            self.authz.clone(),
        );
        r.register(
            "plaintext_refused_strict_mtls",
            "Plaintext connections refused because a PeerAuthentication makes the port STRICT",
            self.strict_refused.clone(),
        );
        r.register(
            "request_authentications",
            "Requests to workloads with a RequestAuthentication, by outcome of their JWT check (and the reason of a rejection)",
            self.jwt.clone(),
        );
        r.register(
            "hbone_pool_connections",
            "Open pooled HBONE connections",
            self.pool_connections.clone(),
        );
        r.register(
            "hbone_pool_active_streams",
            "Active streams on pooled HBONE connections",
            self.pool_streams.clone(),
        );
    }
}

/// The workload label of a workload: its `app` label, else its name.
pub fn workload_name(w: Option<&pb::Workload>) -> (String, String, String) {
    match w {
        Some(w) => (
            w.labels
                .get("app")
                .cloned()
                .unwrap_or_else(|| w.name.clone()),
            w.namespace.clone(),
            if w.enrolled {
                w.spiffe_id.clone()
            } else {
                "unknown".into()
            },
        ),
        None => ("unknown".into(), "unknown".into(), "unknown".into()),
    }
}

pub fn labels(
    reporter: &'static str,
    src: Option<&pb::Workload>,
    dst: Option<&pb::Workload>,
    mtls: bool,
) -> TcpLabels {
    let (sw, sn, sp) = workload_name(src);
    let (dw, dn, dp) = workload_name(dst);
    TcpLabels {
        reporter,
        source_workload: sw,
        source_namespace: sn,
        source_principal: sp,
        destination_workload: dw,
        destination_namespace: dn,
        destination_principal: dp,
        connection_security_policy: if mtls { "mutual_tls" } else { "none" },
    }
}
