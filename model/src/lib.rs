//! The mesh model: the one owner of the configuration objects (Kubernetes objects or
//! manifests, [`manifest`]) and of the resources derived from them for the nodes.
//! Sources feed it [`SourceEvent`]s; it recomputes the resources of every
//! namespace an event touched, and announces the changed keys in a [`ChangeBatch`]
//! that distribution streams turn into per-node deltas.
//!
//! No I/O: the control plane feeds it from Kubernetes or a watched directory, and
//! weftctl from files it reads ([`directory`]); plugin modules come through a
//! [`modules::ModuleSource`] the caller provides.

#![forbid(unsafe_code)]

pub mod convert;
pub mod directory;
pub mod enrollment;
pub mod jwks;
pub mod l7;
pub mod manifest;
pub mod modules;
pub mod routes;

use k8s_openapi::api::core::v1::{Namespace, Service, ServiceAccount};
use manifest::{ManifestError, Object, ObjectRef};
use modules::{ModuleSource, Resolved};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::broadcast;
use weft_proto::crd::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WasmPlugin};
use weft_proto::gateway::{GrpcRoute, HttpRoute, ReferenceGrant};
use weft_proto::pb::{self, resource::Kind};
use weft_proto::resource::{
    self as res, KIND_AUTHZ, KIND_GRPC_ROUTE, KIND_HTTP_ROUTE, KIND_PEER_AUTHN, KIND_REQUEST_AUTHN,
    KIND_SERVICE, KIND_TRUST_BUNDLE, KIND_WASM, KIND_WORKLOAD,
};
use weft_proto::spiffe::TrustDomain;
use weft_proto::validate::{self, Report};

/// A change reported by a source.
#[derive(Debug, Clone)]
pub enum SourceEvent {
    /// The complete set of objects the source currently holds: anything not in it is
    /// deleted, except objects the source reports (in its current errors, by
    /// [`ManifestError::object_ref`]) as present but not parsing: those keep their
    /// last good version. Sources that cannot tell deltas apart use this.
    Snapshot(Vec<Object>),
    /// Objects created or changed, and objects deleted, applied as one batch.
    Changes {
        apply: Vec<Object>,
        delete: Vec<ObjectRef>,
    },
    /// The source's current problems (bad manifests), replacing earlier ones. A problem
    /// naming an object the model holds ([`ManifestError::object_ref`]) makes that
    /// object stale: its last good version stays in force. A source never deletes an
    /// object because it stopped parsing, only because it is gone.
    Errors(Vec<ManifestError>),
}

#[derive(Debug, Clone)]
pub struct ModelConfig {
    pub trust_domain: TrustDomain,
    /// Policies in this namespace apply mesh-wide.
    pub root_namespace: String,
    pub trust_bundle_pem: String,
    /// JWKS (JSON) of the JWT-SVID signing keys, published in the TrustBundle.
    pub jwt_jwks: String,
    /// Give pods that name no ServiceAccount, and mirror (static) pods, the identity of
    /// their namespace's `default` ServiceAccount, as weft did before. Off: such pods
    /// are not enrolled and get no identity ([`convert::identity_refusal`]).
    pub default_identity_fallback: bool,
}

/// Which nodes receive a resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Visibility {
    All,
    Nodes(Arc<BTreeSet<String>>),
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub resource: Arc<pb::Resource>,
    /// `resource.version` as a number, for cheap comparisons.
    pub version: u64,
    pub visibility: Visibility,
}

impl Entry {
    fn new(resource: pb::Resource, visibility: Visibility) -> Self {
        Self {
            version: res::version_number(&resource.version),
            resource: Arc::new(resource),
            visibility,
        }
    }
}

impl Entry {
    pub fn visible_to(&self, node: &str) -> bool {
        match &self.visibility {
            Visibility::All => true,
            Visibility::Nodes(n) => n.contains(node),
        }
    }
}

/// Keys whose resource (or visibility) changed in one model update.
#[derive(Debug)]
pub struct ChangeBatch {
    pub seq: u64,
    pub keys: Vec<Arc<str>>,
    pub at: Instant,
}

#[derive(Debug, Default)]
pub struct State {
    /// Keys are shared (`Arc<str>`) with change batches and per-node stream state.
    pub entries: HashMap<Arc<str>, Entry>,
    pub seq: u64,
}

/// Validation outcome of a policy or plugin, for status reporting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectStatus {
    pub report: Report,
    /// Rules enforced per request at L7 (policies).
    pub l7_enforced: Vec<String>,
    /// `metadata.generation` of the object this was computed from.
    pub generation: Option<i64>,
    /// Set when the latest version did not parse or validate and this (the last good
    /// version) is still in force.
    pub stale: Option<Stale>,
}

/// Why the version of an object in force is not its latest one: the latest did not
/// parse or validate, so the last good version stays in force (fail static) until
/// the object is fixed or deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stale {
    /// `metadata.generation` of the rejected version, when known.
    pub generation: Option<i64>,
    /// What is wrong with the rejected version, by field.
    pub errors: Vec<validate::FieldError>,
}

