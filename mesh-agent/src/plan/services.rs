//! Which frontends exist, which backends serve them, and which of those get slots,
//! following Kubernetes (kube-proxy) semantics. Id allocation and map layout are left
//! to the caller.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint as SliceEndpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_common::service::{BACKEND_ACTIVE, BACKEND_TERMINATING, BACKEND_UNHEALTHY, Protocol};

use super::BackendAddr;
use super::selector::LabelIndex;
use crate::state::{
    ObjectKey, SERVICE_NAME_LABEL, State, affinity_timeout, cluster_ips, pod_ips, prefers_close,
    protocol, service_selector, target_port,
};

/// The Service an IP EndpointSlice belongs to: (its namespace, its
/// `kubernetes.io/service-name`); `None` for other address types or without the label.
pub(super) fn slice_service<'a>(
    key: &'a ObjectKey,
    slice: &'a EndpointSlice,
) -> Option<(&'a str, &'a str)> {
    if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
        return None;
    }
    let labels = slice.metadata.labels.as_ref()?;
    let service = labels.get(SERVICE_NAME_LABEL)?;
    Some((key.namespace.as_str(), service.as_str()))
}

/// The Service an IP EndpointSlice belongs to, as its key.
pub(super) fn slice_owner(key: &ObjectKey, slice: &EndpointSlice) -> Option<ObjectKey> {
    let (namespace, name) = slice_service(key, slice)?;
    Some(ObjectKey {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
    })
}

/// One frontend `vip:port/proto` of a Service and the backends that may serve it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Frontend {
    pub service: ObjectKey,
    /// `spec.ports[].name`, "" when unnamed.
    pub port_name: String,
    pub vip: IpAddr,
    pub port: u16,
    pub proto: u8,
    /// Session affinity timeout when `spec.sessionAffinity` is `ClientIP`.
    pub affinity_timeout_s: Option<u32>,
    /// `spec.trafficDistribution` asks for close endpoints.
    pub prefer_close: bool,
    /// Ready and terminating-but-serving backends of the VIP's family, sorted by
    /// address, without duplicates. Backends that serve neither are left out.
    pub backends: Vec<Endpoint>,
}

/// One backend address, with what is known about it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Endpoint {
    pub addr: SocketAddr,
    pub pod: Option<ObjectKey>,
    /// The node it runs on: the Pod's `spec.nodeName`, the slice endpoint's `nodeName`.
    pub node: Option<String>,
    /// Terminating but still serving: keeps its connections, gets no new ones.
    pub terminating: bool,
    /// `hints.forNodes` of its EndpointSlice endpoint; `None` without node hints.
    pub for_nodes: Option<BTreeSet<String>>,
}

impl Endpoint {
    /// Adds what `other` (the same address from another source) knows. A ready source
    /// wins over a terminating one; missing Pod, node and hints are filled in.
    fn merge(&mut self, other: Self) {
        self.terminating &= other.terminating;
        if self.pod.is_none() {
            self.pod = other.pod;
        }
        if self.node.is_none() {
            self.node = other.node;
        }
        if self.for_nodes.is_none() {
            self.for_nodes = other.for_nodes;
        }
    }
}

