//! The node's own addresses, for the one kind of plaintext connection that is not
//! authorized: from the pod's own node to the pod. That is how the kubelet's
//! health probes (and its `exec`-less port checks) arrive, from the node's address
//! on the pod network. Authorized like any plaintext connection, a probe to a pod
//! that an ALLOW policy protects is denied: an HTTP probe always (the pod never
//! becomes Ready), a TCP probe whenever the client sees the reset before its
//! connect completes (under CPU load: pods flap out of their Services).
//!
//! Istio (probe traffic from the host is marked and let through) and Cilium (the
//! local host may reach its endpoints) trust the node the same way: the node runs
//! the kubelet and the proxy itself, so nothing on it is less trusted than the
//! proxy. `--allow-from-node=false` turns this off.
//!
//! The agent runs in the node's network namespace (host network), so the node's
//! addresses are its own: read with `getifaddrs` at start and every
//! [`REFRESH`].

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// How often the node's addresses are read again.
pub const REFRESH: Duration = Duration::from_secs(10);

/// The node's addresses, and whether connections from them pass unauthorized.
#[derive(Default)]
pub struct NodeAddresses {
    enabled: bool,
    addrs: RwLock<Arc<HashSet<IpAddr>>>,
}

impl NodeAddresses {
    /// Exempts connections from the node when `enabled`, after reading its
    /// addresses.
    pub fn new(enabled: bool) -> Self {
        let me = Self {
            enabled,
            addrs: RwLock::default(),
        };
        if enabled {
            me.refresh();
        }
        me
    }

    /// Takes these as the node's addresses (tests).
    #[cfg(test)]
    pub fn replace(&self, addrs: impl IntoIterator<Item = IpAddr>) {
        *self.addrs.write().unwrap_or_else(|p| p.into_inner()) =
            Arc::new(addrs.into_iter().collect());
    }

    /// Is `ip` one of the node's addresses, with the exemption on?
    pub fn exempts(&self, ip: IpAddr) -> bool {
        self.enabled
            && self
                .addrs
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&ip)
    }

    /// Reads the node's addresses again; keeps the last ones if they cannot be read.
    pub fn refresh(&self) {
        let found = match nix::ifaddrs::getifaddrs() {
            Ok(ifs) => ifs
                .filter_map(|i| i.address)
                .filter_map(|a| {
                    if let Some(v4) = a.as_sockaddr_in() {
                        Some(IpAddr::V4(v4.ip()))
                    } else {
                        a.as_sockaddr_in6().map(|v6| IpAddr::V6(v6.ip()))
                    }
                })
                // Loopback never reaches a pod from outside it.
                .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
                .collect::<HashSet<_>>(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the node's addresses; keeping the last ones");
                return;
            }
        };
        let mut cur = self.addrs.write().unwrap_or_else(|p| p.into_inner());
        if **cur != found {
            tracing::info!(addresses = ?found, "connections from these node addresses (kubelet probes) reach pods without authorization");
            *cur = Arc::new(found);
        }
    }

    /// Keeps the addresses current, forever.
    pub async fn refresh_forever(self: Arc<Self>) {
        if !self.enabled {
            return;
        }
        loop {
            tokio::time::sleep(REFRESH).await;
            let me = self.clone();
            let _ = tokio::task::spawn_blocking(move || me.refresh()).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_hosts_addresses_without_loopback() {
        let n = NodeAddresses::new(true);
        assert!(!n.exempts("127.0.0.1".parse().unwrap()));
        assert!(!n.exempts("::1".parse().unwrap()));
        n.replace(["10.1.0.1".parse().unwrap()]);
        assert!(n.exempts("10.1.0.1".parse().unwrap()));
        assert!(!n.exempts("10.1.0.2".parse().unwrap()));
        let off = NodeAddresses::new(false);
        off.replace(["10.1.0.1".parse().unwrap()]);
        assert!(!off.exempts("10.1.0.1".parse().unwrap()));
    }
}