impl Stale {
    fn of_manifest_error(e: &ManifestError) -> Self {
        let place = if e.file == "kubernetes" {
            String::new()
        } else {
            format!("{} document {}: ", e.file, e.document)
        };
        Self {
            generation: e.generation,
            errors: vec![validate::FieldError {
                field: e.field.clone().unwrap_or_default(),
                message: format!("{place}{}", e.message),
            }],
        }
    }
}

#[derive(Default)]
struct Inputs {
    namespaces: BTreeMap<String, Namespace>,
    pods: BTreeMap<(String, String), convert::PodFacts>,
    services: BTreeMap<(String, String), Service>,
    service_accounts: BTreeMap<(String, String), ServiceAccount>,
    policies: BTreeMap<(String, String), AuthorizationPolicy>,
    peer_authns: BTreeMap<(String, String), PeerAuthentication>,
    request_authns: BTreeMap<(String, String), RequestAuthentication>,
    plugins: BTreeMap<(String, String), WasmPlugin>,
    /// Gateway API routes naming a Service as a parent (others are not weft's).
    http_routes: BTreeMap<(String, String), HttpRoute>,
    grpc_routes: BTreeMap<(String, String), GrpcRoute>,
    /// ReferenceGrants: which routes of other namespaces may name a namespace's
    /// Services as backends.
    grants: BTreeMap<(String, String), ReferenceGrant>,
    /// Status of each route, per Service parent.
    route_statuses: BTreeMap<ObjectRef, routes::RouteStatus>,
    /// Keys derived from each namespace, to find removals.
    derived: HashMap<String, HashSet<Arc<str>>>,
    /// Enrolled workloads: key -> (node, namespace, labels, spiffe id).
    enrolled: HashMap<String, EnrolledWorkload>,
    /// (node, spiffe id) -> number of enrolled workloads with that identity there.
    node_identities: HashMap<(String, String), usize>,
    errors: Vec<ManifestError>,
    statuses: BTreeMap<ObjectRef, ObjectStatus>,
    /// Policies and plugins whose latest version did not validate while an earlier
    /// valid version is kept in force (in `policies` / `plugins`).
    invalid: BTreeMap<ObjectRef, Stale>,
    /// Pods refused an identity (and so not enrolled), with the reason.
    refused: BTreeMap<(String, String), &'static str>,
}

#[derive(Clone, PartialEq)]
struct EnrolledWorkload {
    node: String,
    namespace: String,
    labels: BTreeMap<String, String>,
    spiffe_id: String,
}

pub struct Model {
    cfg: ModelConfig,
    modules: Arc<dyn ModuleSource>,
    /// Key sets of RequestAuthentications' `jwksUri`s ([`Model::set_jwks_source`]).
    jwks: RwLock<Arc<dyn jwks::JwksSource>>,
    state: RwLock<State>,
    inputs: Mutex<Inputs>,
    tx: broadcast::Sender<Arc<ChangeBatch>>,
}

/// A plugin's `module_error` while its module is read in the background.
pub const MODULE_PENDING: &str = "the module is being fetched";

/// How many change batches a slow stream may fall behind before it re-diffs fully.
const CHANGE_BUFFER: usize = 4096;

impl Model {
    /// A model whose plugins' modules come from `modules`.
    pub fn new(cfg: ModelConfig, modules: Arc<dyn ModuleSource>) -> Arc<Self> {
        let (tx, _) = broadcast::channel(CHANGE_BUFFER);
        let model = Arc::new(Self {
            cfg,
            modules,
            jwks: RwLock::new(Arc::new(jwks::Offline)),
            state: RwLock::new(State::default()),
            inputs: Mutex::new(Inputs::default()),
            tx,
        });
        model.set_trust_bundle();
        // A background module fetch re-derives its namespace when it ends.
        let weak = Arc::downgrade(&model);
        model.modules.set_on_fetched(Box::new(move |ns| {
            if let Some(m) = weak.upgrade() {
                m.refresh(&ns);
            }
        }));
        model
    }

    /// Where `jwksUri` key sets come from (default: nowhere, [`jwks::Offline`]). A
    /// fetch that ends re-derives the namespaces that asked for it.
    pub fn set_jwks_source(self: &Arc<Self>, source: Arc<dyn jwks::JwksSource>) {
        let weak = Arc::downgrade(self);
        source.set_on_fetched(Box::new(move |ns| {
            if let Some(m) = weak.upgrade() {
                m.refresh(&ns);
            }
        }));
        *self.jwks.write().unwrap_or_else(|p| p.into_inner()) = source;
    }

