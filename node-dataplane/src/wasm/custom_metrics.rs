//! Metrics a plugin defines itself through the Proxy-Wasm metrics ABI
//! (`proxy_define_metric`, `proxy_increment_metric`, `proxy_record_metric`,
//! `proxy_get_metric`), shared by all instances of the plugin on the node and
//! exported on the node's Prometheus endpoint with the labels `plugin` and `metric`.
//! Bounded: at most [`MAX_METRICS`] per plugin, names of at most [`MAX_NAME`] bytes
//! of `[A-Za-z0-9_.:-]`; a plugin asking for more gets `BadArgument`.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

pub const MAX_METRICS: usize = 64;
pub const MAX_NAME: usize = 128;

/// Upper bounds of the histogram buckets (the values plugins record are usually
/// milliseconds or bytes), `+Inf` implied.
pub const BUCKETS: &[f64] = &[
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// Why a metrics call was refused (the ABI's `NotFound` and `BadArgument`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricError {
    /// No metric with that id.
    NotFound,
    /// An invalid name or type, too many metrics, or an operation the type lacks.
    BadArgument,
}

use MetricError::{BadArgument as BAD_ARGUMENT, NotFound as NOT_FOUND};

/// The ABI's metric types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn from_abi(t: i32) -> Option<Self> {
        match t {
            0 => Some(Kind::Counter),
            1 => Some(Kind::Gauge),
            2 => Some(Kind::Histogram),
            _ => None,
        }
    }
}

pub struct Metric {
    pub name: String,
    pub kind: Kind,
    /// Counter or gauge value.
    value: AtomicI64,
    /// Histogram: count per bucket (the last one is `+Inf`), sum and count.
    buckets: Vec<AtomicU64>,
    sum: AtomicU64,
    count: AtomicU64,
}

/// A histogram as read: each bucket's upper bound and the values recorded in it
/// alone (not cumulative: the exporter accumulates), sum and count.
#[derive(Debug)]
pub struct HistogramSnapshot {
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Metric {
    pub fn value(&self) -> i64 {
        self.value.load(Relaxed)
    }
    pub fn histogram(&self) -> HistogramSnapshot {
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                (
                    // The exporter writes `le="+Inf"` for `f64::MAX`.
                    BUCKETS.get(i).copied().unwrap_or(f64::MAX),
                    b.load(Relaxed),
                )
            })
            .collect();
        HistogramSnapshot {
            buckets,
            sum: self.sum.load(Relaxed) as f64,
            count: self.count.load(Relaxed),
        }
    }
}

/// One plugin's metrics. Ids are positions in the list, plus one (0 is never an id).
#[derive(Default)]
pub struct CustomMetrics {
    metrics: Mutex<Vec<Arc<Metric>>>,
}

impl std::fmt::Debug for CustomMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CustomMetrics")
            .field("defined", &self.all().len())
            .finish()
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

