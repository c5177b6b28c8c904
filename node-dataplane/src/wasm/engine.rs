//! The shared wasmtime engine: one per process, with an epoch ticker that bounds
//! the time of every plugin callback, and compiled modules cached by sha256.
//!
//! Each call into plugin code records when it started and its deadline. When the
//! epoch advances, every call still running checks its own elapsed time: one past
//! its deadline traps, any other continues to the next tick. So a tick can never
//! cut a call short, and the ticker need not tick often:
//!
//! - every [`TICK`] (10 ms) while calls come and go: callbacks take microseconds,
//!   so one is rarely caught running;
//! - every [`FINE_TICK`] (1 ms) once a tick finds one running, until none is. A
//!   call that is still running when the next tick comes is stopped within 1 ms of
//!   its deadline, or at that tick if its deadline is shorter than 10 ms and already
//!   past;
//! - parked after a second with no plugin code running, so an idle node does not
//!   wake up at all; the next call into plugin code wakes it before the call starts.
//!
//! At 1 ms ticks throughout, an agent serving plugin traffic woke a thousand times
//! a second, and on a shared core each wake-up preempted the request path.
//!
//! Plugin code runs on the proxy's async worker threads, inline in the request
//! path (a thread hop per callback would cost more than the callbacks). A deadline
//! alone does not keep a plugin from stalling other pods' traffic: a callback that
//! runs to its deadline (up to a second) holds its worker that long, and every
//! worker can be held at once. So [`Lanes`] bounds where plugin code runs:
//!
//! - at most one worker fewer than the runtime has may be inside plugin code inline
//!   at once (at least one): a call that finds them all busy runs *off* its worker
//!   ([`off_worker`]: tokio moves the worker's other tasks to another thread for
//!   as long as the call lasts);
//! - a plugin caught running a call past [`SLOW_CALL`] (by an epoch tick) runs its
//!   next [`SLOW_CALLS_OFF_WORKER`] calls off the workers too, one at a time per
//!   plugin, so a runaway plugin holds at most one core and no worker;
//! - at most [`MAX_OFF_WORKER`] requests through slow plugins are in flight on a
//!   node (and twice a plugin's instance count per plugin); past that a request
//!   is answered by the plugin's failStrategy at once (FAIL_OPEN: skipped; else 503).

use super::WasmError;
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::Duration;
use wasmtime::{Config, Engine, Module, OptLevel};

/// How often the epoch advances while no plugin code was seen running.
pub const TICK: Duration = Duration::from_millis(10);

/// How often the epoch advances while plugin code was running at the last tick.
pub const FINE_TICK: Duration = Duration::from_millis(1);

/// Ticks with no plugin code running after which the ticker parks (1 s).
const PARK_AFTER_TICKS: u32 = 100;

/// A call still running this long after it started, when a tick comes, marks its
/// plugin slow. Callbacks take microseconds.
pub const SLOW_CALL: Duration = Duration::from_millis(2);

/// Calls a plugin makes off the workers after it was last caught slow, before it
/// runs inline again (each one caught slow starts the count again).
pub const SLOW_CALLS_OFF_WORKER: u32 = 1000;

/// Requests through slow plugins in flight at once on a node, at most.
pub const MAX_OFF_WORKER: usize = 64;

/// Where plugin code may run: see the module's documentation.
pub struct Lanes {
    /// Calls into plugin code running inline on a worker thread.
    inline: AtomicUsize,
    /// At most this many at once: one worker fewer than the runtime has, at least 1.
    inline_limit: usize,
    /// Requests through slow plugins in flight, node-wide.
    off_worker: AtomicUsize,
}

/// One inline call into plugin code (see [`Lanes::try_inline`]).
pub struct Inline<'a>(&'a AtomicUsize);

impl Drop for Inline<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, SeqCst);
    }
}

impl Lanes {
    /// Lanes for a runtime with `workers` async worker threads.
    pub fn new(workers: usize) -> Self {
        Self {
            inline: AtomicUsize::new(0),
            inline_limit: workers.saturating_sub(1).max(1),
            off_worker: AtomicUsize::new(0),
        }
    }

    /// A place to run plugin code inline on this thread, if fewer than the limit
    /// of workers are in plugin code.
    pub fn try_inline(&self) -> Option<Inline<'_>> {
        if self.inline.fetch_add(1, SeqCst) < self.inline_limit {
            Some(Inline(&self.inline))
        } else {
            self.inline.fetch_sub(1, SeqCst);
            None
        }
    }

    /// Counts a request through a slow plugin, unless [`MAX_OFF_WORKER`] are in
    /// flight.
    pub fn try_off_worker(&self) -> bool {
        if self.off_worker.fetch_add(1, SeqCst) < MAX_OFF_WORKER {
            true
        } else {
            self.off_worker.fetch_sub(1, SeqCst);
            false
        }
    }

    /// A request counted by [`Lanes::try_off_worker`] has ended.
    pub fn end_off_worker(&self) {
        self.off_worker.fetch_sub(1, SeqCst);
    }
}

