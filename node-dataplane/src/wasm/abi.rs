//! Host side of the Proxy-Wasm ABI: the functions a plugin imports from `env` (and
//! the WASI preview1 stubs SDKs import), over the per-instance [`HostState`].
//!
//! Data returned to the guest is copied into memory the guest allocates through its
//! own allocator (`proxy_on_memory_allocate`, or `malloc`), and the (pointer, length)
//! pair is written little-endian at the addresses the guest passed. Header maps and
//! map-valued properties are serialized as `u32 count, count x (u32 key_len, u32
//! value_len), then key\0value\0 per pair`.

use super::headers::{self, Headers, Refused};
use crate::fields::{valid_name, valid_value};
use std::net::SocketAddr;
use std::sync::Arc;
use wasmtime::{Caller, Extern, Linker, Module, Val, ValType};

/// What an instance is started with.
#[derive(Clone)]
pub struct VmSettings {
    pub plugin_name: String,
    pub root_id: String,
    pub plugin_config: Vec<u8>,
    pub max_memory: u64,
    pub deadline_ms: u64,
    /// The plugin's own metrics, shared by its instances.
    pub metrics: Arc<super::custom_metrics::CustomMetrics>,
    /// Shared data and queues of the plugin's instances on this node.
    pub shared: Arc<super::shared::Shared>,
    /// The instances' tick periods.
    pub timers: Arc<super::timers::Timers>,
}

impl Default for VmSettings {
    fn default() -> Self {
        Self {
            plugin_name: String::new(),
            root_id: String::new(),
            plugin_config: Vec::new(),
            max_memory: 0,
            deadline_ms: 0,
            metrics: Arc::default(),
            shared: Arc::default(),
            timers: Arc::new(super::timers::Timers::new(1)),
        }
    }
}

pub const OK: i32 = 0;
pub const NOT_FOUND: i32 = 1;
pub const BAD_ARGUMENT: i32 = 2;
pub const INVALID_MEMORY_ACCESS: i32 = 6;
pub const EMPTY: i32 = 7;
pub const CAS_MISMATCH: i32 = 8;
pub const INTERNAL_FAILURE: i32 = 10;
pub const UNIMPLEMENTED: i32 = 12;
/// WASI `ENOSYS`.
const WASI_NOSYS: i32 = 52;

/// The most a plugin may hold of a request body (delivered whole, see
/// docs/plugins.md): a larger body is answered 413.
pub const MAX_BODY_BYTES: usize = 1 << 20;

const BUFFER_HTTP_REQUEST_BODY: i32 = 0;
const BUFFER_HTTP_RESPONSE_BODY: i32 = 1;
const MAP_REQUEST_HEADERS: i32 = 0;
const MAP_RESPONSE_HEADERS: i32 = 2;
const BUFFER_VM_CONFIG: i32 = 6;
const BUFFER_PLUGIN_CONFIG: i32 = 7;

/// What a plugin may learn about the connection a request arrived on.
#[derive(Debug, Clone)]
pub struct ConnProps {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    /// Peer SPIFFE ID (with `spiffe://`) when the connection was mTLS.
    pub peer_id: Option<String>,
}

/// A reply the plugin asked the host to send instead of forwarding the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalReply {
    pub status: u16,
    pub details: String,
    pub body: Vec<u8>,
    pub headers: Vec<(String, String)>,
}

/// Per-request state visible to the plugin during one callback.
#[derive(Debug, Default)]
pub struct HttpState {
    /// The request's headers: `:method`, `:path`, `:authority`, `:scheme`, then its fields.
    pub request: Headers,
    /// The response's headers: `:status`, then its fields.
    pub response: Headers,
    pub props: Option<Arc<ConnProps>>,
    pub local_reply: Option<LocalReply>,
    /// The request's body, during `proxy_on_request_body` (delivered whole).
    pub request_body: Vec<u8>,
    /// The response's body, during `proxy_on_response_body` (delivered whole).
    pub response_body: Vec<u8>,
    /// The plugin read or changed a body buffer (it cares about bodies).
    pub body_touched: bool,
}

/// Memory cap, recording whether the plugin hit it.
pub struct Limits {
    pub max_memory: usize,
    pub exceeded: bool,
}

impl wasmtime::ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.exceeded = true;
            return Err(wasmtime::Error::msg("plugin memory limit exceeded"));
        }
        Ok(true)
    }
    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

/// `proc_exit` as an error that ends the callback.
#[derive(Debug)]
pub struct ProcExit(pub i32);
impl std::fmt::Display for ProcExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "proc_exit({})", self.0)
    }
}
impl std::error::Error for ProcExit {}

