//! What the cluster changes on the host, how it is undone, and how to list what
//! is left of it.
//!
//! Every name the cluster gives to host objects is fixed (a prefix and the node
//! number), so that a run that was killed before its teardown (SIGKILL, a
//! timeout) is found and cleaned by the next start or by `weft-kube-cluster
//! down`:
//!
//! - processes: every process the harness starts is placed, before it runs, in
//!   the cgroup2 group `weft-kube/daemons` (containerd's shims inherit it);
//!   containers are in the kubelets' cgroup root `weft-kube/<node>` of every
//!   hierarchy (v1 controllers and cgroup2). Teardown kills them by PID, read
//!   from those groups, then removes the groups.
//! - network: the bridge `weftkube0`, veths `weftk-<node>`, namespaces
//!   `weft-kube-<node>` (pods' namespaces live inside the nodes' mount namespaces).
//! - directories created as mount points for the nodes' private mounts.
//! - sysctls: compared with the values before the start and restored.
//! - iptables: chains named KUBE-* or CNI-* in the host's namespace that were not
//!   there before (kube-proxy and the CNI plugins run in the nodes' namespaces).
//! - mounts under the harness directory, and the directory itself.

use anyhow::{bail, Context};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Name of the cgroup subtree (in every hierarchy) that holds everything.
pub const CGROUP: &str = "weft-kube";
/// The host bridge the nodes' uplinks are attached to.
pub const BRIDGE: &str = "weftkube0";
/// Prefix of the host ends of the nodes' veths.
pub const VETH_PREFIX: &str = "weftk-";
/// Prefix of the nodes' network namespaces.
pub const NETNS_PREFIX: &str = "weft-kube-";

/// Host paths the nodes mount their own directories on (in their private mount
/// namespaces): kubelet and containerd write to these fixed paths whatever their
/// configuration says, and two nodes must not share them. The last three are
/// where weft's chart puts things on a node by default: the CNI configuration
/// and plugin directories (containerd's `conf_dir` and `bin_dir`), and the node
/// agent's state and CNI socket (`/var/run/weft`; `/var/run` is `/run`).
pub const PRIVATE_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/run/weft",
];

/// Where each node's mount namespace mounts a bpffs of its own, so that two node
/// agents' pins (both under `/sys/fs/bpf/weft`) never meet.
pub const BPFFS: &str = "/sys/fs/bpf";

/// Sysctls the kubelet sets at start (pkg/kubelet/cm setupKernelTunables). Each
/// node's mount namespace binds a file of its own over them, so the kubelet's
/// writes never reach the host.
pub const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Host sysctls compared before and after (the kubelet's, and those kube-proxy and
/// the bridge plugin set in their network namespace, in case one reached the host).
const WATCHED_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
    "net/ipv4/ip_forward",
    "net/ipv4/conf/all/route_localnet",
    "net/bridge/bridge-nf-call-iptables",
    "net/netfilter/nf_conntrack_max",
];

const TABLES: &[&str] = &["filter", "nat", "mangle", "raw"];

/// The host as it was before the cluster started; kept in the harness directory
/// so that a later run can undo a run that died.
#[derive(Serialize, Deserialize, Default, Clone, Debug)]
pub struct Baseline {
    pub sysctls: BTreeMap<String, String>,
    pub chains: BTreeSet<String>,
    /// Mount points the harness created (absent before).
    pub created_dirs: Vec<String>,
    /// Host files that existed before (those absent then are leftovers if present).
    pub existing_paths: BTreeSet<String>,
    /// bpffs mount points of the host before (a new one is a leftover).
    #[serde(default)]
    pub bpffs_mounts: BTreeSet<String>,
}

/// Files that appear on the host when something escapes the nodes' mount
/// namespaces (checked only when they were absent before the start).
const WATCHED_PATHS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/run/containerd",
    "/opt/containerd",
    "/var/lib/containerd",
    "/run/xtables.lock",
    "/etc/cni/net.d",
    "/opt/cni/bin",
    "/usr/libexec/kubernetes",
    "/var/lib/dockershim",
    "/run/weft",
];

impl Baseline {
    pub fn capture() -> Self {
        let sysctls = WATCHED_SYSCTLS
            .iter()
            .filter_map(|s| read_sysctl(s).map(|v| (s.to_string(), v)))
            .collect();
        let existing_paths = WATCHED_PATHS
            .iter()
            .filter(|p| Path::new(p).exists())
            .map(|p| p.to_string())
            .collect();
        Self {
            sysctls,
            chains: host_chains(),
            created_dirs: Vec::new(),
            existing_paths,
            bpffs_mounts: bpffs_mounts(),
        }
    }

