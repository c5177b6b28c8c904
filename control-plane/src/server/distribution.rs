//! `NodeConfig.Subscribe`: per-node incremental config streams (delta-xDS style).
//!
//! Nothing is sent before the control plane has its first complete snapshot (every
//! Kubernetes watch listed once, or the manifest directory read once): a node that
//! reconnects to a control plane still loading keeps its last good view (fail
//! static) instead of being told to delete what the new control plane has not loaded
//! yet.
//!
//! Each stream remembers what its node holds (key -> version). The first update is
//! the difference between the node's view and what the node said it already holds;
//! after that, every model change batch is narrowed to the keys visible to the node
//! whose version differs. ACKs and NACKs are recorded; a NACK is logged with the
//! node's reason and never blocks later updates.

use super::auth::{NodeAuthenticator, RequestAuth};
use super::sessions::{ReportedStatus, Sessions};
use crate::metrics::{Metrics, NodeLabel};
use std::collections::{HashMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status, Streaming};
use weft_model::Model;
use weft_proto::pb::{self, node_config_server::NodeConfig, subscribe_request::Kind as Req};

/// Updates larger than this are split, keeping messages well under gRPC limits.
pub const MAX_RESOURCES_PER_UPDATE: usize = 250;

/// How many nodes may receive their initial view at the same time. When every node
/// reconnects at once (a control plane restart), this bounds the memory spent on
/// in-flight updates; the others wait their turn (their config is already served
/// fail-static by the node itself).
pub const CONCURRENT_INITIAL_SYNCS: usize = 16;

