//! The proxy's own ports are never destinations, and the proxy holds a bounded
//! number of connections. Before this, one connection to `<pod IP>:15006` (or an
//! HBONE CONNECT to it) was authorized and dialled again from inside the pod into
//! the same listener, over and over, until the agent ran out of file descriptors
//! and every pod of its node fell off the mesh. Sockets that connect and send
//! nothing are bounded too: in number per source and in time (issue 27, item 9).
//! Root; runs in CI.

#![forbid(unsafe_code)]

use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

fn app() -> std::path::PathBuf {
    bin_path("weft-testapp").unwrap()
}

fn counter(c: &LocalCluster, node: &str, name: &str) -> u64 {
    c.config_dump(node).unwrap()["proxy"][name]
        .as_u64()
        .unwrap_or(0)
}

/// A client that sends 16 bytes to `dst` and expects the server's answer within
/// 10 s (a connection looping through the proxy would never answer).
fn connect(c: &LocalCluster, pod: &str, dst: &str) -> bool {
    let app = app();
    let app = app.to_string_lossy();
    c.run_app(
        pod,
        std::path::Path::new("timeout"),
        &["10", &app, "client", "--connect", dst, "--bytes", "16"],
    )
    .map(|r| r.0)
    .unwrap_or(false)
}

/// Two nodes: `mesh/server` (a server on 8080) on node-b, `mesh/client` and
/// `plain/outsider` (not in the mesh) on node-a, agents run with `agent_args`.
/// Returns the cluster and the server's IP once both mesh pods are enrolled.
fn mesh(agent_args: &[&str]) -> (LocalCluster, String) {
    require_root();
    let mut c = LocalCluster::with_args(&["node-a", "node-b"], &[], agent_args).unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c.add_pod("mesh", "server", "node-b", &[]).unwrap();
    c.add_pod("mesh", "client", "node-a", &[]).unwrap();
    c.add_pod("plain", "outsider", "node-a", &[]).unwrap();
    c.spawn_app(
        "mesh/server",
        &app(),
        &["server", "--listen", &format!("{ip}:8080")],
    )
    .unwrap();
    c.wait_enrolled("node-b", "mesh/server").unwrap();
    c.wait_enrolled("node-a", "mesh/client").unwrap();
    (c, ip)
}

#[test]
fn the_proxys_own_ports_are_refused_as_destinations_from_anywhere() {
    let (c, ip) = mesh(&[]);
    let app_port = format!("{ip}:8080");
    assert!(
        wait_until(Duration::from_secs(10), || connect(
            &c,
            "mesh/client",
            &app_port
        )
        .then_some(()))
        .is_some(),
        "the mesh works: {}",
        c.agent_log("node-b")
    );

    // Plaintext from outside the mesh to the in-pod plaintext listener: refused by
    // the destination's agent.
    let before = counter(&c, "node-b", "plaintext_in_denied");
    let dst = format!("{ip}:15006");
    assert!(
        !connect(&c, "plain/outsider", &dst),
        "outsider -> {dst} must be refused"
    );
    let refused = wait_until(Duration::from_secs(5), || {
        (counter(&c, "node-b", "plaintext_in_denied") > before).then_some(())
    });
    assert!(
        refused.is_some(),
        "node-b should count a denial: {}",
        c.config_dump("node-b").unwrap()["proxy"]
    );
    // From the mesh: refused by the source's agent, before anything is tunnelled.
    // (A forged HBONE CONNECT to these ports is refused by the destination:
    // cluster_mtls's refusals.)
    for port in [15006, 15008] {
        let failed = |c: &LocalCluster| {
            c.enrolled_pod("node-a", "mesh/client").unwrap()["outbound"]["failed"]
                .as_u64()
                .unwrap_or(0)
        };
        let before = failed(&c);
        let dst = format!("{ip}:{port}");
        assert!(
            !connect(&c, "mesh/client", &dst),
            "client -> {dst} must be refused"
        );
        let refused = wait_until(Duration::from_secs(5), || {
            (failed(&c) > before).then_some(())
        });
        assert!(
            refused.is_some(),
            "node-a should refuse client -> {dst}: {}",
            c.enrolled_pod("node-a", "mesh/client").unwrap()
        );
    }
    // Refused once, not proxied back into themselves: nothing stays open.
    for node in ["node-a", "node-b"] {
        let drained = wait_until(Duration::from_secs(5), || {
            (counter(&c, node, "open_connections") == 0).then_some(())
        });
        assert!(
            drained.is_some(),
            "{node} still holds connections: {}",
            c.config_dump(node).unwrap()["proxy"]
        );
    }
    // The mesh still works.
    assert!(connect(&c, "mesh/client", &app_port));
}

