//! Host tests with WAT modules: the ABI calls, local replies, header rewrites,
//! properties, and every way a plugin can fail.

use super::abi::{ConnProps, HttpState};
use super::engine::WasmEngine;
use super::headers::Headers;
use super::plugin::{Outcome, Plugin};
use super::WasmError;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use weft_proto::pb;

/// A plugin module: `req` and `resp` are the bodies of the request/response headers
/// callbacks (returning an i32 action); `extra` adds functions/exports.
pub(crate) fn module(req: &str, resp: &str, extra: &str) -> String {
    format!(
        r#"(module
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_property" (func $prop (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_call_foreign_function" (func $foreign (param i32 i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_replace_header_map_value" (func $replace (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_remove_header_map_value" (func $remove (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_pairs" (func $pairs (param i32 i32 i32) (result i32)))
  (import "env" "proxy_set_header_map_pairs" (func $set (param i32 i32 i32) (result i32)))
  (import "env" "proxy_get_header_map_size" (func $size (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) ":path")
  (data (i32.const 16) "/deny")
  (data (i32.const 32) "x-wat")
  (data (i32.const 48) "yes")
  (data (i32.const 64) "denied by wat")
  (data (i32.const 96) "connection\00uri_san_peer_certificate")
  (data (i32.const 144) "x-peer")
  (data (i32.const 160) "x-config")
  (data (i32.const 176) "x-unimpl")
  (data (i32.const 512) "/rewritten") ;; from here: HEADER_CALLS_*
  (data (i32.const 528) ":method")
  (data (i32.const 544) "x-in")
  (data (i32.const 560) "v")
  (data (i32.const 576) "User-Agent")
  (data (i32.const 592) "x-status")
  (data (i32.const 608) ":status")
  (data (i32.const 624) "503")
  (data (i32.const 640) "99")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32)
    (global.set $heap (i32.const 4096)))
  (func $is_deny (result i32)
    (drop (call $get (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 200) (i32.const 204)))
    (i32.and
      (i32.eq (i32.load (i32.const 204)) (i32.const 5))
      (i32.and
        (i32.eq (i32.load (i32.load (i32.const 200))) (i32.load (i32.const 16)))
        (i32.eq (i32.load8_u (i32.add (i32.load (i32.const 200)) (i32.const 4))) (i32.load8_u (i32.const 20))))))
  (func (export "proxy_on_request_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {req})
  (func (export "proxy_on_response_headers") (param $ctx i32) (param $n i32) (param $eos i32) (result i32)
    {resp})
  {extra}
)"#
    )
}

const DENY_PATH: &str = r#"
    (if (call $is_deny)
      (then (drop (call $reply (i32.const 403) (i32.const 64) (i32.const 13) (i32.const 64) (i32.const 13) (i32.const 0) (i32.const 0) (i32.const -1)))))
    (i32.const 0)"#;

/// Adds `x-wat: yes`, `x-peer: <peer id>`, `x-config: <plugin config>` and
/// `x-unimpl: <status of an unimplemented call>` (as one digit) to the response.
const ADD_HEADERS: &str = r#"
    (drop (call $add (i32.const 2) (i32.const 32) (i32.const 5) (i32.const 48) (i32.const 3)))
    (if (i32.eqz (call $prop (i32.const 96) (i32.const 35) (i32.const 208) (i32.const 212)))
      (then (drop (call $add (i32.const 2) (i32.const 144) (i32.const 6) (i32.load (i32.const 208)) (i32.load (i32.const 212))))))
    (if (i32.eqz (call $buf (i32.const 7) (i32.const 0) (i32.const 1000) (i32.const 216) (i32.const 220)))
      (then (drop (call $add (i32.const 2) (i32.const 160) (i32.const 8) (i32.load (i32.const 216)) (i32.load (i32.const 220))))))
    (i32.store8 (i32.const 224) (i32.add (i32.const 48) (i32.rem_u (call $foreign (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)) (i32.const 10))))
    (drop (call $add (i32.const 2) (i32.const 176) (i32.const 8) (i32.const 224) (i32.const 1)))
    (i32.const 0)"#;

fn spec(fail: &str) -> pb::WasmPlugin {
    pb::WasmPlugin {
        name: "wat".into(),
        namespace: "ns".into(),
        sha256: "x".into(),
        plugin_name: "root".into(),
        plugin_config: r#"{"k":"v"}"#.into(),
        fail_strategy: fail.into(),
        max_cpu_millis_per_callback: 20,
        max_memory_bytes: 1 << 20,
        ..Default::default()
    }
}

fn plugin(wat: &str, fail: &str) -> Plugin {
    plugin_in_phase(wat, fail, "")
}

/// [`plugin`] in this phase (`AUTHN`, `AUTHZ`, `STATS` or unspecified).
pub(crate) fn plugin_in_phase(wat: &str, fail: &str, phase: &str) -> Plugin {
    let engine = WasmEngine::new().unwrap();
    let bytes = wat::parse_str(wat).unwrap();
    // A distinct cache key per module text.
    let mut s = spec(fail);
    s.sha256 = format!("{:x}", text_key(wat));
    s.phase = phase.into();
    Plugin::new(Ok(&engine), s, Ok(&bytes), 2, Default::default())
}

fn text_key(s: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    s.hash(&mut h);
    h.finish()
}

fn request(path: &str) -> Box<HttpState> {
    Box::new(HttpState {
        request: Headers::request(&http::Method::GET, path, "svc", "http", Default::default()),
        props: Some(Arc::new(ConnProps {
            source: "10.0.0.1:40000".parse().unwrap(),
            destination: "10.0.0.2:8080".parse().unwrap(),
            peer_id: Some("spiffe://td/ns/a/sa/b".into()),
        })),
        ..Default::default()
    })
}

fn ok_response() -> Headers {
    Headers::response(200, Default::default())
}

fn header(h: &Headers, k: &str) -> Option<String> {
    h.get(k.as_bytes())
        .map(|v| String::from_utf8(v.to_vec()).unwrap())
}

#[test]
fn local_reply_header_rewrite_properties_and_config() {
    let p = plugin(&module(DENY_PATH, ADD_HEADERS, ""), "FAIL_CLOSE");
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    for _ in 0..3 {
        let mut http = request("/deny");
        let (o, h) = p.on_request(&mut http, true);
        match o {
            Outcome::Reply(r) => {
                assert_eq!(r.status, 403);
                assert_eq!(r.body, b"denied by wat");
            }
            o => panic!("expected a local reply, got {o:?}"),
        }
        p.finish(h.unwrap(), &mut http);

        let mut http = request("/ok");
        let (o, h) = p.on_request(&mut http, true);
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        let h = h.unwrap();
        http.response = ok_response();
        assert!(p.on_response(h, &mut http, false).is_none());
        assert_eq!(header(&http.response, "x-wat").as_deref(), Some("yes"));
        assert_eq!(
            header(&http.response, "x-peer").as_deref(),
            Some("spiffe://td/ns/a/sa/b")
        );
        assert_eq!(
            header(&http.response, "x-config").as_deref(),
            Some(r#"{"k":"v"}"#)
        );
        // proxy_call_foreign_function is linked but UNIMPLEMENTED (12 -> "2").
        assert_eq!(header(&http.response, "x-unimpl").as_deref(), Some("2"));
        p.finish(h, &mut http);
    }
    assert!(p.stats.errors.lock().unwrap().is_empty());
    assert_eq!(p.stats.local_replies.load(Ordering::Relaxed), 3);
}

const LOOP: &str = "(loop $l (br $l)) (i32.const 0)";

#[test]
fn infinite_loop_is_stopped_at_the_deadline() {
    for (fail, first, later) in [
        ("FAIL_OPEN", None, None),
        ("FAIL_CLOSE", Some(500), Some(503)),
        ("FAIL_RELOAD", Some(500), Some(503)),
    ] {
        let p = plugin(&module(LOOP, "(i32.const 0)", ""), fail);
        let t = std::time::Instant::now();
        let (o, _) = p.on_request(&mut request("/"), true);
        let took = t.elapsed();
        // Never before its 20 ms deadline: a tick only makes the call check its time.
        assert!(
            took >= std::time::Duration::from_millis(20),
            "{fail}: stopped after {took:?}, before its deadline"
        );
        assert!(
            took < std::time::Duration::from_millis(500),
            "{fail}: {took:?}"
        );
        let status = |o: &Outcome| match o {
            Outcome::Reply(r) => Some(r.status),
            Outcome::Skipped => None,
            Outcome::Continue => Some(0),
        };
        assert_eq!(status(&o), first, "{fail}");
        // The next request: FAIL_OPEN skips; FAIL_CLOSE stays failed; FAIL_RELOAD
        // waits out its crash-loop backoff on this slot (the other slot is fresh).
        let (o2, _) = p.on_request(&mut request("/"), true);
        let (o3, _) = p.on_request(&mut request("/"), true);
        if fail == "FAIL_RELOAD" {
            assert!([status(&o2), status(&o3)].contains(&later), "{o2:?} {o3:?}");
        } else {
            assert_eq!(status(&o2), later, "{fail}");
        }
        assert!(p.stats.errors.lock().unwrap()["deadline"] >= 1);
    }
}

#[test]
fn the_epoch_ticker_parks_when_idle_and_still_bounds_the_next_callback() {
    // The plugin's first instance starts (plugin code runs), then nothing runs.
    let p = plugin(&module(LOOP, "(i32.const 0)", ""), "FAIL_OPEN");
    let ticker = p.engine_ticker().expect("engine");
    let t = std::time::Instant::now();
    while !ticker.is_parked() {
        assert!(
            t.elapsed() < std::time::Duration::from_secs(5),
            "the ticker did not park after 5 s without plugin code"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // An infinite loop now: the call wakes the ticker, so its deadline still fires
    // (in a thread, so that a regression fails instead of hanging the suite).
    let (tx, rx) = std::sync::mpsc::channel();
    let p = Arc::new(p);
    let p2 = p.clone();
    std::thread::spawn(move || {
        let (o, _) = p2.on_request(&mut request("/"), true);
        let _ = tx.send(o);
    });
    let o = rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .expect("the looping callback was not stopped: the parked ticker never woke");
    assert!(matches!(o, Outcome::Skipped), "{o:?}");
    assert_eq!(p.stats.errors.lock().unwrap()["deadline"], 1);
}

#[test]
fn memory_bomb_is_capped() {
    let bomb =
        "(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (i32.const 0)";
    let p = plugin(&module(bomb, "(i32.const 0)", ""), "FAIL_CLOSE");
    let (o, _) = p.on_request(&mut request("/"), true);
    assert!(
        matches!(o, Outcome::Reply(ref r) if r.status == 500),
        "{o:?}"
    );
    assert_eq!(p.stats.errors.lock().unwrap()["memory"], 1);
}

#[test]
fn proc_exit_kills_only_the_instance() {
    let exit = "(call $exit (i32.const 3)) (i32.const 0)";
    let p = plugin(&module(exit, "(i32.const 0)", ""), "FAIL_OPEN");
    let (o, _) = p.on_request(&mut request("/"), true);
    assert!(matches!(o, Outcome::Skipped), "{o:?}");
    assert_eq!(p.stats.errors.lock().unwrap()["proc_exit"], 1);
    assert!(p
        .stats
        .last_error
        .lock()
        .unwrap()
        .as_deref()
        .unwrap()
        .contains("proc_exit(3)"));
}

#[test]
fn trap_in_each_callback() {
    let ok = "(i32.const 0)";
    let trap = "(unreachable)";
    let cases: Vec<(&str, String)> = vec![
        ("request headers", module(trap, ok, "")),
        ("response headers", module(ok, "(unreachable)", "")),
        (
            "on_done",
            module(
                ok,
                ok,
                r#"(func (export "proxy_on_done") (param i32) (result i32) (unreachable))"#,
            ),
        ),
        (
            "on_log",
            module(
                ok,
                ok,
                r#"(func (export "proxy_on_log") (param i32) (unreachable))"#,
            ),
        ),
        (
            "on_delete",
            module(
                ok,
                ok,
                r#"(func (export "proxy_on_delete") (param i32) (unreachable))"#,
            ),
        ),
        (
            "on_configure",
            module(
                ok,
                ok,
                r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (unreachable))"#,
            ),
        ),
        (
            "on_vm_start",
            module(
                ok,
                ok,
                r#"(func (export "proxy_on_vm_start") (param i32 i32) (result i32) (unreachable))"#,
            ),
        ),
        (
            "_initialize",
            module(ok, ok, r#"(func (export "_initialize") (unreachable))"#),
        ),
    ];
    for (what, wat) in cases {
        let p = plugin(&wat, "FAIL_CLOSE");
        let mut http = request("/");
        let (o, h) = p.on_request(&mut http, true);
        let mut failed = matches!(o, Outcome::Reply(ref r) if r.status >= 500);
        if let Some(h) = h {
            http.response = ok_response();
            if let Some(r) = p.on_response(h, &mut http, true) {
                failed |= r.status >= 500;
            }
            p.finish(h, &mut http);
        }
        let errors = p.stats.errors.lock().unwrap().clone();
        assert_eq!(errors.get("trap"), Some(&1), "{what}: {errors:?}");
        let (later, _) = p.on_request(&mut request("/"), true);
        failed |= matches!(later, Outcome::Reply(ref r) if r.status == 503);
        assert!(failed, "{what}: FAIL_CLOSE must answer 5xx");
    }
}

#[test]
fn configure_returning_false_is_a_load_failure() {
    let wat = module(
        "(i32.const 0)",
        "(i32.const 0)",
        r#"(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))"#,
    );
    let p = plugin(&wat, "FAIL_CLOSE");
    let (o, _) = p.on_request(&mut request("/"), true);
    assert!(
        matches!(o, Outcome::Reply(ref r) if r.status == 500),
        "{o:?}"
    );
    assert_eq!(p.stats.errors.lock().unwrap()["configure"], 1);
}

#[test]
fn missing_exports_and_abi_mismatch_are_load_errors() {
    let engine = WasmEngine::new().unwrap();
    let load = |wat: &str| {
        let bytes = wat::parse_str(wat).unwrap();
        Plugin::new(
            Ok(&engine),
            spec("FAIL_CLOSE"),
            Ok(&bytes),
            1,
            Default::default(),
        )
        .load_error()
        .cloned()
    };
    let no_abi = r#"(module (memory (export "memory") 1)
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#;
    assert!(matches!(load(no_abi), Some(WasmError::Abi(m)) if m.contains("no proxy_abi_version")));
    let old_abi = r#"(module (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_1_0"))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#;
    assert!(
        matches!(load(old_abi), Some(WasmError::Abi(m)) if m.contains("unsupported ABI proxy_abi_version_0_1_0"))
    );
    let no_alloc = r#"(module (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_2_0"))
        (func (export "proxy_on_context_create") (param i32 i32)))"#;
    assert!(
        matches!(load(no_alloc), Some(WasmError::Abi(m)) if m.contains("proxy_on_memory_allocate"))
    );
    let foreign_import = r#"(module (import "other" "fn" (func))
        (memory (export "memory") 1)
        (func (export "proxy_abi_version_0_2_1"))
        (func (export "proxy_on_context_create") (param i32 i32))
        (func (export "malloc") (param i32) (result i32) (i32.const 0)))"#;
    assert!(
        matches!(load(foreign_import), Some(WasmError::Abi(m)) if m.contains("unknown import other.fn"))
    );
    let garbage = Plugin::new(
        Ok(&engine),
        spec("FAIL_OPEN"),
        Ok(b"\0asm\x01\0\0\0\xff"),
        1,
        Default::default(),
    );
    assert!(matches!(garbage.load_error(), Some(WasmError::Compile(_))));
    // A plugin that cannot load: FAIL_OPEN skips it, FAIL_CLOSE refuses with 503.
    let (o, _) = garbage.on_request(&mut request("/"), true);
    assert!(matches!(o, Outcome::Skipped));
    let closed = Plugin::new(
        Ok(&engine),
        spec("FAIL_CLOSE"),
        Ok(b"junk"),
        1,
        Default::default(),
    );
    let (o, _) = closed.on_request(&mut request("/"), true);
    assert!(matches!(o, Outcome::Reply(ref r) if r.status == 503));
    // Without an engine (it could not start), a plugin cannot run: it fails closed too.
    let no_engine = Plugin::new(
        Err(WasmError::Engine("no epoch thread".into())),
        spec("FAIL_CLOSE"),
        Ok(b"junk"),
        1,
        Default::default(),
    );
    assert!(matches!(no_engine.load_error(), Some(WasmError::Engine(_))));
    let (o, _) = no_engine.on_request(&mut request("/"), true);
    assert!(matches!(o, Outcome::Reply(ref r) if r.status == 503));
}

#[test]
fn failed_reload_restarts_after_backoff() {
    // Traps on /deny, continues otherwise.
    let req = "(if (call $is_deny) (then (unreachable))) (i32.const 0)";
    let engine = WasmEngine::new().unwrap();
    let bytes = wat::parse_str(module(req, "(i32.const 0)", "")).unwrap();
    let p = Plugin::new(
        Ok(&engine),
        spec("FAIL_RELOAD"),
        Ok(&bytes),
        1,
        Default::default(),
    );
    let (o, _) = p.on_request(&mut request("/deny"), true);
    assert!(matches!(o, Outcome::Reply(ref r) if r.status == 500));
    let (o, _) = p.on_request(&mut request("/ok"), true);
    assert!(
        matches!(o, Outcome::Reply(ref r) if r.status == 503),
        "backoff: {o:?}"
    );
    std::thread::sleep(std::time::Duration::from_millis(150));
    let (o, h) = p.on_request(&mut request("/ok"), true);
    assert!(matches!(o, Outcome::Continue), "{o:?}");
    p.finish(h.unwrap(), &mut request("/ok"));
    assert_eq!(p.stats.restarts.load(Ordering::Relaxed), 1);
}

#[test]
fn growing_instances_are_recycled_not_failed() {
    // Leaks one page per request, like a leaky SDK; the cap is 1 MiB (16 pages).
    let leak = "(drop (memory.grow (i32.const 1))) (i32.const 0)";
    let p = plugin(&module(leak, "(i32.const 0)", ""), "FAIL_CLOSE");
    for _ in 0..100 {
        let mut http = request("/");
        let (o, h) = p.on_request(&mut http, true);
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        p.finish(h.unwrap(), &mut http);
    }
    assert!(p.stats.recycled.load(Ordering::Relaxed) >= 5);
    assert!(p.stats.errors.lock().unwrap().is_empty());
}

#[test]
fn plugins_run_by_phase_then_priority() {
    let engine = WasmEngine::new().unwrap();
    let mk = |name: &str, phase: &str, priority: i32| {
        let mut s = spec("FAIL_OPEN");
        s.name = name.into();
        s.phase = phase.into();
        s.priority = priority;
        Arc::new(Plugin::new(
            Ok(&engine),
            s,
            Err(WasmError::Unavailable("test".into())),
            1,
            Default::default(),
        ))
    };
    let mut v = vec![
        mk("stats", "STATS", 100),
        mk("none", "", 0),
        mk("authz-low", "AUTHZ", 1),
        mk("authn", "AUTHN", -5),
        mk("authz-high", "AUTHZ", 9),
    ];
    super::chain::order(&mut v);
    let ids: Vec<&str> = v.iter().map(|p| p.spec.name.as_str()).collect();
    assert_eq!(ids, ["authn", "authz-high", "authz-low", "stats", "none"]);
    assert!(v[2].phase.before_authz() && !v[3].phase.before_authz());
}

/// Changes a plugin makes through every header-map call, and the statuses it gets:
/// on the request it replaces `:path`, adds a second `:path`, removes `:method`,
/// replaces `x-in`, removes `User-Agent`, reads all pairs, their size, and sets
/// them back; on the response it sets `:status` to 99, then to 503. Each status
/// is recorded as a digit in an `x-status` header.
const HEADER_CALLS_REQUEST: &str = r#"
    (call $digit (i32.const 1000) (call $replace (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 512) (i32.const 10)))
    (call $digit (i32.const 1001) (call $add (i32.const 0) (i32.const 0) (i32.const 5) (i32.const 512) (i32.const 10)))
    (call $digit (i32.const 1002) (call $remove (i32.const 0) (i32.const 528) (i32.const 7)))
    (call $digit (i32.const 1003) (call $replace (i32.const 0) (i32.const 544) (i32.const 4) (i32.const 560) (i32.const 1)))
    (call $digit (i32.const 1004) (call $remove (i32.const 0) (i32.const 576) (i32.const 10)))
    (call $digit (i32.const 1005) (call $pairs (i32.const 0) (i32.const 700) (i32.const 704)))
    (call $digit (i32.const 1006) (call $size (i32.const 0) (i32.const 708)))
    (call $digit (i32.const 1007) (i32.ne (i32.load (i32.const 704)) (i32.load (i32.const 708))))
    (call $digit (i32.const 1008) (call $set (i32.const 0) (i32.load (i32.const 700)) (i32.load (i32.const 704))))
    (drop (call $add (i32.const 0) (i32.const 592) (i32.const 8) (i32.const 1000) (i32.const 9)))
    (i32.const 0)"#;

const HEADER_CALLS_RESPONSE: &str = r#"
    (call $digit (i32.const 1100) (call $replace (i32.const 2) (i32.const 608) (i32.const 7) (i32.const 640) (i32.const 2)))
    (call $digit (i32.const 1101) (call $replace (i32.const 2) (i32.const 608) (i32.const 7) (i32.const 624) (i32.const 3)))
    (drop (call $add (i32.const 2) (i32.const 592) (i32.const 8) (i32.const 1100) (i32.const 2)))
    (i32.const 0)"#;

/// The digit writer the two bodies above use.
const HEADER_CALLS_EXTRA: &str = r#"
  (func $digit (param $at i32) (param $v i32)
    (i32.store8 (local.get $at) (i32.add (i32.const 48) (local.get $v))))"#;

#[test]
fn header_map_calls_change_the_message_and_refuse_what_it_cannot_carry() {
    let wat = module(
        HEADER_CALLS_REQUEST,
        HEADER_CALLS_RESPONSE,
        HEADER_CALLS_EXTRA,
    );
    let p = plugin(&wat, "FAIL_CLOSE");
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    let mut http = request("/original");
    http.request.fields.append(b"user-agent", b"curl").unwrap();
    http.request.fields.append(b"x-in", b"old").unwrap();
    let (o, h) = p.on_request(&mut http, true);
    assert!(matches!(o, Outcome::Continue), "{o:?}");
    // replace :path OK; add :path and remove :method BAD_ARGUMENT (2); the rest OK,
    // and the size the plugin read equals the pairs' length.
    assert_eq!(
        header(&http.request, "x-status").as_deref(),
        Some("022000000")
    );
    assert_eq!(http.request.pseudo(":path"), Some("/rewritten"));
    assert_eq!(http.request.pseudo(":method"), Some("GET"));
    let fields: Vec<(String, String)> = http
        .request
        .fields
        .iter()
        .map(|(k, v)| {
            (
                String::from_utf8(k.to_vec()).unwrap(),
                String::from_utf8(v.to_vec()).unwrap(),
            )
        })
        .collect();
    assert_eq!(
        fields,
        [
            ("x-in".to_string(), "v".to_string()),
            ("x-status".to_string(), "022000000".to_string())
        ]
    );
    http.response = ok_response();
    assert!(p.on_response(h.unwrap(), &mut http, false).is_none());
    // :status 99 is refused, 503 accepted.
    assert_eq!(header(&http.response, "x-status").as_deref(), Some("20"));
    assert_eq!(http.response.pseudo(":status"), Some("503"));
    p.finish(h.unwrap(), &mut http);
    assert!(p.stats.errors.lock().unwrap().is_empty());
}

/// A module whose request-headers callback stays busy for `busy_ms` (reading the
/// host's clock), then continues: a plugin that spends its whole CPU budget on every
/// request without ever failing.
fn busy_module(busy_ms: u64) -> String {
    format!(
        r#"(module
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func $t (result i64) (drop (call $now (i32.const 0))) (i64.load (i32.const 0)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $end i64)
    (local.set $end (i64.add (call $t) (i64.const {})))
    (loop $l (br_if $l (i64.lt_u (call $t) (local.get $end))))
    (i32.const 0)))"#,
        busy_ms * 1_000_000
    )
}

/// One plugin's callbacks run 150 ms each (under its 200 ms deadline), requested
/// from 8 connections at once on an agent runtime of 2 worker threads, while
/// another connection on the same runtime does loopback round trips: those keep
/// completing promptly. Before, every callback held its worker thread for 150 ms,
/// so both workers were held nearly all the time and the other connection waited
/// behind them (round trips of 150 ms and more).
#[test]
fn a_runaway_plugin_does_not_stall_other_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::time::{Duration, Instant};
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let engine = WasmEngine::for_workers(2).unwrap();
    let mut s = spec("FAIL_OPEN");
    s.max_cpu_millis_per_callback = 200;
    let wat = busy_module(150);
    s.sha256 = format!("{:x}", text_key(&wat));
    let bytes = wat::parse_str(&wat).unwrap();
    let p = Arc::new(Plugin::new(
        Ok(&engine),
        s,
        Ok(&bytes),
        2,
        Default::default(),
    ));
    let worst = rt.block_on(async move {
        let until = Instant::now() + Duration::from_millis(2500);
        // 8 connections through the plugin (each yields between requests, as a
        // connection waiting for its next request does).
        let mut hammers = Vec::new();
        for _ in 0..8 {
            let p = p.clone();
            hammers.push(tokio::spawn(async move {
                let mut outcomes = Vec::new();
                while Instant::now() < until {
                    let mut http = request("/");
                    let (o, h) = p.on_request(&mut http, true);
                    if let Some(h) = h {
                        p.finish(h, &mut http);
                    }
                    outcomes.push(matches!(o, Outcome::Continue));
                    tokio::task::yield_now().await;
                }
                outcomes
            }));
        }
        // Another connection: an echo over loopback, one round trip every 10 ms.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut b = [0u8; 1];
            while s.read_exact(&mut b).await.is_ok() {
                if s.write_all(&b).await.is_err() {
                    return;
                }
            }
        });
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut worst = Duration::ZERO;
        let mut trips = 0;
        while Instant::now() < until {
            let t = Instant::now();
            c.write_all(b"x").await.unwrap();
            let mut b = [0u8; 1];
            c.read_exact(&mut b).await.unwrap();
            worst = worst.max(t.elapsed());
            trips += 1;
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut continued = 0;
        for h in hammers {
            continued += h.await.unwrap().iter().filter(|c| **c).count();
        }
        // The plugin did run, to the end of each callback, and was seen slow.
        assert!(
            continued >= 5,
            "only {continued} requests went through the plugin"
        );
        assert!(p.stats.caught_slow.load(Ordering::Relaxed) >= 1);
        assert!(p.is_slow());
        assert!(trips >= 50, "{trips} round trips");
        worst
    });
    assert!(
        worst < std::time::Duration::from_millis(100),
        "a round trip of another connection took {worst:?} while the plugin ran"
    );
}

/// The metrics ABI from a plugin: a counter and a histogram defined at each request
/// (the same ids every time), the counter read back through `proxy_get_metric` and
/// returned in the response header `x-count` as one digit; an invalid name refused.
#[test]
fn plugins_define_and_update_their_own_metrics() {
    let wat = r#"(module
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (import "env" "proxy_record_metric" (func $record (param i32 i64) (result i32)))
  (import "env" "proxy_get_metric" (func $get (param i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 0) "hits")
  (data (i32.const 16) "sizes")
  (data (i32.const 32) "bad name")
  (data (i32.const 48) "x-count")
  (data (i32.const 64) "x-bad")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 0) (i32.const 4) (i32.const 200)))
    (drop (call $define (i32.const 2) (i32.const 16) (i32.const 5) (i32.const 204)))
    (drop (call $inc (i32.load (i32.const 200)) (i64.const 1)))
    (drop (call $record (i32.load (i32.const 204)) (i64.const 42)))
    (i32.const 0))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (drop (call $get (i32.load (i32.const 200)) (i32.const 208)))
    (i32.store8 (i32.const 216) (i32.add (i32.const 48) (i32.wrap_i64 (i64.load (i32.const 208)))))
    (drop (call $add (i32.const 2) (i32.const 48) (i32.const 7) (i32.const 216) (i32.const 1)))
    ;; a name with a space: BAD_ARGUMENT (2)
    (i32.store8 (i32.const 217) (i32.add (i32.const 48) (call $define (i32.const 0) (i32.const 32) (i32.const 8) (i32.const 220))))
    (drop (call $add (i32.const 2) (i32.const 64) (i32.const 5) (i32.const 217) (i32.const 1)))
    (i32.const 0)))"#;
    let p = plugin(wat, "FAIL_CLOSE");
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    for i in 1..=3 {
        let mut http = request("/");
        let (o, h) = p.on_request(&mut http, true);
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        let h = h.unwrap();
        http.response = ok_response();
        assert!(p.on_response(h, &mut http, false).is_none());
        assert_eq!(
            header(&http.response, "x-count"),
            Some(i.to_string()),
            "request {i}"
        );
        assert_eq!(header(&http.response, "x-bad").as_deref(), Some("2"));
        p.finish(h, &mut http);
    }
    let all = p.custom_metrics().all();
    let names: Vec<&str> = all.iter().map(|m| m.name.as_str()).collect();
    assert_eq!(names, ["hits", "sizes"]);
    assert_eq!(all[0].value(), 3);
    let h = all[1].histogram();
    assert_eq!((h.count, h.sum), (3, 126.0));
    // 42 falls in the (25, 50] bucket.
    assert_eq!(h.buckets.iter().find(|b| b.0 == 50.0).map(|b| b.1), Some(3));
    assert_eq!(h.buckets.iter().map(|b| b.1).sum::<u64>(), 3);
}

