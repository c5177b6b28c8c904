//! Gateway API route status: the leader writes, on every HTTPRoute and GRPCRoute
//! that names a Service as a parent, one `status.parents` entry per Service
//! parent (`controllerName: weft.dev/mesh`) with the `Accepted` and `ResolvedRefs`
//! conditions. Entries of other controllers (a Gateway's) are kept: the list is
//! read, weft's entries replaced, and written back with the resourceVersion read,
//! so a concurrent writer makes the write fail and it is redone a second later.

use super::leader::LeaderWatch;
use crate::config::ObjectRef;
use kube::api::{ApiResource, DynamicObject, Patch, PatchParams};
use kube::{Api, Client};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use weft_model::routes::{Condition, ParentStatus, RouteStatus};
use weft_model::{Model, Stale};
use weft_proto::gateway::{GrpcRoute, HttpRoute, CONTROLLER_NAME};

const INTERVAL: Duration = Duration::from_secs(1);

fn api_resource(kind: &str) -> Option<ApiResource> {
    match kind {
        "HTTPRoute" => Some(ApiResource::erase::<HttpRoute>(&())),
        "GRPCRoute" => Some(ApiResource::erase::<GrpcRoute>(&())),
        _ => None,
    }
}

fn condition(type_: &str, c: &Condition, generation: Option<i64>, at: &str) -> Value {
    json!({
        "type": type_,
        "status": if c.status { "True" } else { "False" },
        "reason": c.reason,
        "message": c.message,
        "observedGeneration": generation.unwrap_or(0),
        "lastTransitionTime": at,
    })
}

/// The parentRef of a status entry: the spec's, field for field.
fn parent_ref(p: &ParentStatus) -> Value {
    let mut r = json!({"group": "", "kind": "Service", "name": p.service_name});
    if let Some(ns) = &p.ref_namespace {
        r["namespace"] = json!(ns);
    }
    if let Some(port) = p.port {
        r["port"] = json!(port);
    }
    r
}

/// weft's `status.parents` entries for a route. A stale route (its latest version
/// does not validate; the last valid one is in force) is reported not accepted,
/// with why.
pub fn weft_parents(st: &RouteStatus, stale: Option<&Stale>, at: &str) -> Vec<Value> {
    st.parents
        .iter()
        .map(|p| {
            let (accepted, generation) = match stale {
                Some(s) => (
                    Condition {
                        status: false,
                        reason: "UnsupportedValue",
                        message: format!(
                            "the latest version is not valid: {}; the last valid version stays in force",
                            s.errors
                                .iter()
                                .map(ToString::to_string)
                                .collect::<Vec<_>>()
                                .join("; ")
                        ),
                    },
                    s.generation.or(st.generation),
                ),
                None => (p.accepted.clone(), st.generation),
            };
            json!({
                "parentRef": parent_ref(p),
                "controllerName": CONTROLLER_NAME,
                "conditions": [
                    condition("Accepted", &accepted, generation, at),
                    condition("ResolvedRefs", &p.resolved_refs, generation, at),
                ],
            })
        })
        .collect()
}

