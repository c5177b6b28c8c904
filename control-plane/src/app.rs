//! Wires the control plane together: CA, model, config source, gRPC and admin servers.

use crate::admin::{self, AdminState};
use crate::config::{directory::DirectorySource, ConfigSource, SourceEvent};
use crate::identity::authority::{Authority, View};
use crate::identity::{CaOptions, JwtSigner};
use crate::k8s::{self, KubeSettings};
use crate::metrics::Metrics;
use crate::rotation::{CaStore, Rotation};
use crate::server::revocation::{self, Revocations};
use crate::server::{
    certificates::Signer, distribution::Distribution, tls, CertNodeAuthenticator,
    NodeAuthenticator, Sessions,
};
use anyhow::Context;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use weft_model::{Model, ModelConfig};
use weft_proto::pb::{
    certificates_server::CertificatesServer, modules_server::ModulesServer,
    node_config_server::NodeConfigServer, node_credentials_server::NodeCredentialsServer,
};
use weft_proto::spiffe::TrustDomain;

/// How long a starting control plane waits for its first reads of plugin modules
/// before it serves nodes anyway (a module read gives up after 30 s by itself).
const FIRST_MODULE_READS: Duration = Duration::from_secs(35);

/// Where the configuration comes from.
#[derive(Debug, Clone)]
pub enum SourceSettings {
    /// Standalone: a directory of manifests; the CA lives under the state directory.
    Directory(PathBuf),
    /// The Kubernetes API; the CA lives in a Secret.
    Kubernetes(KubeSettings),
}

#[derive(Debug, Clone)]
pub struct Settings {
    pub source: SourceSettings,
    pub state_dir: PathBuf,
    pub trust_domain: TrustDomain,
    pub root_namespace: String,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub server_names: Vec<String>,
    pub svid_ttl: Duration,
    /// Lifetime of JWT-SVIDs (`Certificates.SignJwt`).
    pub jwt_svid_ttl: Duration,
    /// Lifetime of renewed node credentials (standalone mode).
    pub node_credential_ttl: Duration,
    pub ca_cert: Option<PathBuf>,
    pub ca_key: Option<PathBuf>,
    pub ca_bundle: Option<PathBuf>,
    /// Pods without a ServiceAccount, and mirror pods, get `sa/default`'s identity.
    pub default_identity_fallback: bool,
    /// Least time each phase of a CA rotation lasts.
    pub ca_rotation_min_phase: Duration,
}

impl Settings {
    pub fn ca_options(&self) -> CaOptions {
        CaOptions {
            state_dir: self.state_dir.clone(),
            trust_domain: self.trust_domain.clone(),
            svid_ttl: self.svid_ttl,
            user_cert: self.ca_cert.clone(),
            user_key: self.ca_key.clone(),
            user_bundle: self.ca_bundle.clone(),
        }
    }
}

/// Handles of a running control plane (tests use them; the binary just waits).
pub struct Running {
    pub model: Arc<Model>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
    pub grpc_addr: SocketAddr,
    pub admin_addr: SocketAddr,
}

pub async fn run(
    s: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let (_, fut) = start(s, shutdown).await?;
    fut.await
}

