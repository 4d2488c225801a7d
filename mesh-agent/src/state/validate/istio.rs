//! PeerAuthentication, AuthorizationPolicy and MeshConfig checks, as Istio's CRD schema
//! and validation webhook make them, plus what this mesh does not implement (CUSTOM
//! action, JWT principals and claims, SNI), so that a policy never silently loses a
//! condition: an unsupported condition dropped from a DENY rule would widen what it
//! allows.

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use super::{Problem, problem};
use crate::state::istio::{
    AuthorizationPolicy, AuthzCondition, AuthzOperation, AuthzRule, AuthzSource, MESH_CONFIG_NAME,
    MESH_CONFIG_NAMESPACE, PeerAuthentication, PeerMtls, WorkloadSelector, check_trust_domain,
    header_name, parse_ip_block, parse_mesh_config, parse_port,
};
use crate::state::model::DEFAULT_NAMESPACE;

/// PeerAuthentication `mtls.mode` values.
const MTLS_MODES: [&str; 4] = ["UNSET", "DISABLE", "PERMISSIVE", "STRICT"];
/// AuthorizationPolicy `action` values the mesh enforces (CUSTOM is refused).
const ACTIONS: [&str; 3] = ["ALLOW", "DENY", "AUDIT"];
/// `when[].key`s the mesh evaluates, besides `request.headers[NAME]`.
const CONDITION_KEYS: [&str; 6] = [
    "source.principal",
    "source.namespace",
    "source.ip",
    "remote.ip",
    "destination.ip",
    "destination.port",
];
/// The Gateway API group (`targetRefs` to Gateways).
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";
const JWT: &str = "JWT (RequestAuthentication) is not supported by this mesh";

pub(in crate::state) fn peer_authentication(pa: &PeerAuthentication) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &pa.spec;
    if let Some(selector) = &spec.selector {
        check_selector("spec.selector", selector, &mut out);
    }
    if let Some(mtls) = &spec.mtls {
        check_mode("spec.mtls.mode", mtls, &mut out);
    }
    let has_labels = spec
        .selector
        .as_ref()
        .is_some_and(|s| !s.match_labels.is_empty());
    if !spec.port_level_mtls.is_empty() && !has_labels {
        out.push(problem(
            "spec.portLevelMtls",
            "requires a workload selector (spec.selector.matchLabels), as in Istio",
        ));
    }
    for (port, mtls) in &spec.port_level_mtls {
        let at = format!("spec.portLevelMtls[{port}]");
        if parse_port(port).is_none() {
            out.push(problem(
                &at,
                format!("{port:?} is not a port number (1-65535)"),
            ));
        }
        check_mode(&format!("{at}.mode"), mtls, &mut out);
    }
    out
}

pub(in crate::state) fn authorization_policy(policy: &AuthorizationPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    let spec = &policy.spec;
    if let Some(selector) = &spec.selector {
        check_selector("spec.selector", selector, &mut out);
    }
    let set = [
        ("selector", spec.selector.is_some()),
        ("targetRef", spec.target_ref.is_some()),
        ("targetRefs", !spec.target_refs.is_empty()),
    ];
    let given: Vec<&str> = set.iter().filter(|(_, s)| *s).map(|(f, _)| *f).collect();
    if given.len() > 1 {
        out.push(problem(
            format!("spec.{}", given[1]),
            format!(
                "only one of selector, targetRef and targetRefs may be set ({} is too)",
                given[0]
            ),
        ));
    }
    let namespace = namespace_of(&policy.metadata);
    let refs = spec
        .target_ref
        .iter()
        .map(|r| ("spec.targetRef".to_owned(), r))
        .chain(
            spec.target_refs
                .iter()
                .enumerate()
                .map(|(i, r)| (format!("spec.targetRefs[{i}]"), r)),
        );
    for (at, r) in refs {
        let group = r.group.as_deref().unwrap_or_default();
        match (group, r.kind.as_str()) {
            ("", "Service") | (GATEWAY_GROUP, "Gateway") => {}
            _ => out.push(problem(
                format!("{at}.kind"),
                format!(
                    "{} (group {group:?}) is not supported: use Service (group \"\") or Gateway (group {GATEWAY_GROUP})",
                    r.kind
                ),
            )),
        }
        if r.name.is_empty() {
            out.push(problem(format!("{at}.name"), "required"));
        }
        if let Some(ns) = r.namespace.as_deref().filter(|ns| !ns.is_empty())
            && ns != namespace
        {
            out.push(problem(
                format!("{at}.namespace"),
                format!(
                    "{ns:?}: cross-namespace references are not supported (must be {namespace:?})"
                ),
            ));
        }
    }
    match spec.action.as_deref() {
        Some("CUSTOM") => out.push(problem(
            "spec.action",
            "CUSTOM (external authorization through spec.provider) is not supported by this mesh",
        )),
        Some(a) if !ACTIONS.contains(&a) => out.push(problem(
            "spec.action",
            format!("{a:?} is not one of ALLOW, DENY, AUDIT, CUSTOM"),
        )),
        _ => {
            if spec.provider.is_some() {
                out.push(problem("spec.provider", "only allowed with action CUSTOM"));
            }
        }
    }
    for (i, rule) in spec.rules.iter().flatten().enumerate() {
        check_rule(&format!("spec.rules[{i}]"), rule, &mut out);
    }
    out
}

