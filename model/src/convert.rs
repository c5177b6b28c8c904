//! Kubernetes objects -> distributed resources.

use super::enrollment;
use k8s_openapi::api::core::v1::{Namespace, Pod, Service};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;
use weft_proto::crd::{
    self, AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WasmPlugin,
};
use weft_proto::pb;
use weft_proto::spiffe::{SpiffeId, TrustDomain};
use weft_proto::validate::Report;

/// What the model keeps of a Pod: the fields weft uses, not the whole object.
#[derive(Debug, Clone, PartialEq)]
pub struct PodFacts {
    /// The workload without enrollment and identity (they depend on the namespace).
    /// `service_account` is empty when the pod names none.
    pub base: pb::Workload,
    pub ready: bool,
    pub opted_out: bool,
    /// A mirror pod: the API server's copy of a kubelet's static pod.
    pub mirror: Option<MirrorPod>,
}

/// How a pod was recognized as a mirror pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MirrorPod {
    /// It carries the `kubernetes.io/config.mirror` annotation.
    Annotation,
    /// An ownerReference of kind `Node`.
    OwnedByNode,
}

/// The annotation the kubelet puts on the mirror pod of a static pod.
pub const MIRROR_ANNOTATION: &str = "kubernetes.io/config.mirror";

/// Why a pod gets no mesh identity, or `None` when it gets the identity of its
/// ServiceAccount.
///
/// A pod gets an identity only when it names its ServiceAccount
/// (`spec.serviceAccountName`, or the deprecated `spec.serviceAccount`) and is not a
/// mirror pod (`kubernetes.io/config.mirror` annotation, or owned by a `Node`). The API
/// server's ServiceAccount admission sets `serviceAccountName: default` on every
/// ordinary pod, so only mirror pods (which a node creates on its own, in any
/// namespace, and which may not reference a ServiceAccount) and hand-written manifests
/// lack one. With `fallback` (`--default-identity-fallback`), such pods get the
/// `default` ServiceAccount's identity, as weft did before.
pub fn identity_refusal(p: &PodFacts, fallback: bool) -> Option<&'static str> {
    if fallback {
        return None;
    }
    match p.mirror {
        Some(MirrorPod::Annotation) => {
            Some("mirror pod (annotation kubernetes.io/config.mirror): a static pod gets no mesh identity")
        }
        Some(MirrorPod::OwnedByNode) => {
            Some("mirror pod (owned by a Node): a static pod gets no mesh identity")
        }
        None if p.base.service_account.is_empty() => {
            Some("no ServiceAccount: spec.serviceAccountName is empty")
        }
        None => None,
    }
}

/// Would the pod be enrolled, identity aside? (Its namespace is in the mesh, it is not
/// opted out and does not use the host network.)
pub fn enrollable(p: &PodFacts, ns: Option<&Namespace>) -> bool {
    enrollment::namespace_enabled(ns) && !p.opted_out && !p.base.host_network
}

pub fn pod_facts(pod: &Pod) -> PodFacts {
    let meta = &pod.metadata;
    let namespace = meta.namespace.clone().unwrap_or_default();
    let name = meta.name.clone().unwrap_or_default();
    let spec = pod.spec.as_ref();
    #[allow(deprecated)] // the deprecated alias of serviceAccountName still names one
    let sa = spec
        .and_then(|s| {
            s.service_account_name
                .clone()
                .filter(|s| !s.is_empty())
                .or_else(|| s.service_account.clone())
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_default();
    let mirror = if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(MIRROR_ANNOTATION))
    {
        Some(MirrorPod::Annotation)
    } else if meta
        .owner_references
        .iter()
        .flatten()
        .any(|o| o.kind == "Node")
    {
        Some(MirrorPod::OwnedByNode)
    } else {
        None
    };
    let status = pod.status.as_ref();
    let mut ips: Vec<String> = status
        .and_then(|s| s.pod_ips.as_ref())
        .map(|v| v.iter().map(|p| p.ip.clone()).collect())
        .unwrap_or_default();
    if ips.is_empty() {
        if let Some(ip) = status
            .and_then(|s| s.pod_ip.clone())
            .filter(|s| !s.is_empty())
        {
            ips.push(ip);
        }
    }
    let ports = spec
        .map(|s| {
            s.containers
                .iter()
                .flat_map(|c| c.ports.iter().flatten())
                .map(|p| pb::ContainerPort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.container_port.max(0) as u32,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                })
                .collect()
        })
        .unwrap_or_default();
    let labels = meta.labels.clone().unwrap_or_default();
    let opted_out = labels
        .get(weft_proto::labels::MESH)
        .is_some_and(|v| v == weft_proto::labels::DISABLED);
    PodFacts {
        base: pb::Workload {
            uid: meta
                .uid
                .clone()
                .unwrap_or_else(|| format!("{namespace}/{name}")),
            name,
            namespace,
            service_account: sa,
            node: spec.and_then(|s| s.node_name.clone()).unwrap_or_default(),
            ips,
            enrolled: false,
            spiffe_id: String::new(),
            labels: labels.into_iter().collect(),
            host_network: spec.and_then(|s| s.host_network).unwrap_or(false),
            ports,
        },
        ready: pod_ready(pod),
        opted_out,
        mirror,
    }
}

