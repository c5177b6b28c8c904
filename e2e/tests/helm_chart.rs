//! The Helm chart's tests (charts/weft/tests/test_chart.py) with the real Helm SDK
//! (PyPI helm-python-sdk) and Kubernetes schemas (PyPI kubernetes-validate), in a
//! virtualenv cached at ~/.cache/weft/venv (WEFT_VENV overrides; see
//! `weft_e2e::helm`).

#![forbid(unsafe_code)]

use std::path::Path;
use std::process::Command;

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
    let python = weft_e2e::helm::venv_python().unwrap_or_else(|e| panic!("{e:#}"));
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
