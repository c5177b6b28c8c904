//! The shared wasmtime engine: one per process, with an epoch ticker that bounds
//! the time of every plugin callback, and compiled modules cached by sha256.

use super::WasmError;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;
use wasmtime::{Config, Engine, Module, OptLevel};

/// How often the epoch advances: a callback's deadline is counted in these ticks.
pub const TICK: Duration = Duration::from_millis(1);

pub use weft_api::wasm_abi::AbiVersion;

/// A compiled module and what the host needs to know about it.
pub struct CompiledModule {
    pub module: Module,
    pub sha256: String,
    pub abi: AbiVersion,
}

pub struct WasmEngine {
    engine: Engine,
    modules: Mutex<HashMap<String, Weak<CompiledModule>>>,
}

impl WasmEngine {
    /// Creates the engine and starts its epoch ticker (a thread that lives as long as
    /// the engine).
    pub fn new() -> Result<Arc<Self>, WasmError> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            // Plugins are untrusted: keep the defaults that bound native stack use.
            .max_wasm_stack(512 << 10);
        let engine = Engine::new(&cfg).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let me = Arc::new(Self {
            engine,
            modules: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&me);
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || loop {
                std::thread::sleep(TICK);
                match weak.upgrade() {
                    Some(e) => e.engine.increment_epoch(),
                    None => return,
                }
            })
            .map_err(|e| WasmError::Engine(format!("epoch thread: {e}")))?;
        Ok(me)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// Compiles `bytes` (once per sha256 while any plugin uses it) and checks the
    /// Proxy-Wasm exports.
    pub fn compile(&self, sha256: &str, bytes: &[u8]) -> Result<Arc<CompiledModule>, WasmError> {
        let mut cache = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(m) = cache.get(sha256).and_then(Weak::upgrade) {
            return Ok(m);
        }
        let module =
            Module::new(&self.engine, bytes).map_err(|e| WasmError::Compile(format!("{e:#}")))?;
        let abi = check_exports(&module)?;
        let m = Arc::new(CompiledModule {
            module,
            sha256: sha256.to_string(),
            abi,
        });
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(sha256.to_string(), Arc::downgrade(&m));
        Ok(m)
    }
}

/// The exports every Proxy-Wasm HTTP plugin must have.
fn check_exports(module: &Module) -> Result<AbiVersion, WasmError> {
    weft_api::wasm_abi::check_exports(module.exports().map(|e| e.name())).map_err(WasmError::Abi)
}