/// Runs `f`, which may take long, without holding the async worker thread it is
/// called on: tokio hands the worker's other tasks to another thread for as long
/// as `f` runs (`block_in_place`). Where there is no multi-threaded runtime (a
/// plain thread, a test's single-threaded runtime), `f` just runs.
pub fn off_worker<R>(f: impl FnOnce() -> R) -> R {
    match tokio::runtime::Handle::try_current() {
        Ok(h) if h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// Whether the epoch must advance: calls into plugin code in progress, and how long
/// none has been.
#[derive(Default)]
pub struct Ticker {
    running: AtomicUsize,
    idle_ticks: AtomicU32,
    parked: AtomicBool,
    stop: AtomicBool,
    lock: Mutex<()>,
    wake: Condvar,
}

/// Plugin code may run while this lives (see [`Ticker::enter`]).
pub struct Running<'a>(&'a Ticker);

impl Ticker {
    /// Marks plugin code as running (instantiation or a callback) until the guard
    /// drops, waking the ticker first if it is parked, so the call's deadline ticks.
    pub fn enter(&self) -> Running<'_> {
        // With `park_if_idle`: each side writes its flag, then reads the other's (SeqCst),
        // so at least one of them sees the other: either this call wakes the ticker or
        // the ticker sees the call and does not park.
        self.running.fetch_add(1, SeqCst);
        // Calls shorter than a tick are never seen running: they count as activity.
        self.idle_ticks.store(0, SeqCst);
        if self.parked.load(SeqCst) {
            let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
            self.parked.store(false, SeqCst);
            self.wake.notify_one();
        }
        Running(self)
    }

    #[cfg(test)]
    /// Is the ticker asleep (no plugin code ran for a while)?
    pub fn is_parked(&self) -> bool {
        self.parked.load(SeqCst)
    }

    /// Called by the ticker after each tick: parks while no plugin code runs, once
    /// none has for [`PARK_AFTER_TICKS`]. Returns whether plugin code is running
    /// (tick finely), or `None` when the engine is gone.
    fn park_if_idle(&self) -> Option<bool> {
        if self.running.load(SeqCst) > 0 {
            self.idle_ticks.store(0, SeqCst);
            return Some(true);
        }
        if self.idle_ticks.fetch_add(1, SeqCst) + 1 < PARK_AFTER_TICKS {
            return Some(false);
        }
        let mut g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.parked.store(true, SeqCst);
        if self.running.load(SeqCst) > 0 {
            self.parked.store(false, SeqCst);
            return Some(true);
        }
        while self.parked.load(SeqCst) && !self.stop.load(SeqCst) {
            g = self.wake.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        self.idle_ticks.store(0, SeqCst);
        // Woken by a call: it is running now.
        (!self.stop.load(SeqCst)).then_some(true)
    }

    fn stop(&self) {
        let _g = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        self.stop.store(true, SeqCst);
        self.wake.notify_one();
    }
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, SeqCst);
    }
}

pub use weft_proto::wasm_abi::AbiVersion;

/// A compiled module and what the host needs to know about it.
pub struct CompiledModule {
    pub module: Module,
    pub abi: AbiVersion,
    /// Exported functions that do nothing (see [`super::noop`]).
    pub no_ops: HashSet<String>,
}

pub struct WasmEngine {
    engine: Engine,
    ticker: Arc<Ticker>,
    lanes: Lanes,
    modules: Mutex<HashMap<String, Weak<CompiledModule>>>,
}

impl Drop for WasmEngine {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

impl WasmEngine {
    /// [`WasmEngine::for_workers`] with one worker per CPU (tests and benchmarks).
    #[cfg(any(test, feature = "testing"))]
    pub fn new() -> Result<Arc<Self>, WasmError> {
        Self::for_workers(std::thread::available_parallelism().map_or(1, |n| n.get()))
    }

    /// Creates the engine for a proxy with `workers` async worker threads, and starts
    /// its epoch ticker (a thread that lives as long as the engine).
    pub fn for_workers(workers: usize) -> Result<Arc<Self>, WasmError> {
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .cranelift_opt_level(OptLevel::Speed)
            // Plugins are untrusted: keep the defaults that bound native stack use.
            .max_wasm_stack(512 << 10);
        let engine = Engine::new(&cfg).map_err(|e| WasmError::Engine(format!("{e:#}")))?;
        let me = Arc::new(Self {
            engine,
            ticker: Arc::default(),
            lanes: Lanes::new(workers),
            modules: Mutex::new(HashMap::new()),
        });
        let weak = Arc::downgrade(&me);
        let ticker = me.ticker.clone();
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                let mut period = TICK;
                loop {
                    std::thread::sleep(period);
                    match weak.upgrade() {
                        Some(e) => e.engine.increment_epoch(),
                        None => return,
                    }
                    period = match ticker.park_if_idle() {
                        None => return,
                        Some(true) => FINE_TICK,
                        Some(false) => TICK,
                    };
                }
            })
            .map_err(|e| WasmError::Engine(format!("epoch thread: {e}")))?;
        Ok(me)
    }

    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// The epoch ticker: plugin code must run inside [`Ticker::enter`].
    pub fn ticker(&self) -> &Arc<Ticker> {
        &self.ticker
    }

    /// Where plugin code may run.
    pub fn lanes(&self) -> &Lanes {
        &self.lanes
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
        let no_ops = super::noop::no_op_exports(bytes)
            .map_err(|e| WasmError::Compile(format!("reading the module's code: {e}")))?;
        let m = Arc::new(CompiledModule {
            module,
            abi,
            no_ops,
        });
        cache.retain(|_, w| w.strong_count() > 0);
        cache.insert(sha256.to_string(), Arc::downgrade(&m));
        Ok(m)
    }
}

/// The exports every Proxy-Wasm HTTP plugin must have.
fn check_exports(module: &Module) -> Result<AbiVersion, WasmError> {
    weft_proto::wasm_abi::check_exports(module.exports().map(|e| e.name())).map_err(WasmError::Abi)
}