    /// Re-derives one namespace's resources (e.g. after a module fetch).
    pub fn refresh(&self, ns: &str) {
        let mut inputs = self.inputs();
        let mut f = self.derive_workloads_and_services(&mut inputs, ns);
        self.derive_policies_and_plugins(&mut inputs, ns, &mut f);
        self.commit(&mut inputs, vec![(ns.to_string(), f)]);
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    fn set_trust_bundle(&self) {
        self.publish_trust_bundle(&self.cfg.trust_bundle_pem, "");
    }

    /// Replaces the trust bundle every node receives: the roots in force and the CA
    /// certificate that signs new certificates (a CA rotation changes both).
    pub fn publish_trust_bundle(&self, roots_pem: &str, signer_pem: &str) {
        let key: Arc<str> = res::key(KIND_TRUST_BUNDLE, "", self.cfg.trust_domain.as_str()).into();
        let r = res::make(
            key.to_string(),
            Kind::TrustBundle(pb::TrustBundle {
                trust_domain: self.cfg.trust_domain.to_string(),
                roots_pem: roots_pem.to_string(),
                jwt_jwks: self.cfg.jwt_jwks.clone(),
                signer_pem: signer_pem.to_string(),
            }),
        );
        let entry = Entry::new(r, Visibility::All);
        let mut st = self.write_state();
        if st
            .entries
            .get(&key)
            .is_some_and(|e| e.version == entry.version)
        {
            return;
        }
        st.entries.insert(key.clone(), entry);
        st.seq += 1;
        let batch = Arc::new(ChangeBatch {
            seq: st.seq,
            keys: vec![key],
            at: Instant::now(),
        });
        drop(st);
        let _ = self.tx.send(batch);
    }

    /// The trust bundle in force.
    pub fn trust_bundle(&self) -> Option<pb::TrustBundle> {
        let key = res::key(KIND_TRUST_BUNDLE, "", self.cfg.trust_domain.as_str());
        match self
            .read_state()
            .entries
            .get(key.as_str())?
            .resource
            .kind
            .as_ref()?
        {
            Kind::TrustBundle(b) => Some(b.clone()),
            _ => None,
        }
    }

    /// Subscribe before reading the state, so no change is missed.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<ChangeBatch>> {
        self.tx.subscribe()
    }

