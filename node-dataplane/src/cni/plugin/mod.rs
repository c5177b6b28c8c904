//! CNI 1.0 plugin logic (ADD, DEL, CHECK, VERSION), separated from process I/O so it
//! can be tested: [`run`] takes the environment and stdin and returns what to print
//! and the exit code; [`run_with`] does the same with the node agent behind an
//! [`Agent`] (the fuzz target's stands in for the socket).

use super::protocol::{Command, EnrollmentHint, HintDecision, Request, Response, Sandbox};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const SUPPORTED_VERSIONS: &[&str] = &["0.3.0", "0.3.1", "0.4.0", "1.0.0"];
pub const DEFAULT_SOCKET: &str = "/var/run/weft/cni.sock";
/// How long the plugin waits for the agent's answer: longer than the agent waits
/// for a new pod's capture to be in place ([`super::server::ADD_WAIT`]).
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(25);
/// The enrollment hint is small; a bigger file is not the agent's.
const MAX_HINT_BYTES: u64 = 16 << 20;

/// CNI error codes (spec 1.0).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const INVALID_ENV: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
}

pub struct Outcome {
    pub stdout: String,
    pub exit_code: i32,
}

fn error(version: &str, code: u32, msg: &str, details: &str) -> Outcome {
    Outcome {
        stdout: json!({"cniVersion": version, "code": code, "msg": msg, "details": details})
            .to_string(),
        exit_code: 1,
    }
}

/// How the plugin reaches the node agent: over its unix socket ([`SocketAgent`]).
pub trait Agent {
    /// Sends `req` to the agent at `socket` and returns its answer.
    fn ask(&self, socket: &Path, req: &Request) -> Result<Response, String>;
    /// With the agent unreachable: what it last knew of enrollment (the hint file
    /// next to `socket`), if anything.
    fn hint(&self, socket: &Path) -> Option<EnrollmentHint>;
}

/// The node agent behind its unix socket, and the enrollment hint beside it.
pub struct SocketAgent;

impl Agent for SocketAgent {
    fn ask(&self, socket: &Path, req: &Request) -> Result<Response, String> {
        ask_agent(socket, req)
    }

    fn hint(&self, socket: &Path) -> Option<EnrollmentHint> {
        hint(socket)
    }
}

/// Runs one plugin invocation.
pub fn run(env: &HashMap<String, String>, stdin: &str) -> Outcome {
    run_with(env, stdin, &SocketAgent)
}

