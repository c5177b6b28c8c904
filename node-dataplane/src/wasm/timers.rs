//! Root-context timers (`proxy_set_tick_period_milliseconds`, `proxy_on_tick`):
//! each instance of a plugin has its own period, as each Envoy worker's VM has.
//!
//! The table is kept apart from the instances, so the plugin's driver task (see
//! [`super::plugin::Plugin::drive`]) learns when the next tick is due without
//! taking an instance's lock; the host function writes it, and wakes the driver.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The shortest period: a plugin asking for less ticks every 10 ms.
pub const MIN_TICK: Duration = Duration::from_millis(10);

#[derive(Debug, Clone, Copy)]
struct Timer {
    period: Duration,
    next: Instant,
}

/// The tick periods of a plugin's instances, by instance slot.
pub struct Timers {
    slots: Mutex<Vec<Option<Timer>>>,
    /// Wakes the plugin's driver: a period changed, a queue received items, or
    /// the plugin is gone.
    pub wake: tokio::sync::Notify,
}

impl Timers {
    pub fn new(instances: usize) -> Self {
        Self {
            slots: Mutex::new(vec![None; instances.max(1)]),
            wake: tokio::sync::Notify::new(),
        }
    }

    /// Instance `slot` asked for a tick every `ms` milliseconds (0 stops it). The
    /// first tick comes one period from now.
    pub fn set(&self, slot: usize, ms: u32) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let Some(t) = s.get_mut(slot) else { return };
        *t = (ms > 0).then(|| {
            let period = Duration::from_millis(u64::from(ms)).max(MIN_TICK);
            Timer {
                period,
                next: Instant::now() + period,
            }
        });
        drop(s);
        self.wake.notify_one();
    }

    /// Instance `slot` is gone: a new one starts without a timer.
    pub fn clear(&self, slot: usize) {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = s.get_mut(slot) {
            *t = None;
        }
    }

    /// The period of instance `slot`, if it has a timer.
    #[cfg(test)]
    pub fn period(&self, slot: usize) -> Option<Duration> {
        let s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.get(slot).copied().flatten().map(|t| t.period)
    }

    /// When the next tick of any instance is due.
    pub fn next_due(&self) -> Option<Instant> {
        let s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        s.iter().flatten().map(|t| t.next).min()
    }

    /// The instances whose tick is due at `now`; their next tick is one period
    /// later (ticks missed while an instance was busy are not made up).
    pub fn take_due(&self, now: Instant) -> Vec<usize> {
        let mut s = self.slots.lock().unwrap_or_else(|p| p.into_inner());
        let mut due = Vec::new();
        for (i, t) in s.iter_mut().enumerate() {
            if let Some(t) = t {
                if t.next <= now {
                    due.push(i);
                    t.next = (t.next + t.period).max(now + t.period / 2);
                }
            }
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_per_instance_with_a_floor() {
        let t = Timers::new(3);
        assert_eq!(t.next_due(), None);
        let before = Instant::now();
        t.set(0, 1);
        t.set(2, 1000);
        t.set(7, 5); // no such instance: ignored
        assert_eq!(t.period(0), Some(MIN_TICK));
        assert_eq!(t.period(1), None);
        assert_eq!(t.period(2), Some(Duration::from_secs(1)));
        let next = t.next_due().unwrap();
        assert!(next >= before + MIN_TICK);
        assert!(t.take_due(before).is_empty());
        assert_eq!(t.take_due(next), vec![0]);
        assert_eq!(t.take_due(next + Duration::from_secs(2)), vec![0, 2]);
        // Ticks missed are not made up: the next is at least half a period away.
        let late = next + Duration::from_secs(10);
        assert_eq!(t.take_due(late), vec![0, 2]);
        assert_eq!(t.take_due(late), Vec::<usize>::new());
        t.set(0, 0);
        t.clear(2);
        assert_eq!(t.next_due(), None);
    }
}
