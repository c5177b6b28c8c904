//! eBPF capture, privileged (root; runs in CI): programs attached at the host's
//! cgroup2 root exactly as on a node, a pod and a server in their own network
//! namespaces, the proxy's outbound listener inside the pod's netns.

#![forbid(unsafe_code)]

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use weft_e2e::netlab::{require_root, Lab, PrivateBpffs};
use weft_node_dataplane::testing::PodNetns;
use weft_node_dataplane::testing::{cgroup, Capture, CaptureOptions, Inbound};
use weft_node_dataplane::testing::{serve_outbound_plain, OutboundStats};

const MARK: u32 = 0x5746;

/// Detaches and removes a test's pins, then unmounts its private bpffs.
struct Pins(std::path::PathBuf, #[allow(dead_code)] PrivateBpffs);
impl Drop for Pins {
    fn drop(&mut self) {
        if let Err(e) = Capture::uninstall(&self.0) {
            eprintln!("cleanup of {}: {e}", self.0.display());
        }
    }
}

struct Setup {
    lab: Lab,
    pod: String,
    capture: Capture,
    pins: Pins,
    podns: Arc<PodNetns>,
    stats: Arc<OutboundStats>,
    rt: tokio::runtime::Runtime,
    cookie: u64,
}

fn setup(tag: &str, subnet: u8) -> Setup {
    require_root();
    let mut lab = Lab::new(tag);
    let pod = lab.netns("pod").unwrap();
    let srv = lab.netns("srv").unwrap();
    lab.link(
        &pod,
        &format!("10.201.{subnet}.1/24"),
        &srv,
        &format!("10.201.{subnet}.2/24"),
    )
    .unwrap();
    let app = weft_e2e::bin_path("weft-testapp").unwrap();
    lab.spawn_in(
        &srv,
        &app,
        &["server", "--listen", &format!("10.201.{subnet}.2:8080")],
    )
    .unwrap();

    let bpffs = PrivateBpffs::new().unwrap();
    let pin_dir = bpffs
        .path()
        .join(format!("weft-test-{tag}-{}", std::process::id()));
    let pins = Pins(pin_dir.clone(), bpffs);
    let capture = Capture::install(CaptureOptions {
        cgroup: cgroup::cgroup2_root().unwrap(),
        pin_dir,
        proxy_mark: MARK,
        outbound_port: 15001,
    })
    .unwrap();
    let podns = Arc::new(PodNetns::open(Lab::netns_path(&pod)).unwrap());
    let cookie = podns.cookie().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(OutboundStats::default());
    let listener = podns.listen("127.0.0.1:15001".parse().unwrap()).unwrap();
    {
        let podns = podns.clone();
        let stats = stats.clone();
        rt.spawn(async move {
            let l = tokio::net::TcpListener::from_std(listener).unwrap();
            serve_outbound_plain(l, podns, MARK, stats).await
        });
    }
    // Wait for the server.
    let ok = weft_e2e::wait_until(Duration::from_secs(5), || {
        let (ok, _, _) = Lab::run_in(
            &pod,
            &app,
            &[
                "client",
                "--connect",
                &format!("10.201.{subnet}.2:8080"),
                "--bytes",
                "1",
            ],
        )
        .ok()?;
        ok.then_some(())
    });
    assert!(ok.is_some(), "server did not come up");
    Setup {
        lab,
        pod,
        capture,
        pins,
        podns,
        stats,
        rt,
        cookie,
    }
}

#[test]
fn enrolled_pod_is_captured_bytes_exact_and_sees_the_real_peer() {
    let mut s = setup("c", 1);
    let app = weft_e2e::bin_path("weft-testapp").unwrap();
    let dst = "10.201.1.2:8080";
    s.capture.enroll(s.cookie, None).unwrap();

    // 64 MiB through the proxy, checksummed end to end.
    let (ok, out, err) = Lab::run_in(
        &s.pod,
        &app,
        &[
            "client",
            "--connect",
            dst,
            "--bytes",
            &(64 << 20).to_string(),
        ],
    )
    .unwrap();
    assert!(ok, "client failed: {err}");
    // getpeername() in the client shows the real destination, not 127.0.0.1:15001.
    assert!(out.contains(&format!("peer={dst}")), "{out}");
    assert_eq!(
        s.stats.forwarded.load(Ordering::SeqCst),
        1,
        "the connection went through the proxy"
    );
    assert_eq!(
        *s.stats.last_orig_dst.lock().unwrap(),
        Some(dst.parse().unwrap())
    );
    // The proxy counts a connection's bytes when its copy ends, which may be just
    // after the client has seen its last byte.
    let up = weft_e2e::wait_until(Duration::from_secs(5), || {
        let n = s.stats.bytes_up.load(Ordering::SeqCst);
        (n == 64 << 20).then_some(n)
    });
    assert_eq!(
        up,
        Some(64 << 20),
        "bytes up: {}",
        s.stats.bytes_up.load(Ordering::SeqCst)
    );
    let st = s.capture.pod_stats(s.cookie).unwrap();
    assert_eq!(st.redirected, 1);
    assert_eq!(st.orig_dst_answers, 1);
    // The proxy's own upstream socket (same netns, marked) was seen and not redirected.
    assert_eq!(st.skipped_mark, 1);

    // Not enrolled: direct, untouched.
    s.capture.unenroll(s.cookie).unwrap();
    let (ok, out, err) = Lab::run_in(
        &s.pod,
        &app,
        &["client", "--connect", dst, "--bytes", "4096"],
    )
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains(&format!("peer={dst}")));
    assert_eq!(
        s.stats.accepted.load(Ordering::SeqCst),
        1,
        "not enrolled: the proxy saw nothing"
    );
    drop(s.rt);
    drop(s.podns);
    drop(s.capture);
    drop(s.pins);
    drop(s.lab);
}

