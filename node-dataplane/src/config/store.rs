//! One owner of the node's configuration. Updates are validated resource by resource:
//! a bad resource is rejected (NACK) and its previous version kept; the rest apply.
//!
//! Snapshots are persistent maps (`imbl`): taking one is O(1) and an update copies
//! only the paths it touches, so readers (the proxy, the admin endpoint) never block
//! the writer and a one-resource update does not copy the whole view.

use imbl::OrdMap;
use serde::Serialize;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use tokio::sync::watch;
use weft_proto::pb::{self, resource::Kind};

#[derive(Debug, Default, Clone, Serialize)]
pub struct StoreSnapshot {
    pub workloads: OrdMap<String, Arc<pb::Workload>>,
    pub services: OrdMap<String, Arc<pb::Service>>,
    pub policies: OrdMap<String, Arc<pb::AuthorizationPolicy>>,
    /// PeerAuthentications (which workload ports refuse plaintext).
    pub peer_authns: OrdMap<String, Arc<pb::PeerAuthentication>>,
    /// RequestAuthentications (which JWTs workloads accept).
    pub request_authns: OrdMap<String, Arc<pb::RequestAuthentication>>,
    pub plugins: OrdMap<String, Arc<pb::WasmPlugin>>,
    pub trust_bundles: OrdMap<String, Arc<pb::TrustBundle>>,
    /// Gateway API routes (HTTPRoute, GRPCRoute) attached to Services.
    pub routes: OrdMap<String, Arc<pb::Route>>,
    #[serde(skip)]
    pub versions: OrdMap<String, String>,
    /// Workload key by IP, and Service key by cluster IP: the proxy looks these up
    /// on every connection, with the address it has (no formatting, and every
    /// spelling of an IPv6 address finds the same entry).
    #[serde(skip)]
    pub workload_by_ip: OrdMap<IpAddr, String>,
    #[serde(skip)]
    pub service_by_vip: OrdMap<IpAddr, String>,
    /// Service key -> how many routes name it as a parent: a connection to a
    /// Service without routes never looks at routes.
    #[serde(skip)]
    pub routed_services: OrdMap<String, usize>,
    /// Changes whenever a route is added, changed or removed (route tables compiled
    /// from an older generation are stale).
    #[serde(skip)]
    pub routes_generation: u64,
    /// True once a complete view was received from the control plane.
    pub synced: bool,
    /// Sequence of the last applied update (per stream).
    pub last_sequence: u64,
}

/// Rejected resource key and why.
pub type Rejection = (String, String);

pub struct ConfigStore {
    node: String,
    inner: RwLock<Arc<StoreSnapshot>>,
    changed: watch::Sender<u64>,
}