/// Starts everything; returns the handles and a future that completes on shutdown
/// (or with the first fatal error).
pub async fn start(
    s: Settings,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    Running,
    impl std::future::Future<Output = anyhow::Result<()>>,
)> {
    let metrics = Arc::new(Metrics::new());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    // Kubernetes mode: a client, leader election, and the CA from its Secret.
    let mut elector_task = None;
    let kube = match &s.source {
        SourceSettings::Directory(_) => {
            metrics.leader.set(1);
            None
        }
        SourceSettings::Kubernetes(ks) => {
            let client = k8s::client(ks).await?;
            let (leader_tx, leader_rx) = tokio::sync::watch::channel(false);
            let elector = k8s::leader::LeaderElector::new(
                client.clone(),
                &ks.namespace,
                &ks.lease_name,
                &ks.identity,
            );
            elector_task = Some(tokio::spawn(elector.run(
                leader_tx,
                metrics.clone(),
                stop_rx.clone(),
            )));
            Some((client, leader_rx, ks.clone()))
        }
    };
    // The JWT-SVID signing key lives beside the CA: a file in its directory, or a
    // key of its Secret.
    let (ca, jwt, ca_store) = match &kube {
        None => (
            crate::identity::stored::load_or_create(&s.ca_options()).context("loading the CA")?,
            JwtSigner::load_or_create(&s.ca_options(), s.jwt_svid_ttl)
                .context("loading the JWT-SVID signing key")?,
            CaStore::Files(s.ca_options().dir()),
        ),
        Some((client, leader, ks)) => {
            let secret = Arc::new(k8s::ca_secret::CaSecret::new(
                client.clone(),
                &ks.namespace,
                &ks.ca_secret,
                s.trust_domain.clone(),
                s.svid_ttl,
            ));
            let ca = secret
                .load_or_create(leader.clone())
                .await
                .context("loading the CA from its Secret")?;
            let jwt = secret
                .load_or_create_jwt(s.jwt_svid_ttl)
                .await
                .context("loading the JWT-SVID signing key from the CA Secret")?;
            let store = CaStore::Kube {
                secret,
                progress: Box::new(kube::Api::namespaced(client.clone(), &ks.namespace)),
                replica: ks.identity.clone(),
            };
            (ca, jwt, store)
        }
    };
    let (ca, jwt) = (Arc::new(ca), Arc::new(jwt));
    // The CA in force; during a rotation the driver below changes it.
    let authority = Authority::new(View::stable(ca.clone()));
    tracing::info!(kid = jwt.kid(), ttl = ?jwt.ttl(), "JWT-SVID signing key loaded");
    let ca_expiry = ca
        .not_after()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    metrics.ca_expiry.set(ca_expiry);

    let modules = Arc::new(crate::wasm::ModuleStore::default());
    if let Some((client, _, _)) = &kube {
        modules.set_pull_secrets(Arc::new(k8s::pull_secrets::KubePullSecrets {
            client: client.clone(),
            rt: tokio::runtime::Handle::current(),
        }));
    }
    let model = Model::new(
        ModelConfig {
            trust_domain: s.trust_domain.clone(),
            root_namespace: s.root_namespace.clone(),
            trust_bundle_pem: ca.bundle_pem().to_string(),
            jwt_jwks: jwt.jwks(),
            default_identity_fallback: s.default_identity_fallback,
        },
        modules.clone(),
    );
    // RequestAuthentications' `jwksUri` key sets: fetched here, never by nodes.
    model.set_jwks_source(Arc::new(crate::jwks::JwksStore::default()));
    let sessions = Arc::new(Sessions::default());
    // Set once the source's first complete snapshot is in the model: until then no node
    // is sent anything and no certificate is signed (fail static).
    let (ready_tx, ready) = tokio::sync::watch::channel(false);
    let rotation = Rotation::new(
        ca_store,
        authority.clone(),
        model.clone(),
        sessions.clone(),
        metrics.clone(),
        match &kube {
            Some((_, leader, _)) => leader.clone(),
            None => tokio::sync::watch::channel(true).1,
        },
        ready.clone(),
        s.trust_domain.clone(),
        s.svid_ttl,
        s.ca_rotation_min_phase,
    );
    // A control plane restarted during a rotation signs with the CA of its phase
    // before it serves anyone.
    rotation.start().await;
    tokio::spawn(rotation.clone().run());

    // Node authentication: revocable client certificates (standalone), or reviewed
    // ServiceAccount tokens whose cache follows the pods they are bound to.
    let revocations = match &kube {
        None => {
            let r = Revocations::load(s.state_dir.join(revocation::FILE_NAME), metrics.clone())
                .context("loading the revoked node credentials")?;
            tokio::spawn(r.clone().reload_forever());
            Some(r)
        }
        Some(_) => None,
    };
    let token_review = kube.as_ref().map(|(client, _, ks)| {
        Arc::new(k8s::token_review::TokenReviewAuthenticator::new(
            client.clone(),
            &ks.token_audience,
            &ks.namespace,
            &ks.node_service_account,
        ))
    });

    // Config source -> model.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<SourceEvent>(64);
    let source: Box<dyn ConfigSource> = match (&s.source, &kube) {
        (_, Some((client, leader, ks))) => {
            tokio::spawn(k8s::status::run(
                client.clone(),
                model.clone(),
                leader.clone(),
            ));
            tokio::spawn(k8s::route_status::run(
                client.clone(),
                model.clone(),
                leader.clone(),
            ));
            tokio::spawn(k8s::trust_bundle::run(
                client.clone(),
                model.clone(),
                ks.namespace.clone(),
                authority.clone(),
                leader.clone(),
            ));
            Box::new(k8s::source::KubeSource::new(
                client.clone(),
                metrics.clone(),
            ))
        }
        (SourceSettings::Directory(dir), None) => Box::new(DirectorySource::new(dir)),
        (SourceSettings::Kubernetes(_), None) => anyhow::bail!("Kubernetes mode without a client"),
    };
    let source_name = source.name();
    let source_task = tokio::spawn(async move { source.run(tx).await });
    {
        let model = model.clone();
        let token_review = token_review.clone();
        let ready_tx = Arc::new(ready_tx);
        tokio::spawn(async move {
            let mut first_snapshot = false;
            while let Some(ev) = rx.recv().await {
                if let Some(t) = &token_review {
                    t.observe(&ev);
                }
                let snapshot = matches!(ev, SourceEvent::Snapshot(_));
                let m = model.clone();
                // Recomputing a namespace is CPU work: keep it off the I/O threads.
                let _ = tokio::task::spawn_blocking(move || m.apply(ev)).await;
                // Only after the snapshot is applied: a stream that sees `true` diffs
                // against the complete model.
                if snapshot && !first_snapshot {
                    first_snapshot = true;
                    let (model, ready_tx) = (model.clone(), ready_tx.clone());
                    tokio::spawn(async move {
                        // Plugins' modules are read in the background: give the first
                        // reads a bounded time, so that nodes that run a plugin are not
                        // sent "being fetched" (and its failStrategy) for it.
                        let deadline = tokio::time::Instant::now() + FIRST_MODULE_READS;
                        while model.modules_pending() > 0 && tokio::time::Instant::now() < deadline
                        {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        tracing::info!(
                            modules_pending = model.modules_pending(),
                            "first complete configuration loaded; serving nodes"
                        );
                        ready_tx.send_replace(true);
                    });
                }
            }
        });
    }

    // gRPC over TLS.
    let mut ips: Vec<IpAddr> = vec!["127.0.0.1".parse()?, "::1".parse()?];
    if !s.grpc_addr.ip().is_unspecified() && !ips.contains(&s.grpc_addr.ip()) {
        ips.push(s.grpc_addr.ip());
    }
    let serving = tls::ServingCert::issue(&authority.signer(), &s.server_names, &ips)?;
    let acceptor = tls::Acceptor::new(&authority.bundle_pem(), serving)?;
    tokio::spawn(
        acceptor
            .clone()
            .follow(authority.clone(), s.server_names.clone(), ips),
    );
    let listener = tokio::net::TcpListener::bind(s.grpc_addr)
        .await
        .with_context(|| format!("binding the gRPC address {}", s.grpc_addr))?;
    let grpc_addr = listener.local_addr()?;
    let inner: Arc<dyn NodeAuthenticator> = match (&token_review, &revocations) {
        (Some(t), _) => t.clone(),
        (None, Some(r)) => Arc::new(CertNodeAuthenticator {
            trust_domain: s.trust_domain.clone(),
            revocations: r.clone(),
        }),
        (None, None) => anyhow::bail!("no node authenticator for this mode"),
    };
    let auth: Arc<dyn NodeAuthenticator> = Arc::new(crate::server::auth::Metered {
        inner,
        metrics: metrics.clone(),
    });
    let distribution = Distribution {
        initial_syncs: Arc::new(tokio::sync::Semaphore::new(
            crate::server::distribution::CONCURRENT_INITIAL_SYNCS,
        )),
        model: model.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        sessions: sessions.clone(),
        ready: ready.clone(),
    };
    let modules = crate::server::modules::ModuleServer {
        model: model.clone(),
        modules,
        auth: auth.clone(),
    };
    let signer = Signer {
        ca: authority.clone(),
        jwt: jwt.clone(),
        model: model.clone(),
        auth: auth.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let renewer = crate::server::node_credentials::Renewer {
        ca: authority.clone(),
        auth,
        metrics: metrics.clone(),
        ttl: kube.is_none().then_some(s.node_credential_ttl),
    };

    // Admin HTTP.
    let admin_listener = tokio::net::TcpListener::bind(s.admin_addr)
        .await
        .with_context(|| format!("binding the admin address {}", s.admin_addr))?;
    let admin_addr = admin_listener.local_addr()?;
    let admin_router = admin::router(AdminState {
        model: model.clone(),
        metrics: metrics.clone(),
        sessions: sessions.clone(),
        ready,
        jwks: jwt.jwks().into(),
        rotation: Some(rotation),
    });

    tracing::info!(grpc = %grpc_addr, admin = %admin_addr, source = source_name, trust_domain = %s.trust_domain, "control plane started");
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|v| *v).await;
    };
    let grpc = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(20)))
        .add_service(
            NodeConfigServer::new(distribution)
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(CertificatesServer::new(signer))
        .add_service(NodeCredentialsServer::new(renewer))
        .add_service(
            ModulesServer::new(modules)
                .max_encoding_message_size(crate::wasm::MAX_MODULE_BYTES + 1024),
        )
        .serve_with_incoming_shutdown(
            tls::incoming(
                listener,
                acceptor,
                // Standalone: a node credential revoked, expired, or of a retired CA.
                revocations.map(|r| {
                    Arc::new(tls::AnyGuard(vec![
                        r as Arc<dyn tls::ConnectionGuard>,
                        Arc::new(tls::TrustGuard {
                            authority: authority.clone(),
                        }),
                    ])) as Arc<dyn tls::ConnectionGuard>
                }),
            ),
            stopped(stop_rx.clone()),
        );
    let admin = axum::serve(admin_listener, admin_router).with_graceful_shutdown(stopped(stop_rx));

    let fut = async move {
        let r = tokio::select! {
            r = grpc => r.context("gRPC server failed"),
            r = admin => r.context("admin server failed"),
            r = source_task => match r {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.context("config source failed")),
                Err(e) => Err(anyhow::anyhow!("config source panicked: {e}")),
            },
        };
        // Hand the leader Lease back before exiting, so another replica takes over
        // at once instead of after the lease expires.
        if let Some(t) = elector_task {
            let _ = tokio::time::timeout(Duration::from_secs(3), t).await;
        }
        r
    };
    Ok((
        Running {
            model,
            metrics,
            sessions,
            grpc_addr,
            admin_addr,
        },
        fut,
    ))
}
