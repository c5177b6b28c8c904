//! Child processes that are killed (by PID, only ours) when dropped, and small helpers.

use anyhow::{bail, Context};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Pins every thread of each process to one CPU (`taskset -a`), or back to all
/// CPUs with `None`. Benchmarks use it to run a whole round trip on one core.
pub fn pin_cpu(pids: &[u32], cpu: Option<usize>) {
    let mask = cpu
        .map(|c| c.to_string())
        .unwrap_or_else(|| "0-1023".into());
    for pid in pids {
        let _ = Command::new("taskset")
            .args(["-a", "-p", "-c", &mask, &pid.to_string()])
            .output();
    }
}

/// The numeric fields of `/proc/<pid>/stat` after the command name (which may
/// contain spaces): index 0 is the state field (the 3rd in proc(5)'s numbering),
/// which does not parse and reads as 0.
fn stat_fields(pid: u32) -> Vec<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.rsplit(')')
        .next()
        .unwrap_or("")
        .split_whitespace()
        .map(|v| v.parse().unwrap_or(0))
        .collect()
}

/// The sum over `pids` of the `/proc/<pid>/stat` fields `fields` (proc(5)'s
/// numbering, 3 or more), each process's read once.
fn stat_sum(pids: &[u32], fields: &[usize]) -> u64 {
    pids.iter()
        .map(|&pid| {
            let values = stat_fields(pid);
            fields
                .iter()
                .map(|&n| values.get(n - 3).copied().unwrap_or(0))
                .sum::<u64>()
        })
        .sum()
}

/// CPU time (user + system, nanoseconds) of the given processes, threads that have
/// exited included (`/proc/<pid>/stat`, in 10 ms ticks). Benchmarks divide its growth
/// over a run of a few seconds by the work done: a figure that the host's
/// scheduling noise moves much less than latency.
pub fn cpu_ns(pids: &[u32]) -> u64 {
    // USER_HZ, the unit of /proc/<pid>/stat's times, is 100 on Linux.
    const NS_PER_TICK: u64 = 10_000_000;
    // utime and stime are fields 14 and 15.
    stat_sum(pids, &[14, 15]) * NS_PER_TICK
}

/// Minor page faults of the given processes so far (field 10 of `/proc/<pid>/stat`):
/// memory the allocator gave back to the kernel and touches again shows up here.
pub fn minor_faults(pids: &[u32]) -> u64 {
    stat_sum(pids, &[10])
}

/// An example Wasm plugin built by `make plugins` (`target/plugins/<name>.wasm`).
pub fn plugin_path(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join("plugins").join(format!("{name}.wasm"));
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("plugin {name}.wasm not found under the target directory; build it first: make plugins (make test does)")
}

/// Path of a workspace binary. `WEFT_BIN_DIR` overrides; otherwise the target
/// directory of the running executable (tests live in target/<profile>/deps).
pub fn bin_path(name: &str) -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("WEFT_BIN_DIR") {
        return Ok(Path::new(&dir).join(name));
    }
    let exe = std::env::current_exe()?;
    for dir in exe.ancestors().skip(1).take(2) {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!(
        "binary {name} not found next to {}; build it first: cargo build --workspace --bins (make test does)",
        exe.display()
    )
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A child process, killed on drop. Its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log: &Path) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .env(
                "RUST_LOG",
                std::env::var("WEFT_TEST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        Ok(Self {
            name: name.to_string(),
            child,
            log: log.to_path_buf(),
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait (up to 5 s, then SIGKILL): lets the process flush.
    pub fn terminate(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Polls `f` every 20 ms until it returns `Some` or `timeout` passes.
pub fn wait_until<T>(timeout: Duration, f: impl FnMut() -> Option<T>) -> Option<T> {
    poll_every(Duration::from_millis(20), timeout, f)
}

/// Calls `f` every `interval` until it returns `Some` or `timeout` passes.
pub fn poll_every<T>(
    interval: Duration,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> Option<T> {
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        std::thread::sleep(interval);
    }
}

/// GET http://<addr><path>; returns (status, body).
pub fn http_get(addr: &str, path: &str) -> anyhow::Result<(u16, String)> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .http_status_as_error(false)
        .build()
        .into();
    let mut resp = agent.get(&format!("http://{addr}{path}")).call()?;
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string()?;
    Ok((status, body))
}

/// A node agent's `/config_dump` from its admin address.
pub fn fetch_config_dump(admin: &str, node: &str) -> anyhow::Result<serde_json::Value> {
    let (status, body) = http_get(admin, "/config_dump")?;
    if status != 200 {
        bail!("config_dump of {node}: HTTP {status}");
    }
    Ok(serde_json::from_str(&body)?)
}

/// Polls a node's config dump until `f` holds; on timeout the error carries `logs()`.
pub fn wait_config_dump(
    admin: &str,
    node: &str,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&serde_json::Value) -> bool,
    logs: impl FnOnce() -> String,
) -> anyhow::Result<serde_json::Value> {
    wait_until(timeout, || {
        fetch_config_dump(admin, node).ok().filter(|d| f(d))
    })
    .with_context(|| {
        format!(
            "node {node}: {what} did not happen within {timeout:?}\n{}",
            logs()
        )
    })
}
