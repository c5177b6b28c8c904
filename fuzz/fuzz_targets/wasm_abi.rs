//! The Proxy-Wasm host (node-dataplane `wasm/`) driven through its ABI by a plugin
//! that makes arbitrary calls: the input is a script of host calls with arbitrary
//! arguments, run by an interpreter module (written in WAT, compiled once) in every
//! callback the host delivers: request and response headers and bodies, timers,
//! queue notifications, done/log/delete.
//!
//! Each step of the script is 25 bytes: an op byte (which host function; its high
//! bit keeps every argument within the first 64 KiB of memory, so pointers are
//! mostly valid) and six little-endian i32 arguments. Every callback runs at most
//! 16 steps, continuing where the last stopped.
//!
//! Property: a plugin can fail (trap, deadline, memory cap, refused call), never
//! the host: no panic, and every outcome is one the proxy knows how to send.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use weft_node_dataplane::fuzzing::wasm::{
    ConnProps, Headers, HttpState, Outcome, Plugin, Shared, WasmEngine, MAX_BODY_BYTES,
};
use weft_proto::pb;

/// (import module, name, parameter types) of every host function the script may
/// call; all return i32.
const HOST: &[(&str, &str, &str)] = &[
    ("env", "proxy_log", "i32 i32 i32"),
    ("env", "proxy_get_property", "i32 i32 i32 i32"),
    ("env", "proxy_set_property", "i32 i32 i32 i32"),
    ("env", "proxy_get_buffer_bytes", "i32 i32 i32 i32 i32"),
    ("env", "proxy_get_buffer_status", "i32 i32 i32"),
    ("env", "proxy_set_buffer_bytes", "i32 i32 i32 i32 i32"),
    ("env", "proxy_get_header_map_value", "i32 i32 i32 i32 i32"),
    ("env", "proxy_get_header_map_pairs", "i32 i32 i32"),
    ("env", "proxy_get_header_map_size", "i32 i32"),
    ("env", "proxy_set_header_map_pairs", "i32 i32 i32"),
    ("env", "proxy_add_header_map_value", "i32 i32 i32 i32 i32"),
    (
        "env",
        "proxy_replace_header_map_value",
        "i32 i32 i32 i32 i32",
    ),
    ("env", "proxy_remove_header_map_value", "i32 i32 i32"),
    (
        "env",
        "proxy_send_local_response",
        "i32 i32 i32 i32 i32 i32 i32 i32",
    ),
    ("env", "proxy_define_metric", "i32 i32 i32 i32"),
    ("env", "proxy_increment_metric", "i32 i64"),
    ("env", "proxy_record_metric", "i32 i64"),
    ("env", "proxy_get_metric", "i32 i32"),
    ("env", "proxy_get_shared_data", "i32 i32 i32 i32 i32"),
    ("env", "proxy_set_shared_data", "i32 i32 i32 i32 i32"),
    ("env", "proxy_register_shared_queue", "i32 i32 i32"),
    ("env", "proxy_resolve_shared_queue", "i32 i32 i32 i32 i32"),
    ("env", "proxy_enqueue_shared_queue", "i32 i32 i32"),
    ("env", "proxy_dequeue_shared_queue", "i32 i32 i32"),
    ("env", "proxy_set_tick_period_milliseconds", "i32"),
    ("env", "proxy_get_current_time_nanoseconds", "i32"),
    ("env", "proxy_continue_stream", "i32"),
    ("env", "proxy_get_log_level", "i32"),
    (
        "env",
        "proxy_call_foreign_function",
        "i32 i32 i32 i32 i32 i32",
    ),
    ("wasi_snapshot_preview1", "fd_write", "i32 i32 i32 i32"),
    ("wasi_snapshot_preview1", "random_get", "i32 i32"),
];

