//! Obtains and renews SVIDs. For each identity of the local enrolled workloads it
//! generates a fresh P-256 key, sends a CSR, checks that the returned certificate is
//! for exactly the identity it asked for, and renews at half life (plus jitter).
//! Failed requests back off while the current certificate stays in use; identities
//! that leave the node are dropped.

use super::store::{zeroizing::Secret, CertStore, WorkloadCert};
use crate::config::ConfigStore;
use crate::control::backoff::Backoff;
use crate::control::channel::ControlChannel;
use crate::metrics::{IdentityLabel, Metrics};
use anyhow::{bail, Context};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use weft_proto::pb::{self, certificates_client::CertificatesClient};
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, Clone)]
pub struct CertManagerSettings {
    /// Fraction of the lifetime after which a certificate is renewed.
    pub renew_fraction: f64,
    /// Extra random delay, as a fraction of the lifetime.
    pub jitter_fraction: f64,
}

impl Default for CertManagerSettings {
    fn default() -> Self {
        Self {
            renew_fraction: 0.5,
            jitter_fraction: 0.1,
        }
    }
}

pub struct CertManager {
    pub settings: CertManagerSettings,
    pub config: Arc<ConfigStore>,
    pub certs: Arc<CertStore>,
    pub metrics: Arc<Metrics>,
    pub connect: Arc<
        dyn Fn() -> futures::future::BoxFuture<'static, anyhow::Result<ControlChannel>>
            + Send
            + Sync,
    >,
}

struct Slot {
    renew_at: Instant,
    backoff: Backoff,
    /// Not before this may a certificate that the bundle's signer did not sign (a CA
    /// rotation) be re-issued early again.
    stale_retry: Instant,
}

/// How soon a certificate still not signed by the bundle's signer after an early
/// re-issue is tried again (the control plane replica asked may lag by a tick).
const STALE_RETRY: Duration = Duration::from_secs(5);
/// Early re-issues for a CA rotation are spread over this much time (every node
/// starts at about the same moment).
const STALE_SPREAD: Duration = Duration::from_secs(3);

