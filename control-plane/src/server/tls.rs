//! TLS for the gRPC server: a serving certificate from the mesh CA that is renewed
//! at half life (and when another CA signs) without a restart, and client-certificate verification against the
//! trust bundle (optional at the TLS layer; the authenticator decides), and
//! connections that close when their client's credential is revoked or expires.

use crate::identity::authority::Authority;
use crate::identity::Ca;
use futures::future::BoxFuture;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;

#[derive(Debug)]
pub struct ServingCert {
    current: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for ServingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(
            self.current
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        )
    }
}

pub fn certified_key(chain_pem: &str, key_pem: &str) -> anyhow::Result<CertifiedKey> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut chain_pem.as_bytes()).collect::<Result<_, _>>()?;
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_bytes())?
        .ok_or_else(|| anyhow::anyhow!("no private key in PEM"))?;
    let signer = rustls::crypto::ring::sign::any_supported_type(&key)?;
    Ok(CertifiedKey::new(certs, signer))
}

pub const SERVING_CERT_TTL: Duration = Duration::from_secs(24 * 3600);

impl ServingCert {
    pub fn issue(ca: &Ca, names: &[String], ips: &[IpAddr]) -> anyhow::Result<Arc<Self>> {
        let (c, k) = ca.issue_server_cert(names, ips, SERVING_CERT_TTL)?;
        Ok(Arc::new(Self {
            current: RwLock::new(Arc::new(certified_key(&c.chain_pem, &k)?)),
        }))
    }

    fn renew(&self, ca: &Ca, names: &[String], ips: &[IpAddr]) {
        match ca
            .issue_server_cert(names, ips, SERVING_CERT_TTL)
            .map_err(anyhow::Error::from)
            .and_then(|(c, k)| certified_key(&c.chain_pem, &k))
        {
            Ok(ck) => {
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(ck);
                tracing::info!("renewed the control plane's serving certificate");
            }
            Err(e) => {
                tracing::error!(error = %e, "renewing the serving certificate failed; keeping the current one")
            }
        }
    }
}

/// The TLS acceptor of the gRPC server, rebuilt when the trust bundle changes.
pub struct Acceptor {
    current: RwLock<TlsAcceptor>,
    cert: Arc<ServingCert>,
}

impl Acceptor {
    pub fn new(bundle_pem: &str, cert: Arc<ServingCert>) -> anyhow::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            current: RwLock::new(acceptor(bundle_pem, cert.clone())?),
            cert,
        }))
    }
    pub fn get(&self) -> TlsAcceptor {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Follows the CA in force, forever: re-issues the serving certificate at half
    /// life and as soon as another CA signs, and trusts the bundle in force for
    /// client certificates.
    pub async fn follow(
        self: Arc<Self>,
        authority: Arc<Authority>,
        names: Vec<String>,
        ips: Vec<IpAddr>,
    ) {
        let mut changes = authority.watch();
        let mut view = authority.view();
        // A fixed deadline: frequent view changes must not postpone renewal.
        let mut renew_at = tokio::time::Instant::now() + SERVING_CERT_TTL / 2;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(renew_at) => {
                    self.cert.renew(&authority.signer(), &names, &ips);
                    renew_at = tokio::time::Instant::now() + SERVING_CERT_TTL / 2;
                    continue;
                }
                r = changes.changed() => if r.is_err() { return },
            }
            let new = authority.view();
            if new.signer.cert_pem() != view.signer.cert_pem() {
                self.cert.renew(&new.signer, &names, &ips);
                renew_at = tokio::time::Instant::now() + SERVING_CERT_TTL / 2;
            }
            if new.bundle_pem != view.bundle_pem {
                match acceptor(&new.bundle_pem, self.cert.clone()) {
                    Ok(a) => {
                        *self.current.write().unwrap_or_else(|p| p.into_inner()) = a;
                        tracing::info!(
                            "client certificates are now checked against the new trust bundle"
                        );
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "the new trust bundle is unusable for client certificates; keeping the current one")
                    }
                }
            }
            view = new;
        }
    }
}

fn acceptor(bundle_pem: &str, cert: Arc<ServingCert>) -> anyhow::Result<TlsAcceptor> {
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut bundle_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(cfg)))
}

