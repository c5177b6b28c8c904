//! One plugin instance: a wasmtime Store with its memory cap, and the Proxy-Wasm
//! lifecycle calls, each bounded by an epoch deadline. Any error (trap, deadline,
//! memory, `proc_exit`) poisons the instance: the owner drops it.

use super::abi::{HostState, HttpState, ProcExit, VmSettings};
use super::engine::Ticker;
use super::WasmError;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;
use wasmtime::{
    Extern, InstancePre, Store, Trap, TypedFunc, UpdateDeadline, WasmParams, WasmResults,
};

/// The root context's id; HTTP contexts are numbered from 2.
pub const ROOT_CTX: i32 = 1;

/// What a headers callback asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

pub struct Vm {
    store: Store<HostState>,
    exports: Exports,
    memory: wasmtime::Memory,
    next_ctx: i32,
    /// Bounds each call into the instance.
    limit: CallLimit,
    /// HTTP contexts created and not yet deleted.
    pub live_contexts: usize,
}

/// The lifecycle functions the instance exports, checked once at start.
/// A callback that does nothing ([`super::noop`]) is left out: not called.
struct Exports {
    on_context_create: Option<TypedFunc<(i32, i32), ()>>,
    on_request_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_headers: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_request_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_response_body: Option<TypedFunc<(i32, i32, i32), i32>>,
    on_done: Option<TypedFunc<i32, i32>>,
    on_log: Option<TypedFunc<i32, ()>>,
    on_delete: Option<TypedFunc<i32, ()>>,
    on_tick: Option<TypedFunc<i32, ()>>,
    on_queue_ready: Option<TypedFunc<(i32, i32), ()>>,
}

/// The CPU deadline and memory cap of each call into an instance.
struct CallLimit {
    max_memory: u64,
    /// Keeps the epoch advancing while this instance runs code.
    ticker: Arc<Ticker>,
}

impl CallLimit {
    /// Calls `f` under the deadline. The exports live apart from the store, so a
    /// call borrows them instead of cloning each function's type.
    fn call<P: WasmParams, R: WasmResults>(
        &self,
        store: &mut Store<HostState>,
        what: &'static str,
        f: &TypedFunc<P, R>,
        p: P,
    ) -> Result<R, WasmError> {
        let running = self.ticker.enter();
        start_call(store);
        let r = f.call(&mut *store, p);
        drop(running);
        r.map_err(|e| self.classify(store, what, e))
    }

    fn classify(
        &self,
        store: &Store<HostState>,
        what: &'static str,
        e: wasmtime::Error,
    ) -> WasmError {
        if store.data().limits.exceeded {
            return WasmError::Memory(self.max_memory);
        }
        if let Some(ProcExit(code)) = e.downcast_ref::<ProcExit>() {
            return WasmError::Exit(*code);
        }
        if e.downcast_ref::<Trap>() == Some(&Trap::Interrupt) {
            return WasmError::Deadline(store.data().deadline.as_millis() as u64, what);
        }
        WasmError::Trap(what, format!("{e:#}"))
    }
}

/// Starts the clock of a call into the instance: its deadline counts from now, and
/// the next epoch tick makes it check.
fn start_call(store: &mut Store<HostState>) {
    store.data_mut().call_started = Instant::now();
    store.set_epoch_deadline(1);
}

/// A stream callback `f` (if exported) with the request's state swapped into the
/// store for the call (a pointer swap); 1 is Pause, anything else Continue.
fn stream_call(
    store: &mut Store<HostState>,
    limit: &CallLimit,
    what: &'static str,
    f: Option<&TypedFunc<(i32, i32, i32), i32>>,
    args: (i32, i32, i32),
    http: &mut Box<HttpState>,
) -> Result<Action, WasmError> {
    let Some(f) = f else {
        return Ok(Action::Continue);
    };
    std::mem::swap(http, &mut store.data_mut().http);
    let r = limit.call(store, what, f, args);
    std::mem::swap(http, &mut store.data_mut().http);
    Ok(if r? == 1 {
        Action::Pause
    } else {
        Action::Continue
    })
}

fn typed<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    inst: &wasmtime::Instance,
    name: &'static str,
) -> Result<Option<TypedFunc<P, R>>, WasmError> {
    match inst.get_func(&mut *store, name) {
        None => Ok(None),
        Some(f) => f
            .typed::<P, R>(&*store)
            .map(Some)
            .map_err(|e| WasmError::Abi(format!("export {name} has the wrong signature: {e}"))),
    }
}

