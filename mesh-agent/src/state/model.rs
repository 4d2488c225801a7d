//! The typed cluster state, and the small interpretations of Kubernetes fields that
//! validation and planning must agree on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Namespace of an object whose `metadata.namespace` is absent, as in `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Namespace and name of an object. Orders by namespace first, so one namespace's
/// objects are contiguous in a [`State`] map.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    /// `metadata.namespace`, [`DEFAULT_NAMESPACE`] when absent.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A complete, validated cluster state. Only [`super::load`] and [`super::parse_str`]
/// build one, so its invariants hold: names are unique per kind and namespace, no two
/// Services share a cluster IP, every address and port parses.
///
/// Each object's `metadata.namespace` is filled in (defaulted) so that consumers need
/// not repeat the defaulting rule.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub(super) services: BTreeMap<ObjectKey, Service>,
    pub(super) pods: BTreeMap<ObjectKey, Pod>,
    pub(super) endpoint_slices: BTreeMap<ObjectKey, EndpointSlice>,
}

impl State {
    /// All Services, ordered by namespace and name.
    pub fn services(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &Service)> {
        self.services.iter()
    }

    /// All Pods, ordered by namespace and name.
    #[cfg(test)]
    pub fn pods(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &Pod)> {
        self.pods.iter()
    }

    /// The Pods of one namespace, ordered by name.
    pub fn pods_in<'a>(
        &'a self,
        namespace: &str,
    ) -> impl Iterator<Item = (&'a ObjectKey, &'a Pod)> + use<'a> {
        in_namespace(&self.pods, namespace)
    }

    /// All EndpointSlices, ordered by namespace and name.
    pub fn endpoint_slices(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices.iter()
    }
}

fn in_namespace<'a, T>(
    map: &'a BTreeMap<ObjectKey, T>,
    namespace: &str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a T)> + use<'a, T> {
    let start = ObjectKey {
        namespace: namespace.to_owned(),
        name: String::new(),
    };
    map.range(start.clone()..)
        .take_while(move |(key, _)| key.namespace == start.namespace)
}

/// The kinds the state understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(super) enum Kind {
    Service,
    Pod,
    EndpointSlice,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
        })
    }
}

/// The cluster IPs of a Service: `spec.clusterIPs` when set (it is the authoritative
/// field since dual-stack), else `spec.clusterIP`. "None" (headless) and "" yield
/// nothing; so do unparsable values, which validation has already rejected.
pub fn cluster_ips(svc: &Service) -> Vec<IpAddr> {
    let Some(spec) = &svc.spec else {
        return Vec::new();
    };
    let ips: Vec<&str> = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.iter().map(String::as_str).collect(),
        (_, Some(ip)) => vec![ip.as_str()],
        _ => Vec::new(),
    };
    let mut parsed: Vec<IpAddr> = ips.into_iter().filter_map(|ip| ip.parse().ok()).collect();
    parsed.dedup();
    parsed
}

/// The Pod's addresses: `status.podIPs` in order, then `status.podIP` when it is not
/// listed there (state files often give only the latter). Unparsable values, which
/// validation has already rejected, are left out.
pub fn pod_ips(pod: &Pod) -> Vec<IpAddr> {
    let Some(status) = &pod.status else {
        return Vec::new();
    };
    let listed = status.pod_ips.iter().flatten().map(|ip| ip.ip.as_str());
    let mut ips: Vec<IpAddr> = Vec::new();
    for ip in listed.chain(status.pod_ip.as_deref()) {
        if let Ok(ip) = ip.parse()
            && !ips.contains(&ip)
        {
            ips.push(ip);
        }
    }
    ips
}

/// `spec.sessionAffinityConfig.clientIP.timeoutSeconds` when absent, as the API server
/// defaults it.
pub const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;
/// The largest session affinity timeout the API server accepts (one day).
pub const MAX_AFFINITY_TIMEOUT_S: u32 = 86_400;

/// The session affinity timeout in seconds when `spec.sessionAffinity` is `ClientIP`,
/// `None` otherwise (absent and `None` mean no affinity). Validation has kept the
/// timeout in `1..=86400`.
pub fn affinity_timeout(svc: &Service) -> Option<u32> {
    let spec = svc.spec.as_ref()?;
    if spec.session_affinity.as_deref() != Some("ClientIP") {
        return None;
    }
    let timeout = spec
        .session_affinity_config
        .as_ref()
        .and_then(|c| c.client_ip.as_ref())
        .and_then(|c| c.timeout_seconds);
    Some(timeout.map_or(DEFAULT_AFFINITY_TIMEOUT_S, |t| {
        u32::try_from(t).unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    }))
}

/// `spec.trafficDistribution` values that ask for topology-aware routing. All three
/// mean "prefer endpoints close to the client" here, and this node is the closest a
/// socket-level balancer can tell (`PreferClose` is the older name of `PreferSameZone`).
pub const PREFER_CLOSE: [&str; 3] = ["PreferClose", "PreferSameZone", "PreferSameNode"];

/// Whether the Service asks for topology-aware routing (see [`PREFER_CLOSE`]).
pub fn prefers_close(svc: &Service) -> bool {
    svc.spec
        .as_ref()
        .and_then(|s| s.traffic_distribution.as_deref())
        .is_some_and(|t| PREFER_CLOSE.contains(&t))
}

/// A port protocol, defaulting to TCP when absent (the API server's default).
pub fn protocol(protocol: Option<&String>) -> &str {
    protocol.map_or("TCP", String::as_str)
}

/// `spec.ports[].targetPort` after the API server's defaulting: absent, `0` and `""`
/// all mean "the same as `port`" and yield `None`.
pub fn target_port(port: &ServicePort) -> Option<&IntOrString> {
    port.target_port.as_ref().filter(|t| {
        !matches!(t, IntOrString::Int(0)) && !matches!(t, IntOrString::String(s) if s.is_empty())
    })
}
