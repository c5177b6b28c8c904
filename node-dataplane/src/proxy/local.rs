//! The enrolled pods on this node, as the proxy knows them: each pod's workload
//! and network namespace, by pod IP. The pod manager adds and removes them; the
//! inbound listeners look up the destination of a connection here.

use crate::netns::PodNetns;
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use weft_proto::pb;

/// A local enrolled pod, as the proxy needs it.
#[derive(Clone)]
pub struct LocalPod {
    pub workload: LiveWorkload,
    pub netns: Arc<PodNetns>,
}

impl LocalPod {
    /// The pod's workload as the control plane describes it now.
    pub fn workload(&self) -> Arc<pb::Workload> {
        self.workload.get()
    }
}

/// A local pod's workload as the control plane last described it (its labels
/// select the policies and plugins that apply to it). The pod manager replaces it
/// when it changes; connections read the current one, so a relabelled pod is
/// enforced by the policies of its new labels.
#[derive(Clone)]
pub struct LiveWorkload(Arc<RwLock<Arc<pb::Workload>>>);

impl LiveWorkload {
    pub fn new(w: Arc<pb::Workload>) -> Self {
        Self(Arc::new(RwLock::new(w)))
    }

    pub fn get(&self) -> Arc<pb::Workload> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the workload; returns whether it differed.
    pub fn set(&self, w: &Arc<pb::Workload>) -> bool {
        let mut cur = self.0.write().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&cur, w) || **cur == **w {
            return false;
        }
        *cur = w.clone();
        true
    }
}

/// The local enrolled pods by IP.
#[derive(Default)]
pub struct LocalPods(RwLock<HashMap<IpAddr, LocalPod>>);

impl LocalPods {
    pub fn get(&self, ip: IpAddr) -> Option<LocalPod> {
        self.0
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Adds (`Some`) or removes (`None`) the pod with this IP.
    pub fn set(&self, ip: IpAddr, pod: Option<LocalPod>) {
        let mut m = self.0.write().unwrap_or_else(|p| p.into_inner());
        match pod {
            Some(p) => m.insert(ip, p),
            None => m.remove(&ip),
        };
    }
}
