//! A configured plugin: its compiled module, one instance slot per proxy worker,
//! and what happens when an instance fails (`failStrategy`):
//!
//! - `FAIL_CLOSE` (default): the failing request gets a 500 and every later request
//!   a 503 until the plugin's configuration (or module) changes. A module that does
//!   not load fails every request with 503.
//! - `FAIL_OPEN`: the failing request, and any while the plugin cannot run, skip
//!   the plugin; a new instance is started, with crash loops rate-limited.
//! - `FAIL_RELOAD`: the failing request gets a 500; a new instance is started for the
//!   next one, with crash loops rate-limited (503 while waiting).
//!
//! An instance whose linear memory grew past 3/4 of its cap is recycled when it has
//! no request in flight.
//!
//! Calls run inline on the proxy's worker thread unless the engine's [`Lanes`]
//! say otherwise (see [`super::engine`]): a plugin caught slow runs off the
//! workers, one call at a time, and a request that finds too many requests through
//! slow plugins in flight is answered by the failStrategy at once.

use super::abi::{HostState, HttpState, LocalReply, VmSettings};
use super::engine::{off_worker, CompiledModule, Lanes, WasmEngine};
use super::vm::{Action, Vm};
use super::WasmError;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use weft_proto::pb;
use weft_proto::wasm_abi as abi_limits;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailStrategy {
    Close,
    Open,
    Reload,
}

impl FailStrategy {
    pub fn parse(s: &str) -> Self {
        match s {
            "FAIL_OPEN" => FailStrategy::Open,
            "FAIL_RELOAD" => FailStrategy::Reload,
            _ => FailStrategy::Close,
        }
    }
}

/// Order of phases in the request path; weft's own L7 authorization runs between
/// AUTHZ and STATS (as Istio places its RBAC filter).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Phase {
    Authn = 0,
    Authz = 1,
    Stats = 2,
    Unspecified = 3,
}

impl Phase {
    pub fn parse(s: &str) -> Self {
        match s {
            "AUTHN" => Phase::Authn,
            "AUTHZ" => Phase::Authz,
            "STATS" => Phase::Stats,
            _ => Phase::Unspecified,
        }
    }
    /// Runs before weft's L7 authorization?
    pub fn before_authz(self) -> bool {
        self <= Phase::Authz
    }
}

/// Outcome of one plugin for one request.
#[derive(Debug)]
pub enum Outcome {
    Continue,
    Reply(LocalReply),
    /// The plugin could not run and fails open.
    Skipped,
}

/// What a plugin answered when asked whether it reads a body
/// ([`Plugin::probe_body`]).
#[derive(Debug)]
pub enum Probe {
    Wants,
    Ignores,
    Reply(LocalReply),
}

/// Where a request's context lives, for its later callbacks.
#[derive(Debug, Clone, Copy)]
pub struct Handle {
    slot: usize,
    generation: u64,
    ctx: i32,
    /// Counted as a request through a slow plugin until it finishes.
    off_worker: bool,
}

struct Slot {
    vm: Option<Vm>,
    generation: u64,
    /// Crash-loop limiting: no new instance before this.
    not_before: Option<Instant>,
    backoff: Duration,
}

/// Counters the node exports per plugin.
#[derive(Debug, Default)]
pub struct PluginStats {
    pub calls: AtomicUsize,
    pub local_replies: AtomicUsize,
    pub skipped: AtomicUsize,
    pub failed_requests: AtomicUsize,
    pub restarts: AtomicUsize,
    pub recycled: AtomicUsize,
    /// Requests answered by the failStrategy because too many requests through
    /// slow plugins were in flight.
    pub overloaded: AtomicUsize,
    /// Times the plugin was caught running a call past the slow threshold.
    pub caught_slow: AtomicUsize,
    /// `proxy_on_tick` calls.
    pub ticks: AtomicUsize,
    /// `proxy_on_queue_ready` calls.
    pub queue_notifications: AtomicUsize,
    /// Errors by kind ("trap", "deadline", "memory", "proc_exit", ...).
    pub errors: Mutex<std::collections::BTreeMap<&'static str, u64>>,
    pub last_error: Mutex<Option<String>>,
    pub memory_bytes: AtomicUsize,
}

