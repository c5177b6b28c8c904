//! Choosing a Service endpoint: round robin, or power-of-two-choices over active
//! connections (the default). Endpoints that failed recently are skipped while
//! others are available.
//!
//! Outlier ejection (per-request routing reports every result): an endpoint that
//! fails [`CONSECUTIVE_FAILURES`] times in a row (5xx answers, connection or
//! request errors) is ejected for [`FAILURE_COOLDOWN`], unless that would eject
//! more than [`MAX_EJECTED_PERCENT`] of its Service's endpoints.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LbPolicy {
    RoundRobin,
    #[default]
    LeastConn,
}

/// How long a failed endpoint is avoided.
pub const FAILURE_COOLDOWN: Duration = Duration::from_secs(10);
/// Failures in a row that eject an endpoint.
pub const CONSECUTIVE_FAILURES: u32 = 5;
/// Endpoints tracked (active counts, failure streaks) before unused ones are
/// forgotten.
const MAX_TRACKED: usize = 65_536;
/// At most this share of a Service's endpoints is ejected at once.
pub const MAX_EJECTED_PERCENT: usize = 50;

#[derive(Default)]
pub struct Balancer {
    pub policy: LbPolicy,
    rr: AtomicUsize,
    active: Mutex<HashMap<SocketAddr, Arc<AtomicUsize>>>,
    failed: Mutex<HashMap<SocketAddr, Instant>>,
    /// Failures in a row per endpoint (reset by a success).
    streak: Mutex<HashMap<SocketAddr, u32>>,
}

/// Counts an active connection to an endpoint until dropped.
pub struct Active(Arc<AtomicUsize>);
impl Drop for Active {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Balancer {
    pub fn new(policy: LbPolicy) -> Self {
        Self {
            policy,
            ..Default::default()
        }
    }

    fn counter(&self, ep: SocketAddr) -> Arc<AtomicUsize> {
        let mut active = self.active.lock().unwrap_or_else(|p| p.into_inner());
        if active.len() >= MAX_TRACKED && !active.contains_key(&ep) {
            // Endpoints come and go: forget those nothing holds.
            active.retain(|_, c| Arc::strong_count(c) > 1);
        }
        active.entry(ep).or_default().clone()
    }

    /// Picks an endpoint (none if `eps` is empty).
    pub fn pick(&self, eps: &[SocketAddr]) -> Option<(SocketAddr, Active)> {
        let now = Instant::now();
        let healthy: Vec<SocketAddr> = {
            let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            failed.retain(|_, at| now.duration_since(*at) < FAILURE_COOLDOWN);
            eps.iter()
                .copied()
                .filter(|e| !failed.contains_key(e))
                .collect()
        };
        let pool = if healthy.is_empty() {
            eps.to_vec()
        } else {
            healthy
        };
        if pool.is_empty() {
            return None;
        }
        let ep = match self.policy {
            LbPolicy::RoundRobin => pool[self.rr.fetch_add(1, Ordering::Relaxed) % pool.len()],
            LbPolicy::LeastConn => {
                if pool.len() == 1 {
                    pool[0]
                } else {
                    let a = rand::random_range(0..pool.len());
                    let mut b = rand::random_range(0..pool.len() - 1);
                    if b >= a {
                        b += 1;
                    }
                    let (ca, cb) = (
                        self.counter(pool[a]).load(Ordering::Acquire),
                        self.counter(pool[b]).load(Ordering::Acquire),
                    );
                    if cb < ca {
                        pool[b]
                    } else {
                        pool[a]
                    }
                }
            }
        };
        let c = self.counter(ep);
        c.fetch_add(1, Ordering::AcqRel);
        Some((ep, Active(c)))
    }