/// [`typed`], or `None` for a callback in `no_ops`, after checking its signature.
fn callback<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    inst: &wasmtime::Instance,
    name: &'static str,
    no_ops: &HashSet<String>,
) -> Result<Option<TypedFunc<P, R>>, WasmError> {
    let f = typed(store, inst, name)?;
    Ok(f.filter(|_| !no_ops.contains(name)))
}

impl Vm {
    /// Instantiates, runs `_initialize`/`_start`, creates the root context and runs
    /// `proxy_on_vm_start` and `proxy_on_configure`.
    /// Callbacks named in `no_ops` do nothing and are never called. `slot` is the
    /// instance's number among the plugin's instances.
    pub fn start(
        pre: &InstancePre<HostState>,
        no_ops: &HashSet<String>,
        s: &VmSettings,
        slot: usize,
        ticker: Arc<Ticker>,
    ) -> Result<Vm, WasmError> {
        let mut host = HostState::new(s);
        host.slot = slot;
        let mut store = Store::new(pre.module().engine(), host);
        store.limiter(|h| &mut h.limits);
        // A module's start function runs during instantiation: bounded like a callback.
        let running = ticker.enter();
        // At each epoch tick a running call checks its own time (see `engine`).
        store.epoch_deadline_callback(|mut ctx| {
            let h = ctx.data_mut();
            let elapsed = h.call_started.elapsed();
            if elapsed >= super::engine::SLOW_CALL {
                h.caught_slow = true;
            }
            Ok(if elapsed >= h.deadline {
                UpdateDeadline::Interrupt
            } else {
                UpdateDeadline::Continue(1)
            })
        });
        start_call(&mut store);
        let inst = pre.instantiate(&mut store);
        drop(running);
        let inst = inst.map_err(|e| {
            if store.data().limits.exceeded {
                WasmError::Memory(s.max_memory)
            } else {
                WasmError::Instantiate(format!("{e:#}"))
            }
        })?;
        let memory = match inst.get_export(&mut store, "memory") {
            Some(Extern::Memory(m)) => m,
            _ => return Err(WasmError::Abi("missing export memory".into())),
        };
        let alloc = match typed::<i32, i32>(&mut store, &inst, "proxy_on_memory_allocate")? {
            Some(f) => Some(f),
            None => typed::<i32, i32>(&mut store, &inst, "malloc")?,
        };
        store.data_mut().memory = Some(memory);
        store.data_mut().alloc = alloc;
        let on_context_create = typed(&mut store, &inst, "proxy_on_context_create")?
            .ok_or_else(|| WasmError::Abi("missing export proxy_on_context_create".into()))?;
        let on_context_create =
            Some(on_context_create).filter(|_| !no_ops.contains("proxy_on_context_create"));
        let init = match typed::<(), ()>(&mut store, &inst, "_initialize")? {
            Some(f) => Some(f),
            None => typed::<(), ()>(&mut store, &inst, "_start")?,
        };
        let on_vm_start = typed::<(i32, i32), i32>(&mut store, &inst, "proxy_on_vm_start")?;
        let on_configure = typed::<(i32, i32), i32>(&mut store, &inst, "proxy_on_configure")?;
        let exports = Exports {
            on_request_headers: typed(&mut store, &inst, "proxy_on_request_headers")?,
            on_response_headers: typed(&mut store, &inst, "proxy_on_response_headers")?,
            on_request_body: callback(&mut store, &inst, "proxy_on_request_body", no_ops)?,
            on_response_body: callback(&mut store, &inst, "proxy_on_response_body", no_ops)?,
            on_done: callback(&mut store, &inst, "proxy_on_done", no_ops)?,
            on_log: callback(&mut store, &inst, "proxy_on_log", no_ops)?,
            on_delete: callback(&mut store, &inst, "proxy_on_delete", no_ops)?,
            on_tick: callback(&mut store, &inst, "proxy_on_tick", no_ops)?,
            on_queue_ready: callback(&mut store, &inst, "proxy_on_queue_ready", no_ops)?,
            on_context_create,
        };
        let limit = CallLimit {
            max_memory: s.max_memory,
            ticker,
        };
        if let Some(f) = init {
            limit.call(&mut store, "_initialize", &f, ())?;
        }
        if let Some(f) = &exports.on_context_create {
            limit.call(&mut store, "proxy_on_context_create", f, (ROOT_CTX, 0))?;
        }
        if let Some(f) = on_vm_start {
            if limit.call(&mut store, "proxy_on_vm_start", &f, (ROOT_CTX, 0))? == 0 {
                return Err(WasmError::Configure);
            }
        }
        if let Some(f) = on_configure {
            let n = s.plugin_config.len() as i32;
            if limit.call(&mut store, "proxy_on_configure", &f, (ROOT_CTX, n))? == 0 {
                return Err(WasmError::Configure);
            }
        }
        Ok(Vm {
            store,
            exports,
            memory,
            next_ctx: ROOT_CTX + 1,
            limit,
            live_contexts: 0,
        })
    }