    /// Read access to the current resources.
    pub fn read_state(&self) -> std::sync::RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write_state(&self) -> std::sync::RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|p| p.into_inner())
    }

    fn inputs(&self) -> std::sync::MutexGuard<'_, Inputs> {
        self.inputs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May `node` obtain an SVID for `spiffe_id`? Only if an enrolled workload with
    /// that identity is scheduled there.
    pub fn node_runs_identity(&self, node: &str, spiffe_id: &str) -> bool {
        self.inputs()
            .node_identities
            .get(&(node.to_string(), spiffe_id.to_string()))
            .is_some_and(|n| *n > 0)
    }

    /// Nodes on which an enrolled workload with an identity is scheduled (they hold
    /// certificates: a CA rotation waits for each of them).
    pub fn nodes_with_identities(&self) -> BTreeSet<String> {
        self.inputs()
            .node_identities
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|((node, _), _)| node.clone())
            .collect()
    }

    /// Current manifest errors reported by the source.
    pub fn source_errors(&self) -> Vec<ManifestError> {
        self.inputs().errors.clone()
    }

    /// Namespaces labelled into the mesh.
    pub fn enrolled_namespaces(&self) -> Vec<String> {
        self.inputs()
            .namespaces
            .iter()
            .filter(|(_, n)| enrollment::namespace_enabled(Some(n)))
            .map(|(name, _)| name.clone())
            .collect()
    }

    /// Validation reports of policies and plugins (with `stale` set for those whose
    /// latest version did not parse or validate).
    pub fn statuses(&self) -> BTreeMap<ObjectRef, ObjectStatus> {
        let inputs = self.inputs();
        let stale = stale_of(&inputs);
        let mut out = inputs.statuses.clone();
        for (r, st) in out.iter_mut() {
            st.stale = stale.get(r).cloned();
        }
        out
    }

    /// Status of every mesh route (HTTPRoute, GRPCRoute), per Service parent, and
    /// whether the version in force is stale (its latest did not parse or validate).
    pub fn route_statuses(&self) -> BTreeMap<ObjectRef, (routes::RouteStatus, Option<Stale>)> {
        let inputs = self.inputs();
        let stale = stale_of(&inputs);
        inputs
            .route_statuses
            .iter()
            .map(|(r, st)| (r.clone(), (st.clone(), stale.get(r).cloned())))
            .collect()
    }

    /// Objects whose latest version did not parse or validate, and whose last good
    /// version is in force instead.
    pub fn stale(&self) -> BTreeMap<ObjectRef, Stale> {
        stale_of(&self.inputs())
    }

    /// Pods of enrolled namespaces that are not enrolled because they get no identity,
    /// with the reason (see [`convert::identity_refusal`]).
    pub fn refused_pods(&self) -> Vec<(String, &'static str)> {
        self.inputs()
            .refused
            .iter()
            .map(|((ns, name), why)| (format!("{ns}/{name}"), *why))
            .collect()
    }

    /// How many plugins' modules are still being read in the background.
    pub fn modules_pending(&self) -> usize {
        self.read_state()
            .entries
            .values()
            .filter(|e| {
                matches!(&e.resource.kind, Some(Kind::WasmPlugin(w)) if w.module_error == MODULE_PENDING)
            })
            .count()
    }

    /// Resources visible to `node`, sorted by key.
    pub fn view_of(&self, node: &str) -> Vec<Arc<pb::Resource>> {
        let st = self.read_state();
        let mut v: Vec<_> = st
            .entries
            .values()
            .filter(|e| e.visible_to(node))
            .map(|e| e.resource.clone())
            .collect();
        v.sort_by(|a, b| a.key.cmp(&b.key));
        v
    }

    /// Applies one source event and announces what changed.
    pub fn apply(&self, event: SourceEvent) {
        let mut inputs = self.inputs();
        let mut dirty: BTreeSet<String> = BTreeSet::new();
        let mut pods_changed = false;
        match event {
            SourceEvent::Errors(e) => {
                inputs.errors = e;
                return;
            }
            SourceEvent::Changes { apply, delete } => {
                for r in &delete {
                    remove(&mut inputs, r, &mut dirty, &mut pods_changed);
                }
                for o in apply {
                    upsert(&mut inputs, o, &mut dirty, &mut pods_changed);
                }
            }
            SourceEvent::Snapshot(objs) => {
                let mut wanted: HashSet<ObjectRef> = objs.iter().map(Object::object_ref).collect();
                // Present at the source but not parsing: keep the last good version.
                wanted.extend(inputs.errors.iter().filter_map(|e| e.object_ref.clone()));
                for r in all_refs(&inputs) {
                    if !wanted.contains(&r) {
                        remove(&mut inputs, &r, &mut dirty, &mut pods_changed);
                    }
                }
                for o in objs {
                    upsert(&mut inputs, o, &mut dirty, &mut pods_changed);
                }
            }
        }
        if dirty.is_empty() {
            return;
        }
        if pods_changed || dirty.contains(&self.cfg.root_namespace) {
            dirty.insert(self.cfg.root_namespace.clone());
        }
        // Workloads first: policy and plugin visibility depends on them.
        let mut fresh: Vec<(String, HashMap<Arc<str>, Entry>)> = Vec::new();
        for ns in &dirty {
            let f = self.derive_workloads_and_services(&mut inputs, ns);
            fresh.push((ns.clone(), f));
        }
        for (ns, f) in fresh.iter_mut() {
            self.derive_policies_and_plugins(&mut inputs, ns, f);
        }
        self.commit(&mut inputs, fresh);
    }

    fn commit(&self, inputs: &mut Inputs, fresh: Vec<(String, HashMap<Arc<str>, Entry>)>) {
        let mut changed = Vec::new();
        let mut st = self.write_state();
        for (ns, entries) in fresh {
            let old_keys = inputs.derived.remove(&ns).unwrap_or_default();
            for k in old_keys.iter().filter(|k| !entries.contains_key(*k)) {
                if st.entries.remove(k).is_some() {
                    changed.push(k.clone());
                }
            }
            let mut new_keys = HashSet::with_capacity(entries.len());
            for (k, e) in entries {
                match st.entries.get_key_value(&k) {
                    // Unchanged: keep the existing (shared) key and entry.
                    Some((old_k, old))
                        if old.version == e.version && old.visibility == e.visibility =>
                    {
                        new_keys.insert(old_k.clone());
                    }
                    _ => {
                        changed.push(k.clone());
                        new_keys.insert(k.clone());
                        st.entries.insert(k, e);
                    }
                }
            }
            if !new_keys.is_empty() {
                inputs.derived.insert(ns, new_keys);
            }
        }
        if changed.is_empty() {
            return;
        }
        st.seq += 1;
        let batch = Arc::new(ChangeBatch {
            seq: st.seq,
            keys: changed,
            at: Instant::now(),
        });
        drop(st);
        // No receivers is fine: nobody is connected yet.
        let _ = self.tx.send(batch);
    }

    fn derive_workloads_and_services(
        &self,
        inputs: &mut Inputs,
        ns: &str,
    ) -> HashMap<Arc<str>, Entry> {
        let mut out = HashMap::new();
        let namespace = inputs.namespaces.get(ns).cloned();
        let fallback = self.cfg.default_identity_fallback;
        let pods: Vec<(&convert::PodFacts, pb::Workload)> = range(&inputs.pods, ns)
            .map(|p| {
                (
                    p,
                    convert::workload(p, namespace.as_ref(), &self.cfg.trust_domain, fallback),
                )
            })
            .collect();
        // Pods that would be enrolled but get no identity: reported once each.
        let refused: Vec<((String, String), &'static str)> = range(&inputs.pods, ns)
            .filter(|p| convert::enrollable(p, namespace.as_ref()))
            .filter_map(|p| {
                convert::identity_refusal(p, fallback)
                    .map(|why| ((p.base.namespace.clone(), p.base.name.clone()), why))
            })
            .collect();
        let mut enrolled_now: HashMap<String, EnrolledWorkload> = HashMap::new();
        for (_, w) in &pods {
            let key = res::key(KIND_WORKLOAD, &w.namespace, &w.name);
            if w.enrolled && !w.node.is_empty() {
                enrolled_now.insert(
                    key.clone(),
                    EnrolledWorkload {
                        node: w.node.clone(),
                        namespace: w.namespace.clone(),
                        labels: w.labels.clone().into_iter().collect(),
                        spiffe_id: w.spiffe_id.clone(),
                    },
                );
            }
            out.insert(
                key.as_str().into(),
                Entry::new(res::make(key, Kind::Workload(w.clone())), Visibility::All),
            );
        }
        let pod_refs: Vec<(&convert::PodFacts, &pb::Workload)> =
            pods.iter().map(|(p, w)| (*p, w)).collect();
        for svc in range(&inputs.services, ns) {
            let s = convert::service(svc, &pod_refs);
            let key = res::key(KIND_SERVICE, &s.namespace, &s.name);
            out.insert(
                key.as_str().into(),
                Entry::new(res::make(key, Kind::Service(s)), Visibility::All),
            );
        }
        drop(pods);
        let mut was: BTreeMap<(String, String), &'static str> = BTreeMap::new();
        inputs.refused.retain(|k, v| {
            if k.0 == ns {
                was.insert(k.clone(), *v);
                false
            } else {
                true
            }
        });
        for (k, why) in refused {
            if was.get(&k) != Some(&why) {
                tracing::warn!(pod = %format!("{}/{}", k.0, k.1), reason = why, "pod not enrolled: it gets no mesh identity");
            }
            inputs.refused.insert(k, why);
        }
        // Update the enrollment indexes for this namespace.
        let stale: Vec<String> = inputs
            .enrolled
            .iter()
            .filter(|(_, w)| w.namespace == ns)
            .map(|(k, _)| k.clone())
            .collect();
        for k in stale {
            if let Some(w) = inputs.enrolled.remove(&k) {
                dec_identity(&mut inputs.node_identities, &w);
            }
        }
        for (k, w) in enrolled_now {
            *inputs
                .node_identities
                .entry((w.node.clone(), w.spiffe_id.clone()))
                .or_insert(0) += 1;
            inputs.enrolled.insert(k, w);
        }
        out
    }

    fn derive_policies_and_plugins(
        &self,
        inputs: &mut Inputs,
        ns: &str,
        out: &mut HashMap<Arc<str>, Entry>,
    ) {
        let mesh_wide = ns == self.cfg.root_namespace;
        let mut statuses = Vec::new();
        let policies: Vec<AuthorizationPolicy> = range(&inputs.policies, ns).cloned().collect();
        let services: Vec<&Service> = range(&inputs.services, ns).collect();
        for p in policies {
            let mut report = validate::validate_authorization_policy(&p.spec);
            let l7_enforced = l7::l7_status(&p.spec, &services, &mut report);
            let obj = Object::AuthorizationPolicy(p.clone()).object_ref();
            log_report(&obj, &report);
            if let Some(pp) = convert::authorization_policy(&p, &report, &self.cfg.root_namespace) {
                let selector: BTreeMap<String, String> = pp.selector.clone().into_iter().collect();
                let key = res::key(KIND_AUTHZ, &pp.namespace, &pp.name);
                out.insert(
                    key.as_str().into(),
                    Entry::new(
                        res::make(key.clone(), Kind::AuthorizationPolicy(pp)),
                        Visibility::Nodes(nodes_selected(inputs, ns, mesh_wide, &selector)),
                    ),
                );
            }
            statuses.push((
                obj,
                ObjectStatus {
                    report,
                    l7_enforced,
                    generation: p.metadata.generation,
                    stale: None,
                },
            ));
        }
        let peer_authns: Vec<PeerAuthentication> =
            range(&inputs.peer_authns, ns).cloned().collect();
        for p in peer_authns {
            let report = validate::validate_peer_authentication(&p.spec);
            let obj = Object::PeerAuthentication(p.clone()).object_ref();
            log_report(&obj, &report);
            let pa = convert::peer_authentication(&p, &report, &self.cfg.root_namespace);
            let selector: BTreeMap<String, String> = pa.selector.clone().into_iter().collect();
            let key = res::key(KIND_PEER_AUTHN, &pa.namespace, &pa.name);
            let wide = pa.mesh_wide;
            out.insert(
                key.as_str().into(),
                Entry::new(
                    res::make(key.clone(), Kind::PeerAuthentication(pa)),
                    Visibility::Nodes(nodes_selected(inputs, ns, wide, &selector)),
                ),
            );
            statuses.push((
                obj,
                ObjectStatus {
                    report,
                    l7_enforced: Vec::new(),
                    generation: p.metadata.generation,
                    stale: None,
                },
            ));
        }
        let request_authns: Vec<RequestAuthentication> =
            range(&inputs.request_authns, ns).cloned().collect();
        let jwks = self.jwks.read().unwrap_or_else(|p| p.into_inner()).clone();
        for p in request_authns {
            let mut report = validate::validate_request_authentication(&p.spec);
            let obj = Object::RequestAuthentication(p.clone()).object_ref();
            let ra =
                convert::request_authentication(&p, &mut report, &self.cfg.root_namespace, |uri| {
                    jwks.clone().resolve(ns, uri)
                });
            log_report(&obj, &report);
            let selector: BTreeMap<String, String> = ra.selector.clone().into_iter().collect();
            let key = res::key(KIND_REQUEST_AUTHN, &ra.namespace, &ra.name);
            let wide = ra.mesh_wide;
            out.insert(
                key.as_str().into(),
                Entry::new(
                    res::make(key.clone(), Kind::RequestAuthentication(ra)),
                    Visibility::Nodes(nodes_selected(inputs, ns, wide, &selector)),
                ),
            );
            statuses.push((
                obj,
                ObjectStatus {
                    report,
                    l7_enforced: Vec::new(),
                    generation: p.metadata.generation,
                    stale: None,
                },
            ));
        }
        let plugins: Vec<WasmPlugin> = range(&inputs.plugins, ns).cloned().collect();
        for p in plugins {
            let mut report = validate::validate_wasm_plugin(&p.spec);
            let obj = Object::WasmPlugin(p.clone()).object_ref();
            let mut wp = convert::wasm_plugin(&p);
            if report.is_valid() {
                match self.modules.clone().resolve(ns, &p.spec) {
                    Resolved::Ready { sha256 } => wp.sha256 = sha256,
                    Resolved::Pending => {
                        wp.module_error = MODULE_PENDING.into();
                    }
                    Resolved::Failed(m) => {
                        report.errors.push(validate::FieldError {
                            field: m.field.into(),
                            message: format!("{}: {}", m.reason, m.message),
                        });
                        wp.module_error = format!("{}: {}", m.reason, m.message);
                    }
                }
            } else {
                wp.module_error = report.summary();
            }
            log_report(&obj, &report);
            // Distributed even when not accepted: nodes apply its failStrategy to the
            // workloads it selects instead of silently running without it.
            {
                let selector: BTreeMap<String, String> = wp.selector.clone().into_iter().collect();
                let key = res::key(KIND_WASM, &wp.namespace, &wp.name);
                out.insert(
                    key.as_str().into(),
                    Entry::new(
                        res::make(key.clone(), Kind::WasmPlugin(wp)),
                        Visibility::Nodes(nodes_selected(inputs, ns, mesh_wide, &selector)),
                    ),
                );
            }
            statuses.push((
                obj,
                ObjectStatus {
                    report,
                    l7_enforced: Vec::new(),
                    generation: p.metadata.generation,
                    stale: None,
                },
            ));
        }
        inputs.statuses.retain(|r, _| {
            !(r.namespace == ns
                && matches!(
                    r.kind,
                    "AuthorizationPolicy"
                        | "PeerAuthentication"
                        | "RequestAuthentication"
                        | "WasmPlugin"
                ))
        });
        inputs.statuses.extend(statuses);
        self.derive_routes(inputs, ns, out);
    }

    /// A namespace's routes: resolved against every namespace's Services (a consumer
    /// route's parent, a backend), distributed to every node (any pod may be a
    /// client of the Services they name).
    fn derive_routes(&self, inputs: &mut Inputs, ns: &str, out: &mut HashMap<Arc<str>, Entry>) {
        let mut statuses = Vec::new();
        let http: Vec<HttpRoute> = range(&inputs.http_routes, ns).cloned().collect();
        let grpc: Vec<GrpcRoute> = range(&inputs.grpc_routes, ns).cloned().collect();
        let all = http
            .iter()
            .map(routes::AnyRoute::Http)
            .chain(grpc.iter().map(routes::AnyRoute::Grpc));
        for route in all {
            let obj = route.object_ref();
            let (converted, status) = routes::convert(route, &inputs.services, &inputs.grants);
            for p in &status.parents {
                if !p.accepted.status {
                    tracing::warn!(object = %obj, service = %format!("{}/{}", p.service_namespace, p.service_name), reason = p.accepted.reason, error = %p.accepted.message, "route not accepted");
                }
            }
            if let Some(r) = converted {
                let kind = match route {
                    routes::AnyRoute::Http(_) => KIND_HTTP_ROUTE,
                    routes::AnyRoute::Grpc(_) => KIND_GRPC_ROUTE,
                };
                let key = res::key(kind, &r.namespace, &r.name);
                out.insert(
                    key.as_str().into(),
                    Entry::new(res::make(key.clone(), Kind::Route(r)), Visibility::All),
                );
            }
            statuses.push((obj, status));
        }
        inputs.route_statuses.retain(|r, _| {
            !(r.namespace == ns && (r.kind == "HTTPRoute" || r.kind == "GRPCRoute"))
        });
        inputs.route_statuses.extend(statuses);
    }
}

