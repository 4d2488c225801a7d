//! Semantic checks of single objects, the subset of the API server's validation that
//! the datapath relies on. Each problem carries the field path it is about.

mod httproute;
pub(super) mod istio;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServiceSpec};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::{
    IPBlock, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{
    Cidr, MAX_AFFINITY_TIMEOUT_S, PREFER_CLOSE, SERVICE_NAME_LABEL, SOCKMAP_ANNOTATION, protocol,
    target_port,
};

pub(super) use httproute::http_route;
pub(super) use istio::{authorization_policy, config_map, peer_authentication};

/// One problem in one object, before the caller adds file, document and object.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Problem {
    /// Field path, e.g. `spec.ports[0].port`.
    pub field: String,
    pub message: String,
}

fn problem(field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        field: field.into(),
        message: message.into(),
    }
}

pub(super) fn service(svc: &Service) -> Vec<Problem> {
    let mut out = Vec::new();
    check_resilience_annotations(&svc.metadata, &mut out);
    let Some(spec) = &svc.spec else { return out };
    check_cluster_ips(spec, &mut out);
    check_session_affinity(spec, &mut out);
    if let Some(t) = &spec.traffic_distribution
        && !PREFER_CLOSE.contains(&t.as_str())
    {
        out.push(problem(
            "spec.trafficDistribution",
            format!("{t:?} is not one of {}", PREFER_CLOSE.join(", ")),
        ));
    }

    let ports = spec.ports.as_deref().unwrap_or_default();
    let mut seen_port = BTreeMap::new();
    let mut seen_name = BTreeMap::new();
    for (i, p) in ports.iter().enumerate() {
        let at = format!("spec.ports[{i}]");
        check_port(&format!("{at}.port"), p.port, &mut out);
        let proto = protocol(p.protocol.as_ref());
        check_protocol(&format!("{at}.protocol"), proto, &mut out);
        match target_port(p) {
            Some(IntOrString::Int(n)) => check_port(&format!("{at}.targetPort"), *n, &mut out),
            Some(IntOrString::String(name)) => {
                if let Err(why) = check_port_name(name) {
                    out.push(problem(
                        format!("{at}.targetPort"),
                        format!("{name:?} is not a valid port name: {why}"),
                    ));
                }
            }
            None => {}
        }
        if let Some(first) = seen_port.insert((p.port, proto), i) {
            out.push(problem(
                format!("{at}.port"),
                format!(
                    "duplicate port {}/{proto} (also spec.ports[{first}])",
                    p.port
                ),
            ));
        }
        // EndpointSlice ports are matched to Service ports by name, so names must be
        // unique, and present as soon as there is more than one port (as the API requires).
        let name = p.name.as_deref().unwrap_or_default();
        if name.is_empty() {
            if ports.len() > 1 {
                out.push(problem(
                    format!("{at}.name"),
                    "required when a Service has more than one port",
                ));
            }
        } else if let Some(first) = seen_name.insert(name, i) {
            out.push(problem(
                format!("{at}.name"),
                format!("duplicate port name {name:?} (also spec.ports[{first}])"),
            ));
        }
    }
    out
}

pub(super) fn pod(pod: &Pod) -> Vec<Problem> {
    let mut out = Vec::new();
    check_sockmap_annotation(&pod.metadata, &mut out);
    let Some(status) = &pod.status else {
        return out;
    };
    if let Some(ip) = &status.pod_ip {
        check_ip("status.podIP", ip, &mut out);
    }
    let listed = status.pod_ips.as_deref().unwrap_or_default();
    for (i, ip) in listed.iter().enumerate() {
        check_ip(&format!("status.podIPs[{i}].ip"), &ip.ip, &mut out);
    }
    // One address per family, the first being podIP, as the API server requires.
    // Compared as addresses; unparsable ones are reported above.
    if let (Some(ip), Some(first)) = (&status.pod_ip, listed.first())
        && let (Ok(a), Ok(b)) = (ip.parse::<IpAddr>(), first.ip.parse::<IpAddr>())
        && a != b
    {
        out.push(problem(
            "status.podIPs[0].ip",
            format!("{:?} differs from status.podIP {ip:?}", first.ip),
        ));
    }
    check_one_per_family(
        listed.iter().map(|ip| ip.ip.as_str()),
        |i| format!("status.podIPs[{i}].ip"),
        &mut out,
    );
    out
}

