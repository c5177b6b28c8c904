//! `oci://` modules against a real registry on loopback (Debian's docker-registry,
//! distribution 2.8, installed by `.ci/setup`): both layouts, digests, pull policy,
//! and a registry that asks for a password.

use super::tests::{resolved, spec, store, wasm, GOOD};
use super::*;
use crate::oci::{self, Credentials, OciError, Reference};
use std::process::{Child, Command, Stdio};

/// A registry on a free loopback port, killed (by PID) and its files removed when
/// dropped.
struct Registry {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn registry_binary() -> std::path::PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::Path::new(&h).join(".cache")))
        .unwrap_or_default()
        .join("weft/docker-registry/usr/bin/docker-registry");
    for p in [std::path::PathBuf::from("/usr/bin/docker-registry"), cache] {
        if p.exists() {
            return p;
        }
    }
    panic!("docker-registry is not installed: run .ci/setup (it unpacks Debian's package)")
}

impl Registry {
    /// Started with basic auth for `user` when given (bcrypt line in htpasswd).
    fn start(user: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let mut config = format!(
            "version: 0.1\nlog: {{level: error, accesslog: {{disabled: true}}}}\n\
             storage: {{filesystem: {{rootdirectory: {}}}}}\n\
             http: {{addr: \"{addr}\", secret: weft-test}}\n",
            dir.path().join("data").display()
        );
        if let Some((u, p)) = user {
            let line = format!("{u}:{}\n", bcrypt::hash(p, 4).unwrap());
            let f = dir.path().join("htpasswd");
            std::fs::write(&f, line).unwrap();
            config += &format!(
                "auth: {{htpasswd: {{realm: weft-test, path: {}}}}}\n",
                f.display()
            );
        }
        let cfg = dir.path().join("config.yml");
        std::fs::write(&cfg, config).unwrap();
        let child = Command::new(registry_binary())
            .arg("serve")
            .arg(&cfg)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let r = Registry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            if let Ok(resp) = agent.get(format!("http://{}/v2/", r.addr)).call() {
                if matches!(resp.status().as_u16(), 200 | 401) {
                    return r;
                }
            }
            assert!(Instant::now() < deadline, "the registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agent(&self, auth: Option<(&str, &str)>) -> (ureq::Agent, Option<String>) {
        use base64::Engine as _;
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .into();
        let header = auth.map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        });
        (agent, header)
    }

    /// Pushes a blob (monolithic upload); returns its descriptor.
    fn blob(
        &self,
        repo: &str,
        media: &str,
        data: &[u8],
        auth: Option<(&str, &str)>,
    ) -> serde_json::Value {
        let (agent, header) = self.agent(auth);
        let digest = format!("sha256:{}", hex::encode(Sha256::digest(data)));
        let mut req = agent.post(format!("http://{}/v2/{repo}/blobs/uploads/", self.addr));
        if let Some(h) = &header {
            req = req.header("Authorization", h);
        }
        let resp = req.send_empty().unwrap();
        assert_eq!(resp.status(), 202, "starting an upload");
        let location = resp.headers()["location"].to_str().unwrap().to_string();
        let location = if location.starts_with("http") {
            location
        } else {
            format!("http://{}{location}", self.addr)
        };
        let sep = if location.contains('?') { '&' } else { '?' };
        let mut req = agent
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream");
        if let Some(h) = &header {
            req = req.header("Authorization", h);
        }
        let resp = req.send(data).unwrap();
        assert_eq!(resp.status(), 201, "uploading a blob");
        serde_json::json!({"mediaType": media, "digest": digest, "size": data.len()})
    }

    /// Pushes a manifest under `tag`; returns its digest.
    fn manifest(
        &self,
        repo: &str,
        tag: &str,
        m: &serde_json::Value,
        auth: Option<(&str, &str)>,
    ) -> String {
        let (agent, header) = self.agent(auth);
        let body = serde_json::to_vec(m).unwrap();
        let media = m["mediaType"].as_str().unwrap().to_string();
        let mut req = agent
            .put(format!("http://{}/v2/{repo}/manifests/{tag}", self.addr))
            .header("Content-Type", &media);
        if let Some(h) = &header {
            req = req.header("Authorization", h);
        }
        let resp = req.send(&body).unwrap();
        assert_eq!(
            resp.status(),
            201,
            "pushing a manifest: {:?}",
            resp.into_body().read_to_string()
        );
        format!("sha256:{}", hex::encode(Sha256::digest(&body)))
    }

    /// A Wasm artifact (Istio's "oci variant" media types).
    fn push_artifact(
        &self,
        repo: &str,
        tag: &str,
        module: &[u8],
        auth: Option<(&str, &str)>,
    ) -> String {
        let config = self.blob(
            repo,
            "application/vnd.module.wasm.config.v1+json",
            b"{}",
            auth,
        );
        let layer = self.blob(
            repo,
            "application/vnd.module.wasm.content.layer.v1+wasm",
            module,
            auth,
        );
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [layer],
        });
        self.manifest(repo, tag, &m, auth)
    }

    /// A Docker v2 image whose only layer is a gzipped tar holding plugin.wasm.
    fn push_image(&self, repo: &str, tag: &str, module: &[u8]) -> String {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(module.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "plugin.wasm", module).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &b.into_inner().unwrap()).unwrap();
        let layer_bytes = gz.finish().unwrap();
        let config = self.blob(
            repo,
            "application/vnd.docker.container.image.v1+json",
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
            None,
        );
        let layer = self.blob(
            repo,
            "application/vnd.docker.image.rootfs.diff.tar.gzip",
            &layer_bytes,
            None,
        );
        let m = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
            "config": config,
            "layers": [layer],
        });
        self.manifest(repo, tag, &m, None)
    }
}

