//! The Workload API against the real client (the `spiffe` crate) over a Unix
//! socket, with a fake provider that attests this test process.

use super::*;
use futures::StreamExt;
use spiffe::{SpiffeId, TrustDomain, WorkloadApiClient, WorkloadApiError};
use std::path::PathBuf;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use weft_proto::workload_api::spiffe_workload_api_client::SpiffeWorkloadApiClient;
use weft_proto::workload_api::{JwtsvidRequest, X509svidRequest};

const ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const OTHER_ID: &str = "spiffe://cluster.local/ns/shop/sa/other";
const TD: &str = "cluster.local";
const JWKS: &[u8] = br#"{"keys":[]}"#;

fn b64url(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

/// A syntactically valid JWT-SVID for [`ID`] (the signature is not checked by
/// the client's parse).
fn token() -> String {
    let header = br#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#;
    let claims = serde_json::json!({"sub": ID, "aud": ["billing"], "exp": 4102444800u64});
    format!(
        "{}.{}.{}",
        b64url(header),
        b64url(claims.to_string().as_bytes()),
        b64url(b"not-a-signature")
    )
}

struct Pki {
    ca_der: Vec<u8>,
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new() -> Self {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "test mesh CA");
        let ca_der = ca_params.self_signed(&ca_key).unwrap().der().to_vec();
        Self {
            ca_der,
            ca_params,
            ca_key,
        }
    }

    /// A fresh leaf for [`ID`] signed by the CA.
    fn leaf(&self) -> X509Material {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.subject_alt_names = vec![rcgen::SanType::URI(ID.try_into().unwrap())];
        // X.509-SVID leaves carry basicConstraints CA:false.
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let leaf = params.signed_by(&key, &issuer).unwrap();
        X509Material {
            spiffe_id: ID.into(),
            chain_der: vec![leaf.der().to_vec()],
            key_pkcs8_der: key.serialize_der(),
            bundle_der: vec![self.ca_der.clone()],
            trust_domain: TD.into(),
        }
    }
}

struct Fake {
    /// Attest this pid (`None`: attest nobody).
    pid: Option<i32>,
    x509: watch::Sender<Option<X509Material>>,
    jwt_bundles: watch::Sender<JwtBundles>,
}

impl Fake {
    fn new(pid: Option<i32>, material: Option<X509Material>) -> Arc<Self> {
        Arc::new(Self {
            pid,
            x509: watch::channel(material).0,
            jwt_bundles: watch::channel(vec![(TD.to_string(), JWKS.to_vec())]).0,
        })
    }
}

impl Provider for Fake {
    fn attest(&self, pid: i32) -> Option<Caller> {
        // What the integrator does: the pid's network namespace decides.
        let own = netns_inode(std::process::id() as i32).ok()?;
        (self.pid == Some(pid) && netns_inode(pid).ok()? == own).then(|| Caller {
            spiffe_id: ID.into(),
            pod: "shop/web-0".into(),
        })
    }

    fn x509(&self, spiffe_id: &str) -> watch::Receiver<Option<X509Material>> {
        assert_eq!(spiffe_id, ID);
        self.x509.subscribe()
    }

    fn jwt_svid(
        &self,
        spiffe_id: &str,
        audiences: &[String],
    ) -> BoxFuture<'static, Result<String, tonic::Status>> {
        assert_eq!(spiffe_id, ID);
        assert_eq!(audiences, ["billing"]);
        Box::pin(async { Ok(token()) })
    }

    fn jwt_bundles(&self) -> watch::Receiver<JwtBundles> {
        self.jwt_bundles.subscribe()
    }

    fn validate_jwt(&self, tok: &str, audience: &str) -> Result<(String, Claims), tonic::Status> {
        if tok != token() || audience != "billing" {
            return Err(tonic::Status::invalid_argument("invalid JWT-SVID"));
        }
        let claims = serde_json::json!({"sub": ID, "aud": ["billing"], "exp": 4102444800u64});
        let serde_json::Value::Object(claims) = claims else {
            unreachable!()
        };
        Ok((ID.into(), claims))
    }
}

struct Server {
    _dir: tempfile::TempDir,
    sock: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), Error>>,
}

