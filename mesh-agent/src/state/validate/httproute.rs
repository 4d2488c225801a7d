//! HTTPRoute checks: the CRD's schema and CEL rules that the proxy relies on (enums,
//! ranges, list limits, path syntax, filter combinations, durations), and regular
//! expressions that must compile with the proxy's engine (the `regex` crate, RE2
//! syntax). References to other objects are not checked here: a missing Service is a
//! route status, not an invalid document (see `plan::routes`).

use std::collections::BTreeMap;

use super::{Problem, problem};
use crate::state::httproute::{
    BackendObjectReference, HttpHeaderFilter, HttpHeaderMatch, HttpPathModifier, HttpRoute,
    HttpRouteFilter, HttpRouteMatch, HttpRouteRule, parse_duration,
};

/// Most entries of `spec.parentRefs`.
const MAX_PARENT_REFS: usize = 32;
/// Most entries of `spec.hostnames`, `spec.rules`, `filters`, `backendRefs`, and of
/// `headers`, `queryParams`, `set`, `add`, `remove`.
const MAX_ITEMS: usize = 16;
/// Most `matches` of one rule.
const MAX_MATCHES: usize = 64;
/// Most `matches` of all rules of a route.
const MAX_ROUTE_MATCHES: usize = 128;
/// Longest path value, path modifier or query parameter value.
const MAX_PATH: usize = 1024;
/// Longest header value.
const MAX_HEADER_VALUE: usize = 4096;
/// Largest backendRef weight.
pub const MAX_WEIGHT: i32 = 1_000_000;

const PATH_TYPES: [&str; 3] = ["Exact", "PathPrefix", "RegularExpression"];
const VALUE_TYPES: [&str; 2] = ["Exact", "RegularExpression"];
const METHODS: [&str; 9] = [
    "GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH",
];
/// The filter types this mesh implements (the CRD also has CORS and, experimental,
/// ExternalAuth: refused, so that a route never silently loses a filter).
const FILTER_TYPES: [&str; 6] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestMirror",
    "RequestRedirect",
    "URLRewrite",
    "ExtensionRef",
];
/// Filter types that may appear once per list.
const SINGLE_FILTERS: [&str; 4] = [
    "RequestHeaderModifier",
    "ResponseHeaderModifier",
    "RequestRedirect",
    "URLRewrite",
];

pub(in crate::state) fn http_route(route: &HttpRoute) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &route.spec;
    if spec.parent_refs.len() > MAX_PARENT_REFS {
        out.push(too_many(
            "spec.parentRefs",
            spec.parent_refs.len(),
            MAX_PARENT_REFS,
        ));
    }
    for (i, parent) in spec.parent_refs.iter().enumerate() {
        let at = format!("spec.parentRefs[{i}]");
        if parent.name.is_empty() {
            out.push(problem(format!("{at}.name"), "required"));
        }
        if let Some(port) = parent.port {
            super::check_port(&format!("{at}.port"), port, &mut out);
        }
    }
    if spec.hostnames.len() > MAX_ITEMS {
        out.push(too_many("spec.hostnames", spec.hostnames.len(), MAX_ITEMS));
    }
    for (i, host) in spec.hostnames.iter().enumerate() {
        let name = host.strip_prefix("*.").unwrap_or(host);
        if let Err(why) = check_hostname(name) {
            out.push(problem(
                format!("spec.hostnames[{i}]"),
                format!("{host:?} {why}"),
            ));
        }
    }
    let Some(rules) = &spec.rules else {
        return out;
    };
    if rules.is_empty() {
        out.push(problem(
            "spec.rules",
            "must have at least one rule when given",
        ));
    }
    if rules.len() > MAX_ITEMS {
        out.push(too_many("spec.rules", rules.len(), MAX_ITEMS));
    }
    let total: usize = rules
        .iter()
        .map(|r| r.matches.as_ref().map_or(0, Vec::len))
        .sum();
    if total > MAX_ROUTE_MATCHES {
        out.push(problem(
            "spec.rules",
            format!("{total} matches in all rules: at most {MAX_ROUTE_MATCHES}"),
        ));
    }
    let mut names = BTreeMap::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("spec.rules[{i}]");
        if let Some(name) = &rule.name
            && let Some(first) = names.insert(name, i)
        {
            out.push(problem(
                format!("{at}.name"),
                format!("duplicate rule name {name:?} (also spec.rules[{first}])"),
            ));
        }
        check_rule(&at, rule, &mut out);
    }
    out
}