impl ConfigStore {
    pub fn new(node: impl Into<String>) -> Arc<Self> {
        let (changed, _) = watch::channel(0);
        Arc::new(Self {
            node: node.into(),
            inner: RwLock::new(Arc::new(StoreSnapshot::default())),
            changed,
        })
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The current configuration (cheap: an `Arc`).
    pub fn snapshot(&self) -> Arc<StoreSnapshot> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Notified with a counter after every applied update.
    pub fn watch(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    pub fn known_versions(&self) -> std::collections::BTreeMap<String, String> {
        self.snapshot()
            .versions
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Applies one update; returns the rejected resources.
    pub fn apply(&self, update: &pb::ConfigUpdate) -> Vec<Rejection> {
        let mut rejected = Vec::new();
        let mut next = (*self.snapshot()).clone();
        for r in &update.upserts {
            match validate(r) {
                Ok(()) => insert(&mut next, r),
                Err(why) => rejected.push((r.key.clone(), why)),
            }
        }
        for k in &update.removals {
            remove(&mut next, k);
        }
        if update.initial && !update.partial {
            next.synced = true;
        }
        next.last_sequence = update.sequence;
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        self.changed.send_modify(|v| *v += 1);
        rejected
    }

    /// The trust bundle of this mesh (roots, signer, JWT-SVID keys).
    pub fn trust(&self) -> Option<Arc<pb::TrustBundle>> {
        self.snapshot().trust_bundles.values().next().cloned()
    }

    /// The trust bundle roots (PEM) of this mesh.
    pub fn trust_bundle(&self) -> Option<String> {
        self.snapshot()
            .trust_bundles
            .values()
            .next()
            .map(|b| b.roots_pem.clone())
    }

    /// SPIFFE IDs of the enrolled workloads scheduled on this node.
    pub fn local_identities(&self) -> std::collections::BTreeSet<String> {
        self.snapshot()
            .workloads
            .values()
            .filter(|w| w.enrolled && w.node == self.node && !w.spiffe_id.is_empty())
            .map(|w| w.spiffe_id.clone())
            .collect()
    }
}

impl StoreSnapshot {
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<&Arc<pb::Workload>> {
        self.workloads.get(self.workload_by_ip.get(&ip)?)
    }

    pub fn service_by_vip(&self, ip: IpAddr) -> Option<&Arc<pb::Service>> {
        self.services.get(self.service_by_vip.get(&ip)?)
    }

    /// The Service at a cluster IP with its key.
    pub fn service_entry_by_vip(&self, ip: IpAddr) -> Option<(&String, &Arc<pb::Service>)> {
        let k = self.service_by_vip.get(&ip)?;
        Some((k, self.services.get(k)?))
    }

    /// Does any route name the Service with key `key` as a parent?
    pub fn is_routed(&self, key: &str) -> bool {
        !self.routed_services.is_empty() && self.routed_services.contains_key(key)
    }
}

/// Addresses of a resource's IP list (validated when received; anything that
/// does not parse is not indexed).
fn ips(values: &[String]) -> impl Iterator<Item = IpAddr> + '_ {
    values.iter().filter_map(|v| v.parse().ok())
}

/// Removes `key`'s entries from an index (entries another key took over stay).
fn unindex(index: &mut OrdMap<IpAddr, String>, key: &str, values: &[String]) {
    for ip in ips(values) {
        if index.get(&ip).is_some_and(|k| k == key) {
            index.remove(&ip);
        }
    }
}

fn insert(s: &mut StoreSnapshot, r: &pb::Resource) {
    s.versions.insert(r.key.clone(), r.version.clone());
    let k = r.key.clone();
    match &r.kind {
        Some(Kind::Workload(w)) => {
            if let Some(old) = s.workloads.get(&k).cloned() {
                unindex(&mut s.workload_by_ip, &k, &old.ips);
            }
            for ip in ips(&w.ips) {
                s.workload_by_ip.insert(ip, k.clone());
            }
            s.workloads.insert(k, Arc::new(w.clone()));
        }
        Some(Kind::Service(v)) => {
            if let Some(old) = s.services.get(&k).cloned() {
                unindex(&mut s.service_by_vip, &k, &old.cluster_ips);
            }
            for ip in ips(&v.cluster_ips) {
                s.service_by_vip.insert(ip, k.clone());
            }
            s.services.insert(k, Arc::new(v.clone()));
        }
        Some(Kind::AuthorizationPolicy(p)) => {
            s.policies.insert(k, Arc::new(p.clone()));
        }
        Some(Kind::PeerAuthentication(p)) => {
            s.peer_authns.insert(k, Arc::new(p.clone()));
        }
        Some(Kind::RequestAuthentication(p)) => {
            s.request_authns.insert(k, Arc::new(p.clone()));
        }
        Some(Kind::WasmPlugin(p)) => {
            s.plugins.insert(k, Arc::new(p.clone()));
        }
        Some(Kind::TrustBundle(b)) => {
            s.trust_bundles.insert(k, Arc::new(b.clone()));
        }
        Some(Kind::Route(r)) => {
            if let Some(old) = s.routes.get(&k).cloned() {
                unroute(&mut s.routed_services, &old);
            }
            for p in &r.parents {
                let svc = weft_proto::resource::key(
                    weft_proto::resource::KIND_SERVICE,
                    &p.service_namespace,
                    &p.service_name,
                );
                *s.routed_services.entry(svc).or_insert(0) += 1;
            }
            s.routes_generation += 1;
            s.routes.insert(k, Arc::new(r.clone()));
        }
        None => {}
    }
}

fn remove(s: &mut StoreSnapshot, k: &str) {
    s.versions.remove(k);
    if let Some(w) = s.workloads.remove(k) {
        unindex(&mut s.workload_by_ip, k, &w.ips);
    }
    if let Some(v) = s.services.remove(k) {
        unindex(&mut s.service_by_vip, k, &v.cluster_ips);
    }
    s.policies.remove(k);
    s.peer_authns.remove(k);
    s.request_authns.remove(k);
    s.plugins.remove(k);
    s.trust_bundles.remove(k);
    if let Some(r) = s.routes.remove(k) {
        unroute(&mut s.routed_services, &r);
        s.routes_generation += 1;
    }
}

fn unroute(index: &mut OrdMap<String, usize>, r: &pb::Route) {
    for p in &r.parents {
        let svc = weft_proto::resource::key(
            weft_proto::resource::KIND_SERVICE,
            &p.service_namespace,
            &p.service_name,
        );
        if let Some(n) = index.get_mut(&svc) {
            *n -= 1;
            if *n == 0 {
                index.remove(&svc);
            }
        }
    }
}

fn ip_ok(field: &str, v: &str) -> Result<(), String> {
    v.parse::<IpAddr>()
        .map(|_| ())
        .map_err(|_| format!("{field}: {v:?} is not an IP address"))
}

/// What the node needs to be true of a resource before it uses it.
fn validate(r: &pb::Resource) -> Result<(), String> {
    match &r.kind {
        None => Err("resource has no kind".into()),
        Some(Kind::Workload(w)) => w.ips.iter().try_for_each(|ip| ip_ok("ips", ip)),
        Some(Kind::Service(s)) => {
            s.cluster_ips
                .iter()
                .try_for_each(|ip| ip_ok("cluster_ips", ip))?;
            s.endpoints
                .iter()
                .flat_map(|e| e.ips.iter())
                .try_for_each(|ip| ip_ok("endpoints.ips", ip))
        }
        Some(Kind::TrustBundle(b)) => {
            let n = rustls_pemfile::certs(&mut b.roots_pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("roots_pem: {e}"))?
                .len();
            if n == 0 {
                Err("roots_pem: no certificate".into())
            } else {
                Ok(())
            }
        }
        Some(Kind::Route(r)) => crate::route_match::check(r),
        Some(_) => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn wl(key: &str, ip: &str) -> pb::Resource {
        weft_proto::resource::make(
            key.into(),
            Kind::Workload(pb::Workload {
                name: key.into(),
                ips: vec![ip.into()],
                enrolled: true,
                node: "n1".into(),
                spiffe_id: format!("spiffe://td/ns/a/sa/{key}"),
                ..Default::default()
            }),
        )
    }

    #[test]
    fn bad_resource_is_rejected_and_previous_kept() {
        let s = ConfigStore::new("n1");
        let good = wl("w1", "10.0.0.1");
        s.apply(&pb::ConfigUpdate {
            upserts: vec![good.clone()],
            initial: true,
            ..Default::default()
        });
        assert!(s.snapshot().synced);
        let bad = wl("w1", "not-an-ip");
        let other = wl("w2", "10.0.0.2");
        let rej = s.apply(&pb::ConfigUpdate {
            upserts: vec![bad, other],
            ..Default::default()
        });
        assert_eq!(rej.len(), 1);
        assert_eq!(rej[0].0, "w1");
        let snap = s.snapshot();
        assert_eq!(snap.workloads["w1"].ips, vec!["10.0.0.1"]);
        assert_eq!(snap.versions["w1"], good.version);
        assert!(snap.workloads.contains_key("w2"));
        assert_eq!(
            s.local_identities().into_iter().collect::<Vec<_>>(),
            vec!["spiffe://td/ns/a/sa/w1", "spiffe://td/ns/a/sa/w2"]
        );
        assert_eq!(
            snap.workload_by_ip(ip("10.0.0.2")).map(|w| w.name.as_str()),
            Some("w2")
        );
        assert_eq!(
            snap.workload_by_ip(ip("10.0.0.1")).map(|w| w.name.as_str()),
            Some("w1"),
            "the rejected update did not touch the index"
        );
        s.apply(&pb::ConfigUpdate {
            removals: vec!["w2".into()],
            ..Default::default()
        });
        assert!(!s.snapshot().workloads.contains_key("w2"));
        assert!(s.snapshot().workload_by_ip(ip("10.0.0.2")).is_none());
        // An IP moving to another workload follows it.
        s.apply(&pb::ConfigUpdate {
            upserts: vec![wl("w3", "10.0.0.1")],
            ..Default::default()
        });
        s.apply(&pb::ConfigUpdate {
            upserts: vec![wl("w1", "10.0.0.9")],
            ..Default::default()
        });
        let snap = s.snapshot();
        assert_eq!(
            snap.workload_by_ip(ip("10.0.0.1")).map(|w| w.name.as_str()),
            Some("w3")
        );
        assert_eq!(
            snap.workload_by_ip(ip("10.0.0.9")).map(|w| w.name.as_str()),
            Some("w1")
        );
    }

    #[test]
    fn addresses_are_found_whatever_their_spelling() {
        let s = ConfigStore::new("n1");
        let svc = weft_proto::resource::make(
            "ns/svc".into(),
            Kind::Service(pb::Service {
                name: "svc".into(),
                cluster_ips: vec!["fd00:0:0::a".into()],
                ..Default::default()
            }),
        );
        let rej = s.apply(&pb::ConfigUpdate {
            upserts: vec![wl("w6", "FD00::0:5"), svc],
            initial: true,
            ..Default::default()
        });
        assert!(rej.is_empty(), "{rej:?}");
        let snap = s.snapshot();
        assert_eq!(
            snap.workload_by_ip(ip("fd00::5")).map(|w| w.name.as_str()),
            Some("w6")
        );
        assert_eq!(
            snap.service_by_vip(ip("fd00::a")).map(|v| v.name.as_str()),
            Some("svc")
        );
        assert!(snap.service_by_vip(ip("fd00::b")).is_none());
    }
}