    pub fn save(&self, dir: &Path) -> anyhow::Result<()> {
        let path = dir.join("host-baseline.json");
        std::fs::write(&path, serde_json::to_vec_pretty(self)?)
            .with_context(|| format!("writing {}", path.display()))
    }

    pub fn load(dir: &Path) -> Option<Self> {
        let text = std::fs::read(dir.join("host-baseline.json")).ok()?;
        serde_json::from_slice(&text).ok()
    }
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(Path::new("/proc/sys").join(name))
        .ok()
        .map(|v| v.trim().to_string())
}

/// Runs a command to completion; fails with its stderr.
pub fn run(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!(
            "{program} {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Mount points of `/proc/self/mountinfo` with their filesystem type, in order.
pub fn mounts() -> Vec<(PathBuf, String)> {
    mounts_of("/proc/self/mountinfo")
}

/// Mount points of a `mountinfo` file (of any process) with their filesystem type.
pub fn mounts_of(mountinfo: &str) -> Vec<(PathBuf, String)> {
    let Ok(info) = std::fs::read_to_string(mountinfo) else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let fields: Vec<&str> = line.split(' ').collect();
            let dash = fields.iter().position(|f| *f == "-")?;
            let point = unescape_mount(fields.get(4)?);
            let fstype = fields.get(dash + 1)?.to_string();
            let super_opts = fields.get(dash + 3).copied().unwrap_or("");
            // Name the v1 hierarchies by their options (cpu, memory, name=systemd).
            let kind = if fstype == "cgroup" {
                format!("cgroup:{super_opts}")
            } else {
                fstype
            };
            Some((PathBuf::from(point), kind))
        })
        .collect()
}

fn unescape_mount(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}

/// The host's bpffs mount points.
pub fn bpffs_mounts() -> BTreeSet<String> {
    mounts()
        .into_iter()
        .filter(|(_, kind)| kind == "bpf")
        .map(|(p, _)| p.display().to_string())
        .collect()
}

/// Mount points of every cgroup hierarchy (v1 controllers and cgroup2).
pub fn cgroup_hierarchies() -> Vec<PathBuf> {
    mounts()
        .into_iter()
        .filter(|(_, kind)| kind.starts_with("cgroup"))
        .map(|(p, _)| p)
        .collect()
}

/// The cgroup2 mount point (`/sys/fs/cgroup/unified` on a hybrid host).
pub fn cgroup2() -> anyhow::Result<PathBuf> {
    mounts()
        .into_iter()
        .find(|(_, kind)| kind == "cgroup2")
        .map(|(p, _)| p)
        .context("no cgroup2 hierarchy is mounted")
}

/// The v1 hierarchies the kubelet requires its cgroup root in (cpu, cpuacct,
/// cpuset, memory, pids, name=systemd; see pkg/kubelet/cm cgroupManagerImpl.Exists)
/// and every other one, so that containers land in groups the harness owns.
pub fn create_cgroup_everywhere(rel: &str) -> anyhow::Result<()> {
    for h in cgroup_hierarchies() {
        let mut path = h.clone();
        for part in Path::new(rel).components() {
            path.push(part);
            if !path.exists() {
                std::fs::create_dir(&path)
                    .with_context(|| format!("creating cgroup {}", path.display()))?;
            }
            // A new v1 cpuset group has no CPUs or memory nodes: copy its parent's.
            for file in ["cpuset.cpus", "cpuset.mems"] {
                let f = path.join(file);
                if f.exists() && std::fs::read_to_string(&f)?.trim().is_empty() {
                    let parent = path.parent().context("cgroup parent")?.join(file);
                    let v = std::fs::read_to_string(&parent)?;
                    std::fs::write(&f, v.trim())
                        .with_context(|| format!("writing {}", f.display()))?;
                }
            }
        }
    }
    Ok(())
}

/// PIDs of every process in `rel` or below, in any hierarchy.
pub fn cgroup_pids(rel: &str) -> BTreeSet<i32> {
    let mut pids = BTreeSet::new();
    for h in cgroup_hierarchies() {
        collect_pids(&h.join(rel), &mut pids);
    }
    pids
}

