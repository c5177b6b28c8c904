//! Loads the capture programs, attaches them once to a cgroup (the cgroup2 root on a
//! real node), and pins maps and links under a bpffs directory.
//!
//! Links are pinned so the programs stay attached when `weft-node` exits or crashes:
//! enrolled pods' connections are then still redirected to 127.0.0.1:15001 in their
//! own netns, where nothing listens until the agent is back, so they fail (fail
//! closed) instead of bypassing the mesh. A restarted agent attaches fresh links
//! first and only then releases the old ones, so capture never has a gap.
//! [`Capture::uninstall`] removes every link, pin and map.

use super::maps::{OrigDst, PodStats, Settings, WeftPod, MAP_LAYOUTS, WEFT_POD_ENROLLED};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuHashMap};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::{CgroupAttachMode, CgroupSockAddr, CgroupSockopt, SockOps};
use aya::{Ebpf, EbpfLoader};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("loading the eBPF object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        source: aya::maps::MapError,
    },
    #[error("pinning link {path}: {message}")]
    Pin { path: PathBuf, message: String },
    #[error("map {name} has key/value size {got:?} but weft expects {want:?}: programs and agent are out of sync")]
    Layout {
        name: &'static str,
        got: (u32, u32),
        want: (usize, usize),
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> CaptureError {
    let what = what.into();
    move |source| CaptureError::Io { what, source }
}

#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// cgroup directory to attach to (the cgroup2 root on a real node).
    pub cgroup: PathBuf,
    /// bpffs directory for weft's pins, e.g. /sys/fs/bpf/weft.
    pub pin_dir: PathBuf,
    /// SO_MARK carried by the proxy's own sockets.
    pub proxy_mark: u32,
    pub outbound_port: u16,
}

const SOCK_ADDR_PROGRAMS: &[&str] = &[
    "weft_connect4",
    "weft_connect6",
    "weft_getpeername4",
    "weft_getpeername6",
];
const ALL_PROGRAMS: &[&str] = &[
    "weft_connect4",
    "weft_connect6",
    "weft_getpeername4",
    "weft_getpeername6",
    "weft_sockops",
    "weft_getsockopt",
];

// Attach mode: cgroup BPF *links* always coexist with other programs on the same
// cgroup (the kernel rejects BPF_F_ALLOW_MULTI on bpf_link_create, flags must be 0),
// so the default mode still lets a restarted agent attach before releasing the old.
pub struct Capture {
    ebpf: Ebpf,
    opts: CaptureOptions,
}

