//! A runaway Wasm plugin cannot stall other pods' traffic on its node: one pod's
//! plugin spends 900 ms of its 1 s budget on every request, requested from six
//! clients at once, while requests to another pod on the same node keep
//! completing promptly. Root.

#![forbid(unsafe_code)]

use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::curl::curl;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

/// A Proxy-Wasm module whose request-headers callback stays busy for `ms`
/// milliseconds (reading the host's clock), then lets the request through.
fn busy_module(ms: u64) -> Vec<u8> {
    wat::parse_str(format!(
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
        ms * 1_000_000
    ))
    .unwrap()
}

#[test]
fn a_runaway_plugin_does_not_stall_other_pods() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("shop", true).unwrap();
    let spin = c
        .add_pod("shop", "spin", "node-b", &[("app", "spin")])
        .unwrap();
    let web = c
        .add_pod("shop", "web", "node-b", &[("app", "web")])
        .unwrap();
    c.add_pod("shop", "client", "node-a", &[("app", "client")])
        .unwrap();
    let app = bin_path("weft-testapp").unwrap();
    for a in ["spin", "web"] {
        c.wait_enrolled("node-b", &format!("shop/{a}")).unwrap();
        c.spawn_app(
            &format!("shop/{a}"),
            &app,
            &["http", "--listen", "0.0.0.0:8080"],
        )
        .unwrap();
    }
    c.wait_enrolled("node-a", "shop/client").unwrap();
    let modules = c.config_dir().parent().unwrap().join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    let busy = modules.join("busy.wasm");
    std::fs::write(&busy, busy_module(900)).unwrap();
    c.write_manifest(
        "plugin.yaml",
        &format!(
            "apiVersion: extensions.weft.dev/v1alpha1\nkind: WasmPlugin\n\
             metadata: {{name: busy, namespace: shop}}\n\
             spec:\n  selector: {{matchLabels: {{app: spin}}}}\n  url: file://{}\n\
             \x20 failStrategy: FAIL_OPEN\n  limits: {{cpuTimePerCallbackMillis: 1000}}\n",
            busy.display()
        ),
    )
    .unwrap();
    let spin_url = format!("http://{spin}:8080/spin");
    let web_url = format!("http://{web}:8080/web");
    // The plugin runs: a request to `spin` takes its 900 ms.
    wait_until(Duration::from_secs(30), || {
        let t = Instant::now();
        let r = curl(&c, "shop/client", &[], &spin_url).ok()?;
        (r.status == 200 && t.elapsed() >= Duration::from_millis(900)).then_some(())
    })
    .unwrap_or_else(|| panic!("the plugin never ran:\n{}", c.agent_log("node-b")));

    let until = Instant::now() + Duration::from_secs(8);
    let (web_times, spin_ok) = std::thread::scope(|s| {
        let c = &c;
        let spin_url = &spin_url;
        let hammers: Vec<_> = (0..6)
            .map(|_| {
                s.spawn(move || {
                    let mut ok = 0;
                    while Instant::now() < until {
                        if curl(c, "shop/client", &[], spin_url).is_ok_and(|r| r.status == 200) {
                            ok += 1;
                        }
                    }
                    ok
                })
            })
            .collect();
        let mut times = Vec::new();
        while Instant::now() < until {
            let t = Instant::now();
            let r = curl(c, "shop/client", &[], &web_url).unwrap();
            assert_eq!((r.status, r.body.as_str()), (200, "GET /web"));
            times.push(t.elapsed());
            std::thread::sleep(Duration::from_millis(50));
        }
        let ok: usize = hammers.into_iter().map(|h| h.join().unwrap()).sum();
        (times, ok)
    });
    let slow: Vec<_> = web_times
        .iter()
        .filter(|t| **t >= Duration::from_millis(450))
        .collect();
    eprintln!(
        "web: {} requests, slowest {:?}, {} at 450 ms or more; spin: {spin_ok} answered",
        web_times.len(),
        web_times.iter().max(),
        slow.len()
    );
    assert!(
        spin_ok >= 6,
        "only {spin_ok} requests to spin were answered"
    );
    assert!(web_times.len() >= 10, "{web_times:?}");
    // Each busy callback takes 900 ms: a worker held by one would hold the requests
    // it serves that long. Allow for a busy test machine, not for a stall.
    assert!(
        slow.len() * 10 <= web_times.len(),
        "requests to another pod on the node were held up: {web_times:?}"
    );
    let dump = c.config_dump("node-b").unwrap();
    let plugin = dump["proxy"]["wasm_plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == "shop/busy")
        .unwrap()
        .clone();
    assert_eq!(plugin["slow"], true, "{plugin}");
    assert!(plugin["caught_slow"].as_u64().unwrap() >= 1, "{plugin}");
}
