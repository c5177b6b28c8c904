//! The parsers that read untrusted bytes, for the fuzz targets in `fuzz/` (feature
//! `fuzzing`; never in the shipped binaries): HTTP/1 request and response heads
//! ([`h1`]), the body scanner that finds where a chunked body ends ([`body`]), the
//! protocol sniffing that tells HTTP/1, h2c and opaque traffic apart ([`sniff`]),
//! the Proxy-Wasm host that runs plugins ([`wasm`]),
//! and the CNI plugin's handling of its environment and stdin ([`cni_run`]) with a
//! stand-in for the node agent.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;

pub use crate::fields::Fields;
pub use crate::proxy::l7::http::RequestMessage;

/// HTTP/1.x message heads: parsing, the checks a proxy makes, canonical writing.
pub mod h1 {
    pub use crate::proxy::l7::h1::head::{
        parse_request, parse_response, write_request, write_response, HeadError, Request,
        RequestHead, Response, ResponseHead, Spare, Target, MAX_FIELDS, MAX_HEAD,
    };
}

/// Message bodies: framing and the strict scanner.
pub mod body {
    pub use crate::proxy::l7::h1::body::{BodyError, Framing, Scanner};
}

/// Protocol detection from a connection's first bytes.
pub mod sniff {
    pub use crate::proxy::sniff::{classify, sniff, Protocol, Rewind, H2_PREFACE};
}

/// The Proxy-Wasm host: a plugin and the request state its callbacks see.
pub mod wasm {
    pub use crate::wasm::abi::{ConnProps, HttpState, MAX_BODY_BYTES};
    pub use crate::wasm::engine::WasmEngine;
    pub use crate::wasm::headers::Headers;
    pub use crate::wasm::plugin::{Outcome, Plugin};
    pub use crate::wasm::shared::Shared;
}

/// What the stand-in agent of [`cni_run`] does.
#[derive(Debug, Clone)]
pub enum FakeAgent {
    /// The agent answers with `ok` and `error`.
    Answers { ok: bool, error: String },
    /// The agent cannot be reached (or answered garbage); `enrolled_pods` is the
    /// hint file's list of pods that must be in the mesh, `outside_namespaces` its
    /// namespaces known to be outside the mesh.
    Unreachable {
        enrolled_pods: Vec<String>,
        outside_namespaces: Vec<String>,
    },
}

/// What the agent was asked, as it saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Asked {
    /// `ADD`, `DEL` or `CHECK`.
    pub command: String,
    pub container_id: String,
    pub netns: String,
    /// `namespace/name`.
    pub pod: String,
    pub ips: Vec<String>,
    /// The socket the plugin would have dialled.
    pub socket: String,
}

/// The plugin's answer, and what the agent was asked (nothing: it was not).
#[derive(Debug, Clone)]
pub struct CniOutcome {
    pub stdout: String,
    pub exit_code: i32,
    pub asked: Option<Asked>,
}

struct Stand {
    fake: FakeAgent,
    asked: RefCell<Option<Asked>>,
}

impl crate::cni::plugin::Agent for Stand {
    fn ask(
        &self,
        socket: &Path,
        req: &crate::cni::protocol::Request,
    ) -> Result<crate::cni::protocol::Response, String> {
        let command = serde_json::to_value(&req.command)
            .ok()
            .and_then(|v| v.as_str().map(str::to_owned))
            .unwrap_or_default();
        let s = &req.sandbox;
        *self.asked.borrow_mut() = Some(Asked {
            command,
            container_id: s.container_id.clone(),
            netns: s.netns.clone(),
            pod: format!("{}/{}", s.pod_namespace, s.pod_name),
            ips: s.ips.clone(),
            socket: socket.display().to_string(),
        });
        match &self.fake {
            FakeAgent::Answers { ok, error } => Ok(crate::cni::protocol::Response {
                ok: *ok,
                enrolled: *ok,
                error: error.clone(),
            }),
            FakeAgent::Unreachable { .. } => Err(format!(
                "connecting to {}: no such file or directory",
                socket.display()
            )),
        }
    }

    fn hint(&self, _socket: &Path) -> Option<crate::cni::protocol::EnrollmentHint> {
        match &self.fake {
            FakeAgent::Unreachable {
                enrolled_pods,
                outside_namespaces,
            } => Some(crate::cni::protocol::EnrollmentHint {
                enrolled_pods: enrolled_pods.clone(),
                namespaces: outside_namespaces
                    .iter()
                    .map(|n| (n.clone(), false))
                    .collect(),
            }),
            FakeAgent::Answers { .. } => None,
        }
    }
}

/// Runs the CNI plugin on `env` and `stdin`, with `agent` standing in for the node
/// agent (no socket is dialled, no file read).
pub fn cni_run(env: &HashMap<String, String>, stdin: &str, agent: FakeAgent) -> CniOutcome {
    let stand = Stand {
        fake: agent,
        asked: RefCell::new(None),
    };
    let out = crate::cni::plugin::run_with(env, stdin, &stand);
    CniOutcome {
        stdout: out.stdout,
        exit_code: out.exit_code,
        asked: stand.asked.into_inner(),
    }
}

/// The CNI versions the plugin supports.
pub const CNI_VERSIONS: &[&str] = crate::cni::plugin::SUPPORTED_VERSIONS;
