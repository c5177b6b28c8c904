//! Installs `weft-cni` on a node (the DaemonSet's init container runs
//! `weft-cni install`): copies the plugin binary into the CNI bin directory and
//! appends `{"type": "weft-cni"}` to the plugin chain of the node's network
//! configuration (the first `.conflist` in name order, which is the one the
//! container runtime uses). Both writes are atomic (temp file + rename) and the
//! step is idempotent: a chain that already has weft-cni is left as it is.

use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const PLUGIN_TYPE: &str = "weft-cni";

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid CNI network configuration JSON: {message}")]
    BadConfig { path: PathBuf, message: String },
    #[error("no .conflist in {dir} after waiting {waited:?} (the cluster's network plugin writes it; only .conflist chains can be extended{conf_hint})")]
    NoConfList {
        dir: PathBuf,
        waited: Duration,
        conf_hint: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |source| InstallError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InstallError> {
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("weft-tmp");
    std::fs::write(&tmp, bytes).map_err(io(&tmp))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

/// The network configuration the runtime uses: the first `.conflist` by name.
fn first_conflist(dir: &Path) -> Result<(Option<PathBuf>, Vec<PathBuf>), InstallError> {
    let mut lists = Vec::new();
    let mut confs = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((None, confs)),
        Err(e) => return Err(io(dir)(e)),
    };
    for e in entries {
        let p = e.map_err(io(dir))?.path();
        match p.extension().and_then(|x| x.to_str()) {
            Some("conflist") => lists.push(p),
            Some("conf") | Some("json") => confs.push(p),
            _ => {}
        }
    }
    lists.sort();
    Ok((lists.into_iter().next(), confs))
}

/// Appends weft-cni to the chain in `text`; `None` when it is already there.
pub fn chain_with_weft(
    path: &Path,
    text: &str,
    socket: &str,
) -> Result<Option<String>, InstallError> {
    let bad = |message: String| InstallError::BadConfig {
        path: path.to_path_buf(),
        message,
    };
    let mut v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let plugins = v
        .get_mut("plugins")
        .and_then(Value::as_array_mut)
        .ok_or_else(|| bad("no \"plugins\" list".into()))?;
    if plugins
        .iter()
        .any(|p| p.get("type").and_then(Value::as_str) == Some(PLUGIN_TYPE))
    {
        return Ok(None);
    }
    plugins.push(json!({ "type": PLUGIN_TYPE, "agentSocket": socket }));
    serde_json::to_string_pretty(&v)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// Copies the plugin and extends the chain, waiting up to `wait` for the
/// network plugin's `.conflist` to appear. Returns the configuration file used.
pub fn install(
    plugin_binary: &Path,
    bin_dir: &Path,
    conf_dir: &Path,
    socket: &str,
    wait: Duration,
) -> Result<PathBuf, InstallError> {
    std::fs::create_dir_all(bin_dir).map_err(io(bin_dir))?;
    let bytes = std::fs::read(plugin_binary).map_err(io(plugin_binary))?;
    write_atomic(&bin_dir.join(PLUGIN_TYPE), &bytes, 0o755)?;
    let start = Instant::now();
    loop {
        let (list, confs) = first_conflist(conf_dir)?;
        if let Some(path) = list {
            let text = std::fs::read_to_string(&path).map_err(io(&path))?;
            if let Some(new) = chain_with_weft(&path, &text, socket)? {
                write_atomic(&path, new.as_bytes(), 0o644)?;
            }
            return Ok(path);
        }
        if start.elapsed() >= wait {
            let conf_hint = if confs.is_empty() {
                String::new()
            } else {
                format!(
                    "; found single-plugin configurations, convert them to a .conflist: {}",
                    confs
                        .iter()
                        .map(|p| p.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            };
            return Err(InstallError::NoConfList {
                dir: conf_dir.to_path_buf(),
                waited: wait,
                conf_hint,
            });
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Removes weft-cni from the chain in `text`; `None` when it is not there.
pub fn unchain_weft(path: &Path, text: &str) -> Result<Option<String>, InstallError> {
    let bad = |message: String| InstallError::BadConfig {
        path: path.to_path_buf(),
        message,
    };
    let mut v: Value = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    let Some(plugins) = v.get_mut("plugins").and_then(Value::as_array_mut) else {
        return Ok(None);
    };
    let before = plugins.len();
    plugins.retain(|p| p.get("type").and_then(Value::as_str) != Some(PLUGIN_TYPE));
    if plugins.len() == before {
        return Ok(None);
    }
    serde_json::to_string_pretty(&v)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// Undoes [`install`]: removes weft-cni from the chain of every `.conflist` in
/// `conf_dir` and the plugin binary from `bin_dir`. Returns the configuration files
/// changed. Safe to run again.
pub fn uninstall(bin_dir: &Path, conf_dir: &Path) -> Result<Vec<PathBuf>, InstallError> {
    let mut changed = Vec::new();
    let entries = match std::fs::read_dir(conf_dir) {
        Ok(e) => e.collect::<Result<Vec<_>, _>>().map_err(io(conf_dir))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(io(conf_dir)(e)),
    };
    for e in entries {
        let path = e.path();
        if path.extension().and_then(|x| x.to_str()) != Some("conflist") {
            continue;
        }
        let text = std::fs::read_to_string(&path).map_err(io(&path))?;
        if let Some(new) = unchain_weft(&path, &text)? {
            write_atomic(&path, new.as_bytes(), 0o644)?;
            changed.push(path);
        }
    }
    let bin = bin_dir.join(PLUGIN_TYPE);
    match std::fs::remove_file(&bin) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(&bin)(e)),
    }
    Ok(changed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BRIDGE: &str = r#"{"cniVersion":"1.0.0","name":"podnet","plugins":[{"type":"bridge","bridge":"cni0"},{"type":"portmap"}]}"#;

    #[test]
    fn appends_once_and_copies_the_binary() {
        let d = tempfile::tempdir().unwrap();
        let (bin, conf) = (d.path().join("bin"), d.path().join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("10-podnet.conflist"), BRIDGE).unwrap();
        std::fs::write(conf.join("20-other.conflist"), BRIDGE).unwrap();
        let plugin = d.path().join("weft-cni-src");
        std::fs::write(&plugin, b"\x7fELF...").unwrap();
        for _ in 0..2 {
            let used = install(
                &plugin,
                &bin,
                &conf,
                "/var/run/weft/cni.sock",
                Duration::ZERO,
            )
            .unwrap();
            assert_eq!(used, conf.join("10-podnet.conflist"));
        }
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(conf.join("10-podnet.conflist")).unwrap(),
        )
        .unwrap();
        let types: Vec<&str> = v["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, vec!["bridge", "portmap", "weft-cni"]);
        assert_eq!(v["plugins"][2]["agentSocket"], "/var/run/weft/cni.sock");
        // The other configuration is not the runtime's: untouched.
        assert_eq!(
            std::fs::read_to_string(conf.join("20-other.conflist")).unwrap(),
            BRIDGE
        );
        assert_eq!(std::fs::read(bin.join("weft-cni")).unwrap(), b"\x7fELF...");
    }

    #[test]
    fn clear_errors() {
        let d = tempfile::tempdir().unwrap();
        let plugin = d.path().join("p");
        std::fs::write(&plugin, b"x").unwrap();
        let conf = d.path().join("net.d");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("10-bridge.conf"), "{}").unwrap();
        let e = install(&plugin, &d.path().join("bin"), &conf, "s", Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("no .conflist in"), "{e}");
        assert!(e.contains("10-bridge.conf"), "{e}");
        std::fs::write(conf.join("10-bad.conflist"), "{\"plugins\": 3}").unwrap();
        let e = install(&plugin, &d.path().join("bin"), &conf, "s", Duration::ZERO)
            .unwrap_err()
            .to_string();
        assert!(e.contains("10-bad.conflist"), "{e}");
        assert!(e.contains("no \"plugins\" list"), "{e}");
    }

    #[test]
    fn uninstall_restores_the_chain_and_removes_the_binary() {
        let d = tempfile::tempdir().unwrap();
        let (bin, conf) = (d.path().join("bin"), d.path().join("net.d"));
        std::fs::create_dir_all(&conf).unwrap();
        let list = conf.join("10-podnet.conflist");
        std::fs::write(&list, BRIDGE).unwrap();
        let plugin = d.path().join("weft-cni-src");
        std::fs::write(&plugin, b"binary").unwrap();
        install(
            &plugin,
            &bin,
            &conf,
            "/var/run/weft/cni.sock",
            Duration::ZERO,
        )
        .unwrap();
        assert!(bin.join(PLUGIN_TYPE).exists());
        assert_eq!(uninstall(&bin, &conf).unwrap(), vec![list.clone()]);
        assert!(!bin.join(PLUGIN_TYPE).exists());
        let v: Value = serde_json::from_str(&std::fs::read_to_string(&list).unwrap()).unwrap();
        let original: Value = serde_json::from_str(BRIDGE).unwrap();
        assert_eq!(v, original, "the chain is the network plugin's again");
        // Again: nothing to do, no error.
        assert!(uninstall(&bin, &conf).unwrap().is_empty());
    }
}
