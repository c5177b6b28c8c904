//! `#[repr(C)]` mirrors of `ebpf/include/weft_maps.h`. Change both together; the
//! layout tests below and the map-size check at load time catch drift.

#![allow(unsafe_code)] // `aya::Pod` for the map value types (see the `SAFETY` notes)

/// Value of `weft_enrolled` (key: netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeftPod {
    pub flags: u32,
    /// Network byte order.
    pub pod_ip4: u32,
}
pub const WEFT_POD_ENROLLED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    pub family: u16,
    /// Network byte order.
    pub port: u16,
    pub ip4: u32,
    pub ip6: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Tuple {
    pub netns_cookie: u64,
    pub local_ip4: u32,
    pub remote_ip4: u32,
    pub local_ip6: [u32; 4],
    pub remote_ip6: [u32; 4],
    pub local_port: u16,
    pub remote_port: u16,
    pub family: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    pub proxy_mark: u32,
    pub outbound_port: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PodStats {
    pub redirected: u64,
    pub skipped_mark: u64,
    pub established_out: u64,
    pub established_in: u64,
    pub orig_dst_answers: u64,
}

/// Value of `weft_inbound_pods` (key: pod IPv4, network order).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundPod {
    pub flags: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct InboundStats {
    pub captured: u64,
    pub dropped: u64,
}

// SAFETY: plain-old-data, #[repr(C)], no padding-dependent invariants.
unsafe impl aya::Pod for WeftPod {}
unsafe impl aya::Pod for OrigDst {}
unsafe impl aya::Pod for Tuple {}
unsafe impl aya::Pod for Settings {}
unsafe impl aya::Pod for PodStats {}
unsafe impl aya::Pod for InboundPod {}
unsafe impl aya::Pod for InboundStats {}

/// Map name -> (key size, value size), as the C side defines them.
pub const MAP_LAYOUTS: &[(&str, usize, usize)] = &[
    ("weft_enrolled", 8, std::mem::size_of::<WeftPod>()),
    ("weft_orig_by_cookie", 8, std::mem::size_of::<OrigDst>()),
    (
        "weft_orig_by_tuple",
        std::mem::size_of::<Tuple>(),
        std::mem::size_of::<OrigDst>(),
    ),
    ("weft_settings_map", 4, std::mem::size_of::<Settings>()),
    ("weft_pod_stats_map", 8, std::mem::size_of::<PodStats>()),
];

/// The same for the inbound object.
pub const INBOUND_MAP_LAYOUTS: &[(&str, usize, usize)] = &[
    ("weft_inbound_pods", 4, std::mem::size_of::<InboundPod>()),
    ("weft_inbound_socks", 4, 4),
    (
        "weft_inbound_stats_map",
        4,
        std::mem::size_of::<InboundStats>(),
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn layouts_match_the_c_header() {
        assert_eq!(size_of::<WeftPod>(), 8);
        assert_eq!(offset_of!(WeftPod, pod_ip4), 4);
        assert_eq!(size_of::<OrigDst>(), 24);
        assert_eq!(offset_of!(OrigDst, port), 2);
        assert_eq!(offset_of!(OrigDst, ip4), 4);
        assert_eq!(offset_of!(OrigDst, ip6), 8);
        assert_eq!(size_of::<Tuple>(), 56);
        assert_eq!(offset_of!(Tuple, local_ip4), 8);
        assert_eq!(offset_of!(Tuple, remote_ip4), 12);
        assert_eq!(offset_of!(Tuple, local_ip6), 16);
        assert_eq!(offset_of!(Tuple, remote_ip6), 32);
        assert_eq!(offset_of!(Tuple, local_port), 48);
        assert_eq!(offset_of!(Tuple, remote_port), 50);
        assert_eq!(offset_of!(Tuple, family), 52);
        assert_eq!(size_of::<Settings>(), 8);
        assert_eq!(size_of::<PodStats>(), 40);
        assert_eq!(size_of::<InboundPod>(), 4);
        assert_eq!(size_of::<InboundStats>(), 16);
    }

    /// Cross-check against the compiled object: every map's key and value size in
    /// the ELF equals the Rust mirror's.
    #[test]
    fn layouts_match_the_compiled_object() {
        for (object, layouts) in [
            (crate::ebpf::CAPTURE_OBJECT, MAP_LAYOUTS),
            (crate::ebpf::INBOUND_OBJECT, INBOUND_MAP_LAYOUTS),
        ] {
            let obj = aya_obj::Object::parse(object).expect("parse the eBPF object");
            for (name, key, value) in layouts {
                let m = obj
                    .maps
                    .get(*name)
                    .unwrap_or_else(|| panic!("map {name} missing"));
                assert_eq!(m.key_size() as usize, *key, "{name} key");
                assert_eq!(m.value_size() as usize, *value, "{name} value");
            }
        }
    }
}