/// Counts requests in shared data with compare-and-swap, enqueues an item per
/// request, and counts its own ticks: the root-context half of the ABI.
const SHARED_WAT: &str = r#"(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (import "env" "proxy_get_shared_data" (func $sget (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_shared_data" (func $sset (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_register_shared_queue" (func $qreg (param i32 i32 i32) (result i32)))
  (import "env" "proxy_resolve_shared_queue" (func $qres (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_enqueue_shared_queue" (func $qput (param i32 i32 i32) (result i32)))
  (import "env" "proxy_dequeue_shared_queue" (func $qget (param i32 i32 i32) (result i32)))
  (import "env" "proxy_add_header_map_value" (func $add (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) "hits")
  (data (i32.const 16) "ticks")
  (data (i32.const 32) "q")
  (data (i32.const 48) "got")
  (data (i32.const 64) "x-cas")
  (data (i32.const 80) "x-queue")
  (data (i32.const 96) "item")
  (data (i32.const 112) "none")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32)
    (global.set $heap (i32.const 4096)))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 10)))
    (drop (call $qreg (i32.const 32) (i32.const 1) (i32.const 300)))
    (i32.const 1))
  ;; Adds 1 to the u32 at key (kp, kl) with the token read; returns the status
  ;; of a second write with the same token (CAS_MISMATCH once a value existed).
  (func $incr (param $kp i32) (param $kl i32) (result i32)
    (local $v i32)
    (i32.store (i32.const 400) (i32.const 0))
    (if (i32.eqz (call $sget (local.get $kp) (local.get $kl) (i32.const 404) (i32.const 408) (i32.const 400)))
      (then (local.set $v (i32.load (i32.load (i32.const 404))))))
    (i32.store (i32.const 412) (i32.add (local.get $v) (i32.const 1)))
    (drop (call $sset (local.get $kp) (local.get $kl) (i32.const 412) (i32.const 4) (i32.load (i32.const 400))))
    (call $sset (local.get $kp) (local.get $kl) (i32.const 412) (i32.const 4) (i32.load (i32.const 400))))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (i32.store8 (i32.const 420) (i32.add (i32.const 48) (call $incr (i32.const 0) (i32.const 4))))
    (drop (call $add (i32.const 0) (i32.const 64) (i32.const 5) (i32.const 420) (i32.const 1)))
    ;; another instance registered the queue: found by name
    (i32.store8 (i32.const 421) (i32.add (i32.const 48)
      (call $qres (i32.const 0) (i32.const 0) (i32.const 32) (i32.const 1) (i32.const 304))))
    (drop (call $add (i32.const 0) (i32.const 80) (i32.const 7) (i32.const 421) (i32.const 1)))
    (drop (call $qput (i32.load (i32.const 304)) (i32.const 96) (i32.const 4)))
    (i32.const 0))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $incr (i32.const 16) (i32.const 5))))
  (func (export "proxy_on_queue_ready") (param i32 i32)
    (if (i32.eqz (call $qget (local.get 1) (i32.const 430) (i32.const 434)))
      (then (drop (call $sset (i32.const 48) (i32.const 3) (i32.load (i32.const 430)) (i32.load (i32.const 434)) (i32.const 0))))
      (else (drop (call $sset (i32.const 48) (i32.const 3) (i32.const 112) (i32.const 4) (i32.const 0)))))))"#;