#[test]
fn ipv6_connections_are_captured_too() {
    require_root();
    let mut lab = Lab::new("6");
    let pod = lab.netns("pod").unwrap();
    let srv = lab.netns("srv").unwrap();
    lab.link(&pod, "10.201.6.1/24", &srv, "10.201.6.2/24")
        .unwrap();
    // `link` numbered this pair after the two namespaces: index 2.
    lab.add_ipv6(2, &pod, "fd00:6::1/64", &srv, "fd00:6::2/64")
        .unwrap();
    let app = weft_e2e::bin_path("weft-testapp").unwrap();
    let dst = "[fd00:6::2]:8080";
    lab.spawn_in(&srv, &app, &["server", "--listen", dst])
        .unwrap();
    let bpffs = PrivateBpffs::new().unwrap();
    let pin_dir = bpffs
        .path()
        .join(format!("weft-test-6-{}", std::process::id()));
    let _pins = Pins(pin_dir.clone(), bpffs);
    let mut capture = Capture::install(CaptureOptions {
        cgroup: cgroup::cgroup2_root().unwrap(),
        pin_dir,
        proxy_mark: MARK,
        outbound_port: 15001,
    })
    .unwrap();
    let podns = Arc::new(PodNetns::open(Lab::netns_path(&pod)).unwrap());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stats = Arc::new(OutboundStats::default());
    let listener = podns.listen("[::1]:15001".parse().unwrap()).unwrap();
    {
        let (podns, stats) = (podns.clone(), stats.clone());
        rt.spawn(async move {
            serve_outbound_plain(
                tokio::net::TcpListener::from_std(listener).unwrap(),
                podns,
                MARK,
                stats,
            )
            .await
        });
    }
    let up = weft_e2e::wait_until(Duration::from_secs(5), || {
        Lab::run_in(&pod, &app, &["client", "--connect", dst, "--bytes", "1"])
            .ok()?
            .0
            .then_some(())
    });
    assert!(up.is_some(), "IPv6 server not reachable");
    let cookie = podns.cookie().unwrap();
    capture.enroll(cookie, None).unwrap();
    let (ok, out, err) = Lab::run_in(
        &pod,
        &app,
        &[
            "client",
            "--connect",
            dst,
            "--bytes",
            &(8 << 20).to_string(),
        ],
    )
    .unwrap();
    assert!(ok, "{err}");
    assert!(out.contains(&format!("peer={dst}")), "getpeername6: {out}");
    assert_eq!(stats.forwarded.load(Ordering::SeqCst), 1);
    assert_eq!(
        *stats.last_orig_dst.lock().unwrap(),
        Some(dst.parse().unwrap()),
        "SO_ORIGINAL_DST for IPv6"
    );
    let st = capture.pod_stats(cookie).unwrap();
    assert_eq!(
        (st.redirected, st.orig_dst_answers, st.skipped_mark),
        (1, 1, 1)
    );
    drop(rt);
}

#[test]
fn no_redirect_loops_under_100_parallel_connections() {
    let mut s = setup("l", 2);
    let app = weft_e2e::bin_path("weft-testapp").unwrap();
    s.capture.enroll(s.cookie, None).unwrap();
    let (ok, out, err) = Lab::run_in(
        &s.pod,
        &app,
        &[
            "client",
            "--connect",
            "10.201.2.2:8080",
            "--bytes",
            "65536",
            "--parallel",
            "100",
        ],
    )
    .unwrap();
    assert!(ok, "{err}");
    assert_eq!(
        out.lines().filter(|l| *l == "peer=10.201.2.2:8080").count(),
        100
    );
    // Exactly one proxy hop per connection: no loop.
    assert_eq!(s.stats.accepted.load(Ordering::SeqCst), 100);
    assert_eq!(s.stats.forwarded.load(Ordering::SeqCst), 100);
    let st = s.capture.pod_stats(s.cookie).unwrap();
    assert_eq!(st.redirected, 100);
    assert_eq!(st.skipped_mark, 100);
    // Closed connections leave no original-destination entries behind.
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(s.capture.orig_dst_entries(), (0, 0));
}