pub(super) fn endpoint_slice(slice: &EndpointSlice) -> Vec<Problem> {
    let mut out = Vec::new();
    let has_service = slice
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(SERVICE_NAME_LABEL));
    if !has_service {
        out.push(problem(
            format!("metadata.labels[{SERVICE_NAME_LABEL}]"),
            "required: names the Service of this slice",
        ));
    }
    let parse: fn(&str) -> bool = match slice.address_type.as_str() {
        "IPv4" => |a| a.parse::<Ipv4Addr>().is_ok(),
        "IPv6" => |a| a.parse::<Ipv6Addr>().is_ok(),
        "FQDN" => |_| true,
        other => {
            out.push(problem(
                "addressType",
                format!("{other:?} is not one of IPv4, IPv6, FQDN"),
            ));
            |_| true
        }
    };
    for (i, endpoint) in slice.endpoints.iter().enumerate() {
        for (j, address) in endpoint.addresses.iter().enumerate() {
            let field = format!("endpoints[{i}].addresses[{j}]");
            if !parse(address) {
                out.push(problem(
                    field,
                    format!("{address:?} is not an {} address", slice.address_type),
                ));
            } else if slice.address_type == "IPv6" {
                check_ip(&field, address, &mut out);
            }
        }
    }
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if let Some(port) = p.port {
            check_port(&format!("ports[{i}].port"), port, &mut out);
        }
        check_protocol(
            &format!("ports[{i}].protocol"),
            protocol(p.protocol.as_ref()),
            &mut out,
        );
    }
    out
}

/// Namespaces carry nothing the datapath checks beyond their labels (any string map)
/// and the [`SOCKMAP_ANNOTATION`].
pub(super) fn namespace(ns: &Namespace) -> Vec<Problem> {
    let mut out = Vec::new();
    check_sockmap_annotation(&ns.metadata, &mut out);
    out
}

fn check_sockmap_annotation(meta: &ObjectMeta, out: &mut Vec<Problem>) {
    let value = meta
        .annotations
        .as_ref()
        .and_then(|a| a.get(SOCKMAP_ANNOTATION));
    if let Some(v) = value
        && v != "true"
        && v != "false"
    {
        out.push(problem(
            format!("metadata.annotations[{SOCKMAP_ANNOTATION:?}]"),
            format!("{v:?} is not \"true\" or \"false\""),
        ));
    }
}

/// The node proxy's `mesh.io/*` settings of a Service ([`super::resilience`]).
fn check_resilience_annotations(meta: &ObjectMeta, out: &mut Vec<Problem>) {
    let (_, errors) = super::resilience::resilience(meta.annotations.as_ref());
    out.extend(
        errors
            .into_iter()
            .map(|e| problem(format!("metadata.annotations[{:?}]", e.key), e.message)),
    );
}

pub(super) fn network_policy(policy: &NetworkPolicy) -> Vec<Problem> {
    let mut out = Vec::new();
    let Some(spec) = &policy.spec else {
        out.push(problem("spec", "required"));
        return out;
    };
    if let Some(selector) = &spec.pod_selector {
        check_selector("spec.podSelector", selector, &mut out);
    }
    let types = spec.policy_types.as_deref().unwrap_or_default();
    for (i, t) in types.iter().enumerate() {
        let at = format!("spec.policyTypes[{i}]");
        if !matches!(t.as_str(), "Ingress" | "Egress") {
            out.push(problem(at, format!("{t:?} is not one of Ingress, Egress")));
        } else if types[..i].contains(t) {
            out.push(problem(at, format!("duplicate policy type {t}")));
        }
    }
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let at = format!("spec.ingress[{i}]");
        check_rule(
            &at,
            "from",
            rule.from.as_deref(),
            rule.ports.as_deref(),
            &mut out,
        );
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let at = format!("spec.egress[{i}]");
        check_rule(
            &at,
            "to",
            rule.to.as_deref(),
            rule.ports.as_deref(),
            &mut out,
        );
    }
    out
}

