//! Kubernetes source: one kube-runtime watcher per kind (Namespaces, Pods,
//! Services, ServiceAccounts, AuthorizationPolicies, WasmPlugins, and the Gateway
//! API's HTTPRoutes, GRPCRoutes and ReferenceGrants) feeding the same model as the directory source.
//!
//! The Gateway API kinds are optional: while the API server does not serve them
//! (their CRDs are not installed), they count as listed and empty, so the control
//! plane gets ready without them, and they are looked for again every
//! [`OPTIONAL_KIND_RETRY`].
//!
//! - The first complete list of every kind becomes one `Snapshot` (the control plane
//!   is ready only then); afterwards each watch event is a `Changes` batch.
//! - A watch that breaks (API server restart, network error) is retried with
//!   backoff; a re-list (e.g. after 410 Gone) is diffed against what that kind had,
//!   so objects deleted meanwhile are removed and nothing is lost or duplicated.
//! - Every kind is read as untyped objects and converted one by one: an object
//!   that does not convert is reported (named, with the field) and skipped instead
//!   of stalling the whole watch. An object that converted before and stops
//!   converting is not deleted: its last good version stays in force, reported stale
//!   (fail static); only a Kubernetes delete (or its absence from a re-list) deletes it.
//! - Endpoints are derived from Pods and Service selectors by the model, so API
//!   servers without `discovery.k8s.io/v1` (1.20) work.

use super::super::config::{
    ConfigSource, EventSender, ManifestError, Object, ObjectRef, SourceEvent,
};
use crate::metrics::{KindLabel, Metrics};
use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use kube::api::{ApiResource, DynamicObject};
use kube::runtime::watcher::{self, Event};
use kube::runtime::WatchStreamExt;
use kube::{Api, Client, Resource};
use std::collections::{BTreeMap, HashSet};
use std::pin::Pin;
use std::sync::Arc;
use tokio::sync::mpsc;
use weft_proto::crd::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WasmPlugin};
use weft_proto::gateway::{GrpcRoute, HttpRoute, ReferenceGrant};

pub struct KubeSource {
    client: Client,
    metrics: Arc<Metrics>,
}

impl KubeSource {
    pub fn new(client: Client, metrics: Arc<Metrics>) -> Self {
        Self { client, metrics }
    }
}

/// What one kind's watcher reports to the merger.
enum KindMsg {
    /// A complete list: (kind, objects, objects that vanished since the last list).
    Listed(&'static str, Vec<Object>, Vec<ObjectRef>),
    Changed(Vec<Object>, Vec<ObjectRef>),
    /// Conversion problems of this kind, replacing its earlier ones.
    Errors(&'static str, Vec<ManifestError>),
}

/// Conversion problems of one kind, by object.
type Problems = BTreeMap<ObjectRef, ManifestError>;
type Convert = fn(DynamicObject) -> Result<Object, ConvertError>;

/// Why an object did not convert: the field (a path such as `spec.rules[0].from`)
/// when known, and what was wrong with it.
#[derive(Debug, Clone, PartialEq)]
struct ConvertError {
    field: Option<String>,
    message: String,
}

type EventStream = Pin<Box<dyn Stream<Item = Result<Event<DynamicObject>, watcher::Error>> + Send>>;

/// A watcher of one kind as untyped objects, plus how to type them.
struct Kind {
    name: &'static str,
    stream: EventStream,
    convert: Convert,
}

fn typed<K>(o: DynamicObject, wrap: fn(K) -> Object) -> Result<Object, ConvertError>
where
    K: serde::de::DeserializeOwned,
{
    let value = serde_json::to_value(&o).map_err(|e| ConvertError {
        field: None,
        message: e.to_string(),
    })?;
    serde_path_to_error::deserialize::<_, K>(value)
        .map(wrap)
        .map_err(|e| ConvertError {
            field: Some(e.path().to_string()),
            message: e.inner().to_string(),
        })
}

/// The model's reference to a watched object (cluster-scoped kinds have no namespace),
/// the same as [`Object::object_ref`] gives once it is typed.
fn ref_of(kind: &'static str, o: &DynamicObject) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: if kind == "Namespace" {
            String::new()
        } else {
            o.metadata.namespace.clone().unwrap_or_default()
        },
        name: o.metadata.name.clone().unwrap_or_default(),
    }
}

fn kind<K>(client: &Client, name: &'static str, convert: Convert) -> Kind
where
    K: Resource<DynamicType = ()>,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let types = kube::api::TypeMeta {
        api_version: ar.api_version.clone(),
        kind: ar.kind.clone(),
    };
    let stream = watcher(api)
        .modify(move |o| {
            // Not needed by the model; a large share of every object's size.
            o.metadata.managed_fields = None;
            // List items carry no apiVersion/kind; the typed conversion wants them.
            o.types = Some(types.clone());
        })
        .boxed();
    Kind {
        name,
        stream,
        convert,
    }
}