/// The whole `status.parents` list: other controllers' entries as they are, then
/// weft's.
pub fn merged_parents(current: &Value, ours: Vec<Value>) -> Vec<Value> {
    let mut out: Vec<Value> = current
        .pointer("/status/parents")
        .and_then(Value::as_array)
        .map(|v| {
            v.iter()
                .filter(|e| {
                    e.get("controllerName").and_then(Value::as_str) != Some(CONTROLLER_NAME)
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    out.extend(ours);
    out
}

/// Conditions without their times, to tell whether anything changed.
fn timeless(parents: &[Value]) -> Vec<Value> {
    parents
        .iter()
        .map(|p| {
            let mut p = p.clone();
            if let Some(cs) = p.get_mut("conditions").and_then(Value::as_array_mut) {
                for c in cs {
                    if let Some(o) = c.as_object_mut() {
                        o.remove("lastTransitionTime");
                    }
                }
            }
            p
        })
        .collect()
}

/// Writes route status while this replica leads.
pub async fn run(client: Client, model: Arc<Model>, mut leader: LeaderWatch) {
    let mut written: HashMap<ObjectRef, Vec<Value>> = HashMap::new();
    loop {
        if !*leader.borrow() {
            written.clear();
            if leader.changed().await.is_err() {
                return;
            }
            continue;
        }
        let current = model.route_statuses();
        let now = k8s_openapi::jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        for (obj, (st, stale)) in &current {
            let Some(ar) = api_resource(obj.kind) else {
                continue;
            };
            let ours = weft_parents(st, stale.as_ref(), &now);
            if written.get(obj) == Some(&timeless(&ours)) {
                continue;
            }
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), &obj.namespace, &ar);
            let live = match api.get_status(&obj.name).await {
                Ok(o) => o,
                Err(kube::Error::Api(s)) if s.code == 404 => continue,
                Err(e) => {
                    tracing::warn!(object = %obj, error = %e, "reading route status failed; will retry");
                    continue;
                }
            };
            let live_json = serde_json::to_value(&live).unwrap_or(Value::Null);
            // Keep the transition time of a condition whose status did not change.
            let ours = keep_transition_times(&live_json, ours);
            let parents = merged_parents(&live_json, ours.clone());
            let patch = json!({
                "metadata": {"resourceVersion": live.metadata.resource_version},
                "status": {"parents": parents},
            });
            match api
                .patch_status(&obj.name, &PatchParams::default(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    tracing::debug!(object = %obj, "route status written");
                    written.insert(obj.clone(), timeless(&ours));
                }
                Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
                Err(e) => {
                    tracing::warn!(object = %obj, error = %e, "writing route status failed; will retry")
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

/// Takes `lastTransitionTime` from the live entry for the same parent and condition
/// type when the condition's status is unchanged.
fn keep_transition_times(live: &Value, mut ours: Vec<Value>) -> Vec<Value> {
    let Some(entries) = live.pointer("/status/parents").and_then(Value::as_array) else {
        return ours;
    };
    for e in &mut ours {
        let Some(old) = entries.iter().find(|o| {
            o.get("controllerName") == e.get("controllerName")
                && o.get("parentRef") == e.get("parentRef")
        }) else {
            continue;
        };
        let old_conds = old
            .get("conditions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(cs) = e.get_mut("conditions").and_then(Value::as_array_mut) {
            for c in cs {
                let same = old_conds
                    .iter()
                    .find(|o| o.get("type") == c.get("type") && o.get("status") == c.get("status"));
                if let Some(t) = same.and_then(|o| o.get("lastTransitionTime")).cloned() {
                    c["lastTransitionTime"] = t;
                }
            }
        }
    }
    ours
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st() -> RouteStatus {
        RouteStatus {
            generation: Some(2),
            parents: vec![ParentStatus {
                service_namespace: "shop".into(),
                service_name: "echo".into(),
                port: Some(80),
                ref_namespace: None,
                accepted: Condition {
                    status: true,
                    reason: "Accepted",
                    message: "ok".into(),
                },
                resolved_refs: Condition {
                    status: false,
                    reason: "BackendNotFound",
                    message: "spec.rules[0].backendRefs[0]: Service shop/gone does not exist"
                        .into(),
                },
            }],
        }
    }

    #[test]
    fn other_controllers_entries_are_kept_and_ours_replaced() {
        let live = json!({"status": {"parents": [
            {"controllerName": "example.com/gateway", "parentRef": {"name": "gw"}, "conditions": []},
            {"controllerName": CONTROLLER_NAME, "parentRef": {"name": "old"}, "conditions": []},
        ]}});
        let ours = weft_parents(&st(), None, "2026-12-07T00:00:00Z");
        let merged = merged_parents(&live, ours);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0]["controllerName"], "example.com/gateway");
        let e = &merged[1];
        assert_eq!(
            e["parentRef"],
            json!({"group": "", "kind": "Service", "name": "echo", "port": 80})
        );
        assert_eq!(e["conditions"][0]["type"], "Accepted");
        assert_eq!(e["conditions"][0]["status"], "True");
        assert_eq!(e["conditions"][1]["reason"], "BackendNotFound");
        assert_eq!(e["conditions"][1]["observedGeneration"], 2);
    }

    #[test]
    fn a_stale_route_is_not_accepted_and_says_why() {
        let stale = Stale {
            generation: Some(3),
            errors: vec![weft_proto::validate::FieldError {
                field: "spec.rules[0].filters[0].type".into(),
                message: "ExtensionRef filters are not supported by weft".into(),
            }],
        };
        let ours = weft_parents(&st(), Some(&stale), "t");
        let a = &ours[0]["conditions"][0];
        assert_eq!(a["status"], "False");
        assert_eq!(a["reason"], "UnsupportedValue");
        assert_eq!(a["observedGeneration"], 3);
        assert!(
            a["message"].as_str().unwrap().contains("ExtensionRef"),
            "{a}"
        );
    }

    #[test]
    fn unchanged_conditions_keep_their_transition_time() {
        let live = json!({"status": {"parents": weft_parents(&st(), None, "then")}});
        let ours = keep_transition_times(&live, weft_parents(&st(), None, "now"));
        assert_eq!(ours[0]["conditions"][0]["lastTransitionTime"], "then");
    }
}