fn check_rule(at: &str, rule: &HttpRouteRule, out: &mut Vec<Problem>) {
    let matches = rule.matches.as_deref().unwrap_or_default();
    if matches.len() > MAX_MATCHES {
        out.push(too_many(
            &format!("{at}.matches"),
            matches.len(),
            MAX_MATCHES,
        ));
    }
    for (j, m) in matches.iter().enumerate() {
        check_match(&format!("{at}.matches[{j}]"), m, out);
    }
    // The first match (of the defaulted list) that is not a PathPrefix, if any: what
    // forbids ReplacePrefixMatch.
    let not_prefix = rule
        .effective_matches()
        .iter()
        .enumerate()
        .find(|(_, m)| m.path().0 != "PathPrefix")
        .map(|(j, m)| format!("matches[{j}] is {}", m.path().0));
    let filters_at = format!("{at}.filters");
    check_filters(&filters_at, &rule.filters, not_prefix.as_deref(), out);
    if rule.backend_refs.len() > MAX_ITEMS {
        out.push(too_many(
            &format!("{at}.backendRefs"),
            rule.backend_refs.len(),
            MAX_ITEMS,
        ));
    }
    for (k, backend) in rule.backend_refs.iter().enumerate() {
        let at = format!("{at}.backendRefs[{k}]");
        check_object_ref(&at, &backend.object(), out);
        if let Some(w) = backend.weight
            && !(0..=MAX_WEIGHT).contains(&w)
        {
            out.push(problem(
                format!("{at}.weight"),
                format!("{w} is not in 0-{MAX_WEIGHT}"),
            ));
        }
        check_filters(
            &format!("{at}.filters"),
            &backend.filters,
            not_prefix.as_deref(),
            out,
        );
    }
    if !rule.backend_refs.is_empty()
        && let Some(k) = rule
            .filters
            .iter()
            .position(|f| f.type_ == "RequestRedirect")
    {
        out.push(problem(
            format!("{at}.backendRefs"),
            format!("must be empty: the rule redirects (filters[{k}] is a RequestRedirect)"),
        ));
    }
    if let Some(t) = &rule.timeouts {
        let request = duration(&format!("{at}.timeouts.request"), t.request.as_deref(), out);
        let backend = duration(
            &format!("{at}.timeouts.backendRequest"),
            t.backend_request.as_deref(),
            out,
        );
        if let (Some(request), Some(backend)) = (request, backend)
            && request != 0
            && backend > request
        {
            out.push(problem(
                format!("{at}.timeouts.backendRequest"),
                "must not be longer than timeouts.request",
            ));
        }
    }
    if let Some(retry) = &rule.retry {
        for (c, code) in retry.codes.iter().enumerate() {
            if !(400..=599).contains(code) {
                out.push(problem(
                    format!("{at}.retry.codes[{c}]"),
                    format!("{code} is not an HTTP status in 400-599"),
                ));
            } else if retry.codes[..c].contains(code) {
                out.push(problem(
                    format!("{at}.retry.codes[{c}]"),
                    format!("duplicate code {code}"),
                ));
            }
        }
        if let Some(n) = retry.attempts
            && n < 0
        {
            out.push(problem(
                format!("{at}.retry.attempts"),
                format!("{n} is negative"),
            ));
        }
        duration(
            &format!("{at}.retry.backoff"),
            retry.backoff.as_deref(),
            out,
        );
    }
    if let Some(sp) = &rule.session_persistence {
        let at = format!("{at}.sessionPersistence");
        duration(
            &format!("{at}.absoluteTimeout"),
            sp.absolute_timeout.as_deref(),
            out,
        );
        duration(
            &format!("{at}.idleTimeout"),
            sp.idle_timeout.as_deref(),
            out,
        );
        one_of(
            &format!("{at}.type"),
            sp.type_.as_deref(),
            &["Cookie", "Header"],
            out,
        );
        let lifetime = sp
            .cookie_config
            .as_ref()
            .and_then(|c| c.lifetime_type.as_deref());
        one_of(
            &format!("{at}.cookieConfig.lifetimeType"),
            lifetime,
            &["Permanent", "Session"],
            out,
        );
    }
}