fn check_rule(
    at: &str,
    peers_field: &str,
    peers: Option<&[NetworkPolicyPeer]>,
    ports: Option<&[NetworkPolicyPort]>,
    out: &mut Vec<Problem>,
) {
    for (i, peer) in peers.unwrap_or_default().iter().enumerate() {
        let at = format!("{at}.{peers_field}[{i}]");
        let selectors = [
            ("podSelector", &peer.pod_selector),
            ("namespaceSelector", &peer.namespace_selector),
        ];
        for (field, selector) in selectors {
            if let Some(selector) = selector {
                check_selector(&format!("{at}.{field}"), selector, out);
            }
        }
        match &peer.ip_block {
            Some(block) => {
                check_ip_block(&format!("{at}.ipBlock"), block, out);
                if peer.pod_selector.is_some() || peer.namespace_selector.is_some() {
                    out.push(problem(
                        format!("{at}.ipBlock"),
                        "may not be combined with podSelector or namespaceSelector",
                    ));
                }
            }
            None if peer.pod_selector.is_none() && peer.namespace_selector.is_none() => {
                out.push(problem(
                    at,
                    "must specify podSelector, namespaceSelector or ipBlock",
                ));
            }
            None => {}
        }
    }
    for (i, p) in ports.unwrap_or_default().iter().enumerate() {
        let at = format!("{at}.ports[{i}]");
        check_protocol(
            &format!("{at}.protocol"),
            protocol(p.protocol.as_ref()),
            out,
        );
        match &p.port {
            Some(IntOrString::Int(n)) => check_port(&format!("{at}.port"), *n, out),
            Some(IntOrString::String(name)) => {
                if let Err(why) = check_port_name(name) {
                    out.push(problem(
                        format!("{at}.port"),
                        format!("{name:?} is not a valid port name: {why}"),
                    ));
                }
            }
            None => {}
        }
        if let Some(end) = p.end_port {
            let field = format!("{at}.endPort");
            match &p.port {
                Some(IntOrString::Int(port)) => {
                    if end < *port {
                        out.push(problem(field, format!("{end} is less than port {port}")));
                    } else {
                        check_port(&field, end, out);
                    }
                }
                _ => out.push(problem(field, "requires a numeric port")),
            }
        }
    }
}

/// `cidr` is a prefix; each `except` is a prefix of the same family strictly inside it.
fn check_ip_block(at: &str, block: &IPBlock, out: &mut Vec<Problem>) {
    let cidr = Cidr::parse(&block.cidr);
    if let Err(why) = &cidr {
        out.push(problem(format!("{at}.cidr"), why.clone()));
    }
    for (i, except) in block.except.iter().flatten().enumerate() {
        let field = format!("{at}.except[{i}]");
        match (Cidr::parse(except), &cidr) {
            (Err(why), _) => out.push(problem(field, why)),
            (Ok(e), Ok(c)) if !(c.contains(&e) && e.len > c.len) => out.push(problem(
                field,
                format!("{e} is not strictly inside cidr {c}"),
            )),
            _ => {}
        }
    }
}

/// Operators and their values as the API server requires them.
fn check_selector(at: &str, selector: &LabelSelector, out: &mut Vec<Problem>) {
    for (i, req) in selector.match_expressions.iter().flatten().enumerate() {
        let at = format!("{at}.matchExpressions[{i}]");
        let values = req.values.as_deref().unwrap_or_default();
        match req.operator.as_str() {
            "In" | "NotIn" if values.is_empty() => out.push(problem(
                format!("{at}.values"),
                format!("must be non-empty for operator {}", req.operator),
            )),
            "Exists" | "DoesNotExist" if !values.is_empty() => out.push(problem(
                format!("{at}.values"),
                format!("must be empty for operator {}", req.operator),
            )),
            "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
            other => out.push(problem(
                format!("{at}.operator"),
                format!("{other:?} is not one of In, NotIn, Exists, DoesNotExist"),
            )),
        }
    }
}