impl Capture {
    pub fn install(opts: CaptureOptions) -> Result<Self, CaptureError> {
        let maps_dir = opts.pin_dir.join("maps");
        let links_dir = opts.pin_dir.join("links");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(super::CAPTURE_OBJECT)?;
        check_layouts(&ebpf, MAP_LAYOUTS)?;
        let cgroup = std::fs::File::open(&opts.cgroup)
            .map_err(io(format!("opening cgroup {}", opts.cgroup.display())))?;
        let mut new_links: Vec<(&'static str, FdLink)> = Vec::new();
        for name in ALL_PROGRAMS {
            let prog = ebpf.program_mut(name).ok_or(CaptureError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?;
            let perr = |source| CaptureError::Program { name, source };
            let pin_err = |e: aya::programs::links::LinkError| CaptureError::Pin {
                path: links_dir.join(name),
                message: e.to_string(),
            };
            let link: FdLink = if SOCK_ADDR_PROGRAMS.contains(name) {
                let p: &mut CgroupSockAddr = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p
                    .attach(&cgroup, CgroupAttachMode::default())
                    .map_err(perr)?;
                p.take_link(id).map_err(perr)?.try_into().map_err(pin_err)?
            } else if *name == "weft_sockops" {
                let p: &mut SockOps = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                let id = p
                    .attach(&cgroup, CgroupAttachMode::default())
                    .map_err(perr)?;
                p.take_link(id).map_err(perr)?.try_into().map_err(pin_err)?
            } else {
                // SO_ORIGINAL_DST only matters while this agent's proxy runs, so this
                // link lives (and dies) with the agent: it is owned by `ebpf`.
                let p: &mut CgroupSockopt = prog.try_into().map_err(perr)?;
                p.load().map_err(perr)?;
                p.attach(&cgroup, CgroupAttachMode::default())
                    .map_err(perr)?;
                continue;
            };
            new_links.push((name, link));
        }
        // New links are attached: now release the previous agent's, then pin ours
        // (connect, getpeername and sockops stay attached if the agent dies).
        for (name, link) in new_links {
            let path = links_dir.join(name);
            if path.exists() {
                release_pinned_link(&path)?;
            }
            link.pin(&path).map_err(|e| CaptureError::Pin {
                path: path.clone(),
                message: e.to_string(),
            })?;
        }
        let mut capture = Self { ebpf, opts };
        capture.write_settings()?;
        tracing::info!(cgroup = %capture.opts.cgroup.display(), pins = %capture.opts.pin_dir.display(), "eBPF capture attached");
        Ok(capture)
    }

    fn write_settings(&mut self) -> Result<(), CaptureError> {
        let name = "weft_settings_map";
        let map = self.ebpf.map_mut(name).ok_or(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let mut arr: Array<&mut MapData, Settings> =
            Array::try_from(map).map_err(|source| CaptureError::Map { name, source })?;
        arr.set(
            0,
            Settings {
                proxy_mark: self.opts.proxy_mark,
                outbound_port: u32::from(self.opts.outbound_port),
            },
            0,
        )
        .map_err(|source| CaptureError::Map { name, source })
    }

    fn enrolled(&mut self) -> Result<BpfHashMap<&mut MapData, u64, WeftPod>, CaptureError> {
        let name = "weft_enrolled";
        let map = self.ebpf.map_mut(name).ok_or(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        BpfHashMap::try_from(map).map_err(|source| CaptureError::Map { name, source })
    }

    /// Starts capturing the pod whose network namespace has `netns_cookie`.
    pub fn enroll(
        &mut self,
        netns_cookie: u64,
        pod_ip4: Option<Ipv4Addr>,
    ) -> Result<(), CaptureError> {
        let v = WeftPod {
            flags: WEFT_POD_ENROLLED,
            pod_ip4: pod_ip4.map(|ip| u32::from(ip).to_be()).unwrap_or(0),
        };
        self.enrolled()?
            .insert(netns_cookie, v, 0)
            .map_err(|source| CaptureError::Map {
                name: "weft_enrolled",
                source,
            })
    }

    pub fn unenroll(&mut self, netns_cookie: u64) -> Result<(), CaptureError> {
        match self.enrolled()?.remove(&netns_cookie) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(CaptureError::Map {
                name: "weft_enrolled",
                source,
            }),
        }
    }

    pub fn enrolled_cookies(&mut self) -> Result<Vec<u64>, CaptureError> {
        Ok(self.enrolled()?.keys().filter_map(Result::ok).collect())
    }

    /// Counters of one pod, summed over CPUs.
    pub fn pod_stats(&mut self, netns_cookie: u64) -> Result<PodStats, CaptureError> {
        let name = "weft_pod_stats_map";
        let map = self.ebpf.map_mut(name).ok_or(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName { name: name.into() },
        })?;
        let m: PerCpuHashMap<&mut MapData, u64, PodStats> =
            PerCpuHashMap::try_from(map).map_err(|source| CaptureError::Map { name, source })?;
        let per_cpu = match m.get(&netns_cookie, 0) {
            Ok(v) => v,
            Err(aya::maps::MapError::KeyNotFound) => return Ok(PodStats::default()),
            Err(source) => return Err(CaptureError::Map { name, source }),
        };
        Ok(per_cpu.iter().fold(PodStats::default(), |a, s| PodStats {
            redirected: a.redirected + s.redirected,
            skipped_mark: a.skipped_mark + s.skipped_mark,
            established_out: a.established_out + s.established_out,
            established_in: a.established_in + s.established_in,
            orig_dst_answers: a.orig_dst_answers + s.orig_dst_answers,
        }))
    }

    /// Entries in the original-destination maps (for status and tests).
    pub fn orig_dst_entries(&mut self) -> (usize, usize) {
        let count = |ebpf: &mut Ebpf, name: &str| -> usize {
            ebpf.map_mut(name)
                .and_then(|m| {
                    BpfHashMap::<&mut MapData, u64, OrigDst>::try_from(m)
                        .ok()
                        .map(|h| h.keys().count())
                })
                .unwrap_or(0)
        };
        let by_cookie = count(&mut self.ebpf, "weft_orig_by_cookie");
        let by_tuple = self
            .ebpf
            .map_mut("weft_orig_by_tuple")
            .and_then(|m| {
                BpfHashMap::<&mut MapData, super::maps::Tuple, OrigDst>::try_from(m)
                    .ok()
                    .map(|h| h.keys().count())
            })
            .unwrap_or(0);
        (by_cookie, by_tuple)
    }

    /// Occupancy of the capture maps (the settings array is left out).
    pub fn occupancy(&self) -> Vec<super::occupancy::MapOccupancy> {
        use super::maps::Tuple;
        use super::occupancy::{hash, per_cpu_hash};
        [
            hash::<u64, WeftPod>(&self.ebpf, "weft_enrolled"),
            hash::<u64, OrigDst>(&self.ebpf, "weft_orig_by_cookie"),
            hash::<Tuple, OrigDst>(&self.ebpf, "weft_orig_by_tuple"),
            per_cpu_hash::<u64, PodStats>(&self.ebpf, "weft_pod_stats_map"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// Each capture program and whether it is attached: the pinned ones by their
    /// pin (a link someone removed shows as detached), the getsockopt one by being
    /// loaded in this agent, which owns its link.
    pub fn programs(&self) -> Vec<(&'static str, bool)> {
        let links = self.opts.pin_dir.join("links");
        ALL_PROGRAMS
            .iter()
            .map(|name| {
                let attached = if *name == "weft_getsockopt" {
                    self.ebpf.program(name).is_some_and(|p| p.fd().is_ok())
                } else {
                    links.join(name).exists()
                };
                (*name, attached)
            })
            .collect()
    }

    /// Detaches every program and removes every pin and map weft created under
    /// `pin_dir`. Safe to run when nothing is installed.
    pub fn uninstall(pin_dir: &Path) -> Result<(), CaptureError> {
        let links_dir = pin_dir.join("links");
        if links_dir.is_dir() {
            for e in std::fs::read_dir(&links_dir)
                .map_err(io(format!("reading {}", links_dir.display())))?
            {
                let e = e.map_err(io("reading link pins"))?;
                release_pinned_link(&e.path())?;
            }
        }
        if pin_dir.exists() {
            std::fs::remove_dir_all(pin_dir)
                .map_err(io(format!("removing {}", pin_dir.display())))?;
        }
        Ok(())
    }
}

fn release_pinned_link(path: &Path) -> Result<(), CaptureError> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| CaptureError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let fd = pinned
        .unpin()
        .map_err(io(format!("unpinning {}", path.display())))?;
    drop(fd); // last reference: the kernel detaches the program
    Ok(())
}

fn map_info(map: &aya::maps::Map) -> Result<(u32, u32), aya::maps::MapError> {
    use aya::maps::Map;
    let data: &MapData = match map {
        Map::HashMap(d)
        | Map::LruHashMap(d)
        | Map::PerCpuHashMap(d)
        | Map::Array(d)
        | Map::SockHash(d)
        | Map::SockMap(d) => d,
        _ => {
            return Err(aya::maps::MapError::InvalidName {
                name: "unexpected map type".into(),
            })
        }
    };
    let info = data.info()?;
    Ok((info.key_size(), info.value_size()))
}

/// Checks that every map of a loaded object has the key and value sizes of its
/// Rust mirror in [`super::maps`] (a drift between C and Rust fails the load).
pub(crate) fn check_layouts(
    ebpf: &aya::Ebpf,
    layouts: &[(&'static str, usize, usize)],
) -> Result<(), CaptureError> {
    for (name, key, value) in layouts {
        let map = ebpf.map(name).ok_or(CaptureError::Map {
            name,
            source: aya::maps::MapError::InvalidName {
                name: name.to_string(),
            },
        })?;
        let info = map_info(map).map_err(|source| CaptureError::Map { name, source })?;
        if (info.0 as usize, info.1 as usize) != (*key, *value) {
            return Err(CaptureError::Layout {
                name,
                got: info,
                want: (*key, *value),
            });
        }
    }
    Ok(())
}
