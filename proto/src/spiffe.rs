//! SPIFFE IDs as the SPIFFE-ID standard defines them, plus the Kubernetes workload
//! convention `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// Default trust domain, as in Istio and most Kubernetes meshes.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

const SCHEME: &str = "spiffe://";
const MAX_TRUST_DOMAIN_LEN: usize = 255;
/// The SPIFFE standard caps the whole URI at 2048 bytes.
const MAX_ID_LEN: usize = 2048;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    #[error("SPIFFE ID is empty")]
    Empty,
    #[error("SPIFFE ID {0:?} must start with \"spiffe://\"")]
    WrongScheme(String),
    #[error("SPIFFE ID is longer than {MAX_ID_LEN} bytes")]
    TooLong,
    #[error("trust domain is empty")]
    EmptyTrustDomain,
    #[error("trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong,
    #[error("trust domain {0:?} contains {1:?}: only lowercase letters, digits, '.', '-' and '_' are allowed (no port, userinfo or percent-encoding)")]
    BadTrustDomainChar(String, char),
    #[error("path segment {0:?} is not allowed: segments are non-empty, not '.' or '..', and the path has no trailing '/'")]
    BadSegment(String),
    #[error(
        "path segment {0:?} contains {1:?}: only letters, digits, '.', '-' and '_' are allowed"
    )]
    BadPathChar(String, char),
    #[error("SPIFFE ID {0:?} has no path, but a workload identity needs one")]
    NoPath(String),
    #[error("SPIFFE ID {0:?} is not a workload identity of the form spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>")]
    NotWorkload(String),
}

/// A validated trust domain name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TrustDomain(String);

impl TrustDomain {
    pub fn new(name: &str) -> Result<Self, SpiffeIdError> {
        validate_trust_domain(name)?;
        Ok(Self(name.to_string()))
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
    /// The trust domain's own SPIFFE ID (`spiffe://<td>`), as a signing CA may carry it.
    pub fn id(&self) -> String {
        format!("{SCHEME}{}", self.0)
    }
}

impl fmt::Display for TrustDomain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for TrustDomain {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// A validated SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: TrustDomain,
    /// Path including its leading '/', or empty.
    path: String,
}

impl SpiffeId {
    pub fn parse(s: &str) -> Result<Self, SpiffeIdError> {
        if s.is_empty() {
            return Err(SpiffeIdError::Empty);
        }
        if s.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong);
        }
        let rest = s
            .strip_prefix(SCHEME)
            .ok_or_else(|| SpiffeIdError::WrongScheme(s.to_string()))?;
        let (td, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        validate_trust_domain(td)?;
        validate_path(path)?;
        Ok(Self {
            trust_domain: TrustDomain(td.to_string()),
            path: path.to_string(),
        })
    }

    /// `spiffe://<td>/ns/<namespace>/sa/<service-account>`.
    pub fn for_workload(
        td: &TrustDomain,
        namespace: &str,
        service_account: &str,
    ) -> Result<Self, SpiffeIdError> {
        Self::parse(&format!("{SCHEME}{td}/ns/{namespace}/sa/{service_account}"))
    }

    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Namespace and service account of a Kubernetes-convention workload ID.
    pub fn workload(&self) -> Result<(&str, &str), SpiffeIdError> {
        let segs: Vec<&str> = self.path.split('/').skip(1).collect();
        match segs.as_slice() {
            ["ns", ns, "sa", sa] => Ok((ns, sa)),
            _ if self.path.is_empty() => Err(SpiffeIdError::NoPath(self.to_string())),
            _ => Err(SpiffeIdError::NotWorkload(self.to_string())),
        }
    }

    /// The ID without `spiffe://`, as AuthorizationPolicy principals are written.
    pub fn principal(&self) -> String {
        format!("{}{}", self.trust_domain, self.path)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}{}", self.trust_domain, self.path)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

fn validate_trust_domain(td: &str) -> Result<(), SpiffeIdError> {
    if td.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain);
    }
    if td.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong);
    }
    if let Some(c) = td
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::BadTrustDomainChar(td.to_string(), c));
    }
    Ok(())
}

