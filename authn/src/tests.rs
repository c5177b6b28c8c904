//! Tokens are minted with `jsonwebtoken::encode` from the test-only keys under
//! `tests/keys/` (generated with openssl); the JWKS documents are derived from them.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::jwk::Jwk;
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

use crate::*;

const RSA_A: &[u8] = include_bytes!("../tests/keys/rsa_a.pem");
const RSA_A_PUB: &[u8] = include_bytes!("../tests/keys/rsa_a.pub.pem");
const RSA_B: &[u8] = include_bytes!("../tests/keys/rsa_b.pem");
const EC_P256: &[u8] = include_bytes!("../tests/keys/ec_p256.pem");
const EC_P384: &[u8] = include_bytes!("../tests/keys/ec_p384.pem");
const ED25519: &[u8] = include_bytes!("../tests/keys/ed25519.pem");

const ISS: &str = "https://issuer.example";
const NOW: u64 = 1_700_000_000;

fn rsa_a() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_A).unwrap()
}
fn rsa_b() -> EncodingKey {
    EncodingKey::from_rsa_pem(RSA_B).unwrap()
}
fn p256() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P256).unwrap()
}
fn p384() -> EncodingKey {
    EncodingKey::from_ec_pem(EC_P384).unwrap()
}
fn ed25519() -> EncodingKey {
    EncodingKey::from_ed_pem(ED25519).unwrap()
}

/// The public JWK of `key`, with `kid` and without `alg` unless given.
fn jwk(key: &EncodingKey, family_alg: Algorithm, kid: Option<&str>, alg: Option<&str>) -> Value {
    let mut v = serde_json::to_value(Jwk::from_encoding_key(key, family_alg).unwrap()).unwrap();
    let obj = v.as_object_mut().unwrap();
    obj.remove("alg");
    if let Some(alg) = alg {
        obj.insert("alg".into(), json!(alg));
    }
    if let Some(kid) = kid {
        obj.insert("kid".into(), json!(kid));
    }
    v
}

fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}

/// A JWKS holding every test key except `rsa_b`.
fn all_keys_jwks() -> String {
    jwks(&[
        jwk(&rsa_a(), Algorithm::RS256, Some("rsa-a"), None),
        jwk(&p256(), Algorithm::ES256, Some("p256"), None),
        jwk(&p384(), Algorithm::ES384, Some("p384"), None),
        jwk(&ed25519(), Algorithm::EdDSA, Some("ed"), None),
    ])
}

fn claims() -> Value {
    json!({ "iss": ISS, "sub": "alice", "aud": "api", "exp": NOW + 3600, "iat": NOW })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn mint(alg: Algorithm, key: &EncodingKey, kid: Option<&str>, claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_string);
    encode(&header, claims, key).unwrap()
}

fn rs256(claims: &Value) -> String {
    mint(Algorithm::RS256, &rsa_a(), Some("rsa-a"), claims)
}

/// A token from raw header and payload JSON and a raw signature.
fn raw_token(header: &Value, payload: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(payload.to_string()),
        signature
    )
}

fn rule() -> JwtRule {
    JwtRule {
        issuer: ISS.to_string(),
        jwks: all_keys_jwks(),
        ..JwtRule::default()
    }
}

fn compiled(rule: JwtRule) -> Vec<CompiledRule> {
    vec![compile(&rule).unwrap()]
}

fn run(rules: &[CompiledRule], headers: &[(&str, &str)], query: Option<&str>) -> Outcome {
    authenticate(
        rules,
        &RequestView::new(headers.iter().copied(), query),
        NOW,
    )
}

fn bearer(rules: &[CompiledRule], token: &str) -> Outcome {
    let value = format!("Bearer {token}");
    run(rules, &[("authorization", &value)], None)
}

fn principal(outcome: Outcome) -> Principal {
    match outcome {
        Outcome::Authenticated(p) => p,
        other => panic!("expected Authenticated, got {other:?}"),
    }
}

fn rejected(outcome: Outcome) -> Reason {
    match outcome {
        Outcome::Rejected(r) => r,
        other => panic!("expected Rejected, got {other:?}"),
    }
}

fn compile_err(rule: &JwtRule) -> (String, String) {
    let e = compile(rule).unwrap_err();
    (e.field().to_string(), e.message().to_string())
}