fn check_match(at: &str, m: &HttpRouteMatch, out: &mut Vec<Problem>) {
    if let Some(path) = &m.path {
        one_of(
            &format!("{at}.path.type"),
            path.type_.as_deref(),
            &PATH_TYPES,
            out,
        );
    }
    let (kind, value) = m.path();
    let field = format!("{at}.path.value");
    if value.len() > MAX_PATH {
        out.push(problem(
            &field,
            format!("{} bytes: at most {MAX_PATH}", value.len()),
        ));
    }
    match kind {
        "Exact" | "PathPrefix" => {
            if let Err(why) = check_path(value) {
                out.push(problem(field, format!("{value:?} {why}")));
            }
        }
        "RegularExpression" => check_regex(&field, value, out),
        _ => {}
    }
    check_value_matches(
        &format!("{at}.headers"),
        &m.headers,
        MAX_HEADER_VALUE,
        true,
        out,
    );
    check_value_matches(
        &format!("{at}.queryParams"),
        &m.query_params,
        MAX_PATH,
        false,
        out,
    );
    one_of(&format!("{at}.method"), m.method.as_deref(), &METHODS, out);
}

/// Header (`headers`) or query parameter conditions. Names are list keys: an exact
/// duplicate is an error (case variants of a header name are allowed by the CRD; the
/// first one counts, see `plan::routes`).
fn check_value_matches(
    at: &str,
    list: &[HttpHeaderMatch],
    max_value: usize,
    header: bool,
    out: &mut Vec<Problem>,
) {
    if list.len() > MAX_ITEMS {
        out.push(too_many(at, list.len(), MAX_ITEMS));
    }
    for (i, m) in list.iter().enumerate() {
        let at = format!("{at}[{i}]");
        if let Err(why) = check_header_name(&m.name) {
            out.push(problem(format!("{at}.name"), format!("{:?} {why}", m.name)));
        } else if let Some(first) = list[..i].iter().position(|o| o.name == m.name) {
            out.push(problem(
                format!("{at}.name"),
                format!("duplicate name {:?} (also [{first}])", m.name),
            ));
        }
        one_of(&format!("{at}.type"), m.type_.as_deref(), &VALUE_TYPES, out);
        let field = format!("{at}.value");
        if m.value.is_empty() || m.value.len() > max_value {
            out.push(problem(&field, format!("must be 1-{max_value} bytes")));
        } else if m.type_.as_deref() == Some("RegularExpression") {
            check_regex(&field, &m.value, out);
        } else if header && !valid_header_value(&m.value) {
            out.push(problem(
                field,
                "must be printable ASCII, words separated by single spaces or tabs",
            ));
        }
    }
}

