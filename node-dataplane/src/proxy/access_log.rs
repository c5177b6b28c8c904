//! Access log: one structured record per proxied connection (when it ends or is
//! refused) and one per HTTP request handled at L7.
//!
//! Records are `tracing` events with target `weft::access` at level INFO, so they
//! follow `--log-format` (JSON: one object per line) and can be filtered with
//! `RUST_LOG` (`weft::access=off`). Under load they are rate-limited by a token
//! bucket per decision (allowed and denied separately, so a flood of allowed
//! traffic cannot hide denials); dropped records are counted in
//! `weft_node_access_log_dropped_total{decision}`.
//!
//! Never logged: headers, query strings, bodies, certificates or keys. Paths are cut
//! at 256 bytes.

use crate::metrics::DroppedLabel;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use weft_proto::pb;

pub const TARGET: &str = "weft::access";
const MAX_PATH: usize = 256;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessLogSettings {
    pub enabled: bool,
    /// Records per second per decision (the burst is the same number).
    pub rate: u32,
}

impl Default for AccessLogSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            rate: 100,
        }
    }
}

/// A token bucket refilled continuously at `rate` per second.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn take(&mut self, rate: f64, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct AccessLog {
    settings: AccessLogSettings,
    allowed: Mutex<Bucket>,
    denied: Mutex<Bucket>,
    pub dropped: Family<DroppedLabel, Counter>,
}

/// Whether the proxy let the traffic through, and which policy decided. `Unchecked`:
/// the source side, where the destination's proxy authorizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict<'a> {
    Allow(Option<&'a str>),
    Deny(Option<&'a str>),
    Unchecked,
}

impl Verdict<'_> {
    fn decision(&self) -> &'static str {
        match self {
            Verdict::Allow(_) => "allow",
            Verdict::Deny(_) => "deny",
            Verdict::Unchecked => "unchecked",
        }
    }
    fn policy(&self) -> Option<&str> {
        match self {
            Verdict::Allow(p) | Verdict::Deny(p) => *p,
            Verdict::Unchecked => None,
        }
    }
}

/// One connection, as the reporting proxy saw it.
#[derive(Debug, Clone)]
pub struct ConnRecord<'a> {
    /// `source` (outbound side) or `destination` (inbound side).
    pub reporter: &'static str,
    pub source_addr: SocketAddr,
    pub destination_addr: SocketAddr,
    /// SPIFFE IDs, or `unknown`.
    pub source_identity: &'a str,
    pub destination_identity: &'a str,
    /// The destination workload, if known (logged as `namespace/name`).
    pub destination_workload: Option<&'a pb::Workload>,
    /// The Service the client addressed, if any (logged as `namespace/name`).
    pub service: Option<&'a pb::Service>,
    pub mtls: bool,
    pub verdict: Verdict<'a>,
    /// Bytes towards / from the destination (`None` when the connection was handled
    /// per request at L7, whose records carry the detail).
    pub bytes: Option<(u64, u64)>,
    pub duration: Duration,
    pub error: Option<&'a str>,
}

/// One HTTP request handled at L7 (destination side).
#[derive(Debug, Clone)]
pub struct RequestRecord<'a> {
    pub source_addr: SocketAddr,
    pub destination_addr: SocketAddr,
    pub source_identity: &'a str,
    pub destination_workload: &'a pb::Workload,
    pub mtls: bool,
    pub method: &'a str,
    /// The path as received, without its query string.
    pub path: &'a str,
    pub authority: &'a str,
    pub response_code: u16,
    /// The policy (`ns/name`) or plugin (`wasm:ns/name`) that answered instead of
    /// the application, if one did.
    pub decided_by: Option<&'a str>,
    pub duration: Duration,
}

/// One request routed at the source by a Gateway API route.
#[derive(Debug, Clone)]
pub struct RoutedRecord<'a> {
    pub source_addr: SocketAddr,
    pub source_identity: &'a str,
    /// The Service the client addressed.
    pub service: &'a pb::Service,
    pub method: &'a str,
    /// The path as received, without its query string.
    pub path: &'a str,
    /// `namespace/name` of the route and the rule's name (or index), if one matched.
    pub route: Option<&'a str>,
    pub rule: Option<&'a str>,
    /// `namespace/name` of the backend Service chosen, and the endpoint of the last
    /// attempt.
    pub backend: Option<&'a str>,
    pub endpoint: Option<SocketAddr>,
    pub attempts: u32,
    pub response_code: u16,
    pub duration: Duration,
}

impl AccessLog {
    /// `dropped` is the node's `weft_node_access_log_dropped_total` family.
    pub fn new(settings: AccessLogSettings, dropped: Family<DroppedLabel, Counter>) -> Self {
        let now = Instant::now();
        let full = || {
            Mutex::new(Bucket {
                tokens: f64::from(settings.rate),
                last: now,
            })
        };
        Self {
            settings,
            allowed: full(),
            denied: full(),
            dropped,
        }
    }

    /// Whether records are written at all (on, and not filtered out by `RUST_LOG`):
    /// callers skip gathering a record's fields when not.
    pub fn active(&self) -> bool {
        self.settings.enabled && tracing::enabled!(target: TARGET, tracing::Level::INFO)
    }

    /// Whether a record with this decision may be written now.
    fn admit(&self, decision: &'static str) -> bool {
        if !self.active() {
            return false;
        }
        let bucket = if decision == "deny" {
            &self.denied
        } else {
            &self.allowed
        };
        let ok = bucket
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(f64::from(self.settings.rate), Instant::now());
        if !ok {
            self.dropped.get_or_create(&DroppedLabel { decision }).inc();
        }
        ok
    }