impl Server {
    fn start(provider: Arc<dyn Provider>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("run/weft/workload.sock");
        let listener = bind(&sock).unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, provider, async {
            let _ = rx.await;
        }));
        Self {
            _dir: dir,
            sock,
            stop: Some(tx),
            task,
        }
    }

    fn endpoint(&self) -> String {
        format!("unix://{}", self.sock.display())
    }

    async fn client(&self) -> WorkloadApiClient {
        WorkloadApiClient::connect_to(self.endpoint())
            .await
            .unwrap()
    }

    /// The generated client, which sends only the metadata a test adds.
    async fn raw_client(&self) -> SpiffeWorkloadApiClient<tonic::transport::Channel> {
        let endpoint = spiffe::transport::Endpoint::parse(&self.endpoint()).unwrap();
        SpiffeWorkloadApiClient::new(spiffe::transport::connect(&endpoint).await.unwrap())
    }

    async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(10), &mut self.task)
            .await
            .expect("server stops")
            .unwrap()
            .unwrap();
    }
}

fn own_pid() -> Option<i32> {
    Some(std::process::id() as i32)
}

fn status_code(e: &WorkloadApiError) -> Option<spiffe::transport::GrpcStatusCode> {
    match e {
        WorkloadApiError::Transport(spiffe::transport::TransportError::Status(s)) => Some(s.code()),
        _ => None,
    }
}

async fn within<T>(f: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("in time")
}

#[tokio::test]
async fn socket_is_world_connectable_and_rebinds_over_a_stale_socket() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sub/api.sock");
    let first = bind(&sock).unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&sock), 0o666);
    assert_eq!(mode(sock.parent().unwrap()), 0o755);
    drop(first); // leaves the socket file behind, as a crashed agent would
    let _second = bind(&sock).unwrap();

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    assert!(matches!(bind(&file), Err(Error::NotASocket { .. })));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn netns_inode_is_the_processs_network_namespace() {
    let own = netns_inode(std::process::id() as i32).unwrap();
    let via_self = std::fs::metadata("/proc/self/ns/net").unwrap();
    assert_eq!(own, std::os::unix::fs::MetadataExt::ino(&via_self));
    assert!(netns_inode(0).is_err());
    assert!(netns_inode(-1).is_err());
}

#[tokio::test]
async fn x509_svid_and_rotation_reach_the_real_client() {
    let pki = Pki::new();
    let first = pki.leaf();
    let fake = Fake::new(own_pid(), Some(first.clone()));
    let server = Server::start(fake.clone());
    let client = server.client().await;

    let svid = within(client.fetch_x509_svid()).await.unwrap();
    assert_eq!(svid.spiffe_id().to_string(), ID);
    let chain: Vec<&[u8]> = svid.cert_chain().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(chain, [first.chain_der[0].as_slice()]);

    let ctx = within(client.fetch_x509_context()).await.unwrap();
    let td = TrustDomain::new(TD).unwrap();
    let bundle = ctx.bundle_set().get(&td).expect("own trust domain bundle");
    assert_eq!(bundle.authorities()[0].as_bytes(), pki.ca_der.as_slice());

    let mut updates = within(client.stream_x509_svids()).await.unwrap();
    let current = within(updates.next()).await.unwrap().unwrap();
    assert_eq!(current.leaf().as_bytes(), first.chain_der[0].as_slice());

    let rotated = pki.leaf();
    assert_ne!(rotated.chain_der, first.chain_der);
    fake.x509.send_replace(Some(rotated.clone()));
    let next = within(updates.next()).await.unwrap().unwrap();
    assert_eq!(next.spiffe_id().to_string(), ID);
    assert_eq!(next.leaf().as_bytes(), rotated.chain_der[0].as_slice());
    assert_eq!(
        next.private_key().as_bytes(),
        rotated.key_pkcs8_der.as_slice()
    );

    // Withdrawing the identity ends the stream with PermissionDenied.
    fake.x509.send_replace(None);
    let end = within(updates.next()).await.unwrap();
    assert!(
        matches!(end, Err(WorkloadApiError::PermissionDenied(_))),
        "{end:?}"
    );

    server.shutdown().await;
}

