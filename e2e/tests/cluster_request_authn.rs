//! RequestAuthentication (JWT) at the destination node proxy (issue 29), with
//! tokens minted by a real JOSE library: valid tokens pass (the token removed,
//! claims copied into headers), invalid ones get 401 (expired, wrong issuer,
//! wrong audience, wrong key, `alg: none`, HMAC with the public key), requests
//! without a token pass unless an AuthorizationPolicy requires one
//! (`requestPrincipals`, `request.auth.claims`); key sets inline and fetched by
//! the control plane from `jwksUri` (an unreachable one refuses its tokens and
//! says why). Root; runs in CI.

#![forbid(unsafe_code)]

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use std::time::Duration;
use weft_e2e::cluster::LocalCluster;
use weft_e2e::jwt::{claims, es256, jwks, mint, now, with, RSA_A_PUB};
use weft_e2e::netlab::require_root;
use weft_e2e::{bin_path, wait_until};

fn b64(v: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
}

const AUTHN_INLINE: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {name: issuer, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  jwtRules:
  - issuer: "https://issuer.example"
    audiences: [shop]
    jwks: 'JWKS'
    outputClaimToHeaders:
    - {header: x-jwt-sub, claim: sub}
    - {header: x-jwt-team, claim: org.team}
"#;

const REQUIRE_ALICE: &str = r#"apiVersion: security.weft.dev/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-jwt, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  rules:
  - from: [{source: {requestPrincipals: ["https://issuer.example/alice"]}}]
  - to: [{operation: {paths: ["/admin"]}}]
    when: [{key: "request.auth.claims[groups]", values: ["admins"]}]
"#;

fn authn_from_uri(uri: &str) -> String {
    format!(
        r#"apiVersion: security.weft.dev/v1alpha1
kind: RequestAuthentication
metadata: {{name: issuer, namespace: shop}}
spec:
  selector: {{matchLabels: {{app: web}}}}
  jwtRules:
  - issuer: "https://issuer.example"
    jwksUri: "{uri}"
"#
    )
}

/// (status, body) of a GET of `path` from shop/client with `token` as a bearer;
/// status 0 and curl's error when no response came (a reset: asserted as such, or
/// retried while the mesh settles).
fn get(c: &LocalCluster, url: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map(|t| format!("Authorization: Bearer {t}"));
    let mut extra = Vec::new();
    if let Some(a) = &auth {
        extra.extend(["-H", a.as_str()]);
    }
    match weft_e2e::curl::curl(c, "shop/client", &extra, url) {
        Ok(r) => (r.status, r.body),
        Err(e) => (0, format!("{e:#}")),
    }
}

fn jwt_metric(c: &LocalCluster, outcome: &str, reason: &str) -> u64 {
    let (_, m) = c.node_http("node-b", "/metrics").unwrap();
    m.lines()
        .find(|l| {
            l.starts_with("weft_request_authentications_total{")
                && l.contains(&format!("outcome=\"{outcome}\""))
                && l.contains(&format!("reason=\"{reason}\""))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .map(|v| v as u64)
        .unwrap_or(0)
}

#[test]
fn jwt_request_authentication_at_the_destination() {
    require_root();
    let mut c = LocalCluster::new(&["node-a", "node-b"]).unwrap();
    c.namespace("shop", true).unwrap();
    let ip = c
        .add_pod("shop", "web", "node-b", &[("app", "web")])
        .unwrap();
    c.add_pod("shop", "client", "node-a", &[]).unwrap();
    c.spawn_app(
        "shop/web",
        &bin_path("weft-testapp").unwrap(),
        &["http", "--listen", &format!("{ip}:8080"), "--name", "web"],
    )
    .unwrap();
    c.wait_enrolled("node-b", "shop/web").unwrap();
    c.wait_enrolled("node-a", "shop/client").unwrap();
    let url = |p: &str| format!("http://{ip}:8080{p}");
    assert!(
        wait_until(Duration::from_secs(10), || (get(&c, &url("/"), None).0
            == 200)
            .then_some(()))
        .is_some(),
        "the mesh works before any RequestAuthentication"
    );

    c.write_manifest("authn.yaml", &AUTHN_INLINE.replace("JWKS", &jwks()))
        .unwrap();
    let alice = es256(&claims("alice"));
    // In force once an invalid token is refused.
    let expired = es256(&with(claims("alice"), "exp", json!(now() - 3600)));
    assert!(
        wait_until(Duration::from_secs(10), || (get(
            &c,
            &url("/"),
            Some(&expired)
        )
        .0 == 401)
            .then_some(()))
        .is_some(),
        "an expired token is refused once the RequestAuthentication is in force"
    );
    let (code, body) = get(&c, &url("/"), Some(&expired));
    assert_eq!((code, body.as_str()), (401, "Jwt verification fails"));

    // A valid token: forwarded without it, with the claims the rule copies.
    let (code, body) = get(&c, &url("/hello"), Some(&alice));
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /hello\n"), "{body}");
    assert!(body.contains("x-jwt-sub=alice"), "{body}");
    assert!(body.contains("x-jwt-team=payments"), "{body}");
    assert!(
        !body.contains("authorization="),
        "the token must not reach the app: {body}"
    );
    // A client cannot forge the claim headers: they are replaced.
    let forged = weft_e2e::curl::curl(
        &c,
        "shop/client",
        &[
            "-H",
            &format!("Authorization: Bearer {alice}"),
            "-H",
            "x-jwt-sub: mallory",
        ],
        &url("/"),
    )
    .unwrap();
    assert!(
        forged.body.contains("x-jwt-sub=alice") && !forged.body.contains("mallory"),
        "{}",
        forged.body
    );
    // Nor without a token, nor with one whose claims do not fill them.
    for extra in [
        vec![],
        vec![
            "-H".to_string(),
            format!(
                "Authorization: Bearer {}",
                es256(&with(claims("alice"), "org", json!({})))
            ),
        ],
    ] {
        let mut args: Vec<&str> = extra.iter().map(String::as_str).collect();
        args.extend(["-H", "x-jwt-sub: mallory", "-H", "x-jwt-team: admins"]);
        let r = weft_e2e::curl::curl(&c, "shop/client", &args, &url("/")).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
        assert!(
            !r.body.contains("mallory") && !r.body.contains("x-jwt-team"),
            "a client-sent claim header reached the app: {}",
            r.body
        );
    }
    // In the query string too, removed from what the app sees.
    let (code, body) = get(&c, &url(&format!("/q?a=1&access_token={alice}")), None);
    assert_eq!(code, 200, "{body}");
    assert!(body.starts_with("GET /q?a=1\n"), "{body}");

    // Without a token: passes (no policy requires one).
    assert_eq!(get(&c, &url("/"), None).0, 200);

    // Invalid tokens, each refused.
    let rsa_b = weft_e2e::jwt::rsa_b();
    let hmac_confusion = {
        let mut h = Header::new(Algorithm::HS256);
        h.kid = Some("rsa-a".into());
        encode(
            &h,
            &claims("alice"),
            &EncodingKey::from_secret(RSA_A_PUB).unwrap(),
        )
        .unwrap()
    };
    let none_alg = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims("alice").to_string().as_bytes())
    );
    let cases = [
        (
            "wrong issuer",
            es256(&with(claims("alice"), "iss", json!("https://evil.example"))),
        ),
        (
            "wrong audience",
            es256(&with(claims("alice"), "aud", json!("other"))),
        ),
        (
            "not yet valid",
            es256(&with(claims("alice"), "nbf", json!(now() + 3600))),
        ),
        (
            "another key",
            mint(Algorithm::RS256, &rsa_b, "rsa-a", &claims("alice")),
        ),
        ("HMAC with the public key", hmac_confusion),
        ("alg none", none_alg),
        ("malformed", "not.a.jwt".to_string()),
        (
            "oversized",
            es256(&with(claims("alice"), "pad", json!("x".repeat(9000)))),
        ),
    ];
    for (what, token) in &cases {
        let (code, body) = get(&c, &url("/"), Some(token));
        assert_eq!(code, 401, "{what}: {body}");
    }
    assert!(jwt_metric(&c, "rejected", "expired") >= 2);
    assert!(jwt_metric(&c, "authenticated", "") >= 3);

    // A policy that requires alice's token (or an admin's on /admin).
    c.write_manifest("policy.yaml", REQUIRE_ALICE).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || (get(&c, &url("/"), None).0
            == 403)
            .then_some(()))
        .is_some(),
        "a request without a token is denied by requestPrincipals"
    );
    assert_eq!(get(&c, &url("/"), Some(&alice)).0, 200);
    let bob = es256(&claims("bob"));
    assert_eq!(get(&c, &url("/"), Some(&bob)).0, 403, "bob is not alice");
    assert_eq!(
        get(&c, &url("/admin"), Some(&bob)).0,
        200,
        "bob is an admin"
    );
    let carol = es256(&with(claims("carol"), "groups", json!(["dev"])));
    assert_eq!(get(&c, &url("/admin"), Some(&carol)).0, 403);
    assert_eq!(get(&c, &url("/"), Some(&expired)).0, 401, "401 before 403");

    // The key set from jwksUri, fetched by the control plane (nodes never fetch).
    std::fs::remove_file(c.config_dir().join("policy.yaml")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("jwks.json"), jwks()).unwrap();
    let mut server = std::process::Command::new("nsenter")
        .arg(format!("--net={}", c.fabric_netns()))
        .args([
            "python3",
            "-m",
            "http.server",
            "--bind",
            "10.200.0.1",
            "18089",
        ])
        .arg("--directory")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let served = wait_until(Duration::from_secs(10), || {
        c.fabric_http("10.200.0.1:18089", "/jwks.json")
            .ok()
            .filter(|(s, _)| *s == 200)
    });
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        assert!(served.is_some(), "the JWKS server answers");
        c.write_manifest(
            "authn.yaml",
            &authn_from_uri("http://10.200.0.1:18089/jwks.json"),
        )
        .unwrap();
        // The inline rule's claim headers are gone once the fetched one is in force.
        assert!(
            wait_until(Duration::from_secs(15), || {
                let (code, body) = get(&c, &url("/"), Some(&alice));
                (code == 200 && !body.contains("x-jwt-sub")).then_some(())
            })
            .is_some(),
            "a token verified with the fetched keys"
        );
        assert_eq!(get(&c, &url("/"), Some(&expired)).0, 401);
        // A key set that cannot be fetched: its issuer's tokens are refused, and
        // the status says why.
        c.write_manifest(
            "authn.yaml",
            &authn_from_uri("http://10.200.0.1:18090/missing.json"),
        )
        .unwrap();
        let why = wait_until(Duration::from_secs(15), || {
            let (_, st) = c.cp_http("/debug/status").ok()?;
            let st: Value = serde_json::from_str(&st).ok()?;
            st["rejected"]
                .as_array()?
                .iter()
                .find(|r| r["object"] == "RequestAuthentication shop/issuer")
                .cloned()
        })
        .expect("an unavailable key set is reported");
        assert!(
            why["errors"][0]
                .as_str()
                .unwrap()
                .starts_with("spec.jwtRules[0].jwksUri: the key set is not available"),
            "{why}"
        );
        assert!(
            wait_until(Duration::from_secs(10), || (get(
                &c,
                &url("/"),
                Some(&alice)
            )
            .0 == 401)
                .then_some(()))
            .is_some(),
            "a token whose keys are unavailable is refused"
        );
        assert_eq!(get(&c, &url("/"), None).0, 200, "no token: passes");
    }));
    let _ = server.kill();
    let _ = server.wait();
    if let Err(e) = result {
        std::panic::resume_unwind(e);
    }
}
