//! Connected nodes and where each stands (for status, metrics and tests).

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::SystemTime;

#[derive(Debug, Clone, Serialize)]
pub struct NodeSession {
    pub node: String,
    pub connected_at_unix: u64,
    pub streams: u32,
    pub last_sent_sequence: u64,
    pub last_acked_sequence: u64,
    pub last_nack: Option<String>,
    pub resources: usize,
    /// What the node last reported holding (trust bundle, certificates).
    pub status: Option<ReportedStatus>,
}

/// A node's `NodeStatus` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReportedStatus {
    pub trust_bundle_sha256: String,
    /// The signer `stale_certs` was counted against (SHA-256 of its PEM).
    pub signer_sha256: String,
    pub certs: u32,
    pub stale_certs: u32,
}

#[derive(Default)]
pub struct Sessions {
    inner: Mutex<BTreeMap<String, NodeSession>>,
}

impl Sessions {
    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, NodeSession>) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn connected(&self, node: &str) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        self.with(|m| {
            let s = m.entry(node.to_string()).or_insert_with(|| NodeSession {
                node: node.to_string(),
                connected_at_unix: now,
                streams: 0,
                last_sent_sequence: 0,
                last_acked_sequence: 0,
                last_nack: None,
                resources: 0,
                status: None,
            });
            s.streams += 1;
            s.connected_at_unix = now;
        });
    }

    pub fn disconnected(&self, node: &str) {
        self.with(|m| {
            if let Some(s) = m.get_mut(node) {
                s.streams = s.streams.saturating_sub(1);
                if s.streams == 0 {
                    m.remove(node);
                }
            }
        });
    }

    pub fn sent(&self, node: &str, seq: u64, resources: usize) {
        self.with(|m| {
            if let Some(s) = m.get_mut(node) {
                s.last_sent_sequence = seq;
                s.resources = resources;
            }
        });
    }

    pub fn acked(&self, node: &str, seq: u64) {
        self.with(|m| {
            if let Some(s) = m.get_mut(node) {
                s.last_acked_sequence = s.last_acked_sequence.max(seq);
            }
        });
    }

    pub fn nacked(&self, node: &str, reason: &str) {
        self.with(|m| {
            if let Some(s) = m.get_mut(node) {
                s.last_nack = Some(reason.to_string());
            }
        });
    }

    pub fn reported(&self, node: &str, status: ReportedStatus) {
        self.with(|m| {
            if let Some(s) = m.get_mut(node) {
                s.status = Some(status);
            }
        });
    }

    pub fn list(&self) -> Vec<NodeSession> {
        self.with(|m| m.values().cloned().collect())
    }

    pub fn count(&self) -> usize {
        self.with(|m| m.len())
    }
}