/// Decides how long a client's connection may live, from the certificates it
/// presented (standalone mode: until its node credential is revoked or expires).
pub trait ConnectionGuard: Send + Sync + 'static {
    /// A future that completes when the connection must be closed; `None`: never.
    fn watch(&self, certs: &[CertificateDer<'static>]) -> Option<BoxFuture<'static, ()>>;
}

/// Closes a connection whose client certificate no longer chains to the bundle in
/// force: after a CA rotation retires the old CA, a node credential it signed is not
/// accepted on connections opened before either.
pub struct TrustGuard {
    pub authority: Arc<Authority>,
}

/// Does `certs` (leaf first) chain to a root of `bundle_pem` for client auth?
fn chains_to(certs: &[CertificateDer<'static>], bundle_pem: &str) -> bool {
    let Some((leaf, intermediates)) = certs.split_first() else {
        return true;
    };
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut bundle_pem.as_bytes()).flatten() {
        let _ = roots.add(c);
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let Ok(verifier) =
        WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider).build()
    else {
        return false;
    };
    verifier
        .verify_client_cert(leaf, intermediates, rustls::pki_types::UnixTime::now())
        .is_ok()
}

impl ConnectionGuard for TrustGuard {
    fn watch(&self, certs: &[CertificateDer<'static>]) -> Option<BoxFuture<'static, ()>> {
        if certs.is_empty() {
            return None;
        }
        let certs = certs.to_vec();
        let authority = self.authority.clone();
        let mut changes = authority.watch();
        Some(Box::pin(async move {
            while changes.changed().await.is_ok() {
                if !chains_to(&certs, &authority.bundle_pem()) {
                    tracing::info!("closing a connection whose client certificate the CA in force no longer trusts");
                    return;
                }
            }
            std::future::pending::<()>().await
        }))
    }
}

/// Fires when the first of its guards does.
pub struct AnyGuard(pub Vec<Arc<dyn ConnectionGuard>>);

impl ConnectionGuard for AnyGuard {
    fn watch(&self, certs: &[CertificateDer<'static>]) -> Option<BoxFuture<'static, ()>> {
        let all: Vec<BoxFuture<'static, ()>> =
            self.0.iter().filter_map(|g| g.watch(certs)).collect();
        if all.is_empty() {
            return None;
        }
        Some(Box::pin(async move {
            futures::future::select_all(all).await;
        }))
    }
}

/// A TLS connection that fails every read and write once its guard fired, so the
/// gRPC server closes it and every stream on it (a revoked node's Subscribe stream
/// included).
pub struct GuardedStream {
    io: TlsStream<TcpStream>,
    close: Option<BoxFuture<'static, ()>>,
    closed: bool,
}

impl GuardedStream {
    pub fn new(io: TlsStream<TcpStream>, guard: Option<&dyn ConnectionGuard>) -> Self {
        let close = guard.and_then(|g| {
            let certs = io.get_ref().1.peer_certificates()?;
            g.watch(certs)
        });
        Self {
            io,
            close,
            closed: false,
        }
    }

    fn check(&mut self, cx: &mut Context<'_>) -> std::io::Result<()> {
        if !self.closed {
            if let Some(f) = self.close.as_mut() {
                if f.as_mut().poll(cx).is_ready() {
                    self.closed = true;
                    self.close = None;
                }
            }
        }
        if self.closed {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionAborted,
                "the client's credential was revoked or expired",
            ));
        }
        Ok(())
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        if let Err(e) = me.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        if let Err(e) = me.check(cx) {
            return Poll::Ready(Err(e));
        }
        Pin::new(&mut me.io).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

impl Connected for GuardedStream {
    type ConnectInfo = <TlsStream<TcpStream> as Connected>::ConnectInfo;
    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

/// Accepts TCP connections and completes TLS handshakes concurrently, yielding
/// established streams, each under `guard`. A failed handshake is logged and dropped.
pub fn incoming(
    listener: TcpListener,
    acceptor: Arc<Acceptor>,
    guard: Option<Arc<dyn ConnectionGuard>>,
) -> tokio_stream::wrappers::ReceiverStream<Result<GuardedStream, std::io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            if tx.is_closed() {
                return;
            }
            let acceptor = acceptor.get();
            let tx = tx.clone();
            let guard = guard.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let io = GuardedStream::new(tls, guard.as_deref());
                        let _ = tx.send(Ok(io)).await;
                    }
                    Ok(Err(e)) => tracing::info!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::info!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
