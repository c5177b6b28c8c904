//! Wasm plugin modules: resolved from a WasmPlugin's `url`, admitted (digest,
//! validation, Proxy-Wasm exports), and kept by sha256 for nodes to fetch over gRPC.
//!
//! Every module is read in the background, never while the model derives (the
//! model holds its lock then, and one slow or endless read would stop every update
//! and certificate): resolving a plugin whose module has not been read yet answers
//! `Pending`, and the read ends with the `on_fetched` callback, which re-derives the
//! plugin's namespace. While a read is in flight, or after it failed, the plugin is
//! distributed with `module_error` set, so nodes apply its failStrategy instead of
//! silently skipping it.
//!
//! Every read is bounded: at most [`MAX_MODULE_BYTES`], and [`READ_TIMEOUT`]. A
//! `file://` URL must name a regular file (not a device such as `/dev/zero`, a FIFO
//! or a directory); it is opened without waiting for a writer and read through a
//! limit whatever size it claims. An `http(s)://` body is read through the same
//! limit within the same time.
//!
//! `file://` modules are read again (in the background) when the plugin's namespace
//! is derived at least [`REREAD`] after the last read, so a changed file is picked
//! up; the last result is used meanwhile. `http(s)://` modules are addressed by their
//! required `sha256` and fetched once; a failed fetch is retried after [`RETRY`].
//! The store holds the module each URL last gave (a replaced one is dropped), so
//! it holds at most one module per URL it was asked for. Nodes never reach the
//! internet: only the control plane fetches.

use sha2::{Digest, Sha256};
use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_model::modules::{ModuleProblem, ModuleSource, Resolved};
use weft_proto::crd::WasmPluginSpec;

/// Largest module accepted (32 MiB), from a file or a download.
pub const MAX_MODULE_BYTES: usize = 32 << 20;
/// Longest a module read or download may take.
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// A failed http(s) or OCI fetch is retried after this.
const RETRY: Duration = Duration::from_secs(30);
/// An `oci://` module pulled with `imagePullPolicy: Always` (or by the tag
/// `latest` without a policy) is pulled again when its plugin is derived this
/// long after the last pull.
pub const REPULL: Duration = Duration::from_secs(60);
/// A `file://` module is read again when its plugin is derived this long after the
/// last read.
const REREAD: Duration = Duration::from_secs(1);

/// The last read of one URL, and the one in flight.
#[derive(Default)]
struct Fetch {
    /// The module's sha256 (its bytes are in `modules`), or why it is not usable,
    /// and when that was found.
    last: Option<(Result<String, ModuleProblem>, Instant)>,
    /// A read in flight, since when.
    in_flight: Option<Instant>,
    /// The namespaces whose plugins use the URL: re-derived when its module changes.
    namespaces: BTreeSet<String>,
}

type Refresh = Box<dyn Fn(String) + Send + Sync>;

/// Reads image pull secrets: in Kubernetes mode, Secrets of the plugins'
/// namespaces (`crate::k8s::pull_secrets`).
pub trait PullSecrets: Send + Sync {
    /// The `.dockerconfigjson` of the `kubernetes.io/dockerconfigjson` Secret
    /// `namespace/name`, or why it cannot be read.
    fn docker_config(&self, namespace: &str, name: &str) -> Result<Vec<u8>, String>;
}

pub struct ModuleStore {
    modules: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    fetches: Mutex<HashMap<String, Fetch>>,
    on_fetched: Mutex<Option<Arc<Refresh>>>,
    /// [`READ_TIMEOUT`], shorter in tests.
    read_timeout: Duration,
    /// Where reads run: the runtime the store was made in (the model may resolve
    /// from a thread outside it).
    rt: Option<tokio::runtime::Handle>,
    /// Image pull secrets (Kubernetes mode); `None`: an `imagePullSecret` fails.
    pull_secrets: Mutex<Option<Arc<dyn PullSecrets>>>,
}

impl Default for ModuleStore {
    fn default() -> Self {
        Self {
            modules: Mutex::default(),
            fetches: Mutex::default(),
            on_fetched: Mutex::default(),
            read_timeout: READ_TIMEOUT,
            rt: tokio::runtime::Handle::try_current().ok(),
            pull_secrets: Mutex::default(),
        }
    }
}