fn log_report(obj: &ObjectRef, report: &Report) {
    for e in &report.errors {
        tracing::warn!(object = %obj, field = %e.field, error = %e.message, "resource not accepted");
    }
    for e in &report.unsupported {
        tracing::warn!(object = %obj, field = %e.field, error = %e.message, "field not enforced");
    }
}

fn nodes_selected(
    inputs: &Inputs,
    ns: &str,
    mesh_wide: bool,
    selector: &BTreeMap<String, String>,
) -> Arc<BTreeSet<String>> {
    Arc::new(
        inputs
            .enrolled
            .values()
            .filter(|w| {
                (mesh_wide || w.namespace == ns) && convert::selector_matches(selector, &w.labels)
            })
            .map(|w| w.node.clone())
            .collect(),
    )
}

fn dec_identity(map: &mut HashMap<(String, String), usize>, w: &EnrolledWorkload) {
    let k = (w.node.clone(), w.spiffe_id.clone());
    if let Some(n) = map.get_mut(&k) {
        *n -= 1;
        if *n == 0 {
            map.remove(&k);
        }
    }
}

fn range<'a, T>(
    m: &'a BTreeMap<(String, String), T>,
    ns: &'a str,
) -> impl Iterator<Item = &'a T> + 'a {
    m.range((ns.to_string(), String::new())..)
        .take_while(move |((n, _), _)| n == ns)
        .map(|(_, v)| v)
}