#[test]
fn connections_beyond_the_maximum_are_refused_and_the_rest_go_on() {
    let (mut c, ip) = mesh(&["--max-connections", "2"]);
    let dst = format!("{ip}:8080");
    assert!(
        wait_until(Duration::from_secs(10), || connect(&c, "mesh/client", &dst)
            .then_some(()))
        .is_some()
    );
    // Two connections held open fill node-a's proxy...
    for _ in 0..2 {
        c.spawn_app(
            "mesh/client",
            &app(),
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "16",
                "--hold-ms",
                "8000",
            ],
        )
        .unwrap();
    }
    let full = wait_until(Duration::from_secs(5), || {
        (counter(&c, "node-a", "open_connections") == 2).then_some(())
    });
    assert!(
        full.is_some(),
        "{}",
        c.config_dump("node-a").unwrap()["proxy"]
    );
    // ...so a third is refused at once, and counted.
    assert!(!connect(&c, "mesh/client", &dst));
    assert!(counter(&c, "node-a", "refused_over_capacity") >= 1);
    // Once they end, new connections go through again.
    let again = wait_until(Duration::from_secs(20), || {
        connect(&c, "mesh/client", &dst).then_some(())
    });
    assert!(
        again.is_some(),
        "{}",
        c.config_dump("node-a").unwrap()["proxy"]
    );
}

/// The server pod's second port, parsed at L7 (a Service declares it HTTP, and a
/// DENY rule has a path): a connection to it waits for a request head.
const L7_PORT: u16 = 8081;

const L7_MANIFESTS: &str = r#"apiVersion: v1
kind: Service
metadata: {name: web, namespace: mesh}
spec:
  selector: {app: server}
  ports: [{name: http, port: 80, targetPort: 8081, appProtocol: http}]
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: mesh}
spec:
  action: DENY
  rules:
    - to: [{operation: {ports: ["8081"], paths: ["/admin"]}}]
"#;

/// Raises this process's soft open-file limit to its hard limit (the test holds
/// thousands of sockets); returns the new limit.
fn raise_open_file_limit() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    hard
}

/// Opens `n` TCP connections from the pod netns `netns` to `dst` (at most 256
/// connecting at once), each sending `first` (maybe nothing) and then nothing.
/// Returns the connections that are established, and how many more were
/// established but reset before the connect returned (refused by the server).
async fn idle_sockets(
    netns: &weft_node_dataplane::testing::PodNetns,
    dst: std::net::SocketAddr,
    n: usize,
    first: &'static [u8],
) -> (Vec<tokio::net::TcpStream>, usize) {
    use tokio::io::AsyncWriteExt;
    // Sockets belong to the network namespace they are created in.
    let socks = netns
        .run_async(move || {
            (0..n)
                .map(|_| tokio::net::TcpSocket::new_v4())
                .collect::<std::io::Result<Vec<_>>>()
        })
        .await
        .unwrap()
        .unwrap();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let mut tasks = tokio::task::JoinSet::new();
    for s in socks {
        let gate = gate.clone();
        tasks.spawn(async move {
            let _permit = gate.acquire_owned().await.unwrap();
            match tokio::time::timeout(Duration::from_secs(10), s.connect(dst)).await {
                Ok(Ok(mut c)) => {
                    if !first.is_empty() {
                        // A refused connection may be reset before this.
                        let _ = c.write_all(first).await;
                    }
                    Ok(Some(c))
                }
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::ConnectionReset => Ok(None),
                Ok(Err(e)) => Err(e.to_string()),
                Err(_) => Err("connect timed out".to_string()),
            }
        });
    }
    let (mut open, mut reset, mut failed) = (Vec::with_capacity(n), 0, Vec::new());
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(Some(c)) => open.push(c),
            Ok(None) => reset += 1,
            Err(e) => failed.push(e),
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {n} connections to {dst} failed, e.g. {}",
        failed.len(),
        failed[0]
    );
    (open, reset)
}

/// How many of `socks` are still open after `within` (the peer neither closed
/// nor reset them), waiting on all at once.
async fn still_open(socks: Vec<tokio::net::TcpStream>, within: Duration) -> usize {
    use tokio::io::AsyncReadExt;
    let until = tokio::time::Instant::now() + within;
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in socks {
        tasks.spawn(async move {
            let mut b = [0u8; 256];
            loop {
                match tokio::time::timeout_at(until, s.read(&mut b)).await {
                    Ok(Ok(0)) | Ok(Err(_)) => return false,
                    Ok(Ok(_)) => continue,
                    Err(_) => return true,
                }
            }
        });
    }
    let mut open = 0;
    while let Some(r) = tasks.join_next().await {
        open += usize::from(r.unwrap());
    }
    open
}

