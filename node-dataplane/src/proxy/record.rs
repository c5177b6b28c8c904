//! One record per connection. Every connection the proxy handles holds a
//! [`ConnRecord`] from the moment it is accepted until its task ends; the guard
//! is the only writer of the three views of that connection:
//!
//! - the traffic metrics (`weft_tcp_*`, [`crate::metrics::traffic`]),
//! - the node's and the pod's counters that `/config_dump` shows
//!   ([`NodeCounters`], [`OutboundStats`], [`InboundStats`]),
//! - the access-log record ([`super::access_log`]).
//!
//! Events that tests and operators read while a connection is open (accepted,
//! forwarded, denied) are counted when they happen; what is only known at the
//! end (bytes, the error, the closing metrics, the access-log record) is written
//! once when the guard drops, so a connection whose task is cancelled or panics
//! is still recorded. A connection counts as `opened` once the proxy starts to
//! forward it (after authorization on the destination side), and every opened
//! connection is closed exactly once: `failed <= opened` always holds.

use super::access_log::Verdict;
use super::counters::{InboundStats, NodeCounters, OutboundStats};
use super::state::ProxyState;
use crate::metrics::traffic::TcpLabels;
use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;
use weft_authz::Decision;
use weft_proto::pb;

/// Access log note for a connection closed because a policy now denies it.
pub const CLOSED_BY_POLICY: &str = "closed: denied by a policy change";

/// The listener a connection came through, with its pod's counters.
enum Listener {
    Outbound(Arc<OutboundStats>),
    InboundPlaintext(Arc<InboundStats>),
    InboundHbone,
}

/// Who and what the access-log record names; filled in as the proxy learns it.
#[derive(Default)]
pub(crate) struct Peers {
    pub source_addr: Option<SocketAddr>,
    pub destination_addr: Option<SocketAddr>,
    pub source_identity: Option<String>,
    pub destination_identity: Option<String>,
    pub destination_workload: Option<Arc<pb::Workload>>,
    pub service: Option<Arc<pb::Service>>,
}

/// How the connection ended, as far as the guard was told.
enum End {
    /// Still open, or ended without error.
    Open,
    Error(String),
    ClosedByPolicy,
}

/// The guard of one connection (see the module docs).
pub(crate) struct ConnRecord {
    /// The mesh: metrics, node counters and the access log. `None`: a listener
    /// without mesh state (plaintext-only forwarding), which keeps pod counters only.
    state: Option<Arc<ProxyState>>,
    listener: Listener,
    started: Instant,
    /// Traffic metric labels, set when the connection opened.
    labels: Option<TcpLabels>,
    pub(crate) peers: Peers,
    mtls: bool,
    /// `None` while not decided (and on the source side, where the destination decides).
    decision: Option<(bool, Option<Arc<str>>, &'static str)>,
    bytes: Option<(u64, u64)>,
    end: End,
}

impl ConnRecord {
    /// A connection accepted on a pod's outbound listener.
    pub(crate) fn outbound(state: Option<Arc<ProxyState>>, stats: Arc<OutboundStats>) -> Self {
        stats.accepted.fetch_add(1, Relaxed);
        Self::new(state, Listener::Outbound(stats), false)
    }

    /// A connection accepted on a pod's plaintext inbound listener from `peer`.
    pub(crate) fn inbound_plaintext(
        state: Option<Arc<ProxyState>>,
        stats: Arc<InboundStats>,
        peer: SocketAddr,
    ) -> Self {
        stats.accepted.fetch_add(1, Relaxed);
        let mut r = Self::new(state, Listener::InboundPlaintext(stats), false);
        r.peers.source_addr = Some(peer);
        r.peers.source_identity = Some("unknown".into());
        r
    }

    /// The destination an inbound plaintext connection was addressed to.
    pub(crate) fn destination(&mut self, dst: SocketAddr) {
        if let Listener::InboundPlaintext(s) = &self.listener {
            if let Ok(mut l) = s.last_dst.lock() {
                *l = Some(dst);
            }
        }
        self.peers.destination_addr = Some(dst);
    }

    /// A CONNECT stream accepted on an HBONE session from `peer` with SPIFFE ID
    /// `peer_id`, to `dst`.
    pub(crate) fn inbound_hbone(
        state: Arc<ProxyState>,
        peer: SocketAddr,
        peer_id: String,
        dst: SocketAddr,
    ) -> Self {
        let mut r = Self::new(Some(state), Listener::InboundHbone, true);
        r.peers.source_addr = Some(peer);
        r.peers.destination_addr = Some(dst);
        r.peers.source_identity = Some(peer_id);
        r
    }

    fn new(state: Option<Arc<ProxyState>>, listener: Listener, mtls: bool) -> Self {
        if let Some(s) = &state {
            s.counters.open.fetch_add(1, Relaxed);
        }
        Self {
            state,
            listener,
            started: Instant::now(),
            labels: None,
            peers: Peers::default(),
            mtls,
            decision: None,
            bytes: None,
            end: End::Open,
        }
    }