fn problem(field: &'static str, reason: &'static str, message: impl Into<String>) -> ModuleProblem {
    ModuleProblem {
        field,
        reason,
        message: message.into(),
    }
}

fn too_large(url: &str) -> ModuleProblem {
    problem(
        "spec.url",
        "TooLarge",
        format!(
            "{url}: the module is larger than {} MiB, the largest accepted",
            MAX_MODULE_BYTES >> 20
        ),
    )
}

/// Checks bytes against the declared digest, validates the module and its exports.
pub fn admit(bytes: &[u8], declared: Option<&str>) -> Result<String, ModuleProblem> {
    let sha = hex::encode(Sha256::digest(bytes));
    check_digest(&sha, declared)?;
    let mut validator = wasmparser::Validator::new();
    validator.validate_all(bytes).map_err(|e| {
        problem(
            "spec.url",
            "InvalidModule",
            format!("not a valid WebAssembly module: {e}"),
        )
    })?;
    let mut exports = Vec::new();
    for payload in wasmparser::Parser::new(0).parse_all(bytes) {
        if let Ok(wasmparser::Payload::ExportSection(r)) = payload {
            for e in r.into_iter().flatten() {
                exports.push(e.name.to_string());
            }
        }
    }
    weft_proto::wasm_abi::check_exports(exports.iter().map(String::as_str))
        .map_err(|m| problem("spec.url", "MissingAbiExport", m))?;
    Ok(sha)
}

fn check_digest(sha: &str, declared: Option<&str>) -> Result<(), ModuleProblem> {
    match declared {
        Some(d) if !d.eq_ignore_ascii_case(sha) => Err(problem(
            "spec.sha256",
            "DigestMismatch",
            format!("the module's sha256 is {sha}, not {d}"),
        )),
        _ => Ok(()),
    }
}

/// Where a module comes from.
#[derive(Clone)]
enum Source {
    File(String),
    Http(String),
    /// A registry; the declared sha256 (the manifest's digest, as Istio reads it,
    /// or the module's own), checked as it is pulled; pulled again after
    /// [`REPULL`] when `always`.
    Oci {
        reference: crate::oci::Reference,
        declared: Option<String>,
        always: bool,
        /// The plugin's namespace and its `imagePullSecret`.
        secret: Option<(String, String)>,
    },
}

impl ModuleStore {
    /// Where `imagePullSecret`s are read from.
    pub fn set_pull_secrets(&self, s: Arc<dyn PullSecrets>) {
        *self.pull_secrets.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
    }

    pub fn get(&self, sha256: &str) -> Option<Arc<Vec<u8>>> {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned()
    }

    fn keep(&self, sha: &str, bytes: Vec<u8>) {
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(sha.to_string())
            .or_insert_with(|| Arc::new(bytes));
    }

