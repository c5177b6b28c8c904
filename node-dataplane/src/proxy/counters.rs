//! The connection counters `/config_dump` shows: the node proxy's, and each
//! enrolled pod's listeners'. Only [`super::record::ConnRecord`] (and the
//! HBONE server, for sessions refused or closed before or between streams, and the
//! L7 path, for what it refuses or closes itself) writes them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

/// The node proxy's connection counters (`/config_dump` `proxy`).
#[derive(Default, Debug)]
pub struct NodeCounters {
    /// Connections the proxy holds now (a draining agent waits for 0).
    pub open: AtomicU64,
    /// Connections refused because the proxy held its maximum already.
    pub over_capacity: AtomicU64,
    pub hbone_out: AtomicU64,
    pub hbone_in: AtomicU64,
    pub hbone_in_denied: AtomicU64,
    /// HBONE connections refused before any stream (TLS, identity, HTTP/2).
    pub hbone_refused: AtomicU64,
    /// HBONE connections refused at once because their source IP held its maximum
    /// of connections in their handshake (`--max-handshakes-per-source`).
    pub hbone_refused_source_handshakes: AtomicU64,
    /// HBONE connections closed because their TLS and HTTP/2 handshake did not
    /// complete in time (`--hbone-handshake-timeout`); also in `hbone_refused`.
    pub hbone_handshake_timeouts: AtomicU64,
    /// HBONE sessions closed after a time without streams
    /// (`--hbone-server-idle-timeout`).
    pub hbone_idle_closed: AtomicU64,
    pub plaintext_out: AtomicU64,
    pub plaintext_in_denied: AtomicU64,
    pub closed_by_policy_change: AtomicU64,
    /// Not-HTTP connections refused on ports with L7 rules or plugins.
    pub l7_opaque_denied: AtomicU64,
    /// Connections parsed as HTTP.
    pub l7_connections: AtomicU64,
    /// HTTP connections closed while waiting for a request (before the first or
    /// between two) for longer than `--http-idle-timeout`.
    pub l7_idle_closed: AtomicU64,
    /// Requests refused with 400 because their host is ambiguous (several `Host`
    /// fields, a target or `:authority` that `Host` contradicts, a `Host` that is
    /// not visible ASCII).
    pub l7_ambiguous_host: AtomicU64,
}

impl NodeCounters {
    pub(crate) fn count(c: &AtomicU64) {
        c.fetch_add(1, Relaxed);
    }
}

/// One pod's outbound listener (`/config_dump` `enrolled_pods[].outbound`).
#[derive(Default, Debug)]
pub struct OutboundStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub tunneled: AtomicU64,
    pub failed: AtomicU64,
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// Last original destination seen (for tests and debugging).
    pub last_orig_dst: Mutex<Option<SocketAddr>>,
}

/// One pod's plaintext inbound listener (`enrolled_pods[].inbound_plaintext`).
#[derive(Default, Debug)]
pub struct InboundStats {
    pub accepted: AtomicU64,
    pub forwarded: AtomicU64,
    pub failed: AtomicU64,
    pub last_dst: Mutex<Option<SocketAddr>>,
}

/// One pod's listeners' counters.
#[derive(Default, Debug, Clone)]
pub struct PodStats {
    pub outbound: Arc<OutboundStats>,
    pub inbound: Arc<InboundStats>,
}
