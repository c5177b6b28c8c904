//! Finding the cgroup2 hierarchy and bpffs from /proc/self/mountinfo
//! ([`weft_runtime::mountinfo`]), mounting bpffs when absent.

use std::path::{Path, PathBuf};

pub use weft_runtime::mountinfo::mounts_of;

/// The cgroup2 mount point of this host.
pub fn cgroup2_root() -> std::io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    mounts_of(&info, "cgroup2")
        .into_iter()
        .next()
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::NotFound,
                "no cgroup2 filesystem is mounted (weft needs cgroup v2 or a hybrid hierarchy)",
            )
        })
}

/// A bpffs mount point, mounting one at /sys/fs/bpf if there is none.
pub fn bpffs() -> std::io::Result<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo")?;
    if let Some(p) = mounts_of(&info, "bpf").into_iter().next() {
        return Ok(p);
    }
    let target = Path::new("/sys/fs/bpf");
    std::fs::create_dir_all(target)?;
    nix::mount::mount(
        Some("bpf"),
        target,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(std::io::Error::from)?;
    Ok(target.to_path_buf())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_hybrid_and_pure_cgroup2() {
        let hybrid = "25 24 0:22 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      30 25 0:26 / /sys/fs/cgroup/unified rw,nosuid,nodev - cgroup2 cgroup2 rw,nsdelegate\n\
                      31 25 0:27 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(
            mounts_of(hybrid, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup/unified")]
        );
        let pure = "28 22 0:25 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw\n\
                    40 22 0:33 / /sys/fs/bpf rw,nosuid shared:12 - bpf bpf rw,mode=700\n";
        assert_eq!(
            mounts_of(pure, "cgroup2"),
            vec![PathBuf::from("/sys/fs/cgroup")]
        );
        assert_eq!(mounts_of(pure, "bpf"), vec![PathBuf::from("/sys/fs/bpf")]);
        assert!(mounts_of("garbage line\n", "cgroup2").is_empty());
    }
}
