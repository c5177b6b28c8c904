//! Working inside a pod's network namespace while the agent stays in the node's.
//! A [`PodNetns`] owns one thread that entered the pod's netns with `setns()`; it
//! creates sockets there (listeners, upstream sockets) and hands them back. A
//! socket keeps the namespace it was created in, so the rest of the agent uses it
//! from any thread.

#![allow(unsafe_code)] // system calls the std library does not wrap (see the `SAFETY` notes)

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::sync::mpsc;

type Job = Box<dyn FnOnce() + Send>;

pub struct PodNetns {
    path: PathBuf,
    /// The namespace's inode, taken from the file opened at `open`: what a process
    /// in it shows in `/proc/<pid>/ns/net` (the Workload API attests by it). Read
    /// once, so a path that later names another namespace (a reused pid) changes
    /// nothing.
    inode: u64,
    jobs: mpsc::Sender<Job>,
}

impl PodNetns {
    /// Starts a worker thread inside the network namespace at `path`
    /// (e.g. /var/run/netns/<name> or /proc/<pid>/ns/net).
    pub fn open(path: impl Into<PathBuf>) -> io::Result<Self> {
        let path = path.into();
        let file = std::fs::File::open(&path)?;
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata()?);
        let (jobs, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<io::Result<()>>();
        std::thread::Builder::new()
            .name("weft-netns".into())
            .spawn(move || {
                let entered = nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                    .map_err(io::Error::from);
                let ok = entered.is_ok();
                let _ = ready_tx.send(entered);
                if ok {
                    while let Ok(job) = rx.recv() {
                        job();
                    }
                }
            })?;
        ready_rx
            .recv()
            .map_err(|_| io::Error::other("netns worker died"))?
            .map_err(|e| io::Error::new(e.kind(), format!("entering {}: {e}", path.display())))?;
        Ok(Self { path, inode, jobs })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The namespace's inode (see the field).
    pub fn inode(&self) -> u64 {
        self.inode
    }

    /// Runs `f` inside the namespace and waits for its result.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> io::Result<T> {
        let (tx, rx) = mpsc::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker gone"))?;
        rx.recv().map_err(|_| io::Error::other("netns worker gone"))
    }

    /// Like [`run`](Self::run), without blocking the async runtime.
    pub async fn run_async<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> io::Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| io::Error::other("netns worker gone"))?;
        rx.await.map_err(|_| io::Error::other("netns worker gone"))
    }

    /// The namespace's cookie, as `bpf_get_netns_cookie()` reports it.
    pub fn cookie(&self) -> io::Result<u64> {
        self.run(|| {
            let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)?;
            netns_cookie_of(&s)
        })?
    }

    /// A listening TCP socket bound inside the namespace (see [`shared_listener`]).
    pub fn listen(&self, addr: SocketAddr) -> io::Result<std::net::TcpListener> {
        self.run(move || shared_listener(addr))?
    }

    /// Lets connections waiting in a closing listener's queue move to another
    /// listener of the same port (`net.ipv4.tcp_migrate_req`, Linux >= 5.14), so a
    /// draining agent's pending connections go to its successor instead of being
    /// reset.
    pub fn enable_listener_migration(&self) -> io::Result<()> {
        self.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1"))?
    }

    /// An unconnected TCP socket created inside the namespace, carrying `mark`.
    pub async fn tcp_socket(&self, v6: bool, mark: u32) -> io::Result<socket2::Socket> {
        self.run_async(move || {
            let domain = if v6 {
                socket2::Domain::IPV6
            } else {
                socket2::Domain::IPV4
            };
            let s = socket2::Socket::new(domain, socket2::Type::STREAM, None)?;
            if mark != 0 {
                s.set_mark(mark)?;
            }
            s.set_tcp_nodelay(true)?;
            s.set_nonblocking(true)?;
            Ok(s)
        })
        .await?
    }
}

/// A non-blocking listening TCP socket on `addr` in the calling thread's network
/// namespace, which another process may bind too (`SO_REUSEPORT`): a successor
/// agent binds the same ports while this one drains (docs/kubernetes.md,
/// "Upgrades").
pub fn shared_listener(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let s = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        None,
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.bind(&addr.into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

const SO_NETNS_COOKIE: libc::c_int = 71;

/// `getsockopt(SO_NETNS_COOKIE)` of a socket.
pub fn netns_cookie_of(s: &impl std::os::fd::AsRawFd) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: valid fd, out-pointer and length of a u64.
    let rc = unsafe {
        libc::getsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}