/// Everything a plugin instance's host functions work on.
pub struct HostState {
    pub limits: Limits,
    pub plugin_name: String,
    pub root_id: String,
    pub vm_config: Vec<u8>,
    pub plugin_config: Vec<u8>,
    /// The request being handled, swapped in for each callback (a pointer swap).
    pub http: Box<HttpState>,
    /// When the call into the instance in progress started, and how long it may run.
    pub call_started: std::time::Instant,
    pub deadline: std::time::Duration,
    /// An epoch tick found a call still running [`super::engine::SLOW_CALL`] after
    /// it started (read and cleared by the plugin after each call).
    pub caught_slow: bool,
    /// The instance's memory and allocator, looked up once after instantiation.
    pub memory: Option<wasmtime::Memory>,
    pub alloc: Option<wasmtime::TypedFunc<i32, i32>>,
    /// The plugin's own metrics (the metrics ABI).
    pub metrics: Arc<super::custom_metrics::CustomMetrics>,
    /// The plugin's shared data and queues on this node.
    pub shared: Arc<super::shared::Shared>,
    /// The plugin's tick periods, and its driver's wake-up.
    pub timers: Arc<super::timers::Timers>,
    /// Which of the plugin's instances this is.
    pub slot: usize,
}

impl HostState {
    /// The state of a new instance started with `s`.
    pub fn new(s: &VmSettings) -> Self {
        Self {
            limits: Limits {
                max_memory: s.max_memory as usize,
                exceeded: false,
            },
            plugin_name: s.plugin_name.clone(),
            root_id: s.root_id.clone(),
            vm_config: Vec::new(),
            plugin_config: s.plugin_config.clone(),
            http: Box::default(),
            call_started: std::time::Instant::now(),
            deadline: std::time::Duration::from_millis(s.deadline_ms.max(1)),
            caught_slow: false,
            memory: None,
            alloc: None,
            metrics: s.metrics.clone(),
            shared: s.shared.clone(),
            timers: s.timers.clone(),
            slot: 0,
        }
    }

    fn map(&mut self, t: i32) -> Option<&mut Headers> {
        match t {
            MAP_REQUEST_HEADERS => Some(&mut self.http.request),
            MAP_RESPONSE_HEADERS => Some(&mut self.http.response),
            _ => None,
        }
    }

    /// The property at `path`, copied out for the guest.
    fn property(&self, path: &[&[u8]]) -> Option<Copied> {
        let props = self.http.props.as_deref();
        let req = |name: &str| {
            self.http
                .request
                .pseudo(name)
                .map(|v| Copied::of(v.as_bytes()))
        };
        let int = |v: u16| Copied::of(&i64::from(v).to_le_bytes());
        let text = |v: &dyn std::fmt::Display| Copied::of(v.to_string().as_bytes());
        Some(match path {
            [b"plugin_name"] => Copied::of(self.plugin_name.as_bytes()),
            [b"plugin_root_id"] => Copied::of(self.root_id.as_bytes()),
            [b"plugin_vm_id"] => Copied::of(b""),
            [b"connection", b"uri_san_peer_certificate"] => {
                Copied::of(props?.peer_id.as_ref()?.as_bytes())
            }
            [b"connection", b"mtls"] => Copied::of(&[u8::from(props?.peer_id.is_some())]),
            [b"source", b"address"] => text(&props?.source),
            [b"source", b"port"] => int(props?.source.port()),
            [b"destination", b"address"] => text(&props?.destination),
            [b"destination", b"port"] => int(props?.destination.port()),
            [b"request", b"path"] => req(":path")?,
            [b"request", b"url_path"] => {
                let p = self.http.request.pseudo(":path")?;
                Copied::of(p.split('?').next().unwrap_or_default().as_bytes())
            }
            [b"request", b"method"] => req(":method")?,
            [b"request", b"host"] => req(":authority")?,
            [b"request", b"scheme"] => req(":scheme")?,
            [b"source", b"principal"] => Copied::of(props?.peer_id.as_ref()?.as_bytes()),
            [b"request", b"query"] => {
                let p = self.http.request.pseudo(":path")?;
                Copied::of(p.split_once('?').map_or("", |(_, q)| q).as_bytes())
            }
            [b"request", b"useragent"] => Copied::of(self.http.request.get(b"user-agent")?),
            [b"request", b"referer"] => Copied::of(self.http.request.get(b"referer")?),
            [b"request", b"id"] => Copied::of(self.http.request.get(b"x-request-id")?),
            [b"request", b"headers"] => {
                let fields = &self.http.request.fields;
                let pairs = || fields.iter();
                let mut out = Vec::new();
                headers::serialize(pairs, &mut out);
                Copied::Heap(out)
            }
            [b"response", b"code"] => {
                let s = self.http.response.pseudo(":status")?;
                int(s.parse::<u16>().ok()?)
            }
            _ => return None,
        })
    }
}