fn shared_u32(p: &Plugin, key: &[u8]) -> Option<u32> {
    let (v, _) = p.shared().get(key).ok()?;
    Some(u32::from_le_bytes(v.try_into().ok()?))
}

#[test]
fn shared_data_queues_and_timers_through_the_abi() {
    use std::time::{Duration, Instant};
    let p = plugin(SHARED_WAT, "FAIL_CLOSE");
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    // Nothing runs before an instance has started.
    assert_eq!(p.run_due(Instant::now() + Duration::from_secs(1)), 0);
    for i in 1..=4 {
        let mut http = request("/");
        let (o, h) = p.on_request(&mut http, true);
        assert!(matches!(o, Outcome::Continue), "{o:?}");
        // The first write of a key has nothing to compare; later ones do.
        let cas = if i == 1 { "0" } else { "8" };
        assert_eq!(header(&http.request, "x-cas").as_deref(), Some(cas));
        assert_eq!(header(&http.request, "x-queue").as_deref(), Some("0"));
        p.finish(h.unwrap(), &mut http);
    }
    // Both instances (two workers) counted into the same shared value.
    assert_eq!(p.instance_memory().len(), 2);
    assert_eq!(shared_u32(&p, b"hits"), Some(4));
    // Four items: four notifications to the instance that registered last, each
    // dequeuing one; ticks not due yet.
    assert_eq!(p.run_due(Instant::now()), 4);
    assert_eq!(p.shared().get(b"got").unwrap().0, b"item");
    assert_eq!(p.stats.queue_notifications.load(Ordering::Relaxed), 4);
    assert_eq!(p.run_due(Instant::now()), 0);
    // Each instance asked for 10 ms ticks.
    assert_eq!(p.run_due(Instant::now() + Duration::from_secs(1)), 2);
    assert_eq!(shared_u32(&p, b"ticks"), Some(2));
    assert_eq!(p.stats.ticks.load(Ordering::Relaxed), 2);
    // The data outlives the plugin's reconfiguration (a new Plugin sharing it).
    let engine = WasmEngine::new().unwrap();
    let mut s = spec("FAIL_CLOSE");
    s.sha256 = format!("{:x}", text_key(SHARED_WAT));
    let bytes = wat::parse_str(SHARED_WAT).unwrap();
    let again = Plugin::new(Ok(&engine), s, Ok(&bytes), 1, p.shared().clone());
    let mut http = request("/");
    let (_, h) = again.on_request(&mut http, true);
    again.finish(h.unwrap(), &mut http);
    assert_eq!(shared_u32(&again, b"hits"), Some(5));
}

