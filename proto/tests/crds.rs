//! The committed CRD YAML in `crds/` must equal what the Rust types generate.
//! Regenerate with `make crds` (or `weft-control-plane crds --out crds`).

use kube::CustomResourceExt;
use std::path::Path;

#[test]
fn committed_crds_match_the_rust_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../crds");
    for (name, yaml) in weft_proto::crd::all_crd_yaml() {
        let path = dir.join(name);
        let committed = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}; run `make crds`", path.display()));
        assert!(
            committed == yaml,
            "{} differs from the CRD generated from the Rust types; run `make crds`",
            path.display()
        );
    }
}

#[test]
fn generated_yaml_is_the_crd() {
    // The YAML must round-trip to exactly the CRD object.
    let crds = [
        serde_json::to_value(weft_proto::crd::AuthorizationPolicy::crd()).unwrap(),
        serde_json::to_value(weft_proto::crd::PeerAuthentication::crd()).unwrap(),
        serde_json::to_value(weft_proto::crd::RequestAuthentication::crd()).unwrap(),
        serde_json::to_value(weft_proto::crd::WasmPlugin::crd()).unwrap(),
    ];
    let all = weft_proto::crd::all_crd_yaml();
    assert_eq!(all.len(), crds.len());
    for ((_, yaml), mut want) in all.iter().zip(crds) {
        let parsed: serde_json::Value = serde_yaml::from_str(yaml).unwrap();
        // The only change: `null` is not listed among an optional enum's values
        // (1.20 API servers reject the CRD otherwise).
        assert!(!yaml.contains("- null"), "{yaml}");
        drop_null_enum_values(&mut want);
        assert_eq!(parsed, want);
    }
    let ap = serde_json::to_value(weft_proto::crd::AuthorizationPolicy::crd()).unwrap();
    assert_eq!(ap["spec"]["group"], "security.weft.dev");
    assert_eq!(
        ap["spec"]["versions"][0]["subresources"]["status"],
        serde_json::json!({})
    );
    let wp = serde_json::to_value(weft_proto::crd::WasmPlugin::crd()).unwrap();
    assert_eq!(wp["spec"]["group"], "extensions.weft.dev");
}

fn drop_null_enum_values(v: &mut serde_json::Value) {
    if let Some(m) = v.as_object_mut() {
        if let Some(e) = m.get_mut("enum").and_then(|e| e.as_array_mut()) {
            e.retain(|x| !x.is_null());
        }
        m.values_mut().for_each(drop_null_enum_values);
    } else if let Some(a) = v.as_array_mut() {
        a.iter_mut().for_each(drop_null_enum_values);
    }
}