pub struct Plugin {
    /// `namespace/name`.
    pub id: String,
    pub spec: pb::WasmPlugin,
    pub phase: Phase,
    pub priority: i32,
    pub fail: FailStrategy,
    settings: VmSettings,
    module: Result<(Arc<CompiledModule>, wasmtime::InstancePre<HostState>), WasmError>,
    slots: Vec<Mutex<Slot>>,
    next: AtomicUsize,
    /// Keeps the engine (and its epoch ticker, which bounds callbacks) alive.
    engine: Option<Arc<WasmEngine>>,
    /// FAIL_CLOSE: set after a runtime failure; every later request is refused.
    failed: Mutex<Option<WasmError>>,
    /// `failed` is set: requests check this flag, not the lock.
    has_failed: AtomicBool,
    /// Built before its module arrived: replaced once it has.
    pub waiting_for_module: bool,
    /// The module has a `proxy_on_request_body` that does something: requests
    /// with a body are buffered for it.
    has_request_body_callback: bool,
    /// The same for `proxy_on_response_body` and responses.
    has_response_body_callback: bool,
    pub stats: PluginStats,
    /// Calls still to run off the workers since the plugin was last caught slow.
    slow_calls: AtomicU32,
    /// A slow plugin's calls run one at a time, off the workers.
    slow_gate: Mutex<()>,
    /// Requests through this plugin in flight while it is slow.
    off_worker: AtomicUsize,
}

impl Drop for Plugin {
    fn drop(&mut self) {
        // Its driver ends once it finds the plugin gone.
        self.settings.timers.wake.notify_one();
    }
}

const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

impl Plugin {
    /// The metrics the plugin defined (the metrics ABI).
    pub fn custom_metrics(&self) -> &super::custom_metrics::CustomMetrics {
        &self.settings.metrics
    }

    /// The plugin's shared data and queues on this node.
    pub fn shared(&self) -> &Arc<super::shared::Shared> {
        &self.settings.shared
    }

    /// `module` is the module bytes (already checked against `spec.sha256`), or why
    /// they are not available. `shared` is the plugin's shared data, kept across
    /// its reconfigurations.
    pub fn new(
        engine: Result<&Arc<WasmEngine>, WasmError>,
        spec: pb::WasmPlugin,
        module: Result<&[u8], WasmError>,
        workers: usize,
        shared: Arc<super::shared::Shared>,
    ) -> Self {
        let settings = VmSettings {
            plugin_name: spec.name.clone(),
            root_id: spec.plugin_name.clone(),
            plugin_config: spec.plugin_config.clone().into_bytes(),
            // The control plane refuses limits out of range; a node never goes past
            // them either.
            max_memory: match spec.max_memory_bytes {
                0 => abi_limits::DEFAULT_MEMORY_BYTES,
                m => m.min(abi_limits::MAX_MEMORY_BYTES),
            },
            deadline_ms: match spec.max_cpu_millis_per_callback {
                0 => abi_limits::DEFAULT_CPU_MILLIS_PER_CALLBACK,
                ms => ms.min(abi_limits::MAX_CPU_MILLIS_PER_CALLBACK),
            },
            metrics: Default::default(),
            shared,
            timers: Arc::new(super::timers::Timers::new(workers)),
        };
        let module = engine.clone().and_then(|engine| {
            let bytes = module?;
            let m = engine.compile(&spec.sha256, bytes)?;
            let linker = super::abi::linker(engine.engine(), &m.module).map_err(WasmError::Abi)?;
            let pre = linker
                .instantiate_pre(&m.module)
                .map_err(|e| WasmError::Instantiate(format!("{e:#}")))?;
            Ok((m, pre))
        });
        if let Err(e) = &module {
            tracing::warn!(plugin = %format!("{}/{}", spec.namespace, spec.name), error = %e, "wasm plugin cannot be loaded");
        }
        let exports = |name: &str| {
            module
                .as_ref()
                .is_ok_and(|(m, _)| m.module.get_export(name).is_some() && !m.no_ops.contains(name))
        };
        let has_request_body_callback = exports("proxy_on_request_body");
        let has_response_body_callback = exports("proxy_on_response_body");
        Self {
            id: format!("{}/{}", spec.namespace, spec.name),
            phase: Phase::parse(&spec.phase),
            priority: spec.priority,
            fail: FailStrategy::parse(&spec.fail_strategy),
            settings,
            module,
            slots: (0..workers.max(1))
                .map(|_| {
                    Mutex::new(Slot {
                        vm: None,
                        generation: 0,
                        not_before: None,
                        backoff: MIN_BACKOFF,
                    })
                })
                .collect(),
            next: AtomicUsize::new(0),
            engine: engine.ok().cloned(),
            failed: Mutex::new(None),
            has_failed: AtomicBool::new(false),
            waiting_for_module: false,
            has_request_body_callback,
            has_response_body_callback,
            stats: PluginStats::default(),
            slow_calls: AtomicU32::new(0),
            slow_gate: Mutex::new(()),
            off_worker: AtomicUsize::new(0),
            spec,
        }
    }