fn nn(r: &ObjectRef) -> (String, String) {
    (r.namespace.clone(), r.name.clone())
}

fn all_refs(i: &Inputs) -> Vec<ObjectRef> {
    let mk = |kind: &'static str, (ns, name): &(String, String)| ObjectRef {
        kind,
        namespace: ns.clone(),
        name: name.clone(),
    };
    let mut v: Vec<ObjectRef> = i
        .namespaces
        .keys()
        .map(|n| ObjectRef {
            kind: "Namespace",
            namespace: String::new(),
            name: n.clone(),
        })
        .collect();
    v.extend(i.pods.keys().map(|k| mk("Pod", k)));
    v.extend(i.services.keys().map(|k| mk("Service", k)));
    v.extend(i.service_accounts.keys().map(|k| mk("ServiceAccount", k)));
    v.extend(i.policies.keys().map(|k| mk("AuthorizationPolicy", k)));
    v.extend(i.peer_authns.keys().map(|k| mk("PeerAuthentication", k)));
    v.extend(
        i.request_authns
            .keys()
            .map(|k| mk("RequestAuthentication", k)),
    );
    v.extend(i.plugins.keys().map(|k| mk("WasmPlugin", k)));
    v.extend(i.http_routes.keys().map(|k| mk("HTTPRoute", k)));
    v.extend(i.grpc_routes.keys().map(|k| mk("GRPCRoute", k)));
    v.extend(i.grants.keys().map(|k| mk("ReferenceGrant", k)));
    v
}

