//! CRD status: the leader writes each AuthorizationPolicy's, PeerAuthentication's
//! and WasmPlugin's
//! `Accepted` condition and `observedGeneration` with server-side apply (field
//! manager `weft-control-plane`), only when they change.
//!
//! Reasons, `Accepted=False`: `InvalidSelector`, `InvalidSpec`, `ModuleUnavailable`,
//! `Stale` (the latest generation does not parse or validate; the last valid one
//! stays in force);
//! `Accepted=True`: `Accepted`, `UnsupportedField` (fields weft handles fail-closed,
//! e.g. JWT principals), `PartiallyEnforced` (L7 fields on a port a Service declares
//! not HTTP).

use super::leader::LeaderWatch;
use crate::config::ObjectRef;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use weft_model::{Model, ObjectStatus};
use weft_proto::crd::{
    AuthorizationPolicy, PeerAuthentication, RequestAuthentication, ResourceStatus,
    StatusCondition, WasmPlugin, CONDITION_ACCEPTED,
};

pub const FIELD_MANAGER: &str = "weft-control-plane";
const INTERVAL: Duration = Duration::from_secs(1);

/// The `Accepted` condition for a validation outcome (without transition time).
pub fn accepted_condition(kind: &str, st: &ObjectStatus) -> StatusCondition {
    let list = |v: &[weft_proto::validate::FieldError]| {
        v.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    };
    let (status, reason, message) = if let Some(stale) = &st.stale {
        let which = |g: Option<i64>| g.map(|g| format!(" (generation {g})")).unwrap_or_default();
        (
            "False",
            "Stale",
            format!(
                "the latest version{} is not valid: {}; the last valid version{} stays in force",
                which(stale.generation),
                list(&stale.errors),
                which(st.generation)
            ),
        )
    } else if !st.report.errors.is_empty() {
        let reason = if st
            .report
            .errors
            .iter()
            .any(|e| e.field.starts_with("spec.selector"))
        {
            "InvalidSelector"
        } else if kind == "RequestAuthentication"
            && st
                .report
                .errors
                .iter()
                .any(|e| e.field.ends_with(".jwksUri"))
        {
            "JwksUnavailable"
        } else if kind == "WasmPlugin"
            && st
                .report
                .errors
                .iter()
                .any(|e| e.field == "spec.url" || e.field == "spec.sha256")
        {
            "ModuleUnavailable"
        } else {
            "InvalidSpec"
        };
        let consequence = if kind == "PeerAuthentication" {
            "; enforced as STRICT on the workloads it selects until fixed"
        } else {
            ""
        };
        (
            "False",
            reason,
            format!("{}{consequence}", list(&st.report.errors)),
        )
    } else if !st.report.unsupported.is_empty() {
        let partial = st
            .report
            .unsupported
            .iter()
            .any(|e| e.field.ends_with(".operation.ports"));
        let reason = if partial {
            "PartiallyEnforced"
        } else {
            "UnsupportedField"
        };
        ("True", reason, list(&st.report.unsupported))
    } else {
        let message = if st.l7_enforced.is_empty() {
            "accepted and distributed to the nodes that run the selected workloads".to_string()
        } else {
            format!("accepted; {}", st.l7_enforced.join("; "))
        };
        ("True", "Accepted", message)
    };
    StatusCondition {
        type_: CONDITION_ACCEPTED.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time: None,
        observed_generation: observed_generation(st),
    }
}

/// The generation the status speaks of: the rejected one when stale (it was seen).
fn observed_generation(st: &ObjectStatus) -> Option<i64> {
    st.stale
        .as_ref()
        .and_then(|s| s.generation)
        .or(st.generation)
}

fn api_resource(kind: &str) -> Option<ApiResource> {
    match kind {
        "AuthorizationPolicy" => Some(ApiResource::erase::<AuthorizationPolicy>(&())),
        "WasmPlugin" => Some(ApiResource::erase::<WasmPlugin>(&())),
        "PeerAuthentication" => Some(ApiResource::erase::<PeerAuthentication>(&())),
        "RequestAuthentication" => Some(ApiResource::erase::<RequestAuthentication>(&())),
        _ => None,
    }
}

