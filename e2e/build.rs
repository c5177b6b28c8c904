//! Links the in-process L7 benchmark with the node agent's hot code layout
//! (node-dataplane/link/README.md), so that what it measures and what
//! gen-hot-text.py reads from it match the agent.

fn main() {
    let script =
        std::path::PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
            .join("../node-dataplane/link/hot-text.ld");
    println!("cargo:rerun-if-changed={}", script.display());
    println!(
        "cargo:rustc-link-arg-bin=weft-bench-l7-path=-Wl,-T,{}",
        script.display()
    );
}