/// [`run`] with the agent reached through `agent`.
pub fn run_with(env: &HashMap<String, String>, stdin: &str, agent: &dyn Agent) -> Outcome {
    let command = env.get("CNI_COMMAND").map(String::as_str).unwrap_or("");
    if command == "VERSION" {
        return Outcome {
            stdout: json!({"cniVersion": "1.0.0", "supportedVersions": SUPPORTED_VERSIONS})
                .to_string(),
            exit_code: 0,
        };
    }
    let conf: Value = match serde_json::from_str(stdin) {
        Ok(v) => v,
        Err(e) => {
            return error(
                "1.0.0",
                code::DECODE,
                "cannot decode the network configuration on stdin",
                &e.to_string(),
            )
        }
    };
    let version = conf
        .get("cniVersion")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return error(
            "1.0.0",
            code::INCOMPATIBLE_VERSION,
            &format!("cniVersion {version:?} is not supported"),
            &format!("supported: {}", SUPPORTED_VERSIONS.join(", ")),
        );
    }
    let cmd = match command {
        "ADD" => Command::Add,
        "DEL" => Command::Del,
        "CHECK" => Command::Check,
        other => {
            return error(
                &version,
                code::INVALID_ENV,
                &format!("unknown CNI_COMMAND {other:?}"),
                "",
            )
        }
    };
    let socket = conf
        .get("agentSocket")
        .and_then(Value::as_str)
        .unwrap_or(DEFAULT_SOCKET)
        .to_string();
    let prev = conf.get("prevResult").cloned();
    if cmd == Command::Add && prev.is_none() {
        return error(
            &version,
            code::INVALID_CONFIG,
            "weft-cni is a chained plugin: prevResult is missing",
            "put weft-cni after the network plugin in the conflist",
        );
    }
    if cmd == Command::Add && !prev.as_ref().is_some_and(Value::is_object) {
        return error(
            &version,
            code::INVALID_CONFIG,
            "prevResult is not a JSON object",
            "the previous plugin's result must be a CNI result object",
        );
    }
    let req_env = |k: &str| env.get(k).cloned().unwrap_or_default();
    let (container_id, netns) = (req_env("CNI_CONTAINERID"), req_env("CNI_NETNS"));
    if container_id.is_empty() {
        return error(
            &version,
            code::INVALID_ENV,
            "CNI_CONTAINERID is not set",
            "",
        );
    }
    if cmd != Command::Del && netns.is_empty() {
        return error(&version, code::INVALID_ENV, "CNI_NETNS is not set", "");
    }
    let args = parse_cni_args(&req_env("CNI_ARGS"));
    let sandbox = Sandbox {
        container_id,
        netns,
        ifname: req_env("CNI_IFNAME"),
        pod_namespace: args.get("K8S_POD_NAMESPACE").cloned().unwrap_or_default(),
        pod_name: args.get("K8S_POD_NAME").cloned().unwrap_or_default(),
        pod_uid: args.get("K8S_POD_UID").cloned().unwrap_or_default(),
        ips: prev.as_ref().map(ips_of).unwrap_or_default(),
    };
    let pod = format!("{}/{}", sandbox.pod_namespace, sandbox.pod_name);
    let (sandbox_ns, sandbox_name) = (sandbox.pod_namespace.clone(), sandbox.pod_name.clone());
    let result = agent.ask(
        Path::new(&socket),
        &Request {
            command: cmd.clone(),
            sandbox,
        },
    );
    let pass_through = || {
        let mut out = prev.clone().unwrap_or(json!({}));
        if let Some(o) = out.as_object_mut() {
            o.insert("cniVersion".into(), json!(version));
        }
        Outcome {
            stdout: out.to_string(),
            exit_code: 0,
        }
    };
    match (cmd, result) {
        // DEL must succeed even when the agent is gone (the runtime may retry forever otherwise).
        (Command::Del, _) => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        (Command::Add, Ok(r)) if r.ok => pass_through(),
        (Command::Check, Ok(r)) if r.ok => Outcome {
            stdout: String::new(),
            exit_code: 0,
        },
        (_, Ok(r)) => error(
            &version,
            code::IO_FAILURE,
            &format!("weft node agent refused pod {pod}"),
            &r.error,
        ),
        (c, Err(e)) => {
            // The agent is unreachable (down, restarting, not installed yet): only a
            // pod known to be outside the mesh may start; anything else waits for the
            // agent (kubelet retries the ADD), so no pod of an enrolled namespace runs
            // its app unenforced.
            let decision = agent
                .hint(Path::new(&socket))
                .map(|h| h.decide(&sandbox_ns, &sandbox_name))
                .unwrap_or(HintDecision::Unknown);
            match (c, decision) {
                (Command::Add, HintDecision::Outside) => pass_through(),
                (Command::Add, _) | (_, HintDecision::MustEnroll) => error(
                    &version,
                    code::TRY_AGAIN_LATER,
                    &format!(
                        "pod {pod} cannot start: the weft node agent is unreachable and the pod {}",
                        match decision {
                            HintDecision::MustEnroll => "must be in the mesh",
                            _ => "may have to be in the mesh (its namespace is not known to be outside it)",
                        }
                    ),
                    &e,
                ),
                _ => Outcome {
                    stdout: String::new(),
                    exit_code: 0,
                },
            }
        }
    }
}

/// `K=V;K=V` from CNI_ARGS.
pub fn parse_cni_args(s: &str) -> HashMap<String, String> {
    s.split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// IP addresses (without prefix length) from a CNI result.
pub fn ips_of(result: &Value) -> Vec<String> {
    result
        .get("ips")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .filter_map(|ip| ip.get("address").and_then(Value::as_str))
                .map(|a| a.split('/').next().unwrap_or(a).to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn ask_agent(socket: &Path, req: &Request) -> Result<Response, String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("connecting to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let mut line = serde_json::to_string(req).map_err(|e| e.to_string())?;
    line.push('\n');
    s.write_all(line.as_bytes()).map_err(|e| e.to_string())?;
    let mut resp = String::new();
    BufReader::new(s.take(64 << 10))
        .read_line(&mut resp)
        .map_err(|e| e.to_string())?;
    serde_json::from_str(&resp).map_err(|e| format!("bad answer from the agent: {e}"))
}

/// What the agent last knew of enrollment (`enrollment.json` next to its socket).
fn hint(socket: &Path) -> Option<EnrollmentHint> {
    let path = socket.with_file_name("enrollment.json");
    let mut text = String::new();
    std::fs::File::open(path)
        .ok()?
        .take(MAX_HINT_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

#[cfg(test)]
mod tests;