#[test]
fn a_failing_tick_fails_the_plugin_by_its_strategy() {
    let wat = r#"(module
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 10))) (i32.const 1))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_tick") (param i32) unreachable))"#;
    let p = plugin(wat, "FAIL_CLOSE");
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    let mut http = request("/");
    let (o, h) = p.on_request(&mut http, true);
    assert!(matches!(o, Outcome::Continue));
    p.finish(h.unwrap(), &mut http);
    let later = std::time::Instant::now() + std::time::Duration::from_secs(1);
    assert_eq!(p.run_due(later), 1);
    assert_eq!(p.stats.errors.lock().unwrap().get("trap"), Some(&1));
    // FAIL_CLOSE: the next request is refused, and no tick runs any more.
    let (o, _) = p.on_request(&mut request("/"), true);
    assert!(
        matches!(o, Outcome::Reply(ref r) if r.status == 503),
        "{o:?}"
    );
    assert_eq!(p.run_due(later + std::time::Duration::from_secs(1)), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_driver_ticks_live_instances_and_ends_with_its_plugin() {
    let p = Arc::new(plugin(SHARED_WAT, "FAIL_CLOSE"));
    let driver = tokio::spawn(Plugin::drive(Arc::downgrade(&p)));
    let mut http = request("/");
    let (_, h) = p.on_request(&mut http, true);
    p.finish(h.unwrap(), &mut http);
    let start = std::time::Instant::now();
    while shared_u32(&p, b"ticks").unwrap_or(0) < 5 {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "ticks: {:?}",
            shared_u32(&p, b"ticks")
        );
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    // The queue item of the request was announced without a tick's help too.
    assert_eq!(p.shared().get(b"got").unwrap().0, b"item");
    drop(p);
    tokio::time::timeout(std::time::Duration::from_secs(2), driver)
        .await
        .expect("the driver ends once its plugin is gone")
        .unwrap();
}

/// Reads request bodies: one that starts with `evil` is refused (403), any
/// other gets `seen:` in front. Reads response bodies: one that starts with
/// `evil` is replaced by a 502, any other gets `+checked` appended.
pub(crate) const BODY_WAT: &str = r#"(module
  (import "env" "proxy_get_buffer_bytes" (func $buf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_set_buffer_bytes" (func $setbuf (param i32 i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_send_local_response" (func $reply (param i32 i32 i32 i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (global $heap (mut i32) (i32.const 4096))
  (data (i32.const 0) "evil")
  (data (i32.const 16) "seen:")
  (data (i32.const 32) "body refused")
  (data (i32.const 48) "+checked")
  (data (i32.const 64) "response refused")
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (local.get $n)))
    (local.get $p))
  (func (export "proxy_on_context_create") (param i32 i32)
    (global.set $heap (i32.const 4096)))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
  (func (export "proxy_on_request_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.and
          (i32.ge_u (local.get $size) (i32.const 4))
          (i32.eqz (call $buf (i32.const 0) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204))))
      (then
        (if (i32.eq (i32.load (i32.load (i32.const 200))) (i32.load (i32.const 0)))
          (then
            (drop (call $reply (i32.const 403) (i32.const 32) (i32.const 12) (i32.const 32) (i32.const 12) (i32.const 0) (i32.const 0) (i32.const -1)))
            (return (i32.const 0))))))
    (drop (call $setbuf (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 16) (i32.const 5)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param $ctx i32) (param $size i32) (param $eos i32) (result i32)
    (if (i32.and
          (i32.ge_u (local.get $size) (i32.const 4))
          (i32.eqz (call $buf (i32.const 1) (i32.const 0) (local.get $size) (i32.const 200) (i32.const 204))))
      (then
        (if (i32.eq (i32.load (i32.load (i32.const 200))) (i32.load (i32.const 0)))
          (then
            (drop (call $reply (i32.const 502) (i32.const 64) (i32.const 16) (i32.const 64) (i32.const 16) (i32.const 0) (i32.const 0) (i32.const -1)))
            (return (i32.const 0))))))
    (drop (call $setbuf (i32.const 1) (local.get $size) (i32.const 0) (i32.const 48) (i32.const 8)))
    (i32.const 0)))"#;