/// `spec.clusterIP`, `spec.clusterIPs`, `spec.ipFamilies` and `spec.ipFamilyPolicy`:
/// each cluster IP is an address (or, alone, "None" for headless, or empty), at most one
/// per family, and of the family `ipFamilies` gives at the same index.
fn check_cluster_ips(spec: &ServiceSpec, out: &mut Vec<Problem>) {
    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip("spec.clusterIP", ip, out);
    }
    let listed = spec.cluster_ips.as_deref().unwrap_or_default();
    for (i, ip) in listed.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        if i == 0 {
            check_cluster_ip(&field, ip, out);
        } else if matches!(listed[0].as_str(), "" | "None") {
            out.push(problem(
                field,
                format!("must not be set: spec.clusterIPs[0] is {:?}", listed[0]),
            ));
        } else {
            check_ip(&field, ip, out);
        }
    }
    // The API server keeps the two fields in step; a mismatch means a hand edit went wrong.
    if let (Some(ip), Some(first)) = (&spec.cluster_ip, listed.first())
        && !ip.is_empty()
        && ip != first
    {
        out.push(problem(
            "spec.clusterIPs[0]",
            format!("{first:?} differs from spec.clusterIP {ip:?}"),
        ));
    }
    if listed.len() > 2 {
        out.push(problem(
            "spec.clusterIPs",
            format!(
                "{} addresses: at most two (one per IP family)",
                listed.len()
            ),
        ));
    }
    // The addresses in force: clusterIPs, or clusterIP when clusterIPs is absent.
    let (ips, field): (Vec<&str>, fn(usize) -> String) = if listed.is_empty() {
        (spec.cluster_ip.iter().map(String::as_str).collect(), |_| {
            "spec.clusterIP".to_owned()
        })
    } else {
        (listed.iter().map(String::as_str).collect(), |i| {
            format!("spec.clusterIPs[{i}]")
        })
    };
    check_one_per_family(ips.iter().copied(), field, out);

    let policy = spec.ip_family_policy.as_deref();
    if let Some(p) = policy
        && !matches!(p, "SingleStack" | "PreferDualStack" | "RequireDualStack")
    {
        out.push(problem(
            "spec.ipFamilyPolicy",
            format!("{p:?} is not one of SingleStack, PreferDualStack, RequireDualStack"),
        ));
    }
    let families = spec.ip_families.as_deref().unwrap_or_default();
    for (i, family) in families.iter().enumerate() {
        let at = format!("spec.ipFamilies[{i}]");
        if !matches!(family.as_str(), "IPv4" | "IPv6") {
            out.push(problem(at, format!("{family:?} is not one of IPv4, IPv6")));
        } else if families[..i].contains(family) {
            out.push(problem(at, format!("duplicate family {family}")));
        }
    }
    if families.len() > 2 {
        out.push(problem(
            "spec.ipFamilies",
            format!("{} families: at most two", families.len()),
        ));
    }
    let addresses = ips.iter().filter(|ip| ip.parse::<IpAddr>().is_ok()).count();
    if policy == Some("SingleStack") && (families.len() > 1 || addresses > 1) {
        out.push(problem(
            if families.len() > 1 {
                "spec.ipFamilies"
            } else {
                "spec.clusterIPs"
            },
            "only one IP family is allowed when spec.ipFamilyPolicy is SingleStack",
        ));
    }
    for (i, (ip, family)) in ips.iter().zip(families).enumerate() {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        let actual = if ip.is_ipv4() { "IPv4" } else { "IPv6" };
        if matches!(family.as_str(), "IPv4" | "IPv6") && family != actual {
            out.push(problem(
                field(i),
                format!("{ip} is an {actual} address, but spec.ipFamilies[{i}] is {family}"),
            ));
        }
    }
}