/// Namespaces holding routes: their status and resolution depend on Services of
/// any namespace, so a Service change derives them again.
fn route_namespaces(i: &Inputs) -> BTreeSet<String> {
    i.http_routes
        .keys()
        .chain(i.grpc_routes.keys())
        .map(|(ns, _)| ns.clone())
        .collect()
}

fn upsert(i: &mut Inputs, o: Object, dirty: &mut BTreeSet<String>, pods_changed: &mut bool) {
    let r = o.object_ref();
    fn put<T: PartialEq>(m: &mut BTreeMap<(String, String), T>, k: (String, String), v: T) -> bool {
        if m.get(&k) == Some(&v) {
            return false;
        }
        m.insert(k, v);
        true
    }
    let changed = match o {
        Object::Namespace(n) => {
            if i.namespaces.get(&r.name) == Some(&n) {
                false
            } else {
                i.namespaces.insert(r.name.clone(), n);
                dirty.insert(r.name.clone());
                *pods_changed = true;
                return;
            }
        }
        Object::Pod(p) => {
            let c = put(&mut i.pods, nn(&r), convert::pod_facts(&p));
            *pods_changed |= c;
            c
        }
        Object::Service(s) => {
            let c = put(&mut i.services, nn(&r), s);
            if c {
                dirty.extend(route_namespaces(i));
            }
            c
        }
        Object::ServiceAccount(s) => put(&mut i.service_accounts, nn(&r), s),
        Object::ReferenceGrant(g) => {
            let c = put(&mut i.grants, nn(&r), *g);
            if c {
                dirty.extend(route_namespaces(i));
            }
            c
        }
        Object::HttpRoute(route) => {
            let route = *route;
            let mesh = routes::is_mesh_route(routes::AnyRoute::Http(&route));
            if !mesh {
                // Not (or no longer) attached to a Service: not weft's.
                let gone = i.http_routes.remove(&nn(&r)).is_some();
                i.invalid.remove(&r);
                gone
            } else {
                let errors = |x: &HttpRoute| routes::spec_errors(routes::AnyRoute::Http(x));
                let held_valid = i
                    .http_routes
                    .get(&nn(&r))
                    .is_some_and(|old| errors(old).is_empty());
                match keep_last_good(i, &r, route.metadata.generation, errors(&route), held_valid) {
                    Some(c) => c,
                    None => put(&mut i.http_routes, nn(&r), route),
                }
            }
        }
        Object::GrpcRoute(route) => {
            let route = *route;
            let mesh = routes::is_mesh_route(routes::AnyRoute::Grpc(&route));
            if !mesh {
                let gone = i.grpc_routes.remove(&nn(&r)).is_some();
                i.invalid.remove(&r);
                gone
            } else {
                let errors = |x: &GrpcRoute| routes::spec_errors(routes::AnyRoute::Grpc(x));
                let held_valid = i
                    .grpc_routes
                    .get(&nn(&r))
                    .is_some_and(|old| errors(old).is_empty());
                match keep_last_good(i, &r, route.metadata.generation, errors(&route), held_valid) {
                    Some(c) => c,
                    None => put(&mut i.grpc_routes, nn(&r), route),
                }
            }
        }
        Object::AuthorizationPolicy(p) => {
            let errors =
                |p: &AuthorizationPolicy| validate::validate_authorization_policy(&p.spec).errors;
            let held_valid = i
                .policies
                .get(&nn(&r))
                .is_some_and(|old| errors(old).is_empty());
            match keep_last_good(i, &r, p.metadata.generation, errors(&p), held_valid) {
                Some(c) => c,
                None => put(&mut i.policies, nn(&r), p),
            }
        }
        Object::PeerAuthentication(p) => {
            let errors =
                |p: &PeerAuthentication| validate::validate_peer_authentication(&p.spec).errors;
            let held_valid = i
                .peer_authns
                .get(&nn(&r))
                .is_some_and(|old| errors(old).is_empty());
            match keep_last_good(i, &r, p.metadata.generation, errors(&p), held_valid) {
                Some(c) => c,
                None => put(&mut i.peer_authns, nn(&r), p),
            }
        }
        Object::RequestAuthentication(p) => {
            let errors = |p: &RequestAuthentication| {
                validate::validate_request_authentication(&p.spec).errors
            };
            let held_valid = i
                .request_authns
                .get(&nn(&r))
                .is_some_and(|old| errors(old).is_empty());
            match keep_last_good(i, &r, p.metadata.generation, errors(&p), held_valid) {
                Some(c) => c,
                None => put(&mut i.request_authns, nn(&r), p),
            }
        }
        Object::WasmPlugin(p) => {
            let errors = |p: &WasmPlugin| validate::validate_wasm_plugin(&p.spec).errors;
            let held_valid = i
                .plugins
                .get(&nn(&r))
                .is_some_and(|old| errors(old).is_empty());
            match keep_last_good(i, &r, p.metadata.generation, errors(&p), held_valid) {
                Some(c) => c,
                None => put(&mut i.plugins, nn(&r), p),
            }
        }
    };
    if changed {
        dirty.insert(r.namespace);
    }
}

