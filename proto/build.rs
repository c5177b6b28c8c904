//! Compiles `weft/v1/*.proto` and the SPIFFE Workload API (`spiffe/workload.proto`)
//! with protox (pure Rust), so a fresh machine needs no protoc.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["weft/v1/config.proto", "spiffe/workload.proto"];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["."])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // Ordered maps: a resource's version is the hash of its encoding, which must
        // not depend on a HashMap's iteration order (found by the `manifest` fuzz
        // target's determinism property).
        .btree_map(".weft.v1")
        // Config dumps and status output are JSON.
        .type_attribute(".weft.v1", "#[derive(serde::Serialize)]")
        .field_attribute(
            "weft.v1.AuthorizationPolicy.action",
            "#[serde(serialize_with = \"crate::serde_enums::action\")]",
        )
        .compile_fds(fds)?;
    Ok(())
}