/// `spec.sessionAffinity` and its timeout, with the API server's bounds.
fn check_session_affinity(spec: &ServiceSpec, out: &mut Vec<Problem>) {
    let client_ip = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref());
    match spec.session_affinity.as_deref() {
        None | Some("None") => {
            if client_ip.is_some() {
                out.push(problem(
                    "spec.sessionAffinityConfig",
                    "must not be set when spec.sessionAffinity is None",
                ));
            }
        }
        Some("ClientIP") => {
            if let Some(t) = client_ip.and_then(|c| c.timeout_seconds)
                && !u32::try_from(t).is_ok_and(|t| (1..=MAX_AFFINITY_TIMEOUT_S).contains(&t))
            {
                out.push(problem(
                    "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                    format!("{t} is not in 1-{MAX_AFFINITY_TIMEOUT_S} (seconds)"),
                ));
            }
        }
        Some(other) => out.push(problem(
            "spec.sessionAffinity",
            format!("{other:?} is not one of None, ClientIP"),
        )),
    }
}

fn check_cluster_ip(field: &str, ip: &str, out: &mut Vec<Problem>) {
    if !(ip.is_empty() || ip == "None") {
        check_address(
            field,
            ip,
            "an IP address, \"None\" (headless) or empty",
            out,
        );
    }
}

fn check_ip(field: &str, ip: &str, out: &mut Vec<Problem>) {
    check_address(field, ip, "an IP address", out);
}

/// An address as the API server accepts it: IPv4 or IPv6, but not IPv4-mapped IPv6
/// (`::ffff:10.0.0.1`), which the datapath could not tell from the IPv4 address.
fn check_address(field: &str, ip: &str, expected: &str, out: &mut Vec<Problem>) {
    match ip.parse::<IpAddr>() {
        Err(_) => out.push(problem(field, format!("{ip:?} is not {expected}"))),
        Ok(IpAddr::V6(v6)) if v6.to_ipv4_mapped().is_some() => out.push(problem(
            field,
            format!("{ip:?} is an IPv4-mapped IPv6 address; use the IPv4 form"),
        )),
        Ok(_) => {}
    }
}

/// At most one address of each family (unparsable entries are reported elsewhere).
fn check_one_per_family<'a>(
    ips: impl Iterator<Item = &'a str>,
    field: impl Fn(usize) -> String,
    out: &mut Vec<Problem>,
) {
    let mut seen = [None, None];
    for (i, ip) in ips.enumerate() {
        let Ok(ip) = ip.parse::<IpAddr>() else {
            continue;
        };
        let family = usize::from(ip.is_ipv6());
        if let Some(first) = seen[family] {
            out.push(problem(
                field(i),
                format!(
                    "{ip} is a second {} address (the first is at index {first}): at most one per family",
                    if ip.is_ipv4() { "IPv4" } else { "IPv6" }
                ),
            ));
        } else {
            seen[family] = Some(i);
        }
    }
}

fn check_port(field: &str, port: i32, out: &mut Vec<Problem>) {
    if !(1..=65535).contains(&port) {
        out.push(problem(
            field,
            format!("{port} is not a valid port (1-65535)"),
        ));
    }
}

fn check_protocol(field: &str, proto: &str, out: &mut Vec<Problem>) {
    if !matches!(proto, "TCP" | "UDP" | "SCTP") {
        out.push(problem(
            field,
            format!("{proto:?} is not one of TCP, UDP, SCTP"),
        ));
    }
}

/// An IANA service name (RFC 6335 §5.1), as Kubernetes' `IsValidPortName` checks it.
fn check_port_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() || name.len() > 15 {
        return Err("must be 1-15 characters");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    {
        return Err("only lowercase letters, digits and '-' are allowed");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return Err("must contain a letter");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return Err("'-' may not begin or end it, nor be doubled");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_names() {
        for ok in ["http", "h2c", "grpc-web", "a", "abcdefghijklmno"] {
            assert_eq!(check_port_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "8080",
            "HTTP",
            "-http",
            "http-",
            "a--b",
            "abcdefghijklmnop",
            "http_2",
        ] {
            assert!(check_port_name(bad).is_err(), "{bad}");
        }
    }
}