/// Fail static for a policy or plugin: when `new` does not validate but the version
/// held does, the held version stays in force and `new`'s problems are recorded
/// (`Some(changed)`). Otherwise (`None`) the caller stores `new` as usual: a valid
/// version replaces the held one, and an object that never validated is distributed
/// in its fail-closed form, as before.
fn keep_last_good(
    i: &mut Inputs,
    r: &ObjectRef,
    generation: Option<i64>,
    errors: Vec<validate::FieldError>,
    held_valid: bool,
) -> Option<bool> {
    if errors.is_empty() || !held_valid {
        i.invalid.remove(r);
        return None;
    }
    let stale = Stale { generation, errors };
    if i.invalid.get(r) == Some(&stale) {
        return Some(false);
    }
    for e in &stale.errors {
        tracing::warn!(object = %r, field = %e.field, error = %e.message, "invalid update rejected; the last valid version stays in force");
    }
    i.invalid.insert(r.clone(), stale);
    // Its status changes (stale), so its namespace is derived again.
    Some(true)
}

/// Stale objects: policies and plugins whose latest version did not validate, and any
/// held object the source reports as not parsing.
fn stale_of(i: &Inputs) -> BTreeMap<ObjectRef, Stale> {
    let mut out = i.invalid.clone();
    for e in &i.errors {
        let Some(r) = &e.object_ref else { continue };
        if !holds(i, r) {
            continue; // never parsed: simply rejected
        }
        let s = Stale::of_manifest_error(e);
        match out.get_mut(r) {
            Some(have) => have.errors.extend(s.errors),
            None => {
                out.insert(r.clone(), s);
            }
        }
    }
    out
}

fn holds(i: &Inputs, r: &ObjectRef) -> bool {
    let k = nn(r);
    match r.kind {
        "Namespace" => i.namespaces.contains_key(&r.name),
        "Pod" => i.pods.contains_key(&k),
        "Service" => i.services.contains_key(&k),
        "ServiceAccount" => i.service_accounts.contains_key(&k),
        "AuthorizationPolicy" => i.policies.contains_key(&k),
        "PeerAuthentication" => i.peer_authns.contains_key(&k),
        "RequestAuthentication" => i.request_authns.contains_key(&k),
        "WasmPlugin" => i.plugins.contains_key(&k),
        "HTTPRoute" => i.http_routes.contains_key(&k),
        "GRPCRoute" => i.grpc_routes.contains_key(&k),
        "ReferenceGrant" => i.grants.contains_key(&k),
        _ => false,
    }
}

fn remove(i: &mut Inputs, r: &ObjectRef, dirty: &mut BTreeSet<String>, pods_changed: &mut bool) {
    let k = nn(r);
    i.invalid.remove(r);
    let removed = match r.kind {
        "Namespace" => {
            if i.namespaces.remove(&r.name).is_some() {
                dirty.insert(r.name.clone());
                *pods_changed = true;
            }
            return;
        }
        "Pod" => {
            let c = i.pods.remove(&k).is_some();
            *pods_changed |= c;
            c
        }
        "Service" => {
            let c = i.services.remove(&k).is_some();
            if c {
                dirty.extend(route_namespaces(i));
            }
            c
        }
        "ServiceAccount" => i.service_accounts.remove(&k).is_some(),
        "AuthorizationPolicy" => i.policies.remove(&k).is_some(),
        "PeerAuthentication" => i.peer_authns.remove(&k).is_some(),
        "RequestAuthentication" => i.request_authns.remove(&k).is_some(),
        "WasmPlugin" => i.plugins.remove(&k).is_some(),
        "HTTPRoute" => i.http_routes.remove(&k).is_some(),
        "GRPCRoute" => i.grpc_routes.remove(&k).is_some(),
        "ReferenceGrant" => {
            let c = i.grants.remove(&k).is_some();
            if c {
                dirty.extend(route_namespaces(i));
            }
            c
        }
        _ => false,
    };
    if removed {
        dirty.insert(r.namespace.clone());
    }
}

#[cfg(test)]
mod tests;
