//! Which frontends exist and which backends serve them, following Kubernetes
//! (kube-proxy) semantics. Id allocation and map layout are left to the caller.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddrV4};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_common::service::{PROTO_TCP, PROTO_UDP};

use crate::state::{ObjectKey, SERVICE_NAME_LABEL, State, cluster_ips, protocol, target_port};

/// One frontend `vip:port/proto` of a Service and its ready backends.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Frontend {
    pub service: ObjectKey,
    /// `spec.ports[].name`, "" when unnamed.
    pub port_name: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    pub proto: u8,
    /// Sorted by address, without duplicates.
    pub backends: Vec<Endpoint>,
}

/// One backend address, with the Pod behind it when known.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub addr: SocketAddrV4,
    pub pod: Option<ObjectKey>,
}

/// All frontends of all programmable Services, ordered by Service, cluster IP and port.
///
/// Only IPv4 cluster IPs and TCP/UDP ports are programmed for now; the rest is skipped
/// with a warning. Headless Services and those without a cluster IP have no frontend.
pub(super) fn frontends(state: &State) -> Vec<Frontend> {
    let mut out = Vec::new();
    for (key, svc) in state.services() {
        let ips = cluster_ips(svc);
        let vips: Vec<Ipv4Addr> = ips
            .iter()
            .filter_map(|ip| match ip {
                IpAddr::V4(v4) => Some(*v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        if vips.is_empty() {
            if !ips.is_empty() {
                tracing::warn!(service = %key, "skipping IPv6-only Service: only IPv4 is programmed yet");
            }
            continue;
        }
        let pods = selected_pods(state, key, svc);
        let slices: Vec<&EndpointSlice> = state
            .endpoint_slices_in(&key.namespace)
            .map(|(_, slice)| slice)
            .filter(|slice| {
                let labels = slice.metadata.labels.as_ref();
                slice.address_type == "IPv4"
                    && labels
                        .and_then(|l| l.get(SERVICE_NAME_LABEL))
                        .is_some_and(|n| *n == key.name)
            })
            .collect();

        for port in svc.spec.iter().flat_map(|spec| spec.ports.iter().flatten()) {
            let proto_name = protocol(port.protocol.as_ref());
            let proto = match proto_name {
                "TCP" => PROTO_TCP,
                "UDP" => PROTO_UDP,
                _ => {
                    tracing::warn!(service = %key, port = port.port, protocol = proto_name, "skipping port: protocol not supported");
                    continue;
                }
            };
            // Validation has kept ports in 1..=65535.
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            let mut backends = BTreeMap::new();
            for &(pod_key, pod, ip) in &pods {
                if let Some(target) = pod_target_port(port, proto_name, pod) {
                    backends.insert(SocketAddrV4::new(ip, target), Some(pod_key.clone()));
                }
            }
            for slice in &slices {
                add_slice_endpoints(slice, &key.namespace, port, proto_name, &mut backends);
            }
            let backends: Vec<Endpoint> = backends
                .into_iter()
                .map(|(addr, pod)| Endpoint { addr, pod })
                .collect();
            for &vip in &vips {
                out.push(Frontend {
                    service: key.clone(),
                    port_name: port.name.clone().unwrap_or_default(),
                    vip,
                    port: number,
                    proto,
                    backends: backends.clone(),
                });
            }
        }
    }
    out
}

/// The ready Pods a Service's selector picks, with their IPv4 address. As in
/// Kubernetes, a Service without a selector (or with an empty one) selects no Pod: its
/// endpoints come from EndpointSlices only.
fn selected_pods<'a>(
    state: &'a State,
    key: &ObjectKey,
    svc: &Service,
) -> Vec<(&'a ObjectKey, &'a Pod, Ipv4Addr)> {
    let Some(selector) = svc
        .spec
        .as_ref()
        .and_then(|s| s.selector.as_ref())
        .filter(|s| !s.is_empty())
    else {
        return Vec::new();
    };
    state
        .pods_in(&key.namespace)
        .filter(|(_, pod)| {
            let labels = pod.metadata.labels.as_ref();
            selector
                .iter()
                .all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .filter(|(_, pod)| is_serving(pod))
        .filter_map(|(key, pod)| Some((key, pod, pod_ipv4(pod)?)))
        .collect()
}

/// Whether a Pod may receive traffic: not terminating, not finished, and ready.
///
/// Readiness is the `Ready` condition ("True" is ready, anything else is not). A Pod
/// with no `Ready` condition counts as ready, unlike in a live cluster: state files are
/// often hand-written, and a Pod listed with an IP is meant to serve.
fn is_serving(pod: &Pod) -> bool {
    let Some(status) = &pod.status else {
        return true;
    };
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True");
    pod.metadata.deletion_timestamp.is_none() && !finished && ready
}

/// The Pod's IPv4 address: the first one in `status.podIPs`, else `status.podIP`.
fn pod_ipv4(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    listed
        .chain(status.pod_ip.as_deref())
        .find_map(|ip| ip.parse().ok())
}

/// The port a Pod serves a Service port on: `targetPort` by number, by name (looked up
/// in the Pod's container ports of the same protocol, including sidecar init
/// containers, as Kubernetes' `FindPort` does), or the Service port when unset.
fn pod_target_port(port: &ServicePort, proto: &str, pod: &Pod) -> Option<u16> {
    let number = match target_port(port) {
        None => port.port,
        Some(IntOrString::Int(n)) => *n,
        Some(IntOrString::String(name)) => {
            let spec = pod.spec.as_ref()?;
            let sidecars = spec
                .init_containers
                .iter()
                .flatten()
                .filter(|c| c.restart_policy.as_deref() == Some("Always"));
            spec.containers
                .iter()
                .chain(sidecars)
                .flat_map(|c| c.ports.iter().flatten())
                .find(|p| p.name.as_ref() == Some(name) && protocol(p.protocol.as_ref()) == proto)?
                .container_port
        }
    };
    u16::try_from(number).ok().filter(|&n| n != 0)
}

/// Adds the ready endpoints of an IPv4 slice for one Service port. The slice port is
/// the one with the same name ("" and unset are equal) and protocol. Endpoint
/// readiness follows the API: `conditions.ready` unset means ready.
fn add_slice_endpoints(
    slice: &EndpointSlice,
    namespace: &str,
    port: &ServicePort,
    proto: &str,
    backends: &mut BTreeMap<SocketAddrV4, Option<ObjectKey>>,
) {
    let name = port.name.as_deref().unwrap_or_default();
    let Some(number) = slice
        .ports
        .iter()
        .flatten()
        .find(|p| {
            p.name.as_deref().unwrap_or_default() == name && protocol(p.protocol.as_ref()) == proto
        })
        .and_then(|p| u16::try_from(p.port?).ok())
        .filter(|&n| n != 0)
    else {
        return;
    };
    for endpoint in &slice.endpoints {
        if endpoint.conditions.as_ref().and_then(|c| c.ready) == Some(false) {
            continue;
        }
        let pod = endpoint
            .target_ref
            .as_ref()
            .filter(|r| r.kind.as_deref() == Some("Pod"))
            .and_then(|r| {
                let namespace = r.namespace.clone().unwrap_or_else(|| namespace.to_owned());
                Some(ObjectKey {
                    namespace,
                    name: r.name.clone()?,
                })
            });
        for address in &endpoint.addresses {
            let Ok(ip) = address.parse() else { continue };
            let known = backends.entry(SocketAddrV4::new(ip, number)).or_default();
            if known.is_none() {
                known.clone_from(&pod);
            }
        }
    }
}
