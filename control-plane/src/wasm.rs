//! Wasm plugin modules: resolved from a WasmPlugin's `url`, admitted (digest,
//! validation, Proxy-Wasm exports), and kept by sha256 for nodes to fetch over gRPC.
//!
//! `file://` modules are read when the plugin is derived. `http(s)://` modules are
//! fetched in the background (the `sha256` is then required); while a fetch is in
//! flight, or after it failed, the plugin is distributed with `module_error` set,
//! so nodes apply its failStrategy instead of silently skipping it. A failed fetch is
//! retried after `RETRY`. Nodes never reach the internet: only the control plane
//! fetches.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_model::modules::{ModuleProblem, ModuleSource, Resolved};
use weft_proto::crd::WasmPluginSpec;

/// Largest module accepted.
pub const MAX_MODULE_BYTES: usize = 32 << 20;
const RETRY: Duration = Duration::from_secs(30);

enum Fetch {
    InFlight,
    Failed(ModuleProblem, Instant),
}

type Refresh = Box<dyn Fn(String) + Send + Sync>;

#[derive(Default)]
pub struct ModuleStore {
    modules: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    fetches: Mutex<HashMap<String, Fetch>>,
    on_fetched: Mutex<Option<Arc<Refresh>>>,
}

fn problem(field: &'static str, reason: &'static str, message: impl Into<String>) -> ModuleProblem {
    ModuleProblem {
        field,
        reason,
        message: message.into(),
    }
}

/// Checks bytes against the declared digest, validates the module and its exports.
pub fn admit(bytes: &[u8], declared: Option<&str>) -> Result<String, ModuleProblem> {
    let sha = hex::encode(Sha256::digest(bytes));
    if let Some(d) = declared {
        if !d.eq_ignore_ascii_case(&sha) {
            return Err(problem(
                "spec.sha256",
                "DigestMismatch",
                format!("the module's sha256 is {sha}, not {d}"),
            ));
        }
    }
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

impl ModuleStore {
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

    /// Resolves the module of a plugin in namespace `ns`.
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
            let bytes = match std::fs::read(path) {
                Ok(b) => b,
                Err(e) => {
                    return Resolved::Failed(problem(
                        "spec.url",
                        "FetchFailed",
                        format!("reading {path}: {e}"),
                    ))
                }
            };
            if bytes.len() > MAX_MODULE_BYTES {
                return Resolved::Failed(problem(
                    "spec.url",
                    "FetchFailed",
                    format!("{path} is larger than {MAX_MODULE_BYTES} bytes"),
                ));
            }
            return match admit(&bytes, declared) {
                Ok(sha) => {
                    self.keep(&sha, bytes);
                    Resolved::Ready { sha256: sha }
                }
                Err(p) => Resolved::Failed(p),
            };
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
            let mut fetches = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            match fetches.get(url) {
                Some(Fetch::InFlight) => return Resolved::Pending,
                Some(Fetch::Failed(p, at)) if at.elapsed() < RETRY => {
                    return Resolved::Failed(p.clone())
                }
                _ => {}
            }
            fetches.insert(url.to_string(), Fetch::InFlight);
            drop(fetches);
            self.spawn_fetch(ns.to_string(), url.to_string(), d);
            return Resolved::Pending;
        }
        Resolved::Failed(problem(
            "spec.url",
            "UnsupportedUrl",
            format!("{url:?}: only file:// and http(s):// are supported (oci:// is not yet)"),
        ))
    }

    fn spawn_fetch(self: &Arc<Self>, ns: String, url: String, sha: String) {
        let me = self.clone();
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            let mut f = self.fetches.lock().unwrap_or_else(|p| p.into_inner());
            f.insert(
                url,
                Fetch::Failed(
                    problem("spec.url", "FetchFailed", "no runtime to fetch on"),
                    Instant::now(),
                ),
            );
            return;
        };
        rt.spawn(async move {
            let u = url.clone();
            let got = tokio::task::spawn_blocking(move || download(&u)).await;
            let result = match got {
                Ok(Ok(bytes)) => admit(&bytes, Some(&sha)).map(|s| (s, bytes)),
                Ok(Err(p)) => Err(p),
                Err(e) => Err(problem(
                    "spec.url",
                    "FetchFailed",
                    format!("fetch task failed: {e}"),
                )),
            };
            {
                let mut f = me.fetches.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok((s, bytes)) => {
                        tracing::info!(%url, sha256 = %s, "wasm module fetched");
                        me.keep(&s, bytes);
                        f.remove(&url);
                    }
                    Err(p) => {
                        tracing::warn!(%url, error = %p.message, "wasm module fetch failed");
                        f.insert(url, Fetch::Failed(p, Instant::now()));
                    }
                }
            }
            let cb = me
                .on_fetched
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            if let Some(cb) = cb {
                cb(ns);
            }
        });
    }
}

fn download(url: &str) -> Result<Vec<u8>, ModuleProblem> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
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
        .map_err(|e| problem("spec.url", "FetchFailed", format!("reading {url}: {e}")))
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
mod tests {
    use super::*;

    fn wasm(exports: &str) -> Vec<u8> {
        // A tiny module in binary form, built from text by hand-assembled bytes is
        // overkill: use the text format via wasmparser's sibling crate in dev-deps.
        wat::parse_str(format!("(module (memory (export \"memory\") 1) {exports})")).unwrap()
    }

    const GOOD: &str = r#"(func (export "proxy_abi_version_0_2_1"))
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

    #[test]
    fn file_urls() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.wasm");
        std::fs::write(&p, wasm(GOOD)).unwrap();
        let store = Arc::new(ModuleStore::default());
        let spec = |url: String, sha: Option<String>| WasmPluginSpec {
            url,
            sha256: sha,
            ..Default::default()
        };
        let r = store
            .clone()
            .resolve("ns", &spec(format!("file://{}", p.display()), None));
        let Resolved::Ready { sha256 } = r else {
            panic!("{r:?}")
        };
        assert_eq!(
            store.get(&sha256).unwrap().as_slice(),
            wasm(GOOD).as_slice()
        );
        let r = store.clone().resolve(
            "ns",
            &spec(format!("file://{}", p.display()), Some("a".repeat(64))),
        );
        assert!(
            matches!(r, Resolved::Failed(ref p) if p.reason == "DigestMismatch"),
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
            .resolve("ns", &spec("oci://registry/plugin:1".into(), None));
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
}
