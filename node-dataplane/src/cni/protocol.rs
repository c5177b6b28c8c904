//! Messages between `weft-cni` and the node agent: one JSON object per line each way.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Command {
    Add,
    Del,
    Check,
}

/// A pod sandbox as the runtime describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sandbox {
    pub container_id: String,
    pub netns: String,
    pub ifname: String,
    pub pod_namespace: String,
    pub pod_name: String,
    pub pod_uid: String,
    pub ips: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    pub command: Command,
    pub sandbox: Sandbox,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    /// Whether the agent will capture this pod.
    #[serde(default)]
    pub enrolled: bool,
    #[serde(default)]
    pub error: String,
}

/// What the agent last knew of enrollment on this node, written (file
/// `enrollment.json` next to the socket) for the plugin to consult when the agent
/// cannot be reached. Written only while the agent is in sync with the control
/// plane, so an agent that restarted and has not synced yet never weakens it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentHint {
    /// `namespace/name` of enrolled pods scheduled on this node.
    pub enrolled_pods: Vec<String>,
    /// Namespaces whose new pods are enrolled (`true`) or stay outside the mesh
    /// (`false`), as far as the agent could tell from the workloads it knew.
    #[serde(default)]
    pub namespaces: BTreeMap<String, bool>,
}

/// Whether a pod must be in the mesh, from what the agent last knew.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HintDecision {
    /// The pod, or every new pod of its namespace, is enrolled.
    MustEnroll,
    /// Its namespace is known to be outside the mesh.
    Outside,
    /// Nothing is known of it (a new namespace, or no hint at all).
    Unknown,
}

impl EnrollmentHint {
    pub fn decide(&self, namespace: &str, name: &str) -> HintDecision {
        let pod = format!("{namespace}/{name}");
        let enrolled = self.enrolled_pods.contains(&pod);
        match (enrolled, self.namespaces.get(namespace)) {
            (true, _) | (false, Some(true)) => HintDecision::MustEnroll,
            (false, Some(false)) => HintDecision::Outside,
            (false, None) => HintDecision::Unknown,
        }
    }
}
