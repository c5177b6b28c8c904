//! The proxy's listeners inside one enrolled pod's network namespace: outbound
//! (:15001 on the loopback addresses), inbound plaintext (:15006) and HBONE
//! (:15008), bound first, then served once the pod's capture is in place.

use super::counters::PodStats;
use super::local::LocalPod;
use super::outbound::Outbound;
use super::ports::{HBONE_PORT, INBOUND_PLAIN_PORT, OUTBOUND_PORT};
use super::state::ProxyState;
use crate::netns::PodNetns;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use tokio::task::JoinHandle;

/// A pod's listeners, bound and not yet served.
pub struct PodListeners {
    outbound: Vec<std::net::TcpListener>,
    inbound_plain: std::net::TcpListener,
    hbone: std::net::TcpListener,
}

impl PodListeners {
    /// Binds every listener in `netns`. Nothing is served yet, so a failure
    /// here (or in the caller's next steps) leaves nothing behind.
    pub fn bind(netns: &PodNetns) -> std::io::Result<Self> {
        if let Err(e) = netns.enable_listener_migration() {
            // Older kernels: a draining agent's queued connections are reset instead.
            tracing::debug!(netns = %netns.path().display(), error = %e, "cannot enable net.ipv4.tcp_migrate_req");
        }
        let mut outbound =
            vec![netns.listen(SocketAddr::from((Ipv4Addr::LOCALHOST, OUTBOUND_PORT)))?];
        // IPv6 is optional: a pod without IPv6 loopback simply has no [::1] listener.
        if let Ok(l) = netns.listen(SocketAddr::from((Ipv6Addr::LOCALHOST, OUTBOUND_PORT))) {
            outbound.push(l);
        }
        Ok(Self {
            outbound,
            inbound_plain: netns.listen(SocketAddr::from((
                Ipv4Addr::UNSPECIFIED,
                INBOUND_PLAIN_PORT,
            )))?,
            hbone: netns.listen(SocketAddr::from((Ipv4Addr::UNSPECIFIED, HBONE_PORT)))?,
        })
    }

    /// The plaintext inbound listener, which the sk_lookup program steers to.
    pub fn inbound_plain(&self) -> &std::net::TcpListener {
        &self.inbound_plain
    }

    /// Serves every listener for `pod`: one task each, aborted by the caller when
    /// the pod leaves the mesh.
    pub fn serve(
        self,
        state: &Arc<ProxyState>,
        pod: &LocalPod,
        stats: &PodStats,
    ) -> std::io::Result<Vec<JoinHandle<()>>> {
        let outbound = self
            .outbound
            .into_iter()
            .map(tokio::net::TcpListener::from_std)
            .collect::<Result<Vec<_>, _>>()?;
        let inbound_plain = tokio::net::TcpListener::from_std(self.inbound_plain)?;
        let hbone = tokio::net::TcpListener::from_std(self.hbone)?;
        let ob = Arc::new(Outbound {
            netns: pod.netns.clone(),
            mark: state.mark,
            stats: stats.outbound.clone(),
            mesh: Some((state.clone(), pod.clone())),
            upstreams: Default::default(),
        });
        let mut tasks: Vec<JoinHandle<()>> = outbound
            .into_iter()
            .map(|l| tokio::spawn(super::outbound::serve(l, ob.clone())))
            .collect();
        tasks.push(tokio::spawn(super::inbound_passthrough::serve(
            inbound_plain,
            pod.clone(),
            state.clone(),
            stats.inbound.clone(),
        )));
        tasks.push(tokio::spawn(super::inbound::serve(
            hbone,
            pod.clone(),
            state.clone(),
        )));
        Ok(tasks)
    }
}