/// The frontends of Service `key`, ordered by cluster IP (in `spec.clusterIPs` order:
/// the primary family first) and port, with the backends `sources` know for it.
///
/// Every cluster IP of both families is programmed; its backends are the addresses of
/// its family. SCTP ports are skipped with a warning. Headless Services and those
/// without a cluster IP have no frontend.
pub(super) fn frontends_of(
    sources: &BackendSources<'_>,
    key: &ObjectKey,
    svc: &Service,
) -> Vec<Frontend> {
    let mut out = Vec::new();
    let vips = cluster_ips(svc);
    if vips.is_empty() {
        return out;
    }
    let mut ports = Vec::new();
    for port in svc.spec.iter().flat_map(|spec| spec.ports.iter().flatten()) {
        let proto_name = protocol(port.protocol.as_ref());
        let proto = match Protocol::from_name(proto_name) {
            Some(p @ (Protocol::Tcp | Protocol::Udp)) => p as u8,
            _ => {
                tracing::warn!(service = %key, port = port.port, protocol = proto_name, "skipping port: protocol not supported");
                continue;
            }
        };
        // Validation has kept ports in 1..=65535.
        if let Ok(number) = u16::try_from(port.port) {
            ports.push((port, proto, number));
        }
    }
    if ports.is_empty() {
        return out;
    }

    let port_refs: Vec<&ServicePort> = ports.iter().map(|&(port, _, _)| port).collect();
    let backends = sources.backends(key, svc, &port_refs);
    let affinity_timeout_s = affinity_timeout(svc);
    let prefer_close = prefers_close(svc);
    for &vip in &vips {
        for (&(port, proto, number), backends) in ports.iter().zip(&backends) {
            out.push(Frontend {
                service: key.clone(),
                port_name: port.name.clone().unwrap_or_default(),
                vip,
                port: number,
                proto,
                affinity_timeout_s,
                prefer_close,
                backends: backends
                    .iter()
                    .filter(|b| b.addr.is_ipv4() == vip.is_ipv4())
                    .cloned()
                    .collect(),
            });
        }
    }
    out
}

/// Where Services' backends come from: the Pods their selectors pick and their
/// EndpointSlices, indexed once per state.
pub(super) struct BackendSources<'a> {
    slices_by_service: BTreeMap<(&'a str, &'a str), Vec<&'a EndpointSlice>>,
    pods: Vec<(&'a ObjectKey, &'a Pod)>,
    index: LabelIndex<'a>,
}

impl<'a> BackendSources<'a> {
    /// Indexes the Pods and EndpointSlices of `state`.
    pub(super) fn new(state: &'a State) -> Self {
        Self::of(state.endpoint_slices(), state.pods())
    }

    /// Indexes `slices` and `pods`: enough for the Services whose slices and namespaces'
    /// Pods they include. One pass over the slices instead of one per Service, which at
    /// 10,000 Services is the difference between milliseconds and minutes.
    pub(super) fn of(
        slices: impl Iterator<Item = (&'a ObjectKey, &'a EndpointSlice)>,
        pods: impl Iterator<Item = (&'a ObjectKey, &'a Pod)>,
    ) -> Self {
        let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for (key, slice) in slices {
            if let Some(service) = slice_service(key, slice) {
                slices_by_service.entry(service).or_default().push(slice);
            }
        }
        let pods: Vec<(&ObjectKey, &Pod)> = pods.collect();
        let index = LabelIndex::new(pods.iter().map(|(key, pod)| {
            let labels = pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS);
            (key.namespace.as_str(), labels)
        }));
        Self {
            slices_by_service,
            pods,
            index,
        }
    }

    /// The backends of each of `ports` (ports of `svc`, named `key`), both families,
    /// sorted by address, without duplicates: serving selected Pods and serving
    /// EndpointSlice endpoints, each marked terminating or not. Those that serve
    /// neither are left out.
    pub(super) fn backends(
        &self,
        key: &ObjectKey,
        svc: &Service,
        ports: &[&ServicePort],
    ) -> Vec<Vec<Endpoint>> {
        let selected = selected_pods(&self.index, &self.pods, key, svc);
        let slices: &[&EndpointSlice] = self
            .slices_by_service
            .get(&(key.namespace.as_str(), key.name.as_str()))
            .map_or(&[], Vec::as_slice);
        ports
            .iter()
            .map(|&port| {
                let proto_name = protocol(port.protocol.as_ref());
                let mut backends = BTreeMap::new();
                for (pod_key, pod, terminating) in &selected {
                    let Some(target) = pod_target_port(port, proto_name, pod) else {
                        continue;
                    };
                    for ip in pod_ips(pod) {
                        add(
                            &mut backends,
                            Endpoint {
                                addr: SocketAddr::new(ip, target),
                                pod: Some((*pod_key).clone()),
                                node: pod.spec.as_ref().and_then(|s| s.node_name.clone()),
                                terminating: *terminating,
                                for_nodes: None,
                            },
                        );
                    }
                }
                for slice in slices {
                    add_slice_endpoints(slice, &key.namespace, port, proto_name, &mut backends);
                }
                backends.into_values().collect()
            })
            .collect()
    }

    /// How many Pods were checked against Service selectors so far.
    pub(super) fn examined(&self) -> u64 {
        self.index.examined()
    }
}

