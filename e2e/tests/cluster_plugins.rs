//! Wasm plugins in the node proxy, across nodes over mTLS: the example plugins
//! (C and AssemblyScript, built from source by `make plugins`) deny and allow by
//! peer SPIFFE ID and add their header; the C rate limiter shares one bucket across
//! its instances (shared data), logs refusals through a shared queue and publishes
//! a gauge from its timer; a config change applies without restarting the node; failing plugins (trap, infinite loop, memory bomb) follow their
//! failStrategy; a digest mismatch is rejected and the plugin never runs. Root.

#![forbid(unsafe_code)]

use std::path::Path;
use std::time::{Duration, Instant};
use weft_e2e::cluster::LocalCluster;
use weft_e2e::curl::{curl, Reply};
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, plugin_path, wait_until};

const ADMIN: &str = "spiffe://cluster.local/ns/shop/sa/admin";
const CLIENT: &str = "spiffe://cluster.local/ns/shop/sa/client";

fn plugin(name: &str, app: &str, url: &Path, extra: &str) -> String {
    format!(
        "apiVersion: extensions.weft.dev/v1alpha1\nkind: WasmPlugin\n\
         metadata: {{name: {name}, namespace: shop}}\n\
         spec:\n  selector: {{matchLabels: {{app: {app}}}}}\n  url: file://{}\n{extra}",
        url.display()
    )
}

fn gate_config(value: &str, peers: &[&str]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "  pluginConfig: {{protectedPrefix: /private, allowedPeers: [{}], header: x-weft-plugin, value: {value}}}\n",
        peers.join(", ")
    )
}

/// A Proxy-Wasm module whose request-headers callback runs `body`.
fn wat_module(body: &str) -> Vec<u8> {
    wat::parse_str(format!(
        r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "malloc") (param i32) (result i32) (i32.const 1024))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) {body}))"#
    ))
    .unwrap()
}

fn get(c: &LocalCluster, pod: &str, ip: &str, path: &str) -> Reply {
    curl(c, pod, &[], &format!("http://{ip}:8080{path}")).unwrap()
}