/// The filters of a rule or of a backendRef. `not_prefix` says why ReplacePrefixMatch
/// is not allowed in this rule, when it is not.
fn check_filters(
    at: &str,
    filters: &[HttpRouteFilter],
    not_prefix: Option<&str>,
    out: &mut Vec<Problem>,
) {
    if filters.len() > MAX_ITEMS {
        out.push(too_many(at, filters.len(), MAX_ITEMS));
    }
    let mut first_of: BTreeMap<&str, usize> = BTreeMap::new();
    for (k, f) in filters.iter().enumerate() {
        let at = format!("{at}[{k}]");
        let t = f.type_.as_str();
        if !FILTER_TYPES.contains(&t) {
            let why = if t == "CORS" || t == "ExternalAuth" {
                format!("{t} filters are not supported by this mesh")
            } else {
                format!("{t:?} is not one of {}", FILTER_TYPES.join(", "))
            };
            out.push(problem(format!("{at}.type"), why));
        }
        if SINGLE_FILTERS.contains(&t)
            && let Some(first) = first_of.get(t)
        {
            out.push(problem(
                format!("{at}.type"),
                format!("{t} may appear once per filter list (also [{first}])"),
            ));
        }
        first_of.entry(t).or_insert(k);
        let (redirect, rewrite) = ("RequestRedirect", "URLRewrite");
        let other = match t {
            "RequestRedirect" => Some(rewrite),
            "URLRewrite" => Some(redirect),
            _ => None,
        };
        if let Some(other) = other
            && let Some(first) = first_of.get(other)
        {
            out.push(problem(
                format!("{at}.type"),
                format!("{redirect} and {rewrite} may not be combined (also [{first}] {other})"),
            ));
        }
        let configs = [
            (
                "RequestHeaderModifier",
                "requestHeaderModifier",
                f.request_header_modifier.is_some(),
            ),
            (
                "ResponseHeaderModifier",
                "responseHeaderModifier",
                f.response_header_modifier.is_some(),
            ),
            ("RequestMirror", "requestMirror", f.request_mirror.is_some()),
            (
                "RequestRedirect",
                "requestRedirect",
                f.request_redirect.is_some(),
            ),
            ("URLRewrite", "urlRewrite", f.url_rewrite.is_some()),
            ("ExtensionRef", "extensionRef", f.extension_ref.is_some()),
        ];
        for (kind, field, set) in configs {
            if set && kind != t {
                out.push(problem(
                    format!("{at}.{field}"),
                    format!("must not be set when type is {t}"),
                ));
            } else if !set && kind == t {
                out.push(problem(
                    at.clone(),
                    format!("{field} is required when type is {t}"),
                ));
            }
        }
        if let Some(h) = &f.request_header_modifier {
            check_header_filter(&format!("{at}.requestHeaderModifier"), h, out);
        }
        if let Some(h) = &f.response_header_modifier {
            check_header_filter(&format!("{at}.responseHeaderModifier"), h, out);
        }
        if let Some(m) = &f.request_mirror {
            let at = format!("{at}.requestMirror");
            check_object_ref(&format!("{at}.backendRef"), &m.backend_ref, out);
            if let Some(p) = m.percent
                && !(0..=100).contains(&p)
            {
                out.push(problem(
                    format!("{at}.percent"),
                    format!("{p} is not in 0-100"),
                ));
            }
            if let Some(fr) = &m.fraction {
                let denominator = fr.denominator.unwrap_or(100);
                if denominator < 1 {
                    out.push(problem(
                        format!("{at}.fraction.denominator"),
                        format!("{denominator} is less than 1"),
                    ));
                }
                if fr.numerator < 0 || fr.numerator > denominator.max(1) {
                    out.push(problem(
                        format!("{at}.fraction.numerator"),
                        format!(
                            "{} is not in 0-{denominator} (the denominator)",
                            fr.numerator
                        ),
                    ));
                }
                if m.percent.is_some() {
                    out.push(problem(
                        format!("{at}.fraction"),
                        "only one of percent and fraction may be set",
                    ));
                }
            }
        }
        if let Some(r) = &f.request_redirect {
            let at = format!("{at}.requestRedirect");
            one_of(
                &format!("{at}.scheme"),
                r.scheme.as_deref(),
                &["http", "https"],
                out,
            );
            if let Some(host) = &r.hostname {
                precise_hostname(&format!("{at}.hostname"), host, out);
            }
            if let Some(port) = r.port {
                super::check_port(&format!("{at}.port"), port, out);
            }
            // 301 and 302 are the standard channel; 303, 307 and 308 the extended
            // redirect codes (GEP-1323), served the same way.
            if let Some(code) = r.status_code
                && ![301, 302, 303, 307, 308].contains(&code)
            {
                out.push(problem(
                    format!("{at}.statusCode"),
                    format!("{code} is not 301, 302, 303, 307 or 308"),
                ));
            }
            if let Some(p) = &r.path {
                check_path_modifier(&format!("{at}.path"), p, not_prefix, out);
            }
        }
        if let Some(r) = &f.url_rewrite {
            let at = format!("{at}.urlRewrite");
            if let Some(host) = &r.hostname {
                precise_hostname(&format!("{at}.hostname"), host, out);
            }
            if let Some(p) = &r.path {
                check_path_modifier(&format!("{at}.path"), p, not_prefix, out);
            }
        }
        if let Some(e) = &f.extension_ref {
            for (field, value) in [("kind", &e.kind), ("name", &e.name)] {
                if value.is_empty() {
                    out.push(problem(format!("{at}.extensionRef.{field}"), "required"));
                }
            }
        }
    }
}

