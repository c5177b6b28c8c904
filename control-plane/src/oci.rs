//! Pulling a Wasm plugin from an OCI registry (`oci://` WasmPlugin URLs), the
//! three requests of the distribution API the control plane needs: a manifest, a
//! blob, and the token a registry may ask for first. Every response is read
//! through a limit ([`MAX_MANIFEST_BYTES`], the module limit) within the caller's
//! time limit, and every blob is checked against its digest.
//!
//! The two layouts in use are accepted (as Istio accepts them):
//! - a Wasm artifact: a layer of media type `application/vnd.module.wasm.content.
//!   layer.v1+wasm` (or the CNCF `application/vnd.wasm.content.layer.v1+wasm`)
//!   holding the module itself;
//! - an image (Docker v2 or OCI) whose last layer is a tar (gzip or not) holding
//!   `plugin.wasm`.
//!
//! An image index (or Docker manifest list) is followed one level, to the entry
//! for `wasi`/`wasm` if there is one, else its first.
//!
//! Registries on a loopback address are spoken to in plain HTTP (as Docker does);
//! every other registry over HTTPS.

use sha2::{Digest, Sha256};
use std::io::Read;
use std::time::Duration;
use thiserror::Error;

/// Largest manifest (or token response) read.
pub const MAX_MANIFEST_BYTES: u64 = 4 << 20;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const WASM_LAYERS: &[&str] = &[
    "application/vnd.module.wasm.content.layer.v1+wasm",
    "application/vnd.wasm.content.layer.v1+wasm",
];
const GZIP_LAYERS: &[&str] = &[
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
    "application/vnd.oci.image.layer.v1.tar+gzip",
];
const TAR_LAYERS: &[&str] = &["application/vnd.oci.image.layer.v1.tar"];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OciError {
    #[error("{0:?} is not an OCI reference (oci://registry/repository[:tag][@sha256:digest])")]
    BadReference(String),
    #[error("{0}")]
    Fetch(String),
    #[error("the registry refused access: {0}")]
    Unauthorized(String),
    #[error("{what} is larger than {limit} bytes")]
    TooLarge { what: &'static str, limit: u64 },
    #[error("{what} does not match its digest: {detail}")]
    DigestMismatch { what: &'static str, detail: String },
    #[error("{0}")]
    Layout(String),
}

/// `oci://registry[:port]/repository[:tag][@sha256:hex]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub registry: String,
    pub repository: String,
    /// The tag (`latest` when neither a tag nor a digest is given).
    pub tag: Option<String>,
    /// `sha256:<hex>`.
    pub digest: Option<String>,
}

impl Reference {
    pub fn parse(url: &str) -> Result<Self, OciError> {
        let bad = || OciError::BadReference(url.to_string());
        let rest = url.strip_prefix("oci://").ok_or_else(bad)?;
        let (name, digest) = match rest.split_once('@') {
            Some((n, d)) => {
                let hex = d.strip_prefix("sha256:").ok_or_else(bad)?;
                if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                    return Err(bad());
                }
                (n, Some(format!("sha256:{}", hex.to_ascii_lowercase())))
            }
            None => (rest, None),
        };
        let (registry, path) = name.split_once('/').ok_or_else(bad)?;
        // A tag follows the last ':' after the last '/'.
        let (repository, tag) = match path.rsplit_once(':') {
            Some((r, t)) if !t.contains('/') => (r, Some(t.to_string())),
            _ => (path, None),
        };
        let tag = match (&tag, &digest) {
            (None, None) => Some("latest".to_string()),
            _ => tag,
        };
        let ok_part = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-/".contains(&b))
        };
        if registry.is_empty()
            || !registry
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
            || !ok_part(repository)
            || tag.as_deref().is_some_and(|t| {
                t.is_empty()
                    || t.len() > 128
                    || !t
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
            })
        {
            return Err(bad());
        }
        Ok(Self {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The tag or digest a manifest is asked for by.
    fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    fn base(&self) -> String {
        let host = self
            .registry
            .rsplit_once(':')
            .filter(|(_, port)| port.bytes().all(|b| b.is_ascii_digit()))
            .map_or(self.registry.as_str(), |(h, _)| h);
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        let scheme = if loopback { "http" } else { "https" };
        format!("{scheme}://{}/v2/{}", self.registry, self.repository)
    }
}

/// A pulled module: the digest of the manifest it came by, and its bytes.
#[derive(Debug)]
pub struct Pulled {
    /// `sha256:<hex>` of the image manifest (an index's entry, when followed).
    pub manifest_digest: String,
    pub module: Vec<u8>,
}

/// Registry credentials (from an image pull secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

/// The credentials for `registry` in a Docker `config.json` (the
/// `.dockerconfigjson` of a `kubernetes.io/dockerconfigjson` Secret): an `auths`
/// entry keyed by the registry's host (`host[:port]`, optionally with a scheme
/// and a path, as `https://index.docker.io/v1/`), holding `auth`
/// (base64 `user:password`) or `username` and `password`. `None`: no entry.
pub fn credentials_for(config: &[u8], registry: &str) -> Result<Option<Credentials>, String> {
    use base64::Engine as _;
    let v: serde_json::Value =
        serde_json::from_slice(config).map_err(|e| format!("not a Docker config.json: {e}"))?;
    let auths = v["auths"]
        .as_object()
        .ok_or("no \"auths\" object in the Docker config.json")?;
    let host = |k: &str| {
        let k = k
            .strip_prefix("https://")
            .or_else(|| k.strip_prefix("http://"))
            .unwrap_or(k);
        k.split('/').next().unwrap_or(k).to_string()
    };
    let want = if registry == "docker.io" {
        "index.docker.io"
    } else {
        registry
    };
    let Some(entry) = auths.iter().find(|(k, _)| host(k) == want).map(|(_, e)| e) else {
        return Ok(None);
    };
    if let (Some(u), Some(p)) = (entry["username"].as_str(), entry["password"].as_str()) {
        return Ok(Some(Credentials {
            username: u.to_string(),
            password: p.to_string(),
        }));
    }
    let auth = entry["auth"].as_str().ok_or_else(|| {
        format!("the entry for {registry} has neither auth nor username and password")
    })?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(auth)
        .map_err(|e| format!("the entry for {registry}: auth is not base64: {e}"))?;
    let text = String::from_utf8(decoded)
        .map_err(|_| format!("the entry for {registry}: auth is not text"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| format!("the entry for {registry}: auth is not user:password"))?;
    Ok(Some(Credentials {
        username: u.to_string(),
        password: p.to_string(),
    }))
}

struct Session<'a> {
    agent: ureq::Agent,
    r: &'a Reference,
    creds: Option<&'a Credentials>,
    /// The Authorization header a challenge asked for.
    auth: Option<String>,
    max_module: u64,
}

/// Pulls the module `r` names, within `timeout`, at most `max_module` bytes.
pub fn pull(
    r: &Reference,
    creds: Option<&Credentials>,
    timeout: Duration,
    max_module: u64,
) -> Result<Pulled, OciError> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(timeout))
        .http_status_as_error(false)
        .build()
        .into();
    let mut s = Session {
        agent,
        r,
        creds,
        auth: None,
        max_module,
    };
    let (mut manifest, mut digest) = s.manifest(r.reference())?;
    if let Some(want) = &r.digest {
        if *want != digest {
            return Err(OciError::DigestMismatch {
                what: "the manifest",
                detail: format!("got {digest}, asked for {want}"),
            });
        }
    }
    let media = media_type(&manifest);
    if media == OCI_INDEX || media == DOCKER_LIST {
        let entry = pick(&manifest)?;
        (manifest, digest) = s.manifest(&entry)?;
        if digest != entry {
            return Err(OciError::DigestMismatch {
                what: "the index's manifest",
                detail: format!("got {digest}, the index names {entry}"),
            });
        }
    }
    let module = s.module(&manifest)?;
    Ok(Pulled {
        manifest_digest: digest,
        module,
    })
}

