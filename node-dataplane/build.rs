//! Compiles the eBPF programs in ../ebpf with clang (-target bpf) and embeds them,
//! and links weft-node with its hot code layout (link/README.md).
use std::path::PathBuf;
use std::process::Command;

fn main() {
    hot_text();
    let root =
        PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir")).join("../ebpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("out dir"));
    println!("cargo:rerun-if-changed={}", root.join("src").display());
    println!("cargo:rerun-if-changed={}", root.join("include").display());
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".into());
    let programs: &[&str] = &["capture", "inbound"];
    for prog in programs {
        let src = root.join("src").join(format!("{prog}.c"));
        let obj = out.join(format!("{prog}.o"));
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-I")
            .arg(root.join("include"))
            .args(["-I", "/usr/include/x86_64-linux-gnu"])
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status();
        match status {
            Ok(s) if s.success() => {}
            Ok(s) => panic!("clang failed to compile {} ({s})", src.display()),
            Err(e) => panic!(
                "cannot run {clang} to compile the eBPF programs ({e}); install clang and libbpf-dev (`make setup` does)"
            ),
        }
    }
}

/// Places the functions the agent runs for every request together at the start of
/// its code (link/README.md): fewer code pages and TLB entries per request. Release
/// builds only (the shipped binary; tests and debug builds link as usual), and not
/// with `WEFT_HOT_TEXT=off` (to measure the agent without it).
fn hot_text() {
    println!("cargo:rerun-if-env-changed=WEFT_HOT_TEXT");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let off = std::env::var("WEFT_HOT_TEXT").is_ok_and(|v| v == "off");
    if !release || off {
        return;
    }
    let script = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .join("link/hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!(
        "cargo:rustc-link-arg-bin=weft-node=-Wl,-T,{}",
        script.display()
    );
}
