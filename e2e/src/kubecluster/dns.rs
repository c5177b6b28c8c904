//! The cluster's DNS: a thread of the harness answering, on the fabric gateway
//! (UDP port 53), `A` queries for Services: `<service>.<namespace>.svc.cluster.local`
//! is the Service's ClusterIP. Kubelets point pods at it (`clusterDNS`), so names
//! such as `weft-control-plane.weft-system.svc` resolve through the search list
//! as on any cluster with CoreDNS. It never forwards: every other name, and a
//! Service without a ClusterIP, is NXDOMAIN, so no lookup leaves the machine.
//!
//! Services are read with kubectl when a name of the cluster domain is asked for
//! and the copy is older than [`FRESH`] (or it lacks the name and is older than
//! [`RETRY`]): a Service is found within a second of being created.

use anyhow::Context;
use std::collections::HashMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const CLUSTER_DOMAIN: &str = "cluster.local";
/// A copy of the Services younger than this answers every query.
const FRESH: Duration = Duration::from_secs(5);
/// A name missing from a copy older than this re-reads the Services.
const RETRY: Duration = Duration::from_millis(500);
const TTL: u32 = 5;

const TYPE_A: u16 = 1;
const TYPE_ANY: u16 = 255;
const RCODE_FORMERR: u16 = 1;
const RCODE_NXDOMAIN: u16 = 3;
const RCODE_NOTIMP: u16 = 4;

/// Reads the Services: fully qualified name (`<svc>.<ns>.svc.cluster.local`) to ClusterIP.
pub type ServiceSource = Box<dyn FnMut() -> anyhow::Result<HashMap<String, Ipv4Addr>> + Send>;