/// How often a kind the API server does not serve (yet) is looked for again.
pub const OPTIONAL_KIND_RETRY: std::time::Duration = std::time::Duration::from_secs(30);

/// A kind whose CRD may not be installed: reported listed and empty until the API
/// server serves it, then watched as any other kind.
fn optional_kind<K>(client: &Client, name: &'static str, convert: Convert) -> Kind
where
    K: Resource<DynamicType = ()>,
{
    let ar = ApiResource::erase::<K>(&());
    let api: Api<DynamicObject> = Api::all_with(client.clone(), &ar);
    let Kind { stream, .. } = kind::<K>(client, name, convert);
    let (tx, rx) = futures::channel::mpsc::channel(16);
    tokio::spawn(async move {
        let mut tx = tx;
        let mut announced = false;
        loop {
            match api.list(&kube::api::ListParams::default().limit(1)).await {
                Ok(_) => break,
                // Not served (404), not readable (403), a failing conversion webhook:
                // the kind counts as empty, so the rest of the mesh is not held up.
                Err(e) => {
                    if !announced {
                        let served = !matches!(&e, kube::Error::Api(s) if s.code == 404);
                        if served {
                            tracing::warn!(kind = name, error = %e, "this kind cannot be listed: none are used until it can");
                        } else {
                            tracing::info!(kind = name, "the API server does not serve this kind (its CRD is not installed): none are used until it does");
                        }
                        announced = true;
                        for ev in [Ok(Event::Init), Ok(Event::InitDone)] {
                            if futures::SinkExt::send(&mut tx, ev).await.is_err() {
                                return;
                            }
                        }
                    }
                    tokio::time::sleep(OPTIONAL_KIND_RETRY).await;
                }
            }
        }
        let mut stream = stream;
        while let Some(ev) = stream.next().await {
            if futures::SinkExt::send(&mut tx, ev).await.is_err() {
                return;
            }
        }
    });
    Kind {
        name,
        stream: rx.boxed(),
        convert,
    }
}

fn watcher(
    api: Api<DynamicObject>,
) -> impl Stream<Item = Result<Event<DynamicObject>, watcher::Error>> {
    watcher::watcher(api, watcher::Config::default()).default_backoff()
}

impl KubeSource {
    fn kinds(&self) -> Vec<Kind> {
        let c = &self.client;
        vec![
            kind::<Namespace>(c, "Namespace", |o| typed(o, Object::Namespace)),
            kind::<Pod>(c, "Pod", |o| typed(o, |p: Pod| Object::Pod(Box::new(p)))),
            kind::<Service>(c, "Service", |o| typed(o, Object::Service)),
            kind::<ServiceAccount>(c, "ServiceAccount", |o| typed(o, Object::ServiceAccount)),
            kind::<AuthorizationPolicy>(c, "AuthorizationPolicy", |o| {
                typed(o, Object::AuthorizationPolicy)
            }),
            kind::<WasmPlugin>(c, "WasmPlugin", |o| typed(o, Object::WasmPlugin)),
            // Optional: `helm upgrade` from a chart without them does not install new
            // CRDs; until one is served, none of its kind can exist.
            optional_kind::<PeerAuthentication>(c, "PeerAuthentication", |o| {
                typed(o, Object::PeerAuthentication)
            }),
            optional_kind::<RequestAuthentication>(c, "RequestAuthentication", |o| {
                typed(o, Object::RequestAuthentication)
            }),
            optional_kind::<HttpRoute>(c, "HTTPRoute", |o| {
                typed(o, |r: HttpRoute| Object::HttpRoute(Box::new(r)))
            }),
            optional_kind::<GrpcRoute>(c, "GRPCRoute", |o| {
                typed(o, |r: GrpcRoute| Object::GrpcRoute(Box::new(r)))
            }),
            optional_kind::<ReferenceGrant>(c, "ReferenceGrant", |o| {
                typed(o, |g: ReferenceGrant| Object::ReferenceGrant(Box::new(g)))
            }),
        ]
    }
}

/// Drives one kind's watcher: tracks which objects it holds so a re-list can
/// report deletions, and reports conversion errors.
async fn run_kind(k: Kind, tx: mpsc::Sender<KindMsg>, metrics: Arc<Metrics>) {
    let Kind {
        name,
        mut stream,
        convert,
    } = k;
    let mut known: HashSet<ObjectRef> = HashSet::new();
    let mut errors: Problems = BTreeMap::new();
    let mut listing: Option<(Vec<Object>, Problems)> = None;
    let error_of = |r: &ObjectRef, generation: Option<i64>, e: ConvertError| ManifestError {
        file: "kubernetes".into(),
        document: 0,
        object: Some(r.to_string()),
        object_ref: Some(r.clone()),
        generation,
        field: e.field,
        message: e.message,
    };
    while let Some(ev) = stream.next().await {
        // Set when this event changes the kind's conversion problems.
        let errors_changed;
        let msg = match ev {
            Err(e) => {
                metrics
                    .watch_errors
                    .get_or_create(&KindLabel { kind: name.into() })
                    .inc();
                tracing::warn!(kind = name, error = %e, "watch failed; retrying with backoff");
                continue;
            }
            Ok(Event::Init) => {
                listing = Some((Vec::new(), BTreeMap::new()));
                continue;
            }
            Ok(Event::InitApply(o)) => {
                if let Some((objs, errs)) = listing.as_mut() {
                    let r = ref_of(name, &o);
                    let generation = o.metadata.generation;
                    match convert(o) {
                        Ok(obj) => objs.push(obj),
                        Err(m) => {
                            errs.insert(r.clone(), error_of(&r, generation, m));
                        }
                    }
                }
                continue;
            }
            Ok(Event::InitDone) => {
                let (objs, errs) = listing.take().unwrap_or_default();
                // Listed but not converting: present, so not gone (fail static).
                let now: HashSet<ObjectRef> = objs
                    .iter()
                    .map(Object::object_ref)
                    .chain(errs.keys().cloned())
                    .collect();
                let gone: Vec<ObjectRef> = known.difference(&now).cloned().collect();
                known = now;
                errors_changed = errs != errors;
                errors = errs;
                Some(KindMsg::Listed(name, objs, gone))
            }
            Ok(Event::Apply(o)) => {
                let r = ref_of(name, &o);
                let generation = o.metadata.generation;
                known.insert(r.clone());
                match convert(o) {
                    Ok(obj) => {
                        errors_changed = errors.remove(&r).is_some();
                        Some(KindMsg::Changed(vec![obj], Vec::new()))
                    }
                    Err(m) => {
                        tracing::warn!(object = %r, field = ?m.field, error = %m.message, "object does not convert; a last good version, if any, stays in force");
                        let e = error_of(&r, generation, m);
                        errors_changed = errors.get(&r) != Some(&e);
                        errors.insert(r, e);
                        // Not withdrawn: the model keeps the last good version and
                        // reports it stale until the object is fixed or deleted.
                        None
                    }
                }
            }
            Ok(Event::Delete(o)) => {
                let r = ref_of(name, &o);
                errors_changed = errors.remove(&r).is_some();
                known.remove(&r);
                Some(KindMsg::Changed(Vec::new(), vec![r]))
            }
        };
        if errors_changed
            && tx
                .send(KindMsg::Errors(name, errors.values().cloned().collect()))
                .await
                .is_err()
        {
            return;
        }
        if let Some(msg) = msg {
            if tx.send(msg).await.is_err() {
                return;
            }
        }
    }
}

#[async_trait::async_trait]
impl ConfigSource for KubeSource {
    fn name(&self) -> &'static str {
        "kubernetes"
    }

    async fn run(self: Box<Self>, tx: EventSender) -> anyhow::Result<()> {
        let kinds = self.kinds();
        let total = kinds.len();
        let (ktx, mut krx) = mpsc::channel::<KindMsg>(256);
        let mut tasks = Vec::new();
        for k in kinds {
            tasks.push(tokio::spawn(run_kind(k, ktx.clone(), self.metrics.clone())));
        }
        drop(ktx);
        let mut listed: HashSet<&'static str> = HashSet::new();
        let mut initial: Vec<Object> = Vec::new();
        let mut held: Vec<SourceEvent> = Vec::new();
        let mut errors: BTreeMap<&'static str, Vec<ManifestError>> = BTreeMap::new();
        let mut synced = false;
        while let Some(msg) = krx.recv().await {
            let ev = match msg {
                KindMsg::Errors(kind, e) => {
                    errors.insert(kind, e);
                    let all: Vec<ManifestError> = errors.values().flatten().cloned().collect();
                    self.metrics.source_errors.set(all.len() as i64);
                    SourceEvent::Errors(all)
                }
                // Before the snapshot, deletions need no reporting: the snapshot replaces all.
                KindMsg::Listed(kind, objs, _) if !synced => {
                    if listed.insert(kind) {
                        initial.extend(objs);
                    } else {
                        // Re-listed before the others finished: replace its share.
                        initial.retain(|o| o.object_ref().kind != kind);
                        initial.extend(objs);
                    }
                    if listed.len() < total {
                        continue;
                    }
                    synced = true;
                    tracing::info!(
                        objects = initial.len(),
                        "initial list of every kind complete"
                    );
                    tx.send(SourceEvent::Snapshot(std::mem::take(&mut initial)))
                        .await?;
                    for ev in held.drain(..) {
                        tx.send(ev).await?;
                    }
                    continue;
                }
                KindMsg::Listed(_, objs, gone) => SourceEvent::Changes {
                    apply: objs,
                    delete: gone,
                },
                KindMsg::Changed(apply, delete) => SourceEvent::Changes { apply, delete },
            };
            if synced || matches!(ev, SourceEvent::Errors(_)) {
                tx.send(ev).await?;
            } else {
                held.push(ev);
            }
        }
        for t in tasks {
            t.abort();
        }
        anyhow::bail!("every Kubernetes watcher ended")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, action: serde_json::Value) -> DynamicObject {
        let ar = ApiResource::erase::<AuthorizationPolicy>(&());
        let mut o = DynamicObject::new(name, &ar).within("shop");
        o.data = json!({ "spec": { "action": action } });
        o
    }

    fn convert(o: DynamicObject) -> Result<Object, ConvertError> {
        typed(o, Object::AuthorizationPolicy)
    }

    fn names(objs: &[Object]) -> Vec<String> {
        objs.iter().map(|o| o.object_ref().to_string()).collect()
    }

    /// (object, field) of each reported problem.
    fn problems(errs: &[ManifestError]) -> Vec<(String, String)> {
        errs.iter()
            .map(|e| {
                (
                    e.object.clone().unwrap_or_default(),
                    e.field.clone().unwrap_or_default(),
                )
            })
            .collect()
    }

    #[tokio::test]
    async fn objects_that_do_not_convert_are_reported_by_name_and_field_and_skipped() {
        let events = vec![
            Ok(Event::Init),
            Ok(Event::InitApply(policy("good", json!("ALLOW")))),
            Ok(Event::InitApply(policy("bad", json!(42)))),
            Ok(Event::InitDone),
            // The good one breaks: its last good version is kept (no deletion).
            Ok(Event::Apply(policy("good", json!(["DENY"])))),
            // The bad one is fixed.
            Ok(Event::Apply(policy("bad", json!("DENY")))),
        ];
        let k = Kind {
            name: "AuthorizationPolicy",
            stream: futures::stream::iter(events).boxed(),
            convert,
        };
        let (tx, mut rx) = mpsc::channel(16);
        run_kind(k, tx, Arc::new(Metrics::new())).await;
        let mut msgs = Vec::new();
        while let Ok(m) = rx.try_recv() {
            msgs.push(m);
        }
        assert_eq!(
            msgs.len(),
            5,
            "the listing and the fix with problems and objects, the breakage with problems only"
        );
        let bad = "AuthorizationPolicy shop/bad".to_string();
        let good = "AuthorizationPolicy shop/good".to_string();
        match &msgs[0] {
            KindMsg::Errors("AuthorizationPolicy", e) => {
                assert_eq!(problems(e), vec![(bad.clone(), "spec.action".into())]);
                assert!(
                    e[0].message.contains("invalid type: integer `42`"),
                    "{}",
                    e[0]
                );
                assert_eq!(
                    e[0].to_string(),
                    format!(
                        "kubernetes document 0 ({bad}) field spec.action: {}",
                        e[0].message
                    )
                );
            }
            _ => panic!("first: the listing's problems"),
        }
        match &msgs[1] {
            KindMsg::Listed("AuthorizationPolicy", objs, gone) => {
                assert_eq!(names(objs), vec![good.clone()]);
                assert!(gone.is_empty());
            }
            _ => panic!("second: the listing without the bad object"),
        }
        match &msgs[2] {
            KindMsg::Errors(_, e) => {
                assert_eq!(
                    problems(e),
                    vec![
                        (bad.clone(), "spec.action".into()),
                        (good.clone(), "spec.action".into())
                    ]
                );
                // Named precisely, so the model can keep the last good version.
                assert_eq!(
                    e[1].object_ref.as_ref().map(ToString::to_string),
                    Some(good.clone())
                );
            }
            _ => panic!("then: the broken update is reported, and nothing withdrawn"),
        }
        match (&msgs[3], &msgs[4]) {
            (KindMsg::Errors(_, e), KindMsg::Changed(up, removed)) => {
                assert_eq!(problems(e), vec![(good.clone(), "spec.action".into())]);
                assert_eq!(names(up), vec![bad.clone()]);
                assert!(removed.is_empty());
            }
            _ => panic!("last: the fixed object is applied and its problem cleared"),
        }
    }
}
