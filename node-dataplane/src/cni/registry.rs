//! The pod sandboxes the CNI plugin reported on this node, persisted (state dir,
//! `pods.json`) so a restarted agent finds its pods' network namespaces again.

use super::protocol::Sandbox;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;
use tokio::sync::watch;

pub struct PodRegistry {
    path: Option<PathBuf>,
    pods: Mutex<BTreeMap<String, Sandbox>>,
    /// Pods (`namespace/name`) whose sandbox the CNI plugin deleted: being torn
    /// down, so never to be found again by discovery while they still exist.
    deleted: Mutex<std::collections::HashSet<(String, String)>>,
    changed: watch::Sender<u64>,
}

impl PodRegistry {
    /// Loads the registry from `path` (if it exists).
    pub fn load(path: Option<PathBuf>) -> Self {
        let pods = path
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .and_then(|t| serde_json::from_str::<BTreeMap<String, Sandbox>>(&t).ok())
            .unwrap_or_default();
        let (changed, _) = watch::channel(0);
        Self {
            path,
            pods: Mutex::new(pods),
            deleted: Mutex::default(),
            changed,
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut BTreeMap<String, Sandbox>) -> R) -> R {
        f(&mut self.pods.lock().unwrap_or_else(|p| p.into_inner()))
    }

    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn add(&self, s: Sandbox) {
        // A new sandbox of a pod whose earlier one was deleted (a retried ADD): the
        // pod is alive again.
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(s.pod_namespace.clone(), s.pod_name.clone()));
        self.with(|m| m.insert(s.container_id.clone(), s));
        self.persist();
    }

    pub fn remove(&self, container_id: &str) -> Option<Sandbox> {
        let r = self.with(|m| m.remove(container_id));
        self.persist();
        r
    }

    /// The CNI plugin deleted this sandbox: removes it, and remembers its pod as
    /// being torn down.
    pub fn deleted(&self, container_id: &str) -> Option<Sandbox> {
        let r = self.with(|m| m.remove(container_id));
        if let Some(s) = &r {
            self.deleted
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert((s.pod_namespace.clone(), s.pod_name.clone()));
        }
        self.persist();
        r
    }

    /// Whether the CNI plugin deleted a sandbox of pod `namespace/name`.
    pub fn was_deleted(&self, namespace: &str, name: &str) -> bool {
        let deleted = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        // Nearly always empty: no allocation for the lookup in the common case.
        !deleted.is_empty() && deleted.contains(&(namespace.to_string(), name.to_string()))
    }

    /// Forgets the deleted pods that `exists(namespace, name)` says are gone.
    pub fn forget_deleted(&self, exists: impl Fn(&str, &str) -> bool) {
        self.deleted
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|(ns, name)| exists(ns, name));
    }

    pub fn get(&self, container_id: &str) -> Option<Sandbox> {
        self.with(|m| m.get(container_id).cloned())
    }

    pub fn all(&self) -> Vec<Sandbox> {
        self.with(|m| m.values().cloned().collect())
    }

    fn persist(&self) {
        if let Some(p) = &self.path {
            let text = self.with(|m| serde_json::to_string_pretty(m).unwrap_or_default());
            let tmp = p.with_extension("tmp");
            let res = std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, p));
            if let Err(e) = res {
                tracing::warn!(path = %p.display(), error = %e, "cannot persist the pod registry");
            }
        }
        self.changed.send_modify(|v| *v += 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persists_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("pods.json");
        let r = PodRegistry::load(Some(p.clone()));
        let s = Sandbox {
            container_id: "c1".into(),
            netns: "/var/run/netns/x".into(),
            ifname: "eth0".into(),
            pod_namespace: "a".into(),
            pod_name: "b".into(),
            pod_uid: "u".into(),
            ips: vec!["10.0.0.1".into()],
        };
        r.add(s.clone());
        let again = PodRegistry::load(Some(p.clone()));
        assert_eq!(again.get("c1"), Some(s));
        again.remove("c1");
        assert!(PodRegistry::load(Some(p)).all().is_empty());
    }
}
