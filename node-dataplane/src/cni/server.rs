//! The agent's CNI socket: records sandboxes in the [`PodRegistry`] and answers an
//! ADD only once it knows the pod's fate: outside the mesh, or enrolled with its
//! capture in place. A pod whose capture is not in place within [`ADD_WAIT`], or
//! whose workload the control plane has not described, is refused (kubelet retries
//! the sandbox), so an enrolled pod's app never runs before it is enforced.

use super::protocol::{Command, Request, Response, Sandbox};
use super::registry::PodRegistry;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;
use tokio::sync::watch;

/// How long an ADD waits for the pod's workload and, if it is enrolled, for its
/// capture to be in place.
pub const ADD_WAIT: Duration = Duration::from_secs(15);

/// A request is one line of JSON; anything longer is not the plugin's.
const MAX_REQUEST_BYTES: u64 = 64 << 10;

/// What the agent knows of a sandbox's pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PodState {
    /// The control plane has not described the pod (yet).
    Unknown,
    /// The pod is not in the mesh.
    Outside,
    /// The pod is enrolled; its capture is not in place yet.
    Pending,
    /// The pod is enrolled and its traffic is captured.
    Captured,
}

/// The pods' side of enrollment, as the CNI socket asks it ([`crate::pods::PodManager`]).
pub trait Enrollment: Send + Sync {
    fn state(&self, sandbox: &Sandbox) -> PodState;
    /// Whether new pods of `namespace` are enrolled, from the last view the agent
    /// had in sync with the control plane (`None`: not known).
    fn namespace_enrolled(&self, namespace: &str) -> Option<bool>;
    /// Changes whenever [`Enrollment::state`] may have changed.
    fn changes(&self) -> watch::Receiver<u64>;
}

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

pub async fn serve(
    listener: UnixListener,
    registry: Arc<PodRegistry>,
    enrollment: Arc<dyn Enrollment>,
    wait: Duration,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let enrollment = enrollment.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r.take(MAX_REQUEST_BYTES))
                .read_line(&mut line)
                .await
                .is_err()
            {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(&registry, enrollment.as_ref(), req, wait).await,
                Err(e) => Response {
                    ok: false,
                    enrolled: false,
                    error: format!("bad request: {e}"),
                },
            };
            let mut out = serde_json::to_string(&resp).unwrap_or_default();
            out.push('\n');
            let _ = w.write_all(out.as_bytes()).await;
        });
    }
}

fn refuse(enrolled: bool, error: String) -> Response {
    Response {
        ok: false,
        enrolled,
        error,
    }
}

pub async fn handle(
    registry: &PodRegistry,
    enrollment: &dyn Enrollment,
    req: Request,
    wait: Duration,
) -> Response {
    let s = req.sandbox;
    let pod = format!("{}/{}", s.pod_namespace, s.pod_name);
    let ok = |enrolled| Response {
        ok: true,
        enrolled,
        error: String::new(),
    };
    match req.command {
        Command::Add => {
            if !Path::new(&s.netns).exists() {
                return refuse(
                    false,
                    format!("network namespace {} does not exist", s.netns),
                );
            }
            tracing::info!(pod = %pod, netns = %s.netns, ips = ?s.ips, "CNI ADD");
            // Subscribed before the sandbox is recorded, so the enrollment it
            // triggers is never missed.
            let mut changes = enrollment.changes();
            registry.add(s.clone());
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match enrollment.state(&s) {
                    PodState::Captured => return ok(true),
                    PodState::Outside => return ok(false),
                    PodState::Pending | PodState::Unknown => {}
                }
                let changed = tokio::time::timeout_at(deadline, changes.changed()).await;
                if !matches!(changed, Ok(Ok(()))) {
                    break;
                }
            }
            match enrollment.state(&s) {
                PodState::Captured => ok(true),
                PodState::Outside => ok(false),
                PodState::Pending => {
                    tracing::warn!(pod = %pod, "CNI ADD refused: the pod's capture is not in place yet");
                    refuse(
                        true,
                        format!("pod {pod} is in the mesh and its capture was not in place within {wait:?} (see the node agent's log)"),
                    )
                }
                PodState::Unknown => match enrollment.namespace_enrolled(&s.pod_namespace) {
                    Some(false) => {
                        tracing::info!(pod = %pod, "CNI ADD: pod not described by the control plane yet; its namespace is outside the mesh");
                        ok(false)
                    }
                    known => {
                        tracing::warn!(pod = %pod, namespace_enrolled = ?known, "CNI ADD refused: the control plane has not described the pod");
                        refuse(
                            known.unwrap_or(false),
                            format!("the node agent does not know pod {pod} yet (is it in sync with the control plane?); its namespace {}", match known {
                                Some(_) => "is in the mesh",
                                None => "is not known to be outside the mesh",
                            }),
                        )
                    }
                },
            }
        }
        Command::Del => {
            tracing::info!(container = %s.container_id, "CNI DEL");
            registry.deleted(&s.container_id);
            ok(false)
        }
        Command::Check => {
            let state = enrollment.state(&s);
            if matches!(state, PodState::Pending | PodState::Captured)
                && registry.get(&s.container_id).is_none()
            {
                return refuse(true, "the agent has no record of this sandbox".into());
            }
            ok(state == PodState::Captured)
        }
    }
}

#[cfg(test)]
mod tests;