fn jwks_err(text: String) -> (String, String) {
    compile_err(&JwtRule {
        jwks: text,
        ..rule()
    })
}

// ---- valid tokens ----

#[test]
fn valid_rs256_authenticates() {
    let rules = compiled(rule());
    let c = with(claims(), "azp", json!("web"));
    let p = principal(bearer(&rules, &rs256(&c)));
    assert_eq!(
        p,
        Principal {
            principal: format!("{ISS}/alice"),
            issuer: ISS.to_string(),
            subject: Some("alice".to_string()),
            claims: c,
            audiences: vec!["api".to_string()],
            presenter: Some("web".to_string()),
            remove: vec![TokenLocation::Header("authorization".to_string())],
            add_headers: vec![],
        }
    );
}

#[test]
fn every_accepted_algorithm_verifies() {
    let rules = compiled(rule());
    let cases = [
        (Algorithm::RS256, rsa_a(), "rsa-a"),
        (Algorithm::RS384, rsa_a(), "rsa-a"),
        (Algorithm::RS512, rsa_a(), "rsa-a"),
        (Algorithm::PS256, rsa_a(), "rsa-a"),
        (Algorithm::ES256, p256(), "p256"),
        (Algorithm::ES384, p384(), "p384"),
        (Algorithm::EdDSA, ed25519(), "ed"),
    ];
    for (alg, key, kid) in cases {
        let p = principal(bearer(&rules, &mint(alg, &key, Some(kid), &claims())));
        assert_eq!(p.principal, format!("{ISS}/alice"), "{alg:?}");
        // Without a kid, every key that fits the algorithm is tried.
        let p = principal(bearer(&rules, &mint(alg, &key, None, &claims())));
        assert_eq!(p.principal, format!("{ISS}/alice"), "{alg:?} without kid");
    }
}

#[test]
fn token_without_sub_has_empty_principal() {
    let rules = compiled(rule());
    let p = principal(bearer(&rules, &rs256(&without(claims(), "sub"))));
    assert_eq!(p.principal, "");
    assert_eq!(p.subject, None);
    assert_eq!(p.issuer, ISS);
}

#[test]
fn token_without_exp_is_accepted() {
    let rules = compiled(rule());
    let p = principal(bearer(&rules, &rs256(&without(claims(), "exp"))));
    assert_eq!(p.principal, format!("{ISS}/alice"));
}

// ---- time claims ----

#[test]
fn expired_token_is_rejected() {
    let rules = compiled(rule());
    let t = rs256(&with(claims(), "exp", json!(NOW - 61)));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::Expired);
}

#[test]
fn expiry_within_leeway_passes() {
    let rules = compiled(rule());
    let t = rs256(&with(claims(), "exp", json!(NOW - 60)));
    principal(bearer(&rules, &t));
    // Without leeway the same token is expired.
    let value = format!("Bearer {t}");
    let view = RequestView::new([("authorization", value.as_str())], None);
    assert_eq!(
        authenticate_with_leeway(&rules, &view, NOW, 0),
        Outcome::Rejected(Reason::Expired)
    );
}

#[test]
fn nbf_in_the_future_is_rejected() {
    let rules = compiled(rule());
    let t = rs256(&with(claims(), "nbf", json!(NOW + 61)));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::NotYetValid);
    let t = rs256(&with(claims(), "nbf", json!(NOW + 60)));
    principal(bearer(&rules, &t));
}

#[test]
fn non_numeric_exp_is_invalid() {
    let rules = compiled(rule());
    let t = rs256(&with(claims(), "exp", json!("tomorrow")));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::InvalidClaims);
    let t = rs256(&with(claims(), "nbf", json!(-5)));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::InvalidClaims);
}

// ---- issuer and audience ----

#[test]
fn wrong_issuer_is_rejected() {
    let rules = compiled(rule());
    let t = rs256(&with(claims(), "iss", json!("https://other.example")));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::IssuerMismatch);
    let t = rs256(&without(claims(), "iss"));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::IssuerMismatch);
}

#[test]
fn wrong_audience_is_rejected() {
    let rules = compiled(JwtRule {
        audiences: vec!["api".into(), "https://svc.example/".into()],
        ..rule()
    });
    let t = rs256(&with(claims(), "aud", json!("other")));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::AudienceMismatch);
    let t = rs256(&without(claims(), "aud"));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::AudienceMismatch);
    let t = rs256(&with(claims(), "aud", json!(["x", "y"])));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::AudienceMismatch);
}