/// Writes status while this replica leads.
pub async fn run(client: Client, model: Arc<Model>, mut leader: LeaderWatch) {
    // What was last written, by object: (condition without time, time it took that value).
    let mut written: HashMap<ObjectRef, (StatusCondition, String)> = HashMap::new();
    loop {
        if !*leader.borrow() {
            written.clear();
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = model.statuses();
        for (obj, st) in &current {
            let Some(ar) = api_resource(obj.kind) else {
                continue;
            };
            let cond = accepted_condition(obj.kind, st);
            let now = k8s_openapi::jiff::Timestamp::now()
                .strftime("%Y-%m-%dT%H:%M:%SZ")
                .to_string();
            let transition = match written.get(obj) {
                Some((c, _)) if *c == cond => continue,
                Some((c, t)) if c.status == cond.status => t.clone(),
                _ => now,
            };
            let mut timed = cond.clone();
            timed.last_transition_time = Some(transition.clone());
            let status = ResourceStatus {
                conditions: vec![timed],
                observed_generation: observed_generation(st),
            };
            let patch = serde_json::json!({
                "apiVersion": ar.api_version,
                "kind": ar.kind,
                "status": status,
            });
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &obj.namespace, &ar);
            match api
                .patch_status(
                    &obj.name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&patch),
                )
                .await
            {
                Ok(_) => {
                    tracing::debug!(object = %obj, reason = %cond.reason, "status written");
                    written.insert(obj.clone(), (cond, transition));
                }
                // Deleted meanwhile: the model will drop it.
                Err(kube::Error::Api(s)) if s.code == 404 => {}
                Err(e) => {
                    tracing::warn!(object = %obj, error = %e, "writing status failed; will retry")
                }
            }
        }
        written.retain(|k, _| current.contains_key(k));
        tokio::select! {
            _ = tokio::time::sleep(INTERVAL) => {}
            r = leader.changed() => if r.is_err() { return },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weft_proto::validate::{FieldError, Report};

    fn st(errors: &[(&str, &str)], unsupported: &[(&str, &str)]) -> ObjectStatus {
        let fe = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(f, m)| FieldError {
                    field: f.to_string(),
                    message: m.to_string(),
                })
                .collect()
        };
        ObjectStatus {
            report: Report {
                errors: fe(errors),
                unsupported: fe(unsupported),
            },
            l7_enforced: Vec::new(),
            generation: Some(3),
            stale: None,
        }
    }

    #[test]
    fn reasons() {
        let c = accepted_condition(
            "AuthorizationPolicy",
            &st(&[("spec.selector.matchLabels", "bad key")], &[]),
        );
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidSelector")
        );
        assert_eq!(c.message, "spec.selector.matchLabels: bad key");
        assert_eq!(c.observed_generation, Some(3));
        let c = accepted_condition("AuthorizationPolicy", &st(&[("spec.action", "x")], &[]));
        assert_eq!(c.reason, "InvalidSpec");
        let c = accepted_condition("WasmPlugin", &st(&[("spec.sha256", "mismatch")], &[]));
        assert_eq!(c.reason, "ModuleUnavailable");
        let c = accepted_condition(
            "AuthorizationPolicy",
            &st(
                &[],
                &[("spec.rules[0].from[0].source.requestPrincipals", "jwt")],
            ),
        );
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "UnsupportedField")
        );
        let c = accepted_condition(
            "AuthorizationPolicy",
            &st(&[], &[("spec.rules[0].to[0].operation.ports", "opaque")]),
        );
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "PartiallyEnforced")
        );
        let c = accepted_condition("AuthorizationPolicy", &st(&[], &[]));
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("True", "Accepted"));
        // An invalid PeerAuthentication says it is enforced fail-closed.
        let c = accepted_condition(
            "PeerAuthentication",
            &st(&[("spec.portLevelMtls", "needs spec.selector")], &[]),
        );
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("False", "InvalidSpec")
        );
        assert_eq!(
            c.message,
            "spec.portLevelMtls: needs spec.selector; enforced as STRICT on the workloads it selects until fixed"
        );
        // A valid version in force while the latest one is invalid: stale, and why.
        let mut stale = st(&[], &[]);
        stale.stale = Some(weft_model::Stale {
            generation: Some(4),
            errors: vec![FieldError {
                field: "spec.action".into(),
                message: "unknown variant `DENNY`".into(),
            }],
        });
        let c = accepted_condition("AuthorizationPolicy", &stale);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Stale"));
        assert_eq!(
            c.message,
            "the latest version (generation 4) is not valid: spec.action: unknown variant `DENNY`; \
             the last valid version (generation 3) stays in force"
        );
        assert_eq!(c.observed_generation, Some(4));
    }
}
