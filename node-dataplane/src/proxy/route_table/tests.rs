use super::*;
use crate::route_match::check;

fn path(kind: pb::MatchKind, v: &str) -> Option<pb::PathMatch> {
    Some(pb::PathMatch {
        kind: kind as i32,
        value: v.into(),
    })
}

fn rule(name: &str, matches: Vec<pb::RouteMatch>, backend: &str) -> pb::RouteRule {
    pb::RouteRule {
        name: name.into(),
        matches,
        backends: vec![pb::RouteBackend {
            service_namespace: "shop".into(),
            service_name: backend.into(),
            weight: 1,
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn route(ns: &str, name: &str, created: i64, rules: Vec<pb::RouteRule>) -> Arc<pb::Route> {
    Arc::new(pb::Route {
        name: name.into(),
        namespace: ns.into(),
        kind: pb::route::RouteKind::Http as i32,
        parents: vec![pb::RouteParent {
            service_namespace: "shop".into(),
            service_name: "echo".into(),
            port: 0,
        }],
        rules,
        created,
    })
}

fn m(p: Option<pb::PathMatch>) -> pb::RouteMatch {
    pb::RouteMatch {
        path: p,
        ..Default::default()
    }
}

/// (route, rule) a request takes.
fn pick(t: &RouteTable, method: &str, uri: &str, headers: &[(&str, &str)]) -> Option<String> {
    let mut b = http::Request::builder().method(method).uri(uri);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(()).unwrap();
    t.select(&RequestView::of(&req))
        .map(|s| format!("{}#{}", s.rule.route, s.rule.name))
}

fn table(routes: &[Arc<pb::Route>], client_ns: &str) -> RouteTable {
    RouteTable::build(routes.iter(), "shop", "echo", 80, client_ns)
}

#[test]
fn path_prefixes_match_whole_segments() {
    assert!(prefix_matches("/a", "/a"));
    assert!(prefix_matches("/a", "/a/"));
    assert!(prefix_matches("/a", "/a/b"));
    assert!(!prefix_matches("/a", "/ab"));
    assert!(prefix_matches("/", "/anything"));
    let t = table(
        &[route(
            "shop",
            "r",
            1,
            vec![rule(
                "v1",
                vec![m(path(pb::MatchKind::Prefix, "/v1/"))],
                "b",
            )],
        )],
        "shop",
    );
    assert_eq!(pick(&t, "GET", "/v1", &[]).as_deref(), Some("shop/r#v1"));
    assert_eq!(pick(&t, "GET", "/v1/x", &[]).as_deref(), Some("shop/r#v1"));
    assert_eq!(pick(&t, "GET", "/v12", &[]), None);
}

#[test]
fn precedence_exact_then_longest_prefix_then_method_headers_query_then_age() {
    use pb::MatchKind::*;
    let hm = |n: &str, v: &str| pb::ValueMatch {
        name: n.into(),
        kind: Exact as i32,
        value: v.into(),
    };
    let routes = vec![
        // Newer route, listed first: loses ties to the older one.
        route(
            "shop",
            "newer",
            200,
            vec![
                rule("root", vec![m(None)], "b"),
                rule("tie", vec![m(path(Prefix, "/tie"))], "b"),
            ],
        ),
        route(
            "shop",
            "older",
            100,
            vec![
                rule("exact", vec![m(path(Exact, "/a/b"))], "b"),
                rule("long", vec![m(path(Prefix, "/a/b"))], "b"),
                rule("short", vec![m(path(Prefix, "/a"))], "b"),
                rule(
                    "post",
                    vec![pb::RouteMatch {
                        path: path(Prefix, "/a"),
                        method: "POST".into(),
                        ..Default::default()
                    }],
                    "b",
                ),
                rule(
                    "header",
                    vec![pb::RouteMatch {
                        path: path(Prefix, "/a"),
                        headers: vec![hm("x-v", "2")],
                        ..Default::default()
                    }],
                    "b",
                ),
                rule(
                    "query",
                    vec![pb::RouteMatch {
                        path: path(Prefix, "/a"),
                        query_params: vec![hm("v", "3")],
                        ..Default::default()
                    }],
                    "b",
                ),
                rule("tie", vec![m(path(Prefix, "/tie"))], "b"),
                rule("regex", vec![m(path(Regex, "/r/[0-9]+"))], "b"),
            ],
        ),
    ];
    let t = table(&routes, "shop");
    let p = |method: &str, uri: &str, h: &[(&str, &str)]| pick(&t, method, uri, h);
    assert_eq!(p("GET", "/a/b", &[]).as_deref(), Some("shop/older#exact"));
    assert_eq!(p("GET", "/a/b/c", &[]).as_deref(), Some("shop/older#long"));
    assert_eq!(p("GET", "/a/x", &[]).as_deref(), Some("shop/older#short"));
    assert_eq!(
        p("POST", "/a/x", &[("x-v", "2")]).as_deref(),
        Some("shop/older#post")
    );
    assert_eq!(
        p("GET", "/a/x", &[("x-v", "2")]).as_deref(),
        Some("shop/older#header")
    );
    assert_eq!(
        p("GET", "/a/x?w=1&v=3", &[]).as_deref(),
        Some("shop/older#query")
    );
    assert_eq!(
        p("GET", "/a/x?v=4", &[]).as_deref(),
        Some("shop/older#short")
    );
    assert_eq!(p("GET", "/tie", &[]).as_deref(), Some("shop/older#tie"));
    // A regular expression ranks below every prefix, "/" included.
    assert_eq!(p("GET", "/r/12", &[]).as_deref(), Some("shop/newer#root"));
    assert_eq!(
        p("GET", "/elsewhere", &[]).as_deref(),
        Some("shop/newer#root")
    );
}

#[test]
fn regular_expressions_match_the_whole_value() {
    use pb::MatchKind::*;
    let routes = vec![route(
        "shop",
        "r",
        1,
        vec![
            rule("re", vec![m(path(Regex, "/r/[0-9]+"))], "b"),
            rule(
                "hdr",
                vec![pb::RouteMatch {
                    path: path(Exact, "/h"),
                    headers: vec![pb::ValueMatch {
                        name: "x-id".into(),
                        kind: Regex as i32,
                        value: "ab+".into(),
                    }],
                    ..Default::default()
                }],
                "b",
            ),
        ],
    )];
    let t = table(&routes, "shop");
    assert_eq!(pick(&t, "GET", "/r/12", &[]).as_deref(), Some("shop/r#re"));
    assert_eq!(pick(&t, "GET", "/r/12/x", &[]), None);
    assert_eq!(
        pick(&t, "GET", "/h", &[("x-id", "abbb")]).as_deref(),
        Some("shop/r#hdr")
    );
    assert_eq!(pick(&t, "GET", "/h", &[("x-id", "xabb")]), None);
    assert_eq!(
        pick(&t, "GET", "/h", &[("X-ID", "ab")]).as_deref(),
        Some("shop/r#hdr")
    );
}

#[test]
fn consumer_routes_replace_producer_routes_for_their_namespace_only() {
    let routes = vec![
        route("shop", "producer", 1, vec![rule("p", vec![m(None)], "b")]),
        route("web", "consumer", 1, vec![rule("c", vec![m(None)], "b")]),
        route("other", "unrelated", 1, vec![rule("u", vec![m(None)], "b")]),
    ];
    let get = |ns: &str| pick(&table(&routes, ns), "GET", "/", &[]);
    assert_eq!(get("web").as_deref(), Some("web/consumer#c"));
    assert_eq!(get("shop").as_deref(), Some("shop/producer#p"));
    assert_eq!(get("other").as_deref(), Some("other/unrelated#u"));
    assert_eq!(get("elsewhere").as_deref(), Some("shop/producer#p"));
}

#[test]
fn a_parent_port_limits_the_route_to_that_port() {
    let mut r = (*route("shop", "r", 1, vec![rule("", vec![m(None)], "b")])).clone();
    r.parents[0].port = 8080;
    let routes = [Arc::new(r)];
    assert!(RouteTable::build(routes.iter(), "shop", "echo", 80, "shop").is_empty());
    let t = RouteTable::build(routes.iter(), "shop", "echo", 8080, "shop");
    // Unnamed rules are named by their index.
    assert_eq!(pick(&t, "GET", "/", &[]).as_deref(), Some("shop/r#0"));
}

#[test]
fn weights_split_in_proportion_and_zero_weight_is_never_chosen() {
    let mut rl = rule("w", vec![], "a");
    rl.backends = ["a", "b", "c"]
        .iter()
        .zip([90u32, 10, 0])
        .map(|(n, w)| pb::RouteBackend {
            service_namespace: "shop".into(),
            service_name: (*n).into(),
            weight: w,
            ..Default::default()
        })
        .collect();
    let t = table(&[route("shop", "r", 1, vec![rl])], "shop");
    let req = http::Request::builder().uri("/").body(()).unwrap();
    let sel = t.select(&RequestView::of(&req)).unwrap();
    assert_eq!(sel.rule.total_weight, 100);
    // Deterministically: 0..90 -> a, 90..100 -> b, c never.
    let names: Vec<&str> = (0..100)
        .map(|i| sel.rule.backend_at(i).unwrap().service_name.as_str())
        .collect();
    assert_eq!(names.iter().filter(|n| **n == "a").count(), 90);
    assert_eq!(names.iter().filter(|n| **n == "b").count(), 10);
    assert!(sel.rule.backend_at(100).is_none());
    let mut counts = std::collections::HashMap::new();
    for _ in 0..10_000 {
        *counts
            .entry(sel.rule.choose_backend().unwrap().service_name.clone())
            .or_insert(0) += 1;
    }
    assert!(!counts.contains_key("c"));
    let a = counts["a"];
    assert!((8_700..=9_300).contains(&a), "{counts:?}");
}

#[test]
fn regexes_are_checked_and_bounded() {
    let mut r = (*route("shop", "r", 1, vec![])).clone();
    r.rules.push(rule(
        "bad",
        vec![m(path(pb::MatchKind::Regex, "(unclosed"))],
        "b",
    ));
    assert!(check(&r).unwrap_err().contains("regular expression"));
    r.rules[0].matches[0].path = path(pb::MatchKind::Regex, "(a{1000}){1000}");
    assert!(
        check(&r).is_err(),
        "a regex beyond the size bound is refused"
    );
}

#[test]
fn a_grpc_method_only_match_outranks_the_catch_all() {
    let mut r = (*route(
        "shop",
        "g",
        1,
        vec![
            rule("all", vec![], "b"),
            rule(
                "method",
                vec![m(path(pb::MatchKind::Regex, "/[^/]+/(?:Get.*)"))],
                "b",
            ),
            rule(
                "service",
                vec![m(path(pb::MatchKind::Prefix, "/pkg.Svc/"))],
                "b",
            ),
        ],
    ))
    .clone();
    r.kind = pb::route::RouteKind::Grpc as i32;
    let t = table(&[Arc::new(r)], "shop");
    assert_eq!(
        pick(&t, "POST", "/other.Svc/GetX", &[]).as_deref(),
        Some("shop/g#method")
    );
    assert_eq!(
        pick(&t, "POST", "/pkg.Svc/GetX", &[]).as_deref(),
        Some("shop/g#service")
    );
    assert_eq!(
        pick(&t, "POST", "/other.Svc/Put", &[]).as_deref(),
        Some("shop/g#all")
    );
}
