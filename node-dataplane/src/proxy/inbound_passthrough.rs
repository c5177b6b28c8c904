//! Inbound plaintext listener (in-pod :15006): connections from outside the mesh,
//! steered here by the sk_lookup program. The accepted socket keeps the original
//! destination as its local address. Each is authorized as unauthenticated (no
//! principal: principal and namespace rules cannot match it) and, if allowed,
//! served like any inbound connection ([`super::inbound_conn`]): forwarded to the
//! application from the pod's own IP, which the sk_lookup program leaves alone.
//! Denied connections are reset at once.

use super::copy::reset_on_close;
use super::counters::InboundStats;
use super::inbound_conn::InboundConn;
use super::local::LocalPod;
use super::record::ConnRecord;
use super::state::ProxyState;
use std::sync::Arc;

pub async fn serve(
    listener: tokio::net::TcpListener,
    target: LocalPod,
    state: Arc<ProxyState>,
    stats: Arc<InboundStats>,
) {
    loop {
        let Ok((conn, peer)) = listener.accept().await else {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            continue;
        };
        if state.over_capacity() {
            reset_on_close(&conn);
            tracing::debug!(%peer, "inbound connection refused: the proxy holds its maximum");
            continue;
        }
        let mut record = ConnRecord::inbound_plaintext(Some(state.clone()), stats.clone(), peer);
        let dst = match conn.local_addr() {
            Ok(a) => a,
            Err(e) => {
                tracing::debug!(%peer, error = %e, "inbound plaintext connection failed");
                record.fail(&e.into());
                continue;
            }
        };
        record.destination(dst);
        let inbound = InboundConn::new(state.clone(), target.clone(), peer, dst, None, record);
        tokio::spawn(async move {
            match inbound.authorize() {
                Ok(admitted) => admitted.serve(conn).await,
                Err(_denied) => reset_on_close(&conn),
            }
        });
    }
}