impl CertManager {
    pub async fn run(self) {
        let mut changes = self.config.watch();
        let mut slots: HashMap<String, Slot> = HashMap::new();
        let mut client: Option<CertificatesClient<ControlChannel>> = None;
        loop {
            let wanted: BTreeSet<String> = self.config.local_identities();
            // Drop identities that left the node.
            slots.retain(|id, _| {
                let keep = wanted.contains(id);
                if !keep {
                    tracing::info!(identity = %id, "no workload with this identity on the node anymore; dropping its certificate");
                    self.certs.remove(id);
                    self.metrics.cert_expiry.remove(&IdentityLabel { identity: id.clone() });
                }
                keep
            });
            let now = Instant::now();
            let signer = self
                .config
                .trust()
                .and_then(|b| crate::control::channel::signer_der(&b));
            for id in &wanted {
                let slot = slots.entry(id.clone()).or_insert_with(|| Slot {
                    renew_at: now,
                    backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
                    stale_retry: now,
                });
                // A CA rotation: re-issue what the new signer did not sign, soon.
                if slot.renew_at > now
                    && slot.stale_retry <= now
                    && self.certs.get(id).is_some_and(|c| {
                        crate::control::channel::stale(&c.chain_pem, signer.as_deref())
                    })
                {
                    slot.stale_retry = now + STALE_RETRY;
                    let early = now + STALE_SPREAD.mul_f64(rand::random::<f64>());
                    if early < slot.renew_at {
                        tracing::info!(identity = %id, "certificate not signed by the CA in force (CA rotation); re-issuing it");
                        slot.renew_at = early;
                    }
                }
                if slot.renew_at > now {
                    continue;
                }
                let result = match client.as_mut() {
                    Some(c) => self.request(c, id).await,
                    None => match (self.connect)().await {
                        Ok(ch) => {
                            let c = client.insert(CertificatesClient::new(ch));
                            self.request(c, id).await
                        }
                        Err(e) => Err(e),
                    },
                };
                match result {
                    Ok(cert) => {
                        slot.backoff.reset();
                        slot.renew_at = Instant::now() + self.renew_after(&cert);
                        // Still not signed by the CA in force (the replica asked lags
                        // a tick behind a rotation): try again soon.
                        if crate::control::channel::stale(&cert.chain_pem, signer.as_deref()) {
                            slot.renew_at = slot.renew_at.min(Instant::now() + STALE_RETRY);
                        }
                        self.metrics.cert_renewals.inc();
                        if self.certs.get(id).is_some() {
                            self.metrics.cert_rotations.inc();
                        }
                        self.metrics
                            .cert_expiry
                            .get_or_create(&IdentityLabel {
                                identity: id.clone(),
                            })
                            .set(unix(cert.not_after) as i64);
                        tracing::info!(identity = %id, serial = %cert.serial, not_after = %humantime::format_rfc3339_seconds(cert.not_after), "certificate issued");
                        self.certs.put(cert);
                    }
                    Err(e) => {
                        let delay = slot.backoff.next_delay();
                        slot.renew_at = Instant::now() + delay;
                        self.metrics.cert_errors.inc();
                        let still_valid = self
                            .certs
                            .get(id)
                            .is_some_and(|c| c.not_after > SystemTime::now());
                        tracing::warn!(identity = %id, error = %format!("{e:#}"), retry_in = ?delay, still_valid, "certificate request failed");
                        if e.downcast_ref::<tonic::Status>()
                            .is_some_and(|s| s.code() == tonic::Code::Unavailable)
                        {
                            client = None;
                        }
                    }
                }
            }
            let next = slots.values().map(|s| s.renew_at).min();
            let sleep = next
                .map(|t| t.saturating_duration_since(Instant::now()))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = tokio::time::sleep(sleep) => {}
            }
        }
    }

    /// Time until renewal: `renew_fraction` (+ jitter) of the remaining lifetime at
    /// receipt. Measured from now, not from notBefore, which the CA backdates for
    /// clock skew.
    fn renew_after(&self, c: &WorkloadCert) -> Duration {
        let remaining = c
            .not_after
            .duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO);
        let frac =
            self.settings.renew_fraction + rand::random::<f64>() * self.settings.jitter_fraction;
        remaining
            .mul_f64(frac.min(0.95))
            .max(Duration::from_millis(500))
    }

    async fn request(
        &self,
        client: &mut CertificatesClient<ControlChannel>,
        id: &str,
    ) -> anyhow::Result<WorkloadCert> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(id.to_string().try_into()?)];
        let csr = params.serialize_request(&key)?;
        let resp = client
            .sign(pb::SignRequest {
                spiffe_id: id.to_string(),
                csr_der: csr.der().to_vec(),
            })
            .await
            .map_err(anyhow::Error::from)?
            .into_inner();
        let leaf = rustls_pemfile::certs(&mut resp.cert_chain_pem.as_bytes())
            .next()
            .context("the control plane returned no certificate")??;
        let (_, x509) =
            X509Certificate::from_der(&leaf).context("returned certificate does not parse")?;
        check_san(&leaf, id)?;
        if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            bail!("returned certificate is not for the key we sent");
        }
        let validity = x509.validity();
        Ok(WorkloadCert {
            spiffe_id: id.to_string(),
            serial: x509.raw_serial_as_string().replace(':', ""),
            not_before: from_unix(validity.not_before.timestamp()),
            not_after: from_unix(validity.not_after.timestamp()),
            chain_pem: resp.cert_chain_pem,
            trust_bundle_pem: resp.trust_bundle_pem,
            key_pem: Secret(key.serialize_pem()),
        })
    }
}

/// The returned certificate must carry exactly one URI SAN, equal to what we asked.
pub fn check_san(der: &[u8], id: &str) -> anyhow::Result<()> {
    match weft_proto::x509::single_uri_san(der) {
        Ok(uri) if uri == id => Ok(()),
        Ok(uri) => bail!("returned certificate is for {uri:?}, not {id}: rejected"),
        Err(e) => bail!("returned certificate rejected: {e}"),
    }
}

fn from_unix(t: i64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(t.max(0) as u64)
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
