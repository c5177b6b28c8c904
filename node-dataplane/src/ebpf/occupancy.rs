//! How full weft's eBPF maps are, for the node's metrics. Hash maps are counted by
//! walking their keys (one syscall per entry), so the cost grows with occupancy, not
//! capacity; a scrape every 15 s makes this negligible next to the traffic.

use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, PerCpuHashMap, SockHash};
use aya::{Ebpf, Pod};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapOccupancy {
    pub map: &'static str,
    pub entries: u64,
    pub capacity: u64,
}

/// Counts the keys of an opened map.
fn measure<K: Pod, V>(
    map: &'static str,
    m: &impl IterableMap<K, V>,
    keys: aya::maps::MapKeys<'_, K>,
) -> MapOccupancy {
    MapOccupancy {
        map,
        entries: keys.filter(Result::is_ok).count() as u64,
        capacity: m
            .map()
            .info()
            .map(|i| u64::from(i.max_entries()))
            .unwrap_or(0),
    }
}

/// A `BPF_MAP_TYPE_HASH` or `LRU_HASH` map with key `K` and value `V`.
pub fn hash<K: Pod, V: Pod>(ebpf: &Ebpf, map: &'static str) -> Option<MapOccupancy> {
    let h = BpfHashMap::<&MapData, K, V>::try_from(ebpf.map(map)?).ok()?;
    Some(measure(map, &h, h.keys()))
}

/// A `BPF_MAP_TYPE_PERCPU_HASH` map.
pub fn per_cpu_hash<K: Pod, V: Pod>(ebpf: &Ebpf, map: &'static str) -> Option<MapOccupancy> {
    let h = PerCpuHashMap::<&MapData, K, V>::try_from(ebpf.map(map)?).ok()?;
    Some(measure(map, &h, h.keys()))
}

/// A `BPF_MAP_TYPE_SOCKHASH` map.
pub fn sock_hash<K: Pod>(ebpf: &Ebpf, map: &'static str) -> Option<MapOccupancy> {
    let h = SockHash::<&MapData, K>::try_from(ebpf.map(map)?).ok()?;
    Some(measure(map, &h, h.keys()))
}
