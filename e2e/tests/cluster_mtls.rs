//! What crosses the wire between nodes: enrolled traffic is mTLS (a TLS handshake to
//! :15008 and no plaintext payload in a packet capture of the node's uplink), and
//! both ends' metrics report mutual_tls with the right principals. Root; runs in CI.

#![forbid(unsafe_code)]

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
        c.wait_enrolled(node, pod).unwrap();
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

mod refusals {
    use super::*;
    use http_body_util::Empty;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use rcgen::{
        CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyPair,
        KeyUsagePurpose, SanType,
    };
    use std::net::SocketAddr;
    use weft_node_dataplane::testing::{Secret, WorkloadCert};

    /// An SVID for `id` signed by `issuer` (the mesh CA, or another one).
    fn svid(id: &str, issuer: &rcgen::Issuer<'_, KeyPair>, bundle: &str) -> WorkloadCert {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.distinguished_name = DistinguishedName::new();
        p.subject_alt_names = vec![SanType::URI(id.to_string().try_into().unwrap())];
        p.is_ca = IsCa::ExplicitNoCa;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p.signed_by(&key, issuer).unwrap();
        WorkloadCert {
            spiffe_id: id.into(),
            serial: String::new(),
            not_before: std::time::SystemTime::now(),
            not_after: std::time::SystemTime::now() + Duration::from_secs(3600),
            chain_pem: cert.pem(),
            trust_bundle_pem: bundle.into(),
            key_pem: Secret(key.serialize_pem()),
        }
    }

    /// Connects from `netns` to `target` with `cfg` and sends CONNECT `authority`:
    /// Ok(status) or Err(handshake/connection error).
    async fn try_connect(
        netns: &weft_node_dataplane::testing::PodNetns,
        target: SocketAddr,
        cfg: std::sync::Arc<rustls::ClientConfig>,
        authority: &str,
    ) -> Result<u16, String> {
        let sock = netns
            .tcp_socket(false, 0)
            .await
            .map_err(|e| e.to_string())?;
        let tcp = tokio::net::TcpSocket::from_std_stream(sock.into())
            .connect(target)
            .await
            .map_err(|e| e.to_string())?;
        let name = rustls::pki_types::ServerName::IpAddress(target.ip().into());
        let tls = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, tcp)
            .await
            .map_err(|e| format!("handshake: {e}"))?;
        let (mut send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| format!("h2: {e}"))?;
        tokio::spawn(conn);
        let req = http::Request::builder()
            .method(http::Method::CONNECT)
            .uri(authority)
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let resp = send
            .send_request(req)
            .await
            .map_err(|e| format!("request: {e}"))?;
        Ok(resp.status().as_u16())
    }

    /// Accepts any server: lets the test reach the server's client-certificate check.
    #[derive(Debug)]
    struct AnyServer(std::sync::Arc<rustls::crypto::CryptoProvider>);
    impl rustls::client::danger::ServerCertVerifier for AnyServer {
        fn verify_server_cert(
            &self,
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &[rustls::pki_types::CertificateDer<'_>],
            _: &rustls::pki_types::ServerName<'_>,
            _: &[u8],
            _: rustls::pki_types::UnixTime,
        ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        }
        fn verify_tls12_signature(
            &self,
            _: &[u8],
            _: &rustls::pki_types::CertificateDer<'_>,
            _: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
        }
        fn verify_tls13_signature(
            &self,
            m: &[u8],
            c: &rustls::pki_types::CertificateDer<'_>,
            d: &rustls::DigitallySignedStruct,
        ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(
                m,
                c,
                d,
                &self.0.signature_verification_algorithms,
            )
        }
        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }

    fn no_client_auth() -> std::sync::Arc<rustls::ClientConfig> {
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let mut cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(std::sync::Arc::new(AnyServer(provider)))
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"h2".to_vec()];
        std::sync::Arc::new(cfg)
    }

    fn other_ca() -> (rcgen::Issuer<'static, KeyPair>, String) {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut p = CertificateParams::default();
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        let pem = p.self_signed(&key).unwrap().pem();
        (rcgen::Issuer::new(p, key), pem)
    }

    #[test]
    fn hbone_refuses_foreign_ca_missing_cert_and_misdirected_identity() {
        require_root();
        let app = bin_path("weft-testapp").unwrap();
        let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
        c.namespace("mesh", true).unwrap();
        c.namespace("plain", false).unwrap();
        let server_ip = c
            .add_pod("mesh", "server", "node-b", &[("app", "server")])
            .unwrap();
        let other_ip = c
            .add_pod("mesh", "other", "node-b", &[("app", "other")])
            .unwrap();
        c.add_pod("plain", "prober", "node-a", &[]).unwrap();
        c.spawn_app(
            "mesh/server",
            &app,
            &["server", "--listen", &format!("{server_ip}:8080")],
        )
        .unwrap();
        c.spawn_app(
            "mesh/other",
            &app,
            &["server", "--listen", &format!("{other_ip}:8080")],
        )
        .unwrap();
        for pod in ["mesh/server", "mesh/other"] {
            c.wait_enrolled("node-b", pod).unwrap();
        }
        // The certificates the listeners present must exist before we probe.
        assert!(wait_until(Duration::from_secs(10), || {
            let d = c.config_dump("node-b").ok()?;
            (d["certificates"].as_array()?.len() >= 2).then_some(())
        })
        .is_some());

        let state = c.dir.path().join("cp-state/ca");
        let bundle = std::fs::read_to_string(state.join("root-bundle.crt")).unwrap();
        let ca_key =
            KeyPair::from_pem(&std::fs::read_to_string(state.join("ca.key")).unwrap()).unwrap();
        let ca_cert = std::fs::read_to_string(state.join("ca.crt")).unwrap();
        let mesh_ca = rcgen::Issuer::from_ca_cert_pem(&ca_cert, ca_key).unwrap();
        let server_id = "spiffe://cluster.local/ns/mesh/sa/server";
        let client_id = "spiffe://cluster.local/ns/plain/sa/prober";
        let prober = weft_node_dataplane::testing::PodNetns::open(format!(
            "/var/run/netns/{}",
            c.pod("plain/prober").netns
        ))
        .unwrap();
        let target: SocketAddr = format!("{server_ip}:15008").parse().unwrap();
        let authority = format!("{server_ip}:8080");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            // A valid SVID: accepted (CONNECT 200).
            let good = weft_node_dataplane::testing::client_config(
                &svid(client_id, &mesh_ca, &bundle),
                &bundle,
                server_id,
            )
            .unwrap();
            assert_eq!(
                try_connect(&prober, target, good.clone(), &authority).await,
                Ok(200)
            );
            // Another CA: refused in the handshake.
            let (foreign, _) = other_ca();
            let bad = weft_node_dataplane::testing::client_config(
                &svid(client_id, &foreign, &bundle),
                &bundle,
                server_id,
            )
            .unwrap();
            let r = try_connect(&prober, target, bad, &authority).await;
            assert!(
                r.is_err(),
                "a certificate from another CA was accepted: {r:?}"
            );
            // No client certificate: refused.
            let r = try_connect(&prober, target, no_client_auth(), &authority).await;
            assert!(
                r.is_err(),
                "a client without a certificate was accepted: {r:?}"
            );
            // A valid session with mesh/server's listener, CONNECT to mesh/other (another
            // identity on the same node): misdirected.
            let r = try_connect(&prober, target, good.clone(), &format!("{other_ip}:8080")).await;
            assert_eq!(
                r,
                Ok(421),
                "CONNECT to a workload whose identity the listener did not present"
            );
            // CONNECT to the proxy's own ports: refused (proxied, it would come back
            // into the same listener, again and again).
            for port in [15006, 15008] {
                let r = try_connect(
                    &prober,
                    target,
                    good.clone(),
                    &format!("{server_ip}:{port}"),
                )
                .await;
                assert_eq!(r, Ok(403), "CONNECT to the proxy's port {port}");
            }
            // And the client refuses a server that is not the identity it expects.
            let expect_other = weft_node_dataplane::testing::client_config(
                &svid(client_id, &mesh_ca, &bundle),
                &bundle,
                "spiffe://cluster.local/ns/mesh/sa/other",
            )
            .unwrap();
            let r = try_connect(&prober, target, expect_other, &authority).await;
            assert!(
                r.as_ref().is_err_and(|e| e.contains("not the expected")),
                "{r:?}"
            );
        });
        let d = c.config_dump("node-b").unwrap();
        assert!(
            d["proxy"]["hbone_refused"].as_u64().unwrap() >= 2,
            "{}",
            d["proxy"]
        );
    }
}