    /// Is the plugin running its calls off the workers (caught slow lately)?
    pub fn is_slow(&self) -> bool {
        self.slow_calls.load(Ordering::Relaxed) > 0
    }

    fn lanes(&self) -> Option<&Lanes> {
        self.engine.as_ref().map(|e| e.lanes())
    }

    /// After a call in `slot`: a call caught slow (or past its deadline, `deadline`)
    /// makes the next [`super::engine::SLOW_CALLS_OFF_WORKER`] calls run off the
    /// workers; a prompt call off the workers counts one down.
    fn pace(&self, slot: &mut Slot, deadline: bool) {
        let caught = deadline || slot.vm.as_mut().is_some_and(Vm::take_caught_slow);
        if caught {
            if !self.is_slow() {
                tracing::warn!(plugin = %self.id, "wasm plugin is slow: its calls run off the proxy's worker threads, one at a time");
            }
            self.stats.caught_slow.fetch_add(1, Ordering::Relaxed);
            self.slow_calls
                .store(super::engine::SLOW_CALLS_OFF_WORKER, Ordering::Relaxed);
        } else if self.is_slow() {
            let _ = self
                .slow_calls
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        }
    }

    /// Runs `f` on the instance slot `first` (or, inline, on any free slot after it
    /// when `any_slot`): inline on this worker thread when the plugin is not slow,
    /// the slot is free and the engine's inline lanes have room; otherwise off the
    /// worker, behind the plugin's slow gate when it is slow.
    fn with_slot<R>(
        &self,
        first: usize,
        any_slot: bool,
        f: impl FnOnce(&mut Slot, usize) -> R,
    ) -> R {
        let lock = |i: usize| self.slots[i].lock().unwrap_or_else(|p| p.into_inner());
        let Some(lanes) = self.lanes() else {
            // No engine: no plugin code runs.
            return f(&mut lock(first), first);
        };
        if !self.is_slow() {
            if let Some(_inline) = lanes.try_inline() {
                let n = if any_slot { self.slots.len() } else { 1 };
                for k in 0..n {
                    let i = (first + k) % self.slots.len();
                    let mut slot = match self.slots[i].try_lock() {
                        Ok(g) => g,
                        Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
                        Err(std::sync::TryLockError::WouldBlock) => continue,
                    };
                    return f(&mut slot, i);
                }
            }
        }
        off_worker(|| {
            let _one_at_a_time = self
                .is_slow()
                .then(|| self.slow_gate.lock().unwrap_or_else(|p| p.into_inner()));
            f(&mut lock(first), first)
        })
    }

    /// The ABI version the module was built for.
    pub fn abi(&self) -> Option<super::engine::AbiVersion> {
        self.module.as_ref().ok().map(|(m, _)| m.abi)
    }

    /// The epoch ticker of the plugin's engine.
    pub fn engine_ticker(&self) -> Option<Arc<super::engine::Ticker>> {
        self.engine.as_ref().map(|e| e.ticker().clone())
    }

    /// Why the plugin cannot run at all, if so.
    pub fn load_error(&self) -> Option<&WasmError> {
        self.module.as_ref().err()
    }

    fn record_error(&self, e: &WasmError) {
        tracing::warn!(plugin = %self.id, error = %e, strategy = ?self.fail, "wasm plugin failed");
        *self
            .stats
            .errors
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(e.kind())
            .or_insert(0) += 1;
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
    }

    fn unavailable(&self, why: &str) -> Outcome {
        if self.fail == FailStrategy::Open {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Outcome::Skipped;
        }
        self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
        Outcome::Reply(error_reply(503, &self.id, why))
    }