fn media_type(m: &serde_json::Value) -> &str {
    m["mediaType"].as_str().unwrap_or(OCI_MANIFEST)
}

/// The manifest an index names for Wasm, else its first.
fn pick(index: &serde_json::Value) -> Result<String, OciError> {
    let entries = index["manifests"].as_array().cloned().unwrap_or_default();
    let wasm = entries.iter().find(|e| {
        let p = &e["platform"];
        p["os"].as_str().is_some_and(|o| o.starts_with("wasi"))
            || p["architecture"].as_str() == Some("wasm")
    });
    wasm.or(entries.first())
        .and_then(|e| e["digest"].as_str())
        .map(String::from)
        .ok_or_else(|| OciError::Layout("the image index names no manifest".into()))
}

fn sha256_of(b: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(b)))
}

impl Session<'_> {
    /// GET `path` under the repository, answering one authentication challenge.
    fn get(
        &mut self,
        path: &str,
        accept: &str,
    ) -> Result<ureq::http::Response<ureq::Body>, OciError> {
        let url = format!("{}/{path}", self.r.base());
        for _ in 0..2 {
            let mut req = self.agent.get(&url).header("Accept", accept);
            if let Some(a) = &self.auth {
                req = req.header("Authorization", a);
            }
            let resp = req
                .call()
                .map_err(|e| OciError::Fetch(format!("GET {url}: {e}")))?;
            match resp.status().as_u16() {
                200 => return Ok(resp),
                401 if self.auth.is_none() => {
                    let challenge = resp
                        .headers()
                        .get("www-authenticate")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or_default()
                        .to_string();
                    self.auth = Some(self.answer(&challenge)?);
                }
                401 | 403 => {
                    return Err(OciError::Unauthorized(format!(
                        "GET {url}: {}{}",
                        resp.status(),
                        if self.creds.is_none() {
                            " (no credentials: name a Secret in the WasmPlugin's imagePullSecret)"
                        } else {
                            ""
                        }
                    )))
                }
                s => return Err(OciError::Fetch(format!("GET {url}: status {s}"))),
            }
        }
        Err(OciError::Unauthorized(format!(
            "GET {url}: still refused after authenticating"
        )))
    }

    /// The Authorization header for a `WWW-Authenticate` challenge.
    fn answer(&self, challenge: &str) -> Result<String, OciError> {
        use base64::Engine as _;
        let basic = |c: &Credentials| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return self.creds.map(basic).ok_or_else(|| {
                OciError::Unauthorized(
                    "the registry asks for a password and the WasmPlugin has no imagePullSecret"
                        .into(),
                )
            });
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(OciError::Unauthorized(format!(
                "unsupported challenge {challenge:?}"
            )));
        }
        let param = |k: &str| {
            params.split(',').find_map(|kv| {
                let (key, v) = kv.trim().split_once('=')?;
                (key.eq_ignore_ascii_case(k)).then(|| v.trim_matches('"').to_string())
            })
        };
        let realm = param("realm")
            .ok_or_else(|| OciError::Unauthorized(format!("no realm in {challenge:?}")))?;
        let scope =
            param("scope").unwrap_or_else(|| format!("repository:{}:pull", self.r.repository));
        let mut req = self.agent.get(&realm).query("scope", &scope);
        if let Some(service) = param("service") {
            req = req.query("service", &service);
        }
        if let Some(c) = self.creds {
            req = req.header("Authorization", &basic(c));
        }
        let resp = req
            .call()
            .map_err(|e| OciError::Fetch(format!("token from {realm}: {e}")))?;
        if resp.status() != 200 {
            return Err(OciError::Unauthorized(format!(
                "token from {realm}: {}",
                resp.status()
            )));
        }
        let body = read_limited(resp, MAX_MANIFEST_BYTES, "the token response")?;
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| OciError::Fetch(format!("token from {realm}: {e}")))?;
        let token = v["token"]
            .as_str()
            .or(v["access_token"].as_str())
            .ok_or_else(|| OciError::Fetch(format!("token from {realm}: no token")))?;
        Ok(format!("Bearer {token}"))
    }

    /// A manifest (any of the four kinds) and its digest.
    fn manifest(&mut self, reference: &str) -> Result<(serde_json::Value, String), OciError> {
        let accept = [OCI_MANIFEST, DOCKER_MANIFEST, OCI_INDEX, DOCKER_LIST].join(", ");
        let resp = self.get(&format!("manifests/{reference}"), &accept)?;
        let body = read_limited(resp, MAX_MANIFEST_BYTES, "the manifest")?;
        let digest = sha256_of(&body);
        let v: serde_json::Value = serde_json::from_slice(&body)
            .map_err(|e| OciError::Layout(format!("the manifest is not JSON: {e}")))?;
        Ok((v, digest))
    }

    /// A blob named by a descriptor, checked against its size and digest.
    fn blob(&mut self, desc: &serde_json::Value) -> Result<Vec<u8>, OciError> {
        let digest = desc["digest"]
            .as_str()
            .filter(|d| d.starts_with("sha256:"))
            .ok_or_else(|| OciError::Layout("a layer has no sha256 digest".into()))?
            .to_string();
        if desc["size"].as_u64().is_some_and(|n| n > self.max_module) {
            return Err(OciError::TooLarge {
                what: "the layer",
                limit: self.max_module,
            });
        }
        let resp = self.get(&format!("blobs/{digest}"), "*/*")?;
        let body = read_limited(resp, self.max_module, "the layer")?;
        let got = sha256_of(&body);
        if got != digest {
            return Err(OciError::DigestMismatch {
                what: "the layer",
                detail: format!("got {got}, the manifest names {digest}"),
            });
        }
        Ok(body)
    }

    /// The module in an image or artifact manifest.
    fn module(&mut self, m: &serde_json::Value) -> Result<Vec<u8>, OciError> {
        let layers = m["layers"].as_array().cloned().unwrap_or_default();
        let kind = |l: &serde_json::Value| l["mediaType"].as_str().unwrap_or_default().to_string();
        if let Some(l) = layers
            .iter()
            .find(|l| WASM_LAYERS.contains(&kind(l).as_str()))
        {
            return self.blob(l);
        }
        let Some(last) = layers.last() else {
            return Err(OciError::Layout("the manifest has no layers".into()));
        };
        let k = kind(last);
        let gzip = GZIP_LAYERS.contains(&k.as_str());
        if !gzip && !TAR_LAYERS.contains(&k.as_str()) {
            return Err(OciError::Layout(format!(
                "no Wasm layer ({}) and the last layer ({k:?}) is not a tar holding plugin.wasm",
                WASM_LAYERS.join(" or ")
            )));
        }
        let blob = self.blob(last)?;
        plugin_from_tar(&blob, gzip, self.max_module)
    }
}

