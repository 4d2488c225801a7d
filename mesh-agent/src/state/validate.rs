//! Semantic checks of single objects, the subset of the API server's validation that
//! the datapath relies on. Each problem carries the field path it is about.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::model::{SERVICE_NAME_LABEL, protocol, target_port};

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
    let Some(spec) = &svc.spec else { return out };
    if let Some(ip) = &spec.cluster_ip {
        check_cluster_ip("spec.clusterIP", ip, &mut out);
    }
    for (i, ip) in spec.cluster_ips.iter().flatten().enumerate() {
        check_cluster_ip(&format!("spec.clusterIPs[{i}]"), ip, &mut out);
    }
    // The API server keeps the two fields in step; a mismatch means a hand edit went wrong.
    if let (Some(ip), Some(first)) = (&spec.cluster_ip, spec.cluster_ips.iter().flatten().next())
        && !ip.is_empty()
        && ip != first
    {
        out.push(problem(
            "spec.clusterIPs[0]",
            format!("{first:?} differs from spec.clusterIP {ip:?}"),
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
    let Some(status) = &pod.status else {
        return out;
    };
    if let Some(ip) = &status.pod_ip {
        check_ip("status.podIP", ip, &mut out);
    }
    for (i, ip) in status.pod_ips.iter().flatten().enumerate() {
        check_ip(&format!("status.podIPs[{i}].ip"), &ip.ip, &mut out);
    }
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
            if !parse(address) {
                out.push(problem(
                    format!("endpoints[{i}].addresses[{j}]"),
                    format!("{address:?} is not an {} address", slice.address_type),
                ));
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

fn check_cluster_ip(field: &str, ip: &str, out: &mut Vec<Problem>) {
    if !(ip.is_empty() || ip == "None" || ip.parse::<IpAddr>().is_ok()) {
        out.push(problem(
            field,
            format!("{ip:?} is not an IP address, \"None\" (headless) or empty"),
        ));
    }
}

fn check_ip(field: &str, ip: &str, out: &mut Vec<Problem>) {
    if ip.parse::<IpAddr>().is_err() {
        out.push(problem(field, format!("{ip:?} is not an IP address")));
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