fn collect_pids(dir: &Path, pids: &mut BTreeSet<i32>) {
    if let Ok(text) = std::fs::read_to_string(dir.join("cgroup.procs")) {
        pids.extend(text.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
    }
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                collect_pids(&e.path(), pids);
            }
        }
    }
}

/// Kills (SIGKILL, by PID) every process in the cgroup subtree `rel` of every
/// hierarchy until none is left, then uses cgroup2's `cgroup.kill` for any that
/// slipped in meanwhile. Returns the PIDs still alive after `timeout`.
pub fn kill_cgroup(rel: &str, timeout: Duration) -> BTreeSet<i32> {
    let me = std::process::id() as i32;
    let end = Instant::now() + timeout;
    loop {
        let pids: BTreeSet<i32> = cgroup_pids(rel).into_iter().filter(|p| *p != me).collect();
        if pids.is_empty() {
            return pids;
        }
        for pid in &pids {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(*pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        if let Ok(v2) = cgroup2() {
            let kill = v2.join(rel).join("cgroup.kill");
            if kill.exists() {
                let _ = std::fs::write(&kill, "1");
            }
        }
        if Instant::now() > end {
            return pids;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Removes the cgroup subtree `rel` from every hierarchy, leaves first. Returns
/// the groups that could not be removed.
pub fn remove_cgroup(rel: &str) -> Vec<PathBuf> {
    let mut left = Vec::new();
    for h in cgroup_hierarchies() {
        let root = h.join(rel);
        if root.exists() {
            remove_tree(&root, &mut left);
        }
    }
    left
}

fn remove_tree(dir: &Path, left: &mut Vec<PathBuf>) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                remove_tree(&e.path(), left);
            }
        }
    }
    for _ in 0..100 {
        if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    left.push(dir.to_path_buf());
}

/// Names of the host's network namespaces (`ip netns`) that start with the prefix.
pub fn netns_names() -> Vec<String> {
    std::fs::read_dir("/run/netns")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(NETNS_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// The host's links that belong to the cluster (bridge and veth host ends).
pub fn link_names() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n == BRIDGE || n.starts_with(VETH_PREFIX))
                .collect()
        })
        .unwrap_or_default()
}

/// `table/chain` of the chains named KUBE-* or CNI-* in the host's namespace.
pub fn host_chains() -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for t in TABLES {
        let Ok(text) = run("iptables", &["-w", "-t", t, "-S"]) else {
            continue;
        };
        for line in text.lines() {
            if let Some(chain) = line.strip_prefix("-N ") {
                if chain.starts_with("KUBE-") || chain.starts_with("CNI-") {
                    out.insert(format!("{t}/{chain}"));
                }
            }
        }
    }
    out
}

/// Deletes the host chains in `chains` (`table/chain`), with the rules that jump
/// to them.
fn delete_chains(chains: &BTreeSet<String>) -> Vec<String> {
    let mut errors = Vec::new();
    for t in TABLES {
        let names: Vec<&str> = chains
            .iter()
            .filter_map(|c| c.strip_prefix(&format!("{t}/")))
            .collect();
        if names.is_empty() {
            continue;
        }
        // Rules anywhere that jump to one of them.
        if let Ok(text) = run("iptables", &["-w", "-t", t, "-S"]) {
            for line in text.lines().filter(|l| l.starts_with("-A ")) {
                let words: Vec<&str> = line.split_whitespace().collect();
                let jumps = words
                    .windows(2)
                    .any(|w| (w[0] == "-j" || w[0] == "-g") && names.contains(&w[1]));
                if jumps {
                    let mut args = vec!["-w", "-t", t, "-D"];
                    args.extend(words[1..].iter().copied());
                    if let Err(e) = run("iptables", &args) {
                        errors.push(e.to_string());
                    }
                }
            }
        }
        for n in &names {
            let _ = run("iptables", &["-w", "-t", t, "-F", n]);
        }
        for n in &names {
            if let Err(e) = run("iptables", &["-w", "-t", t, "-X", n]) {
                errors.push(e.to_string());
            }
        }
    }
    errors
}

/// Mount points under `dir` in the host's mount namespace, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = mounts()
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| p.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v.dedup();
    v
}

