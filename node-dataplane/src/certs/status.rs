//! The node's [`pb::NodeStatus`]: which trust bundle it uses and how many of its
//! certificates (SVIDs and node credential) its signer did not sign. The control
//! plane follows a CA rotation with it.

use super::store::CertStore;
use crate::config::ConfigStore;
use crate::control::channel::{signer_der, stale};
use std::collections::HashMap;
use std::sync::Mutex;
use weft_proto::pb;

/// Builds status reports, remembering signature checks (they repeat every few
/// seconds while nothing changes).
#[derive(Default)]
pub struct StatusComputer {
    /// (leaf chain, signer) -> stale.
    checked: Mutex<HashMap<(String, Vec<u8>), bool>>,
}

impl StatusComputer {
    pub fn compute(
        &self,
        config: &ConfigStore,
        certs: &CertStore,
        credential_pem: Option<String>,
    ) -> pb::NodeStatus {
        let Some(bundle) = config.trust() else {
            return pb::NodeStatus::default();
        };
        let signer = signer_der(&bundle).unwrap_or_default();
        let mut chains: Vec<String> = certs.all().iter().map(|c| c.chain_pem.clone()).collect();
        chains.extend(credential_pem);
        let mut checked = self.checked.lock().unwrap_or_else(|p| p.into_inner());
        let mut seen = HashMap::with_capacity(chains.len());
        let mut stale_certs = 0;
        for chain in &chains {
            let key = (chain.clone(), signer.clone());
            let is_stale = match checked.get(&key) {
                Some(s) => *s,
                None => stale(chain, (!signer.is_empty()).then_some(signer.as_slice())),
            };
            stale_certs += u32::from(is_stale);
            seen.insert(key, is_stale);
        }
        *checked = seen;
        pb::NodeStatus {
            trust_bundle_sha256: weft_proto::x509::sha256_hex(&bundle.roots_pem),
            certs: chains.len() as u32,
            stale_certs,
            signer_sha256: weft_proto::x509::sha256_hex(&bundle.signer_pem),
        }
    }
}