    /// Resolves the module of a plugin in namespace `ns`. Never reads: see the
    /// module's documentation.
    fn resolve_module(self: Arc<Self>, ns: &str, spec: &WasmPluginSpec) -> Resolved {
        let url = spec.url.as_str();
        let declared = spec.sha256.as_deref();
        if let Some(path) = url.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Resolved::Failed(problem(
                    "spec.url",
                    "FetchFailed",
                    format!(
                        "{url:?}: file:// URLs need an absolute path (file:///path/to/plugin.wasm)"
                    ),
                ));
            }
            return self.resolve_from(ns, url, Source::File(path.to_string()), declared);
        }
        if url.starts_with("http://") || url.starts_with("https://") {
            let Some(d) = declared.map(str::to_ascii_lowercase) else {
                return Resolved::Failed(problem(
                    "spec.sha256",
                    "InvalidSpec",
                    "is required for http(s) URLs",
                ));
            };
            if self.get(&d).is_some() {
                return Resolved::Ready { sha256: d };
            }
            return self.resolve_from(ns, url, Source::Http(url.to_string()), Some(&d));
        }
        if url.starts_with("oci://") {
            let reference = match crate::oci::Reference::parse(url) {
                Ok(r) => r,
                Err(e) => {
                    return Resolved::Failed(problem("spec.url", "InvalidSpec", e.to_string()))
                }
            };
            let always = match spec.image_pull_policy.as_deref() {
                Some("Always") => true,
                Some("IfNotPresent") => false,
                Some(other) => {
                    return Resolved::Failed(problem(
                        "spec.imagePullPolicy",
                        "InvalidSpec",
                        format!("{other:?} is not IfNotPresent or Always"),
                    ))
                }
                // As Istio: the tag `latest` is pulled again, any other kept.
                None => reference.digest.is_none() && reference.tag.as_deref() == Some("latest"),
            };
            let declared = declared.map(str::to_ascii_lowercase);
            let secret = spec
                .image_pull_secret
                .as_ref()
                .map(|name| (ns.to_string(), name.clone()));
            // One pull per URL, declared digest and secret: a change pulls again.
            let mut key = url.to_string();
            if let Some(d) = &declared {
                key += &format!("#sha256={d}");
            }
            if let Some((ns, name)) = &secret {
                key += &format!("#secret={ns}/{name}");
            }
            let source = Source::Oci {
                reference,
                declared,
                always,
                secret,
            };
            return self.resolve_from(ns, &key, source, None);
        }
        Resolved::Failed(problem(
            "spec.url",
            "UnsupportedUrl",
            format!("{url:?}: only file://, http(s):// and oci:// are supported"),
        ))
    }

    /// The last read of `url`, starting a new one in the background when there is
    /// none yet, or the last is stale (a file's after [`REREAD`], a failed
    /// download's after [`RETRY`]) and none is in flight.
    fn resolve_from(
        self: Arc<Self>,
        ns: &str,
        url: &str,
        source: Source,
        declared: Option<&str>,
    ) -> Resolved {
        let mut fetches = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
        let f = fetches.entry(url.to_string()).or_default();
        if !f.namespaces.contains(ns) {
            f.namespaces.insert(ns.to_string());
        }
        let stale_after = match (&source, &f.last) {
            (Source::File(_), _) => REREAD,
            // A new digest for the same URL: fetch again soon.
            (Source::Http(_), Some((Ok(sha), _))) if check_digest(sha, declared).is_err() => REREAD,
            (Source::Http(_), _) => RETRY,
            (Source::Oci { always: true, .. }, Some((Ok(_), _))) => REPULL,
            (Source::Oci { .. }, Some((Ok(_), _))) => Duration::MAX,
            (Source::Oci { .. }, _) => RETRY,
        };
        let stale = f
            .last
            .as_ref()
            .is_none_or(|(_, at)| at.elapsed() >= stale_after);
        if stale && f.in_flight.is_none() {
            let rt = (self.rt.clone()).or_else(|| tokio::runtime::Handle::try_current().ok());
            match rt {
                Some(rt) => {
                    f.in_flight = Some(Instant::now());
                    self.clone().spawn_read(&rt, url.to_string(), source);
                }
                None => {
                    let p = problem("spec.url", "FetchFailed", "no runtime to read on");
                    f.last = Some((Err(p), Instant::now()));
                }
            }
        }
        let f = &fetches[url];
        match &f.last {
            Some((Ok(sha), _)) => match check_digest(sha, declared) {
                Ok(()) if self.get(sha).is_some() => Resolved::Ready {
                    sha256: sha.clone(),
                },
                Ok(()) => Resolved::Pending,
                Err(p) => Resolved::Failed(p),
            },
            Some((Err(p), _)) => Resolved::Failed(p.clone()),
            None => Resolved::Pending,
        }
    }

    /// Reads `source` on a blocking thread and records the result for `url`. A read that has not ended after
    /// [`READ_TIMEOUT`] is recorded as failed; its thread (stuck in the kernel, as on
    /// a hung file system) keeps the URL's read in flight until it ends, so no
    /// second one piles up behind it.
    fn spawn_read(self: Arc<Self>, rt: &tokio::runtime::Handle, url: String, source: Source) {
        let u = url.clone();
        let timeout = self.read_timeout;
        let secrets = self
            .pull_secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut read = rt.spawn_blocking(move || match source {
            Source::File(path) => read_file(&u, &path),
            Source::Http(u) => download(&u, timeout),
            Source::Oci {
                reference,
                declared,
                secret,
                ..
            } => {
                let creds = match &secret {
                    Some((ns, name)) => pull_credentials(secrets.as_deref(), &reference, ns, name)?,
                    None => None,
                };
                pull_oci(&reference, declared.as_deref(), creds.as_ref(), timeout)
            }
        });
        rt.spawn(async move {
            // A download ends within `timeout` by itself; this wait is for reads the
            // kernel holds.
            let got = match tokio::time::timeout(timeout + Duration::from_secs(5), &mut read).await
            {
                Ok(got) => got,
                Err(_) => {
                    let p = problem(
                        "spec.url",
                        "FetchFailed",
                        format!(
                            "{url}: reading the module did not end within {} s",
                            timeout.as_secs() + 5
                        ),
                    );
                    self.record(&url, Err(p), true);
                    read.await
                }
            };
            let result = match got {
                Ok(Ok(bytes)) => admit(&bytes, None).inspect(|s| self.keep(s, bytes)),
                Ok(Err(p)) => Err(p),
                Err(e) => Err(problem(
                    "spec.url",
                    "FetchFailed",
                    format!("read task failed: {e}"),
                )),
            };
            self.record(&url, result, false);
        });
    }

    /// Records the outcome of a read of `url`; when it changed, re-derives the
    /// namespaces that use it.
    fn record(&self, url: &str, result: Result<String, ModuleProblem>, in_flight: bool) {
        let namespaces = {
            let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            let e = f.entry(url.to_string()).or_default();
            if !in_flight {
                e.in_flight = None;
            }
            let changed = e.last.as_ref().is_none_or(|(r, _)| *r != result);
            if changed {
                match &result {
                    Ok(s) => {
                        tracing::info!(%url, namespaces = ?e.namespaces, sha256 = %s, "wasm module read")
                    }
                    Err(p) => {
                        tracing::warn!(%url, namespaces = ?e.namespaces, field = p.field, reason = p.reason, error = %p.message, "wasm module not usable")
                    }
                }
            }
            let old = e.last.replace((result, Instant::now()));
            if !changed {
                return;
            }
            let namespaces = e.namespaces.clone();
            // The store holds the module each URL last gave, and no other.
            if let Some((Ok(old), _)) = old {
                let used = f
                    .values()
                    .any(|x| matches!(&x.last, Some((Ok(s), _)) if *s == old));
                if !used {
                    self.modules
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&old);
                }
            }
            namespaces
        };
        let cb = self
            .on_fetched
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(cb) = cb {
            for ns in namespaces {
                cb(ns);
            }
        }
    }
}