    /// Reports one request's result on `ep`, one of `eps` (its Service's endpoints):
    /// [`CONSECUTIVE_FAILURES`] failures in a row eject it, within
    /// [`MAX_EJECTED_PERCENT`] of `eps`.
    pub fn record_result(&self, ep: SocketAddr, ok: bool, eps: &[SocketAddr]) {
        let mut streak = self.streak.lock().unwrap_or_else(|p| p.into_inner());
        if ok {
            streak.remove(&ep);
            return;
        }
        if streak.len() >= MAX_TRACKED && !streak.contains_key(&ep) {
            // Bounded: endpoints that vanished are forgotten with their streaks.
            streak.clear();
        }
        let n = streak.entry(ep).or_insert(0);
        *n += 1;
        if *n < CONSECUTIVE_FAILURES {
            return;
        }
        streak.remove(&ep);
        drop(streak);
        let now = Instant::now();
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.retain(|_, at| now.duration_since(*at) < FAILURE_COOLDOWN);
        let ejected = eps.iter().filter(|e| failed.contains_key(e)).count();
        if (ejected + 1) * 100 <= eps.len() * MAX_EJECTED_PERCENT {
            tracing::info!(endpoint = %ep, failures = CONSECUTIVE_FAILURES, "endpoint ejected");
            failed.insert(ep, now);
        }
    }

    /// Ejects `ep` at once (tests).
    #[cfg(test)]
    pub fn record_failure(&self, ep: SocketAddr) {
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ep, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eps() -> Vec<SocketAddr> {
        (1..=3)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect()
    }

    #[test]
    fn round_robin_is_exact() {
        let b = Balancer::new(LbPolicy::RoundRobin);
        let mut n: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..3000 {
            *n.entry(b.pick(&eps()).unwrap().0).or_default() += 1;
        }
        assert!(n.values().all(|c| *c == 1000), "{n:?}");
    }

    #[test]
    fn least_conn_prefers_idle_endpoints() {
        let b = Balancer::new(LbPolicy::LeastConn);
        let e = eps();
        // Hold many connections on e[0]: new picks avoid it whenever it is sampled
        // against another endpoint.
        let held: Vec<Active> = (0..50)
            .map(|_| {
                let c = b.counter(e[0]);
                c.fetch_add(1, Ordering::AcqRel);
                Active(c)
            })
            .collect();
        let mut n: HashMap<SocketAddr, usize> = HashMap::new();
        for _ in 0..300 {
            let (ep, _g) = b.pick(&e).unwrap();
            *n.entry(ep).or_default() += 1;
        }
        assert_eq!(n.get(&e[0]), None, "{n:?}");
        drop(held);
    }

    #[test]
    fn consecutive_failures_eject_within_the_cap() {
        let b = Balancer::new(LbPolicy::RoundRobin);
        let e: Vec<SocketAddr> = (1..=4)
            .map(|i| SocketAddr::from(([10, 0, 0, i], 80)))
            .collect();
        // Four failures and a success: no ejection.
        for _ in 0..CONSECUTIVE_FAILURES - 1 {
            b.record_result(e[0], false, &e);
        }
        b.record_result(e[0], true, &e);
        b.record_result(e[0], false, &e);
        assert!((0..40).any(|_| b.pick(&e).unwrap().0 == e[0]));
        // Five in a row: ejected.
        for _ in 0..CONSECUTIVE_FAILURES {
            b.record_result(e[1], false, &e);
        }
        assert!((0..40).all(|_| b.pick(&e).unwrap().0 != e[1]));
        // A second one may go (2 of 4 = 50%), a third may not.
        for ep in [e[2], e[3]] {
            for _ in 0..CONSECUTIVE_FAILURES {
                b.record_result(ep, false, &e);
            }
        }
        let picked: std::collections::HashSet<SocketAddr> =
            (0..40).map(|_| b.pick(&e).unwrap().0).collect();
        assert_eq!(picked, [e[0], e[3]].into_iter().collect());
    }

    #[test]
    fn failed_endpoints_are_skipped_unless_all_failed() {
        let b = Balancer::new(LbPolicy::RoundRobin);
        let e = eps();
        b.record_failure(e[1]);
        for _ in 0..30 {
            assert_ne!(b.pick(&e).unwrap().0, e[1]);
        }
        b.record_failure(e[0]);
        b.record_failure(e[2]);
        assert!(b.pick(&e).is_some(), "all failed: still try one");
    }
}
