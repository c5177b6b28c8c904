use super::*;
use std::collections::BTreeMap;
use weft_proto::pb;

/// The three connections of the public acceptance table.
fn p_conn() -> Attributes {
    Attributes {
        source_ip: Some("10.1.0.1".parse().unwrap()),
        destination_ip: Some("10.1.0.2".parse().unwrap()),
        destination_port: 8080,
        principal: None,
        request: None,
        l7_pending: false,
    }
}
fn t_conn() -> Attributes {
    Attributes {
        principal: Some("cluster.local/ns/namespace/sa/account".into()),
        ..p_conn()
    }
}
fn a_conn() -> Attributes {
    Attributes {
        source_ip: Some("10.1.0.3".parse().unwrap()),
        destination_ip: Some("10.1.0.4".parse().unwrap()),
        destination_port: 9090,
        principal: Some("other.td/ns/ns-alt/sa/sa-alt".into()),
        request: None,
        l7_pending: false,
    }
}

fn policy(action: pb::authorization_policy::Action, rules: Vec<pb::Rule>) -> CompiledPolicy {
    compile(&pb::AuthorizationPolicy {
        name: "p".into(),
        namespace: "ns".into(),
        action: action as i32,
        rules,
        ..Default::default()
    })
}

fn allow_from(s: pb::Source) -> CompiledPolicy {
    policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule {
            from: vec![s],
            ..Default::default()
        }],
    )
}
fn allow_to(o: pb::Operation) -> CompiledPolicy {
    policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule {
            to: vec![o],
            ..Default::default()
        }],
    )
}
fn allow_when(key: &str, values: &[&str], not_values: &[&str]) -> CompiledPolicy {
    policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule {
            when: vec![pb::Condition {
                key: key.into(),
                values: values.iter().map(|s| s.to_string()).collect(),
                not_values: not_values.iter().map(|s| s.to_string()).collect(),
            }],
            ..Default::default()
        }],
    )
}
fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}
fn allowed(p: &CompiledPolicy, a: &Attributes) -> bool {
    evaluate([p], a).allowed
}

#[test]
fn public_acceptance_cases() {
    let cases: Vec<(&str, CompiledPolicy, [bool; 3])> = vec![
        (
            "namespaces",
            allow_from(pb::Source {
                namespaces: v(&["namespace"]),
                ..Default::default()
            }),
            [false, true, false],
        ),
        (
            "serviceAccounts",
            allow_from(pb::Source {
                service_accounts: v(&["namespace/account"]),
                ..Default::default()
            }),
            [false, true, false],
        ),
        (
            "principals",
            allow_from(pb::Source {
                principals: v(&["cluster.local/ns/namespace/sa/account"]),
                ..Default::default()
            }),
            [false, true, false],
        ),
        (
            "ports",
            allow_to(pb::Operation {
                ports: v(&["8080"]),
                ..Default::default()
            }),
            [true, true, false],
        ),
    ];
    for (name, p, want) in cases {
        let got = [
            allowed(&p, &p_conn()),
            allowed(&p, &t_conn()),
            allowed(&p, &a_conn()),
        ];
        assert_eq!(got, want, "{name}: [P, T, A]");
    }
}

