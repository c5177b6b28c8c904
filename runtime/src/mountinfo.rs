//! Reading /proc/self/mountinfo: where cgroup2 and bpffs are mounted (never
//! hard-coded: hybrid hosts mount cgroup2 at /sys/fs/cgroup/unified, pure cgroup2
//! nodes at /sys/fs/cgroup). Used by the node agent and `weftctl check`.

use std::path::PathBuf;

/// Mount points of `fstype` in a mountinfo text, in order.
pub fn mounts_of(mountinfo: &str, fstype: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // fields: id parent maj:min root mountpoint opts [optional...] - fstype source superopts
            let (pre, post) = line.split_once(" - ")?;
            let fs = post.split_whitespace().next()?;
            let mountpoint = pre.split_whitespace().nth(4)?;
            (fs == fstype).then(|| PathBuf::from(unescape(mountpoint)))
        })
        .collect()
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
}
