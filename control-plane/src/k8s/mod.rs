//! Kubernetes mode: the API server as config source, CRD status, leader election,
//! the CA in a Secret, the trust bundle ConfigMaps and node authentication by
//! TokenReview. Supported API servers: 1.20 and newer (see README).

pub mod ca_secret;
pub mod leader;
pub mod pull_secrets;
pub mod route_status;
pub mod source;
pub mod status;
pub mod token_review;
pub mod trust_bundle;

/// Settings of the Kubernetes mode.
#[derive(Debug, Clone)]
pub struct KubeSettings {
    /// Kubeconfig file; in-cluster configuration when absent.
    pub kubeconfig: Option<std::path::PathBuf>,
    /// The control plane's namespace (Lease, CA Secret, node agents).
    pub namespace: String,
    /// ServiceAccount of the node agents.
    pub node_service_account: String,
    /// Audience the node agents' projected tokens carry.
    pub token_audience: String,
    /// This replica's identity in the leader Lease (the pod name).
    pub identity: String,
    pub lease_name: String,
    pub ca_secret: String,
}

/// A client from the kubeconfig (when given) or the in-cluster environment.
pub async fn client(s: &KubeSettings) -> anyhow::Result<kube::Client> {
    weft_runtime::kube_client(s.kubeconfig.as_deref()).await
}
