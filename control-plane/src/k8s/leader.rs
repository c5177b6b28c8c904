//! Leader election on a `coordination.k8s.io/v1` Lease. Every replica serves nodes;
//! only the leader writes CRD status, creates the CA Secret and publishes the trust
//! bundle. The lease lasts [`LEASE_DURATION`] and is renewed every [`RETRY`], so a
//! replica that dies is replaced within `LEASE_DURATION + RETRY` (12 s); one that
//! shuts down cleanly releases the lease and is replaced within [`RETRY`].
//!
//! Every write carries the Lease's resourceVersion: two replicas that race for an
//! expired lease cannot both win.

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};
use std::time::Duration;
use tokio::sync::watch;

pub const LEASE_DURATION: Duration = Duration::from_secs(10);
pub const RETRY: Duration = Duration::from_secs(2);

/// Whether this replica currently leads. Cheap to clone; `changed()` wakes on handover.
pub type LeaderWatch = watch::Receiver<bool>;

pub struct LeaderElector {
    api: Api<Lease>,
    name: String,
    identity: String,
}

/// What one election round decided.
#[derive(Debug, PartialEq, Eq)]
enum Round {
    Lead,
    Follow(String),
}

impl LeaderElector {
    pub fn new(client: Client, namespace: &str, name: &str, identity: &str) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_string(),
            identity: identity.to_string(),
        }
    }

    /// Runs rounds until `shutdown` fires, then releases the lease if held.
    pub async fn run(
        self,
        tx: watch::Sender<bool>,
        metrics: std::sync::Arc<crate::metrics::Metrics>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut last_renewed: Option<tokio::time::Instant> = None;
        loop {
            let leading = match self.round().await {
                Ok(Round::Lead) => {
                    last_renewed = Some(tokio::time::Instant::now());
                    true
                }
                Ok(Round::Follow(holder)) => {
                    if *tx.borrow() {
                        tracing::warn!(lease = %self.name, %holder, "lost the leader lease");
                    }
                    last_renewed = None;
                    false
                }
                Err(e) => {
                    tracing::warn!(lease = %self.name, error = %e, "leader election round failed");
                    // Keep leading only while our last renewal is still valid.
                    last_renewed.is_some_and(|t| t.elapsed() < LEASE_DURATION - RETRY)
                }
            };
            if leading != *tx.borrow() {
                tracing::info!(lease = %self.name, identity = %self.identity, leading, "leadership changed");
                metrics.leader.set(i64::from(leading));
                let _ = tx.send(leading);
            }
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => {}
                _ = shutdown.wait_for(|s| *s) => break,
            }
        }
        if *tx.borrow() {
            self.release().await;
            let _ = tx.send(false);
            metrics.leader.set(0);
        }
    }

    async fn round(&self) -> Result<Round, kube::Error> {
        let now = MicroTime(Timestamp::now());
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    ..Default::default()
                },
                spec: Some(self.spec(now.clone(), now, 0)),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(Round::Lead),
                Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Follow("?".into())),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let expired = match &spec.renew_time {
            Some(MicroTime(t)) => {
                let secs = i64::from(
                    spec.lease_duration_seconds
                        .unwrap_or(LEASE_DURATION.as_secs() as i32),
                );
                Timestamp::now().as_second() > t.as_second() + secs
            }
            None => true,
        };
        if holder != self.identity && !holder.is_empty() && !expired {
            return Ok(Round::Follow(holder));
        }
        let (acquired, transitions) = if holder == self.identity {
            (
                spec.acquire_time.clone().unwrap_or_else(|| now.clone()),
                spec.lease_transitions.unwrap_or(0),
            )
        } else {
            (now.clone(), spec.lease_transitions.unwrap_or(0) + 1)
        };
        lease.spec = Some(self.spec(acquired, now, transitions));
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                if holder != self.identity {
                    tracing::info!(lease = %self.name, previous = %holder, "acquired the leader lease");
                }
                Ok(Round::Lead)
            }
            // Someone else wrote first: they lead.
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Round::Follow("?".into())),
            Err(e) => Err(e),
        }
    }

    fn spec(&self, acquired: MicroTime, renewed: MicroTime, transitions: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
            acquire_time: Some(acquired),
            renew_time: Some(renewed),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Hands the lease back so another replica takes over at its next round.
    async fn release(&self) {
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(&self.identity) {
            return;
        }
        spec.holder_identity = None;
        spec.renew_time = None;
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!(lease = %self.name, "released the leader lease"),
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "could not release the leader lease")
            }
        }
    }
}