    /// A connection that failed before its destination was known (e.g. its original
    /// destination could not be read): no addresses to name, only the listener's side
    /// and the error, so such failures are not silent.
    pub fn early_failure(&self, reporter: &'static str, error: &str) {
        if !self.admit("allow") {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "connection",
            reporter,
            decision = "unchecked",
            error,
            "access"
        );
    }

    pub fn connection(&self, r: &ConnRecord<'_>) {
        if !self.admit(r.verdict.decision()) {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "connection",
            reporter = r.reporter,
            source_addr = %r.source_addr,
            destination_addr = %r.destination_addr,
            source_identity = r.source_identity,
            destination_identity = r.destination_identity,
            destination_workload = %WorkloadName(r.destination_workload),
            service = r.service.map(|s| tracing::field::display(NsName(&s.namespace, &s.name))),
            mtls = r.mtls,
            decision = r.verdict.decision(),
            policy = r.verdict.policy(),
            sent_bytes = r.bytes.map(|b| b.0),
            received_bytes = r.bytes.map(|b| b.1),
            duration_ms = duration_ms(r.duration),
            error = r.error,
            "access"
        );
    }

    pub fn request(&self, r: &RequestRecord<'_>) {
        let denied = r.decided_by.is_some() && r.response_code >= 400;
        if !self.admit(if denied { "deny" } else { "allow" }) {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "request",
            reporter = "destination",
            source_addr = %r.source_addr,
            destination_addr = %r.destination_addr,
            source_identity = r.source_identity,
            destination_workload = %WorkloadName(Some(r.destination_workload)),
            mtls = r.mtls,
            method = r.method,
            path = cut(r.path),
            authority = r.authority,
            response_code = r.response_code,
            decided_by = r.decided_by,
            duration_ms = duration_ms(r.duration),
            "access"
        );
    }
}

impl AccessLog {
    pub fn routed(&self, r: &RoutedRecord<'_>) {
        if !self.admit("allow") {
            return;
        }
        tracing::info!(
            target: TARGET,
            kind = "request",
            reporter = "source",
            source_addr = %r.source_addr,
            source_identity = r.source_identity,
            service = %NsName(&r.service.namespace, &r.service.name),
            method = r.method,
            path = cut(r.path),
            route = r.route,
            rule = r.rule,
            backend = r.backend,
            endpoint = r.endpoint.map(tracing::field::display),
            attempts = r.attempts,
            response_code = r.response_code,
            duration_ms = duration_ms(r.duration),
            "access"
        );
    }
}

/// `namespace/name`, formatted only when a record is written.
struct NsName<'a>(&'a str, &'a str);

impl std::fmt::Display for NsName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.0, self.1)
    }
}

/// A workload's `namespace/name`, or `unknown`.
struct WorkloadName<'a>(Option<&'a pb::Workload>);

impl std::fmt::Display for WorkloadName<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(w) => NsName(&w.namespace, &w.name).fmt(f),
            None => f.write_str("unknown"),
        }
    }
}

fn duration_ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// At most `MAX_PATH` bytes, cut on a character boundary, never the query string.
pub fn cut(path: &str) -> &str {
    let path = path.split(['?', '#']).next().unwrap_or("");
    if path.len() <= MAX_PATH {
        return path;
    }
    let mut end = MAX_PATH;
    while !path.is_char_boundary(end) {
        end -= 1;
    }
    &path[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_admits_the_rate_then_refills() {
        let t0 = Instant::now();
        let mut b = Bucket {
            tokens: 3.0,
            last: t0,
        };
        assert!((0..3).all(|_| b.take(3.0, t0)));
        assert!(!b.take(3.0, t0));
        // A third of a second later: one more token.
        assert!(b.take(3.0, t0 + Duration::from_millis(334)));
        assert!(!b.take(3.0, t0 + Duration::from_millis(334)));
        // Never more than the burst, however long it was idle.
        let later = t0 + Duration::from_secs(60);
        assert_eq!((0..10).filter(|_| b.take(3.0, later)).count(), 3);
    }

    #[test]
    fn paths_lose_their_query_and_are_cut_on_a_char_boundary() {
        assert_eq!(cut("/a/b?token=secret"), "/a/b");
        assert_eq!(cut("/a#frag"), "/a");
        let long = format!("/{}", "é".repeat(200));
        let c = cut(&long);
        assert!(c.len() <= MAX_PATH && c.len() >= MAX_PATH - 1);
        assert!(long.starts_with(c));
    }

    #[test]
    fn disabled_log_admits_nothing_and_denials_have_their_own_bucket() {
        let off = AccessLog::new(
            AccessLogSettings {
                enabled: false,
                rate: 10,
            },
            Family::default(),
        );
        assert!(!off.admit("allow"));
        // (tracing::enabled! is false without a subscriber: test the buckets directly.)
        let log = AccessLog::new(
            AccessLogSettings {
                enabled: true,
                rate: 2,
            },
            Family::default(),
        );
        let now = Instant::now();
        let take = |b: &Mutex<Bucket>| b.lock().unwrap().take(2.0, now);
        assert!(take(&log.allowed) && take(&log.allowed) && !take(&log.allowed));
        assert!(
            take(&log.denied),
            "allowed traffic used up the denied bucket"
        );
    }
}