/// Bytes copied out of the host state before the guest allocates room for them:
/// on the stack when small, as almost every header value and property is.
pub enum Copied {
    Inline([u8; 128], usize),
    Heap(Vec<u8>),
}

impl Copied {
    pub fn of(b: &[u8]) -> Self {
        match b.len() {
            n @ 0..=128 => {
                let mut buf = [0; 128];
                buf[..n].copy_from_slice(b);
                Copied::Inline(buf, n)
            }
            _ => Copied::Heap(b.to_vec()),
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Copied::Inline(b, n) => &b[..*n],
            Copied::Heap(v) => v,
        }
    }
}

type C<'a> = Caller<'a, HostState>;

fn memory(c: &mut C<'_>) -> Option<wasmtime::Memory> {
    if let Some(m) = c.data().memory {
        return Some(m);
    }
    match c.get_export("memory") {
        Some(Extern::Memory(m)) => Some(m),
        _ => None,
    }
}

fn read(c: &mut C<'_>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let m = memory(c)?;
    slice(m.data(&*c), ptr, len).map(<[u8]>::to_vec)
}

fn read_string(c: &mut C<'_>, ptr: i32, len: i32) -> Option<String> {
    read(c, ptr, len).map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// `len` bytes of guest memory at `ptr`, if all of them are inside it.
fn slice(mem: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let (ptr, len) = (ptr as u32 as usize, len as u32 as usize);
    mem.get(ptr..ptr.checked_add(len)?)
}

/// `slice`, to write into.
fn slice_mut(mem: &mut [u8], ptr: i32, len: usize) -> Option<&mut [u8]> {
    let ptr = ptr as u32 as usize;
    mem.get_mut(ptr..ptr.checked_add(len)?)
}

/// The guest's memory and the host state, borrowed together, so host functions
/// read their arguments in place instead of copying them.
fn memory_and_state<'a>(c: &'a mut C<'_>) -> Option<(&'a mut [u8], &'a mut HostState)> {
    let m = memory(c)?;
    Some(m.data_and_store_mut(c))
}

/// Runs `f` on the header map of type `t` with `n` arguments read in place from
/// guest memory (pointer, length pairs); maps a refused change to BAD_ARGUMENT.
fn with_map<const N: usize>(
    c: &mut C<'_>,
    t: i32,
    args: [(i32, i32); N],
    f: impl FnOnce(&mut Headers, [&[u8]; N]) -> Result<(), Refused>,
) -> i32 {
    let Some((mem, st)) = memory_and_state(c) else {
        return INVALID_MEMORY_ACCESS;
    };
    let mut read = [&[][..]; N];
    for (slot, (p, l)) in read.iter_mut().zip(args) {
        match slice(mem, p, l) {
            Some(b) => *slot = b,
            None => return INVALID_MEMORY_ACCESS,
        }
    }
    let Some(map) = st.map(t) else {
        return BAD_ARGUMENT;
    };
    match f(map, read) {
        Ok(()) => OK,
        Err(_) => BAD_ARGUMENT,
    }
}

fn write(c: &mut C<'_>, ptr: i32, bytes: &[u8]) -> bool {
    let Some(m) = memory(c) else { return false };
    m.write(&mut *c, ptr as u32 as usize, bytes).is_ok()
}

/// Wall-clock time in nanoseconds since the Unix epoch (0 if the clock is before it).
fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

fn write_u32(c: &mut C<'_>, ptr: i32, v: u32) -> bool {
    write(c, ptr, &v.to_le_bytes())
}