pub struct ClusterDns {
    pub addr: SocketAddr,
    /// Queries answered so far.
    pub queries: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ClusterDns {
    /// Binds `addr` (UDP) and answers from `services` until stopped; every query
    /// and its answer is appended to `log`.
    pub fn start(
        addr: SocketAddr,
        mut services: ServiceSource,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let sock = UdpSocket::bind(addr).with_context(|| format!("binding DNS on {addr} (udp)"))?;
        sock.set_read_timeout(Some(Duration::from_millis(200)))?;
        let stop = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(AtomicU64::new(0));
        let mut log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .with_context(|| format!("opening {}", log.display()))?;
        let (stop2, queries2) = (stop.clone(), queries.clone());
        let thread = std::thread::Builder::new()
            .name("weft-kube-dns".into())
            .spawn(move || {
                let mut table: HashMap<String, Ipv4Addr> = HashMap::new();
                let mut read_at: Option<Instant> = None;
                let mut buf = [0u8; 1500];
                while !stop2.load(Ordering::SeqCst) {
                    let Ok((n, from)) = sock.recv_from(&mut buf) else {
                        continue;
                    };
                    let mut asked = String::new();
                    let reply = answer(&buf[..n], |name| {
                        asked = name.to_string();
                        let age = read_at.map(|t| t.elapsed());
                        let stale = age.is_none_or(|a| a > FRESH);
                        let missing = !table.contains_key(name) && age.is_none_or(|a| a > RETRY);
                        if stale || missing {
                            match services() {
                                Ok(t) => {
                                    table = t;
                                    read_at = Some(Instant::now());
                                }
                                Err(e) => {
                                    let _ = writeln!(log, "reading Services: {e:#}");
                                }
                            }
                        }
                        table.get(name).copied()
                    });
                    if let Some(reply) = reply {
                        let _ = sock.send_to(&reply.bytes, from);
                        queries2.fetch_add(1, Ordering::Relaxed);
                        let _ = writeln!(
                            log,
                            "{from} {asked} type {}: {}",
                            reply.qtype,
                            reply.summary()
                        );
                    }
                }
            })
            .context("starting the DNS thread")?;
        Ok(Self {
            addr,
            queries,
            stop,
            thread: Some(thread),
        })
    }

    /// Stops answering and closes the socket.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for ClusterDns {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A response and what it said, for the log.
#[derive(Debug)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub qtype: u16,
    pub rcode: u16,
    pub address: Option<Ipv4Addr>,
}

impl Reply {
    fn summary(&self) -> String {
        match (self.rcode, self.address) {
            (0, Some(a)) => a.to_string(),
            (0, None) => "no data".into(),
            (RCODE_NXDOMAIN, _) => "NXDOMAIN".into(),
            (r, _) => format!("rcode {r}"),
        }
    }
}

/// The response to one DNS query (RFC 1035), or `None` for a packet that is not
/// a query. `lookup` gets the lower-case name without the final dot, only for
/// names in the cluster domain.
pub fn answer(query: &[u8], mut lookup: impl FnMut(&str) -> Option<Ipv4Addr>) -> Option<Reply> {
    if query.len() < 12 {
        return None;
    }
    let flags = u16::from_be_bytes([query[2], query[3]]);
    if flags & 0x8000 != 0 {
        return None; // a response
    }
    let opcode = (flags >> 11) & 0xf;
    let header = |rcode: u16, qd: u16, an: u16| {
        let mut h = Vec::with_capacity(64);
        h.extend_from_slice(&query[..2]);
        // QR, the query's opcode, AA, the query's RD; no recursion available.
        let f = 0x8000 | (opcode << 11) | 0x0400 | (flags & 0x0100) | rcode;
        h.extend_from_slice(&f.to_be_bytes());
        for v in [qd, an, 0, 0] {
            h.extend_from_slice(&v.to_be_bytes());
        }
        h
    };
    let bare = |rcode: u16| Reply {
        bytes: header(rcode, 0, 0),
        qtype: 0,
        rcode,
        address: None,
    };
    if opcode != 0 {
        return Some(bare(RCODE_NOTIMP));
    }
    if u16::from_be_bytes([query[4], query[5]]) != 1 {
        return Some(bare(RCODE_FORMERR));
    }
    let mut pos = 12;
    let mut labels = Vec::new();
    loop {
        let len = usize::from(*query.get(pos)?);
        pos += 1;
        if len == 0 {
            break;
        }
        if len & 0xc0 != 0 || labels.len() > 127 {
            return Some(bare(RCODE_FORMERR));
        }
        let label = query.get(pos..pos + len)?;
        labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
        pos += len;
    }
    let Some(fixed) = query.get(pos..pos + 4) else {
        return Some(bare(RCODE_FORMERR));
    };
    let qtype = u16::from_be_bytes([fixed[0], fixed[1]]);
    let question = &query[12..pos + 4];
    let name = labels.join(".");
    let in_domain = name == CLUSTER_DOMAIN || name.ends_with(&format!(".{CLUSTER_DOMAIN}"));
    let found = if in_domain { lookup(&name) } else { None };
    let (rcode, address) = match found {
        Some(ip) if qtype == TYPE_A || qtype == TYPE_ANY => (0, Some(ip)),
        // The name exists, but has no record of this type (AAAA, ...).
        Some(_) => (0, None),
        None => (RCODE_NXDOMAIN, None),
    };
    let mut bytes = header(rcode, 1, u16::from(address.is_some()));
    bytes.extend_from_slice(question);
    if let Some(ip) = address {
        bytes.extend_from_slice(&[0xc0, 12]); // the question's name
        bytes.extend_from_slice(&TYPE_A.to_be_bytes());
        bytes.extend_from_slice(&1u16.to_be_bytes()); // IN
        bytes.extend_from_slice(&TTL.to_be_bytes());
        bytes.extend_from_slice(&4u16.to_be_bytes());
        bytes.extend_from_slice(&ip.octets());
    }
    Some(Reply {
        bytes,
        qtype,
        rcode,
        address,
    })
}

/// Services from `kubectl get services -A -o json` output: each one with a
/// ClusterIP under its fully qualified name.
pub fn services_from_json(v: &serde_json::Value) -> HashMap<String, Ipv4Addr> {
    let mut out = HashMap::new();
    for s in v["items"].as_array().into_iter().flatten() {
        let (Some(name), Some(ns)) = (
            s["metadata"]["name"].as_str(),
            s["metadata"]["namespace"].as_str(),
        ) else {
            continue;
        };
        // "None" (headless) does not parse.
        if let Some(ip) = s["spec"]["clusterIP"]
            .as_str()
            .and_then(|ip| ip.parse::<Ipv4Addr>().ok())
        {
            out.insert(format!("{name}.{ns}.svc.{CLUSTER_DOMAIN}"), ip);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, qtype: u16) -> Vec<u8> {
        let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        for l in name.split('.') {
            q.push(l.len() as u8);
            q.extend_from_slice(l.as_bytes());
        }
        q.push(0);
        q.extend_from_slice(&qtype.to_be_bytes());
        q.extend_from_slice(&1u16.to_be_bytes());
        q
    }

    #[test]
    fn answers_services_and_nothing_else() {
        let ip: Ipv4Addr = "10.97.0.10".parse().unwrap();
        let asked = std::cell::RefCell::new(Vec::new());
        let lookup = |n: &str| {
            asked.borrow_mut().push(n.to_string());
            (n == "cp.weft-system.svc.cluster.local").then_some(ip)
        };
        let r = answer(&query("CP.weft-system.svc.cluster.local", 1), lookup).unwrap();
        assert_eq!(r.rcode, 0);
        assert_eq!(r.address, Some(ip));
        assert_eq!(&r.bytes[..2], &[0x12, 0x34]);
        // QR, AA, RD; one question, one answer; the address last.
        assert_eq!(&r.bytes[2..4], &[0x85, 0x00]);
        assert_eq!(&r.bytes[4..8], &[0, 1, 0, 1]);
        assert_eq!(&r.bytes[r.bytes.len() - 4..], &[10, 97, 0, 10]);
        // AAAA of a Service: the name exists, no data.
        let r = answer(&query("cp.weft-system.svc.cluster.local", 28), lookup).unwrap();
        assert_eq!((r.rcode, r.address), (0, None));
        // Search-list misses and names off the cluster: NXDOMAIN, never looked up.
        let r = answer(
            &query("cp.weft-system.svc.weft-system.svc.cluster.local", 1),
            lookup,
        )
        .unwrap();
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        let r = answer(&query("example.org", 1), lookup).unwrap();
        assert_eq!(r.rcode, RCODE_NXDOMAIN);
        assert!(!asked.borrow().iter().any(|n| n == "example.org"));
        // Not a query, or garbage.
        let mut resp = query("a.b", 1);
        resp[2] |= 0x80;
        assert!(answer(&resp, lookup).is_none());
        assert!(answer(&[1, 2, 3], lookup).is_none());
        let truncated = &query("cp.weft-system.svc.cluster.local", 1)[..20];
        assert!(answer(truncated, lookup).is_none());
    }

    #[test]
    fn reads_services_with_a_cluster_ip() {
        let v = serde_json::json!({"items": [
            {"metadata": {"name": "kubernetes", "namespace": "default"}, "spec": {"clusterIP": "10.97.0.1"}},
            {"metadata": {"name": "headless", "namespace": "x"}, "spec": {"clusterIP": "None"}},
        ]});
        let t = services_from_json(&v);
        assert_eq!(t.len(), 1);
        assert_eq!(
            t["kubernetes.default.svc.cluster.local"],
            "10.97.0.1".parse::<Ipv4Addr>().unwrap()
        );
    }
}
