//! The node's plugins: built from the WasmPlugin resources in its config, with
//! module bytes fetched from the control plane (`Modules.Fetch`) by sha256 and
//! cached on disk (`<state-dir>/wasm/<sha256>.wasm`, verified on every load).
//! A plugin whose spec is unchanged keeps its instances across config updates; a
//! changed one (config, module, limits) gets new ones, so configuration changes
//! apply without restarting the node.

use super::engine::WasmEngine;
use super::plugin::Plugin;
use super::WasmError;
use crate::config::ConfigStore;
use futures::future::BoxFuture;
use sha2::{Digest, Sha256};
use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use weft_proto::pb;

/// Fetches a module's bytes by sha256.
pub type FetchFn = Arc<dyn Fn(String) -> BoxFuture<'static, anyhow::Result<Vec<u8>>> + Send + Sync>;

pub struct PluginRegistry {
    /// Started with the first plugin: a node without plugins runs no compiler and
    /// no epoch ticker.
    engine: OnceLock<Result<Arc<WasmEngine>, WasmError>>,
    workers: usize,
    cache_dir: Option<PathBuf>,
    fetch: FetchFn,
    plugins: RwLock<Arc<HashMap<String, Arc<Plugin>>>>,
    modules: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    fetching: Mutex<HashSet<String>>,
    /// Wakes the sync loop when a fetch ends.
    fetched: tokio::sync::Notify,
    /// Each plugin's shared data and queues, kept across its reconfigurations
    /// and dropped with it.
    shared: Mutex<HashMap<String, Arc<super::shared::Shared>>>,
}

impl PluginRegistry {
    pub fn new(workers: usize, cache_dir: Option<PathBuf>, fetch: FetchFn) -> Arc<Self> {
        Arc::new(Self {
            engine: OnceLock::new(),
            workers,
            cache_dir,
            fetch,
            plugins: RwLock::new(Arc::default()),
            modules: Mutex::new(HashMap::new()),
            fetching: Mutex::new(HashSet::new()),
            fetched: tokio::sync::Notify::new(),
            shared: Mutex::new(HashMap::new()),
        })
    }

    /// The shared engine, started on first use.
    fn engine(&self) -> Result<&Arc<WasmEngine>, WasmError> {
        self.engine
            .get_or_init(|| {
                let e = WasmEngine::for_workers(self.workers);
                if let Err(err) = &e {
                    tracing::error!(error = %err, "the wasm engine cannot start: every plugin fails closed");
                }
                e
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// All current plugins.
    pub fn all(&self) -> Arc<HashMap<String, Arc<Plugin>>> {
        self.plugins
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Plugins for a request to `w` on `port`, in execution order.
    pub fn for_workload(&self, w: &pb::Workload, port: u16) -> Vec<Arc<Plugin>> {
        let all = self.all();
        if all.is_empty() {
            return Vec::new();
        }
        let mut v: Vec<Arc<Plugin>> = all
            .values()
            .filter(|p| {
                p.spec.namespace == w.namespace
                    && p.spec
                        .selector
                        .iter()
                        .all(|(k, v)| w.labels.get(k) == Some(v))
                    && (p.spec.ports.is_empty() || p.spec.ports.contains(&u32::from(port)))
            })
            .cloned()
            .collect();
        super::chain::order(&mut v);
        v
    }

    /// Keeps the plugins in step with the config, forever.
    pub async fn run(self: Arc<Self>, config: Arc<ConfigStore>) {
        let mut changes = config.watch();
        loop {
            self.sync(&config.snapshot().plugins);
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = self.fetched.notified() => {}
            }
        }
    }

    fn cached(&self, sha: &str) -> Option<Arc<Vec<u8>>> {
        if let Some(b) = self
            .modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha)
        {
            return Some(b.clone());
        }
        let path = self.cache_dir.as_ref()?.join(format!("{sha}.wasm"));
        let bytes = std::fs::read(&path).ok()?;
        if hex::encode(Sha256::digest(&bytes)) != sha {
            tracing::warn!(path = %path.display(), "cached wasm module does not match its digest; fetching again");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        let b = Arc::new(bytes);
        self.modules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.to_string(), b.clone());
        Some(b)
    }

    fn start_fetch(self: &Arc<Self>, sha: String) {
        if !self
            .fetching
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(sha.clone())
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let mut delay = std::time::Duration::from_millis(200);
            loop {
                match (me.fetch)(sha.clone()).await {
                    Ok(bytes) if hex::encode(Sha256::digest(&bytes)) == sha => {
                        if let Some(dir) = &me.cache_dir {
                            let _ = std::fs::create_dir_all(dir);
                            let tmp = dir.join(format!("{sha}.tmp"));
                            if std::fs::write(&tmp, &bytes).is_ok() {
                                let _ = std::fs::rename(&tmp, dir.join(format!("{sha}.wasm")));
                            }
                        }
                        me.modules
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(sha.clone(), Arc::new(bytes));
                        tracing::info!(%sha, "wasm module fetched from the control plane");
                        break;
                    }
                    Ok(_) => {
                        tracing::warn!(%sha, "module from the control plane does not match its digest")
                    }
                    Err(e) => {
                        tracing::warn!(%sha, error = %format!("{e:#}"), "fetching a wasm module failed; retrying")
                    }
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(std::time::Duration::from_secs(30));
            }
            me.fetching
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&sha);
            me.fetched.notify_one();
        });
    }

    fn sync(self: &Arc<Self>, wanted: &imbl::OrdMap<String, Arc<pb::WasmPlugin>>) {
        let old = self.all();
        let mut next = HashMap::with_capacity(wanted.len());
        let mut changed = old.len() != wanted.len();
        for spec in wanted.values() {
            let id = format!("{}/{}", spec.namespace, spec.name);
            if let Some(p) = old.get(&id) {
                if p.spec == **spec && !p.waiting_for_module {
                    next.insert(id, p.clone());
                    continue;
                }
            }
            changed = true;
            let mut waiting = false;
            let bytes: Result<Arc<Vec<u8>>, WasmError> = if !spec.module_error.is_empty() {
                Err(WasmError::Unavailable(spec.module_error.clone()))
            } else if let Some(b) = self.cached(&spec.sha256) {
                Ok(b)
            } else {
                self.start_fetch(spec.sha256.clone());
                waiting = true;
                Err(WasmError::Unavailable("the module is being fetched".into()))
            };
            let shared = self
                .shared
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id.clone())
                .or_default()
                .clone();
            let mut plugin = Plugin::new(
                self.engine(),
                (**spec).clone(),
                bytes.as_deref().map(Vec::as_slice).map_err(Clone::clone),
                self.workers,
                shared,
            );
            plugin.waiting_for_module = waiting;
            tracing::info!(plugin = %id, phase = ?plugin.phase, priority = plugin.priority, error = ?plugin.load_error().map(ToString::to_string), "wasm plugin configured");
            let plugin = Arc::new(plugin);
            if plugin.load_error().is_none() {
                tokio::spawn(Plugin::drive(Arc::downgrade(&plugin)));
            }
            next.insert(id, plugin);
        }
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|id, _| next.contains_key(id));
        if changed {
            *self.plugins.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }
    }
}
