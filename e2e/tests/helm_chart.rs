//! The Helm chart's tests (charts/weft/tests/test_chart.py) with the real Helm SDK
//! (PyPI helm-python-sdk) and Kubernetes schemas (PyPI kubernetes-validate), in a
//! virtualenv cached at ~/.cache/weft/venv (WEFT_VENV overrides).

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

const PACKAGES: &[&str] = &[
    "helm-python-sdk==0.2.2",
    "kubernetes-validate==1.37.0",
    "PyYAML==6.0.3",
];

fn venv() -> PathBuf {
    if let Ok(v) = std::env::var("WEFT_VENV") {
        return PathBuf::from(v);
    }
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
    Path::new(&home).join(".cache/weft/venv")
}

fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn helm_chart_lints_renders_and_validates() {
    let venv = venv();
    let python = venv.join("bin/python");
    let stamp = venv.join(".weft-packages");
    let wanted = PACKAGES.join("\n");
    if std::fs::read_to_string(&stamp).ok().as_deref() != Some(wanted.as_str()) {
        if !python.exists() {
            run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
        }
        run(Command::new(&python)
            .args(["-m", "pip", "install", "-q", "--disable-pip-version-check"])
            .args(PACKAGES));
        std::fs::write(&stamp, &wanted).unwrap();
    }
    let tests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/weft/tests");
    // The suite's binaries, to check the rendered command lines against.
    let bin_dir = weft_e2e::bin_path("weft-node")
        .expect("weft-node binary")
        .parent()
        .expect("binary directory")
        .to_path_buf();
    run(Command::new(&python)
        .args(["-m", "unittest", "discover", "-v", "-s"])
        .arg(&tests)
        .env("WEFT_BIN_DIR", &bin_dir));
}