/// Only the MeshConfig of `istio-system/istio` is read; every other ConfigMap is
/// accepted as it is.
pub(in crate::state) fn config_map(cm: &ConfigMap) -> Vec<Problem> {
    let mut out = Vec::new();
    let is_mesh = cm.metadata.namespace.as_deref() == Some(MESH_CONFIG_NAMESPACE)
        && cm.metadata.name.as_deref() == Some(MESH_CONFIG_NAME);
    let Some(text) = cm
        .data
        .as_ref()
        .and_then(|d| d.get("mesh"))
        .filter(|_| is_mesh)
    else {
        return out;
    };
    match parse_mesh_config(text) {
        Err((key, why)) => {
            let field = key.map_or("data.mesh".to_owned(), |k| format!("data.mesh.{k}"));
            out.push(problem(field, why));
        }
        Ok(mesh) => {
            if let Some(domain) = &mesh.trust_domain
                && let Err(why) = check_trust_domain(domain)
            {
                out.push(problem("data.mesh.trustDomain", why));
            }
            if let Some(ns) = &mesh.root_namespace
                && !is_dns_label(ns)
            {
                out.push(problem(
                    "data.mesh.rootNamespace",
                    format!("{ns:?} is not a namespace name (a lowercase RFC 1123 label)"),
                ));
            }
        }
    }
    out
}

fn check_rule(at: &str, rule: &AuthzRule, out: &mut Vec<Problem>) {
    if let Some(from) = &rule.from {
        if from.is_empty() {
            out.push(problem(
                format!("{at}.from"),
                "must not be empty when given",
            ));
        }
        for (j, f) in from.iter().enumerate() {
            let at = format!("{at}.from[{j}].source");
            match &f.source {
                None => out.push(problem(at, "required")),
                Some(source) => check_source(&at, source, out),
            }
        }
    }
    if let Some(to) = &rule.to {
        if to.is_empty() {
            out.push(problem(format!("{at}.to"), "must not be empty when given"));
        }
        for (j, t) in to.iter().enumerate() {
            let at = format!("{at}.to[{j}].operation");
            match &t.operation {
                None => out.push(problem(at, "required")),
                Some(operation) => check_operation(&at, operation, out),
            }
        }
    }
    for (k, condition) in rule.when.iter().enumerate() {
        check_condition(&format!("{at}.when[{k}]"), condition, out);
    }
}

fn check_source(at: &str, s: &AuthzSource, out: &mut Vec<Problem>) {
    let strings = [
        ("principals", &s.principals),
        ("notPrincipals", &s.not_principals),
        ("namespaces", &s.namespaces),
        ("notNamespaces", &s.not_namespaces),
    ];
    let ips = [
        ("ipBlocks", &s.ip_blocks),
        ("notIpBlocks", &s.not_ip_blocks),
        ("remoteIpBlocks", &s.remote_ip_blocks),
        ("notRemoteIpBlocks", &s.not_remote_ip_blocks),
    ];
    let jwt = [
        ("requestPrincipals", &s.request_principals),
        ("notRequestPrincipals", &s.not_request_principals),
    ];
    if strings
        .iter()
        .chain(&ips)
        .chain(&jwt)
        .all(|(_, v)| v.is_empty())
    {
        out.push(problem(at, "must set at least one field"));
    }
    for (field, values) in strings {
        check_values(&format!("{at}.{field}"), values, |_| Ok(()), out);
    }
    for (field, values) in ips {
        check_values(&format!("{at}.{field}"), values, check_ip_block, out);
    }
    for (field, values) in jwt {
        if !values.is_empty() {
            out.push(problem(format!("{at}.{field}"), JWT));
        }
    }
}