/// Names valid, and each header named once across set, add and remove (the API allows
/// one action per header; names compare case-insensitively).
fn check_header_filter(at: &str, h: &HttpHeaderFilter, out: &mut Vec<Problem>) {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let set = h
        .set
        .iter()
        .map(|x| (x.name.as_str(), Some(x.value.as_str())));
    let add = h
        .add
        .iter()
        .map(|x| (x.name.as_str(), Some(x.value.as_str())));
    let remove = h.remove.iter().map(|n| (n.as_str(), None));
    let lists: [(&str, usize, Box<dyn Iterator<Item = _>>); 3] = [
        ("set", h.set.len(), Box::new(set)),
        ("add", h.add.len(), Box::new(add)),
        ("remove", h.remove.len(), Box::new(remove)),
    ];
    for (list, len, entries) in lists {
        if len > MAX_ITEMS {
            out.push(too_many(&format!("{at}.{list}"), len, MAX_ITEMS));
        }
        for (i, (name, value)) in entries.enumerate() {
            let here = format!("{list}[{i}]");
            let name_at = if value.is_some() {
                format!("{at}.{here}.name")
            } else {
                format!("{at}.{here}")
            };
            if let Err(why) = check_header_name(name) {
                out.push(problem(name_at, format!("{name:?} {why}")));
                continue;
            }
            if let Some(first) = seen.get(&name.to_ascii_lowercase()) {
                out.push(problem(
                    name_at,
                    format!(
                        "header {name:?} is already modified by {first}: one action per header"
                    ),
                ));
            } else {
                seen.insert(name.to_ascii_lowercase(), here.clone());
            }
            if let Some(v) = value
                && (v.is_empty() || v.len() > MAX_HEADER_VALUE)
            {
                out.push(problem(
                    format!("{at}.{here}.value"),
                    format!("must be 1-{MAX_HEADER_VALUE} bytes"),
                ));
            }
        }
    }
}

fn check_path_modifier(
    at: &str,
    p: &HttpPathModifier,
    not_prefix: Option<&str>,
    out: &mut Vec<Problem>,
) {
    let fields = [
        ("ReplaceFullPath", "replaceFullPath", &p.replace_full_path),
        (
            "ReplacePrefixMatch",
            "replacePrefixMatch",
            &p.replace_prefix_match,
        ),
    ];
    if !fields.iter().any(|(t, _, _)| *t == p.type_) {
        out.push(problem(
            format!("{at}.type"),
            format!(
                "{:?} is not one of ReplaceFullPath, ReplacePrefixMatch",
                p.type_
            ),
        ));
    }
    for (t, field, value) in fields {
        match value {
            Some(_) if t != p.type_ => out.push(problem(
                format!("{at}.{field}"),
                format!("must not be set when type is {}", p.type_),
            )),
            None if t == p.type_ => {
                out.push(problem(at, format!("{field} is required when type is {t}")));
            }
            Some(v) if v.len() > MAX_PATH => out.push(problem(
                format!("{at}.{field}"),
                format!("{} bytes: at most {MAX_PATH}", v.len()),
            )),
            _ => {}
        }
    }
    if p.type_ == "ReplacePrefixMatch"
        && let Some(why) = not_prefix
    {
        out.push(problem(
            format!("{at}.type"),
            format!("ReplacePrefixMatch needs every match of the rule to be a PathPrefix ({why})"),
        ));
    }
}

/// A backendRef or mirror target: the fields checkable without the cluster.
fn check_object_ref(at: &str, r: &BackendObjectReference, out: &mut Vec<Problem>) {
    if r.name.is_empty() {
        out.push(problem(format!("{at}.name"), "required"));
    }
    if let Some(port) = r.port {
        super::check_port(&format!("{at}.port"), port, out);
    }
}

/// Parses an optional duration; reports and yields `None` when it does not parse.
fn duration(field: &str, value: Option<&str>, out: &mut Vec<Problem>) -> Option<u64> {
    match parse_duration(value?) {
        Ok(ms) => Some(ms),
        Err(why) => {
            out.push(problem(field, why));
            None
        }
    }
}