/// Reads a module file: a regular file only (a device such as `/dev/zero`, a FIFO,
/// a socket or a directory is refused before a byte is read), opened without
/// waiting for a writer, and read through a [`MAX_MODULE_BYTES`] limit whatever
/// size it reports.
fn read_file(url: &str, path: &str) -> Result<Vec<u8>, ModuleProblem> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let failed = |e: std::io::Error| problem("spec.url", "FetchFailed", format!("{url}: {e}"));
    let file = std::fs::OpenOptions::new()
        .read(true)
        // Opening a FIFO for reading waits for a writer; with O_NONBLOCK it does not.
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(failed)?;
    let meta = file.metadata().map_err(failed)?;
    let t = meta.file_type();
    if !t.is_file() {
        let kind = if t.is_dir() {
            "a directory"
        } else if t.is_char_device() {
            "a character device"
        } else if t.is_block_device() {
            "a block device"
        } else if t.is_fifo() {
            "a FIFO"
        } else if t.is_socket() {
            "a socket"
        } else {
            "not a regular file"
        };
        return Err(problem(
            "spec.url",
            "NotRegularFile",
            format!("{url}: is {kind}; a module must be a regular file"),
        ));
    }
    if meta.len() > MAX_MODULE_BYTES as u64 {
        return Err(too_large(url));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_MODULE_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(failed)?;
    if bytes.len() > MAX_MODULE_BYTES {
        return Err(too_large(url));
    }
    Ok(bytes)
}

/// Downloads a module: at most [`MAX_MODULE_BYTES`], within `timeout` from the
/// request's start to the body's last byte.
fn download(url: &str, timeout: Duration) -> Result<Vec<u8>, ModuleProblem> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .build()
        .into();
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| problem("spec.url", "FetchFailed", format!("GET {url}: {e}")))?;
    resp.into_body()
        .with_config()
        .limit(MAX_MODULE_BYTES as u64)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => too_large(url),
            e => problem("spec.url", "FetchFailed", format!("reading {url}: {e}")),
        })
}