fn add(backends: &mut BTreeMap<SocketAddr, Endpoint>, endpoint: Endpoint) {
    match backends.get_mut(&endpoint.addr) {
        Some(known) => known.merge(endpoint),
        None => {
            backends.insert(endpoint.addr, endpoint);
        }
    }
}

/// The Pods a Service's selector picks that serve, each with whether it is
/// terminating. As in Kubernetes, a Service without a selector (or with an empty one)
/// selects no Pod: its endpoints come from EndpointSlices only.
fn selected_pods<'a>(
    index: &LabelIndex<'_>,
    pods: &[(&'a ObjectKey, &'a Pod)],
    key: &ObjectKey,
    svc: &Service,
) -> Vec<(&'a ObjectKey, &'a Pod, bool)> {
    let Some(selector) = service_selector(svc) else {
        return Vec::new();
    };
    index
        .select_equal(&key.namespace, selector)
        .into_iter()
        .filter_map(|i| pods.get(i))
        .filter_map(|&(key, pod)| Some((key, pod, pod_terminating(pod)?)))
        .collect()
}

/// Labels of a Pod that has none.
static NO_LABELS: BTreeMap<String, String> = BTreeMap::new();

/// Whether a Pod serves and, if so, whether it is terminating (has a
/// `deletionTimestamp`), as the EndpointSlice controller derives `serving` and
/// `terminating`. `None`: it does not serve (finished, or not ready).
///
/// Readiness is the `Ready` condition ("True" is ready, anything else is not). A Pod
/// with no `Ready` condition counts as ready, unlike in a live cluster: state files are
/// often hand-written, and a Pod listed with an IP is meant to serve.
fn pod_terminating(pod: &Pod) -> Option<bool> {
    let terminating = pod.metadata.deletion_timestamp.is_some();
    let Some(status) = &pod.status else {
        return Some(terminating);
    };
    let finished = matches!(status.phase.as_deref(), Some("Succeeded" | "Failed"));
    let ready = status
        .conditions
        .iter()
        .flatten()
        .find(|c| c.type_ == "Ready")
        .is_none_or(|c| c.status == "True");
    (!finished && ready).then_some(terminating)
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

/// Adds the serving endpoints of an IPv4 or IPv6 slice for one Service port. The slice
/// port is the one with the same name ("" and unset are equal) and protocol.
fn add_slice_endpoints(
    slice: &EndpointSlice,
    namespace: &str,
    port: &ServicePort,
    proto: &str,
    backends: &mut BTreeMap<SocketAddr, Endpoint>,
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
        let Some(terminating) = slice_terminating(endpoint) else {
            continue;
        };
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
        let for_nodes: Option<BTreeSet<String>> = endpoint
            .hints
            .as_ref()
            .and_then(|h| h.for_nodes.as_ref())
            .filter(|nodes| !nodes.is_empty())
            .map(|nodes| nodes.iter().map(|n| n.name.clone()).collect());
        for address in &endpoint.addresses {
            let Ok(ip) = address.parse::<IpAddr>() else {
                continue;
            };
            add(
                backends,
                Endpoint {
                    addr: SocketAddr::new(ip, number),
                    pod: pod.clone(),
                    node: endpoint.node_name.clone(),
                    terminating,
                    for_nodes: for_nodes.clone(),
                },
            );
        }
    }
}