/// The distributed workload: the pod's facts plus enrollment and identity. A pod
/// refused an identity ([`identity_refusal`]) is distributed not enrolled and without
/// a SPIFFE ID, so no node captures it and no certificate is issued for it.
pub fn workload(
    p: &PodFacts,
    ns: Option<&Namespace>,
    td: &TrustDomain,
    fallback: bool,
) -> pb::Workload {
    let mut w = p.base.clone();
    if identity_refusal(p, fallback).is_some() {
        w.enrolled = false;
        return w;
    }
    if w.service_account.is_empty() {
        w.service_account = "default".into();
    }
    w.enrolled = enrollable(p, ns);
    w.spiffe_id = SpiffeId::for_workload(td, &w.namespace, &w.service_account)
        .map(|id| id.to_string())
        .unwrap_or_default();
    w
}

/// Is the pod serving (not finished, not terminating, not marked unready)?
pub fn pod_ready(pod: &Pod) -> bool {
    if pod.metadata.deletion_timestamp.is_some() {
        return false;
    }
    let status = pod.status.as_ref();
    if matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return false;
    }
    !status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "False"))
}

pub fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

pub fn service(svc: &Service, pods: &[(&PodFacts, &pb::Workload)]) -> pb::Service {
    let meta = &svc.metadata;
    let spec = svc.spec.as_ref();
    let mut cluster_ips: Vec<String> = spec.and_then(|s| s.cluster_ips.clone()).unwrap_or_default();
    if cluster_ips.is_empty() {
        if let Some(ip) = spec.and_then(|s| s.cluster_ip.clone()) {
            cluster_ips.push(ip);
        }
    }
    cluster_ips.retain(|ip| !ip.is_empty() && ip != "None");
    let ports: Vec<pb::ServicePort> = spec
        .and_then(|s| s.ports.as_ref())
        .map(|ps| {
            ps.iter()
                .map(|p| pb::ServicePort {
                    name: p.name.clone().unwrap_or_default(),
                    port: p.port.max(0) as u32,
                    protocol: p.protocol.clone().unwrap_or_else(|| "TCP".into()),
                    target_port: match &p.target_port {
                        Some(IntOrString::Int(i)) => i.to_string(),
                        Some(IntOrString::String(s)) => s.clone(),
                        None => p.port.to_string(),
                    },
                    app_protocol: p.app_protocol.clone().unwrap_or_default(),
                })
                .collect()
        })
        .unwrap_or_default();
    let selector: BTreeMap<String, String> =
        spec.and_then(|s| s.selector.clone()).unwrap_or_default();
    let mut endpoints = Vec::new();
    if !selector.is_empty() {
        for (pod, w) in pods {
            let labels: BTreeMap<String, String> = w.labels.clone().into_iter().collect();
            if w.ips.is_empty() || !selector_matches(&selector, &labels) {
                continue;
            }
            let mut target_ports = std::collections::BTreeMap::new();
            for p in &ports {
                let resolved = match p.target_port.parse::<u32>() {
                    Ok(n) => Some(n),
                    Err(_) => w
                        .ports
                        .iter()
                        .find(|c| c.name == p.target_port)
                        .map(|c| c.port),
                };
                if let Some(t) = resolved {
                    target_ports.insert(p.port, t);
                }
            }
            endpoints.push(pb::Endpoint {
                workload_uid: w.uid.clone(),
                ips: w.ips.clone(),
                target_ports,
                ready: pod.ready,
            });
        }
    }
    endpoints.sort_by(|a, b| a.workload_uid.cmp(&b.workload_uid));
    pb::Service {
        name: meta.name.clone().unwrap_or_default(),
        namespace: meta.namespace.clone().unwrap_or_default(),
        cluster_ips,
        ports,
        selector: selector.into_iter().collect(),
        endpoints,
    }
}

