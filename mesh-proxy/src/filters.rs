//! HTTPRoute filters that edit a request or build an answer: header modifiers,
//! RequestRedirect (the Location) and URLRewrite (host and path). Mirrors are sent by
//! [`crate::forward`]; these are the pure parts.

use http::{HeaderMap, HeaderName, HeaderValue, Uri, header, request::Parts};
use mesh_common::l7::{HeaderModifier, PathModifier, Redirect, Rewrite};

/// Applies `m` to `headers`: set, then add, then remove. A name or value that is not
/// valid HTTP is skipped (the agent validates them; only a version skew gets here).
pub fn modify_headers(headers: &mut HeaderMap, m: &HeaderModifier) {
    for (name, value) in &m.set {
        if let Some((n, v)) = header_pair(name, value) {
            headers.insert(n, v);
        }
    }
    for (name, value) in &m.add {
        if let Some((n, v)) = header_pair(name, value) {
            headers.append(n, v);
        }
    }
    for name in &m.remove {
        if let Ok(n) = HeaderName::from_bytes(name.as_bytes()) {
            headers.remove(n);
        }
    }
}

fn header_pair(name: &str, value: &str) -> Option<(HeaderName, HeaderValue)> {
    match (
        HeaderName::from_bytes(name.as_bytes()),
        HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => Some((n, v)),
        _ => {
            tracing::warn!(
                header = name,
                "skipping an invalid header in a header modifier"
            );
            None
        }
    }
}

/// The request's host and port: `:authority` (HTTP/2) or `Host` (HTTP/1.1).
pub fn request_host(parts: &Parts) -> Option<(String, Option<u16>)> {
    if let Some(a) = parts.uri.authority() {
        return Some((a.host().to_owned(), a.port_u16()));
    }
    let host = parts.headers.get(header::HOST)?.to_str().ok()?;
    let a: http::uri::Authority = host.parse().ok()?;
    Some((a.host().to_owned(), a.port_u16()))
}