#[tokio::test]
async fn x509_svid_waits_for_the_identity_to_be_issued() {
    let pki = Pki::new();
    let fake = Fake::new(own_pid(), None);
    let server = Server::start(fake.clone());
    let client = server.client().await;
    let fetch = tokio::spawn(async move { client.fetch_x509_svid().await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!fetch.is_finished());
    let material = pki.leaf();
    fake.x509.send_replace(Some(material.clone()));
    let svid = within(fetch).await.unwrap().unwrap();
    assert_eq!(svid.leaf().as_bytes(), material.chain_der[0].as_slice());
    server.shutdown().await;
}

#[tokio::test]
async fn x509_bundles_follow_the_trust_anchors() {
    let pki = Pki::new();
    let material = pki.leaf();
    let fake = Fake::new(own_pid(), Some(material.clone()));
    let server = Server::start(fake.clone());
    let client = server.client().await;
    let td = TrustDomain::new(TD).unwrap();

    let bundles = within(client.fetch_x509_bundles()).await.unwrap();
    assert_eq!(bundles.len(), 1);
    let own = bundles.get(&td).unwrap();
    assert_eq!(own.authorities()[0].as_bytes(), pki.ca_der.as_slice());

    // A new CA in the bundle (say, during a CA rotation) is pushed.
    let mut updates = within(client.stream_x509_bundles()).await.unwrap();
    within(updates.next()).await.unwrap().unwrap();
    let next_ca = Pki::new();
    let mut grown = material.clone();
    grown.bundle_der.push(next_ca.ca_der.clone());
    fake.x509.send_replace(Some(grown));
    let set = within(updates.next()).await.unwrap().unwrap();
    let own = set.get(&td).unwrap();
    let cas: Vec<&[u8]> = own.authorities().iter().map(|c| c.as_bytes()).collect();
    assert_eq!(cas, [pki.ca_der.as_slice(), next_ca.ca_der.as_slice()]);
    server.shutdown().await;
}

#[tokio::test]
async fn jwt_svid_bundles_and_validation() {
    let fake = Fake::new(own_pid(), None);
    let server = Server::start(fake.clone());
    let client = server.client().await;

    let svid = within(client.fetch_jwt_svid(["billing"], None))
        .await
        .unwrap();
    assert_eq!(svid.token(), token());
    assert_eq!(svid.spiffe_id().to_string(), ID);
    assert_eq!(svid.audience(), ["billing"]);

    // Its own SPIFFE ID, named explicitly, is fine.
    let own = SpiffeId::new(ID).unwrap();
    let named = within(client.fetch_jwt_svid(["billing"], Some(&own)))
        .await
        .unwrap();
    assert_eq!(named.token(), token());

    let bundles = within(client.fetch_jwt_bundles()).await.unwrap();
    assert!(bundles.get(&TrustDomain::new(TD).unwrap()).is_some());

    let valid = within(client.validate_jwt_token("billing", &token()))
        .await
        .unwrap();
    assert_eq!(valid.spiffe_id().to_string(), ID);
    let invalid = within(client.validate_jwt_token("billing", "a.b.c")).await;
    assert!(invalid.is_err());

    server.shutdown().await;
}

#[tokio::test]
async fn jwt_svid_for_another_identity_is_denied() {
    let server = Server::start(Fake::new(own_pid(), None));
    let client = server.client().await;
    let other = SpiffeId::new(OTHER_ID).unwrap();
    let err = within(client.fetch_jwt_svid(["billing"], Some(&other)))
        .await
        .unwrap_err();
    assert!(
        matches!(err, WorkloadApiError::PermissionDenied(_)),
        "{err:?}"
    );
    server.shutdown().await;
}

#[tokio::test]
async fn jwt_svid_needs_a_bounded_audience() {
    let server = Server::start(Fake::new(own_pid(), None));
    let client = server.client().await;
    let err = within(client.fetch_jwt_svid(Vec::<String>::new(), None))
        .await
        .unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(spiffe::transport::GrpcStatusCode::InvalidArgument),
        "{err:?}"
    );
    let too_many: Vec<String> = (0..=MAX_AUDIENCES).map(|i| format!("aud{i}")).collect();
    let err = within(client.fetch_jwt_svid(&too_many, None))
        .await
        .unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(spiffe::transport::GrpcStatusCode::InvalidArgument)
    );
    let too_long = "a".repeat(MAX_AUDIENCE_LEN + 1);
    let err = within(client.fetch_jwt_svid([too_long], None))
        .await
        .unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(spiffe::transport::GrpcStatusCode::InvalidArgument)
    );
    let huge = "x".repeat(MAX_TOKEN_LEN + 1);
    let err = within(client.validate_jwt_token("billing", &huge))
        .await
        .unwrap_err();
    assert_eq!(
        status_code(&err),
        Some(spiffe::transport::GrpcStatusCode::InvalidArgument)
    );
    server.shutdown().await;
}

