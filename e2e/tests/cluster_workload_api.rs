//! The SPIFFE Workload API served by the node agent to its enrolled pods (issue
//! 29), used by a real client (the `spiffe` crate, in `weft-testapp spiffe`): a
//! process in a pod gets its own pod's X.509-SVID and a JWT-SVID signed by the
//! control plane (which validates), a process of another pod on the node gets that
//! pod's identity, and a process outside every pod (the node itself) is refused.
//! Root; runs in CI.

#![forbid(unsafe_code)]

use serde_json::Value;
use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

/// `weft-testapp spiffe` run in `pod` (its netns and cgroup), or on the node when
/// `pod` is `None`.
fn spiffe(c: &LocalCluster, pod: Option<&str>, endpoint: &str) -> Value {
    let app = bin_path("weft-testapp").unwrap();
    let args = ["spiffe", "--endpoint", endpoint, "--audience", "billing"];
    let out = match pod {
        Some(p) => c.run_app(p, &app, &args).unwrap().1,
        None => {
            let o = std::process::Command::new(&app)
                .args(args)
                .output()
                .unwrap();
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
    };
    serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"))
}

#[test]
fn enrolled_pods_get_their_own_identity_from_the_workload_api() {
    require_root();
    let mut c = LocalCluster::with_args(
        &["node-a"],
        &[],
        &["--workload-api-socket", "spiffe/socket"],
    )
    .unwrap();
    c.namespace("shop", true).unwrap();
    c.namespace("plain", false).unwrap();
    c.add_pod("shop", "web", "node-a", &[("app", "web")])
        .unwrap();
    c.add_pod("shop", "db", "node-a", &[("app", "db")]).unwrap();
    c.add_pod("plain", "tool", "node-a", &[]).unwrap();
    c.wait_enrolled("node-a", "shop/web").unwrap();
    c.wait_enrolled("node-a", "shop/db").unwrap();
    let socket = c.agent_state_dir("node-a").unwrap().join("spiffe/socket");
    let endpoint = format!("unix://{}", socket.display());
    // The harness gives each pod a ServiceAccount named after it.
    let web = "spiffe://cluster.local/ns/shop/sa/web";

    // The pod's own identity (certificates may take a moment after enrollment).
    let got = wait_until(Duration::from_secs(20), || {
        let v = spiffe(&c, Some("shop/web"), &endpoint);
        (v["x509_spiffe_id"] == web).then_some(v)
    })
    .unwrap_or_else(|| panic!("{}", spiffe(&c, Some("shop/web"), &endpoint)));
    assert!(got["x509_chain"].as_u64().unwrap() >= 1, "{got}");
    assert_eq!(got["jwt_spiffe_id"], web, "{got}");
    assert_eq!(got["validated_spiffe_id"], web, "{got}");
    // The JWT-SVID verifies with the JWKS the control plane publishes for
    // verifiers outside the mesh.
    let (code, jwks) = c.cp_http("/jwks.json").unwrap();
    assert_eq!(code, 200, "{jwks}");
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&jwks).unwrap();
    let token = got["jwt"].as_str().unwrap();
    let kid = jsonwebtoken::decode_header(token).unwrap().kid.unwrap();
    let key = jsonwebtoken::DecodingKey::from_jwk(set.find(&kid).unwrap()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    v.set_audience(&["billing"]);
    let claims = jsonwebtoken::decode::<Value>(token, &key, &v)
        .unwrap()
        .claims;
    assert_eq!(claims["sub"], web);

    // Another pod on the same node: its own identity (attested by the kernel, not
    // by what it claims).
    let db = wait_until(Duration::from_secs(20), || {
        let v = spiffe(&c, Some("shop/db"), &endpoint);
        v["x509_spiffe_id"].is_string().then_some(v)
    })
    .unwrap_or_else(|| panic!("{}", spiffe(&c, Some("shop/db"), &endpoint)));
    assert_eq!(
        db["x509_spiffe_id"], "spiffe://cluster.local/ns/shop/sa/db",
        "{db}"
    );
    assert_eq!(
        db["jwt_spiffe_id"], "spiffe://cluster.local/ns/shop/sa/db",
        "{db}"
    );
    // A pod outside the mesh and the node itself: refused.
    for (who, pod) in [
        ("an unenrolled pod", Some("plain/tool")),
        ("the node", None),
    ] {
        let v = spiffe(&c, pod, &endpoint);
        let e = v["error"].as_str().unwrap_or_default();
        assert!(
            e.starts_with("fetch_x509_svid: permission denied"),
            "{who}: {v}"
        );
    }
}