const T: Duration = Duration::from_secs(10);
const MAX: u64 = MAX_MODULE_BYTES as u64;

#[test]
fn both_layouts_are_pulled_and_checked_against_their_digests() {
    let reg = Registry::start(None);
    let module = wasm(GOOD);
    let artifact = reg.push_artifact("plugins/gate", "v1", &module, None);
    let image = reg.push_image("plugins/gate-image", "v1", &module);
    let r = |s: &str| Reference::parse(&format!("oci://{}/{s}", reg.addr)).unwrap();

    let p = oci::pull(&r("plugins/gate:v1"), None, T, MAX).unwrap();
    assert_eq!(
        (p.manifest_digest.as_str(), p.module.as_slice()),
        (artifact.as_str(), module.as_slice())
    );
    let p = oci::pull(&r("plugins/gate-image:v1"), None, T, MAX).unwrap();
    assert_eq!(
        (p.manifest_digest.as_str(), p.module.as_slice()),
        (image.as_str(), module.as_slice())
    );
    // By digest.
    let p = oci::pull(&r(&format!("plugins/gate@{artifact}")), None, T, MAX).unwrap();
    assert_eq!(p.module, module);
    // A digest the registry does not have, a tag it does not have.
    let missing = format!("sha256:{}", "0".repeat(64));
    assert!(matches!(
        oci::pull(&r(&format!("plugins/gate@{missing}")), None, T, MAX),
        Err(OciError::Fetch(m)) if m.contains("404")
    ));
    assert!(matches!(
        oci::pull(&r("plugins/gate:v2"), None, T, MAX),
        Err(OciError::Fetch(m)) if m.contains("404")
    ));
    // Bounded: a module past the limit is refused, whatever the layout.
    assert!(matches!(
        oci::pull(&r("plugins/gate:v1"), None, T, 16),
        Err(OciError::TooLarge { .. })
    ));
    assert!(matches!(
        oci::pull(&r("plugins/gate-image:v1"), None, T, 16),
        Err(OciError::TooLarge { .. })
    ));
}