    /// The destination's authorization decision. A denial is counted now; the
    /// connection is never opened.
    pub(crate) fn decided(&mut self, d: &Decision) {
        self.decision = Some((d.allowed, d.policy.clone(), d.reason));
        if d.allowed {
            return;
        }
        if let Some(s) = &self.state {
            match self.listener {
                Listener::InboundHbone => NodeCounters::count(&s.counters.hbone_in_denied),
                Listener::InboundPlaintext(_) => {
                    NodeCounters::count(&s.counters.plaintext_in_denied)
                }
                Listener::Outbound(_) => {}
            }
        }
        self.bytes = Some((0, 0));
    }

    /// The original destination a captured outbound connection was addressed to.
    pub(crate) fn original_destination(&self, dst: SocketAddr) {
        if let Listener::Outbound(s) = &self.listener {
            if let Ok(mut l) = s.last_orig_dst.lock() {
                *l = Some(dst);
            }
        }
    }

    /// The proxy starts forwarding the connection: it counts as opened, with
    /// these labels.
    pub(crate) fn open(&mut self, labels: TcpLabels) {
        if let Some(s) = &self.state {
            s.metrics.traffic.open(&labels);
            if let Listener::InboundHbone = self.listener {
                NodeCounters::count(&s.counters.hbone_in);
            }
        }
        self.labels = Some(labels);
    }

    /// An outbound connection goes to a destination outside the mesh, in plaintext.
    pub(crate) fn plaintext_out(&self) {
        if let Some(s) = &self.state {
            NodeCounters::count(&s.counters.plaintext_out);
        }
    }

    /// The connection to the next hop (the application, or an address outside the
    /// mesh) is established.
    pub(crate) fn forwarded(&self) {
        match &self.listener {
            Listener::Outbound(s) => s.forwarded.fetch_add(1, Relaxed),
            Listener::InboundPlaintext(s) => s.forwarded.fetch_add(1, Relaxed),
            Listener::InboundHbone => 0,
        };
    }

    /// An outbound connection's HBONE stream is established.
    pub(crate) fn tunneled(&mut self) {
        self.mtls = true;
        if let Listener::Outbound(s) = &self.listener {
            s.tunneled.fetch_add(1, Relaxed);
        }
        if let Some(s) = &self.state {
            NodeCounters::count(&s.counters.hbone_out);
        }
    }

    /// The connection is parsed as HTTP (its requests are logged one by one).
    pub(crate) fn l7(&self) {
        self.forwarded();
        if let Some(s) = &self.state {
            NodeCounters::count(&s.counters.l7_connections);
        }
    }

    /// The connection was served as HTTP at the source, its requests routed one by
    /// one (Gateway API routes); they are recorded one by one.
    pub(crate) fn routed(&self) {
        self.forwarded();
    }

    /// Bytes copied (towards the destination, from it).
    pub(crate) fn bytes(&mut self, sent: u64, received: u64) {
        self.bytes = Some((sent, received));
    }

    /// The connection failed with `e`.
    pub(crate) fn fail(&mut self, e: &anyhow::Error) {
        self.end = End::Error(format!("{e:#}"));
    }

    /// A policy change denied the open connection, which was reset.
    pub(crate) fn closed_by_policy(&mut self) {
        self.end = End::ClosedByPolicy;
    }

    fn error(&self) -> Option<&str> {
        match &self.end {
            End::Open => None,
            End::Error(e) => Some(e),
            End::ClosedByPolicy => Some(CLOSED_BY_POLICY),
        }
    }

    fn write_pod_counters(&self) {
        let failed = !matches!(self.end, End::Open);
        match &self.listener {
            Listener::Outbound(s) => {
                if let Some((a, b)) = self.bytes {
                    s.bytes_up.fetch_add(a, Relaxed);
                    s.bytes_down.fetch_add(b, Relaxed);
                }
                if failed {
                    s.failed.fetch_add(1, Relaxed);
                }
            }
            Listener::InboundPlaintext(s) => {
                if matches!(self.end, End::Error(_)) {
                    s.failed.fetch_add(1, Relaxed);
                }
            }
            Listener::InboundHbone => {}
        }
    }

    fn write_metrics(&self, state: &ProxyState) {
        let Some(l) = &self.labels else { return };
        let t = &state.metrics.traffic;
        t.closed.get_or_create(l).inc();
        if matches!(self.end, End::Open) {
            if let Some((a, b)) = self.bytes {
                t.sent.get_or_create(l).inc_by(a);
                t.received.get_or_create(l).inc_by(b);
            }
        } else {
            t.failed.get_or_create(l).inc();
        }
    }

