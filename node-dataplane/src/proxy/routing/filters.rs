//! The Gateway API filters a route rule (or one of its backends) applies to a
//! request or its response: header modifiers, redirects and URL rewrites. Pure
//! functions of the request; mirroring is [`super::forward`]'s.

use http::header::{HeaderMap, HeaderName, HeaderValue, HOST, LOCATION};
use http::{StatusCode, Uri};
use weft_proto::pb;

/// Applies a header modifier: set (replace), add (append), remove, in that order.
pub fn modify_headers(h: &mut HeaderMap, m: &pb::HeaderModifier) {
    for kv in &m.set {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(kv.name.as_bytes()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.insert(n, v);
        }
    }
    for kv in &m.add {
        if let (Ok(n), Ok(v)) = (
            HeaderName::from_bytes(kv.name.as_bytes()),
            HeaderValue::from_str(&kv.value),
        ) {
            h.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            h.remove(n);
        }
    }
}

/// The path a path modifier makes of `path` (`prefix`: the PathPrefix that matched,
/// for ReplacePrefixMatch).
pub fn modified_path(path: &str, m: &pb::PathModifier, prefix: Option<&str>) -> String {
    if !m.prefix {
        return m.value.clone();
    }
    let matched = prefix.unwrap_or("/");
    let rest = if matched == "/" {
        path.strip_prefix('/').map(|r| format!("/{r}"))
    } else {
        path.strip_prefix(matched).map(str::to_string)
    }
    .unwrap_or_else(|| path.to_string());
    let base = m.value.trim_end_matches('/');
    match (base.is_empty(), rest.is_empty() || rest == "/") {
        // "/" replacing "/a" in "/a/b" gives "/b"; in "/a" it gives "/".
        (true, true) => "/".to_string(),
        (true, false) => rest,
        (false, true) => {
            if rest == "/" {
                format!("{base}/")
            } else {
                base.to_string()
            }
        }
        (false, false) => format!("{base}{rest}"),
    }
}

fn with_path(uri: &Uri, path: &str) -> Option<Uri> {
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    let mut parts = uri.clone().into_parts();
    parts.path_and_query = Some(pq.parse().ok()?);
    Uri::from_parts(parts).ok()
}

/// The request's host, without a port: `Host`, else the URI's authority.
pub fn request_host(parts: &http::request::Parts) -> String {
    let raw = parts
        .headers
        .get(HOST)
        .and_then(|h| h.to_str().ok())
        .map(str::to_string)
        .or_else(|| parts.uri.authority().map(|a| a.as_str().to_string()))
        .unwrap_or_default();
    strip_port(&raw).to_string()
}

fn strip_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.split_once(':').map(|(h, _)| h).unwrap_or(host)
}

/// Applies a URL rewrite to the request (its `Host`/authority and path).
pub fn rewrite(parts: &mut http::request::Parts, r: &pb::UrlRewrite, prefix: Option<&str>) {
    if !r.hostname.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&r.hostname) {
            parts.headers.insert(HOST, v);
        }
        if parts.uri.authority().is_some() {
            let mut p = parts.uri.clone().into_parts();
            if let Ok(a) = r.hostname.parse() {
                p.authority = Some(a);
                if let Ok(u) = Uri::from_parts(p) {
                    parts.uri = u;
                }
            }
        }
    }
    if let Some(m) = &r.path {
        let path = modified_path(parts.uri.path(), m, prefix);
        if let Some(u) = with_path(&parts.uri, &path) {
            parts.uri = u;
        }
    }
}

