//! Idle timeouts without a timer per connection: HBONE sessions and connections
//! parsed at L7 publish their [`Activity`] (two relaxed atomics per stream or
//! request), and the proxy's periodic sweep ([`IdleWatch::sweep`], run by the
//! task that already reaps the HBONE pool) cancels those that have had nothing in
//! progress for their timeout. So neither a request nor a frame pays for a timer,
//! and the runtime holds no timer per connection.
//!
//! A connection is closed between its timeout and its timeout plus two sweep
//! periods after its last work ended (or after it was watched, if it never had
//! any). Work in progress (an open HBONE stream, however quiet its tunnel; an HTTP
//! exchange, however long) is never idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// What one connection has in progress, as its own task tells it.
#[derive(Debug, Default)]
pub struct Activity {
    /// Work in progress: open streams, an exchange, or a hold for good.
    busy: AtomicUsize,
    /// Work ended so far.
    ended: AtomicU64,
    /// Set by the sweep before it cancels the connection for being idle.
    closed_idle: AtomicBool,
}

impl Activity {
    /// Work begins (a stream opens, a request head arrived).
    pub fn begin(&self) {
        self.busy.fetch_add(1, Relaxed);
    }

    /// Work that began ends.
    pub fn end(&self) {
        self.ended.fetch_add(1, Relaxed);
        self.busy.fetch_sub(1, Relaxed);
    }

    /// The connection is never idle from now on (it carries opaque bytes, or a
    /// protocol whose idleness is not tracked).
    pub fn hold(&self) {
        self.begin();
    }

    /// Work in progress now.
    pub fn busy(&self) -> usize {
        self.busy.load(Relaxed)
    }

    /// Whether the sweep closed the connection for being idle.
    pub fn closed_idle(&self) -> bool {
        self.closed_idle.load(Relaxed)
    }
}

/// What a watched connection is, for counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    HboneSession,
    Http,
}

struct Entry {
    activity: Arc<Activity>,
    cancel: CancellationToken,
    timeout: Duration,
    kind: Kind,
    /// `ended` at the last sweep.
    seen: u64,
    /// Since when the sweeps have found it idle (`None`: busy at the last one).
    idle_since: Option<Instant>,
}

/// The watched connections of one node proxy.
#[derive(Default)]
pub struct IdleWatch {
    next: AtomicU64,
    entries: Mutex<HashMap<u64, Entry>>,
}

/// A connection's place in the watch; dropped when the connection ends.
pub struct Watched {
    id: u64,
    watch: Arc<IdleWatch>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        self.watch
            .entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl IdleWatch {
    /// Watches a connection: once it has been idle for `timeout`, `cancel` is
    /// cancelled (after [`Activity::closed_idle`] is set).
    pub fn watch(
        self: &Arc<Self>,
        activity: Arc<Activity>,
        cancel: CancellationToken,
        timeout: Duration,
        kind: Kind,
    ) -> Watched {
        let id = self.next.fetch_add(1, Relaxed);
        let seen = activity.ended.load(Relaxed);
        let entry = Entry {
            activity,
            cancel,
            timeout,
            kind,
            seen,
            idle_since: Some(Instant::now()),
        };
        self.entries
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, entry);
        Watched {
            id,
            watch: self.clone(),
        }
    }

    /// Cancels the connections idle for their timeout at `now`; returns how many
    /// of each kind (HBONE sessions, HTTP connections).
    pub fn sweep(&self, now: Instant) -> (usize, usize) {
        let mut closed = (0, 0);
        let mut entries = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        for e in entries.values_mut() {
            let ended = e.activity.ended.load(Relaxed);
            if e.activity.busy.load(Relaxed) > 0 {
                e.idle_since = None;
            } else if ended != e.seen || e.idle_since.is_none() {
                // Its last work ended since the last sweep: idle since then at most.
                e.idle_since = Some(now);
            } else if e
                .idle_since
                .is_some_and(|t| now.saturating_duration_since(t) >= e.timeout)
                && !e.cancel.is_cancelled()
            {
                e.activity.closed_idle.store(true, Relaxed);
                e.cancel.cancel();
                match e.kind {
                    Kind::HboneSession => closed.0 += 1,
                    Kind::Http => closed.1 += 1,
                }
            }
            e.seen = ended;
        }
        closed
    }

    /// Connections watched.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.entries.lock().unwrap_or_else(|p| p.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_idle_for_their_timeout_are_cancelled() {
        let w = Arc::new(IdleWatch::default());
        let t = Duration::from_secs(10);
        let conn = || (Arc::new(Activity::default()), CancellationToken::new());
        // Never did anything.
        let (quiet, quiet_c) = conn();
        let _q = w.watch(quiet.clone(), quiet_c.clone(), t, Kind::Http);
        // Busy all along (an open stream, however quiet its tunnel).
        let (busy, busy_c) = conn();
        let _b = w.watch(busy.clone(), busy_c.clone(), t, Kind::HboneSession);
        busy.begin();
        // Work that ends between the sweeps at 5 s and 10 s.
        let (late, late_c) = conn();
        let _l = w.watch(late.clone(), late_c.clone(), t, Kind::Http);
        late.begin();
        // (After the watches began.)
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(w.sweep(at(5)), (0, 0));
        late.end();
        assert_eq!(w.sweep(at(10)), (0, 1), "idle since it was watched");
        assert!(quiet_c.is_cancelled() && quiet.closed_idle());
        assert_eq!(w.sweep(at(15)), (0, 0));
        assert_eq!(w.sweep(at(19)), (0, 0), "idle since 10 s at most");
        assert_eq!(w.sweep(at(20)), (0, 1));
        assert!(late_c.is_cancelled());
        assert_eq!(w.sweep(at(100)), (0, 0), "cancelled once");
        assert!(!busy_c.is_cancelled() && !busy.closed_idle());
        // Its stream ends: idle from then.
        busy.end();
        assert_eq!(w.sweep(at(101)), (0, 0));
        assert_eq!(w.sweep(at(111)), (1, 0));
        drop((_q, _b, _l));
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn held_connections_are_never_idle() {
        let w = Arc::new(IdleWatch::default());
        let (a, c) = (Arc::new(Activity::default()), CancellationToken::new());
        let _w = w.watch(a.clone(), c.clone(), Duration::from_secs(1), Kind::Http);
        a.hold();
        let now = Instant::now();
        for s in 0..10 {
            assert_eq!(w.sweep(now + Duration::from_secs(s * 10)), (0, 0));
        }
        assert!(!c.is_cancelled());
    }
}