/// Proof for issue 27, item 9: 5,000 idle sockets opened against a node do not
/// stop a mesh request from succeeding. A pod outside the mesh opens 5,000 TCP
/// connections to a mesh pod's HBONE port (half of them send the first bytes of a
/// TLS record and no more) and 300 to its port parsed at L7 (plaintext from
/// outside the mesh, through :15006), all on node-b, whose agent has 4,096
/// descriptors. A mesh request then succeeds while they are held, the connections
/// beyond the per-source maximum of handshakes are refused at once, and the agent
/// closes every one of them by itself: the HBONE ones after the handshake
/// timeout, the plaintext ones after the HTTP idle timeout. Before, the agent
/// kept them all: it ran out of descriptors, and the mesh request failed.
#[test]
fn five_thousand_idle_sockets_do_not_stop_a_mesh_request() {
    require_root();
    assert!(
        raise_open_file_limit() >= 6_000,
        "this test holds 5,300 sockets"
    );
    let mut c = LocalCluster::with_args(
        &["node-a", "node-b"],
        &[],
        &[
            "--hbone-handshake-timeout",
            "3s",
            "--http-idle-timeout",
            "2s",
        ],
    )
    .unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c
        .add_pod("mesh", "server", "node-b", &[("app", "server")])
        .unwrap();
    c.add_pod("mesh", "client", "node-a", &[("app", "client")])
        .unwrap();
    c.add_pod("plain", "outsider", "node-a", &[]).unwrap();
    c.spawn_app(
        "mesh/server",
        &app(),
        &["server", "--listen", &format!("{ip}:8080")],
    )
    .unwrap();
    c.spawn_app(
        "mesh/server",
        &app(),
        &["http", "--listen", &format!("0.0.0.0:{L7_PORT}")],
    )
    .unwrap();
    c.write_manifest("l7.yaml", L7_MANIFESTS).unwrap();
    c.wait_enrolled("node-b", "mesh/server").unwrap();
    c.wait_enrolled("node-a", "mesh/client").unwrap();
    let app_port = format!("{ip}:8080");
    let mesh_works = |c: &LocalCluster, within: u64| {
        wait_until(Duration::from_secs(within), || {
            connect(c, "mesh/client", &app_port).then_some(())
        })
        .is_some()
    };
    assert!(
        mesh_works(&c, 20),
        "the mesh works: {}",
        c.agent_log("node-b")
    );
    // node-b's agent gets 4,096 descriptors: fewer than the sockets below.
    let pid = c.agent_pid("node-b").unwrap().to_string();
    let out = std::process::Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=4096:4096"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let outsider = weft_node_dataplane::testing::PodNetns::open(format!(
        "/var/run/netns/{}",
        c.pod("plain/outsider").netns
    ))
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let hbone: std::net::SocketAddr = format!("{ip}:15008").parse().unwrap();
    let l7: std::net::SocketAddr = format!("{ip}:{L7_PORT}").parse().unwrap();
    // A TLS handshake record header that announces a ClientHello never sent.
    const PARTIAL_HELLO: &[u8] = b"\x16\x03\x01\x02\x00\x01";
    // Every one is established (some are reset at once: refused by the agent).
    let ((silent, reset_a), (partial, reset_b), (plain, reset_c)) = rt.block_on(async {
        (
            idle_sockets(&outsider, hbone, 2_500, b"").await,
            idle_sockets(&outsider, hbone, 2_500, PARTIAL_HELLO).await,
            idle_sockets(&outsider, l7, 300, b"").await,
        )
    });
    let held = std::time::Instant::now();
    eprintln!(
        "held: {} + {} to :15008 ({} + {} reset at once), {} to :{L7_PORT} ({reset_c} reset)",
        silent.len(),
        partial.len(),
        reset_a,
        reset_b,
        plain.len()
    );
    assert_eq!(plain.len(), 300);

    // While they are held, a mesh request succeeds.
    let proxy = |c: &LocalCluster| match c.config_dump("node-b") {
        Ok(d) => d["proxy"].to_string(),
        Err(e) => format!("(node-b's /config_dump fails too: {e:#})"),
    };
    assert!(
        mesh_works(&c, 15),
        "a mesh request fails while the idle sockets are held: {}",
        proxy(&c)
    );
    let dump = c.config_dump("node-b").unwrap()["proxy"].clone();
    assert!(
        dump["hbone_refused_source_handshakes"]
            .as_u64()
            .unwrap_or(0)
            > 0,
        "one source's handshakes beyond its maximum are refused: {dump}"
    );
    // The agent closes every one of them by itself: the HBONE ones within the
    // handshake timeout (3 s), the plaintext ones within twice the idle timeout
    // (2 s), with time to spare.
    let left = Duration::from_secs(10).saturating_sub(held.elapsed());
    let open = rt.block_on(async {
        tokio::join!(
            still_open(silent, left),
            still_open(partial, left),
            still_open(plain, left)
        )
    });
    let log = c.agent_log("node-b");
    let tail: Vec<&str> = log.lines().rev().take(30).collect();
    assert_eq!(
        open,
        (0, 0, 0),
        "idle sockets the agent did not close: {}\n{}",
        proxy(&c),
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    );
    let dump = c.config_dump("node-b").unwrap()["proxy"].clone();
    let count = |k: &str| dump[k].as_u64().unwrap_or(0);
    assert_eq!(
        count("hbone_refused_source_handshakes") + count("hbone_handshake_timeouts"),
        5_000,
        "{dump}"
    );
    assert_eq!(count("l7_idle_closed"), 300, "{dump}");
    // And the mesh still works.
    assert!(mesh_works(&c, 10));
}