#[test]
fn audience_matches_any_of_the_token_audiences() {
    let rules = compiled(JwtRule {
        audiences: vec!["api".into(), "https://svc.example/".into()],
        ..rule()
    });
    let t = rs256(&with(claims(), "aud", json!(["x", "api"])));
    assert_eq!(principal(bearer(&rules, &t)).audiences, vec!["x", "api"]);
    // The scheme and then a trailing slash are ignored on both sides.
    let t = rs256(&with(claims(), "aud", json!("svc.example")));
    principal(bearer(&rules, &t));
    let t = rs256(&with(claims(), "aud", json!("http://svc.example/")));
    principal(bearer(&rules, &t));
}

#[test]
fn no_audiences_configured_accepts_any() {
    let rules = compiled(rule());
    for aud in [json!("anything"), json!(["a", "b"])] {
        principal(bearer(&rules, &rs256(&with(claims(), "aud", aud))));
    }
    principal(bearer(&rules, &rs256(&without(claims(), "aud"))));
    let t = rs256(&with(claims(), "aud", json!(7)));
    assert_eq!(rejected(bearer(&rules, &t)), Reason::InvalidClaims);
}

// ---- keys and algorithms ----

#[test]
fn token_signed_by_another_key_is_rejected() {
    let rules = compiled(rule());
    // Same kid as the configured key, other private key.
    let t = mint(Algorithm::RS256, &rsa_b(), Some("rsa-a"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::BadSignature);
    let t = mint(Algorithm::RS256, &rsa_b(), None, &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::BadSignature);
}

#[test]
fn tampered_payload_is_rejected() {
    let rules = compiled(rule());
    let t = rs256(&claims());
    let parts: Vec<&str> = t.split('.').collect();
    let forged = URL_SAFE_NO_PAD.encode(with(claims(), "sub", json!("admin")).to_string());
    let t = format!("{}.{}.{}", parts[0], forged, parts[2]);
    assert_eq!(rejected(bearer(&rules, &t)), Reason::BadSignature);
}

#[test]
fn alg_none_is_refused() {
    let rules = compiled(rule());
    for alg in ["none", "None", "HS256", "PS512", "ES512", ""] {
        let t = raw_token(&json!({ "alg": alg, "typ": "JWT" }), &claims(), "");
        assert_eq!(
            rejected(bearer(&rules, &t)),
            Reason::AlgorithmNotAllowed,
            "{alg}"
        );
    }
}

#[test]
fn hmac_with_the_rsa_public_key_as_secret_is_refused() {
    let rules = compiled(rule());
    for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
        let key = EncodingKey::from_secret(RSA_A_PUB).unwrap();
        let t = mint(alg, &key, Some("rsa-a"), &claims());
        assert_eq!(rejected(bearer(&rules, &t)), Reason::AlgorithmNotAllowed);
    }
}

