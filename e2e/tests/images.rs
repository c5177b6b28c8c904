//! The container images `images/build` makes (no container engine, no base image):
//! each holds what the Helm chart runs, with the entrypoint and user the chart
//! expects, and every binary starts from the image's own files alone. The CNI
//! plugin, which runs on the host, needs no library at all.

#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use weft_e2e::netlab::require_root;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The image's config (`skopeo inspect --config`).
fn config(archive: &Path) -> serde_json::Value {
    let json = run(Command::new("skopeo")
        .arg("inspect")
        .arg("--config")
        .arg(format!("oci-archive:{}", archive.display())));
    serde_json::from_str(&json).expect("image config JSON")
}

/// The image runs `entrypoint` as `user` on linux/amd64.
fn check_config(archive: &Path, entrypoint: &str, user: &str) {
    let c = config(archive);
    let what = archive.display();
    assert_eq!(
        c["config"]["Entrypoint"],
        serde_json::json!([entrypoint]),
        "{what}"
    );
    assert_eq!(c["config"]["User"], user, "{what}");
    assert_eq!(
        (c["os"].as_str(), c["architecture"].as_str()),
        (Some("linux"), Some("amd64")),
        "{what}"
    );
}

/// Unpacks the image into `dir` and returns its root filesystem.
fn unpack(archive: &Path, tag: &str, dir: &Path) -> PathBuf {
    let layout = dir.join("layout");
    std::fs::create_dir_all(&layout).unwrap();
    run(Command::new("tar")
        .arg("-xf")
        .arg(archive)
        .arg("-C")
        .arg(&layout));
    let bundle = dir.join("bundle");
    run(Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:{tag}", layout.display()))
        .arg(&bundle));
    bundle.join("rootfs")
}

/// Runs `argv` inside `rootfs` (chroot) with `env`; returns stdout.
fn in_root(rootfs: &Path, env: &[(&str, &str)], argv: &[&str]) -> String {
    let mut cmd = Command::new("/usr/sbin/chroot");
    cmd.arg(rootfs).args(argv).env_clear();
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.stdin(std::process::Stdio::null());
    run(&mut cmd)
}

#[test]
fn images_hold_what_the_chart_runs() {
    require_root();
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("images");
    let tag = "e2e";
    // The suite has built the debug binaries (make test: cargo build --workspace --bins).
    run(Command::new(repo().join("images/build"))
        .args(["--profile", "debug", "--tag", tag, "--out"])
        .arg(&out));

    let node = out.join(format!("weft-node-{tag}.oci.tar"));
    // The agent runs as root (eBPF, netns), as the chart's securityContext says.
    check_config(&node, "/usr/local/bin/weft-node", "0:0");
    let rootfs = unpack(&node, tag, &tmp.path().join("node"));
    let path = [("PATH", "/usr/local/bin")];
    assert!(in_root(&rootfs, &path, &["weft-node", "--version"]).starts_with("weft-node "));
    // The chart's init container runs `weft-cni install`; as a CNI plugin it answers VERSION.
    let version = in_root(
        &rootfs,
        &[("PATH", "/usr/local/bin"), ("CNI_COMMAND", "VERSION")],
        &["weft-cni"],
    );
    assert!(version.contains("\"supportedVersions\""), "{version}");

    // weft-cni runs on the host: alone in an empty root, it still starts.
    let bare = tmp.path().join("bare");
    std::fs::create_dir_all(&bare).unwrap();
    std::fs::copy(rootfs.join("usr/local/bin/weft-cni"), bare.join("weft-cni")).unwrap();
    let version = in_root(&bare, &[("CNI_COMMAND", "VERSION")], &["/weft-cni"]);
    assert!(version.contains("\"supportedVersions\""), "{version}");

    let cp = out.join(format!("weft-control-plane-{tag}.oci.tar"));
    // The chart runs the control plane as 65532 (runAsUser) with its state on a volume.
    check_config(&cp, "/usr/local/bin/weft-control-plane", "65532:65532");
    let rootfs = unpack(&cp, tag, &tmp.path().join("cp"));
    assert!(
        in_root(&rootfs, &path, &["weft-control-plane", "--version"])
            .starts_with("weft-control-plane ")
    );
    assert!(in_root(&rootfs, &path, &["weftctl", "--version"]).starts_with("weftctl "));
    let passwd = std::fs::read_to_string(rootfs.join("etc/passwd")).unwrap();
    assert!(passwd.contains(":65532:65532:"), "{passwd}");
    assert!(rootfs.join("etc/ssl/certs/ca-certificates.crt").is_file());

    // The chart's default repositories name these images.
    let values = std::fs::read_to_string(repo().join("charts/weft/values.yaml")).unwrap();
    for name in ["weft-node", "weft-control-plane"] {
        assert!(
            values.contains(&format!("/{name}\n")),
            "values.yaml names no {name} image"
        );
    }
}