fn source(s: &crd::Source) -> pb::Source {
    pb::Source {
        principals: s.principals.clone(),
        not_principals: s.not_principals.clone(),
        request_principals: s.request_principals.clone(),
        not_request_principals: s.not_request_principals.clone(),
        namespaces: s.namespaces.clone(),
        not_namespaces: s.not_namespaces.clone(),
        service_accounts: s.service_accounts.clone(),
        not_service_accounts: s.not_service_accounts.clone(),
        ip_blocks: s.ip_blocks.clone(),
        not_ip_blocks: s.not_ip_blocks.clone(),
        remote_ip_blocks: s.remote_ip_blocks.clone(),
        not_remote_ip_blocks: s.not_remote_ip_blocks.clone(),
    }
}

fn operation(o: &crd::Operation) -> pb::Operation {
    pb::Operation {
        hosts: o.hosts.clone(),
        not_hosts: o.not_hosts.clone(),
        ports: o.ports.clone(),
        not_ports: o.not_ports.clone(),
        methods: o.methods.clone(),
        not_methods: o.not_methods.clone(),
        paths: o.paths.clone(),
        not_paths: o.not_paths.clone(),
    }
}

/// Converts a policy. An invalid policy is distributed fail-closed: an invalid ALLOW
/// policy matches nothing (so its workloads only get what other ALLOW policies
/// grant), an invalid DENY policy matches everything; an invalid AUDIT policy is
/// dropped (returns `None`).
pub fn authorization_policy(
    p: &AuthorizationPolicy,
    report: &Report,
    root_namespace: &str,
) -> Option<pb::AuthorizationPolicy> {
    use pb::authorization_policy::Action as A;
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let action = match p.spec.action.unwrap_or_default() {
        crd::Action::Allow => A::Allow,
        crd::Action::Deny | crd::Action::Custom => A::Deny,
        crd::Action::Audit => A::Audit,
    };
    let rules = if report.is_valid() {
        p.spec
            .rules
            .iter()
            .map(|r| pb::Rule {
                from: r.from.iter().map(|f| source(&f.source)).collect(),
                to: r.to.iter().map(|t| operation(&t.operation)).collect(),
                when: r
                    .when
                    .iter()
                    .map(|c| pb::Condition {
                        key: c.key.clone(),
                        values: c.values.clone(),
                        not_values: c.not_values.clone(),
                    })
                    .collect(),
            })
            .collect()
    } else {
        match action {
            A::Allow => vec![],
            A::Deny => vec![pb::Rule::default()],
            A::Audit => return None,
        }
    };
    Some(pb::AuthorizationPolicy {
        name: p.metadata.name.clone().unwrap_or_default(),
        mesh_wide: namespace == root_namespace,
        namespace,
        selector: p
            .spec
            .selector
            .as_ref()
            .map(|s| s.match_labels.clone().into_iter().collect())
            .unwrap_or_default(),
        action: action as i32,
        rules,
    })
}

