//! What crosses the wire between nodes: enrolled traffic is mTLS (a TLS handshake to
//! :15008 and no plaintext payload in a packet capture of the node's uplink), and
//! both ends' metrics report mutual_tls with the right principals. Root; runs in CI.

use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until, Proc};

const SECRET: &str = "WEFT-MESH-SECRET-PAYLOAD-";
const PLAIN: &str = "WEFT-PLAINTEXT-CONTROL-PAYLOAD-";

fn count(haystack: &[u8], needle: &str) -> usize {
    haystack
        .windows(needle.len())
        .filter(|w| *w == needle.as_bytes())
        .count()
}

#[test]
fn enrolled_traffic_is_mutual_tls_on_the_wire() {
    require_root();
    let app = bin_path("weft-testapp").unwrap();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("mesh", true).unwrap();
    c.namespace("plain", false).unwrap();
    let ip = c
        .add_pod("mesh", "server", "node-b", &[("app", "server")])
        .unwrap();
    c.add_pod("mesh", "client", "node-a", &[("app", "client")])
        .unwrap();
    c.add_pod("plain", "client", "node-a", &[]).unwrap();
    let dst = format!("{ip}:8080");
    c.spawn_app("mesh/server", &app, &["server", "--listen", &dst])
        .unwrap();
    for (node, pod) in [("node-b", "mesh/server"), ("node-a", "mesh/client")] {
        assert!(
            wait_until(Duration::from_secs(20), || c.enrolled_pod(node, pod)).is_some(),
            "{pod}"
        );
    }
    assert!(wait_until(Duration::from_secs(10), || c
        .run_app(
            "plain/client",
            &app,
            &["client", "--connect", &dst, "--bytes", "1"]
        )
        .ok()?
        .0
        .then_some(()))
    .is_some());

    // Capture node-a's uplink.
    let (ns, uplink) = (
        c.nodes["node-a"].netns.clone(),
        c.nodes["node-a"].uplink.clone(),
    );
    let pcap = c.dir.path().join("uplink.pcap");
    let mut dump = Proc::spawn(
        "tcpdump",
        std::process::Command::new("nsenter")
            .arg(format!("--net=/var/run/netns/{ns}"))
            .args([
                "--", "tcpdump", "-U", "-n", "-B", "32768", "-s", "0", "-i", &uplink, "-w",
            ])
            .arg(&pcap)
            .arg("tcp"),
        &c.dir.path().join("tcpdump.log"),
    )
    .unwrap();
    assert!(
        wait_until(Duration::from_secs(5), || dump
            .log_text()
            .contains("listening on")
            .then_some(()))
        .is_some(),
        "tcpdump did not start: {}",
        dump.log_text()
    );

    let (ok, _, err) = c
        .run_app(
            "plain/client",
            &app,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "65536",
                "--text",
                PLAIN,
            ],
        )
        .unwrap();
    assert!(ok, "{err}");
    let (ok, _, err) = c
        .run_app(
            "mesh/client",
            &app,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "1048576",
                "--text",
                SECRET,
            ],
        )
        .unwrap();
    assert!(ok, "{err}");
    std::thread::sleep(Duration::from_millis(300));
    dump.terminate();

    let bytes = std::fs::read(&pcap).unwrap();
    assert!(
        count(&bytes, PLAIN) > 0,
        "control: the capture sees plaintext when there is some ({} bytes captured; tcpdump: {})",
        bytes.len(),
        String::from_utf8_lossy(
            &std::process::Command::new("tcpdump")
                .args(["-nn", "-r"])
                .arg(&pcap)
                .output()
                .unwrap()
                .stdout
        )
        .lines()
        .filter(|l| l.contains(".8080"))
        .take(4)
        .collect::<Vec<_>>()
        .join("\n")
    );
    assert_eq!(
        count(&bytes, SECRET),
        0,
        "enrolled payload crossed the wire in plaintext"
    );
    // TLS handshake records (content type 22) towards :15008.
    let hs = std::process::Command::new("tcpdump")
        .args(["-nn", "-r"])
        .arg(&pcap)
        .arg("tcp dst port 15008 and tcp[((tcp[12:1] & 0xf0) >> 2):1] = 0x16")
        .output()
        .unwrap();
    let handshakes = String::from_utf8_lossy(&hs.stdout).lines().count();
    assert!(handshakes >= 1, "no TLS handshake to :15008 in the capture");

    // Both ends say mutual_tls with the right principals.
    let src = "spiffe://cluster.local/ns/mesh/sa/client";
    let dstp = "spiffe://cluster.local/ns/mesh/sa/server";
    for (node, reporter) in [("node-a", "source"), ("node-b", "destination")] {
        let (_, m) = c.node_http(node, "/metrics").unwrap();
        let line = m
            .lines()
            .find(|l| {
                l.starts_with("weft_tcp_connections_opened_total{")
                    && l.contains(&format!("reporter=\"{reporter}\""))
                    && l.contains(&format!("source_principal=\"{src}\""))
                    && l.contains(&format!("destination_principal=\"{dstp}\""))
            })
            .unwrap_or_else(|| panic!("{node}: no {reporter} series for the mesh flow:\n{m}"));
        assert!(
            line.contains("connection_security_policy=\"mutual_tls\""),
            "{line}"
        );
        assert!(line.ends_with(" 1"), "{line}");
        assert!(m.contains("weft_tcp_sent_bytes_total{"), "{m}");
    }
    // The plaintext flow is reported as such at the destination.
    let (_, m) = c.node_http("node-b", "/metrics").unwrap();
    assert!(
        m.lines()
            .any(|l| l.starts_with("weft_tcp_connections_opened_total{")
                && l.contains("reporter=\"destination\"")
                && l.contains("source_namespace=\"plain\"")
                && l.contains("connection_security_policy=\"none\"")),
        "{m}"
    );
    assert!(
        m.contains("weft_authz_decisions_total{decision=\"allow\",policy=\"none\"}"),
        "{m}"
    );
}
