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
    pub workload: Arc<pb::Workload>,
    pub netns: Arc<PodNetns>,
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