fn one_of(field: &str, value: Option<&str>, allowed: &[&str], out: &mut Vec<Problem>) {
    if let Some(v) = value
        && !allowed.contains(&v)
    {
        out.push(problem(
            field,
            format!("{v:?} is not one of {}", allowed.join(", ")),
        ));
    }
}

fn too_many(field: &str, len: usize, max: usize) -> Problem {
    problem(field, format!("{len} entries: at most {max}"))
}

fn check_regex(field: &str, value: &str, out: &mut Vec<Problem>) {
    if let Err(e) = regex::Regex::new(value) {
        // The crate's message spans lines (pattern, caret, reason); keep it on one.
        let why = e
            .to_string()
            .lines()
            .last()
            .unwrap_or_default()
            .trim()
            .to_owned();
        out.push(problem(
            field,
            format!("{value:?} is not a valid regular expression: {why}"),
        ));
    }
}

/// An Exact or PathPrefix value as the CRD's rules allow it: absolute, no empty, `.` or
/// `..` segment, no encoded `/`, no fragment, only URL path characters.
fn check_path(value: &str) -> Result<(), &'static str> {
    if !value.starts_with('/') {
        return Err("must start with '/'");
    }
    if value.contains("//") {
        return Err("must not contain '//'");
    }
    if value.contains("/./") || value.ends_with("/.") {
        return Err("must not contain a '.' segment");
    }
    if value.contains("/../") || value.ends_with("/..") {
        return Err("must not contain a '..' segment");
    }
    if value.contains("%2f") || value.contains("%2F") {
        return Err("must not contain an encoded '/' (%2F)");
    }
    let bytes = value.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = bytes.get(i + 1..i + 3);
                if !hex.is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit)) {
                    return Err("has a '%' not followed by two hex digits");
                }
                i += 3;
            }
            b if b.is_ascii_alphanumeric() || b"-/._~!$&'()*+,;=:@".contains(&b) => i += 1,
            _ => return Err("may only contain letters, digits, -/._~!$&'()*+,;=:@ and %XX"),
        }
    }
    Ok(())
}

/// An HTTP header name (RFC 7230 token), 1-256 characters.
fn check_header_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 256 {
        return Err("must be 1-256 characters");
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return Err("is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)");
    }
    Ok(())
}

/// Printable ASCII words separated by single spaces or tabs.
fn valid_header_value(value: &str) -> bool {
    let b = value.as_bytes();
    let printable = |c: &u8| (b'!'..=b'~').contains(c);
    b.first().is_some_and(printable)
        && b.last().is_some_and(printable)
        && b.iter().all(|c| printable(c) || *c == b' ' || *c == b'\t')
        && !b.windows(2).any(|w| !printable(&w[0]) && !printable(&w[1]))
}

/// An RFC 1123 host name: lowercase labels of letters, digits and inner '-', at most
/// 253 characters, not an IP address.
fn check_hostname(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 253 {
        return Err("must be 1-253 characters");
    }
    if name.parse::<std::net::IpAddr>().is_ok() {
        return Err("is an IP address, not a host name");
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !name.split('.').all(label_ok) {
        return Err("is not a lowercase RFC 1123 host name");
    }
    Ok(())
}

fn precise_hostname(field: &str, host: &str, out: &mut Vec<Problem>) {
    if let Err(why) = check_hostname(host) {
        out.push(problem(field, format!("{host:?} {why}")));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_headers_and_hosts() {
        for ok in ["/", "/foo", "/foo/", "/a%20b", "/x:y@z"] {
            assert_eq!(check_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "foo", "//", "/a/./b", "/a/..", "/a%2Fb", "/a#b", "/a b", "/%zz",
        ] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        assert!(check_header_name("X-Request-Id").is_ok());
        for bad in ["", ":method", "a b", "/x"] {
            assert!(check_header_name(bad).is_err(), "{bad:?}");
        }
        assert!(valid_header_value("a b\tc"));
        for bad in ["", " a", "a ", "a  b", "é"] {
            assert!(!valid_header_value(bad), "{bad:?}");
        }
        assert!(check_hostname("web.shop.svc").is_ok());
        for bad in ["Web", "-a", "a..b", "10.0.0.1", "a_b"] {
            assert!(check_hostname(bad).is_err(), "{bad}");
        }
    }
}