fn check_operation(at: &str, o: &AuthzOperation, out: &mut Vec<Problem>) {
    let strings = [
        ("hosts", &o.hosts),
        ("notHosts", &o.not_hosts),
        ("methods", &o.methods),
        ("notMethods", &o.not_methods),
    ];
    let paths = [("paths", &o.paths), ("notPaths", &o.not_paths)];
    let ports = [("ports", &o.ports), ("notPorts", &o.not_ports)];
    if strings
        .iter()
        .chain(&paths)
        .chain(&ports)
        .all(|(_, v)| v.is_empty())
    {
        out.push(problem(at, "must set at least one field"));
    }
    for (field, values) in strings {
        check_values(&format!("{at}.{field}"), values, |_| Ok(()), out);
    }
    for (field, values) in paths {
        check_values(&format!("{at}.{field}"), values, check_path, out);
    }
    for (field, values) in ports {
        check_values(&format!("{at}.{field}"), values, check_port_string, out);
    }
}

fn check_condition(at: &str, c: &AuthzCondition, out: &mut Vec<Problem>) {
    let key = c.key.as_str();
    let check: fn(&str) -> Result<(), String> = match key {
        "" => {
            out.push(problem(format!("{at}.key"), "required"));
            return;
        }
        "source.ip" | "remote.ip" | "destination.ip" => check_ip_block,
        "destination.port" => check_port_string,
        "source.principal" | "source.namespace" => |_| Ok(()),
        _ if header_name(key).is_some() => |_| Ok(()),
        _ => {
            let why = if key.starts_with("request.auth.") {
                format!("{key}: {JWT}")
            } else if key == "connection.sni" || key.starts_with("experimental.") {
                format!("{key:?} is not supported by this mesh")
            } else {
                format!(
                    "{key:?} is not a supported key ({}, request.headers[NAME])",
                    CONDITION_KEYS.join(", ")
                )
            };
            out.push(problem(format!("{at}.key"), why));
            return;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        out.push(problem(
            at,
            format!("at least one of values or notValues must be set for key {key}"),
        ));
    }
    check_values(&format!("{at}.values"), &c.values, check, out);
    check_values(&format!("{at}.notValues"), &c.not_values, check, out);
}

/// Every value non-empty (Istio refuses empty strings) and passing `check`.
fn check_values(
    at: &str,
    values: &[String],
    check: fn(&str) -> Result<(), String>,
    out: &mut Vec<Problem>,
) {
    for (i, v) in values.iter().enumerate() {
        let at = format!("{at}[{i}]");
        if v.is_empty() {
            out.push(problem(at, "empty value not allowed"));
        } else if let Err(why) = check(v) {
            out.push(problem(at, why));
        }
    }
}

/// An address or a CIDR, as Istio's `ValidateIPs`.
fn check_ip_block(v: &str) -> Result<(), String> {
    parse_ip_block(v).map(|_| ())
}

/// A port as Istio writes them in `ports` and `destination.port`: a decimal string.
fn check_port_string(v: &str) -> Result<(), String> {
    parse_port(v)
        .map(|_| ())
        .ok_or_else(|| format!("{v:?} is not a port number (1-65535)"))
}

/// Istio also accepts path templates (`{*}`, `{**}`); this mesh matches paths only
/// exactly, by prefix or by suffix, so a template is refused rather than taken
/// literally.
fn check_path(v: &str) -> Result<(), String> {
    if v.contains('{') || v.contains('}') {
        return Err(format!(
            "{v:?}: path templates ({{*}}, {{**}}) are not supported by this mesh"
        ));
    }
    Ok(())
}

fn check_mode(at: &str, mtls: &PeerMtls, out: &mut Vec<Problem>) {
    if let Some(mode) = &mtls.mode
        && !MTLS_MODES.contains(&mode.as_str())
    {
        out.push(problem(
            at,
            format!("{mode:?} is not one of {}", MTLS_MODES.join(", ")),
        ));
    }
}

/// Label keys present and without wildcards, as Istio's `validateWorkloadSelector`.
fn check_selector(at: &str, selector: &WorkloadSelector, out: &mut Vec<Problem>) {
    for (key, value) in &selector.match_labels {
        let at = format!("{at}.matchLabels[{key:?}]");
        if key.is_empty() {
            out.push(problem(at, "empty label key is not allowed"));
        } else if key.contains('*') || value.contains('*') {
            out.push(problem(at, "wildcards are not supported in selectors"));
        }
    }
}

fn namespace_of(meta: &ObjectMeta) -> &str {
    meta.namespace
        .as_deref()
        .filter(|ns| !ns.is_empty())
        .unwrap_or(DEFAULT_NAMESPACE)
}

/// A lowercase RFC 1123 label (a namespace name).
fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}