#[test]
fn a_registry_that_asks_for_a_password() {
    let reg = Registry::start(Some(("puller", "s3cret")));
    let module = wasm(GOOD);
    reg.push_artifact("private/gate", "v1", &module, Some(("puller", "s3cret")));
    let r = Reference::parse(&format!("oci://{}/private/gate:v1", reg.addr)).unwrap();
    let good = Credentials {
        username: "puller".into(),
        password: "s3cret".into(),
    };
    assert_eq!(oci::pull(&r, Some(&good), T, MAX).unwrap().module, module);
    assert!(matches!(
        oci::pull(&r, None, T, MAX),
        Err(OciError::Unauthorized(_))
    ));
    let bad = Credentials {
        username: "puller".into(),
        password: "wrong".into(),
    };
    assert!(matches!(
        oci::pull(&r, Some(&bad), T, MAX),
        Err(OciError::Unauthorized(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oci_urls_resolve_in_the_background_with_istios_digest_semantics() {
    let reg = Registry::start(None);
    let module = wasm(GOOD);
    let module_sha = hex::encode(Sha256::digest(&module));
    let manifest = reg.push_artifact("plugins/gate", "v1", &module, None);
    let manifest = manifest.trim_start_matches("sha256:").to_string();
    let url = format!("oci://{}/plugins/gate:v1", reg.addr);
    let (store, mut rx) = store();
    // No sha256, the manifest's digest (as Istio reads it), or the module's own.
    for declared in [None, Some(manifest.clone()), Some(module_sha.clone())] {
        let r = resolved(&store, &mut rx, &spec(url.clone(), declared.clone())).await;
        assert_eq!(
            r,
            Resolved::Ready {
                sha256: module_sha.clone()
            },
            "{declared:?}"
        );
        assert_eq!(
            store.get(&module_sha).unwrap().as_slice(),
            module.as_slice()
        );
    }
    let r = resolved(&store, &mut rx, &spec(url.clone(), Some("a".repeat(64)))).await;
    assert!(
        matches!(&r, Resolved::Failed(p) if p.field == "spec.sha256" && p.reason == "DigestMismatch" && p.message.contains(&manifest)),
        "{r:?}"
    );
    // IfNotPresent (any tag but `latest`): a new image under the same tag is not
    // pulled; Always is.
    let other = wasm(&format!("{GOOD} (func (export \"x\"))"));
    reg.push_artifact("plugins/gate", "v1", &other, None);
    assert_eq!(
        store.clone().resolve("ns", &spec(url.clone(), None)),
        Resolved::Ready {
            sha256: module_sha.clone()
        }
    );
    let mut always = spec(url.clone(), None);
    always.image_pull_policy = Some("Always".into());
    assert_eq!(
        store.clone().resolve("ns", &always),
        Resolved::Ready {
            sha256: module_sha.clone()
        }
    );
    let mut bad_policy = spec(url.clone(), None);
    bad_policy.image_pull_policy = Some("Sometimes".into());
    assert!(matches!(
        store.clone().resolve("ns", &bad_policy),
        Resolved::Failed(p) if p.field == "spec.imagePullPolicy"
    ));
    // Bad references name the field.
    assert!(matches!(
        store.clone().resolve("ns", &spec("oci://nothing".into(), None)),
        Resolved::Failed(p) if p.field == "spec.url" && p.reason == "InvalidSpec"
    ));
    // An image that holds no module.
    let config = reg.blob(
        "plugins/empty",
        "application/vnd.oci.image.config.v1+json",
        b"{}",
        None,
    );
    let layer = reg.blob(
        "plugins/empty",
        "application/vnd.oci.image.layer.v1.tar",
        &[0u8; 1024],
        None,
    );
    reg.manifest(
        "plugins/empty",
        "v1",
        &serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": config,
            "layers": [layer],
        }),
        None,
    );
    let r = resolved(
        &store,
        &mut rx,
        &spec(format!("oci://{}/plugins/empty:v1", reg.addr), None),
    )
    .await;
    assert!(
        matches!(&r, Resolved::Failed(p) if p.reason == "InvalidImage" && p.message.contains("plugin.wasm")),
        "{r:?}"
    );
}

/// Pull secrets as Kubernetes would hand them: by namespace and name.
struct FakeSecrets(std::collections::HashMap<(String, String), Vec<u8>>);

impl PullSecrets for FakeSecrets {
    fn docker_config(&self, ns: &str, name: &str) -> Result<Vec<u8>, String> {
        self.0
            .get(&(ns.to_string(), name.to_string()))
            .cloned()
            .ok_or_else(|| "no such Secret".to_string())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pull_secret_is_read_from_the_plugins_namespace() {
    use base64::Engine as _;
    let reg = Registry::start(Some(("puller", "s3cret")));
    let module = wasm(GOOD);
    reg.push_artifact("private/gate", "v1", &module, Some(("puller", "s3cret")));
    let url = format!("oci://{}/private/gate:v1", reg.addr);
    let auth = base64::engine::general_purpose::STANDARD.encode("puller:s3cret");
    let config = format!(r#"{{"auths": {{"{}": {{"auth": "{auth}"}}}}}}"#, reg.addr);
    let (standalone, mut srx) = store();
    let with_secret = |name: &str| {
        let mut s = spec(url.clone(), None);
        s.image_pull_secret = Some(name.into());
        s
    };
    // Standalone (no Kubernetes): the field is refused, naming it.
    let r = resolved(&standalone, &mut srx, &with_secret("pull")).await;
    assert!(
        matches!(&r, Resolved::Failed(p) if p.field == "spec.imagePullSecret" && p.reason == "Unsupported"),
        "{r:?}"
    );
    let (store, mut rx) = store();
    store.set_pull_secrets(Arc::new(FakeSecrets(
        [(("ns".to_string(), "pull".to_string()), config.into_bytes())].into(),
    )));
    let r = resolved(&store, &mut rx, &with_secret("pull")).await;
    let sha = hex::encode(Sha256::digest(&module));
    assert_eq!(r, Resolved::Ready { sha256: sha });
    // A Secret that is not there; no secret at all: the registry refuses.
    let r = resolved(&store, &mut rx, &with_secret("missing")).await;
    assert!(
        matches!(&r, Resolved::Failed(p) if p.field == "spec.imagePullSecret" && p.message.contains("ns/missing")),
        "{r:?}"
    );
    let r = resolved(&store, &mut rx, &spec(url.clone(), None)).await;
    assert!(
        matches!(&r, Resolved::Failed(p) if p.reason == "FetchFailed" && p.message.contains("imagePullSecret")),
        "{r:?}"
    );
}
