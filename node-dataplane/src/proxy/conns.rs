//! Open inbound connections and the attributes they were authorized with. When
//! policies change, every open connection is authorized again and the newly
//! denied ones are closed.

use super::local::LiveWorkload;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;
use weft_authz::Attributes;
use weft_proto::pb;

struct Tracked {
    /// The destination as the control plane describes it now (a relabelled pod
    /// is re-checked with its new labels).
    dest: LiveWorkload,
    attrs: Attributes,
    cancel: CancellationToken,
}

#[derive(Default)]
pub struct ConnTracker {
    next: AtomicU64,
    open: Mutex<HashMap<u64, Tracked>>,
}

/// Removes the connection from the tracker when it ends.
pub struct Registration {
    id: u64,
    tracker: Arc<ConnTracker>,
    pub cancel: CancellationToken,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.tracker
            .open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

impl ConnTracker {
    pub fn register(self: &Arc<Self>, dest: LiveWorkload, attrs: Attributes) -> Registration {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let cancel = CancellationToken::new();
        self.open.lock().unwrap_or_else(|p| p.into_inner()).insert(
            id,
            Tracked {
                dest,
                attrs,
                cancel: cancel.clone(),
            },
        );
        Registration {
            id,
            tracker: self.clone(),
            cancel,
        }
    }

    pub fn len(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Re-authorizes every open connection; cancels the denied ones. Returns how many.
    pub fn recheck(
        &self,
        authorize: impl Fn(&pb::Workload, &Attributes) -> weft_authz::Decision,
    ) -> usize {
        let open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let mut closed = 0;
        for t in open.values() {
            let dest = t.dest.get();
            let d = authorize(&dest, &t.attrs);
            if !d.allowed && !t.cancel.is_cancelled() {
                tracing::info!(destination = %format!("{}/{}", dest.namespace, dest.name), peer = ?t.attrs.principal, policy = ?d.policy, reason = d.reason, "open connection denied by a policy change: closing");
                t.cancel.cancel();
                closed += 1;
            }
        }
        closed
    }
}