fn validate_path(path: &str) -> Result<(), SpiffeIdError> {
    if path.is_empty() {
        return Ok(());
    }
    for seg in path.split('/').skip(1) {
        if seg.is_empty() || seg == "." || seg == ".." {
            return Err(SpiffeIdError::BadSegment(seg.to_string()));
        }
        if let Some(c) = seg
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')))
        {
            return Err(SpiffeIdError::BadPathChar(seg.to_string(), c));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_ids() {
        for s in [
            "spiffe://cluster.local/ns/default/sa/web",
            "spiffe://example.org",
            "spiffe://a-b_c.d/x/y.z/A_B-9",
            "spiffe://td/...a/b",
        ] {
            let id = SpiffeId::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            assert_eq!(id.to_string(), s);
        }
        let id = SpiffeId::parse("spiffe://cluster.local/ns/prod/sa/api").unwrap();
        assert_eq!(id.trust_domain().as_str(), "cluster.local");
        assert_eq!(id.path(), "/ns/prod/sa/api");
        assert_eq!(id.workload().unwrap(), ("prod", "api"));
        assert_eq!(id.principal(), "cluster.local/ns/prod/sa/api");
    }

    #[test]
    fn invalid_ids() {
        use SpiffeIdError::*;
        type Check = fn(&SpiffeIdError) -> bool;
        let cases: &[(&str, Check)] = &[
            ("", |e| matches!(e, Empty)),
            ("http://cluster.local/ns/a", |e| matches!(e, WrongScheme(_))),
            ("SPIFFE://cluster.local/a", |e| matches!(e, WrongScheme(_))),
            ("spiffe://", |e| matches!(e, EmptyTrustDomain)),
            ("spiffe:///ns/a", |e| matches!(e, EmptyTrustDomain)),
            ("spiffe://Cluster.local/a", |e| {
                matches!(e, BadTrustDomainChar(_, 'C'))
            }),
            ("spiffe://td:8080/a", |e| {
                matches!(e, BadTrustDomainChar(_, ':'))
            }),
            ("spiffe://user@td/a", |e| {
                matches!(e, BadTrustDomainChar(_, '@'))
            }),
            ("spiffe://t%41d/a", |e| {
                matches!(e, BadTrustDomainChar(_, '%'))
            }),
            ("spiffe://td/", |e| matches!(e, BadSegment(_))),
            ("spiffe://td/a/", |e| matches!(e, BadSegment(_))),
            ("spiffe://td/a//b", |e| matches!(e, BadSegment(_))),
            ("spiffe://td/./a", |e| matches!(e, BadSegment(_))),
            ("spiffe://td/a/..", |e| matches!(e, BadSegment(_))),
            ("spiffe://td/a%20b", |e| matches!(e, BadPathChar(_, '%'))),
            ("spiffe://td/a?q=1", |e| matches!(e, BadPathChar(_, '?'))),
            ("spiffe://td/a#f", |e| matches!(e, BadPathChar(_, '#'))),
        ];
        for (s, ok) in cases {
            let e = SpiffeId::parse(s).expect_err(s);
            assert!(ok(&e), "{s}: unexpected error {e:?}");
        }
        let long_td = format!("spiffe://{}/a", "a".repeat(256));
        assert_eq!(SpiffeId::parse(&long_td), Err(TrustDomainTooLong));
        let long = format!("spiffe://td/{}", "a".repeat(2100));
        assert_eq!(SpiffeId::parse(&long), Err(TooLong));
    }

    #[test]
    fn workload_convention() {
        let td = TrustDomain::new("cluster.local").unwrap();
        let id = SpiffeId::for_workload(&td, "ns1", "sa1").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/ns1/sa/sa1");
        assert!(matches!(
            SpiffeId::parse("spiffe://td/node/n1").unwrap().workload(),
            Err(SpiffeIdError::NotWorkload(_))
        ));
        assert!(matches!(
            SpiffeId::parse("spiffe://td").unwrap().workload(),
            Err(SpiffeIdError::NoPath(_))
        ));
        assert!(SpiffeId::for_workload(&td, "bad/ns", "sa").is_ok_and(|id| id.workload().is_err()));
    }
}