fn read_limited(
    resp: ureq::http::Response<ureq::Body>,
    limit: u64,
    what: &'static str,
) -> Result<Vec<u8>, OciError> {
    resp.into_body()
        .with_config()
        .limit(limit)
        .read_to_vec()
        .map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => OciError::TooLarge { what, limit },
            e => OciError::Fetch(format!("reading {what}: {e}")),
        })
}

/// `plugin.wasm` from a (gzipped) tar layer, at most `limit` bytes of it.
pub fn plugin_from_tar(blob: &[u8], gzip: bool, limit: u64) -> Result<Vec<u8>, OciError> {
    let reader: Box<dyn Read> = if gzip {
        Box::new(flate2::read::GzDecoder::new(blob))
    } else {
        Box::new(blob)
    };
    let bad = |e: std::io::Error| OciError::Layout(format!("the layer is not a readable tar: {e}"));
    let mut archive = tar::Archive::new(reader);
    for entry in archive.entries().map_err(bad)? {
        let entry = entry.map_err(bad)?;
        let path = entry.path().map_err(bad)?;
        if path.file_name().and_then(|n| n.to_str()) != Some("plugin.wasm")
            || !entry.header().entry_type().is_file()
        {
            continue;
        }
        if entry.header().size().map_err(bad)? > limit {
            return Err(OciError::TooLarge {
                what: "plugin.wasm",
                limit,
            });
        }
        let mut out = Vec::new();
        entry.take(limit + 1).read_to_end(&mut out).map_err(bad)?;
        if out.len() as u64 > limit {
            return Err(OciError::TooLarge {
                what: "plugin.wasm",
                limit,
            });
        }
        return Ok(out);
    }
    Err(OciError::Layout(
        "the image's last layer holds no plugin.wasm".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = Reference::parse("oci://127.0.0.1:5000/plugins/gate:v1").unwrap();
        assert_eq!(
            (
                r.registry.as_str(),
                r.repository.as_str(),
                r.tag.as_deref(),
                r.digest.clone()
            ),
            ("127.0.0.1:5000", "plugins/gate", Some("v1"), None)
        );
        assert_eq!(r.base(), "http://127.0.0.1:5000/v2/plugins/gate");
        let r = Reference::parse("oci://ghcr.io/acme/gate").unwrap();
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.base(), "https://ghcr.io/v2/acme/gate");
        let d = "a".repeat(64);
        let r = Reference::parse(&format!("oci://localhost:5000/gate@sha256:{d}")).unwrap();
        assert_eq!(
            (r.tag.clone(), r.digest.clone()),
            (None, Some(format!("sha256:{d}")))
        );
        assert_eq!(r.reference(), format!("sha256:{d}"));
        for bad in [
            "http://x/y",
            "oci://registry-only",
            "oci://r/Upper",
            "oci://r/x:",
            "oci://r/x@sha256:abc",
            "oci://r/x@md5:aaaa",
            "oci:///x",
        ] {
            assert!(Reference::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn docker_config_credentials() {
        let cfg = br#"{"auths": {
            "https://index.docker.io/v1/": {"auth": "ZG9jOmh1Yg=="},
            "127.0.0.1:5000": {"auth": "cHVsbGVyOnMzY3JldDp3aXRoOmNvbG9ucw=="},
            "http://reg.example:8443": {"username": "u", "password": "p"}
        }}"#;
        let c = |r: &str| {
            credentials_for(cfg, r)
                .unwrap()
                .map(|c| (c.username, c.password))
        };
        assert_eq!(c("docker.io"), Some(("doc".into(), "hub".into())));
        assert_eq!(
            c("127.0.0.1:5000"),
            Some(("puller".into(), "s3cret:with:colons".into()))
        );
        assert_eq!(c("reg.example:8443"), Some(("u".into(), "p".into())));
        assert_eq!(c("other.example"), None);
        assert!(credentials_for(b"{}", "x").is_err());
        assert!(credentials_for(br#"{"auths": {"x": {"auth": "!!"}}}"#, "x").is_err());
        assert!(credentials_for(br#"{"auths": {"x": {}}}"#, "x").is_err());
    }

    fn tar_with(name: &str, content: &[u8], gzip: bool) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(content.len() as u64);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, name, content).unwrap();
        let t = b.into_inner().unwrap();
        if !gzip {
            return t;
        }
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut e, &t).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn plugin_wasm_from_tar_layers_bounded() {
        let wasm = b"\0asm\x01\0\0\0";
        assert_eq!(
            plugin_from_tar(&tar_with("plugin.wasm", wasm, true), true, 100).unwrap(),
            wasm
        );
        assert_eq!(
            plugin_from_tar(&tar_with("./x/plugin.wasm", wasm, false), false, 100).unwrap(),
            wasm
        );
        assert!(matches!(
            plugin_from_tar(&tar_with("other.wasm", wasm, true), true, 100),
            Err(OciError::Layout(_))
        ));
        assert_eq!(
            plugin_from_tar(&tar_with("plugin.wasm", &[0; 200], true), true, 100),
            Err(OciError::TooLarge {
                what: "plugin.wasm",
                limit: 100
            })
        );
        // A gzip bomb stops at the limit: 64 MiB of zeros in a small layer.
        let bomb = tar_with("plugin.wasm", &vec![0; 64 << 20], true);
        assert!(bomb.len() < 1 << 20);
        assert!(matches!(
            plugin_from_tar(&bomb, true, 1 << 20),
            Err(OciError::TooLarge { .. })
        ));
        assert!(matches!(
            plugin_from_tar(b"junk", true, 100),
            Err(OciError::Layout(_))
        ));
    }
}
