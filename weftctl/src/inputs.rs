//! The mesh's objects, from a manifest directory (offline) or a cluster
//! (kubeconfig), fed into the control plane's own model: weftctl sees exactly the
//! workloads, services and compiled policies the nodes would get.

use anyhow::{bail, Context};
use std::path::Path;
use std::sync::Arc;
use weft_model::directory::DirectoryReader;
use weft_model::manifest::{ManifestError, Object};
use weft_model::SourceEvent;
use weft_model::{Model, ModelConfig};
use weft_proto::pb::{self, resource::Kind};
use weft_proto::spiffe::TrustDomain;

/// Where the objects come from.
#[derive(clap::Args, Debug, Clone)]
pub struct Source {
    /// A directory of manifests (offline; what `weft-control-plane run --config-dir` reads).
    #[arg(long, conflicts_with = "kubeconfig")]
    pub dir: Option<std::path::PathBuf>,
    /// Read the objects from a cluster (default: $KUBECONFIG, ~/.kube/config, in-cluster).
    #[arg(long)]
    pub kubeconfig: Option<std::path::PathBuf>,
    #[arg(long, default_value = weft_proto::spiffe::DEFAULT_TRUST_DOMAIN)]
    pub trust_domain: TrustDomain,
    #[arg(long, default_value = "weft-system")]
    pub root_namespace: String,
}

/// The mesh as the model derives it.
pub struct Mesh {
    pub model: Arc<Model>,
    pub objects: Vec<Object>,
    pub errors: Vec<ManifestError>,
}

impl Mesh {
    pub fn resources(&self) -> Vec<Arc<pb::Resource>> {
        let st = self.model.read_state();
        let mut v: Vec<_> = st.entries.values().map(|e| e.resource.clone()).collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    fn of_kind<T>(&self, pick: impl Fn(&Kind) -> Option<&T>) -> Vec<T>
    where
        T: Clone,
    {
        self.resources()
            .iter()
            .filter_map(|r| r.kind.as_ref().and_then(&pick).cloned())
            .collect()
    }

    pub fn workloads(&self) -> Vec<pb::Workload> {
        self.of_kind(|k| match k {
            Kind::Workload(w) => Some(w),
            _ => None,
        })
    }

    pub fn services(&self) -> Vec<pb::Service> {
        self.of_kind(|k| match k {
            Kind::Service(s) => Some(s),
            _ => None,
        })
    }

    pub fn peer_authentications(&self) -> Vec<pb::PeerAuthentication> {
        self.of_kind(|k| match k {
            Kind::PeerAuthentication(p) => Some(p),
            _ => None,
        })
    }

    pub fn policies(&self) -> Vec<pb::AuthorizationPolicy> {
        self.of_kind(|k| match k {
            Kind::AuthorizationPolicy(p) => Some(p),
            _ => None,
        })
    }
}

pub async fn load(src: &Source) -> anyhow::Result<Mesh> {
    let (objects, errors) = match (&src.dir, &src.kubeconfig) {
        (Some(dir), _) => read_dir(dir)?,
        (None, kc) => (read_cluster(kc.as_deref()).await?, Vec::new()),
    };
    // Plugins are left out: resolving their modules could fetch over the network,
    // and no weftctl command needs them.
    let objects: Vec<Object> = objects
        .into_iter()
        .filter(|o| !matches!(o, Object::WasmPlugin(_)))
        .collect();
    let model = Model::new(
        ModelConfig {
            trust_domain: src.trust_domain.clone(),
            root_namespace: src.root_namespace.clone(),
            trust_bundle_pem: String::new(),
            jwt_jwks: String::new(),
            // The control plane's default (--default-identity-fallback off).
            default_identity_fallback: false,
        },
        std::sync::Arc::new(weft_model::modules::Offline),
    );
    model.apply(SourceEvent::Snapshot(objects.clone()));
    Ok(Mesh {
        model,
        objects,
        errors,
    })
}

fn read_dir(dir: &Path) -> anyhow::Result<(Vec<Object>, Vec<ManifestError>)> {
    if !dir.is_dir() {
        bail!("--dir {}: not a directory", dir.display());
    }
    let mut reader = DirectoryReader::default();
    let scan = reader
        .scan(dir)
        .with_context(|| format!("reading {}", dir.display()))?
        .context("the directory could not be read")?;
    let objects = match scan.event {
        SourceEvent::Snapshot(o) => o,
        SourceEvent::Changes { apply, .. } => apply,
        SourceEvent::Errors(_) => Vec::new(),
    };
    Ok((objects, scan.errors))
}

async fn read_cluster(kubeconfig: Option<&Path>) -> anyhow::Result<Vec<Object>> {
    use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
    use weft_proto::crd::AuthorizationPolicy;
    let client = crate::kube_client(kubeconfig).await?;
    let mut out = Vec::new();
    out.extend(
        list::<Namespace>(&client, "namespaces")
            .await?
            .map(Object::Namespace),
    );
    out.extend(
        list::<Pod>(&client, "pods")
            .await?
            .map(|p| Object::Pod(Box::new(p))),
    );
    out.extend(
        list::<Service>(&client, "services")
            .await?
            .map(Object::Service),
    );
    out.extend(
        list::<ServiceAccount>(&client, "service accounts")
            .await?
            .map(Object::ServiceAccount),
    );
    out.extend(
        list::<AuthorizationPolicy>(
            &client,
            "AuthorizationPolicies (are weft's CRDs installed? `weftctl check`)",
        )
        .await?
        .map(Object::AuthorizationPolicy),
    );
    Ok(out)
}

/// Every object of kind `K` in all namespaces.
async fn list<K>(client: &kube::Client, what: &str) -> anyhow::Result<impl Iterator<Item = K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let items = kube::Api::<K>::all(client.clone())
        .list(&kube::api::ListParams::default())
        .await
        .with_context(|| format!("listing {what}"))?;
    Ok(items.into_iter())
}