    fn write_access_log(&self, state: &ProxyState) {
        let log = &state.access_log;
        if !log.active() {
            return;
        }
        let p = &self.peers;
        let reporter = match self.listener {
            Listener::Outbound(_) => "source",
            _ => "destination",
        };
        let (Some(source_addr), Some(destination_addr)) = (p.source_addr, p.destination_addr)
        else {
            // Failed before its destination was known: no addresses to name, but
            // the failure is recorded.
            if let Some(e) = self.error() {
                log.early_failure(reporter, e);
            }
            return;
        };
        let (verdict, error) = match &self.decision {
            Some((true, policy, _)) => (Verdict::Allow(policy.as_deref()), self.error()),
            Some((false, policy, reason)) => (Verdict::Deny(policy.as_deref()), Some(*reason)),
            None => (Verdict::Unchecked, self.error()),
        };
        let dw = p.destination_workload.as_deref();
        log.connection(&super::access_log::ConnRecord {
            reporter,
            source_addr,
            destination_addr,
            source_identity: p.source_identity.as_deref().unwrap_or("unknown"),
            destination_identity: p.destination_identity.as_deref().unwrap_or("unknown"),
            destination_workload: dw,
            service: p.service.as_deref(),
            mtls: self.mtls,
            verdict,
            // Parsed connections are logged per request, and carry no byte counts.
            bytes: self.bytes,
            duration: if matches!(verdict, Verdict::Deny(_)) {
                std::time::Duration::ZERO
            } else {
                self.started.elapsed()
            },
            error,
        });
    }
}

impl Drop for ConnRecord {
    fn drop(&mut self) {
        self.write_pod_counters();
        if let Some(state) = self.state.take() {
            state.counters.open.fetch_sub(1, Relaxed);
            self.write_metrics(&state);
            self.write_access_log(&state);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConfigStore;
    use crate::metrics::traffic::labels;

    fn state() -> Arc<ProxyState> {
        crate::proxy::state::test_state(ConfigStore::new("node-a"))
    }

    /// (opened, closed, failed, sent) for the label set of a destination-side
    /// connection with no known workloads.
    fn traffic(s: &ProxyState, mtls: bool) -> (u64, u64, u64, u64) {
        let l = labels("destination", None, None, mtls);
        let t = &s.metrics.traffic;
        (
            t.opened.get_or_create(&l).get(),
            t.closed.get_or_create(&l).get(),
            t.failed.get_or_create(&l).get(),
            t.sent.get_or_create(&l).get(),
        )
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_connection_is_closed_once_with_its_bytes_or_its_failure() {
        let s = state();
        let mut ok = ConnRecord::inbound_hbone(
            s.clone(),
            addr("10.0.0.1:4000"),
            "spiffe://td/ns/a/sa/b".into(),
            addr("10.0.0.2:80"),
        );
        ok.open(labels("destination", None, None, true));
        assert_eq!(traffic(&s, true), (1, 0, 0, 0), "counted as opened at once");
        assert_eq!(s.counters.hbone_in.load(Relaxed), 1);
        ok.bytes(10, 20);
        drop(ok);
        assert_eq!(traffic(&s, true), (1, 1, 0, 10));

        let mut bad = ConnRecord::inbound_hbone(
            s.clone(),
            addr("10.0.0.1:4001"),
            "spiffe://td/ns/a/sa/b".into(),
            addr("10.0.0.2:80"),
        );
        bad.open(labels("destination", None, None, true));
        bad.bytes(5, 5);
        bad.fail(&anyhow::anyhow!("reset"));
        drop(bad);
        assert_eq!(
            traffic(&s, true),
            (2, 2, 1, 10),
            "a failed connection's bytes are not counted as sent"
        );
    }

    #[test]
    fn a_denied_connection_is_counted_as_denied_and_never_opened() {
        let s = state();
        let stats = Arc::new(InboundStats::default());
        let mut r =
            ConnRecord::inbound_plaintext(Some(s.clone()), stats.clone(), addr("10.0.0.1:1"));
        r.destination(addr("10.0.0.2:80"));
        r.decided(&Decision {
            allowed: false,
            policy: Some("ns/deny".into()),
            rule: None,
            audited: vec![],
            reason: "denied by policy",
        });
        drop(r);
        assert_eq!(s.counters.plaintext_in_denied.load(Relaxed), 1);
        assert_eq!(traffic(&s, false), (0, 0, 0, 0));
        assert_eq!(stats.accepted.load(Relaxed), 1);
        assert_eq!(stats.failed.load(Relaxed), 0);
        assert_eq!(*stats.last_dst.lock().unwrap(), Some(addr("10.0.0.2:80")));
    }

    /// A connection whose task is dropped mid-way (cancelled, or the listener torn
    /// down) is still closed, exactly once.
    #[tokio::test]
    async fn a_dropped_task_still_closes_its_connection() {
        let s = state();
        let stats = Arc::new(OutboundStats::default());
        let mut r = ConnRecord::outbound(Some(s.clone()), stats.clone());
        r.peers.source_addr = Some(addr("10.0.0.1:1"));
        r.peers.destination_addr = Some(addr("10.0.0.9:80"));
        let l = labels("source", None, None, false);
        r.open(l.clone());
        let task = tokio::spawn(async move {
            let _r = r;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        task.abort();
        let _ = task.await;
        let t = &s.metrics.traffic;
        assert_eq!(t.opened.get_or_create(&l).get(), 1);
        assert_eq!(t.closed.get_or_create(&l).get(), 1);
        assert_eq!(stats.accepted.load(Relaxed), 1);
    }
}