/// Converts a PeerAuthentication. An invalid one is distributed fail-closed, as
/// STRICT on every port of what it selects (a typo cannot open a workload to
/// plaintext); its status says why.
pub fn peer_authentication(
    p: &PeerAuthentication,
    report: &Report,
    root_namespace: &str,
) -> pb::PeerAuthentication {
    use pb::peer_authentication::MtlsMode as M;
    let mode = |m: &Option<crd::MutualTls>| match m.as_ref().and_then(|m| m.mode) {
        None | Some(crd::MtlsMode::Unset) => M::Unset,
        Some(crd::MtlsMode::Permissive) => M::Permissive,
        Some(crd::MtlsMode::Strict) => M::Strict,
        Some(crd::MtlsMode::Disable) => M::Disable,
    } as i32;
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let selector: std::collections::BTreeMap<String, String> = p
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone().into_iter().collect())
        .unwrap_or_default();
    let (mode, port_modes) = if report.is_valid() {
        (
            mode(&p.spec.mtls),
            p.spec
                .port_level_mtls
                .iter()
                .filter_map(|(port, m)| Some((port.parse::<u32>().ok()?, mode(&Some(m.clone())))))
                .collect(),
        )
    } else {
        (M::Strict as i32, Default::default())
    };
    pb::PeerAuthentication {
        name: p.metadata.name.clone().unwrap_or_default(),
        mesh_wide: namespace == root_namespace && selector.is_empty(),
        namespace,
        selector,
        mode,
        port_modes,
        created: p
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| t.0.as_second())
            .unwrap_or(0),
    }
}

/// Converts a RequestAuthentication, with each rule's key set: inline `jwks`, or
/// what `fetch` gives for its `jwksUri` (the control plane's fetcher). A rule whose
/// key set is not valid or not available is distributed without keys (and
/// `jwks_error` saying why), so tokens of its issuer are refused: a token is never
/// believed unverified. Problems are added to `report`, naming the field.
pub fn request_authentication(
    p: &RequestAuthentication,
    report: &mut Report,
    root_namespace: &str,
    fetch: impl Fn(&str) -> crate::jwks::JwksResolved,
) -> pb::RequestAuthentication {
    use crate::jwks::JwksResolved;
    let namespace = p.metadata.namespace.clone().unwrap_or_default();
    let selector: std::collections::BTreeMap<String, String> = p
        .spec
        .selector
        .as_ref()
        .map(|s| s.match_labels.clone().into_iter().collect())
        .unwrap_or_default();
    let mut rules = Vec::new();
    for (i, r) in p.spec.jwt_rules.iter().enumerate() {
        if r.issuer.is_empty() {
            continue; // reported by validation; a rule without an issuer is unusable
        }
        let mut jwks_pending = false;
        let (jwks, jwks_error) = match (&r.jwks, &r.jwks_uri) {
            (Some(inline), _) => (inline.clone(), String::new()),
            (None, Some(uri)) if uri.starts_with("http://") || uri.starts_with("https://") => {
                match fetch(uri) {
                    JwksResolved::Ready(text) => (text, String::new()),
                    JwksResolved::Pending => {
                        jwks_pending = true;
                        (String::new(), "the key set is being fetched".into())
                    }
                    JwksResolved::Failed(why) => {
                        report.errors.push(weft_proto::validate::FieldError {
                            field: format!("spec.jwtRules[{i}].jwksUri"),
                            message: format!("the key set is not available: {why}; tokens of this issuer are refused"),
                        });
                        (String::new(), why)
                    }
                }
            }
            _ => (String::new(), "no key set".into()),
        };
        let rule = weft_authn::JwtRule {
            issuer: r.issuer.clone(),
            audiences: r.audiences.clone(),
            jwks: jwks.clone(),
            from_headers: r
                .from_headers
                .iter()
                .map(|h| weft_authn::JwtHeader {
                    name: h.name.clone(),
                    prefix: h.prefix.clone().unwrap_or_default(),
                })
                .collect(),
            from_params: r.from_params.clone(),
            forward_original_token: r.forward_original_token.unwrap_or(false),
            output_claim_to_headers: r
                .output_claim_to_headers
                .iter()
                .map(|o| weft_authn::ClaimToHeader {
                    header: o.header.clone(),
                    claim: o.claim.clone(),
                })
                .collect(),
        };
        // Everything but the keys, as the node compiles it: a rule the node could not
        // compile at all is reported here (the node refuses its issuer's tokens).
        if let Err(e) = weft_authn::compile_without_keys(&rule) {
            report.errors.push(weft_proto::validate::FieldError {
                field: format!("spec.jwtRules[{i}].{}", e.field()),
                message: format!("{}; tokens of this issuer are refused", e.message()),
            });
        }
        // What the node will compile, checked here so the status names the problem.
        let (jwks, jwks_error) = if jwks.is_empty() {
            (jwks, jwks_error)
        } else {
            match weft_authn::compile(&rule) {
                Ok(_) => (jwks, jwks_error),
                Err(e) => {
                    let field = if e.field().starts_with("jwks") && r.jwks.is_none() {
                        "jwksUri".to_string()
                    } else {
                        e.field().to_string()
                    };
                    report.errors.push(weft_proto::validate::FieldError {
                        field: format!("spec.jwtRules[{i}].{field}"),
                        message: format!("{}; tokens of this issuer are refused", e.message()),
                    });
                    (String::new(), e.to_string())
                }
            }
        };
        rules.push(pb::JwtRule {
            issuer: rule.issuer,
            audiences: rule.audiences,
            jwks,
            from_headers: rule
                .from_headers
                .into_iter()
                .map(|h| pb::JwtHeader {
                    name: h.name,
                    prefix: h.prefix,
                })
                .collect(),
            from_params: rule.from_params,
            forward_original_token: rule.forward_original_token,
            output_claim_to_headers: rule
                .output_claim_to_headers
                .into_iter()
                .map(|o| pb::ClaimToHeader {
                    header: o.header,
                    claim: o.claim,
                })
                .collect(),
            jwks_uri: r.jwks_uri.clone().unwrap_or_default(),
            jwks_error,
            jwks_pending,
        });
    }
    pb::RequestAuthentication {
        name: p.metadata.name.clone().unwrap_or_default(),
        mesh_wide: namespace == root_namespace && selector.is_empty(),
        namespace,
        selector,
        rules,
    }
}