/// The credentials for `r`'s registry in the pull secret `ns/name`; `None` when
/// the secret has no entry for it (the pull is then anonymous).
fn pull_credentials(
    secrets: Option<&dyn PullSecrets>,
    r: &crate::oci::Reference,
    ns: &str,
    name: &str,
) -> Result<Option<crate::oci::Credentials>, ModuleProblem> {
    let field = "spec.imagePullSecret";
    let secrets = secrets.ok_or_else(|| {
        problem(
            field,
            "Unsupported",
            "image pull secrets are read from Kubernetes: this control plane runs from a manifest directory",
        )
    })?;
    let config = secrets
        .docker_config(ns, name)
        .map_err(|e| problem(field, "FetchFailed", format!("Secret {ns}/{name}: {e}")))?;
    crate::oci::credentials_for(&config, &r.registry)
        .map_err(|e| problem(field, "InvalidSecret", format!("Secret {ns}/{name}: {e}")))
}

/// Pulls a module from a registry: at most [`MAX_MODULE_BYTES`] within `timeout`.
/// A declared sha256 must be the manifest's digest (as Istio checks it) or the
/// module's own.
fn pull_oci(
    r: &crate::oci::Reference,
    declared: Option<&str>,
    creds: Option<&crate::oci::Credentials>,
    timeout: Duration,
) -> Result<Vec<u8>, ModuleProblem> {
    use crate::oci::OciError;
    let url = format!("oci://{}/{}", r.registry, r.repository);
    let pulled =
        crate::oci::pull(r, creds, timeout, MAX_MODULE_BYTES as u64).map_err(|e| match e {
            OciError::TooLarge { .. } => too_large(&url),
            OciError::BadReference(_) => problem("spec.url", "InvalidSpec", e.to_string()),
            OciError::DigestMismatch { .. } | OciError::Layout(_) => {
                problem("spec.url", "InvalidImage", format!("{url}: {e}"))
            }
            OciError::Unauthorized(_) | OciError::Fetch(_) => {
                problem("spec.url", "FetchFailed", format!("{url}: {e}"))
            }
        })?;
    if let Some(d) = declared {
        let manifest = pulled.manifest_digest.trim_start_matches("sha256:");
        let module = hex::encode(Sha256::digest(&pulled.module));
        if d != manifest && d != module {
            return Err(problem(
                "spec.sha256",
                "DigestMismatch",
                format!("{url}: the image manifest's sha256 is {manifest} and the module's {module}, not {d}"),
            ));
        }
    }
    Ok(pulled.module)
}

impl ModuleSource for ModuleStore {
    fn resolve(self: Arc<Self>, ns: &str, spec: &WasmPluginSpec) -> Resolved {
        self.resolve_module(ns, spec)
    }

    /// Called with a namespace after a background fetch for one of its plugins ends.
    fn set_on_fetched(&self, f: Box<dyn Fn(String) + Send + Sync>) {
        *self.on_fetched.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(f));
    }
}