#[test]
fn public_rule_structure_case() {
    // (namespace a OR namespace b) AND port 80
    let p = policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule {
            from: vec![pb::Source {
                namespaces: v(&["a", "b"]),
                ..Default::default()
            }],
            to: vec![pb::Operation {
                ports: v(&["80"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let conn = |ns: &str, port: u16| Attributes {
        principal: Some(format!("cluster.local/ns/{ns}/sa/x")),
        destination_port: port,
        ..p_conn()
    };
    assert!(allowed(&p, &conn("a", 80)));
    assert!(allowed(&p, &conn("b", 80)));
    assert!(!allowed(&p, &conn("c", 80)));
    assert!(!allowed(&p, &conn("b", 12345)));
}

/// Every source field and its not* twin, against T (mTLS, namespace/account,
/// 10.1.0.1) and P (plaintext, 10.1.0.1).
#[test]
fn every_source_field_and_its_negation() {
    type Case = (&'static str, pb::Source, bool, bool);
    let cases: Vec<Case> = vec![
        (
            "principals exact",
            pb::Source {
                principals: v(&["cluster.local/ns/namespace/sa/account"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "principals prefix",
            pb::Source {
                principals: v(&["cluster.local/ns/namespace/*"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "principals suffix",
            pb::Source {
                principals: v(&["*/sa/account"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "principals presence",
            pb::Source {
                principals: v(&["*"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "principals other",
            pb::Source {
                principals: v(&["cluster.local/ns/x/sa/y"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "notPrincipals self",
            pb::Source {
                not_principals: v(&["cluster.local/ns/namespace/sa/account"]),
                ..Default::default()
            },
            false,
            true,
        ),
        (
            "notPrincipals other",
            pb::Source {
                not_principals: v(&["cluster.local/ns/x/sa/y"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "notPrincipals presence",
            pb::Source {
                not_principals: v(&["*"]),
                ..Default::default()
            },
            false,
            true,
        ),
        (
            "namespaces",
            pb::Source {
                namespaces: v(&["namespace"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "namespaces prefix",
            pb::Source {
                namespaces: v(&["name*"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "notNamespaces self",
            pb::Source {
                not_namespaces: v(&["namespace"]),
                ..Default::default()
            },
            false,
            true,
        ),
        (
            "notNamespaces other",
            pb::Source {
                not_namespaces: v(&["other"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "serviceAccounts",
            pb::Source {
                service_accounts: v(&["namespace/account"]),
                ..Default::default()
            },
            true,
            false,
        ),
        (
            "serviceAccounts other ns",
            pb::Source {
                service_accounts: v(&["other/account"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "notServiceAccounts self",
            pb::Source {
                not_service_accounts: v(&["namespace/account"]),
                ..Default::default()
            },
            false,
            true,
        ),
        (
            "notServiceAccounts other",
            pb::Source {
                not_service_accounts: v(&["namespace/other"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "ipBlocks cidr",
            pb::Source {
                ip_blocks: v(&["10.1.0.0/16"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "ipBlocks single",
            pb::Source {
                ip_blocks: v(&["10.1.0.1"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "ipBlocks other",
            pb::Source {
                ip_blocks: v(&["192.168.0.0/16"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "notIpBlocks self",
            pb::Source {
                not_ip_blocks: v(&["10.1.0.1/32"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "notIpBlocks other",
            pb::Source {
                not_ip_blocks: v(&["192.168.0.0/16"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "remoteIpBlocks",
            pb::Source {
                remote_ip_blocks: v(&["10.1.0.0/24"]),
                ..Default::default()
            },
            true,
            true,
        ),
        (
            "notRemoteIpBlocks",
            pb::Source {
                not_remote_ip_blocks: v(&["10.1.0.0/24"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "fields AND: namespace ok, ip not",
            pb::Source {
                namespaces: v(&["namespace"]),
                ip_blocks: v(&["192.168.0.0/16"]),
                ..Default::default()
            },
            false,
            false,
        ),
        (
            "values OR",
            pb::Source {
                namespaces: v(&["x", "namespace"]),
                ..Default::default()
            },
            true,
            false,
        ),
    ];
    for (name, s, want_t, want_p) in cases {
        let p = allow_from(s);
        assert_eq!(allowed(&p, &t_conn()), want_t, "{name}: T");
        assert_eq!(allowed(&p, &p_conn()), want_p, "{name}: P");
    }
}

#[test]
fn operation_fields_at_l4() {
    let t = t_conn();
    assert!(allowed(
        &allow_to(pb::Operation {
            ports: v(&["8080", "9090"]),
            ..Default::default()
        }),
        &t
    ));
    assert!(!allowed(
        &allow_to(pb::Operation {
            not_ports: v(&["8080"]),
            ..Default::default()
        }),
        &t
    ));
    assert!(allowed(
        &allow_to(pb::Operation {
            not_ports: v(&["9090"]),
            ..Default::default()
        }),
        &t
    ));
    // L7 fields on a connection that is not parsed as HTTP: an ALLOW rule never
    // matches; a DENY rule always does.
    for op in [
        pb::Operation {
            methods: v(&["GET"]),
            ..Default::default()
        },
        pb::Operation {
            not_methods: v(&["POST"]),
            ..Default::default()
        },
        pb::Operation {
            paths: v(&["/*"]),
            ..Default::default()
        },
        pb::Operation {
            not_paths: v(&["/admin"]),
            ..Default::default()
        },
        pb::Operation {
            hosts: v(&["*"]),
            ..Default::default()
        },
        pb::Operation {
            not_hosts: v(&["x"]),
            ..Default::default()
        },
    ] {
        assert!(!allowed(&allow_to(op.clone()), &t), "ALLOW with L7 {op:?}");
        let deny = policy(
            pb::authorization_policy::Action::Deny,
            vec![pb::Rule {
                to: vec![op.clone()],
                ..Default::default()
            }],
        );
        assert!(!allowed(&deny, &t), "DENY with L7 {op:?} must deny at L4");
    }
}

#[test]
fn operation_fields_at_l7() {
    let req = |method: &str, path: &str, host: &str| Attributes {
        request: Some(Request {
            method: method.into(),
            path: path.into(),
            host: host.into(),
            headers: vec![("x-env".into(), "prod".into())],
            auth: None,
        }),
        ..t_conn()
    };
    let p = allow_to(pb::Operation {
        methods: v(&["GET"]),
        paths: v(&["/api/*"]),
        hosts: v(&["Shop.example"]),
        ..Default::default()
    });
    assert!(allowed(&p, &req("GET", "/api/x", "shop.example")));
    assert!(!allowed(&p, &req("POST", "/api/x", "shop.example")));
    assert!(!allowed(&p, &req("GET", "/admin", "shop.example")));
    assert!(!allowed(&p, &req("GET", "/api/x", "other")));
    let p = allow_to(pb::Operation {
        not_paths: v(&["/admin*"]),
        not_methods: v(&["DELETE"]),
        not_hosts: v(&["evil*"]),
        ..Default::default()
    });
    assert!(allowed(&p, &req("GET", "/x", "shop")));
    assert!(!allowed(&p, &req("GET", "/admin/x", "shop")));
    assert!(!allowed(&p, &req("DELETE", "/x", "shop")));
    assert!(!allowed(&p, &req("GET", "/x", "evil.example")));
    let h = allow_when("request.headers[X-Env]", &["prod"], &[]);
    assert!(allowed(&h, &req("GET", "/", "a")));
    let h = allow_when("request.headers[x-env]", &[], &["prod"]);
    assert!(!allowed(&h, &req("GET", "/", "a")));
    // Hosts match with or without the port of the authority.
    let p = allow_to(pb::Operation {
        hosts: v(&["shop.example"]),
        ..Default::default()
    });
    assert!(allowed(&p, &req("GET", "/", "shop.example:8080")));
    assert!(!allowed(&p, &req("GET", "/", "shop.example.evil:8080")));
    let p6 = allow_to(pb::Operation {
        hosts: v(&["[fd00::1]"]),
        ..Default::default()
    });
    assert!(allowed(&p6, &req("GET", "/", "[fd00::1]:80")));
}

#[test]
fn l7_fields_before_the_first_request() {
    let allow_l7 = allow_to(pb::Operation {
        paths: v(&["/api/*"]),
        ..Default::default()
    });
    let deny_l7 = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            to: vec![pb::Operation {
                paths: v(&["/admin"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let deny_header = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            when: vec![pb::Condition {
                key: "request.headers[x-evil]".into(),
                values: v(&["*"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let pending = Attributes {
        l7_pending: true,
        ..t_conn()
    };
    // Not HTTP (no request, not pending): fail closed.
    assert!(!allowed(&allow_l7, &t_conn()));
    assert!(!evaluate([&deny_l7], &t_conn()).allowed);
    assert!(!evaluate([&deny_header], &t_conn()).allowed);
    // HTTP to come: some request could be allowed, so the connection proceeds.
    assert!(allowed(&allow_l7, &pending));
    assert!(evaluate([&deny_l7], &pending).allowed);
    assert!(evaluate([&deny_header], &pending).allowed);
    // An L4 DENY still denies the connection up front.
    let deny_l4 = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            to: vec![pb::Operation {
                ports: v(&["8080"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert!(!evaluate([&deny_l4, &allow_l7], &pending).allowed);
    // An ALLOW policy whose L4 part cannot match any request denies up front.
    let allow_other_ns = allow_from(pb::Source {
        namespaces: v(&["elsewhere"]),
        ..Default::default()
    });
    assert!(!evaluate([&allow_other_ns], &pending).allowed);
    // A DENY rule's L7 part is unknown on non-HTTP traffic, but its port still
    // decides: traffic to another port is not denied by it.
    let deny_l7_on_9090 = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            to: vec![pb::Operation {
                ports: v(&["9090"]),
                paths: v(&["/x"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert!(evaluate([&deny_l7_on_9090], &t_conn()).allowed, "port 8080");
    let on_9090 = Attributes {
        destination_port: 9090,
        ..t_conn()
    };
    assert!(!evaluate([&deny_l7_on_9090], &on_9090).allowed);
    let pending_8080_allow = allow_to(pb::Operation {
        ports: v(&["9090"]),
        paths: v(&["/x"]),
        ..Default::default()
    });
    assert!(
        !allowed(&pending_8080_allow, &pending),
        "L7 rule for another port"
    );
}

#[test]
fn which_policies_need_http() {
    let p = allow_to(pb::Operation {
        ports: v(&["8080"]),
        methods: v(&["GET"]),
        ..Default::default()
    });
    assert!(p.needs_http(8080));
    assert!(!p.needs_http(9090));
    assert_eq!(p.l7_rules(), vec![0]);
    let l4 = allow_to(pb::Operation {
        ports: v(&["8080"]),
        ..Default::default()
    });
    assert!(!l4.needs_http(8080));
    assert!(l4.l7_rules().is_empty());
    let header = allow_when("request.headers[x-a]", &["b"], &[]);
    assert!(header.needs_http(1) && header.needs_http(8080));
    let header_on_port = policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule {
            to: vec![pb::Operation {
                ports: v(&["80"]),
                ..Default::default()
            }],
            when: vec![pb::Condition {
                key: "request.headers[x-a]".into(),
                values: v(&["b"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert!(header_on_port.needs_http(80));
    assert!(!header_on_port.needs_http(81));
}

#[test]
fn when_conditions_and_negations() {
    let t = t_conn();
    let p = p_conn();
    // (key, values, notValues, want for T, want for P)
    type Case<'a> = (&'a str, &'a [&'a str], &'a [&'a str], bool, bool);
    let cases: Vec<Case> = vec![
        ("source.ip", &["10.1.0.0/24"], &[], true, true),
        ("source.ip", &[], &["10.1.0.1"], false, false),
        ("remote.ip", &["10.9.0.0/16"], &[], false, false),
        ("source.namespace", &["namespace"], &[], true, false),
        ("source.namespace", &[], &["namespace"], false, true),
        (
            "source.principal",
            &["cluster.local/ns/namespace/*"],
            &[],
            true,
            false,
        ),
        ("source.principal", &[], &["*"], false, true),
        ("destination.ip", &["10.1.0.2"], &[], true, true),
        ("destination.ip", &[], &["10.1.0.0/24"], false, false),
        ("destination.port", &["8080"], &[], true, true),
        ("destination.port", &[], &["8080"], false, false),
        ("destination.port", &["9090"], &["8080"], false, false),
    ];
    for (key, values, not_values, want_t, want_p) in cases {
        let pol = allow_when(key, values, not_values);
        assert_eq!(
            allowed(&pol, &t),
            want_t,
            "{key} {values:?} !{not_values:?}: T"
        );
        assert_eq!(
            allowed(&pol, &p),
            want_p,
            "{key} {values:?} !{not_values:?}: P"
        );
    }
    // Header conditions and JWT claims need HTTP: without a request they fail closed.
    assert!(!allowed(&allow_when("request.headers[x]", &["y"], &[]), &t));
    assert!(!allowed(
        &allow_when("request.auth.claims[iss]", &["x"], &[]),
        &t
    ));
    let deny = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            when: vec![pb::Condition {
                key: "request.auth.claims[iss]".into(),
                values: v(&["x"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert!(!allowed(&deny, &t), "an unevaluable DENY condition denies");
}

#[test]
fn decision_order_and_audit() {
    let deny_ns = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            from: vec![pb::Source {
                namespaces: v(&["namespace"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let allow_all = policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule::default()],
    );
    let allow_nothing = policy(pb::authorization_policy::Action::Allow, vec![]);
    let audit_all = policy(
        pb::authorization_policy::Action::Audit,
        vec![pb::Rule::default()],
    );
    let t = t_conn();

    // No policy at all: allow.
    assert_eq!(
        evaluate([], &t).reason,
        "no ALLOW policy applies to the workload"
    );
    assert!(evaluate([], &t).allowed);
    // DENY wins over ALLOW.
    let d = evaluate([&allow_all, &deny_ns], &t);
    assert!(!d.allowed);
    assert_eq!(d.policy.as_deref(), Some("ns/p"));
    assert_eq!(d.rule, Some(0));
    // rules: [] matches nothing: an ALLOW policy without rules denies everything.
    let d = evaluate([&allow_nothing], &t);
    assert!(!d.allowed);
    assert_eq!(d.reason, "no ALLOW policy matched");
    // rules: [{}] matches everything.
    assert!(evaluate([&allow_nothing, &allow_all], &t).allowed);
    // AUDIT is recorded but never decides.
    let d = evaluate([&audit_all], &t);
    assert!(d.allowed);
    assert_eq!(d.audited, vec!["ns/p".to_string()]);
    let d = evaluate([&audit_all, &allow_nothing], &t);
    assert!(!d.allowed);
    // A DENY that does not match leaves the ALLOW decision.
    assert!(evaluate([&deny_ns, &allow_all], &a_conn()).allowed);
    // JWT request principals without a request (L4): ALLOW never matches, DENY always does.
    let jwt_allow = allow_from(pb::Source {
        request_principals: v(&["iss/sub"]),
        ..Default::default()
    });
    assert!(!allowed(&jwt_allow, &t));
    let jwt_deny = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            from: vec![pb::Source {
                not_request_principals: v(&["*"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    assert!(!evaluate([&jwt_deny, &allow_all], &t).allowed);
}

#[test]
fn broken_policies_fail_closed() {
    let bad = |action| {
        compile(&pb::AuthorizationPolicy {
            name: "bad".into(),
            namespace: "ns".into(),
            action: action as i32,
            rules: vec![pb::Rule {
                from: vec![pb::Source {
                    ip_blocks: v(&["not-a-cidr"]),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        })
    };
    let allow = bad(pb::authorization_policy::Action::Allow);
    assert!(allow.broken.is_some());
    assert!(!allowed(&allow, &t_conn()));
    let deny = bad(pb::authorization_policy::Action::Deny);
    let allow_all = policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule::default()],
    );
    assert!(!evaluate([&deny, &allow_all], &t_conn()).allowed);
}

#[test]
fn applicability() {
    let mut p = compile(&pb::AuthorizationPolicy {
        name: "p".into(),
        namespace: "shop".into(),
        selector: [("app".to_string(), "web".to_string())].into(),
        ..Default::default()
    });
    let web: BTreeMap<String, String> =
        [("app".into(), "web".into()), ("v".into(), "1".into())].into();
    let db: BTreeMap<String, String> = [("app".into(), "db".into())].into();
    assert!(p.applies_to("shop", &web));
    assert!(!p.applies_to("shop", &db));
    assert!(!p.applies_to("other", &web));
    p.mesh_wide = true;
    assert!(
        p.applies_to("other", &web),
        "root-namespace policies apply mesh-wide"
    );
    p.selector.clear();
    assert!(p.applies_to("other", &db));
}

#[test]
fn cidr_and_string_matchers() {
    let c = matchers::Cidr::parse("10.0.0.0/8").unwrap();
    assert!(c.contains("10.255.1.2".parse().unwrap()));
    assert!(!c.contains("11.0.0.1".parse().unwrap()));
    assert!(
        c.contains("::ffff:10.1.2.3".parse().unwrap()),
        "IPv4-mapped"
    );
    let c6 = matchers::Cidr::parse("fd00::/8").unwrap();
    assert!(c6.contains("fd12::1".parse().unwrap()));
    assert!(!c6.contains("10.0.0.1".parse().unwrap()));
    assert!(matchers::Cidr::parse("0.0.0.0/0")
        .unwrap()
        .contains("1.2.3.4".parse().unwrap()));
    assert!(StringMatch::parse("*").matches("x"));
    assert!(!StringMatch::parse("*").matches(""));
    assert!(StringMatch::parse("ab*").matches("abc"));
    assert!(StringMatch::parse("*bc").matches("abc"));
    assert!(!StringMatch::parse("abc").matches("abcd"));
}

/// A request of connection T, with a verified JWT when `auth` is given.
fn jwt_request(auth: Option<RequestAuth>) -> Attributes {
    Attributes {
        request: Some(Request {
            method: "GET".into(),
            path: "/".into(),
            host: "shop".into(),
            headers: Vec::new(),
            auth: auth.map(std::sync::Arc::new),
        }),
        ..t_conn()
    }
}

fn alice() -> RequestAuth {
    RequestAuth {
        principal: "https://issuer.example/alice".into(),
        audiences: vec!["shop".into(), "billing".into()],
        presenter: Some("web-app".into()),
        claims: serde_json::json!({
            "iss": "https://issuer.example",
            "sub": "alice",
            "groups": ["admins", "dev"],
            "org": {"team": "payments", "level": 3},
        }),
    }
}

#[test]
fn jwt_request_principals_at_l7() {
    let allow_alice = allow_from(pb::Source {
        request_principals: v(&["https://issuer.example/alice"]),
        ..Default::default()
    });
    let allow_any_jwt = allow_from(pb::Source {
        request_principals: v(&["*"]),
        ..Default::default()
    });
    assert!(allowed(&allow_alice, &jwt_request(Some(alice()))));
    assert!(allowed(&allow_any_jwt, &jwt_request(Some(alice()))));
    let bob = RequestAuth {
        principal: "https://issuer.example/bob".into(),
        ..alice()
    };
    assert!(!allowed(&allow_alice, &jwt_request(Some(bob))));
    // No token: no request principal, so a positive list never matches ...
    assert!(!allowed(&allow_any_jwt, &jwt_request(None)));
    // ... and `notRequestPrincipals: ["*"]` (require a token) does.
    let deny_without_jwt = policy(
        pb::authorization_policy::Action::Deny,
        vec![pb::Rule {
            from: vec![pb::Source {
                not_request_principals: v(&["*"]),
                ..Default::default()
            }],
            ..Default::default()
        }],
    );
    let allow_all = policy(
        pb::authorization_policy::Action::Allow,
        vec![pb::Rule::default()],
    );
    assert!(!evaluate([&deny_without_jwt, &allow_all], &jwt_request(None)).allowed);
    assert!(evaluate([&deny_without_jwt, &allow_all], &jwt_request(Some(alice()))).allowed);
    // A token without `sub` has no principal.
    let no_sub = RequestAuth {
        principal: String::new(),
        ..alice()
    };
    assert!(!allowed(&allow_any_jwt, &jwt_request(Some(no_sub))));
    // The peer principal still counts alongside: both must match.
    let both = allow_from(pb::Source {
        request_principals: v(&["*"]),
        principals: v(&["cluster.local/ns/other/sa/x"]),
        ..Default::default()
    });
    assert!(!allowed(&both, &jwt_request(Some(alice()))));
    // Such a policy makes the port parsed as HTTP.
    assert!(allow_alice.needs_http(8080));
}

#[test]
fn jwt_conditions_at_l7() {
    let cases: &[(&str, &[&str], &[&str], bool)] = &[
        (
            "request.auth.principal",
            &["https://issuer.example/alice"],
            &[],
            true,
        ),
        ("request.auth.principal", &["*/bob"], &[], false),
        ("request.auth.audiences", &["billing"], &[], true),
        ("request.auth.audiences", &["other"], &[], false),
        ("request.auth.presenter", &["web-*"], &[], true),
        ("request.auth.claims[groups]", &["admins"], &[], true),
        ("request.auth.claims[groups]", &["ops"], &[], false),
        ("request.auth.claims[groups]", &[], &["dev"], false),
        ("request.auth.claims[org][team]", &["payments"], &[], true),
        ("request.auth.claims[org][level]", &["3"], &[], true),
        ("request.auth.claims[org][missing]", &["x"], &[], false),
        ("request.auth.claims[org][missing]", &[], &["x"], true),
    ];
    for (key, values, not_values, want) in cases {
        let p = allow_when(key, values, not_values);
        assert_eq!(
            allowed(&p, &jwt_request(Some(alice()))),
            *want,
            "{key} {values:?} !{not_values:?}"
        );
        assert!(p.needs_http(8080), "{key}");
    }
    // No token: values never match, notValues always pass.
    assert!(!allowed(
        &allow_when("request.auth.claims[groups]", &["admins"], &[]),
        &jwt_request(None)
    ));
    assert!(allowed(
        &allow_when("request.auth.claims[groups]", &[], &["admins"]),
        &jwt_request(None)
    ));
}