#[test]
fn kid_selects_the_key() {
    let rules = compiled(JwtRule {
        jwks: jwks(&[
            jwk(&rsa_a(), Algorithm::RS256, Some("a"), None),
            jwk(&rsa_b(), Algorithm::RS256, Some("b"), None),
        ]),
        ..rule()
    });
    principal(bearer(
        &rules,
        &mint(Algorithm::RS256, &rsa_b(), Some("b"), &claims()),
    ));
    principal(bearer(
        &rules,
        &mint(Algorithm::RS256, &rsa_a(), Some("a"), &claims()),
    ));
    // The kid names the other key: only that key is tried.
    let t = mint(Algorithm::RS256, &rsa_b(), Some("a"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::BadSignature);
    // No kid: both keys are tried.
    principal(bearer(
        &rules,
        &mint(Algorithm::RS256, &rsa_b(), None, &claims()),
    ));
}

#[test]
fn unknown_kid_is_rejected() {
    let rules = compiled(rule());
    let t = mint(Algorithm::RS256, &rsa_a(), Some("nope"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::UnknownKid);
}

#[test]
fn key_without_kid_stays_a_candidate_for_a_token_with_kid() {
    let rules = compiled(JwtRule {
        jwks: jwks(&[jwk(&rsa_a(), Algorithm::RS256, None, None)]),
        ..rule()
    });
    principal(bearer(
        &rules,
        &mint(Algorithm::RS256, &rsa_a(), Some("rotated"), &claims()),
    ));
}

#[test]
fn token_alg_must_match_the_key() {
    // The JWK states RS256: a PS256 token from the same key is refused.
    let rules = compiled(JwtRule {
        jwks: jwks(&[jwk(&rsa_a(), Algorithm::RS256, Some("a"), Some("RS256"))]),
        ..rule()
    });
    principal(bearer(
        &rules,
        &mint(Algorithm::RS256, &rsa_a(), Some("a"), &claims()),
    ));
    let t = mint(Algorithm::PS256, &rsa_a(), Some("a"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::NoMatchingKey);
    // Key type must fit: an ES256 token never uses an RSA or P-384 key.
    let t = mint(Algorithm::ES256, &p256(), Some("a"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::NoMatchingKey);
    let rules = compiled(JwtRule {
        jwks: jwks(&[jwk(&p384(), Algorithm::ES384, Some("p384"), None)]),
        ..rule()
    });
    let t = mint(Algorithm::ES256, &p256(), Some("p384"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::NoMatchingKey);
}

#[test]
fn unknown_critical_header_is_malformed() {
    let rules = compiled(rule());
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-a".into());
    header.crit = Some(vec!["exp-ext".into()]);
    let t = encode(&header, &claims(), &rsa_a()).unwrap();
    assert_eq!(rejected(bearer(&rules, &t)), Reason::Malformed);
}

// ---- token shape and size ----

#[test]
fn oversized_token_is_rejected() {
    let rules = compiled(rule());
    let big = with(claims(), "pad", json!("x".repeat(MAX_TOKEN_BYTES)));
    assert_eq!(
        rejected(bearer(&rules, &rs256(&big))),
        Reason::TokenTooLarge
    );
    // Not even parsed.
    let junk = "!".repeat(MAX_TOKEN_BYTES + 1);
    assert_eq!(rejected(bearer(&rules, &junk)), Reason::TokenTooLarge);
}

#[test]
fn malformed_tokens_are_rejected() {
    let rules = compiled(rule());
    let good = rs256(&claims());
    let parts: Vec<&str> = good.split('.').collect();
    let not_json = URL_SAFE_NO_PAD.encode("not json");
    let array = URL_SAFE_NO_PAD.encode("[1,2]");
    let cases = [
        "not-a-jwt".to_string(),
        format!("{}.{}", parts[0], parts[1]),
        format!("{good}.extra"),
        format!("{}.{}.{}", not_json, parts[1], parts[2]),
        format!("{}.{}.{}", parts[0], not_json, parts[2]),
        format!("{}.{}.{}", parts[0], array, parts[2]),
        format!("{}.{}.{}", parts[0], parts[1], "%%%"),
        format!("{}=.{}.{}", parts[0], parts[1], parts[2]),
        raw_token(&json!({ "typ": "JWT" }), &claims(), "sig"),
    ];
    for t in cases {
        assert_eq!(rejected(bearer(&rules, &t)), Reason::Malformed, "{t}");
    }
}

#[test]
fn rejection_reasons_never_echo_the_token() {
    let rules = compiled(rule());
    let t = mint(Algorithm::RS256, &rsa_b(), None, &claims());
    let reason = rejected(bearer(&rules, &t));
    assert_eq!(reason.to_string(), "invalid signature");
    assert_eq!(Reason::MultipleTokens.as_str(), "more than one token");
    assert!(!reason.as_str().contains(&t[..10]));
}

// ---- locations ----

#[test]
fn bearer_prefix_handling() {
    let rules = compiled(rule());
    let t = rs256(&claims());
    for value in [
        format!("Bearer {t}"),
        format!("bearer {t}"),
        format!("BEARER   {t}  "),
    ] {
        principal(run(&rules, &[("Authorization", &value)], None));
    }
    // Not a bearer token: no token at all.
    for value in ["Basic dXNlcjpwYXNz", "Bearer ", "Bearer", &t] {
        assert_eq!(
            run(&rules, &[("authorization", value)], None),
            Outcome::NoToken
        );
    }
}

#[test]
fn custom_header_with_and_without_prefix() {
    let rules = compiled(JwtRule {
        from_headers: vec![
            JwtHeader {
                name: "X-Jwt".into(),
                prefix: String::new(),
            },
            JwtHeader {
                name: "x-auth".into(),
                prefix: "Token ".into(),
            },
        ],
        ..rule()
    });
    let t = rs256(&claims());
    let p = principal(run(&rules, &[("x-jwt", &t)], None));
    assert_eq!(p.remove, vec![TokenLocation::Header("x-jwt".into())]);
    let value = format!("token {t}");
    let p = principal(run(&rules, &[("X-Auth", &value)], None));
    assert_eq!(p.remove, vec![TokenLocation::Header("x-auth".into())]);
    // The defaults no longer apply.
    let value = format!("Bearer {t}");
    assert_eq!(
        run(
            &rules,
            &[("authorization", &value)],
            Some(&format!("access_token={t}"))
        ),
        Outcome::NoToken
    );
}

#[test]
fn query_param_extraction() {
    let rules = compiled(rule());
    let t = rs256(&claims());
    let q = format!("a=1&access_token={t}&b=2");
    let p = principal(run(&rules, &[], Some(&q)));
    assert_eq!(
        p.remove,
        vec![TokenLocation::QueryParam("access_token".into())]
    );

    let rules = compiled(JwtRule {
        from_params: vec!["jwt".into()],
        ..rule()
    });
    let p = principal(run(&rules, &[], Some(&format!("jwt={t}"))));
    assert_eq!(p.remove, vec![TokenLocation::QueryParam("jwt".into())]);
    assert_eq!(
        run(&rules, &[], Some(&format!("access_token={t}&jwt="))),
        Outcome::NoToken
    );
    let bad = "jwt=not.a.token";
    assert_eq!(
        run(&rules, &[], Some(bad)),
        Outcome::Rejected(Reason::Malformed)
    );
}

#[test]
fn no_token_passes_as_anonymous() {
    let rules = compiled(rule());
    assert_eq!(run(&rules, &[], None), Outcome::NoToken);
    assert_eq!(
        run(&rules, &[("cookie", "a=b")], Some("x=1")),
        Outcome::NoToken
    );
    assert_eq!(
        run(&[], &[("authorization", "Bearer x")], None),
        Outcome::NoToken
    );
}

#[test]
fn two_distinct_tokens_are_rejected() {
    let rules = compiled(rule());
    let t1 = rs256(&claims());
    let t2 = rs256(&with(claims(), "sub", json!("bob")));
    let h = format!("Bearer {t1}");
    let q = format!("access_token={t2}");
    assert_eq!(
        run(&rules, &[("authorization", &h)], Some(&q)),
        Outcome::Rejected(Reason::MultipleTokens)
    );
    let h2 = format!("Bearer {t2}");
    assert_eq!(
        run(
            &rules,
            &[("authorization", &h), ("authorization", &h2)],
            None
        ),
        Outcome::Rejected(Reason::MultipleTokens)
    );
    // Even when one of them is garbage.
    assert_eq!(
        run(&rules, &[("authorization", &h)], Some("access_token=junk")),
        Outcome::Rejected(Reason::MultipleTokens)
    );
}

#[test]
fn same_token_in_two_locations_is_one_token() {
    let rules = compiled(rule());
    let t = rs256(&claims());
    let h = format!("Bearer {t}");
    let q = format!("access_token={t}");
    let p = principal(run(&rules, &[("authorization", &h)], Some(&q)));
    assert_eq!(
        p.remove,
        vec![
            TokenLocation::Header("authorization".into()),
            TokenLocation::QueryParam("access_token".into()),
        ]
    );
}

#[test]
fn token_only_counts_for_rules_covering_its_location() {
    const OTHER: &str = "https://other.example";
    let other = JwtRule {
        issuer: OTHER.into(),
        from_headers: vec![JwtHeader {
            name: "x-other".into(),
            prefix: String::new(),
        }],
        ..rule()
    };
    let rules = vec![compile(&rule()).unwrap(), compile(&other).unwrap()];
    let mine = rs256(&claims());
    let theirs = rs256(&with(claims(), "iss", json!(OTHER)));
    principal(run(&rules, &[("x-other", &theirs)], None));
    principal(bearer(&rules, &mine));
    // Valid for a rule, but found where only the other rule looks.
    assert_eq!(
        run(&rules, &[("x-other", &mine)], None),
        Outcome::Rejected(Reason::IssuerMismatch)
    );
    assert_eq!(rejected(bearer(&rules, &theirs)), Reason::IssuerMismatch);
}

#[test]
fn forward_original_token_keeps_it() {
    let t = rs256(&claims());
    let rules = compiled(JwtRule {
        forward_original_token: true,
        ..rule()
    });
    assert_eq!(principal(bearer(&rules, &t)).remove, vec![]);
    let rules = compiled(rule());
    assert_eq!(
        principal(bearer(&rules, &t)).remove,
        vec![TokenLocation::Header("authorization".into())]
    );
}

#[test]
fn rule_locations_and_defaults() {
    let r = compile(&rule()).unwrap();
    assert_eq!(r.issuer(), ISS);
    assert_eq!(r.key_count(), 4);
    assert!(!r.forward_original_token());
    assert_eq!(
        r.locations(),
        vec![
            TokenLocation::Header("authorization".into()),
            TokenLocation::QueryParam("access_token".into()),
        ]
    );
}

// ---- claims ----

#[test]
fn claim_values_nested_and_arrays() {
    let c = json!({
        "sub": "alice",
        "groups": ["dev", "ops", 3, true, {"x": 1}, null],
        "org": { "team": { "name": "core" }, "size": 12, "public": false },
        "empty": [],
        "nothing": null,
    });
    assert_eq!(claim_values(&c, &["sub"]), vec!["alice"]);
    assert_eq!(
        claim_values(&c, &["groups"]),
        vec!["dev", "ops", "3", "true"]
    );
    assert_eq!(claim_values(&c, &["org", "team", "name"]), vec!["core"]);
    assert_eq!(claim_values(&c, &["org", "size"]), vec!["12"]);
    assert_eq!(claim_values(&c, &["org", "public"]), vec!["false"]);
    assert_eq!(claim_values(&c, &["org", "team"]), Vec::<String>::new());
    assert_eq!(claim_values(&c, &["org", "missing"]), Vec::<String>::new());
    assert_eq!(claim_values(&c, &["sub", "deeper"]), Vec::<String>::new());
    assert_eq!(claim_values(&c, &["empty"]), Vec::<String>::new());
    assert_eq!(claim_values(&c, &["nothing"]), Vec::<String>::new());
    assert_eq!(claim_values(&c, &[]), Vec::<String>::new());
}

#[test]
fn output_claim_to_headers() {
    let out = |header: &str, claim: &str| ClaimToHeader {
        header: header.into(),
        claim: claim.into(),
    };
    let rules = compiled(JwtRule {
        output_claim_to_headers: vec![
            out("X-Sub", "sub"),
            out("x-team", "org.team"),
            out("x-groups", "groups"),
            out("x-level", "level"),
            out("x-admin", "admin"),
            out("x-missing", "nope"),
            out("x-object", "org"),
            out("x-evil", "evil"),
        ],
        ..rule()
    });
    let c = json!({
        "iss": ISS, "sub": "alice", "exp": NOW + 10,
        "org": { "team": "core" }, "groups": ["dev", "ops"], "level": 3, "admin": false,
        "evil": "a\r\nx-injected: 1",
    });
    let p = principal(bearer(&rules, &rs256(&c)));
    let expect: Vec<(String, String)> = [
        ("x-sub", "alice"),
        ("x-team", "core"),
        ("x-groups", "dev,ops"),
        ("x-level", "3"),
        ("x-admin", "false"),
    ]
    .iter()
    .map(|(h, v)| (h.to_string(), v.to_string()))
    .collect();
    assert_eq!(p.add_headers, expect);
}

// ---- rule and JWKS errors ----

#[test]
fn rule_field_errors() {
    let e = compile_err(&JwtRule {
        issuer: " ".into(),
        ..rule()
    });
    assert_eq!(e.0, "issuer");
    let e = compile_err(&JwtRule {
        audiences: vec!["a".into(), String::new()],
        ..rule()
    });
    assert_eq!(e.0, "audiences[1]");
    let e = compile_err(&JwtRule {
        from_headers: vec![
            JwtHeader {
                name: "ok".into(),
                prefix: String::new(),
            },
            JwtHeader {
                name: "bad name".into(),
                prefix: String::new(),
            },
        ],
        ..rule()
    });
    assert_eq!(
        e,
        (
            "fromHeaders[1].name".into(),
            "not a valid HTTP header name".into()
        )
    );
    let e = compile_err(&JwtRule {
        from_headers: vec![JwtHeader {
            name: "x".into(),
            prefix: "Bearer\n".into(),
        }],
        ..rule()
    });
    assert_eq!(e.0, "fromHeaders[0].prefix");
    let e = compile_err(&JwtRule {
        from_params: vec![String::new()],
        ..rule()
    });
    assert_eq!(e.0, "fromParams[0]");
    let e = compile_err(&JwtRule {
        output_claim_to_headers: vec![ClaimToHeader {
            header: ":path".into(),
            claim: "sub".into(),
        }],
        ..rule()
    });
    assert_eq!(e.0, "outputClaimToHeaders[0].header");
    let e = compile_err(&JwtRule {
        output_claim_to_headers: vec![ClaimToHeader {
            header: "x".into(),
            claim: "a..b".into(),
        }],
        ..rule()
    });
    assert_eq!(e.0, "outputClaimToHeaders[0].claim");
    let e = compile_err(&JwtRule {
        from_params: vec!["p".into(); MAX_LIST_ENTRIES + 1],
        ..rule()
    });
    assert_eq!(e.0, "fromParams");
    let err = compile(&JwtRule {
        jwks: String::new(),
        ..rule()
    })
    .unwrap_err();
    assert_eq!(err.to_string(), "jwks: required");
}

#[test]
fn malformed_jwks_documents() {
    assert_eq!(jwks_err("not json".into()).0, "jwks");
    assert_eq!(jwks_err("[]".into()).0, "jwks");
    assert_eq!(
        jwks_err("{}".into()),
        ("jwks.keys".into(), "required".into())
    );
    assert_eq!(
        jwks_err(r#"{"keys":[]}"#.into()),
        ("jwks.keys".into(), "no usable signing key".into())
    );
    let key = jwk(&p256(), Algorithm::ES256, None, None);
    assert_eq!(
        jwks_err(jwks(&vec![key.clone(); MAX_JWKS_KEYS + 1])),
        ("jwks.keys".into(), "33 keys, at most 32".into())
    );
    let r = compile(&JwtRule {
        jwks: jwks(&vec![key.clone(); MAX_JWKS_KEYS]),
        ..rule()
    })
    .unwrap();
    assert_eq!(r.key_count(), MAX_JWKS_KEYS);
    let mut padded = key.clone();
    padded["x-padding"] = json!("p".repeat(MAX_JWKS_BYTES));
    let e = jwks_err(jwks(&[padded]));
    assert_eq!(e.0, "jwks");
    assert!(e.1.contains("at most 65536"), "{}", e.1);
}

#[test]
fn unsupported_or_invalid_keys() {
    let rsa = jwk(&rsa_a(), Algorithm::RS256, None, None);
    let ec = jwk(&p256(), Algorithm::ES256, None, None);
    let ed = jwk(&ed25519(), Algorithm::EdDSA, None, None);
    let set = |key: &Value, field: &str, value: Value| {
        let mut k = key.clone();
        if value.is_null() {
            k.as_object_mut().unwrap().remove(field);
        } else {
            k[field] = value;
        }
        jwks_err(jwks(&[ec.clone(), k]))
    };
    let hmac = json!({ "kty": "oct", "k": "c2VjcmV0" });
    assert_eq!(
        jwks_err(jwks(&[hmac])),
        (
            "jwks.keys[0].kty".into(),
            "unsupported key type \"oct\"".into()
        )
    );
    assert_eq!(set(&ec, "kty", Value::Null).0, "jwks.keys[1].kty");
    assert_eq!(set(&ec, "crv", json!("P-521")).0, "jwks.keys[1].crv");
    assert_eq!(set(&ec, "x", json!("AAAA")).0, "jwks.keys[1].x");
    assert_eq!(set(&ec, "y", Value::Null).0, "jwks.keys[1].y");
    // Right lengths, but not a point on the curve.
    let e = set(&ec, "x", json!(URL_SAFE_NO_PAD.encode([7u8; 32])));
    assert_eq!(
        e,
        ("jwks.keys[1]".into(), "not a valid P-256 public key".into())
    );
    assert_eq!(set(&ed, "x", json!("AAAA")).0, "jwks.keys[1].x");
    assert_eq!(set(&ed, "crv", json!("Ed448")).0, "jwks.keys[1].crv");
    assert_eq!(set(&rsa, "n", json!("not base64!")).0, "jwks.keys[1].n");
    // A 1024-bit modulus.
    let small = URL_SAFE_NO_PAD.encode([0xffu8; 128]);
    assert_eq!(
        set(&rsa, "n", json!(small)),
        (
            "jwks.keys[1].n".into(),
            "modulus is 1024 bits, must be 2048 to 8192".into()
        )
    );
    assert_eq!(set(&rsa, "e", json!("AQ")).0, "jwks.keys[1].e");
    assert_eq!(set(&rsa, "alg", json!("HS256")).0, "jwks.keys[1].alg");
    assert_eq!(
        set(&rsa, "alg", json!("ES256")),
        (
            "jwks.keys[1].alg".into(),
            "\"ES256\" does not fit this RSA key".into()
        )
    );
    assert_eq!(set(&rsa, "use", json!("wrap")).0, "jwks.keys[1].use");
}

#[test]
fn encryption_keys_are_ignored() {
    let mut enc = jwk(&rsa_b(), Algorithm::RS256, Some("b"), None);
    enc["use"] = json!("enc");
    // Even an unsupported one.
    let enc_other = json!({ "kty": "oct", "use": "enc", "k": "c2VjcmV0" });
    let sig = jwk(&rsa_a(), Algorithm::RS256, Some("a"), None);
    let r = compile(&JwtRule {
        jwks: jwks(&[enc.clone(), enc_other, sig]),
        ..rule()
    })
    .unwrap();
    assert_eq!(r.key_count(), 1);
    let rules = vec![r];
    let t = mint(Algorithm::RS256, &rsa_b(), Some("b"), &claims());
    assert_eq!(rejected(bearer(&rules, &t)), Reason::UnknownKid);
    assert_eq!(
        jwks_err(jwks(&[enc])),
        ("jwks.keys".into(), "no usable signing key".into())
    );
}

#[test]
fn rule_deserializes_from_istio_fields() {
    let r: JwtRule = serde_json::from_value(json!({
        "issuer": ISS,
        "audiences": ["api"],
        "jwks": "{}",
        "fromHeaders": [{ "name": "x-jwt", "prefix": "Bearer " }],
        "fromParams": ["token"],
        "forwardOriginalToken": true,
        "outputClaimToHeaders": [{ "header": "x-sub", "claim": "sub" }],
    }))
    .unwrap();
    assert_eq!(
        r,
        JwtRule {
            issuer: ISS.into(),
            audiences: vec!["api".into()],
            jwks: "{}".into(),
            from_headers: vec![JwtHeader {
                name: "x-jwt".into(),
                prefix: "Bearer ".into(),
            }],
            from_params: vec!["token".into()],
            forward_original_token: true,
            output_claim_to_headers: vec![ClaimToHeader {
                header: "x-sub".into(),
                claim: "sub".into(),
            }],
        }
    );
}

#[test]
fn compiled_rules_can_be_shared_across_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<CompiledRule>();
    assert_send_sync::<Outcome>();
}

#[test]
fn a_rule_without_keys_rejects_its_tokens_and_passes_requests_without_one() {
    let r = JwtRule {
        jwks: String::new(),
        ..rule()
    };
    assert!(
        crate::compile(&r).is_err(),
        "no key set: not a verifying rule"
    );
    let rules = vec![crate::compile_without_keys(&r).unwrap()];
    assert_eq!(
        rejected(bearer(&rules, &rs256(&claims()))),
        Reason::UnknownKid
    );
    assert!(matches!(run(&rules, &[], None), Outcome::NoToken));
}

#[test]
fn claims_never_go_into_headers_that_frame_or_route_the_message() {
    for h in [
        "Content-Length",
        "transfer-encoding",
        "host",
        "te",
        "upgrade",
    ] {
        let r = JwtRule {
            output_claim_to_headers: vec![ClaimToHeader {
                header: h.into(),
                claim: "sub".into(),
            }],
            ..rule()
        };
        let (field, _) = compile_err(&r);
        assert_eq!(field, "outputClaimToHeaders[0].header", "{h}");
    }
    let ok = JwtRule {
        output_claim_to_headers: vec![ClaimToHeader {
            header: "x-user".into(),
            claim: "sub".into(),
        }],
        ..rule()
    };
    let c = compile(&ok).unwrap();
    assert_eq!(c.output_headers().collect::<Vec<_>>(), ["x-user"]);
}
