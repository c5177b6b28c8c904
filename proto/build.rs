//! Compiles `weft/v1/*.proto` with protox (pure Rust), so a fresh machine needs no protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["weft/v1/config.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
