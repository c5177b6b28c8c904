//! The HBONE server's connections still in their handshake (TLS, then the HTTP/2
//! preface), counted per source IP. Before its handshake is done a connection has
//! proven nothing, not even a certificate, yet it holds a descriptor of the agent:
//! one source may hold at most a set number of them at once, so that a client that
//! opens sockets and sends nothing (or part of a ClientHello) takes the agent's
//! descriptors from no one else. Each handshake is also bounded in time
//! ([`super::inbound`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};

/// Connections in their handshake, per source IP.
#[derive(Debug)]
pub struct Handshakes {
    max_per_source: u32,
    by_source: Mutex<HashMap<IpAddr, u32>>,
}

impl Handshakes {
    pub fn new(max_per_source: u32) -> Arc<Self> {
        Arc::new(Self {
            max_per_source,
            by_source: Mutex::default(),
        })
    }

    /// A handshake from `source` begins: `None` if `source` holds its maximum
    /// already (the connection is to be refused).
    pub fn begin(self: &Arc<Self>, source: IpAddr) -> Option<Handshaking> {
        let mut m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            if *n == 0 {
                m.remove(&source);
            }
            return None;
        }
        *n += 1;
        Some(Handshaking {
            set: self.clone(),
            source,
        })
    }

    /// Handshakes in progress from `source`.
    #[cfg(test)]
    pub fn of(&self, source: IpAddr) -> u32 {
        let m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&source).copied().unwrap_or(0)
    }

    /// Sources with a handshake in progress.
    #[cfg(test)]
    pub fn sources(&self) -> usize {
        self.by_source
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }
}

/// One handshake in progress; dropped when it is done (or failed).
#[derive(Debug)]
pub struct Handshaking {
    set: Arc<Handshakes>,
    source: IpAddr,
}

impl Drop for Handshaking {
    fn drop(&mut self) {
        let mut m = self.set.by_source.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.source) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                m.remove(&self.source);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_source_holds_at_most_its_maximum_and_gets_it_back() {
        let h = Handshakes::new(2);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let a1 = h.begin(a).unwrap();
        let a2 = h.begin(a).unwrap();
        assert!(h.begin(a).is_none(), "a third from the same source");
        // Another source is not affected.
        let b1 = h.begin(b).unwrap();
        assert_eq!((h.of(a), h.of(b)), (2, 1));
        drop(a1);
        let a3 = h.begin(a).unwrap();
        drop((a2, a3, b1));
        // Nothing is kept for sources without a handshake.
        assert_eq!(h.sources(), 0);
    }

    #[test]
    fn a_maximum_of_zero_refuses_every_handshake_and_keeps_nothing() {
        let h = Handshakes::new(0);
        assert!(h.begin("10.0.0.1".parse().unwrap()).is_none());
        assert_eq!(h.sources(), 0);
    }
}
