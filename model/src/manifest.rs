//! Kubernetes-style YAML manifests: multi-document files of `Namespace`, `Pod`,
//! `Service`, `ServiceAccount`, `AuthorizationPolicy`, `PeerAuthentication`,
//! `RequestAuthentication`, `WasmPlugin`, and the Gateway
//! API's `HTTPRoute` and `GRPCRoute`. Every bad
//! document yields a [`ManifestError`] naming file, document, object and field;
//! the good documents around it are still returned.

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceAccount};
use serde::Deserialize;
use std::fmt;
use weft_proto::crd::{AuthorizationPolicy, PeerAuthentication, RequestAuthentication, WasmPlugin};
use weft_proto::gateway::{GrpcRoute, HttpRoute, ReferenceGrant};

/// One configuration object.
#[derive(Debug, Clone, PartialEq)]
pub enum Object {
    Namespace(Namespace),
    Pod(Box<Pod>),
    Service(Service),
    ServiceAccount(ServiceAccount),
    AuthorizationPolicy(AuthorizationPolicy),
    PeerAuthentication(PeerAuthentication),
    RequestAuthentication(RequestAuthentication),
    WasmPlugin(WasmPlugin),
    HttpRoute(Box<HttpRoute>),
    GrpcRoute(Box<GrpcRoute>),
    ReferenceGrant(Box<ReferenceGrant>),
}

/// Identifies an object: kind, namespace (empty for cluster-scoped) and name.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectRef {
    pub kind: &'static str,
    pub namespace: String,
    pub name: String,
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

impl Object {
    pub fn object_ref(&self) -> ObjectRef {
        let (kind, meta) = match self {
            Object::Namespace(o) => ("Namespace", &o.metadata),
            Object::Pod(o) => ("Pod", &o.metadata),
            Object::Service(o) => ("Service", &o.metadata),
            Object::ServiceAccount(o) => ("ServiceAccount", &o.metadata),
            Object::AuthorizationPolicy(o) => ("AuthorizationPolicy", &o.metadata),
            Object::PeerAuthentication(o) => ("PeerAuthentication", &o.metadata),
            Object::RequestAuthentication(o) => ("RequestAuthentication", &o.metadata),
            Object::WasmPlugin(o) => ("WasmPlugin", &o.metadata),
            Object::HttpRoute(o) => ("HTTPRoute", &o.metadata),
            Object::GrpcRoute(o) => ("GRPCRoute", &o.metadata),
            Object::ReferenceGrant(o) => ("ReferenceGrant", &o.metadata),
        };
        ObjectRef {
            kind,
            namespace: if kind == "Namespace" {
                String::new()
            } else {
                meta.namespace.clone().unwrap_or_default()
            },
            name: meta.name.clone().unwrap_or_default(),
        }
    }
}

/// A problem with one document of one file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ManifestError {
    pub file: String,
    /// 0-based index of the YAML document within the file.
    pub document: usize,
    /// `Kind namespace/name` when it could be read.
    pub object: Option<String>,
    /// The object the problem is about, when kind, namespace and name could be read.
    /// While the model holds an earlier version of that object, that version stays in
    /// force and is reported stale (fail static); see [`crate::Model::stale`].
    pub object_ref: Option<ObjectRef>,
    /// `metadata.generation` of the version that did not parse, when known.
    pub generation: Option<i64>,
    /// Field path (`spec.ports[0].port`) when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} document {}", self.file, self.document)?;
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(fl) = &self.field {
            write!(f, " field {fl}")?;
        }
        write!(f, ": {}", self.message)
    }
}

const KINDS: &[(&str, &str)] = &[
    ("Namespace", "v1"),
    ("Pod", "v1"),
    ("Service", "v1"),
    ("ServiceAccount", "v1"),
    ("AuthorizationPolicy", "security.weft.dev/v1alpha1"),
    ("PeerAuthentication", "security.weft.dev/v1alpha1"),
    ("RequestAuthentication", "security.weft.dev/v1alpha1"),
    ("WasmPlugin", "extensions.weft.dev/v1alpha1"),
    ("HTTPRoute", "gateway.networking.k8s.io/v1"),
    ("GRPCRoute", "gateway.networking.k8s.io/v1"),
    // Either version: both have the same schema.
    (
        "ReferenceGrant",
        "gateway.networking.k8s.io/v1beta1|gateway.networking.k8s.io/v1",
    ),
];

