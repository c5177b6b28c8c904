//! Finding an enrolled pod's network namespace without the CNI plugin: for pods
//! that were running before weft was installed, before their namespace was
//! labelled, or while the agent was down (their CNI ADD never reached it).
//!
//! The agent runs in the host's PID namespace, so `/proc` lists every process on
//! the node. Each distinct network namespace is looked at once, through one of its
//! processes: `/proc/<pid>/net/fib_trie` lists its local IPv4 addresses and
//! `/proc/<pid>/net/if_inet6` its IPv6 ones. A namespace holding a wanted pod IP is
//! that pod's. Its path is the runtime's bind mount (`/var/run/netns/...`) with the
//! same inode when there is one (stable for the pod's life), else
//! `/proc/<pid>/ns/net`. Every read is bounded.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::net::{IpAddr, Ipv6Addr};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Largest `/proc/<pid>/net/*` file read (a pod's are a few KiB).
const MAX_READ: u64 = 1 << 20;

/// Where the namespaces of `wanted` pod IPs are, by IP. `proc` is the host's
/// `/proc`; `netns_dirs` the runtime's directories of namespace bind mounts. The
/// agent's own network namespace (the host's, shared by hostNetwork pods) is
/// never returned.
pub fn find_netns(
    proc: &Path,
    netns_dirs: &[&Path],
    wanted: &HashSet<IpAddr>,
) -> std::io::Result<HashMap<IpAddr, PathBuf>> {
    let mut found = HashMap::new();
    if wanted.is_empty() {
        return Ok(found);
    }
    let own = std::fs::metadata(proc.join("self/ns/net"))?.ino();
    let mut seen = HashSet::from([own]);
    let mounts = bind_mounts(netns_dirs);
    for entry in std::fs::read_dir(proc)? {
        let Ok(entry) = entry else { continue };
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let dir = proc.join(pid);
        // A process may exit at any time: every error skips it.
        let Ok(ino) = std::fs::metadata(dir.join("ns/net")).map(|m| m.ino()) else {
            continue;
        };
        if !seen.insert(ino) {
            continue;
        }
        let mut ips = read_bounded(&dir.join("net/fib_trie"))
            .map(|t| local_ipv4(&t))
            .unwrap_or_default();
        ips.extend(
            read_bounded(&dir.join("net/if_inet6"))
                .map(|t| ipv6_addresses(&t))
                .unwrap_or_default(),
        );
        let hits: Vec<IpAddr> = ips.into_iter().filter(|ip| wanted.contains(ip)).collect();
        if hits.is_empty() {
            continue;
        }
        let path = mounts
            .get(&ino)
            .cloned()
            .unwrap_or_else(|| dir.join("ns/net"));
        for ip in hits {
            found.insert(ip, path.clone());
        }
        if found.len() == wanted.len() {
            break;
        }
    }
    Ok(found)
}

/// Namespace bind mounts by inode.
fn bind_mounts(dirs: &[&Path]) -> HashMap<u64, PathBuf> {
    let mut m = HashMap::new();
    for d in dirs {
        let Ok(entries) = std::fs::read_dir(d) else {
            continue;
        };
        for e in entries.flatten() {
            if let Ok(meta) = std::fs::metadata(e.path()) {
                m.insert(meta.ino(), e.path());
            }
        }
    }
    m
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    let mut s = String::new();
    std::fs::File::open(path)?
        .take(MAX_READ)
        .read_to_string(&mut s)?;
    Ok(s)
}

/// The local IPv4 addresses in a `/proc/<pid>/net/fib_trie`: each `/32 host LOCAL`
/// leaf names the address on the `|--` line above it.
pub fn local_ipv4(fib_trie: &str) -> Vec<IpAddr> {
    let mut last: Option<IpAddr> = None;
    let mut out = Vec::new();
    for line in fib_trie.lines() {
        let t = line.trim_start();
        if let Some(a) = t.strip_prefix("|-- ") {
            last = a.trim().parse().ok();
        } else if t.starts_with("/32 host LOCAL") {
            if let Some(ip) = last {
                if !ip.is_loopback() && !out.contains(&ip) {
                    out.push(ip);
                }
            }
        }
    }
    out
}

/// The addresses in a `/proc/<pid>/net/if_inet6` (32 hex digits first on each line),
/// without loopback and link-local ones.
pub fn ipv6_addresses(if_inet6: &str) -> Vec<IpAddr> {
    if_inet6
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|hex| u128::from_str_radix(hex, 16).ok())
        .map(Ipv6Addr::from)
        .filter(|ip| !ip.is_loopback() && !ip.is_unicast_link_local())
        .map(IpAddr::V6)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIB_TRIE: &str = "\
Main:
  +-- 0.0.0.0/0 3 0 5
     |-- 0.0.0.0
        /0 universe UNICAST
     +-- 10.244.1.0/24 2 0 2
        |-- 10.244.1.0
           /24 link UNICAST
        |-- 10.244.1.7
           /32 host LOCAL
     |-- 127.0.0.1
        /32 host LOCAL
Local:
  +-- 0.0.0.0/0 3 0 5
        |-- 10.244.1.7
           /32 host LOCAL
        |-- 10.244.1.255
           /32 link BROADCAST
";

    #[test]
    fn fib_trie_gives_the_local_addresses_once_without_loopback() {
        assert_eq!(
            local_ipv4(FIB_TRIE),
            vec!["10.244.1.7".parse::<IpAddr>().unwrap()]
        );
    }

    #[test]
    fn if_inet6_gives_global_addresses_only() {
        let text = "\
fd000000000000000000000000000007 02 40 00 80 eth0
fe800000000000000000000000000001 02 40 20 80 eth0
00000000000000000000000000000001 01 80 10 80 lo
";
        assert_eq!(
            ipv6_addresses(text),
            vec!["fd00::7".parse::<IpAddr>().unwrap()]
        );
    }

    /// On this host: the agent's own namespace is never a pod's, and an address
    /// nobody holds is not found.
    #[test]
    fn the_agents_own_namespace_and_unknown_addresses_are_not_found() {
        let own = local_ipv4(&read_bounded(Path::new("/proc/self/net/fib_trie")).unwrap());
        let mut wanted: HashSet<IpAddr> = own.into_iter().collect();
        wanted.insert("192.0.2.77".parse().unwrap());
        let found = find_netns(Path::new("/proc"), &[], &wanted).unwrap();
        assert!(
            found.values().all(|p| std::fs::metadata(p).unwrap().ino()
                != std::fs::metadata("/proc/self/ns/net").unwrap().ino()),
            "{found:?}"
        );
        assert!(!found.contains_key(&"192.0.2.77".parse::<IpAddr>().unwrap()));
    }
}
