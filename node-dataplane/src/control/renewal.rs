//! Renewal of the node's own credential (standalone mode): at half its remaining
//! lifetime (plus up to 10 % jitter) the agent calls `NodeCredentials.Renew` with a
//! fresh P-256 key and a CSR for the same SAN as its current credential, over a
//! channel authenticated by that credential; the returned certificate must carry the
//! same SAN and certify the key sent. It is then stored ([`super::credential`]). A
//! directory that is not writable keeps the renewal in memory only (logged). Failed
//! renewals back off (1 s to 5 min) while the current credential stays in use. During
//! a CA rotation a credential that the CA in force did not sign is renewed at once.

use super::backoff::Backoff;
use super::channel::{stale, ControlPlaneTarget};
use super::credential::{persist, renew_after, validity, NodeIdentity, Validity};
use crate::metrics::Metrics;
use anyhow::{bail, Context};
use rcgen::{CertificateParams, DistinguishedName, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use weft_proto::pb::{self, node_credentials_client::NodeCredentialsClient};
use x509_parser::prelude::{FromDer, X509Certificate};

/// Renews the node credential before it expires, forever (standalone mode only).
pub async fn renew_forever(target: ControlPlaneTarget, metrics: Arc<Metrics>) {
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(300));
    loop {
        let current = target.node_identity().and_then(|id| validity(&id.cert_pem));
        let v = match current {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "cannot read the node credential; renewal retries later");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
        };
        metrics.node_credential_expiry.set(
            v.not_after
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0),
        );
        // Subscribed before the signer is read, so a change in between is not missed.
        let mut trust = target.trust.subscribe();
        // A CA rotation: a credential the CA in force did not sign is renewed soon
        // (spread over a second), not at half life.
        let stale = target
            .node_identity()
            .is_ok_and(|id| stale(&id.cert_pem, target.trust.signer_der().as_deref()));
        let wait = if stale {
            Duration::from_secs(1).mul_f64(rand::random::<f64>())
        } else {
            renew_after(&v, SystemTime::now(), rand::random::<f64>())
        };
        tracing::debug!(serial = %v.serial, renew_in = ?wait, stale, "node credential renewal scheduled");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // The bundle changed: look again (its signer may be new).
            r = trust.changed(), if !stale => {
                if r.is_ok() {
                    continue;
                }
                tokio::time::sleep(wait).await;
            }
        }
        match renew_once(&target, &v).await {
            Ok(new) => {
                backoff.reset();
                tracing::info!(old_serial = %v.serial, serial = %new.serial, not_after = %humantime::format_rfc3339_seconds(new.not_after), "renewed the node credential");
                if stale {
                    // The replica asked may lag a tick behind the rotation.
                    tokio::time::sleep(Duration::from_secs(2)).await;
                }
            }
            Err(e) => {
                metrics.node_credential_renewal_errors.inc();
                let delay = backoff.next_delay();
                let expired = v.not_after <= SystemTime::now();
                tracing::warn!(error = %format!("{e:#}"), retry_in = ?delay, expired, "renewing the node credential failed");
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One renewal: returns the new credential's validity once it is in use.
pub async fn renew_once(
    target: &ControlPlaneTarget,
    current: &Validity,
) -> anyhow::Result<Validity> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.subject_alt_names = vec![SanType::URI(current.san.clone().try_into()?)];
    let csr = params.serialize_request(&key)?;
    let mut client = NodeCredentialsClient::new(target.connect().await?);
    let resp = client
        .renew(pb::RenewNodeCredentialRequest {
            csr_der: csr.der().to_vec(),
        })
        .await?
        .into_inner();
    let leaf = rustls_pemfile::certs(&mut resp.cert_chain_pem.as_bytes())
        .next()
        .context("the control plane returned no certificate")??;
    let (_, x509) =
        X509Certificate::from_der(&leaf).context("the returned credential does not parse")?;
    if x509.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        bail!("the returned credential is not for the key we sent");
    }
    let new = validity(&resp.cert_chain_pem)?;
    if new.san != current.san {
        bail!(
            "the returned credential is for {:?}, not {:?}: rejected",
            new.san,
            current.san
        );
    }
    let id = NodeIdentity {
        cert_pem: resp.cert_chain_pem,
        key_pem: key.serialize_pem(),
    };
    target.credential.set(id.clone());
    if let Err(e) = persist(&target.credential_dir, &id) {
        tracing::warn!(dir = %target.credential_dir.display(), error = %e, "cannot write the renewed node credential; it is used but a restarted agent presents the old one");
    }
    Ok(new)
}