    /// Drops the instance in `slot` after a runtime failure: FAIL_CLOSE fails
    /// the plugin for good, the other strategies rate-limit the next instance.
    fn fail_instance(&self, slot: &mut Slot, i: usize, e: &WasmError) {
        self.record_error(e);
        self.pace(slot, matches!(e, WasmError::Deadline(..)));
        self.drop_instance(slot, i);
        match self.fail {
            FailStrategy::Close => {
                *self.failed.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                self.has_failed.store(true, Ordering::Release);
            }
            FailStrategy::Open | FailStrategy::Reload => {
                slot.not_before = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
            }
        }
    }

    /// The instance in `slot` (number `i`) is gone, with its timer.
    fn drop_instance(&self, slot: &mut Slot, i: usize) {
        slot.vm = None;
        slot.generation += 1;
        self.settings.timers.clear(i);
    }

    /// After a runtime failure of the instance in `slot` during a request: the
    /// request's outcome.
    fn failed_now(&self, slot: &mut Slot, i: usize, e: WasmError) -> Outcome {
        self.fail_instance(slot, i, &e);
        if self.fail == FailStrategy::Open {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return Outcome::Skipped;
        }
        self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
        Outcome::Reply(error_reply(500, &self.id, &e.to_string()))
    }

    /// The instance of `slot` (number `i`), started if needed.
    fn ensure_vm<'a>(&self, slot: &'a mut Slot, i: usize) -> Result<&'a mut Vm, Outcome> {
        if slot.vm.is_none() {
            if let Some(t) = slot.not_before {
                if Instant::now() < t {
                    return Err(self.unavailable("plugin is restarting after a failure"));
                }
            }
            let (m, pre) = self
                .module
                .as_ref()
                .map_err(|e| self.unavailable(&e.to_string()))?;
            let ticker = self
                .engine_ticker()
                .ok_or_else(|| self.unavailable("no wasm engine"))?;
            self.settings.timers.clear(i);
            match Vm::start(pre, &m.no_ops, &self.settings, i, ticker) {
                Ok(vm) => {
                    if slot.generation > 0 {
                        self.stats.restarts.fetch_add(1, Ordering::Relaxed);
                    }
                    slot.generation += 1;
                    slot.vm = Some(vm);
                }
                Err(e) => return Err(self.failed_now(slot, i, e)),
            }
        }
        slot.vm
            .as_mut()
            .ok_or_else(|| self.unavailable("no instance"))
    }

    /// Runs the request-headers callback. Returns the outcome and, when a context
    /// was created, the handle for the later callbacks.
    pub fn on_request(
        &self,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
    ) -> (Outcome, Option<Handle>) {
        self.stats.calls.fetch_add(1, Ordering::Relaxed);
        let failed = self.has_failed.load(Ordering::Acquire).then(|| {
            let e = self.failed.lock().unwrap_or_else(|p| p.into_inner());
            e.as_ref().map(|e| format!("failed earlier: {e}"))
        });
        if let Some(why) = failed.flatten() {
            self.stats.failed_requests.fetch_add(1, Ordering::Relaxed);
            return (Outcome::Reply(error_reply(503, &self.id, &why)), None);
        }
        // A slow plugin admits a bounded number of requests (each holds a thread
        // while its calls wait for the plugin's turn).
        let off_worker = self.is_slow();
        if off_worker && !self.admit_off_worker() {
            self.stats.overloaded.fetch_add(1, Ordering::Relaxed);
            let why = "plugin overloaded: too many requests wait for its slow calls";
            return (self.unavailable(why), None);
        }
        let first = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let (o, h) = self.with_slot(first, true, |slot, i| {
            let r = self.request_in(slot, i, http, end_of_stream, off_worker);
            if let (_, Some(_)) = &r {
                self.pace(slot, false);
            }
            r
        });
        if off_worker && h.is_none() {
            self.end_off_worker();
        }
        (o, h)
    }

    /// Counts a request through this plugin while it is slow, unless twice its
    /// instance count (or the node's limit) are in flight.
    fn admit_off_worker(&self) -> bool {
        let Some(lanes) = self.lanes() else {
            return true;
        };
        if self.off_worker.fetch_add(1, Ordering::SeqCst) >= 2 * self.slots.len() {
            self.off_worker.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        if !lanes.try_off_worker() {
            self.off_worker.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    fn end_off_worker(&self) {
        self.off_worker.fetch_sub(1, Ordering::SeqCst);
        if let Some(l) = self.lanes() {
            l.end_off_worker();
        }
    }

    /// [`Plugin::on_request`] on the instance in `slot` (number `i`).
    fn request_in(
        &self,
        slot: &mut Slot,
        i: usize,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
        off_worker: bool,
    ) -> (Outcome, Option<Handle>) {
        let vm = match self.ensure_vm(slot, i) {
            Ok(vm) => vm,
            Err(o) => return (o, None),
        };
        http.local_reply = None;
        let r = vm.create_context().and_then(|ctx| {
            vm.request_headers(ctx, http, end_of_stream)
                .map(|a| (ctx, a))
        });
        let generation = slot.generation;
        match r {
            Ok((ctx, action)) => {
                let handle = Handle {
                    slot: i,
                    generation,
                    ctx,
                    off_worker,
                };
                if let Some(reply) = http.local_reply.take() {
                    self.stats.local_replies.fetch_add(1, Ordering::Relaxed);
                    return (Outcome::Reply(reply), Some(handle));
                }
                if action == Action::Pause {
                    let o = self.failed_now(slot, i, WasmError::Paused);
                    return (o, None);
                }
                (Outcome::Continue, Some(handle))
            }
            Err(e) => (self.failed_now(slot, i, e), None),
        }
    }

    /// Runs the response-headers callback for a request this plugin saw. A plugin
    /// may rewrite the response headers or replace the response with a local reply.
    pub fn on_response(
        &self,
        h: Handle,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
    ) -> Option<LocalReply> {
        self.with_slot(h.slot, false, |slot, i| {
            if slot.generation != h.generation {
                return None; // The instance holding the context is gone.
            }
            let vm = slot.vm.as_mut()?;
            http.local_reply = None;
            match vm.response_headers(h.ctx, http, end_of_stream) {
                Ok(_) => {
                    self.pace(slot, false);
                    http.local_reply.take()
                }
                Err(e) => match self.failed_now(slot, i, e) {
                    Outcome::Reply(r) => Some(r),
                    _ => None,
                },
            }
        })
    }

    /// Does the plugin read request bodies (`proxy_on_request_body`)?
    pub fn has_request_body_callback(&self) -> bool {
        self.has_request_body_callback
    }

    /// Asks the plugin whether it reads this message's body: its body callback with
    /// no data yet and `end_of_stream` false. It does if it pauses (to get the
    /// rest) or touches the body buffer; a plugin whose callback only continues
    /// (an SDK's default) does not, and the body streams past it uncalled.
    pub fn probe_body(&self, h: Handle, http: &mut Box<HttpState>, response: bool) -> Probe {
        self.with_slot(h.slot, false, |slot, i| {
            if slot.generation != h.generation {
                return Probe::Ignores;
            }
            let Some(vm) = slot.vm.as_mut() else {
                return Probe::Ignores;
            };
            http.local_reply = None;
            http.body_touched = false;
            let r = vm.body(h.ctx, http, response, false);
            let touched = std::mem::take(&mut http.body_touched);
            http.request_body.clear();
            http.response_body.clear();
            match r {
                Ok(action) => {
                    self.pace(slot, false);
                    if let Some(r) = http.local_reply.take() {
                        self.stats.local_replies.fetch_add(1, Ordering::Relaxed);
                        return Probe::Reply(r);
                    }
                    if action == Action::Pause || touched {
                        Probe::Wants
                    } else {
                        Probe::Ignores
                    }
                }
                Err(e) => match self.failed_now(slot, i, e) {
                    Outcome::Reply(r) => Probe::Reply(r),
                    _ => Probe::Ignores,
                },
            }
        })
    }

    /// Does the plugin read response bodies (`proxy_on_response_body`)?
    pub fn has_response_body_callback(&self) -> bool {
        self.has_response_body_callback
    }

    /// Runs the request-body callback (or, `response`, the response-body one)
    /// with the whole body in `http.request_body` (`response_body`), which the
    /// plugin may change. A plugin may answer with a local reply. `Pause` with the
    /// whole body delivered has nothing to wait for: it continues.
    pub fn on_body(
        &self,
        h: Handle,
        http: &mut Box<HttpState>,
        response: bool,
    ) -> Option<LocalReply> {
        self.with_slot(h.slot, false, |slot, i| {
            if slot.generation != h.generation {
                return None;
            }
            let vm = slot.vm.as_mut()?;
            http.local_reply = None;
            match vm.body(h.ctx, http, response, true) {
                Ok(_) => {
                    self.pace(slot, false);
                    let r = http.local_reply.take();
                    if r.is_some() {
                        self.stats.local_replies.fetch_add(1, Ordering::Relaxed);
                    }
                    r
                }
                Err(e) => match self.failed_now(slot, i, e) {
                    Outcome::Reply(r) => Some(r),
                    _ => None,
                },
            }
        })
    }

    /// Ends a request's context; recycles an instance that grew too much.
    pub fn finish(&self, h: Handle, http: &mut Box<HttpState>) {
        self.with_slot(h.slot, false, |slot, i| self.finish_in(slot, i, h, http));
        if h.off_worker {
            self.end_off_worker();
        }
    }

    fn finish_in(&self, slot: &mut Slot, i: usize, h: Handle, http: &mut Box<HttpState>) {
        if slot.generation != h.generation {
            return;
        }
        let Some(vm) = slot.vm.as_mut() else { return };
        if let Err(e) = vm.finish(h.ctx, http) {
            let _ = self.failed_now(slot, i, e);
            return;
        }
        self.pace(slot, false);
        let Some(vm) = slot.vm.as_mut() else { return };
        let mem = vm.memory_bytes();
        let live = vm.live_contexts;
        self.stats.memory_bytes.store(mem, Ordering::Relaxed);
        // A clean exit resets the crash-loop backoff.
        slot.backoff = MIN_BACKOFF;
        if mem as u64 > self.settings.max_memory / 4 * 3 && live == 0 {
            tracing::info!(plugin = %self.id, memory = mem, "recycling a wasm instance whose memory keeps growing");
            self.drop_instance(slot, i);
            self.stats.recycled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Runs the plugin's timers and queue notifications until the plugin is gone.
    /// The calls run on a blocking thread, never on the proxy's workers.
    pub async fn drive(me: std::sync::Weak<Plugin>) {
        let Some(timers) = me.upgrade().map(|p| p.settings.timers.clone()) else {
            return;
        };
        loop {
            match timers.next_due() {
                Some(at) => {
                    let at = tokio::time::Instant::from_std(at);
                    tokio::select! {
                        _ = tokio::time::sleep_until(at) => {}
                        _ = timers.wake.notified() => {}
                    }
                }
                None => timers.wake.notified().await,
            }
            let Some(p) = me.upgrade() else { return };
            if tokio::task::spawn_blocking(move || p.run_due(Instant::now()))
                .await
                .is_err()
            {
                return;
            }
        }
    }

    /// Ticks the instances whose tick is due at `now`, and tells the owners of
    /// queues that received items. Returns how many root calls ran.
    pub fn run_due(&self, now: Instant) -> usize {
        let mut calls = 0;
        for i in self.settings.timers.take_due(now) {
            calls += usize::from(self.root_call(i, None));
        }
        for (id, owner, n) in self.settings.shared.take_ready() {
            for _ in 0..n {
                calls += usize::from(self.root_call(owner, Some(id)));
            }
        }
        calls
    }

    /// `proxy_on_tick` (no queue) or `proxy_on_queue_ready` on the root context of
    /// instance `i`, if it is running. Returns whether the call ran.
    fn root_call(&self, i: usize, queue: Option<u32>) -> bool {
        if self.has_failed.load(Ordering::Acquire) {
            return false;
        }
        let Some(m) = self.slots.get(i) else {
            return false;
        };
        let mut slot = m.lock().unwrap_or_else(|p| p.into_inner());
        let Some(vm) = slot.vm.as_mut() else {
            return false;
        };
        let r = match queue {
            None => {
                self.stats.ticks.fetch_add(1, Ordering::Relaxed);
                vm.tick()
            }
            Some(id) => {
                self.stats
                    .queue_notifications
                    .fetch_add(1, Ordering::Relaxed);
                vm.queue_ready(id)
            }
        };
        match r {
            Ok(()) => self.pace(&mut slot, false),
            Err(e) => self.fail_instance(&mut slot, i, &e),
        }
        true
    }

    /// Linear memory of the live instances, in bytes.
    pub fn instance_memory(&self) -> Vec<usize> {
        self.slots
            .iter()
            .filter_map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.vm.as_ref().map(Vm::memory_bytes)
            })
            .collect()
    }
}

fn error_reply(status: u16, plugin: &str, why: &str) -> LocalReply {
    LocalReply {
        status,
        details: format!("wasm plugin {plugin} failed: {why}"),
        body: format!("wasm plugin {plugin} failed\n").into_bytes(),
        headers: vec![("content-type".into(), "text/plain".into())],
    }
}