fn well_known(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// The `Location` of a RequestRedirect answer. `prefix` is the PathPrefix that
/// matched (for ReplacePrefixMatch); `service_port` is the port the client dialled,
/// used when neither the filter nor the Host header names one.
pub fn redirect_location(
    parts: &Parts,
    r: &Redirect,
    prefix: Option<&str>,
    service_port: u16,
) -> String {
    let (req_host, req_port) = request_host(parts).unwrap_or_default();
    let scheme = r.scheme.as_deref().unwrap_or("http");
    let host = r.hostname.as_deref().unwrap_or(&req_host);
    let port = match (r.port, &r.scheme) {
        (Some(p), _) => Some(p),
        // A scheme change takes the new scheme's well-known port.
        (None, Some(s)) if s != "http" => well_known(s),
        (None, _) => Some(req_port.unwrap_or(service_port)),
    };
    let path = match &r.path {
        Some(m) => rewrite_path(parts.uri.path(), m, prefix),
        None => parts.uri.path().to_owned(),
    };
    let mut loc = format!("{scheme}://{host}");
    if let Some(p) = port.filter(|p| Some(*p) != well_known(scheme)) {
        loc.push_str(&format!(":{p}"));
    }
    loc.push_str(&path);
    if let Some(q) = parts.uri.query() {
        loc.push('?');
        loc.push_str(q);
    }
    loc
}

/// The path after a path modifier. ReplacePrefixMatch replaces the matched prefix's
/// elements, keeping one `/` between the replacement and the rest.
pub fn rewrite_path(path: &str, m: &PathModifier, prefix: Option<&str>) -> String {
    match m {
        PathModifier::ReplaceFullPath(p) => p.clone(),
        PathModifier::ReplacePrefixMatch(repl) => {
            let Some(prefix) = prefix.filter(|p| path.starts_with(p)) else {
                return path.to_owned();
            };
            let rest = &path[prefix.len()..];
            let mut out = repl.trim_end_matches('/').to_owned();
            if rest.is_empty() && out.is_empty() {
                return "/".to_owned();
            }
            if rest.is_empty() && repl.ends_with('/') && repl.len() > 1 {
                out.push('/');
            }
            out.push_str(rest);
            if out.is_empty() { "/".to_owned() } else { out }
        }
    }
}

/// Applies a URLRewrite: the host (`Host`, and `:authority` when the URI has one) and
/// the path (query kept).
pub fn apply_rewrite(parts: &mut Parts, rw: &Rewrite, prefix: Option<&str>) {
    let mut uri = parts.uri.clone().into_parts();
    if let Some(host) = &rw.hostname {
        let port = request_host(parts).and_then(|(_, p)| p);
        let authority = match port {
            Some(p) => format!("{host}:{p}"),
            None => host.clone(),
        };
        match (authority.parse(), HeaderValue::from_str(&authority)) {
            (Ok(a), Ok(v)) => {
                if uri.authority.is_some() {
                    uri.authority = Some(a);
                }
                parts.headers.insert(header::HOST, v);
            }
            _ => tracing::warn!(hostname = host, "skipping an invalid URLRewrite hostname"),
        }
    }
    if let Some(m) = &rw.path {
        let path = rewrite_path(parts.uri.path(), m, prefix);
        let pq = match parts.uri.query() {
            Some(q) => format!("{path}?{q}"),
            None => path,
        };
        match pq.parse() {
            Ok(pq) => uri.path_and_query = Some(pq),
            Err(_) => tracing::warn!(path = pq, "skipping an invalid URLRewrite path"),
        }
    }
    if let Ok(u) = Uri::from_parts(uri) {
        parts.uri = u;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, host: Option<&str>) -> Parts {
        let mut b = http::Request::builder().uri(uri);
        if let Some(h) = host {
            b = b.header(header::HOST, h);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn redirect() -> Redirect {
        Redirect {
            scheme: None,
            hostname: None,
            port: None,
            path: None,
            status: 302,
        }
    }

    #[test]
    fn redirect_locations() {
        let p = parts("/a/b?x=1", Some("web.default:8080"));
        assert_eq!(
            redirect_location(&p, &redirect(), None, 80),
            "http://web.default:8080/a/b?x=1"
        );
        let r = Redirect {
            scheme: Some("https".into()),
            ..redirect()
        };
        assert_eq!(
            redirect_location(&p, &r, None, 80),
            "https://web.default/a/b?x=1"
        );
        let r = Redirect {
            scheme: Some("https".into()),
            port: Some(8443),
            ..redirect()
        };
        assert_eq!(
            redirect_location(&p, &r, None, 80),
            "https://web.default:8443/a/b?x=1"
        );
        let r = Redirect {
            hostname: Some("other".into()),
            port: Some(80),
            ..redirect()
        };
        assert_eq!(redirect_location(&p, &r, None, 80), "http://other/a/b?x=1");
        let p = parts("/a/b", Some("web"));
        assert_eq!(
            redirect_location(&p, &redirect(), None, 80),
            "http://web/a/b"
        );
        assert_eq!(
            redirect_location(&p, &redirect(), None, 9000),
            "http://web:9000/a/b"
        );
        let r = Redirect {
            path: Some(PathModifier::ReplacePrefixMatch("/new".into())),
            ..redirect()
        };
        assert_eq!(
            redirect_location(&p, &r, Some("/a"), 80),
            "http://web/new/b"
        );
        let r = Redirect {
            path: Some(PathModifier::ReplaceFullPath("/full".into())),
            ..redirect()
        };
        assert_eq!(redirect_location(&p, &r, None, 80), "http://web/full");
    }

    #[test]
    fn prefix_rewrites() {
        let rp = |path: &str, prefix: &str, repl: &str| {
            rewrite_path(
                path,
                &PathModifier::ReplacePrefixMatch(repl.into()),
                Some(prefix),
            )
        };
        assert_eq!(rp("/foo/bar", "/foo", "/xyz"), "/xyz/bar");
        assert_eq!(rp("/foo/bar", "/foo", "/xyz/"), "/xyz/bar");
        assert_eq!(rp("/foo/bar", "/foo", "/"), "/bar");
        assert_eq!(rp("/foo", "/foo", "/"), "/");
        assert_eq!(rp("/foo", "/foo", "/xyz"), "/xyz");
        assert_eq!(rp("/foo", "/foo", "/xyz/"), "/xyz/");
        assert_eq!(rp("/bar", "", "/xyz"), "/xyz/bar");
        assert_eq!(rp("/foo/", "/foo", "/xyz"), "/xyz/");
    }

    #[test]
    fn url_rewrite_host_and_path() {
        let mut p = parts("/foo/bar?q=1", Some("web:8080"));
        let rw = Rewrite {
            hostname: Some("api.internal".into()),
            path: Some(PathModifier::ReplacePrefixMatch("/v2".into())),
        };
        apply_rewrite(&mut p, &rw, Some("/foo"));
        assert_eq!(p.headers[header::HOST], "api.internal:8080");
        assert_eq!(p.uri, "/v2/bar?q=1");
        let mut p = parts("http://web/x", None);
        apply_rewrite(
            &mut p,
            &Rewrite {
                hostname: Some("h2".into()),
                path: None,
            },
            None,
        );
        assert_eq!(p.uri, "http://h2/x");
    }

    #[test]
    fn header_modifier_order() {
        let mut h = HeaderMap::new();
        h.insert("a", HeaderValue::from_static("1"));
        h.insert("gone", HeaderValue::from_static("x"));
        let m = HeaderModifier {
            set: vec![("a".into(), "2".into())],
            add: vec![("a".into(), "3".into()), ("b".into(), "4".into())],
            remove: vec!["gone".into(), "b".into()],
        };
        modify_headers(&mut h, &m);
        let a: Vec<_> = h.get_all("a").iter().collect();
        assert_eq!(a, ["2", "3"]);
        assert!(!h.contains_key("gone") && !h.contains_key("b"));
    }
}