/// Allocates `bytes.len()` in the guest, copies, writes (ptr, len). Returns a status
/// or an error (a trap inside the guest allocator).
fn return_bytes(c: &mut C<'_>, bytes: &[u8], ptr_ptr: i32, len_ptr: i32) -> wasmtime::Result<i32> {
    // Taken out for the call (no clone of the function's type on the hot path) and
    // put back whatever the call does.
    let alloc = match c.data_mut().alloc.take() {
        Some(a) => a,
        None => {
            let f = c
                .get_export("proxy_on_memory_allocate")
                .or_else(|| c.get_export("malloc"))
                .and_then(Extern::into_func);
            let Some(f) = f else {
                return Ok(INVALID_MEMORY_ACCESS);
            };
            f.typed::<i32, i32>(&*c)?
        }
    };
    let ptr = alloc.call(&mut *c, bytes.len() as i32);
    c.data_mut().alloc = Some(alloc);
    let ptr = ptr?;
    if ptr == 0 && !bytes.is_empty() {
        return Ok(INVALID_MEMORY_ACCESS);
    }
    let Some(m) = memory(c) else {
        return Ok(INVALID_MEMORY_ACCESS);
    };
    let mem = m.data_mut(&mut *c);
    let mut put = |at: i32, b: &[u8]| {
        slice_mut(mem, at, b.len())
            .map(|dst| dst.copy_from_slice(b))
            .is_some()
    };
    let written = put(ptr, bytes)
        && put(ptr_ptr, &(ptr as u32).to_le_bytes())
        && put(len_ptr, &(bytes.len() as u32).to_le_bytes());
    Ok(if written { OK } else { INVALID_MEMORY_ACCESS })
}

/// `proxy_set_buffer_bytes` on a body: the `len` bytes at `start` are replaced
/// by `data` (`start` at the end appends; `start` 0 and `len` 0 prepends; a `len`
/// past the end replaces the rest). The body stays within [`MAX_BODY_BYTES`]:
/// returns false, changing nothing, when `start` is past the end or the result
/// would be larger.
pub fn splice(body: &mut Vec<u8>, start: i32, len: i32, data: &[u8]) -> bool {
    let (start, len) = (start as u32 as usize, len as u32 as usize);
    if start > body.len() {
        return false;
    }
    let end = start.saturating_add(len).min(body.len());
    if body.len() - (end - start) + data.len() > MAX_BODY_BYTES {
        return false;
    }
    body.splice(start..end, data.iter().copied());
    true
}

/// Defines every host function this host implements, then links the rest of the
/// module's `env.proxy_*` imports as UNIMPLEMENTED and other WASI imports as ENOSYS.
/// Imports from any other module fail the load with a clear error.
pub fn linker(engine: &wasmtime::Engine, module: &Module) -> Result<Linker<HostState>, String> {
    let mut l = Linker::new(engine);
    define(&mut l).map_err(|e| format!("{e:#}"))?;
    let mut probe = wasmtime::Store::new(engine, HostState::new(&VmSettings::default()));
    for imp in module.imports() {
        let (m, n) = (imp.module(), imp.name());
        if l.get_by_import(&mut probe, &imp).is_some() {
            continue;
        }
        let Some(ft) = imp.ty().func().cloned() else {
            return Err(format!(
                "import {m}.{n} is not a function; only functions are provided"
            ));
        };
        let ret = if m == "env" && n.starts_with("proxy_") {
            UNIMPLEMENTED
        } else if m == "wasi_snapshot_preview1" {
            WASI_NOSYS
        } else {
            return Err(format!(
                "unknown import {m}.{n}: not part of the Proxy-Wasm ABI or WASI preview1"
            ));
        };
        let results: Vec<ValType> = ft.results().collect();
        l.func_new(m, n, ft, move |_c, _args, out| {
            for (slot, t) in out.iter_mut().zip(&results) {
                *slot = match t {
                    ValType::I32 => Val::I32(ret),
                    ValType::I64 => Val::I64(i64::from(ret)),
                    ValType::F32 => Val::F32(0),
                    ValType::F64 => Val::F64(0),
                    _ => Val::I32(0),
                };
            }
            Ok(())
        })
        .map_err(|e| format!("{e:#}"))?;
    }
    Ok(l)
}