/// The redirect response a RequestRedirect filter answers with. `port` is the
/// port the client connected to (kept unless the filter or a scheme change says
/// otherwise; left out when it is the scheme's default).
pub fn redirect(
    parts: &http::request::Parts,
    r: &pb::RequestRedirect,
    prefix: Option<&str>,
    port: u16,
) -> http::Response<()> {
    let scheme = if r.scheme.is_empty() {
        "http"
    } else {
        r.scheme.as_str()
    };
    let host = if r.hostname.is_empty() {
        request_host(parts)
    } else {
        r.hostname.clone()
    };
    let port = if r.port != 0 {
        u16::try_from(r.port).unwrap_or(port)
    } else if !r.scheme.is_empty() {
        // A scheme change without a port goes to the scheme's default port.
        if scheme == "https" {
            443
        } else {
            80
        }
    } else {
        port
    };
    let default_port = (scheme == "http" && port == 80) || (scheme == "https" && port == 443);
    let path = match &r.path {
        Some(m) => modified_path(parts.uri.path(), m, prefix),
        None => parts.uri.path().to_string(),
    };
    let query = parts
        .uri
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = if default_port {
        format!("{scheme}://{host}{path}{query}")
    } else {
        format!("{scheme}://{host}:{port}{path}{query}")
    };
    let status = StatusCode::from_u16(u16::try_from(r.status_code).unwrap_or(302))
        .ok()
        .filter(StatusCode::is_redirection)
        .unwrap_or(StatusCode::FOUND);
    let mut resp = http::Response::new(());
    *resp.status_mut() = status;
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pm(prefix: bool, value: &str) -> pb::PathModifier {
        pb::PathModifier {
            prefix,
            value: value.into(),
        }
    }

    #[test]
    fn prefix_replacement_follows_the_gateway_api_examples() {
        // (request path, matched prefix, replacement, result)
        let cases = [
            ("/foo/bar", "/foo", "/xyz", "/xyz/bar"),
            ("/foo/bar", "/foo", "/xyz/", "/xyz/bar"),
            ("/foo", "/foo", "/xyz", "/xyz"),
            ("/foo/", "/foo", "/xyz", "/xyz/"),
            ("/foo/bar", "/foo", "/", "/bar"),
            ("/foo", "/foo", "/", "/"),
            ("/foo/", "/foo", "/", "/"),
            ("/a/b/c", "/a/b", "/x", "/x/c"),
        ];
        for (path, prefix, with, want) in cases {
            assert_eq!(
                modified_path(path, &pm(true, with), Some(prefix)),
                want,
                "{path} with prefix {prefix} replaced by {with}"
            );
        }
        assert_eq!(
            modified_path("/any/thing", &pm(false, "/full"), None),
            "/full"
        );
    }

    #[test]
    fn header_modifier_sets_adds_and_removes() {
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        h.insert("x-b", HeaderValue::from_static("2"));
        h.insert("x-gone", HeaderValue::from_static("3"));
        let hv = |n: &str, v: &str| pb::HeaderValue {
            name: n.into(),
            value: v.into(),
        };
        modify_headers(
            &mut h,
            &pb::HeaderModifier {
                set: vec![hv("x-a", "one")],
                add: vec![hv("x-b", "two"), hv("x-new", "n")],
                remove: vec!["x-gone".into()],
            },
        );
        assert_eq!(h.get_all("x-a").iter().collect::<Vec<_>>(), ["one"]);
        assert_eq!(h.get_all("x-b").iter().collect::<Vec<_>>(), ["2", "two"]);
        assert_eq!(h.get("x-new").unwrap(), "n");
        assert!(h.get("x-gone").is_none());
    }

    fn parts(uri: &str, host: &str) -> http::request::Parts {
        let (p, ()) = http::Request::builder()
            .uri(uri)
            .header(HOST, host)
            .body(())
            .unwrap()
            .into_parts();
        p
    }

    #[test]
    fn redirects_build_the_location_from_the_request_and_the_filter() {
        let p = parts("/old/x?q=1", "echo.shop:8080");
        let r = |scheme: &str, host: &str, port: u32, path: Option<pb::PathModifier>, code: u32| {
            redirect(
                &p,
                &pb::RequestRedirect {
                    scheme: scheme.into(),
                    hostname: host.into(),
                    path,
                    port,
                    status_code: code,
                },
                Some("/old"),
                8080,
            )
        };
        let loc = |resp: &http::Response<()>| {
            resp.headers()
                .get(LOCATION)
                .unwrap()
                .to_str()
                .unwrap()
                .to_string()
        };
        let a = r("", "", 0, None, 302);
        assert_eq!(a.status(), StatusCode::FOUND);
        assert_eq!(loc(&a), "http://echo.shop:8080/old/x?q=1");
        let b = r("https", "", 0, None, 301);
        assert_eq!(b.status(), StatusCode::MOVED_PERMANENTLY);
        assert_eq!(loc(&b), "https://echo.shop/old/x?q=1");
        let c = r("", "other", 0, Some(pm(true, "/new")), 302);
        assert_eq!(loc(&c), "http://other:8080/new/x?q=1");
        let d = r("", "", 80, Some(pm(false, "/full")), 308);
        assert_eq!(d.status(), StatusCode::PERMANENT_REDIRECT);
        assert_eq!(loc(&d), "http://echo.shop/full?q=1");
    }

    #[test]
    fn rewrites_change_host_and_path_and_keep_the_query() {
        let mut p = parts("/shop/cart?id=7", "echo");
        rewrite(
            &mut p,
            &pb::UrlRewrite {
                hostname: "backend.internal".into(),
                path: Some(pm(true, "/v2")),
            },
            Some("/shop"),
        );
        assert_eq!(p.headers.get(HOST).unwrap(), "backend.internal");
        assert_eq!(p.uri.to_string(), "/v2/cart?id=7");
    }
}