#[test]
fn bodies_are_read_changed_and_refused_through_the_abi() {
    use super::chain;
    let p = Arc::new(plugin(BODY_WAT, "FAIL_CLOSE"));
    assert!(p.load_error().is_none(), "{:?}", p.load_error());
    assert!(p.has_request_body_callback());
    // A plugin without the callback does not make bodies buffered.
    assert!(
        !plugin(&module(DENY_PATH, "(i32.const 0)", ""), "FAIL_CLOSE").has_request_body_callback()
    );
    let plugins = vec![p.clone()];
    for (body, want) in [
        (&b"hello"[..], Ok(&b"seen:hello"[..])),
        (b"", Ok(b"seen:")),
        (b"evil payload", Err(403)),
    ] {
        let mut http = request("/");
        let mut ran = chain::Ran::default();
        assert!(chain::run_request(&plugins, &mut http, false, &mut ran).is_none());
        http.request_body = body.to_vec();
        let replied = chain::run_body(&ran, &mut http, false);
        match want {
            Ok(b) => {
                assert!(replied.is_none(), "{replied:?}");
                assert_eq!(http.request_body, b);
            }
            Err(status) => {
                let (r, id) = replied.expect("a local reply");
                assert_eq!(
                    (r.status, r.body.as_slice(), id.as_str()),
                    (status, &b"body refused"[..], "ns/wat")
                );
            }
        }
        chain::finish(&mut ran, &mut http);
    }
    // Response bodies.
    for (body, want) in [
        (&b"ok"[..], Ok(&b"ok+checked"[..])),
        (b"evil data", Err(502)),
    ] {
        let mut http = request("/");
        let mut ran = chain::Ran::default();
        assert!(chain::run_request(&plugins, &mut http, false, &mut ran).is_none());
        http.response = ok_response();
        assert!(chain::run_response(&ran, &mut http, false).is_none());
        http.response_body = body.to_vec();
        let replied = chain::run_body(&ran, &mut http, true);
        match want {
            Ok(b) => {
                assert!(replied.is_none(), "{replied:?}");
                assert_eq!(http.response_body, b);
            }
            Err(status) => {
                let (r, _) = replied.expect("a local reply");
                assert_eq!(
                    (r.status, r.body.as_slice()),
                    (status, &b"response refused"[..])
                );
            }
        }
        chain::finish(&mut ran, &mut http);
    }
    // set_buffer_bytes: ranges, and the size bound.
    let mut b = b"0123456789".to_vec();
    assert!(super::abi::splice(&mut b, 2, 3, b"ab"));
    assert_eq!(b, b"01ab56789");
    assert!(super::abi::splice(&mut b, 9, 0, b"!"));
    assert_eq!(b, b"01ab56789!");
    assert!(super::abi::splice(&mut b, 0, 100, b"x"));
    assert_eq!(b, b"x");
    assert!(!super::abi::splice(&mut b, 5, 0, b"y"));
    let big = vec![0u8; super::abi::MAX_BODY_BYTES];
    assert!(!super::abi::splice(&mut b, 1, 0, &big));
    assert_eq!(b, b"x");
    assert!(super::abi::splice(&mut b, 0, 1, &big));
}

