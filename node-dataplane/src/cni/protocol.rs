//! Messages between `weft-cni` and the node agent: one JSON object per line each way.

use serde::{Deserialize, Serialize};

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

/// Pods the agent knows must be enrolled, written for the plugin to consult when
/// the agent cannot be reached (file `enrollment.json` next to the socket).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollmentHint {
    /// `namespace/name` of enrolled pods scheduled on this node.
    pub enrolled_pods: Vec<String>,
}
