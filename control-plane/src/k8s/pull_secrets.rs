//! Image pull secrets for `oci://` WasmPlugins: the `kubernetes.io/dockerconfigjson`
//! Secret a plugin names, read (GET, never listed or watched) from the plugin's
//! namespace when its module is pulled. The control plane's ClusterRole grants
//! `get` on Secrets only with the chart's `controlPlane.wasmPullSecrets`.

use k8s_openapi::api::core::v1::Secret;
use std::time::Duration;

const TYPE: &str = "kubernetes.io/dockerconfigjson";
const KEY: &str = ".dockerconfigjson";

pub struct KubePullSecrets {
    pub client: kube::Client,
    pub rt: tokio::runtime::Handle,
}

impl crate::wasm::PullSecrets for KubePullSecrets {
    /// Called on a blocking thread (a module read): waits for the API server.
    fn docker_config(&self, namespace: &str, name: &str) -> Result<Vec<u8>, String> {
        let api: kube::Api<Secret> = kube::Api::namespaced(self.client.clone(), namespace);
        let got = self
            .rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(10), api.get_opt(name)).await
            })
            .map_err(|_| "the API server did not answer within 10 s".to_string())?;
        let secret = match got {
            Ok(Some(s)) => s,
            Ok(None) => return Err("no such Secret".into()),
            Err(kube::Error::Api(e)) if e.code == 403 => {
                return Err(
                    "the control plane may not read Secrets (set the chart's controlPlane.wasmPullSecrets: true)"
                        .into(),
                )
            }
            Err(e) => return Err(format!("reading it: {e}")),
        };
        if secret.type_.as_deref() != Some(TYPE) {
            return Err(format!(
                "its type is {:?}, not {TYPE}",
                secret.type_.unwrap_or_default()
            ));
        }
        secret
            .data
            .and_then(|mut d| d.remove(KEY))
            .map(|b| b.0)
            .ok_or_else(|| format!("it has no {KEY} key"))
    }
}
