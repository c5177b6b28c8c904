//! Proxy-Wasm plugins (ABI 0.2.1 and 0.2.0, HTTP subset) on wasmtime.
//!
//! - [`engine`]: the engine, its epoch ticker and the compiled-module cache;
//! - [`abi`]: the host functions plugins import (`env.proxy_*`, WASI stubs);
//! - [`headers`]: a message's headers as plugins see and change them;
//! - [`custom_metrics`]: the metrics plugins define (the metrics ABI);
//! - [`shared`]: the data and queues a plugin's instances on a node share;
//! - [`timers`]: the instances' tick periods (`proxy_on_tick`);
//! - [`noop`]: exported callbacks that do nothing, which the host does not call;
//! - [`vm`]: one plugin instance (a Store) and its lifecycle calls, each with a CPU
//!   deadline and a memory cap;
//! - [`plugin`]: a configured plugin (one instance per proxy worker), its fail
//!   strategy, crash-loop limiting and recycling;
//! - [`chain`]: the plugins that apply to one request, in phase and priority order.

pub mod abi;
pub mod chain;
pub mod custom_metrics;
pub mod engine;
pub mod headers;
pub mod metrics;
pub mod noop;
pub mod plugin;
pub mod registry;
pub mod shared;
#[cfg(test)]
pub(crate) mod tests;
pub mod timers;
pub mod vm;

use thiserror::Error;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WasmError {
    #[error("wasm engine: {0}")]
    Engine(String),
    #[error("module does not compile: {0}")]
    Compile(String),
    #[error("module does not implement the Proxy-Wasm ABI: {0}")]
    Abi(String),
    #[error("instantiation failed: {0}")]
    Instantiate(String),
    #[error("plugin refused its configuration (proxy_on_configure returned false)")]
    Configure,
    #[error("plugin exceeded its CPU deadline of {0} ms in {1}")]
    Deadline(u64, &'static str),
    #[error("plugin exceeded its memory limit of {0} bytes")]
    Memory(u64),
    #[error("plugin called proc_exit({0})")]
    Exit(i32),
    #[error("plugin trapped in {0}: {1}")]
    Trap(&'static str, String),
    #[error("plugin paused the stream, which this host cannot resume")]
    Paused,
    #[error("module not available: {0}")]
    Unavailable(String),
}

impl WasmError {
    /// Metric label for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            WasmError::Engine(_) | WasmError::Instantiate(_) => "instantiate",
            WasmError::Compile(_) => "compile",
            WasmError::Abi(_) => "abi",
            WasmError::Configure => "configure",
            WasmError::Deadline(..) => "deadline",
            WasmError::Memory(_) => "memory",
            WasmError::Exit(_) => "proc_exit",
            WasmError::Trap(..) => "trap",
            WasmError::Paused => "paused",
            WasmError::Unavailable(_) => "unavailable",
        }
    }
}