#[cfg(test)]
mod registry_tests;

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn wasm(exports: &str) -> Vec<u8> {
        // A tiny module in binary form, built from text by hand-assembled bytes is
        // overkill: use the text format via wasmparser's sibling crate in dev-deps.
        wat::parse_str(format!("(module (memory (export \"memory\") 1) {exports})")).unwrap()
    }

    pub(super) const GOOD: &str = r#"(func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "malloc") (param i32) (result i32) (i32.const 0))"#;

    #[test]
    fn admission() {
        let good = wasm(GOOD);
        let sha = hex::encode(Sha256::digest(&good));
        assert_eq!(admit(&good, None), Ok(sha.clone()));
        assert_eq!(admit(&good, Some(&sha.to_uppercase())), Ok(sha.clone()));
        let bad = admit(&good, Some(&"0".repeat(64))).unwrap_err();
        assert_eq!((bad.field, bad.reason), ("spec.sha256", "DigestMismatch"));
        assert!(bad.message.contains(&sha));
        let e = admit(b"\0asm\x01\0\0\0\x01", None).unwrap_err();
        assert_eq!(e.reason, "InvalidModule");
        let e = admit(&wasm(""), None).unwrap_err();
        assert_eq!(e.reason, "MissingAbiExport");
    }

    pub(super) fn spec(url: String, sha: Option<String>) -> WasmPluginSpec {
        WasmPluginSpec {
            url,
            sha256: sha,
            ..Default::default()
        }
    }

    /// A store whose `on_fetched` namespaces arrive on the receiver.
    pub(super) fn store() -> (
        Arc<ModuleStore>,
        tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        let store = Arc::new(ModuleStore::default());
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        store.set_on_fetched(Box::new(move |ns| {
            let _ = tx.send(ns);
        }));
        (store, rx)
    }

    /// Resolves `s` (which starts a read in the background), waits for the read to
    /// end, and resolves again.
    pub(super) async fn resolved(
        store: &Arc<ModuleStore>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<String>,
        s: &WasmPluginSpec,
    ) -> Resolved {
        assert_eq!(store.clone().resolve("ns", s), Resolved::Pending);
        let ns = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .expect("the read never ended");
        assert_eq!(ns.as_deref(), Some("ns"));
        store.clone().resolve("ns", s)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_urls_are_read_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.wasm");
        std::fs::write(&p, wasm(GOOD)).unwrap();
        let url = format!("file://{}", p.display());
        let (store, mut rx) = store();
        let r = resolved(&store, &mut rx, &spec(url.clone(), None)).await;
        let Resolved::Ready { sha256 } = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            store.get(&sha256).unwrap().as_slice(),
            wasm(GOOD).as_slice()
        );
        // The last read answers at once, for any digest.
        let r = store
            .clone()
            .resolve("ns", &spec(url.clone(), Some("a".repeat(64))));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "DigestMismatch"),
            "{r:?}"
        );
        // A changed file is read again when its plugin is derived after `REREAD`.
        std::fs::write(&p, b"not wasm").unwrap();
        tokio::time::sleep(REREAD).await;
        let r = store.clone().resolve("ns", &spec(url.clone(), None));
        assert_eq!(r, Resolved::Ready { sha256 }, "the last read, meanwhile");
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        let r = store.clone().resolve("ns", &spec(url.clone(), None));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "InvalidModule"),
            "{r:?}"
        );
        let r = store
            .clone()
            .resolve("ns", &spec("file://relative.wasm".into(), None));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.message.contains("absolute")),
            "{r:?}"
        );
        let r = store
            .clone()
            .resolve("ns", &spec("ftp://registry/plugin.wasm".into(), None));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "UnsupportedUrl"),
            "{r:?}"
        );
        let r = store
            .clone()
            .resolve("ns", &spec("http://127.0.0.1:1/p.wasm".into(), None));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.field == "spec.sha256"),
            "{r:?}"
        );
        // A missing file.
        let url = format!("file://{}/missing.wasm", dir.path().display());
        let r = resolved(&store, &mut rx, &spec(url.clone(), None)).await;
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "FetchFailed" && p.message.starts_with(&url)),
            "{r:?}"
        );
    }

    /// `file:///dev/zero`, a FIFO nobody writes, a directory and a file past the
    /// limit: each is refused with a status naming `spec.url`, without reading more
    /// than the limit, and resolving never waits for the read. (Before, the read
    /// ran inside the model's lock: `/dev/zero` grew without bound and a FIFO never
    /// returned.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn file_reads_are_bounded_and_never_block_resolving() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo.wasm");
        mkfifo(&fifo);
        let big = dir.path().join("big.wasm");
        // Sparse: past the limit without writing it.
        std::fs::File::create(&big)
            .unwrap()
            .set_len(MAX_MODULE_BYTES as u64 + 1)
            .unwrap();
        for (url, reason, says) in [
            (
                "file:///dev/zero".to_string(),
                "NotRegularFile",
                "character device",
            ),
            (
                format!("file://{}", fifo.display()),
                "NotRegularFile",
                "FIFO",
            ),
            (
                format!("file://{}", dir.path().display()),
                "NotRegularFile",
                "directory",
            ),
            (
                format!("file://{}", big.display()),
                "TooLarge",
                "larger than 32 MiB",
            ),
        ] {
            let (store, mut rx) = store();
            let s = spec(url.clone(), None);
            // Resolving runs inside the model's lock: it must answer at once.
            let t = std::thread::spawn({
                let store = store.clone();
                let s = s.clone();
                move || store.resolve("ns", &s)
            });
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !t.is_finished() {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{url}: resolving blocked"
                );
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            assert_eq!(t.join().unwrap(), Resolved::Pending, "{url}");
            tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
                .await
                .unwrap_or_else(|_| panic!("{url}: the read never ended"));
            let r = store.clone().resolve("ns", &s);
            let Resolved::Failed(p) = r else {
                panic!("{url}: {r:?}")
            };
            assert_eq!((p.field, p.reason), ("spec.url", reason), "{url}: {p:?}");
            assert!(
                p.message.starts_with(&url) && p.message.contains(says),
                "{url}: {p:?}"
            );
            assert!(store.modules.lock().unwrap().is_empty());
        }
    }

    fn mkfifo(p: &std::path::Path) {
        let s = std::process::Command::new("mkfifo")
            .arg(p)
            .status()
            .unwrap();
        assert!(s.success());
    }

    /// Serves `body` to every HTTP request on a loopback port; returns the URL base.
    fn serve(body: Vec<u8>) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf);
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes());
                let _ = s.write_all(&body);
            }
        });
        format!("http://{addr}")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_urls_are_fetched_in_the_background_and_verified() {
        let good = wasm(GOOD);
        let sha = hex::encode(Sha256::digest(&good));
        let base = serve(good.clone());
        let store = Arc::new(ModuleStore::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store.set_on_fetched(Box::new(move |ns| {
            let _ = tx.send(ns);
        }));
        let spec = |sha: &str| WasmPluginSpec {
            url: format!("{base}/p.wasm"),
            sha256: Some(sha.to_string()),
            ..Default::default()
        };
        assert_eq!(store.clone().resolve("ns", &spec(&sha)), Resolved::Pending);
        let ns = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        assert_eq!(ns.as_deref(), Some("ns"));
        assert_eq!(
            store.clone().resolve("ns", &spec(&sha)),
            Resolved::Ready {
                sha256: sha.clone()
            }
        );
        assert_eq!(store.get(&sha).unwrap().as_slice(), good.as_slice());
        // Served bytes that do not match the declared digest are refused.
        let other = "1".repeat(64);
        let store2 = Arc::new(ModuleStore::default());
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store2.set_on_fetched(Box::new(move |ns| {
            let _ = tx.send(ns);
        }));
        assert_eq!(
            store2.clone().resolve("ns", &spec(&other)),
            Resolved::Pending
        );
        tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
            .await
            .unwrap();
        let r = store2.clone().resolve("ns", &spec(&other));
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "DigestMismatch"),
            "{r:?}"
        );
        assert!(store2.get(&other).is_none());
    }

    /// Answers every HTTP request with `head` and then, until the client goes
    /// away, `chunk` over and over; returns the URL base.
    fn serve_endless(head: &'static str, chunk: &'static [u8]) -> String {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        std::thread::spawn(move || {
            for s in l.incoming() {
                let Ok(mut s) = s else { continue };
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf);
                    let _ = s.write_all(head.as_bytes());
                    // Bounded: stops when the client closes, or after 1 GiB.
                    for _ in 0..(1u64 << 30) / chunk.len().max(1) as u64 {
                        if chunk.is_empty() {
                            std::thread::sleep(std::time::Duration::from_millis(50));
                        } else if s.write_all(chunk).is_err() {
                            return;
                        }
                    }
                });
            }
        });
        format!("http://{addr}")
    }

    /// A body past the limit, whether its length is declared or it never ends, is
    /// refused after at most the limit is read; a server that stops sending is given
    /// up on after the read timeout.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn http_bodies_are_bounded_in_size_and_time() {
        static ZEROS: [u8; 64 << 10] = [0; 64 << 10];
        // 64 KiB chunks of zeros, in HTTP/1.1 chunked framing.
        static CHUNKED: std::sync::LazyLock<&'static [u8]> = std::sync::LazyLock::new(|| {
            let mut v = format!("{:x}\r\n", ZEROS.len()).into_bytes();
            v.extend_from_slice(&ZEROS);
            v.extend_from_slice(b"\r\n");
            Vec::leak(v)
        });
        let declared = serve_endless(
            "HTTP/1.1 200 OK\r\ncontent-length: 1073741824\r\n\r\n",
            &ZEROS,
        );
        let endless = serve_endless(
            "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n",
            &CHUNKED,
        );
        let stalled = serve_endless("HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n", b"");
        let sha = Some("a".repeat(64));
        for (base, reason, says) in [
            (declared, "TooLarge", "larger than 32 MiB"),
            (endless, "TooLarge", "larger than 32 MiB"),
            (stalled, "FetchFailed", "imeout"),
        ] {
            let store = Arc::new(ModuleStore {
                read_timeout: std::time::Duration::from_secs(2),
                ..Default::default()
            });
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            store.set_on_fetched(Box::new(move |ns| {
                let _ = tx.send(ns);
            }));
            let url = format!("{base}/p.wasm");
            let r = resolved(&store, &mut rx, &spec(url.clone(), sha.clone())).await;
            let Resolved::Failed(p) = r else {
                panic!("{url}: {r:?}")
            };
            assert_eq!((p.field, p.reason), ("spec.url", reason), "{url}: {p:?}");
            assert!(
                p.message.contains(&url) && p.message.contains(says),
                "{p:?}"
            );
            assert!(store.modules.lock().unwrap().is_empty());
        }
    }

    /// A WasmPlugin at `file:///dev/zero` next to a pod: applying it returns at once,
    /// the pod's identity can still be issued, the other plugin's module is read,
    /// and the bad plugin's status names `spec.url`. (Before, applying read
    /// `/dev/zero` inside the model's lock until memory ran out.)
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_plugin_at_dev_zero_leaves_the_model_serving() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.wasm");
        std::fs::write(&good, wasm(GOOD)).unwrap();
        let store = Arc::new(ModuleStore::default());
        let model = weft_model::Model::new(
            weft_model::ModelConfig {
                trust_domain: weft_proto::spiffe::TrustDomain::new("cluster.local").unwrap(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: "PEM".into(),
                jwt_jwks: String::new(),
                default_identity_fallback: false,
            },
            store.clone(),
        );
        let text = format!(
            r#"
apiVersion: v1
kind: Namespace
metadata: {{name: shop, labels: {{weft.dev/mesh: enabled}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: web-1, namespace: shop, uid: u1, labels: {{app: web}}}}
spec: {{nodeName: node-a, serviceAccountName: web, containers: [{{name: c}}]}}
status: {{podIP: 10.0.1.5}}
---
apiVersion: extensions.weft.dev/v1alpha1
kind: WasmPlugin
metadata: {{name: zero, namespace: shop}}
spec: {{url: "file:///dev/zero"}}
---
apiVersion: extensions.weft.dev/v1alpha1
kind: WasmPlugin
metadata: {{name: good, namespace: shop}}
spec: {{url: "file://{}"}}
"#,
            good.display()
        );
        let (objects, errors) = weft_model::manifest::parse_manifests("t.yaml", &text);
        assert!(errors.is_empty(), "{errors:?}");
        let m = model.clone();
        let apply = tokio::task::spawn_blocking(move || {
            m.apply(weft_model::SourceEvent::Snapshot(objects))
        });
        tokio::time::timeout(std::time::Duration::from_secs(5), apply)
            .await
            .expect("applying the objects blocked")
            .unwrap();
        assert!(model.node_runs_identity("node-a", "spiffe://cluster.local/ns/shop/sa/web"));
        let status = |name: &str| {
            model
                .statuses()
                .into_iter()
                .find(|(r, _)| r.kind == "WasmPlugin" && r.name == name)
                .map(|(_, s)| s.report)
                .unwrap()
        };
        let plugin = |name: &str| {
            model
                .view_of("node-a")
                .into_iter()
                .find_map(|r| match &r.kind {
                    Some(weft_proto::pb::resource::Kind::WasmPlugin(p)) if p.name == name => {
                        Some(p.clone())
                    }
                    _ => None,
                })
        };
        let t = std::time::Instant::now();
        while status("zero").errors.is_empty() || plugin("good").unwrap().sha256.is_empty() {
            assert!(
                t.elapsed() < std::time::Duration::from_secs(10),
                "{:?} {:?}",
                status("zero"),
                plugin("good")
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let e = &status("zero").errors;
        assert_eq!(e.len(), 1, "{e:?}");
        assert_eq!(e[0].field, "spec.url");
        assert_eq!(
            e[0].message,
            "NotRegularFile: file:///dev/zero: is a character device; a module must be a regular file"
        );
        // Distributed with its error, so nodes apply its failStrategy.
        assert!(plugin("zero")
            .unwrap()
            .module_error
            .contains("NotRegularFile"));
        let good = plugin("good").unwrap();
        assert!(good.module_error.is_empty(), "{good:?}");
        assert!(store.get(&good.sha256).is_some());
        assert!(status("good").errors.is_empty());
    }
}