impl CustomMetrics {
    fn list(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Metric>>> {
        self.metrics.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `proxy_define_metric`: the id of `name` (the same id when it is defined again
    /// with the same type, so every instance shares it).
    pub fn define(&self, abi_type: i32, name: &str) -> Result<u32, MetricError> {
        let kind = Kind::from_abi(abi_type).ok_or(BAD_ARGUMENT)?;
        if !valid_name(name) {
            return Err(BAD_ARGUMENT);
        }
        let mut list = self.list();
        if let Some(i) = list.iter().position(|m| m.name == name) {
            return if list[i].kind == kind {
                Ok(i as u32 + 1)
            } else {
                Err(BAD_ARGUMENT)
            };
        }
        if list.len() >= MAX_METRICS {
            return Err(BAD_ARGUMENT);
        }
        let buckets = match kind {
            Kind::Histogram => (0..=BUCKETS.len()).map(|_| AtomicU64::new(0)).collect(),
            _ => Vec::new(),
        };
        list.push(Arc::new(Metric {
            name: name.to_string(),
            kind,
            value: AtomicI64::new(0),
            buckets,
            sum: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }));
        Ok(list.len() as u32)
    }

    fn get(&self, id: u32) -> Option<Arc<Metric>> {
        let i = (id as usize).checked_sub(1)?;
        self.list().get(i).cloned()
    }

    /// `proxy_increment_metric`: counters only go up; gauges move either way.
    pub fn increment(&self, id: u32, offset: i64) -> Result<(), MetricError> {
        let m = self.get(id).ok_or(NOT_FOUND)?;
        match m.kind {
            Kind::Counter if offset < 0 => Err(BAD_ARGUMENT),
            Kind::Counter | Kind::Gauge => {
                let _ = m
                    .value
                    .fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(offset)));
                Ok(())
            }
            Kind::Histogram => Err(BAD_ARGUMENT),
        }
    }

    /// `proxy_record_metric`: a counter or gauge takes the value, a histogram
    /// records it.
    pub fn record(&self, id: u32, value: u64) -> Result<(), MetricError> {
        let m = self.get(id).ok_or(NOT_FOUND)?;
        match m.kind {
            Kind::Counter | Kind::Gauge => {
                m.value
                    .store(i64::try_from(value).unwrap_or(i64::MAX), Relaxed);
            }
            Kind::Histogram => {
                let i = BUCKETS
                    .iter()
                    .position(|b| value as f64 <= *b)
                    .unwrap_or(BUCKETS.len());
                m.buckets[i].fetch_add(1, Relaxed);
                let _ = m
                    .sum
                    .fetch_update(Relaxed, Relaxed, |s| Some(s.saturating_add(value)));
                m.count.fetch_add(1, Relaxed);
            }
        }
        Ok(())
    }

    /// `proxy_get_metric`: a counter's or gauge's value (a negative gauge reads as
    /// its two's complement, as the ABI returns an unsigned value).
    pub fn value(&self, id: u32) -> Result<u64, MetricError> {
        let m = self.get(id).ok_or(NOT_FOUND)?;
        match m.kind {
            Kind::Counter | Kind::Gauge => Ok(m.value() as u64),
            Kind::Histogram => Err(BAD_ARGUMENT),
        }
    }

    pub fn all(&self) -> Vec<Arc<Metric>> {
        self.list().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_gauges_and_histograms_follow_the_abi() {
        let m = CustomMetrics::default();
        let c = m.define(0, "requests_total").unwrap();
        assert_eq!(
            m.define(0, "requests_total"),
            Ok(c),
            "defined again: same id"
        );
        assert_eq!(
            m.define(1, "requests_total"),
            Err(BAD_ARGUMENT),
            "another type"
        );
        assert_eq!(m.increment(c, 3), Ok(()));
        assert_eq!(
            m.increment(c, -1),
            Err(BAD_ARGUMENT),
            "a counter never goes down"
        );
        assert_eq!(m.value(c), Ok(3));
        let g = m.define(1, "in_flight").unwrap();
        assert_eq!(m.increment(g, 5), Ok(()));
        assert_eq!(m.increment(g, -7), Ok(()));
        assert_eq!(m.value(g), Ok((-2i64) as u64));
        assert_eq!(m.record(g, 9), Ok(()));
        assert_eq!(m.value(g), Ok(9));
        let h = m.define(2, "body_bytes").unwrap();
        for v in [0, 1, 7, 100_000_000] {
            assert_eq!(m.record(h, v), Ok(()));
        }
        assert_eq!(m.value(h), Err(BAD_ARGUMENT));
        assert_eq!(m.increment(h, 1), Err(BAD_ARGUMENT));
        let snap = m.all()[2].histogram();
        assert_eq!((snap.count, snap.sum), (4, 100_000_008.0));
        // 0 in (.., 0.5], 1 in (0.5, 1], 7 in (5, 10], 1e8 in (3.6e6, +Inf].
        assert_eq!(snap.buckets[0], (0.5, 1));
        assert_eq!(snap.buckets[1], (1.0, 1));
        assert_eq!(snap.buckets[2], (5.0, 0));
        assert_eq!(snap.buckets[3], (10.0, 1));
        assert_eq!(snap.buckets.last().map(|b| b.1), Some(1));
        assert_eq!(snap.buckets.iter().map(|b| b.1).sum::<u64>(), 4);
        assert_eq!(snap.buckets.last().unwrap().0, f64::MAX);
        assert_eq!(m.increment(99, 1), Err(NOT_FOUND));
        assert_eq!(m.record(0, 1), Err(NOT_FOUND));
        assert_eq!(m.value(99), Err(NOT_FOUND));
    }

    #[test]
    fn names_and_counts_are_bounded() {
        let m = CustomMetrics::default();
        assert_eq!(m.define(0, ""), Err(BAD_ARGUMENT));
        assert_eq!(m.define(0, "with space"), Err(BAD_ARGUMENT));
        assert_eq!(m.define(0, "quote\""), Err(BAD_ARGUMENT));
        assert_eq!(m.define(0, &"x".repeat(MAX_NAME + 1)), Err(BAD_ARGUMENT));
        assert_eq!(m.define(3, "unknown_type"), Err(BAD_ARGUMENT));
        assert!(m.define(0, &"x".repeat(MAX_NAME)).is_ok());
        for i in 1..MAX_METRICS {
            m.define(1, &format!("g{i}")).unwrap();
        }
        assert_eq!(m.define(1, "one_too_many"), Err(BAD_ARGUMENT));
        assert_eq!(m.all().len(), MAX_METRICS);
    }
}