    /// Whether an epoch tick caught a call running past
    /// [`super::engine::SLOW_CALL`] since the last time this was asked.
    pub fn take_caught_slow(&mut self) -> bool {
        std::mem::take(&mut self.store.data_mut().caught_slow)
    }

    /// Linear memory in use, in bytes.
    pub fn memory_bytes(&self) -> usize {
        self.memory.data_size(&self.store)
    }

    /// Creates an HTTP context.
    pub fn create_context(&mut self) -> Result<i32, WasmError> {
        let id = self.next_ctx;
        self.next_ctx = self.next_ctx.checked_add(1).unwrap_or(ROOT_CTX + 1);
        if let Some(f) = &self.exports.on_context_create {
            let create = "proxy_on_context_create";
            self.limit
                .call(&mut self.store, create, f, (id, ROOT_CTX))?;
        }
        self.live_contexts += 1;
        Ok(id)
    }

    fn headers_call(
        &mut self,
        what: &'static str,
        response: bool,
        ctx: i32,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
    ) -> Result<Action, WasmError> {
        let e = &self.exports;
        let (f, count) = if response {
            (&e.on_response_headers, http.response.len())
        } else {
            (&e.on_request_headers, http.request.len())
        };
        let args = (ctx, count as i32, i32::from(end_of_stream));
        stream_call(&mut self.store, &self.limit, what, f.as_ref(), args, http)
    }

    pub fn request_headers(
        &mut self,
        ctx: i32,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
    ) -> Result<Action, WasmError> {
        self.headers_call("proxy_on_request_headers", false, ctx, http, end_of_stream)
    }

    pub fn response_headers(
        &mut self,
        ctx: i32,
        http: &mut Box<HttpState>,
        end_of_stream: bool,
    ) -> Result<Action, WasmError> {
        self.headers_call("proxy_on_response_headers", true, ctx, http, end_of_stream)
    }

    /// `proxy_on_request_body` (or, `response`, `proxy_on_response_body`) with the
    /// body in `http.request_body` (`response_body`), which the plugin may change:
    /// the whole body (`end_of_stream`), or none of it yet (the probe).
    pub fn body(
        &mut self,
        ctx: i32,
        http: &mut Box<HttpState>,
        response: bool,
        end_of_stream: bool,
    ) -> Result<Action, WasmError> {
        let e = &self.exports;
        let (f, len, what) = if response {
            (
                &e.on_response_body,
                http.response_body.len(),
                "proxy_on_response_body",
            )
        } else {
            (
                &e.on_request_body,
                http.request_body.len(),
                "proxy_on_request_body",
            )
        };
        let args = (ctx, len as i32, i32::from(end_of_stream));
        stream_call(&mut self.store, &self.limit, what, f.as_ref(), args, http)
    }

    /// `proxy_on_tick` on the root context.
    pub fn tick(&mut self) -> Result<(), WasmError> {
        match &self.exports.on_tick {
            Some(f) => self
                .limit
                .call(&mut self.store, "proxy_on_tick", f, ROOT_CTX),
            None => Ok(()),
        }
    }

    /// `proxy_on_queue_ready` on the root context: queue `id` has items.
    pub fn queue_ready(&mut self, id: u32) -> Result<(), WasmError> {
        match &self.exports.on_queue_ready {
            Some(f) => self.limit.call(
                &mut self.store,
                "proxy_on_queue_ready",
                f,
                (ROOT_CTX, id as i32),
            ),
            None => Ok(()),
        }
    }

    /// `proxy_on_done`, `proxy_on_log`, `proxy_on_delete`.
    pub fn finish(&mut self, ctx: i32, http: &mut Box<HttpState>) -> Result<(), WasmError> {
        self.live_contexts = self.live_contexts.saturating_sub(1);
        std::mem::swap(http, &mut self.store.data_mut().http);
        let (store, e, limit) = (&mut self.store, &self.exports, &self.limit);
        let r = (|| {
            if let Some(f) = &e.on_done {
                limit.call(store, "proxy_on_done", f, ctx)?;
            }
            if let Some(f) = &e.on_log {
                limit.call(store, "proxy_on_log", f, ctx)?;
            }
            if let Some(f) = &e.on_delete {
                limit.call(store, "proxy_on_delete", f, ctx)?;
            }
            Ok(())
        })();
        std::mem::swap(http, &mut self.store.data_mut().http);
        r
    }
}
