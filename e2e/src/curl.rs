//! Real HTTP clients (curl) run inside pod network namespaces.

use crate::cluster::LocalCluster;
use std::path::Path;

/// One HTTP response as curl printed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    /// Lower-case names.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `curl -i` output (the last response if several).
pub fn parse(out: &str) -> Option<Reply> {
    let (head, body) = out.split_once("\r\n\r\n")?;
    let mut lines = head.lines();
    let status = lines.next()?.split_whitespace().nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some(Reply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// `curl -i --path-as-is [extra] url` from `pod`.
pub fn curl(c: &LocalCluster, pod: &str, extra: &[&str], url: &str) -> anyhow::Result<Reply> {
    let mut args = vec!["-s", "-S", "-i", "--path-as-is", "--max-time", "10"];
    args.extend_from_slice(extra);
    args.push(url);
    let (_, out, err) = c.run_app(pod, Path::new("/usr/bin/curl"), &args)?;
    parse(&out).ok_or_else(|| anyhow::anyhow!("curl {url} from {pod}: no response: {out}{err}"))
}