#[tokio::test]
async fn unattested_callers_are_denied_everything() {
    let pki = Pki::new();
    let server = Server::start(Fake::new(None, Some(pki.leaf())));
    let client = server.client().await;
    let denied = |r: Result<(), WorkloadApiError>| {
        assert!(
            matches!(r, Err(WorkloadApiError::PermissionDenied(_))),
            "{r:?}"
        )
    };
    denied(within(client.fetch_x509_svid()).await.map(drop));
    denied(within(client.fetch_x509_bundles()).await.map(drop));
    denied(
        within(client.fetch_jwt_svid(["billing"], None))
            .await
            .map(drop),
    );
    denied(within(client.fetch_jwt_bundles()).await.map(drop));
    denied(
        within(client.validate_jwt_token("billing", &token()))
            .await
            .map(drop),
    );
    server.shutdown().await;
}

#[tokio::test]
async fn requests_without_the_security_header_are_invalid() {
    let pki = Pki::new();
    let server = Server::start(Fake::new(own_pid(), Some(pki.leaf())));
    let mut raw = server.raw_client().await;

    let err = within(raw.fetch_x509svid(X509svidRequest {}))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let mut wrong = tonic::Request::new(JwtsvidRequest {
        audience: vec!["billing".into()],
        spiffe_id: String::new(),
    });
    wrong
        .metadata_mut()
        .insert(SECURITY_HEADER, "TRUE".parse().unwrap());
    let err = within(raw.fetch_jwtsvid(wrong)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    // With the header, the same client is served.
    let mut ok = tonic::Request::new(X509svidRequest {});
    ok.metadata_mut()
        .insert(SECURITY_HEADER, "true".parse().unwrap());
    let mut stream = within(raw.fetch_x509svid(ok)).await.unwrap().into_inner();
    let first = within(stream.message()).await.unwrap().unwrap();
    assert_eq!(first.svids[0].spiffe_id, ID);
    server.shutdown().await;
}

#[tokio::test]
async fn shutdown_ends_open_streams() {
    let pki = Pki::new();
    let server = Server::start(Fake::new(own_pid(), Some(pki.leaf())));
    let client = server.client().await;
    let mut updates = within(client.stream_x509_svids()).await.unwrap();
    within(updates.next()).await.unwrap().unwrap();
    let waiting = tokio::spawn(async move { updates.next().await.map(|r| r.map(drop)) });
    server.shutdown().await;
    // The stream ends (cleanly or with the connection), not hangs.
    let _ = within(waiting).await.unwrap();
}

#[tokio::test]
async fn connections_past_the_per_pod_limit_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let listener = bind(&sock).unwrap();
    let limits = Limits {
        max_connections_per_pod: 1,
        ..Limits::default()
    };
    let (tx, rx) = oneshot::channel::<()>();
    let pki = Pki::new();
    let task = tokio::spawn(serve_with(
        listener,
        Fake::new(own_pid(), Some(pki.leaf())),
        limits,
        async {
            let _ = rx.await;
        },
    ));
    let endpoint = format!("unix://{}", sock.display());
    let first = WorkloadApiClient::connect_to(&endpoint).await.unwrap();
    within(first.fetch_x509_svid()).await.unwrap();
    // The second connection of the same pod is dropped at accept.
    let second = match WorkloadApiClient::connect_to(&endpoint).await {
        Ok(c) => within(c.fetch_x509_svid()).await.map(drop),
        Err(e) => Err(e),
    };
    assert!(second.is_err());
    // The first one is still served.
    within(first.fetch_x509_svid()).await.unwrap();
    drop(first);
    let _ = tx.send(());
    within(task).await.unwrap().unwrap();
}