pub struct Distribution {
    pub initial_syncs: Arc<tokio::sync::Semaphore>,
    pub model: Arc<Model>,
    pub auth: Arc<dyn NodeAuthenticator>,
    pub metrics: Arc<Metrics>,
    pub sessions: Arc<Sessions>,
    /// True once the model holds the source's first complete snapshot.
    pub ready: tokio::sync::watch::Receiver<bool>,
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<pb::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl NodeConfig for Distribution {
    type SubscribeStream = UpdateStream;

    async fn subscribe(
        &self,
        req: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let node = self.auth.authenticate(&RequestAuth::of(&req)).await?;
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await? {
            Some(pb::SubscribeRequest {
                kind: Some(Req::Hello(h)),
            }) => h,
            Some(_) => {
                return Err(Status::invalid_argument(
                    "the first message must be a Hello",
                ))
            }
            None => return Err(Status::invalid_argument("stream closed before Hello")),
        };
        if hello.node != node {
            tracing::warn!(credential_node = %node, requested_node = %hello.node, "node asked for another node's config");
            return Err(Status::permission_denied(format!(
                "this credential belongs to node {node:?}, not {:?}",
                hello.node
            )));
        }
        // A small buffer: each queued update holds up to MAX_RESOURCES_PER_UPDATE
        // cloned resources, and there may be thousands of nodes.
        let (tx, rx) = mpsc::channel(2);
        let stream = NodeStream {
            initial_syncs: self.initial_syncs.clone(),
            node,
            model: self.model.clone(),
            metrics: self.metrics.clone(),
            sessions: self.sessions.clone(),
            held: hello
                .known_versions
                .into_iter()
                .map(|(k, v)| (Arc::from(k), weft_proto::resource::version_number(&v)))
                .collect(),
            seq: 0,
            tx,
            ready: self.ready.clone(),
        };
        tokio::spawn(stream.run(inbound));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

struct NodeStream {
    initial_syncs: Arc<tokio::sync::Semaphore>,
    node: String,
    model: Arc<Model>,
    metrics: Arc<Metrics>,
    sessions: Arc<Sessions>,
    /// What the node holds (as far as we sent it): key -> version number. Keys are
    /// shared with the model, so a node's bookkeeping costs a pointer per resource.
    held: HashMap<Arc<str>, u64>,
    seq: u64,
    tx: mpsc::Sender<Result<pb::ConfigUpdate, Status>>,
    ready: tokio::sync::watch::Receiver<bool>,
}

impl NodeStream {
    async fn run(mut self, mut inbound: Streaming<pb::SubscribeRequest>) {
        self.sessions.connected(&self.node);
        // A series per node from the start: dashboards and alerts see 0, not nothing.
        let _ = self.metrics.nacks.get_or_create(&NodeLabel {
            node: self.node.clone(),
        });
        self.metrics
            .connected_nodes
            .set(self.sessions.count() as i64);
        tracing::info!(node = %self.node, known = self.held.len(), "node subscribed");
        if !self.wait_ready().await {
            self.sessions.disconnected(&self.node);
            self.metrics
                .connected_nodes
                .set(self.sessions.count() as i64);
            tracing::info!(node = %self.node, "node left before the configuration was loaded");
            return;
        }
        let permit = self.initial_syncs.clone().acquire_owned().await;
        // Subscribe before the first diff so no change falls in between.
        let mut changes = self.model.subscribe();
        let (ups, rms) = self.full_diff();
        let sent = self.send(ups, rms, true).await;
        drop(permit);
        if sent {
            self.serve(&mut changes, &mut inbound).await;
        }
        self.sessions.disconnected(&self.node);
        self.metrics
            .connected_nodes
            .set(self.sessions.count() as i64);
        tracing::info!(node = %self.node, "node stream closed");
    }

    /// Waits until the model holds a complete snapshot; false when the node went away
    /// (or the control plane is stopping) meanwhile.
    async fn wait_ready(&mut self) -> bool {
        if *self.ready.borrow() {
            return true;
        }
        tracing::info!(node = %self.node, "configuration not loaded yet: the node keeps its current view until it is");
        let tx = self.tx.clone();
        tokio::select! {
            r = self.ready.wait_for(|r| *r) => r.is_ok(),
            _ = tx.closed() => false,
        }
    }

    async fn serve(
        &mut self,
        changes: &mut broadcast::Receiver<Arc<weft_model::ChangeBatch>>,
        inbound: &mut Streaming<pb::SubscribeRequest>,
    ) {
        loop {
            tokio::select! {
                batch = changes.recv() => {
                    let (ups, rms, oldest) = match batch {
                        Ok(b) => {
                            let oldest = b.at;
                            let mut keys: HashSet<Arc<str>> = b.keys.iter().cloned().collect();
                            let mut lagged = false;
                            loop {
                                match changes.try_recv() {
                                    Ok(more) => keys.extend(more.keys.iter().cloned()),
                                    Err(broadcast::error::TryRecvError::Lagged(_)) => { lagged = true; break }
                                    Err(_) => break,
                                }
                            }
                            let (u, r) = if lagged { self.full_diff() } else { self.diff_keys(keys) };
                            (u, r, Some(oldest))
                        }
                        Err(broadcast::error::RecvError::Lagged(n)) => {
                            tracing::warn!(node = %self.node, skipped = n, "stream fell behind; re-diffing the whole view");
                            let (u, r) = self.full_diff();
                            (u, r, None)
                        }
                        Err(broadcast::error::RecvError::Closed) => return,
                    };
                    if ups.is_empty() && rms.is_empty() {
                        continue;
                    }
                    if let Some(at) = oldest {
                        self.metrics.push_latency.observe(at.elapsed().as_secs_f64());
                    }
                    if !self.send(ups, rms, false).await {
                        return;
                    }
                }
                msg = inbound.message() => match msg {
                    Ok(Some(pb::SubscribeRequest { kind: Some(Req::Ack(a)) })) => {
                        self.sessions.acked(&self.node, a.nonce.parse().unwrap_or(0));
                    }
                    Ok(Some(pb::SubscribeRequest { kind: Some(Req::Nack(n)) })) => {
                        tracing::warn!(node = %self.node, nonce = %n.nonce, reason = %n.reason, rejected = ?n.rejected_keys, "node rejected an update (NACK)");
                        let _ = self.metrics.nacks.get_or_create(&NodeLabel { node: self.node.clone() }).inc();
                        self.sessions.nacked(&self.node, &n.reason);
                        // The node keeps its previous versions: forget what we sent, so a
                        // later (fixed) version of these resources is sent again.
                        for k in n.rejected_keys {
                            self.held.remove(k.as_str());
                        }
                    }
                    Ok(Some(pb::SubscribeRequest { kind: Some(Req::Status(st)) })) => {
                        tracing::debug!(node = %self.node, bundle = %st.trust_bundle_sha256, certs = st.certs, stale = st.stale_certs, "node status");
                        self.sessions.reported(&self.node, ReportedStatus {
                            trust_bundle_sha256: st.trust_bundle_sha256.chars().take(64).collect(),
                            signer_sha256: st.signer_sha256.chars().take(64).collect(),
                            certs: st.certs,
                            stale_certs: st.stale_certs,
                        });
                    }
                    Ok(Some(_)) => {
                        tracing::warn!(node = %self.node, "unexpected message on config stream; ignored");
                    }
                    Ok(None) => return,
                    Err(e) => {
                        tracing::info!(node = %self.node, error = %e, "config stream ended");
                        return;
                    }
                },
            }
        }
    }

    /// Differences between the node's whole view and what it holds.
    fn full_diff(&mut self) -> (Vec<Arc<pb::Resource>>, Vec<Arc<str>>) {
        let st = self.model.read_state();
        let mut ups = Vec::new();
        let mut visible: HashSet<&Arc<str>> = HashSet::new();
        for (k, e) in &st.entries {
            if !e.visible_to(&self.node) {
                continue;
            }
            visible.insert(k);
            if self.held.get(k) != Some(&e.version) {
                ups.push((k.clone(), e.version, e.resource.clone()));
            }
        }
        let rms: Vec<Arc<str>> = self
            .held
            .keys()
            .filter(|k| !visible.contains(k))
            .cloned()
            .collect();
        drop(st);
        self.record(ups, rms)
    }

    /// Differences restricted to `keys`.
    fn diff_keys(&mut self, keys: HashSet<Arc<str>>) -> (Vec<Arc<pb::Resource>>, Vec<Arc<str>>) {
        let st = self.model.read_state();
        let mut ups = Vec::new();
        let mut rms = Vec::new();
        for k in keys {
            match st.entries.get(&k).filter(|e| e.visible_to(&self.node)) {
                Some(e) => {
                    if self.held.get(&k) != Some(&e.version) {
                        ups.push((k, e.version, e.resource.clone()));
                    }
                }
                None => {
                    if self.held.contains_key(&k) {
                        rms.push(k);
                    }
                }
            }
        }
        drop(st);
        self.record(ups, rms)
    }

    fn record(
        &mut self,
        ups: Vec<(Arc<str>, u64, Arc<pb::Resource>)>,
        rms: Vec<Arc<str>>,
    ) -> (Vec<Arc<pb::Resource>>, Vec<Arc<str>>) {
        for k in &rms {
            self.held.remove(k);
        }
        let ups = ups
            .into_iter()
            .map(|(k, v, r)| {
                self.held.insert(k, v);
                r
            })
            .collect();
        (ups, rms)
    }

    /// Sends (in chunks, cloning each chunk only when it is sent) and returns false
    /// when the node is gone.
    async fn send(
        &mut self,
        mut ups: Vec<Arc<pb::Resource>>,
        mut rms: Vec<Arc<str>>,
        initial: bool,
    ) -> bool {
        ups.sort_by(|a, b| a.key.cmp(&b.key));
        rms.sort();
        let total = ups.len() + rms.len();
        let (mut ups, mut rms) = (ups.into_iter().peekable(), rms.into_iter().peekable());
        loop {
            let chunk_u: Vec<pb::Resource> = ups
                .by_ref()
                .take(MAX_RESOURCES_PER_UPDATE)
                .map(|r| (*r).clone())
                .collect();
            let room = MAX_RESOURCES_PER_UPDATE - chunk_u.len();
            let chunk_r: Vec<String> = rms.by_ref().take(room).map(|k| k.to_string()).collect();
            let partial = ups.peek().is_some() || rms.peek().is_some();
            self.seq += 1;
            let update = pb::ConfigUpdate {
                nonce: self.seq.to_string(),
                sequence: self.seq,
                initial,
                upserts: chunk_u,
                removals: chunk_r,
                partial,
            };
            self.metrics.pushes.inc();
            if self.tx.send(Ok(update)).await.is_err() {
                return false;
            }
            if !partial {
                break;
            }
        }
        self.metrics.pushed_resources.inc_by(total as u64);
        self.sessions.sent(&self.node, self.seq, self.held.len());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio_stream::wrappers::TcpListenerStream;
    use weft_model::manifest::parse_manifests;
    use weft_model::{ModelConfig, SourceEvent};
    use weft_proto::pb::node_config_client::NodeConfigClient;
    use weft_proto::pb::node_config_server::NodeConfigServer;

    struct NodeA;

    #[tonic::async_trait]
    impl NodeAuthenticator for NodeA {
        async fn authenticate(&self, _: &RequestAuth) -> Result<String, Status> {
            Ok("node-a".into())
        }
    }

    const NAMESPACES: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
"#;

    const REST: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, uid: u1, labels: {app: web}}
spec: {nodeName: node-a, serviceAccountName: web, containers: [{name: c}]}
status: {podIP: 10.0.1.5}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: deny-legacy, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {namespaces: [legacy]}}]}]
"#;

    fn objects(text: &str) -> Vec<weft_model::manifest::Object> {
        let (o, e) = parse_manifests("t.yaml", text);
        assert!(e.is_empty(), "{e:?}");
        o
    }

    fn model() -> Arc<Model> {
        Model::new(
            ModelConfig {
                trust_domain: weft_proto::spiffe::TrustDomain::new("cluster.local").unwrap(),
                root_namespace: "weft-system".into(),
                trust_bundle_pem: "PEM".into(),
                jwt_jwks: String::new(),
                default_identity_fallback: false,
            },
            Arc::new(weft_model::modules::Offline),
        )
    }

    /// A node that held a complete view reconnects to a control plane whose source is
    /// slow to load: it is sent nothing (in particular no removal) until the first
    /// complete snapshot is in the model, then only the difference: nothing.
    #[tokio::test]
    async fn a_reconnecting_node_is_sent_nothing_before_the_first_complete_snapshot() {
        let previous = model();
        previous.apply(SourceEvent::Snapshot(objects(&format!(
            "{NAMESPACES}---{REST}"
        ))));
        let known: std::collections::BTreeMap<String, String> = previous
            .view_of("node-a")
            .iter()
            .map(|r| (r.key.clone(), r.version.clone()))
            .collect();
        assert!(
            known.contains_key("AuthorizationPolicy/shop/deny-legacy")
                && known.contains_key("Workload/shop/web-1"),
            "{known:?}"
        );

        // The restarted control plane: nothing loaded yet.
        let m = model();
        let (ready_tx, ready) = tokio::sync::watch::channel(false);
        let dist = Distribution {
            initial_syncs: Arc::new(tokio::sync::Semaphore::new(CONCURRENT_INITIAL_SYNCS)),
            model: m.clone(),
            auth: Arc::new(NodeA),
            metrics: Arc::new(Metrics::new()),
            sessions: Arc::new(Sessions::default()),
            ready,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(NodeConfigServer::new(dist))
                .serve_with_incoming(TcpListenerStream::new(listener)),
        );
        let mut client = NodeConfigClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let (tx, rx) = mpsc::channel(4);
        tx.send(pb::SubscribeRequest {
            kind: Some(Req::Hello(pb::Hello {
                node: "node-a".into(),
                known_versions: known,
            })),
        })
        .await
        .unwrap();
        let mut updates = client
            .subscribe(ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        async fn quiet(updates: &mut Streaming<pb::ConfigUpdate>, what: &str) {
            if let Ok(got) =
                tokio::time::timeout(Duration::from_millis(500), updates.message()).await
            {
                panic!("{what}: the node was sent {got:?}");
            }
        }
        quiet(&mut updates, "before any configuration").await;
        // Part of the configuration (one kind listed, the others not yet): still nothing.
        m.apply(SourceEvent::Changes {
            apply: objects(NAMESPACES),
            delete: vec![],
        });
        quiet(&mut updates, "with a partial configuration").await;

        // The first complete snapshot: the node already holds all of it.
        m.apply(SourceEvent::Snapshot(objects(&format!(
            "{NAMESPACES}---{REST}"
        ))));
        ready_tx.send_replace(true);
        let first = tokio::time::timeout(Duration::from_secs(5), updates.message())
            .await
            .expect("sent once loaded")
            .unwrap()
            .unwrap();
        assert!(first.initial && !first.partial);
        assert_eq!(first.removals, Vec::<String>::new(), "nothing deleted");
        assert_eq!(first.upserts, Vec::<pb::Resource>::new(), "nothing changed");
        server.abort();
    }
}
