//! The node's certificates, by SPIFFE ID. Private keys never leave this type except
//! to build TLS configs; `Serialize` leaves them out.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

#[derive(Clone, Serialize)]
pub struct WorkloadCert {
    pub spiffe_id: String,
    pub serial: String,
    #[serde(serialize_with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(serialize_with = "rfc3339")]
    pub not_after: SystemTime,
    /// Leaf first, then intermediates.
    pub chain_pem: String,
    pub trust_bundle_pem: String,
    #[serde(skip)]
    pub key_pem: zeroizing::Secret,
}

impl std::fmt::Debug for WorkloadCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadCert")
            .field("spiffe_id", &self.spiffe_id)
            .field("serial", &self.serial)
            .finish_non_exhaustive()
    }
}

fn rfc3339<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&humantime::format_rfc3339_seconds(*t).to_string())
}

/// A private key that is not printed by `Debug`.
pub mod zeroizing {
    #[derive(Clone, Default)]
    pub struct Secret(pub String);
    impl std::fmt::Debug for Secret {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("<redacted>")
        }
    }
}

pub struct CertStore {
    inner: RwLock<BTreeMap<String, Arc<WorkloadCert>>>,
    /// Bumped on every change (the Workload API pushes rotations from it).
    changed: tokio::sync::watch::Sender<u64>,
}

impl Default for CertStore {
    fn default() -> Self {
        Self {
            inner: Default::default(),
            changed: tokio::sync::watch::channel(0).0,
        }
    }
}

impl CertStore {
    /// Changes whenever a certificate is stored or removed.
    pub fn watch(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn get(&self, id: &str) -> Option<Arc<WorkloadCert>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }
    pub fn put(&self, c: WorkloadCert) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(c.spiffe_id.clone(), Arc::new(c));
        self.bump();
    }
    pub fn remove(&self, id: &str) {
        self.inner
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .remove(id);
        self.bump();
    }
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }
}