/// A body callback as SDKs export it when the plugin does not override it: it
/// runs (here: counts) and continues, never touching the body.
pub(crate) const SDK_DEFAULT_BODY_WAT: &str = r#"(module
  (memory (export "memory") 1)
  (global $calls (mut i32) (i32.const 0))
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_memory_allocate") (param i32) (result i32) (i32.const 4096))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.const 0))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    (i32.const 0)))"#;

#[test]
fn a_plugin_is_asked_whether_it_reads_bodies() {
    use super::chain;
    for (wat, wants) in [(BODY_WAT, true), (SDK_DEFAULT_BODY_WAT, false)] {
        let p = Arc::new(plugin(wat, "FAIL_CLOSE"));
        assert!(p.load_error().is_none(), "{:?}", p.load_error());
        assert!(p.has_request_body_callback() && p.has_response_body_callback());
        let mut http = request("/");
        let mut ran = chain::Ran::default();
        assert!(chain::run_request(std::slice::from_ref(&p), &mut http, false, &mut ran).is_none());
        assert_eq!(chain::probe_body(&ran, &mut http, false).ok(), Some(wants));
        assert_eq!(chain::probe_body(&ran, &mut http, true).ok(), Some(wants));
        // Whatever the probe did to the (empty) buffers is gone.
        assert!(http.request_body.is_empty() && http.response_body.is_empty());
        chain::finish(&mut ran, &mut http);
    }
}
