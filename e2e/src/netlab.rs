//! Network namespaces, veths and processes for privileged tests. Everything created
//! is recorded and removed on drop, also when a test fails.

use anyhow::{bail, Context};
use std::process::{Child, Command, Stdio};

/// Fails (never skips) when not root: privileged tests must run in CI.
pub fn require_root() {
    assert!(
        nix::unistd::Uid::effective().is_root(),
        "this test needs root (CAP_NET_ADMIN, CAP_BPF, CAP_SYS_ADMIN); CI runs as root"
    );
}

/// Runs `ip` (iproute2) with `args`, failing with its stderr.
pub(crate) fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub struct Lab {
    prefix: String,
    netns: Vec<String>,
    children: Vec<Child>,
}

impl Lab {
    /// `tag` keeps names unique per test (names are short: veth names <= 15 chars).
    pub fn new(tag: &str) -> Self {
        let prefix = format!("wt{}{}", tag, std::process::id() % 10000);
        Self {
            prefix,
            netns: Vec::new(),
            children: Vec::new(),
        }
    }

    pub fn netns(&mut self, name: &str) -> anyhow::Result<String> {
        let full = format!("{}-{name}", self.prefix);
        let _ = ip(&["netns", "del", &full]);
        ip(&["netns", "add", &full])?;
        self.netns.push(full.clone());
        ip(&["-n", &full, "link", "set", "lo", "up"])?;
        Ok(full)
    }

    pub fn netns_path(name: &str) -> String {
        format!("/var/run/netns/{name}")
    }

    /// A veth pair between two namespaces with the given CIDR addresses.
    pub fn link(&mut self, a: &str, a_addr: &str, b: &str, b_addr: &str) -> anyhow::Result<()> {
        let n = self.netns.len();
        let va = format!("{}a{n}", self.prefix);
        let vb = format!("{}b{n}", self.prefix);
        ip(&[
            "link", "add", &va, "netns", a, "type", "veth", "peer", "name", &vb, "netns", b,
        ])?;
        ip(&["-n", a, "addr", "add", a_addr, "dev", &va])?;
        ip(&["-n", b, "addr", "add", b_addr, "dev", &vb])?;
        ip(&["-n", a, "link", "set", &va, "up"])?;
        ip(&["-n", b, "link", "set", &vb, "up"])?;
        Ok(())
    }

    /// Adds an IPv6 address to the `n`-th link's ends (no duplicate address detection,
    /// so it is usable at once).
    pub fn add_ipv6(
        &mut self,
        n: usize,
        a: &str,
        a_addr: &str,
        b: &str,
        b_addr: &str,
    ) -> anyhow::Result<()> {
        let va = format!("{}a{n}", self.prefix);
        let vb = format!("{}b{n}", self.prefix);
        ip(&["-n", a, "addr", "add", a_addr, "dev", &va, "nodad"])?;
        ip(&["-n", b, "addr", "add", b_addr, "dev", &vb, "nodad"])?;
        Ok(())
    }

    /// Starts `cmd` inside network namespace `ns` (via nsenter), killed on drop.
    pub fn spawn_in(
        &mut self,
        ns: &str,
        program: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<usize> {
        let child = Command::new("nsenter")
            .arg(format!("--net={}", Self::netns_path(ns)))
            .arg("--")
            .arg(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {} in {ns}", program.display()))?;
        self.children.push(child);
        Ok(self.children.len() - 1)
    }

    /// Runs `program` in `ns` to completion: (success, stdout, stderr).
    pub fn run_in(
        ns: &str,
        program: &std::path::Path,
        args: &[&str],
    ) -> anyhow::Result<(bool, String, String)> {
        let out = Command::new("nsenter")
            .arg(format!("--net={}", Self::netns_path(ns)))
            .arg("--")
            .arg(program)
            .args(args)
            .output()
            .with_context(|| format!("running {} in {ns}", program.display()))?;
        Ok((
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        ))
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        // Deleting a namespace removes the veth ends inside it.
        for n in self.netns.drain(..) {
            let _ = ip(&["netns", "del", &n]);
        }
    }
}

/// A bpffs instance of the test's own (mounted in a temporary directory), so tests
/// never mount or leave anything in the host's /sys/fs/bpf. Unmounted on drop.
pub struct PrivateBpffs {
    dir: tempfile::TempDir,
}

impl PrivateBpffs {
    pub fn new() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new().prefix("weft-bpffs-").tempdir()?;
        nix::mount::mount(
            Some("bpf"),
            dir.path(),
            Some("bpf"),
            nix::mount::MsFlags::empty(),
            None::<&str>,
        )
        .context("mounting a private bpffs")?;
        Ok(Self { dir })
    }

    pub fn path(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for PrivateBpffs {
    fn drop(&mut self) {
        if let Err(e) = nix::mount::umount2(self.dir.path(), nix::mount::MntFlags::MNT_DETACH) {
            eprintln!("cleanup: unmounting {}: {e}", self.dir.path().display());
        }
    }
}