#[test]
fn plugins_enforce_rewrite_reload_and_fail_as_configured() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("shop", true).unwrap();
    let apps = [
        "web-c",
        "web-as",
        "web-rl",
        "web-bg",
        "web-asb",
        "trap-close",
        "trap-open",
        "loop",
        "bomb",
        "bad-sha",
    ];
    let mut ips = std::collections::BTreeMap::new();
    for a in apps {
        ips.insert(a, c.add_pod("shop", a, "node-b", &[("app", a)]).unwrap());
    }
    c.add_pod("shop", "client", "node-a", &[("app", "client")])
        .unwrap();
    c.add_pod("shop", "admin", "node-a", &[("app", "admin")])
        .unwrap();
    let app = bin_path("weft-testapp").unwrap();
    for a in apps {
        c.wait_enrolled("node-b", &format!("shop/{a}")).unwrap();
        c.spawn_app(
            &format!("shop/{a}"),
            &app,
            &["http", "--listen", "0.0.0.0:8080"],
        )
        .unwrap();
    }
    c.wait_enrolled("node-a", "shop/client").unwrap();
    c.wait_enrolled("node-a", "shop/admin").unwrap();

    let dir = c.config_dir();
    let modules = dir.parent().unwrap().join("modules");
    std::fs::create_dir_all(&modules).unwrap();
    let trap = modules.join("trap.wasm");
    std::fs::write(&trap, wat_module("(unreachable)")).unwrap();
    let spin = modules.join("loop.wasm");
    std::fs::write(&spin, wat_module("(loop $l (br $l)) (i32.const 0)")).unwrap();
    let bomb = modules.join("bomb.wasm");
    std::fs::write(
        &bomb,
        wat_module("(loop $l (br_if $l (i32.ne (memory.grow (i32.const 1)) (i32.const -1)))) (i32.const 0)"),
    )
    .unwrap();
    let c_mod = plugin_path("peer_gate_c").unwrap();
    let as_mod = plugin_path("peer_gate_as").unwrap();
    let rl_mod = plugin_path("rate_limit_c").unwrap();
    let bg_mod = plugin_path("body_guard_c").unwrap();
    let manifests = [
        plugin(
            "gate-as-body",
            "web-asb",
            &as_mod,
            "  pluginConfig: {protectedPrefix: /private, allowedPeers: [], header: x-weft-plugin, value: asb, bodySuffix: \" +as\"}\n",
        ),
        plugin(
            "body-guard",
            "web-bg",
            &bg_mod,
            "  pluginConfig: {blocked: DROP TABLE, redact: secret}\n",
        ),
        // No refill: exactly 3 requests ever pass, whichever instance serves them.
        plugin(
            "rate-limit",
            "web-rl",
            &rl_mod,
            "  pluginConfig: {requestsPerSecond: 0, burst: 3}\n",
        ),
        plugin("gate-c", "web-c", &c_mod, &gate_config("c", &[ADMIN])),
        plugin("gate-as", "web-as", &as_mod, &gate_config("as", &[ADMIN])),
        plugin(
            "trap-close",
            "trap-close",
            &trap,
            "  failStrategy: FAIL_CLOSE\n",
        ),
        plugin(
            "trap-open",
            "trap-open",
            &trap,
            "  failStrategy: FAIL_OPEN\n",
        ),
        plugin(
            "loop",
            "loop",
            &spin,
            "  failStrategy: FAIL_OPEN\n  limits: {cpuTimePerCallbackMillis: 20}\n",
        ),
        plugin(
            "bomb",
            "bomb",
            &bomb,
            "  failStrategy: FAIL_CLOSE\n  limits: {memoryBytes: 2097152}\n",
        ),
        plugin(
            "bad-sha",
            "bad-sha",
            &c_mod,
            &format!(
                "  sha256: \"{}\"\n{}",
                "0".repeat(64),
                gate_config("bad", &[])
            ),
        ),
    ];
    c.write_manifest("plugins.yaml", &manifests.join("---\n"))
        .unwrap();

    // The C and AssemblyScript plugins: deny /private unless the peer is the admin,
    // and add their header (to local replies too).
    for (a, value) in [("web-c", "c"), ("web-as", "as")] {
        let ip = &ips[a];
        let r = wait_until(Duration::from_secs(30), || {
            let r = curl(
                &c,
                "shop/client",
                &[],
                &format!("http://{ip}:8080/private/x"),
            )
            .ok()?;
            (r.status == 403).then_some(r)
        })
        .unwrap_or_else(|| panic!("{a}: plugin never denied:\n{}", c.agent_log("node-b")));
        assert_eq!(r.body, "denied by the peer_gate plugin\n", "{a}");
        assert_eq!(r.header("x-weft-plugin"), Some(value), "{a}");
        let r = get(&c, "shop/admin", ip, "/private/x");
        assert_eq!((r.status, r.body.as_str()), (200, "GET /private/x"), "{a}");
        assert_eq!(r.header("x-weft-plugin"), Some(value), "{a}");
        assert_eq!(r.header("x-app"), Some("testapp"), "{a}");
        let r = get(&c, "shop/client", ip, "/public");
        assert_eq!(
            (r.status, r.header("x-weft-plugin")),
            (200, Some(value)),
            "{a}"
        );
    }

    // The C plugin's own metrics (the metrics ABI), on node-b's /metrics: what it
    // counted equals what the proxy counted for it.
    let m = c.node_http("node-b", "/metrics").unwrap().1;
    let value = |series: &str| -> f64 {
        m.lines()
            .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| {
                panic!(
                    "no {series} in:\n{}",
                    m.lines()
                        .filter(|l| l.contains("wasm_plugin"))
                        .collect::<Vec<_>>()
                        .join("\n")
                )
            })
    };
    let gate = "plugin=\"shop/gate-c\"";
    let calls = value(&format!("weft_wasm_plugin_calls_total{{{gate}}}"));
    let replies = value(&format!("weft_wasm_plugin_local_replies_total{{{gate}}}"));
    assert!(calls >= 3.0 && replies >= 1.0, "{calls} {replies}");
    assert_eq!(
        value(&format!(
            "weft_wasm_plugin_metric_total{{{gate},metric=\"peer_gate_requests\"}}"
        )),
        calls
    );
    assert_eq!(
        value(&format!(
            "weft_wasm_plugin_metric_total{{{gate},metric=\"peer_gate_denied\"}}"
        )),
        replies
    );
    assert_eq!(
        value(&format!(
            "weft_wasm_plugin_gauge{{{gate},metric=\"peer_gate_allowed_peers\"}}"
        )),
        1.0
    );
    assert_eq!(
        value(&format!(
            "weft_wasm_plugin_histogram_count{{{gate},metric=\"peer_gate_path_bytes\"}}"
        )),
        calls
    );
    // "/private/x" and "/public" are 10 and 7 bytes: all in the (5, 10] bucket
    // (cumulative, so also in every larger one).
    assert_eq!(
        value(&format!("weft_wasm_plugin_histogram_bucket{{le=\"10.0\",{gate},metric=\"peer_gate_path_bytes\"}}")),
        calls
    );
    assert_eq!(
        value(&format!("weft_wasm_plugin_histogram_bucket{{le=\"5.0\",{gate},metric=\"peer_gate_path_bytes\"}}")),
        0.0
    );
    assert_eq!(
        value(&format!("weft_wasm_plugin_histogram_bucket{{le=\"+Inf\",{gate},metric=\"peer_gate_path_bytes\"}}")),
        calls
    );

    // The body guard (bodies): a request body with the pattern is refused, one
    // without reaches the application; the response's body is redacted, its
    // length matching.
    let bg = &ips["web-bg"];
    let url = format!("http://{bg}:8080/secret/x");
    let r = wait_until(Duration::from_secs(30), || {
        let r = curl(&c, "shop/client", &["-d", "name=x; DROP TABLE users"], &url).ok()?;
        (r.status == 403).then_some(r)
    })
    .unwrap_or_else(|| panic!("the body guard never refused:\n{}", c.agent_log("node-b")));
    assert_eq!(r.body, "blocked by body_guard\n");
    let r = curl(&c, "shop/client", &["-d", "name=x"], &url).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "POST /******/x"));
    assert_eq!(r.header("content-length"), Some("14"));
    let r = curl(
        &c,
        "shop/client",
        &["-H", "Transfer-Encoding: chunked", "-d", "name=y"],
        &url,
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "POST /******/x"));

    // The AssemblyScript SDK's body callback, unmodified: it asks for the whole
    // response body (StopIterationAndBuffer) and appends to it; the client gets
    // the new body with its length. Its request body callback is the SDK's
    // default (continue): a POST body streams past it to the application.
    let asb = &ips["web-asb"];
    let r = wait_until(Duration::from_secs(30), || {
        let r = get(&c, "shop/client", asb, "/public/b");
        (r.header("x-weft-plugin") == Some("asb")).then_some(r)
    })
    .unwrap_or_else(|| {
        panic!(
            "the AssemblyScript body plugin never ran:\n{}",
            c.agent_log("node-b")
        )
    });
    assert_eq!((r.status, r.body.as_str()), (200, "GET /public/b +as"));
    assert_eq!(r.header("content-length"), Some("17"));
    let r = curl(
        &c,
        "shop/client",
        &["-d", "x=1"],
        &format!("http://{asb}:8080/public/c"),
    )
    .unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "POST /public/c +as"));

    // The rate limiter: one bucket in shared data for the plugin's instances (one
    // per proxy worker, requests spread over them), so exactly 3 requests pass.
    let rl = "plugin=\"shop/rate-limit\"";
    let loaded = format!("weft_wasm_plugin_loaded{{{rl}}} 1");
    wait_until(Duration::from_secs(30), || {
        let m = c.node_http("node-b", "/metrics").ok()?.1;
        m.contains(&loaded).then_some(())
    })
    .expect("the rate limiter loaded");
    let statuses: Vec<u16> = (0..8)
        .map(|i| get(&c, "shop/client", &ips["web-rl"], &format!("/rl/{i}")).status)
        .collect();
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429, 429, 429]);
    let r = get(&c, "shop/client", &ips["web-rl"], "/rl/last");
    assert_eq!(
        (r.status, r.body.as_str(), r.header("retry-after")),
        (429, "rate limited\n", Some("1"))
    );
    let dump = c.config_dump("node-b").unwrap();
    let live = dump["proxy"]["wasm_plugins"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["plugin"] == "shop/rate-limit")
        .map(|p| p["instance_memory_bytes"].as_array().map_or(0, Vec::len));
    assert_eq!(live, Some(2), "two instances drew from one bucket");
    // Each refusal went through the shared queue to the instance that registered
    // it last, which logged and counted it; every instance's 1 s timer published
    // the tokens left.
    let series = |m: &str, name: &str| -> Option<f64> {
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
    };
    let metric =
        |kind: &str, name: &str| format!("weft_wasm_plugin_{kind}{{{rl},metric=\"{name}\"}}");
    let m = wait_until(Duration::from_secs(10), || {
        let m = c.node_http("node-b", "/metrics").ok()?.1;
        let logged = series(&m, &metric("metric_total", "rate_limit_denials_logged"))?;
        let ticks = series(&m, &format!("weft_wasm_plugin_ticks_total{{{rl}}}"))?;
        (logged == 6.0 && ticks >= 2.0).then_some(m)
    })
    .unwrap_or_else(|| {
        let m = c.node_http("node-b", "/metrics").unwrap_or_default().1;
        panic!(
            "queue or timer not run:\n{}",
            m.lines()
                .filter(|l| l.contains("rate-limit"))
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    assert_eq!(
        series(&m, &metric("metric_total", "rate_limit_allowed")),
        Some(3.0)
    );
    assert_eq!(
        series(&m, &metric("metric_total", "rate_limit_denied")),
        Some(6.0)
    );
    assert_eq!(series(&m, &metric("gauge", "rate_limit_tokens")), Some(0.0));
    assert_eq!(
        series(
            &m,
            &format!("weft_wasm_plugin_queue_notifications_total{{{rl}}}")
        ),
        Some(6.0)
    );
    assert_eq!(
        series(&m, &format!("weft_wasm_plugin_shared_data_keys{{{rl}}}")),
        Some(1.0)
    );
    assert!(c
        .agent_log("node-b")
        .contains("rate_limit: refused /rl/last"));

    // FAIL_CLOSE trap: 500, then 503 for later requests; FAIL_OPEN: passes.
    assert_eq!(get(&c, "shop/client", &ips["trap-close"], "/").status, 500);
    assert_eq!(get(&c, "shop/client", &ips["trap-close"], "/").status, 503);
    let r = get(&c, "shop/client", &ips["trap-open"], "/x");
    assert_eq!((r.status, r.body.as_str()), (200, "GET /x"));
    // An infinite loop is stopped at its 20 ms deadline (FAIL_OPEN: the request
    // passes), and the proxy keeps serving everyone else.
    let t = Instant::now();
    let r = get(&c, "shop/client", &ips["loop"], "/spin");
    assert_eq!(r.status, 200);
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    assert_eq!(get(&c, "shop/admin", &ips["web-c"], "/private").status, 200);
    // A memory bomb hits its 2 MiB cap: FAIL_CLOSE answers 500.
    assert_eq!(get(&c, "shop/client", &ips["bomb"], "/").status, 500);
    // A digest mismatch: rejected with a status naming the field; the plugin never
    // runs and, failing closed, its workload's requests get 503.
    let r = get(&c, "shop/client", &ips["bad-sha"], "/public");
    assert_eq!((r.status, r.header("x-weft-plugin")), (503, None));
    let (_, status) = c.cp_http("/debug/status").unwrap();
    assert!(
        status.contains("WasmPlugin shop/bad-sha")
            && status.contains("spec.sha256: DigestMismatch"),
        "{status}"
    );

    let dump = c.config_dump("node-b").unwrap();
    let plugins = dump["proxy"]["wasm_plugins"].as_array().unwrap().clone();
    let by = |id: &str| plugins.iter().find(|p| p["plugin"] == id).unwrap().clone();
    assert_eq!(by("shop/loop")["errors"]["deadline"], 1, "{plugins:?}");
    assert_eq!(by("shop/bomb")["errors"]["memory"], 1, "{plugins:?}");
    assert_eq!(by("shop/trap-close")["errors"]["trap"], 1, "{plugins:?}");
    assert!(by("shop/bad-sha")["load_error"]
        .as_str()
        .unwrap()
        .contains("DigestMismatch"));
    for id in ["shop/gate-c", "shop/gate-as"] {
        let mem = by(id)["instance_memory_bytes"].as_array().unwrap().clone();
        assert!(
            mem.iter().all(|m| m.as_u64().unwrap() <= 2 << 20),
            "{id}: {mem:?} (target: at most 2 MiB per instance)"
        );
    }

    // A configuration change applies without restarting the node: the client is
    // now allowed and the header changes.
    let agent_log_before = c.agent_log("node-b").lines().count();
    let mut changed = manifests.clone();
    changed[0] = plugin(
        "gate-c",
        "web-c",
        &c_mod,
        &gate_config("c2", &[ADMIN, CLIENT]),
    );
    c.write_manifest("plugins.yaml", &changed.join("---\n"))
        .unwrap();
    let r = wait_until(Duration::from_secs(20), || {
        let r = get(&c, "shop/client", &ips["web-c"], "/private/y");
        (r.status == 200).then_some(r)
    })
    .expect("new plugin config applied");
    assert_eq!(r.header("x-weft-plugin"), Some("c2"));
    assert!(c.node_ready("node-b"));
    let log = c.agent_log("node-b");
    assert!(!log
        .lines()
        .skip(agent_log_before)
        .any(|l| l.contains("node agent started")));
}

/// One HTTP/1.1 request on an open (keep-alive) connection; returns the status.
fn keep_alive_get(s: &mut std::net::TcpStream, path: &str) -> std::io::Result<u16> {
    use std::io::{Error, Read, Write};
    write!(s, "GET {path} HTTP/1.1\r\nHost: web\r\n\r\n")?;
    let mut buf = Vec::new();
    let mut byte = [0u8; 1];
    while !buf.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(Error::other(format!(
                "closed after {:?}",
                String::from_utf8_lossy(&buf)
            )));
        }
        buf.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&buf).to_ascii_lowercase();
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| Error::other(format!("no content-length: {head}")))?;
    let mut body = vec![0u8; len];
    s.read_exact(&mut body)?;
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| Error::other(format!("no status: {head}")))
}