/// Parses every document of `text` (the contents of `file`).
pub fn parse_manifests(file: &str, text: &str) -> (Vec<Object>, Vec<ManifestError>) {
    let mut objects = Vec::new();
    let mut errors = Vec::new();
    for (index, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let err = |e: DocError| {
            let (object, object_ref, field, message) = *e;
            ManifestError {
                file: file.to_string(),
                document: index,
                object,
                object_ref,
                generation: None,
                field,
                message,
            }
        };
        let value = match serde_yaml::Value::deserialize(doc) {
            Ok(v) => v,
            Err(e) => {
                errors.push(err(Box::new((
                    None,
                    None,
                    None,
                    format!("invalid YAML: {e}"),
                ))));
                // A syntax error ends the stream: later documents cannot be located.
                break;
            }
        };
        if value.is_null() {
            continue; // empty document (e.g. a trailing `---`)
        }
        match parse_one(value) {
            Ok(o) => objects.push(o),
            Err(e) => errors.push(err(e)),
        }
    }
    (objects, errors)
}

/// (object label, object reference, field, message) of a document that did not parse.
/// Boxed: it is large, and only the rare bad document pays for it.
type DocError = Box<(Option<String>, Option<ObjectRef>, Option<String>, String)>;

fn parse_one(value: serde_yaml::Value) -> Result<Object, DocError> {
    let str_at =
        |v: &serde_yaml::Value, k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_owned);
    let kind = str_at(&value, "kind");
    let api_version = str_at(&value, "apiVersion");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| str_at(m, "name"));
    let namespace = meta.and_then(|m| str_at(m, "namespace"));
    let label = |k: &str| match (&namespace, &name) {
        (Some(ns), Some(n)) => Some(format!("{k} {ns}/{n}")),
        (None, Some(n)) => Some(format!("{k} {n}")),
        _ => Some(k.to_string()),
    };

    let Some(kind) = kind else {
        return Err(Box::new((
            None,
            None,
            Some("kind".into()),
            "missing".into(),
        )));
    };
    let Some((static_kind, want_api)) = KINDS.iter().find(|(k, _)| *k == kind) else {
        let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
        return Err(Box::new((
            label(&kind),
            None,
            Some("kind".into()),
            format!("unknown kind {kind:?}; supported: {}", known.join(", ")),
        )));
    };
    // From here on the object can be named (once name and namespace are known), so a
    // problem is attributed to it: an earlier good version of it stays in force.
    let object_ref = match (&name, &namespace) {
        (Some(n), _) if *static_kind == "Namespace" && !n.is_empty() => Some(ObjectRef {
            kind: static_kind,
            namespace: String::new(),
            name: n.clone(),
        }),
        (Some(n), Some(ns)) if !n.is_empty() && !ns.is_empty() => Some(ObjectRef {
            kind: static_kind,
            namespace: ns.clone(),
            name: n.clone(),
        }),
        _ => None,
    };
    let fail = |field: &str, message: String| -> Result<Object, DocError> {
        Err(Box::new((
            label(&kind),
            object_ref.clone(),
            Some(field.to_string()).filter(|p| p != "."),
            message,
        )))
    };
    if !want_api
        .split('|')
        .any(|a| api_version.as_deref() == Some(a))
    {
        return fail(
            "apiVersion",
            format!(
                "{api_version:?} is not supported for {kind}; use {}",
                want_api.replace('|', " or ")
            ),
        );
    }
    let Some(name) = name.clone().filter(|n| !n.is_empty()) else {
        return fail("metadata.name", "missing".into());
    };
    if kind != "Namespace" && namespace.as_deref().is_none_or(str::is_empty) {
        return fail(
            "metadata.namespace",
            "missing: every object but a Namespace must name its namespace".into(),
        );
    }
    if !is_dns_label(&name)
        && kind != "AuthorizationPolicy"
        && kind != "PeerAuthentication"
        && kind != "RequestAuthentication"
        && kind != "WasmPlugin"
        && !is_dns_subdomain(&name)
    {
        return fail(
            "metadata.name",
            format!("{name:?} is not a valid Kubernetes name"),
        );
    }

    fn typed<T: serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Result<T, (String, String)> {
        serde_path_to_error::deserialize(v).map_err(|e| {
            let path = e.path().to_string();
            (path, e.into_inner().to_string())
        })
    }
    let obj = match kind.as_str() {
        "Namespace" => typed(value).map(Object::Namespace),
        "Pod" => typed(value).map(|p| Object::Pod(Box::new(p))),
        "Service" => typed(value).map(Object::Service),
        "ServiceAccount" => typed(value).map(Object::ServiceAccount),
        "AuthorizationPolicy" => typed(value).map(Object::AuthorizationPolicy),
        "PeerAuthentication" => typed(value).map(Object::PeerAuthentication),
        "RequestAuthentication" => typed(value).map(Object::RequestAuthentication),
        "HTTPRoute" => typed(value).map(|r| Object::HttpRoute(Box::new(r))),
        "GRPCRoute" => typed(value).map(|r| Object::GrpcRoute(Box::new(r))),
        "ReferenceGrant" => typed(value).map(|r| Object::ReferenceGrant(Box::new(r))),
        _ => typed(value).map(Object::WasmPlugin),
    };
    match obj {
        Ok(o) => Ok(o),
        Err((path, msg)) => fail(&path, msg),
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn multi_document_file() {
        let text = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {weft.dev/mesh: enabled}}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec:
  nodeName: node-a
  serviceAccountName: web
  containers: [{name: web, image: web}]
status: {podIP: 10.0.0.5}
---
"#;
        let (objs, errs) = parse_manifests("a.yaml", text);
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(objs.len(), 2);
        assert_eq!(objs[1].object_ref().to_string(), "Pod shop/web-1");
    }

    #[test]
    fn bad_documents_are_reported_and_others_kept() {
        let text = r#"
apiVersion: v1
kind: Gizmo
metadata: {name: g, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: "eighty"}]
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: web, namespace: shop}
---
apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: p, namespace: shop}
spec:
  action: ALLOW
  rules: [{from: [{source: {principalz: [x]}}]}]
