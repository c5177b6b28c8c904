//! Inbound capture: the sk_lookup program, attached to each enrolled pod's network
//! namespace, steering plaintext connections for the pod's IP to the proxy's in-pod
//! 15006 listener. Links are pinned (`<pin_dir>/inbound/<pod ip, dots as _>`) and the enrolled
//! set is a pinned map, so while the agent is down an enrolled pod's plaintext
//! inbound is dropped (fail closed) rather than reaching the application unchecked.

use super::loader::CaptureError;
use super::maps::{InboundPod, InboundStats, WEFT_POD_ENROLLED};
use aya::maps::{HashMap as BpfHashMap, MapData, SockHash};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::SkLookup;
use aya::{Ebpf, EbpfLoader};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

pub struct Inbound {
    ebpf: Ebpf,
    links_dir: PathBuf,
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> CaptureError {
    move |source| CaptureError::Io { what, source }
}

fn map_err(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> CaptureError {
    move |source| CaptureError::Map { name, source }
}

impl Inbound {
    pub fn load(pin_dir: &Path) -> Result<Self, CaptureError> {
        let maps_dir = pin_dir.join("maps");
        let links_dir = pin_dir.join("inbound");
        for d in [&maps_dir, &links_dir] {
            std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
        }
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&maps_dir)
            .load(super::INBOUND_OBJECT)?;
        super::loader::check_layouts(&ebpf, super::maps::INBOUND_MAP_LAYOUTS)?;
        let name = "weft_inbound";
        let prog: &mut SkLookup = ebpf
            .program_mut(name)
            .ok_or(CaptureError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| CaptureError::Program { name, source })?;
        prog.load()
            .map_err(|source| CaptureError::Program { name, source })?;
        Ok(Self { ebpf, links_dir })
    }

    /// Captures plaintext inbound for the pod at `netns` (whose IP is `ip`) into
    /// `listener` (the in-pod 15006 socket).
    pub fn enroll(
        &mut self,
        netns: &Path,
        ip: Ipv4Addr,
        listener: &impl AsRawFd,
    ) -> Result<(), CaptureError> {
        let key = u32::from(ip).to_be();
        {
            let map = self
                .ebpf
                .map_mut("weft_inbound_socks")
                .ok_or(CaptureError::Map {
                    name: "weft_inbound_socks",
                    source: aya::maps::MapError::InvalidName {
                        name: "weft_inbound_socks".into(),
                    },
                })?;
            let mut socks: SockHash<&mut MapData, u32> =
                SockHash::try_from(map).map_err(map_err("weft_inbound_socks"))?;
            socks
                .insert(key, listener.as_raw_fd(), 0)
                .map_err(map_err("weft_inbound_socks"))?;
        }
        let ns = std::fs::File::open(netns).map_err(io(format!("opening {}", netns.display())))?;
        let name = "weft_inbound";
        let prog: &mut SkLookup = self
            .ebpf
            .program_mut(name)
            .ok_or(CaptureError::Program {
                name,
                source: aya::programs::ProgramError::NotLoaded,
            })?
            .try_into()
            .map_err(|source| CaptureError::Program { name, source })?;
        let id = prog
            .attach(&ns)
            .map_err(|source| CaptureError::Program { name, source })?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(|source| CaptureError::Program { name, source })?
            .into();
        let path = self.link_pin(ip);
        if path.exists() {
            release(&path)?;
        }
        link.pin(&path).map_err(|e| CaptureError::Pin {
            path: path.clone(),
            message: e.to_string(),
        })?;
        self.pods()?
            .insert(
                key,
                InboundPod {
                    flags: WEFT_POD_ENROLLED,
                },
                0,
            )
            .map_err(map_err("weft_inbound_pods"))
    }

    pub fn unenroll(&mut self, ip: Ipv4Addr) -> Result<(), CaptureError> {
        let key = u32::from(ip).to_be();
        match self.pods()?.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(source) => {
                return Err(CaptureError::Map {
                    name: "weft_inbound_pods",
                    source,
                })
            }
        }
        let path = self.link_pin(ip);
        if path.exists() {
            release(&path)?;
        }
        Ok(())
    }

    /// bpffs refuses names with dots: `10.1.2.3` is pinned as `10_1_2_3`.
    fn link_pin(&self, ip: Ipv4Addr) -> PathBuf {
        self.links_dir.join(ip.to_string().replace('.', "_"))
    }

    fn pods(&mut self) -> Result<BpfHashMap<&mut MapData, u32, InboundPod>, CaptureError> {
        let map = self
            .ebpf
            .map_mut("weft_inbound_pods")
            .ok_or(CaptureError::Map {
                name: "weft_inbound_pods",
                source: aya::maps::MapError::InvalidName {
                    name: "weft_inbound_pods".into(),
                },
            })?;
        BpfHashMap::try_from(map).map_err(map_err("weft_inbound_pods"))
    }

    /// Occupancy of the inbound maps.
    pub fn occupancy(&self) -> Vec<super::occupancy::MapOccupancy> {
        use super::occupancy::{hash, per_cpu_hash, sock_hash};
        [
            hash::<u32, InboundPod>(&self.ebpf, "weft_inbound_pods"),
            sock_hash::<u32>(&self.ebpf, "weft_inbound_socks"),
            per_cpu_hash::<u32, InboundStats>(&self.ebpf, "weft_inbound_stats_map"),
        ]
        .into_iter()
        .flatten()
        .collect()
    }

    /// sk_lookup links attached (one per enrolled pod with an IPv4 address).
    pub fn links(&self) -> usize {
        std::fs::read_dir(&self.links_dir)
            .map(|d| d.filter_map(Result::ok).count())
            .unwrap_or(0)
    }
}

fn release(path: &Path) -> Result<(), CaptureError> {
    let pinned = PinnedLink::from_pin(path).map_err(|e| CaptureError::Pin {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    drop(
        pinned
            .unpin()
            .map_err(io(format!("unpinning {}", path.display())))?,
    );
    Ok(())
}
