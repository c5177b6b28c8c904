//! The kernel's side of attestation: the peer pid of each accepted connection
//! (`SO_PEERCRED`), turned into a [`Caller`] by the [`Provider`] once per
//! connection and carried into every request of that connection as [`ConnInfo`].
//! Also the connection bounds (in total and per pod).

use super::{Caller, Limits, Provider};
use futures::Stream;
use std::collections::HashMap;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tonic::transport::server::Connected;

/// The inode of the network namespace of process `pid` (`/proc/<pid>/ns/net`):
/// equal for all processes of one pod, so [`Provider::attest`] can map a pid to
/// its pod. Only meaningful for a pid of the caller's pid namespace.
pub fn netns_inode(pid: i32) -> io::Result<u64> {
    if pid <= 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("not a process id: {pid}"),
        ));
    }
    Ok(std::fs::metadata(format!("/proc/{pid}/ns/net"))?.ino())
}

/// What the server knows of a connection, in each request's extensions.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    /// The peer's pid from `SO_PEERCRED`; `None` if the kernel gave none (a
    /// process of a pid namespace the agent cannot see).
    pub pid: Option<i32>,
    /// The peer's identity; `None`: not attested.
    pub caller: Option<Arc<Caller>>,
}

/// Bucket of connections that no provider attested, for the per-pod bound.
const UNATTESTED: &str = "";

/// Open connections per pod.
type PodCounts = Arc<Mutex<HashMap<String, usize>>>;

/// A connection's place under the bounds, given back when it closes.
struct Slot {
    _global: OwnedSemaphorePermit,
    pods: PodCounts,
    pod: String,
}

impl Slot {
    fn take(global: &Arc<Semaphore>, pods: &PodCounts, pod: &str, per_pod: usize) -> Option<Self> {
        let permit = global.clone().try_acquire_owned().ok()?;
        let mut counts = pods.lock().unwrap_or_else(|p| p.into_inner());
        let n = counts.entry(pod.to_string()).or_insert(0);
        if *n >= per_pod {
            return None;
        }
        *n += 1;
        Some(Self {
            _global: permit,
            pods: pods.clone(),
            pod: pod.to_string(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut counts = self.pods.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = counts.get_mut(&self.pod) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                counts.remove(&self.pod);
            }
        }
    }
}

/// An accepted, attested connection.
pub(super) struct AttestedConn {
    stream: UnixStream,
    info: ConnInfo,
    _slot: Slot,
}

impl Connected for AttestedConn {
    type ConnectInfo = ConnInfo;

    fn connect_info(&self) -> ConnInfo {
        self.info.clone()
    }
}

impl AsyncRead for AttestedConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for AttestedConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

struct Acceptor {
    listener: UnixListener,
    provider: Arc<dyn Provider>,
    global: Arc<Semaphore>,
    pods: PodCounts,
    per_pod: usize,
}

impl Acceptor {
    /// The next connection within the bounds. Accept errors (out of file
    /// descriptors, ...) are logged and retried after a pause, not returned:
    /// the server would only retry at once.
    async fn next(&self) -> AttestedConn {
        loop {
            let stream = match self.listener.accept().await {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!(error = %e, "Workload API: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let pid = stream
                .peer_cred()
                .ok()
                .and_then(|c| c.pid())
                .filter(|p| *p > 0);
            let caller = match pid {
                Some(pid) => {
                    let provider = self.provider.clone();
                    tokio::task::spawn_blocking(move || provider.attest(pid))
                        .await
                        .ok()
                        .flatten()
                        .map(Arc::new)
                }
                None => None,
            };
            let pod = caller.as_ref().map_or(UNATTESTED, |c| c.pod.as_str());
            let Some(slot) = Slot::take(&self.global, &self.pods, pod, self.per_pod) else {
                tracing::warn!(?pid, pod, "Workload API: connection limit reached, closing");
                continue;
            };
            match &caller {
                Some(c) => {
                    tracing::debug!(?pid, pod = %c.pod, spiffe_id = %c.spiffe_id, "Workload API: caller attested")
                }
                None => tracing::debug!(?pid, "Workload API: caller not attested"),
            }
            return AttestedConn {
                stream,
                info: ConnInfo { pid, caller },
                _slot: slot,
            };
        }
    }
}

/// The accepted connections of `listener`, attested and within `limits`.
pub(super) fn incoming(
    listener: UnixListener,
    provider: Arc<dyn Provider>,
    limits: &Limits,
) -> impl Stream<Item = Result<AttestedConn, io::Error>> + Send + 'static {
    let acceptor = Acceptor {
        listener,
        provider,
        global: Arc::new(Semaphore::new(limits.max_connections)),
        pods: PodCounts::default(),
        per_pod: limits.max_connections_per_pod,
    };
    futures::stream::unfold(acceptor, |acceptor| async move {
        let conn = acceptor.next().await;
        Some((Ok(conn), acceptor))
    })
}