#[test]
fn uninstall_removes_every_program_link_and_pin() {
    require_root();
    let bpffs = PrivateBpffs::new().unwrap();
    let pin_dir = bpffs
        .path()
        .join(format!("weft-test-u-{}", std::process::id()));
    let _pins = Pins(pin_dir.clone(), bpffs);
    let capture = Capture::install(CaptureOptions {
        cgroup: cgroup::cgroup2_root().unwrap(),
        pin_dir: pin_dir.clone(),
        proxy_mark: MARK,
        outbound_port: 15001,
    })
    .unwrap();
    drop(capture); // the agent exits: pinned links stay attached (fail closed)
    let ids = pinned_link_ids(&pin_dir.join("links"));
    assert_eq!(
        ids.len(),
        5,
        "connect4/6, getpeername4/6 and sockops stay attached"
    );
    let live = live_link_ids();
    assert!(ids.iter().all(|id| live.contains(id)));
    let out = std::process::Command::new(weft_e2e::bin_path("weft-node").unwrap())
        .args(["uninstall", "--bpf-dir"])
        .arg(&pin_dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!pin_dir.exists(), "pins left behind");
    let live = live_link_ids();
    assert!(
        ids.iter().all(|id| !live.contains(id)),
        "links still attached after uninstall"
    );
}

/// Kernel ids of the links pinned in `dir`.
fn pinned_link_ids(dir: &std::path::Path) -> Vec<u32> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let link: aya::programs::links::FdLink =
                aya::programs::links::PinnedLink::from_pin(e.unwrap().path())
                    .unwrap()
                    .into();
            link.info().unwrap().id()
        })
        .collect()
}

fn live_link_ids() -> Vec<u32> {
    aya::programs::loaded_links()
        .filter_map(Result::ok)
        .map(|l| l.id())
        .collect()
}

/// Inbound capture (sk_lookup) of an enrolled pod: IPv4 from outside goes to the
/// proxy's plaintext listener; IPv6, which the proxy does not listen on, is dropped.
/// It used to pass, reaching the application with no policy check at all.
#[test]
fn ipv6_inbound_to_an_enrolled_pod_is_dropped_never_let_through() {
    require_root();
    let mut lab = Lab::new("7");
    let client = lab.netns("client").unwrap();
    let pod = lab.netns("pod").unwrap();
    lab.link(&client, "10.201.7.1/24", &pod, "10.201.7.2/24")
        .unwrap();
    lab.add_ipv6(2, &client, "fd00:7::1/64", &pod, "fd00:7::2/64")
        .unwrap();
    let app = weft_e2e::bin_path("weft-testapp").unwrap();
    let (v4, v6) = ("10.201.7.2:8080", "[fd00:7::2]:8080");
    for listen in [v4, v6] {
        lab.spawn_in(&pod, &app, &["server", "--listen", listen])
            .unwrap();
    }
    let timeout = std::path::Path::new("timeout");
    let app_s = app.to_string_lossy().into_owned();
    let reaches = |dst: &str| {
        Lab::run_in(
            &client,
            timeout,
            &["3", &app_s, "client", "--connect", dst, "--bytes", "16"],
        )
        .map(|r| r.0)
        .unwrap_or(false)
    };
    for dst in [v4, v6] {
        let up = weft_e2e::wait_until(Duration::from_secs(5), || reaches(dst).then_some(()));
        assert!(up.is_some(), "{dst} not reachable before enrollment");
    }
    let bpffs = PrivateBpffs::new().unwrap();
    let pin_dir = bpffs
        .path()
        .join(format!("weft-test-7-{}", std::process::id()));
    let _pins = Pins(pin_dir.clone(), bpffs);
    let mut inbound = Inbound::load(&pin_dir).unwrap();
    let podns = PodNetns::open(Lab::netns_path(&pod)).unwrap();
    let plain = podns.listen("0.0.0.0:15006".parse().unwrap()).unwrap();
    inbound
        .enroll(
            std::path::Path::new(&Lab::netns_path(&pod)),
            "10.201.7.2".parse().unwrap(),
            &plain,
        )
        .unwrap();
    // IPv4: steered to the proxy's listener (which this test does not serve, so the
    // client waits for an answer that never comes), never to the application.
    assert!(!reaches(v4), "IPv4 reached the application directly");
    plain
        .accept()
        .expect("the IPv4 connection went to the proxy's plaintext listener");
    // IPv6: dropped.
    assert!(!reaches(v6), "IPv6 reached the enrolled pod's application");
    // Un-enrolled, both reach the application again.
    inbound.unenroll("10.201.7.2".parse().unwrap()).unwrap();
    for dst in [v4, v6] {
        assert!(reaches(dst), "{dst} after un-enrolling");
    }
}
