//! Value matchers: Istio string matches and IP blocks.

use std::net::IpAddr;

/// exact, `prefix*`, `*suffix`, or `*` (presence: any non-empty value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StringMatch {
    Exact(String),
    Prefix(String),
    Suffix(String),
    Presence,
}

impl StringMatch {
    pub fn parse(s: &str) -> Self {
        if s == "*" {
            StringMatch::Presence
        } else if let Some(p) = s.strip_suffix('*') {
            StringMatch::Prefix(p.to_string())
        } else if let Some(x) = s.strip_prefix('*') {
            StringMatch::Suffix(x.to_string())
        } else {
            StringMatch::Exact(s.to_string())
        }
    }

    pub fn matches(&self, v: &str) -> bool {
        match self {
            StringMatch::Exact(e) => v == e,
            StringMatch::Prefix(p) => v.starts_with(p.as_str()),
            StringMatch::Suffix(x) => v.ends_with(x.as_str()),
            StringMatch::Presence => !v.is_empty(),
        }
    }

    /// Case-insensitive (hosts).
    pub fn matches_ignore_case(&self, v: &str) -> bool {
        let v = v.to_ascii_lowercase();
        match self {
            StringMatch::Exact(e) => v == e.to_ascii_lowercase(),
            StringMatch::Prefix(p) => v.starts_with(&p.to_ascii_lowercase()),
            StringMatch::Suffix(x) => v.ends_with(&x.to_ascii_lowercase()),
            StringMatch::Presence => !v.is_empty(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub len: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Self> {
        weft_proto::validate::parse_cidr(s).map(|(addr, len)| Cidr { addr, len })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 source matches IPv4 blocks.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u32::MAX << (32 - u32::from(self.len))
                };
                u32::from(net) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = if self.len == 0 {
                    0
                } else {
                    u128::MAX << (128 - u32::from(self.len))
                };
                u128::from(net) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}