fn define(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    l.func_wrap(
        "env",
        "proxy_log",
        |mut c: C<'_>, level: i32, ptr: i32, len: i32| {
            let Some(msg) = read_string(&mut c, ptr, len) else {
                return INVALID_MEMORY_ACCESS;
            };
            let plugin = c.data().plugin_name.clone();
            match level {
                0 | 1 => tracing::debug!(%plugin, "{msg}"),
                2 => tracing::info!(%plugin, "{msg}"),
                3 => tracing::warn!(%plugin, "{msg}"),
                _ => tracing::error!(%plugin, "{msg}"),
            }
            OK
        },
    )?;
    l.func_wrap("env", "proxy_get_log_level", |mut c: C<'_>, ret: i32| {
        // info
        if write_u32(&mut c, ret, 2) {
            OK
        } else {
            INVALID_MEMORY_ACCESS
        }
    })?;
    l.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: C<'_>, ret: i32| {
            if write(&mut c, ret, &now_nanos().to_le_bytes()) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |c: C<'_>, ms: i32| {
            let h = c.data();
            h.timers.set(h.slot, ms as u32);
            OK
        },
    )?;
    for name in [
        "proxy_set_effective_context",
        "proxy_continue_stream",
        "proxy_close_stream",
    ] {
        l.func_wrap("env", name, |_c: C<'_>, _a: i32| OK)?;
    }
    for name in [
        "proxy_continue_request",
        "proxy_continue_response",
        "proxy_done",
        "proxy_clear_route_cache",
    ] {
        l.func_wrap("env", name, |_c: C<'_>| OK)?;
    }
    l.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: C<'_>, pp: i32, pl: i32, rp: i32, rl: i32| -> wasmtime::Result<i32> {
            let Some((mem, st)) = memory_and_state(&mut c) else {
                return Ok(INVALID_MEMORY_ACCESS);
            };
            let Some(path) = slice(mem, pp, pl) else {
                return Ok(INVALID_MEMORY_ACCESS);
            };
            // Segments are NUL-separated (the ABI); dotted paths, which some SDKs
            // pass, are accepted too. A trailing NUL is tolerated.
            let end = path.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
            let path = &path[..end];
            let sep = if path.contains(&0) { 0 } else { b'.' };
            let mut segs = [&[][..]; 4];
            let mut n = 0;
            for seg in path.split(|b| *b == sep) {
                if n == segs.len() {
                    return Ok(NOT_FOUND);
                }
                segs[n] = seg;
                n += 1;
            }
            match st.property(&segs[..n]) {
                Some(v) => return_bytes(&mut c, v.as_bytes(), rp, rl),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_property",
        |_c: C<'_>, _a: i32, _b: i32, _d: i32, _e: i32| OK,
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, max: i32, rp: i32, rl: i32| -> wasmtime::Result<i32> {
            if t == BUFFER_HTTP_REQUEST_BODY || t == BUFFER_HTTP_RESPONSE_BODY {
                c.data_mut().http.body_touched = true;
            }
            let h = c.data();
            let buf: &[u8] = match t {
                BUFFER_VM_CONFIG => &h.vm_config,
                BUFFER_PLUGIN_CONFIG => &h.plugin_config,
                BUFFER_HTTP_REQUEST_BODY => &h.http.request_body,
                BUFFER_HTTP_RESPONSE_BODY => &h.http.response_body,
                _ => return Ok(NOT_FOUND),
            };
            let start = (start.max(0) as usize).min(buf.len());
            let end = start.saturating_add(max.max(0) as usize).min(buf.len());
            let part = buf[start..end].to_vec();
            return_bytes(&mut c, &part, rp, rl)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: C<'_>, t: i32, len_ptr: i32, flags_ptr: i32| {
            if t == BUFFER_HTTP_REQUEST_BODY || t == BUFFER_HTTP_RESPONSE_BODY {
                c.data_mut().http.body_touched = true;
            }
            let n = match t {
                BUFFER_VM_CONFIG => c.data().vm_config.len(),
                BUFFER_PLUGIN_CONFIG => c.data().plugin_config.len(),
                BUFFER_HTTP_REQUEST_BODY => c.data().http.request_body.len(),
                BUFFER_HTTP_RESPONSE_BODY => c.data().http.response_body.len(),
                _ => return NOT_FOUND,
            };
            if write_u32(&mut c, len_ptr, n as u32) && write_u32(&mut c, flags_ptr, 0) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: C<'_>, t: i32, start: i32, len: i32, dp: i32, dl: i32| {
            if t != BUFFER_HTTP_REQUEST_BODY && t != BUFFER_HTTP_RESPONSE_BODY {
                return BAD_ARGUMENT;
            }
            if dl as u32 as usize > MAX_BODY_BYTES {
                return BAD_ARGUMENT;
            }
            let Some(data) = read(&mut c, dp, dl) else {
                return INVALID_MEMORY_ACCESS;
            };
            let http = &mut c.data_mut().http;
            http.body_touched = true;
            let body = match t {
                BUFFER_HTTP_REQUEST_BODY => &mut http.request_body,
                _ => &mut http.response_body,
            };
            if splice(body, start, len, &data) {
                OK
            } else {
                BAD_ARGUMENT
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32, rp: i32, rl: i32| -> wasmtime::Result<i32> {
            let Some((mem, st)) = memory_and_state(&mut c) else {
                return Ok(INVALID_MEMORY_ACCESS);
            };
            let Some(key) = slice(mem, kp, kl) else {
                return Ok(INVALID_MEMORY_ACCESS);
            };
            let Some(map) = st.map(t) else {
                return Ok(BAD_ARGUMENT);
            };
            match map.get(key).map(Copied::of) {
                Some(v) => return_bytes(&mut c, v.as_bytes(), rp, rl),
                None => Ok(NOT_FOUND),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: C<'_>, t: i32, rp: i32, rl: i32| -> wasmtime::Result<i32> {
            let Some(map) = c.data_mut().map(t) else {
                return Ok(BAD_ARGUMENT);
            };
            let mut bytes = Vec::new();
            map.serialize(&mut bytes);
            return_bytes(&mut c, &bytes, rp, rl)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: C<'_>, t: i32, rp: i32| {
            let Some(map) = c.data_mut().map(t) else {
                return BAD_ARGUMENT;
            };
            let n = map.serialized_len() as u32;
            if write_u32(&mut c, rp, n) {
                OK
            } else {
                INVALID_MEMORY_ACCESS
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: C<'_>, t: i32, p: i32, len: i32| {
            with_map(&mut c, t, [(p, len)], |map, [bytes]| {
                let pairs = headers::parse(bytes).ok_or(Refused::Invalid)?;
                map.set_pairs(pairs.into_iter())
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            with_map(&mut c, t, [(kp, kl), (vp, vl)], |map, [k, v]| map.add(k, v))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32, vp: i32, vl: i32| {
            with_map(&mut c, t, [(kp, kl), (vp, vl)], |map, [k, v]| {
                map.replace(k, v)
            })
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: C<'_>, t: i32, kp: i32, kl: i32| {
            with_map(&mut c, t, [(kp, kl)], |map, [k]| map.remove(k))
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: C<'_>,
         status: i32,
         dp: i32,
         dl: i32,
         bp: i32,
         bl: i32,
         hp: i32,
         hl: i32,
         _grpc: i32| {
            let (Some(details), Some(body), Some(hdrs)) = (
                read_string(&mut c, dp, dl),
                read(&mut c, bp, bl),
                read(&mut c, hp, hl),
            ) else {
                return INVALID_MEMORY_ACCESS;
            };
            let headers = if hdrs.is_empty() {
                Vec::new()
            } else {
                match headers::parse(&hdrs) {
                    Some(h) => h
                        .into_iter()
                        .map(|(k, v)| {
                            (
                                String::from_utf8_lossy(k).into_owned(),
                                String::from_utf8_lossy(v).into_owned(),
                            )
                        })
                        .collect::<Vec<_>>(),
                    None => return BAD_ARGUMENT,
                }
            };
            if !(200..=599).contains(&status) {
                return BAD_ARGUMENT;
            }
            c.data_mut().http.local_reply = Some(LocalReply {
                status: status as u16,
                details,
                body,
                headers: headers
                    .into_iter()
                    .filter(|(k, v)| valid_name(k.as_bytes()) && valid_value(v.as_bytes()))
                    .map(|(k, v)| (k.to_ascii_lowercase(), v))
                    .collect(),
            });
            OK
        },
    )?;
    define_metrics(l)?;
    define_shared(l)?;
    define_wasi(l)
}

/// Shared data and queues ([`super::shared`]).
fn define_shared(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use super::shared::{SharedError, MAX_KEY, MAX_VALUE};
    fn status(e: SharedError) -> i32 {
        match e {
            SharedError::NotFound => NOT_FOUND,
            SharedError::CasMismatch => CAS_MISMATCH,
            SharedError::BadArgument => BAD_ARGUMENT,
            SharedError::Full => INTERNAL_FAILURE,
            SharedError::Empty => EMPTY,
        }
    }
    /// Guest bytes at (ptr, len) of at most `max` bytes.
    fn arg(c: &mut C<'_>, ptr: i32, len: i32, max: usize) -> Result<Vec<u8>, i32> {
        if len as u32 as usize > max {
            return Err(BAD_ARGUMENT);
        }
        read(c, ptr, len).ok_or(INVALID_MEMORY_ACCESS)
    }
    l.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, rp: i32, rl: i32, cas_ptr: i32| -> wasmtime::Result<i32> {
            let key = match arg(&mut c, kp, kl, MAX_KEY) {
                Ok(k) => k,
                Err(NOT_FOUND) | Err(BAD_ARGUMENT) => return Ok(NOT_FOUND),
                Err(s) => return Ok(s),
            };
            let (value, cas) = match c.data().shared.get(&key) {
                Ok(v) => v,
                Err(e) => return Ok(status(e)),
            };
            if !write_u32(&mut c, cas_ptr, cas) {
                return Ok(INVALID_MEMORY_ACCESS);
            }
            return_bytes(&mut c, &value, rp, rl)
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: C<'_>, kp: i32, kl: i32, vp: i32, vl: i32, cas: i32| {
            let key = match arg(&mut c, kp, kl, MAX_KEY) {
                Ok(k) => k,
                Err(s) => return s,
            };
            let value = match arg(&mut c, vp, vl, MAX_VALUE) {
                Ok(v) => v,
                Err(s) => return s,
            };
            match c.data().shared.set(&key, &value, cas as u32) {
                Ok(()) => OK,
                Err(e) => status(e),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: C<'_>, np: i32, nl: i32, ret: i32| {
            let name = match arg(&mut c, np, nl, MAX_KEY) {
                Ok(n) => n,
                Err(s) => return s,
            };
            let h = c.data();
            match h.shared.register_queue(&name, h.slot) {
                Ok(id) if write_u32(&mut c, ret, id) => OK,
                Ok(_) => INVALID_MEMORY_ACCESS,
                Err(e) => status(e),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: C<'_>, _vp: i32, _vl: i32, np: i32, nl: i32, ret: i32| {
            // Queues are the plugin's own: the VM id is not needed to find one.
            let name = match arg(&mut c, np, nl, MAX_KEY) {
                Ok(n) => n,
                Err(BAD_ARGUMENT) => return NOT_FOUND,
                Err(s) => return s,
            };
            match c.data().shared.resolve_queue(&name) {
                Ok(id) if write_u32(&mut c, ret, id) => OK,
                Ok(_) => INVALID_MEMORY_ACCESS,
                Err(e) => status(e),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: C<'_>, id: i32, vp: i32, vl: i32| {
            let value = match arg(&mut c, vp, vl, MAX_VALUE) {
                Ok(v) => v,
                Err(s) => return s,
            };
            let h = c.data();
            match h.shared.enqueue(id as u32, &value) {
                Ok(()) => {
                    h.timers.wake.notify_one();
                    OK
                }
                Err(e) => status(e),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: C<'_>, id: i32, rp: i32, rl: i32| -> wasmtime::Result<i32> {
            match c.data().shared.dequeue(id as u32) {
                Ok(v) => return_bytes(&mut c, &v, rp, rl),
                Err(e) => Ok(status(e)),
            }
        },
    )?;
    Ok(())
}

/// The metrics ABI ([`super::custom_metrics`]).
fn define_metrics(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    use super::custom_metrics::{MetricError, MAX_NAME};
    fn status(r: Result<(), MetricError>) -> i32 {
        match r {
            Ok(()) => OK,
            Err(MetricError::NotFound) => NOT_FOUND,
            Err(MetricError::BadArgument) => BAD_ARGUMENT,
        }
    }
    l.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: C<'_>, kind: i32, name: i32, name_len: i32, ret: i32| {
            if name_len as usize > MAX_NAME {
                return BAD_ARGUMENT;
            }
            let Some(bytes) = read(&mut c, name, name_len) else {
                return INVALID_MEMORY_ACCESS;
            };
            let Ok(name) = String::from_utf8(bytes) else {
                return BAD_ARGUMENT;
            };
            match c.data().metrics.define(kind, &name) {
                Ok(id) if write_u32(&mut c, ret, id) => OK,
                Ok(_) => INVALID_MEMORY_ACCESS,
                Err(e) => status(Err(e)),
            }
        },
    )?;
    l.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: C<'_>, id: i32, offset: i64| status(c.data().metrics.increment(id as u32, offset)),
    )?;
    l.func_wrap(
        "env",
        "proxy_record_metric",
        |c: C<'_>, id: i32, value: i64| status(c.data().metrics.record(id as u32, value as u64)),
    )?;
    l.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: C<'_>, id: i32, ret: i32| match c.data().metrics.value(id as u32) {
            Ok(v) if write(&mut c, ret, &v.to_le_bytes()) => OK,
            Ok(_) => INVALID_MEMORY_ACCESS,
            Err(e) => status(Err(e)),
        },
    )?;
    Ok(())
}

fn define_wasi(l: &mut Linker<HostState>) -> wasmtime::Result<()> {
    const W: &str = "wasi_snapshot_preview1";
    l.func_wrap(
        W,
        "fd_write",
        |mut c: C<'_>, fd: i32, iovs: i32, n: i32, written: i32| {
            let mut total = 0u32;
            let mut text = Vec::new();
            for i in 0..n.clamp(0, 64) {
                let Some(iov) = read(&mut c, iovs + 8 * i, 8) else {
                    return 21; // EFAULT
                };
                let p = i32::from_le_bytes([iov[0], iov[1], iov[2], iov[3]]);
                let len = i32::from_le_bytes([iov[4], iov[5], iov[6], iov[7]]);
                let Some(b) = read(&mut c, p, len) else {
                    return 21;
                };
                total += b.len() as u32;
                text.extend_from_slice(&b);
            }
            if fd == 1 || fd == 2 {
                let plugin = c.data().plugin_name.clone();
                let msg = String::from_utf8_lossy(&text);
                tracing::info!(%plugin, fd, "{}", msg.trim_end());
            }
            if write_u32(&mut c, written, total) {
                0
            } else {
                21
            }
        },
    )?;
    for name in ["args_sizes_get", "environ_sizes_get"] {
        l.func_wrap(W, name, |mut c: C<'_>, a: i32, b: i32| {
            if write_u32(&mut c, a, 0) && write_u32(&mut c, b, 0) {
                0
            } else {
                21
            }
        })?;
    }
    for name in ["args_get", "environ_get"] {
        l.func_wrap(W, name, |_c: C<'_>, _a: i32, _b: i32| 0)?;
    }
    l.func_wrap(
        W,
        "clock_time_get",
        |mut c: C<'_>, _id: i32, _prec: i64, ret: i32| {
            if write(&mut c, ret, &now_nanos().to_le_bytes()) {
                0
            } else {
                21
            }
        },
    )?;
    l.func_wrap(W, "random_get", |mut c: C<'_>, p: i32, len: i32| {
        let mut b = vec![0u8; len.clamp(0, 1 << 16) as usize];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut b);
        if write(&mut c, p, &b) {
            0
        } else {
            21
        }
    })?;
    l.func_wrap(W, "sched_yield", |_c: C<'_>| 0)?;
    l.func_wrap(
        W,
        "proc_exit",
        |_c: C<'_>, code: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::new(ProcExit(code)))
        },
    )?;
    // AssemblyScript's abort(message, file, line, column).
    l.func_wrap(
        "env",
        "abort",
        |_c: C<'_>, _m: i32, _f: i32, line: i32, col: i32| -> wasmtime::Result<()> {
            Err(wasmtime::Error::msg(format!(
                "abort() at line {line}, column {col}"
            )))
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_request_and_source_attributes() {
        let mut h = HostState::new(&VmSettings::default());
        let mut fields = crate::fields::Fields::default();
        fields.append(b"user-agent", b"curl/8").unwrap();
        fields.append(b"x-request-id", b"abc-1").unwrap();
        h.http.request = Headers::request(&http::Method::GET, "/a/b?x=1&y", "svc", "http", fields);
        h.http.props = Some(Arc::new(ConnProps {
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            peer_id: Some("spiffe://td/ns/a/sa/b".into()),
        }));
        let get = |h: &HostState, path: &[&[u8]]| {
            h.property(path)
                .map(|c| String::from_utf8_lossy(c.as_bytes()).into_owned())
        };
        assert_eq!(
            get(&h, &[b"source", b"principal"]).as_deref(),
            Some("spiffe://td/ns/a/sa/b")
        );
        assert_eq!(get(&h, &[b"request", b"query"]).as_deref(), Some("x=1&y"));
        assert_eq!(get(&h, &[b"request", b"url_path"]).as_deref(), Some("/a/b"));
        assert_eq!(
            get(&h, &[b"request", b"useragent"]).as_deref(),
            Some("curl/8")
        );
        assert_eq!(get(&h, &[b"request", b"id"]).as_deref(), Some("abc-1"));
        assert_eq!(get(&h, &[b"request", b"referer"]), None);
        h.http.request =
            Headers::request(&http::Method::GET, "/", "svc", "http", Default::default());
        assert_eq!(get(&h, &[b"request", b"query"]).as_deref(), Some(""));
        // Plaintext: no principal.
        h.http.props = Some(Arc::new(ConnProps {
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            peer_id: None,
        }));
        assert_eq!(get(&h, &[b"source", b"principal"]), None);
    }
}