---
apiVersion: v1
kind: Pod
metadata: {name: nons}
"#;
        let (objs, errs) = parse_manifests("bad.yaml", text);
        assert_eq!(objs.len(), 1);
        assert_eq!(objs[0].object_ref().to_string(), "ServiceAccount shop/web");
        assert_eq!(errs.len(), 4, "{errs:#?}");
        assert_eq!(errs[0].document, 0);
        assert_eq!(errs[0].field.as_deref(), Some("kind"));
        assert!(errs[0].message.contains("unknown kind \"Gizmo\""));
        assert_eq!(errs[1].document, 1);
        assert_eq!(errs[1].object.as_deref(), Some("Service shop/web"));
        assert_eq!(errs[1].field.as_deref(), Some("spec.ports[0].port"));
        assert_eq!(
            errs[2].object.as_deref(),
            Some("AuthorizationPolicy shop/p")
        );
        assert_eq!(
            errs[2].field.as_deref(),
            Some("spec.rules[0].from[0].source.principalz")
        );
        assert!(
            errs[2].message.contains("principalz"),
            "{}",
            errs[2].message
        );
        assert_eq!(errs[3].field.as_deref(), Some("metadata.namespace"));
        // Problems are attributed to an object when it can be named.
        let refs: Vec<Option<String>> = errs
            .iter()
            .map(|e| e.object_ref.as_ref().map(ToString::to_string))
            .collect();
        assert_eq!(
            refs,
            vec![
                None,
                Some("Service shop/web".into()),
                Some("AuthorizationPolicy shop/p".into()),
                None
            ]
        );
        assert_eq!(
            errs[1].to_string(),
            format!(
                "bad.yaml document 1 (Service shop/web) field spec.ports[0].port: {}",
                errs[1].message
            )
        );
    }

    #[test]
    fn invalid_yaml() {
        let (objs, errs) = parse_manifests("x.yaml", "kind: [unclosed\n");
        assert!(objs.is_empty());
        assert_eq!(errs.len(), 1);
        assert!(errs[0].message.starts_with("invalid YAML"));
    }
}