#[test]
fn certificate_rotation_keeps_established_connections_and_new_handshakes_use_the_new_one() {
    require_root();
    let app = bin_path("weft-testapp").unwrap();
    // 8 s SVIDs: renewed after ~4 s.
    let mut c = LocalCluster::with_control_plane_args(&["node-a", "node-b"], &["--svid-ttl", "8s"])
        .unwrap();
    let dst = c.mesh_pair().unwrap();
    let client_serial = |c: &LocalCluster| -> String {
        c.config_dump("node-a")
            .ok()
            .and_then(|d| {
                d["certificates"]
                    .as_array()?
                    .iter()
                    .find(|x| x["spiffe_id"] == "spiffe://cluster.local/ns/mesh/sa/client")
                    .and_then(|x| x["serial"].as_str().map(str::to_owned))
            })
            .unwrap_or_default()
    };
    let first = client_serial(&c);

    // A connection held open across the renewal completes, byte-exact.
    let (ok, _, err) = c
        .run_app(
            "mesh/client",
            &app,
            &[
                "client",
                "--connect",
                &dst,
                "--bytes",
                "65536",
                "--hold-ms",
                "7000",
            ],
        )
        .unwrap();
    assert!(
        ok,
        "the established connection broke during rotation: {err}"
    );
    let renewed = client_serial(&c);
    assert_ne!(
        renewed, first,
        "the client certificate was not renewed within 7 s"
    );

    // After the pooled connection went idle (2 s here), a new handshake presents the
    // renewed certificate.
    std::thread::sleep(Duration::from_secs(4));
    // SVIDs renew every few seconds here: the handshake must use the certificate that
    // was current just before or just after it.
    let before = client_serial(&c);
    assert!(
        c.run_app(
            "mesh/client",
            &app,
            &["client", "--connect", &dst, "--bytes", "1024"]
        )
        .unwrap()
        .0
    );
    let after = client_serial(&c);
    let seen = c.config_dump("node-b").unwrap()["proxy"]["last_hbone_peer_serial"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        seen == before || seen == after,
        "the new handshake used {seen}, not the current certificate ({before} / {after})"
    );
    assert_ne!(
        seen, first,
        "the new handshake still used the first certificate"
    );
}
