//! The agent's CNI socket: records sandboxes in the [`PodRegistry`] and answers
//! whether the pod will be captured.

use super::protocol::{Command, Request, Response};
use super::registry::PodRegistry;
use std::path::Path;
use std::sync::Arc;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixListener;

/// Decides whether a sandbox's pod is enrolled (from the node's config).
pub type EnrolledFn = Arc<dyn Fn(&str, &str) -> bool + Send + Sync>;

pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let _ = std::fs::remove_file(path);
    UnixListener::bind(path)
}

pub async fn serve(listener: UnixListener, registry: Arc<PodRegistry>, enrolled: EnrolledFn) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let registry = registry.clone();
        let enrolled = enrolled.clone();
        tokio::spawn(async move {
            let (r, mut w) = stream.into_split();
            let mut line = String::new();
            if BufReader::new(r).read_line(&mut line).await.is_err() {
                return;
            }
            let resp = match serde_json::from_str::<Request>(&line) {
                Ok(req) => handle(&registry, &enrolled, req),
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

fn handle(registry: &PodRegistry, enrolled: &EnrolledFn, req: Request) -> Response {
    let s = req.sandbox;
    let is_enrolled = enrolled(&s.pod_namespace, &s.pod_name);
    match req.command {
        Command::Add => {
            if !Path::new(&s.netns).exists() {
                return Response {
                    ok: false,
                    enrolled: is_enrolled,
                    error: format!("network namespace {} does not exist", s.netns),
                };
            }
            tracing::info!(pod = %format!("{}/{}", s.pod_namespace, s.pod_name), netns = %s.netns, ips = ?s.ips, enrolled = is_enrolled, "CNI ADD");
            registry.add(s);
        }
        Command::Del => {
            tracing::info!(container = %s.container_id, "CNI DEL");
            registry.deleted(&s.container_id);
        }
        Command::Check => {
            if is_enrolled && registry.get(&s.container_id).is_none() {
                return Response {
                    ok: false,
                    enrolled: true,
                    error: "the agent has no record of this sandbox".into(),
                };
            }
        }
    }
    Response {
        ok: true,
        enrolled: is_enrolled,
        error: String::new(),
    }
}