/// Whether a slice endpoint serves and, if so, whether it is terminating. Unset
/// conditions follow the API: `ready` and `serving` unset mean true, `terminating`
/// unset means false. Ready: `ready` and not `terminating`. Terminating: `terminating`
/// and `serving`. Anything else (not ready, or terminating and no longer serving) is
/// `None`: no backend.
fn slice_terminating(endpoint: &SliceEndpoint) -> Option<bool> {
    let c = endpoint.conditions.as_ref();
    let terminating = c.and_then(|c| c.terminating) == Some(true);
    let serving = c.and_then(|c| c.serving) != Some(false);
    let ready = c.and_then(|c| c.ready) != Some(false);
    match (terminating, serving, ready) {
        (true, true, _) => Some(true),
        (false, _, true) => Some(false),
        _ => None,
    }
}

/// How a frontend uses its backends, one entry per backend (same order as
/// [`Frontend::backends`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Selection {
    /// This frontend's view of each backend: `BACKEND_ACTIVE` (in a slot, or left out
    /// only by topology), `BACKEND_UNHEALTHY` or `BACKEND_TERMINATING`.
    pub states: Vec<u8>,
    /// Whether each backend gets a slot; slots are numbered in backend order from 1.
    pub in_slot: Vec<bool>,
    /// Every ready backend is unhealthy, so all of them keep their slots.
    pub health_panic: bool,
}

impl Selection {
    /// Number of slots.
    pub fn slot_count(&self) -> usize {
        self.in_slot.iter().filter(|&&s| s).count()
    }
}

/// Chooses the backends that get slots, in this order:
///
/// 1. Only ready backends; terminating ones never get a slot (no new connections), and
///    there is no fallback to them: without a ready backend the frontend has no slot.
/// 2. Health: ready backends in `unhealthy` are left out, unless that would leave out
///    every ready backend; then all of them stay (fail open, like Envoy's panic
///    threshold: a health checker must not be able to take a whole Service down).
/// 3. Topology, among what is left: when every ready backend has `hints.forNodes` and
///    some left name `node`, only those; else, when the Service prefers close
///    endpoints and some left run on `node`, only those; else all that are left.
pub(super) fn select(f: &Frontend, node: &str, unhealthy: &BTreeSet<BackendAddr>) -> Selection {
    let healthy = |b: &Endpoint| !unhealthy.contains(&BackendAddr::new(b.addr, f.proto));
    let any_ready = f.backends.iter().any(|b| !b.terminating);
    let health_panic = any_ready && !f.backends.iter().any(|b| !b.terminating && healthy(b));
    let pool: Vec<bool> = f
        .backends
        .iter()
        .map(|b| !b.terminating && (health_panic || healthy(b)))
        .collect();
    let states = f
        .backends
        .iter()
        .zip(&pool)
        .map(|(b, &in_pool)| match (in_pool, b.terminating) {
            (true, _) => BACKEND_ACTIVE,
            (false, true) => BACKEND_TERMINATING,
            (false, false) => BACKEND_UNHEALTHY,
        })
        .collect();

    // Those of the pool that `keep` picks, or none when there is no node to be near.
    let near = |keep: &dyn Fn(&Endpoint) -> bool| -> Vec<bool> {
        let zipped = f.backends.iter().zip(&pool);
        zipped
            .map(|(b, &p)| p && !node.is_empty() && keep(b))
            .collect()
    };
    let hinted = any_ready
        && f.backends
            .iter()
            .all(|b| b.terminating || b.for_nodes.is_some());
    let for_node = if hinted {
        near(&|b| b.for_nodes.as_ref().is_some_and(|n| n.contains(node)))
    } else {
        Vec::new()
    };
    let local = if f.prefer_close {
        near(&|b| b.node.as_deref() == Some(node))
    } else {
        Vec::new()
    };
    let in_slot = [for_node, local]
        .into_iter()
        .find(|picked| picked.contains(&true))
        .unwrap_or(pool);
    Selection {
        states,
        in_slot,
        health_panic,
    }
}