/// The interpreter module's text.
fn interpreter() -> String {
    let mut imports = String::new();
    let mut dispatch = String::new();
    for (i, (module, name, params)) in HOST.iter().enumerate() {
        imports += &format!(
            "  (import \"{module}\" \"{name}\" (func $f{i} (param {params}) (result i32)))\n"
        );
        let args: String = params
            .split(' ')
            .enumerate()
            .map(|(k, t)| match t {
                "i64" => format!(" (i64.extend_i32_s (local.get $a{}))", k % 6),
                _ => format!(" (local.get $a{})", k % 6),
            })
            .collect();
        dispatch += &format!(
            "        (if (i32.eq (local.get $op) (i32.const {i})) (then (drop (call $f{i}{args}))))\n"
        );
    }
    let loads: String = (0..6)
        .map(|k| {
            format!(
                "        (local.set $a{k} (i32.load (i32.add (local.get $p) (i32.const {}))))\n\
                 \x20       (if (local.get $masked) (then (local.set $a{k} (i32.and (local.get $a{k}) (i32.const 65535)))))\n",
                1 + 4 * k
            )
        })
        .collect();
    format!(
        r#"(module
{imports}  (memory (export "memory") 2 4)
  ;; the script lives at 65536; the guest allocator hands out [32768, 65536)
  (global $heap (mut i32) (i32.const 32768))
  (global $pc (mut i32) (i32.const 0))
  (global $len (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (if (i32.gt_u (local.get $n) (i32.sub (i32.const 65536) (global.get $heap)))
      (then (global.set $heap (i32.const 32768))))
    (if (i32.gt_u (local.get $n) (i32.const 32768)) (then (return (i32.const 0))))
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_configure") (param $root i32) (param $size i32) (result i32)
    (if (i32.eqz (call $f3 (i32.const 7) (i32.const 0) (i32.const 65536) (i32.const 256) (i32.const 260)))
      (then
        (global.set $len (i32.load (i32.const 260)))
        (if (i32.gt_u (global.get $len) (i32.const 65536)) (then (global.set $len (i32.const 65536))))
        (memory.copy (i32.const 65536) (i32.load (i32.const 256)) (global.get $len))))
    (i32.const 1))
  (func $run (result i32)
    (local $n i32) (local $p i32) (local $op i32) (local $masked i32)
    (local $a0 i32) (local $a1 i32) (local $a2 i32) (local $a3 i32) (local $a4 i32) (local $a5 i32)
    (block $done
      (loop $step
        (br_if $done (i32.ge_u (local.get $n) (i32.const 16)))
        (br_if $done (i32.gt_u (i32.add (global.get $pc) (i32.const 25)) (global.get $len)))
        (local.set $p (i32.add (i32.const 65536) (global.get $pc)))
        (local.set $op (i32.load8_u (local.get $p)))
        (local.set $masked (i32.and (local.get $op) (i32.const 128)))
        (local.set $op (i32.rem_u (i32.and (local.get $op) (i32.const 127)) (i32.const {count})))
{loads}{dispatch}        (global.set $pc (i32.add (global.get $pc) (i32.const 25)))
        (local.set $n (i32.add (local.get $n) (i32.const 1)))
        (br $step)))
    ;; Continue, or now and then Pause (a failure for this host)
    (i32.and (i32.eq (i32.and (global.get $pc) (i32.const 255)) (i32.const 250)) (i32.const 1)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (call $run))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32) (call $run))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (call $run))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32) (call $run))
  (func (export "proxy_on_tick") (param i32) (drop (call $run)))
  (func (export "proxy_on_queue_ready") (param i32 i32) (drop (call $run)))
  (func (export "proxy_on_done") (param i32) (result i32) (drop (call $run)) (i32.const 1))
  (func (export "proxy_on_log") (param i32) (drop (call $run)))
  (func (export "proxy_on_delete") (param i32) (drop (call $run))))"#,
        count = HOST.len()
    )
}

struct Harness {
    engine: Arc<WasmEngine>,
    module: Vec<u8>,
    /// Held so the engine's cache (weak references) keeps the compiled module:
    /// every input reuses it instead of compiling it again.
    _compiled: Arc<dyn std::any::Any + Send + Sync>,
}

fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let engine = WasmEngine::for_workers(2).expect("the wasm engine");
        let module = wat::parse_str(interpreter()).expect("the interpreter module");
        let compiled = engine
            .compile("interpreter", &module)
            .expect("the interpreter compiles");
        Harness {
            engine,
            module,
            _compiled: compiled,
        }
    })
}

fn request() -> Box<HttpState> {
    let mut request = Headers::default();
    request.set_request(&http::Method::POST, "/a/b?c=d", "svc.ns", "http");
    Box::new(HttpState {
        request,
        props: Some(Arc::new(ConnProps {
            source: "10.0.0.1:40000".parse().expect("address"),
            destination: "10.0.0.2:8080".parse().expect("address"),
            peer_id: Some("spiffe://cluster.local/ns/a/sa/b".into()),
        })),
        ..Default::default()
    })
}

fn check_reply(status: u16) {
    assert!(
        (200..=599).contains(&status),
        "a local reply with status {status}"
    );
}

fuzz_target!(|script: &[u8]| {
    if script.len() > 16 * 1024 {
        return;
    }
    let h = harness();
    let spec = pb::WasmPlugin {
        name: "fuzz".into(),
        namespace: "ns".into(),
        sha256: "interpreter".into(),
        plugin_name: "fuzz".into(),
        plugin_config: String::new(),
        fail_strategy: "FAIL_RELOAD".into(),
        max_cpu_millis_per_callback: 50,
        max_memory_bytes: 4 << 16,
        ..Default::default()
    };
    let mut spec = spec;
    // The script reaches the module as its plugin configuration (bytes, not text).
    spec.plugin_config = String::from_utf8_lossy(script).into_owned();
    let shared: Arc<Shared> = Arc::default();
    let p = Plugin::new(Ok(&h.engine), spec, Ok(&h.module), 2, shared);
    let later = Instant::now() + Duration::from_secs(3600);
    for _ in 0..4 {
        let mut http = request();
        let (o, handle) = p.on_request(&mut http, false);
        if let Outcome::Reply(r) = &o {
            check_reply(r.status);
        }
        if let Some(handle) = handle {
            // The request's body: the script's first bytes.
            http.request_body = script[..script.len().min(64)].to_vec();
            if let Some(r) = p.on_body(handle, &mut http, false) {
                check_reply(r.status);
            }
            assert!(http.request_body.len() <= MAX_BODY_BYTES);
            http.response.set_response(200, Default::default());
            if let Some(r) = p.on_response(handle, &mut http, false) {
                check_reply(r.status);
            }
            http.response_body = script[script.len() / 2..].to_vec();
            if let Some(r) = p.on_body(handle, &mut http, true) {
                check_reply(r.status);
            }
            assert!(http.response_body.len() <= MAX_BODY_BYTES);
            p.finish(handle, &mut http);
        }
        p.run_due(later);
    }
    let (keys, bytes) = p.shared().data_usage();
    assert!(
        keys <= 1024 && bytes <= 1 << 20,
        "{keys} keys, {bytes} bytes"
    );
});