/// Unmounts (lazily, deepest first), inside the mount namespace of process
/// `pid`, everything mounted under `dir`, on the private paths, on /run/netns, on
/// /proc/sys and on /sys/fs/bpf (a node's own mounts: pods' volumes, shm, rootfs
/// overlays, network namespaces, the binds the harness made, its bpffs). Returns
/// what is still mounted.
pub fn unmount_in(pid: u32, dir: &Path) -> Vec<String> {
    let info = format!("/proc/{pid}/mountinfo");
    let ours = |p: &Path| {
        p.starts_with(dir)
            || PRIVATE_PATHS.iter().any(|q| p.starts_with(q))
            || p.starts_with("/run/netns")
            || p.starts_with("/proc/sys")
            || p.starts_with(BPFFS)
    };
    let mut points: Vec<PathBuf> = mounts_of(&info)
        .into_iter()
        .map(|(p, _)| p)
        .filter(|p| ours(p))
        .collect();
    if points.is_empty() {
        return Vec::new();
    }
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    let mut args = vec![
        format!("--mount=/proc/{pid}/ns/mnt"),
        "--".into(),
        "umount".into(),
        "-l".into(),
    ];
    args.extend(points.iter().map(|p| p.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // Errors show up as mounts that are still there.
    let _ = run("nsenter", &args);
    mounts_of(&info)
        .into_iter()
        .filter(|(p, _)| ours(p))
        .map(|(p, kind)| {
            format!(
                "mount {} ({kind}) in the mount namespace of {pid}",
                p.display()
            )
        })
        .collect()
}

/// Processes whose command line names `dir` (a daemon of the cluster that is
/// somehow outside its cgroups), for the leftovers report only.
fn processes_naming(dir: &Path) -> Vec<(i32, String)> {
    let needle = dir.to_string_lossy().into_owned();
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in rd.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if names_path(&cmd, &needle) {
                out.push((pid, cmd.trim().to_string()));
            }
        }
    }
    out
}

/// Whether `text` names the path `dir` or something under it: `dir` not followed
/// by more of a file name, so `/tmp/weft-kube` is not found in the
/// `/tmp/weft-kube-XXXXXX` directories of other harnesses (`kubeapi`'s API
/// servers, which may run meanwhile).
fn names_path(text: &str, dir: &str) -> bool {
    let dir = dir.trim_end_matches('/');
    !dir.is_empty()
        && text.match_indices(dir).any(|(i, _)| {
            text[i + dir.len()..]
                .chars()
                .next()
                .is_none_or(|c| !(c.is_alphanumeric() || matches!(c, '-' | '_' | '.')))
        })
}

/// Everything of a cluster still on the host, one line each (empty: nothing).
/// `baseline` is the host before the start; without one, only objects with the
/// cluster's names are listed (no sysctls, iptables chains or fixed host paths).
pub fn leftovers(dir: &Path, baseline: Option<&Baseline>) -> Vec<String> {
    let mut out = Vec::new();
    let in_cgroup = cgroup_pids(CGROUP);
    for pid in &in_cgroup {
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
            .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
            .unwrap_or_default();
        out.push(format!("process {pid} in cgroup {CGROUP}: {}", cmd.trim()));
    }
    out.extend(
        processes_naming(dir)
            .into_iter()
            .filter(|(pid, _)| !in_cgroup.contains(pid))
            .map(|(pid, cmd)| format!("process {pid}: {cmd}")),
    );
    for h in cgroup_hierarchies() {
        let p = h.join(CGROUP);
        if p.exists() {
            out.push(format!("cgroup {}", p.display()));
        }
    }
    for m in mounts_under(dir) {
        out.push(format!("mount {}", m.display()));
    }
    for (m, kind) in mounts() {
        if PRIVATE_PATHS.iter().any(|p| m.starts_with(p)) {
            out.push(format!("mount {} ({kind})", m.display()));
        }
    }
    for n in netns_names() {
        out.push(format!("network namespace {n}"));
    }
    for l in link_names() {
        out.push(format!("link {l}"));
    }
    // Without a baseline only what carries the cluster's own names is listed.
    if let Some(b) = baseline {
        for c in host_chains().difference(&b.chains) {
            out.push(format!("iptables chain {c}"));
        }
        for (name, was) in &b.sysctls {
            if let Some(now) = read_sysctl(name) {
                if &now != was {
                    out.push(format!("sysctl {name} = {now} (was {was})"));
                }
            }
        }
        for p in WATCHED_PATHS {
            if !b.existing_paths.contains(*p) && Path::new(p).exists() {
                out.push(format!("path {p}"));
            }
        }
        for m in bpffs_mounts().difference(&b.bpffs_mounts) {
            out.push(format!("mount {m} (bpf) on the host"));
        }
    }
    if dir.exists() {
        out.push(format!("directory {}", dir.display()));
    }
    out
}