pub fn wasm_plugin(p: &WasmPlugin) -> pb::WasmPlugin {
    let s = &p.spec;
    let phase = match s.phase {
        Some(crd::Phase::Authn) => "AUTHN",
        Some(crd::Phase::Authz) => "AUTHZ",
        Some(crd::Phase::Stats) => "STATS",
        _ => "UNSPECIFIED_PHASE",
    };
    let fail = match s.fail_strategy.unwrap_or_default() {
        crd::FailStrategy::FailClose => "FAIL_CLOSE",
        crd::FailStrategy::FailOpen => "FAIL_OPEN",
        crd::FailStrategy::FailReload => "FAIL_RELOAD",
    };
    pb::WasmPlugin {
        name: p.metadata.name.clone().unwrap_or_default(),
        namespace: p.metadata.namespace.clone().unwrap_or_default(),
        selector: s
            .selector
            .as_ref()
            .map(|x| x.match_labels.clone().into_iter().collect())
            .unwrap_or_default(),
        url: s.url.clone(),
        sha256: s.sha256.clone().unwrap_or_default(),
        plugin_name: s
            .plugin_name
            .clone()
            .unwrap_or_else(|| p.metadata.name.clone().unwrap_or_default()),
        plugin_config: s
            .plugin_config
            .as_ref()
            .map(|c| c.to_string())
            .unwrap_or_default(),
        phase: phase.into(),
        priority: s.priority.unwrap_or(0),
        ports: s
            .match_
            .iter()
            .flat_map(|m| m.ports.iter().map(|p| p.number))
            .collect(),
        fail_strategy: fail.into(),
        max_cpu_millis_per_callback: s
            .limits
            .as_ref()
            .and_then(|l| l.cpu_time_per_callback_millis)
            .unwrap_or(weft_proto::wasm_abi::DEFAULT_CPU_MILLIS_PER_CALLBACK),
        max_memory_bytes: s
            .limits
            .as_ref()
            .and_then(|l| l.memory_bytes)
            .unwrap_or(weft_proto::wasm_abi::DEFAULT_MEMORY_BYTES),
        module_error: String::new(),
    }
}