/// Issue 27, item 7: a keep-alive connection parsed only for a plugin (no L7 policy
/// when it opened) is checked against an L7 policy added while it is open: its next
/// request is denied. (The connection's plan used to be fixed when it opened.)
#[test]
fn an_l7_policy_added_later_applies_to_the_next_request_of_an_open_connection() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("shop", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c
        .add_pod("shop", "web", "node-b", &[("app", "web")])
        .unwrap();
    c.add_pod("plain", "client", "node-a", &[]).unwrap();
    c.spawn_app(
        "shop/web",
        &bin_path("weft-testapp").unwrap(),
        &["http", "--listen", &format!("{ip}:8080")],
    )
    .unwrap();
    c.wait_enrolled("node-b", "shop/web").unwrap();
    let module = c.dir.path().join("pass.wasm");
    std::fs::write(&module, wat_module("(i32.const 0)")).unwrap();
    c.write_manifest("plugin-pass.yaml", &plugin("pass", "web", &module, ""))
        .unwrap();
    let l7 = |c: &LocalCluster| c.config_dump("node-b").ok()?["proxy"]["l7_connections"].as_u64();
    let dst: std::net::SocketAddr = format!("{ip}:8080").parse().unwrap();
    let netns = format!("/var/run/netns/{}", c.pod("plain/client").netns);
    let worker = weft_node_dataplane::testing::PodNetns::open(netns).unwrap();
    let connect = || {
        let s = worker
            .run(move || std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)))
            .ok()?
            .ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        Some(s)
    };
    // The plugin is in place once a new connection is parsed as HTTP.
    let before = l7(&c).unwrap_or(0);
    let mut open = wait_until(Duration::from_secs(10), || {
        let mut s = connect()?;
        (keep_alive_get(&mut s, "/admin").ok()? == 200 && l7(&c)? > before).then_some(s)
    })
    .expect("the plugin never applied");
    assert_eq!(keep_alive_get(&mut open, "/admin").unwrap(), 200);
    c.write_manifest(
        "deny-admin.yaml",
        r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
    - to: [{operation: {paths: ["/admin"]}}]
"#,
    )
    .unwrap();
    wait_until(Duration::from_secs(10), || {
        (keep_alive_get(&mut connect()?, "/admin").ok()? == 403).then_some(())
    })
    .expect("the policy never applied to new connections");
    assert_eq!(
        keep_alive_get(&mut open, "/admin").unwrap(),
        403,
        "the open connection's next request escaped the L7 policy added after it opened"
    );
    assert_eq!(keep_alive_get(&mut open, "/public").unwrap(), 200);
}