/// Undoes everything a cluster did to the host, whether the cluster is this
/// process's or the remains of one that died. Processes must have been asked to
/// stop already (this kills what is left). Returns what could not be undone.
pub fn clean(dir: &Path, baseline: Option<&Baseline>) -> Vec<String> {
    let mut errors = Vec::new();
    // 1. Processes: daemons, shims, containers, by PID from their cgroups.
    let alive = kill_cgroup(CGROUP, Duration::from_secs(15));
    if !alive.is_empty() {
        errors.push(format!("processes still alive after SIGKILL: {alive:?}"));
    }
    // 2. Mounts the host sees under the harness directory (the nodes' own mounts
    //    went with their mount namespaces, whose last processes were just killed).
    for m in mounts_under(dir) {
        if let Err(e) = nix::mount::umount2(&m, nix::mount::MntFlags::MNT_DETACH) {
            errors.push(format!("unmounting {}: {e}", m.display()));
        }
    }
    // 3. Network: node namespaces (with everything inside: cni0, pod veths,
    //    iptables chains, conntrack), then the host's links (routes go with them).
    for n in netns_names() {
        if let Err(e) = run("ip", &["netns", "del", &n]) {
            errors.push(e.to_string());
        }
    }
    for l in link_names() {
        if let Err(e) = run("ip", &["link", "del", &l]) {
            // A veth's host end disappears with its peer's namespace.
            if Path::new("/sys/class/net").join(&l).exists() {
                errors.push(e.to_string());
            }
        }
    }
    let before = baseline.map(|b| b.chains.clone()).unwrap_or_default();
    let new_chains: BTreeSet<String> = host_chains().difference(&before).cloned().collect();
    errors.extend(delete_chains(&new_chains));
    // 4. Cgroups, in every hierarchy.
    for g in remove_cgroup(CGROUP) {
        errors.push(format!("cannot remove cgroup {}", g.display()));
    }
    // 5. Sysctls back to what they were.
    if let Some(b) = baseline {
        for (name, was) in &b.sysctls {
            if read_sysctl(name).as_deref() != Some(was.as_str()) {
                let path = Path::new("/proc/sys").join(name);
                if let Err(e) = std::fs::write(&path, was) {
                    errors.push(format!("restoring {}: {e}", path.display()));
                }
            }
        }
        // 6. Mount points the harness created, if empty.
        for d in b.created_dirs.iter().rev() {
            let p = Path::new(d);
            if p.is_dir() {
                if let Err(e) = std::fs::remove_dir(p) {
                    errors.push(format!("removing {d}: {e}"));
                }
            }
        }
    }
    // 7. The harness directory, unless something is still mounted in it (removing
    //    it then could reach into what is mounted).
    let left = mounts_under(dir);
    if !left.is_empty() {
        errors.push(format!(
            "not removing {}: still mounted: {left:?}",
            dir.display()
        ));
    } else if dir.exists() {
        // Only a cluster's own directory (a wrong WEFT_KUBE_DIR must not cost data).
        let empty = std::fs::read_dir(dir).is_ok_and(|mut d| d.next().is_none());
        if !empty && !dir.join("host-baseline.json").exists() {
            errors.push(format!(
                "not removing {}: not a cluster's directory (it has no host-baseline.json)",
                dir.display()
            ));
        } else if let Err(e) = std::fs::remove_dir_all(dir) {
            errors.push(format!("removing {}: {e}", dir.display()));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::names_path;

    #[test]
    fn names_the_path_not_its_prefix() {
        let d = "/tmp/weft-kube";
        assert!(names_path("etcd --data-dir=/tmp/weft-kube/etcd", d));
        assert!(names_path("kubelet --root-dir /tmp/weft-kube", d));
        assert!(names_path("x /tmp/weft-kube/ y", d));
        assert!(!names_path("etcd --data-dir=/tmp/weft-kube-g3GGvb/etcd", d));
        assert!(!names_path("tail /tmp/weft-kube.log", d));
        assert!(!names_path("cat /tmp/weft-kube_x", d));
        assert!(names_path("a /tmp/weft-kube-x/b /tmp/weft-kube/c", d));
        assert!(!names_path("anything", ""));
    }
}
