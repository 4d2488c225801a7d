//! The typed cluster state, and the small interpretations of Kubernetes fields that
//! validation and planning must agree on.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, Pod, Service, ServicePort};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::httproute::HttpRoute;
use super::istio::{AuthorizationPolicy, MeshConfig, PeerAuthentication};

/// Namespace of an object whose `metadata.namespace` is absent, as in `kubectl apply`.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Label that ties an EndpointSlice to its Service (same namespace).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Label the API server puts on every Namespace, valued with its name, so that
/// `namespaceSelector`s can pick namespaces by name.
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Annotation of a Pod or a Namespace (the Pod's wins): `"false"` keeps the pods' TCP
/// connections out of same-node socket redirection (`run --sockmap=true`), e.g. for
/// applications reading blocking sockets; `"true"` (the default) lets them in.
pub const SOCKMAP_ANNOTATION: &str = "mesh.io/sockmap";

/// Label of a Namespace (or a Pod) that puts its pods in the mesh, as Istio ambient's:
/// value [`DATAPLANE_AMBIENT`] enrolls, [`DATAPLANE_NONE`] on a pod opts it out.
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// [`DATAPLANE_MODE_LABEL`] value that enrolls.
pub const DATAPLANE_AMBIENT: &str = "ambient";
/// [`DATAPLANE_MODE_LABEL`] value that keeps a pod out.
pub const DATAPLANE_NONE: &str = "none";

/// Namespace and name of an object. Orders by namespace first, so one namespace's
/// objects are contiguous in a [`State`] map. Cluster-scoped objects (Namespaces) have
/// namespace "".
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
/// not repeat the defaulting rule. Objects are shared (`Arc`) with the source that
/// decoded them, so a keyed source assembles a state without copying every object.
#[derive(Clone, Debug, Default)]
pub struct State {
    pub(super) services: BTreeMap<ObjectKey, Arc<Service>>,
    pub(super) pods: BTreeMap<ObjectKey, Arc<Pod>>,
    pub(super) endpoint_slices: BTreeMap<ObjectKey, Arc<EndpointSlice>>,
    /// Keyed by namespace "" and name = the namespace's name; labels include
    /// [`NAMESPACE_NAME_LABEL`].
    pub(super) namespaces: BTreeMap<ObjectKey, Arc<Namespace>>,
    pub(super) network_policies: BTreeMap<ObjectKey, Arc<NetworkPolicy>>,
    pub(super) http_routes: BTreeMap<ObjectKey, Arc<HttpRoute>>,
    pub(super) peer_authentications: BTreeMap<ObjectKey, Arc<PeerAuthentication>>,
    pub(super) authorization_policies: BTreeMap<ObjectKey, Arc<AuthorizationPolicy>>,
    /// From the `istio-system/istio` ConfigMap, when the state has it.
    pub(super) mesh_config: Option<MeshConfig>,
}

impl State {
    /// All Services, ordered by namespace and name.
    pub fn services(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &Service)> {
        self.services.iter().map(|(k, o)| (k, &**o))
    }

    /// All Pods, ordered by namespace and name.
    pub fn pods(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &Pod)> {
        self.pods.iter().map(|(k, o)| (k, &**o))
    }

    /// All EndpointSlices, ordered by namespace and name.
    pub fn endpoint_slices(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices.iter().map(|(k, o)| (k, &**o))
    }

    /// The Namespaces defined in the state, ordered by name. Keys are cluster-scoped:
    /// namespace "" and name = the namespace's name. Their labels include
    /// [`NAMESPACE_NAME_LABEL`]. Namespaces that objects live in need not be defined:
    /// see [`State::namespace_labels`].
    #[cfg(test)]
    pub fn namespaces(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &Namespace)> {
        self.namespaces.iter().map(|(k, o)| (k, &**o))
    }

    /// The labels of namespace `name`, as `namespaceSelector`s see them: those of its
    /// Namespace object, or only [`NAMESPACE_NAME_LABEL`] when the state does not define
    /// it (the namespace exists as soon as an object lives in it).
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let key = ObjectKey {
            namespace: String::new(),
            name: name.to_owned(),
        };
        let mut labels = self
            .namespaces
            .get(&key)
            .and_then(|ns| ns.metadata.labels.clone())
            .unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
        labels
    }

    /// Whether the pod at `key` may have its connections redirected socket to socket:
    /// its [`SOCKMAP_ANNOTATION`], else its Namespace's, else yes. Validation has checked
    /// the values.
    pub fn sockmap_allowed(&self, key: &ObjectKey, pod: &Pod) -> bool {
        let ns = ObjectKey {
            namespace: String::new(),
            name: key.namespace.clone(),
        };
        let value = |annotations: Option<&BTreeMap<String, String>>| {
            annotations.and_then(|a| a.get(SOCKMAP_ANNOTATION)).cloned()
        };
        value(pod.metadata.annotations.as_ref())
            .or_else(|| {
                self.namespaces
                    .get(&ns)
                    .and_then(|n| value(n.metadata.annotations.as_ref()))
            })
            .is_none_or(|v| v != "false")
    }

    /// Whether the pod at `key` is in the mesh, by Istio ambient's rule: its own
    /// [`DATAPLANE_MODE_LABEL`] decides when set (`ambient` in, `none` out), else its
    /// Namespace's (`ambient` in). Host-network pods never are: their address is the
    /// node's.
    pub fn enrolled(&self, key: &ObjectKey, pod: &Pod) -> bool {
        if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
            return false;
        }
        let label = |labels: Option<&BTreeMap<String, String>>| {
            labels.and_then(|l| l.get(DATAPLANE_MODE_LABEL)).cloned()
        };
        match label(pod.metadata.labels.as_ref()) {
            Some(v) if v == DATAPLANE_NONE => false,
            Some(v) if v == DATAPLANE_AMBIENT => true,
            _ => {
                let ns = ObjectKey {
                    namespace: String::new(),
                    name: key.namespace.clone(),
                };
                self.namespaces
                    .get(&ns)
                    .and_then(|n| label(n.metadata.labels.as_ref()))
                    .is_some_and(|v| v == DATAPLANE_AMBIENT)
            }
        }
    }

    /// All NetworkPolicies, ordered by namespace and name.
    pub fn network_policies(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &NetworkPolicy)> {
        self.network_policies.iter().map(|(k, o)| (k, &**o))
    }

    /// All HTTPRoutes (`v1` and `v1beta1` alike), ordered by namespace and name.
    pub fn http_routes(&self) -> impl ExactSizeIterator<Item = (&ObjectKey, &HttpRoute)> {
        self.http_routes.iter().map(|(k, o)| (k, &**o))
    }

    /// All PeerAuthentications (`v1` and `v1beta1` alike), ordered by namespace and name.
    pub fn peer_authentications(
        &self,
    ) -> impl ExactSizeIterator<Item = (&ObjectKey, &PeerAuthentication)> {
        self.peer_authentications.iter().map(|(k, o)| (k, &**o))
    }

    /// All AuthorizationPolicies (`v1` and `v1beta1` alike), ordered by namespace and
    /// name.
    pub fn authorization_policies(
        &self,
    ) -> impl ExactSizeIterator<Item = (&ObjectKey, &AuthorizationPolicy)> {
        self.authorization_policies.iter().map(|(k, o)| (k, &**o))
    }

    /// Istio's MeshConfig settings (`istio-system/istio` ConfigMap, key `mesh`); all
    /// unset when the state has no such ConfigMap.
    pub fn mesh_config(&self) -> MeshConfig {
        self.mesh_config.clone().unwrap_or_default()
    }

    /// The Service at `key`, if the state has it.
    pub fn service(&self, key: &ObjectKey) -> Option<&Service> {
        self.services.get(key).map(|o| &**o)
    }

    /// The Pod at `key`, if the state has it.
    pub fn pod(&self, key: &ObjectKey) -> Option<&Pod> {
        self.pods.get(key).map(|o| &**o)
    }

    /// The EndpointSlice at `key`, if the state has it.
    pub fn endpoint_slice(&self, key: &ObjectKey) -> Option<&EndpointSlice> {
        self.endpoint_slices.get(key).map(|o| &**o)
    }

    /// The EndpointSlice at `key` with the state's own copy of the key.
    pub fn endpoint_slice_entry(&self, key: &ObjectKey) -> Option<(&ObjectKey, &EndpointSlice)> {
        self.endpoint_slices
            .get_key_value(key)
            .map(|(k, o)| (k, &**o))
    }

    /// The Services of `namespace`, ordered by name.
    pub fn services_in(&self, namespace: &str) -> impl Iterator<Item = (&ObjectKey, &Service)> {
        in_namespace(&self.services, namespace)
    }

    /// The Pods of `namespace`, ordered by name.
    pub fn pods_in(&self, namespace: &str) -> impl Iterator<Item = (&ObjectKey, &Pod)> {
        in_namespace(&self.pods, namespace)
    }
}

/// The objects of one namespace: a contiguous range, as keys order by namespace first.
fn in_namespace<'a, T>(
    objects: &'a BTreeMap<ObjectKey, Arc<T>>,
    namespace: &str,
) -> impl Iterator<Item = (&'a ObjectKey, &'a T)> + use<'a, T> {
    let start = ObjectKey {
        namespace: namespace.to_owned(),
        name: String::new(),
    };
    let namespace = namespace.to_owned();
    objects
        .range(start..)
        .take_while(move |(k, _)| k.namespace == namespace)
        .map(|(k, o)| (k, &**o))
}

/// The kinds the state understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Kind {
    /// `v1 Service`.
    Service,
    /// `v1 Pod`.
    Pod,
    /// `discovery.k8s.io/v1 EndpointSlice`.
    EndpointSlice,
    /// `v1 Namespace` (cluster-scoped).
    Namespace,
    /// `networking.k8s.io/v1 NetworkPolicy`.
    NetworkPolicy,
    /// `gateway.networking.k8s.io/v1 HTTPRoute`.
    HttpRoute,
    /// `security.istio.io/v1 PeerAuthentication`.
    PeerAuthentication,
    /// `security.istio.io/v1 AuthorizationPolicy`.
    AuthorizationPolicy,
    /// `v1 ConfigMap` (only `istio-system/istio` is read).
    ConfigMap,
}

impl Kind {
    /// Every kind, in the order `mesh-agent get` lists them.
    pub const ALL: [Kind; 9] = [
        Kind::Namespace,
        Kind::ConfigMap,
        Kind::Service,
        Kind::EndpointSlice,
        Kind::Pod,
        Kind::NetworkPolicy,
        Kind::HttpRoute,
        Kind::PeerAuthentication,
        Kind::AuthorizationPolicy,
    ];

    /// The API group, "" for the core group.
    pub fn group(self) -> &'static str {
        match self {
            Kind::Service | Kind::Pod | Kind::Namespace | Kind::ConfigMap => "",
            Kind::EndpointSlice => "discovery.k8s.io",
            Kind::NetworkPolicy => "networking.k8s.io",
            Kind::HttpRoute => "gateway.networking.k8s.io",
            Kind::PeerAuthentication | Kind::AuthorizationPolicy => "security.istio.io",
        }
    }

    /// Whether objects of this kind live outside namespaces.
    pub fn cluster_scoped(self) -> bool {
        self == Kind::Namespace
    }

    /// The kind named `name` as kubectl accepts it: the kind (`Service`, any case), its
    /// plural (`services`) or its short name (`svc`).
    pub fn parse(name: &str) -> Option<Kind> {
        let lower = name.to_ascii_lowercase();
        Kind::ALL.into_iter().find(|kind| {
            let singular = kind.to_string().to_ascii_lowercase();
            let short = match kind {
                Kind::Service => "svc",
                Kind::Pod => "po",
                Kind::Namespace => "ns",
                Kind::NetworkPolicy => "netpol",
                Kind::ConfigMap => "cm",
                Kind::PeerAuthentication => "pa",
                Kind::AuthorizationPolicy | Kind::EndpointSlice | Kind::HttpRoute => "",
            };
            let plural = match singular.strip_suffix('y') {
                Some(stem) => format!("{stem}ies"),
                None => format!("{singular}s"),
            };
            lower == singular || lower == plural || (!short.is_empty() && lower == short)
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::EndpointSlice => "EndpointSlice",
            Kind::Namespace => "Namespace",
            Kind::NetworkPolicy => "NetworkPolicy",
            Kind::HttpRoute => "HTTPRoute",
            Kind::PeerAuthentication => "PeerAuthentication",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::ConfigMap => "ConfigMap",
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

/// A Service's `spec.selector`, when it has a non-empty one: as in Kubernetes, a
/// Service without one selects no Pod (its endpoints come from EndpointSlices only).
pub fn service_selector(svc: &Service) -> Option<&BTreeMap<String, String>> {
    (svc.spec.as_ref()?.selector.as_ref()).filter(|s| !s.is_empty())
}

/// Whether `labels` satisfy a label selector: every `matchLabels` pair and every
/// `matchExpressions` requirement holds (an empty selector matches everything).
/// Validation has kept operators to In, NotIn, Exists and DoesNotExist; an unknown one
/// matches nothing, so a bad selector can never widen what a policy allows.
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let pairs = selector.match_labels.iter().flatten();
    let matches_pairs = pairs.into_iter().all(|(k, v)| labels.get(k) == Some(v));
    matches_pairs
        && selector.match_expressions.iter().flatten().all(|req| {
            let value = labels.get(&req.key);
            let values = req.values.as_deref().unwrap_or_default();
            match req.operator.as_str() {
                "In" => value.is_some_and(|v| values.contains(v)),
                "NotIn" => value.is_none_or(|v| !values.contains(v)),
                "Exists" => value.is_some(),
                "DoesNotExist" => value.is_none(),
                _ => false,
            }
        })
}

/// An IP prefix, as in `ipBlock.cidr`: the address has no bits set past the prefix.
/// Orders IPv4 before IPv6, then by address and length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    /// Network address (host bits cleared).
    pub addr: IpAddr,
    /// Prefix length: 0..=32 for IPv4, 0..=128 for IPv6.
    pub len: u8,
}

impl Cidr {
    /// Parses `addr/len`. Host bits past the prefix are cleared, as Go's
    /// `net.ParseCIDR` (which the API server uses) does; IPv4-mapped IPv6 is refused
    /// because the datapath could not tell it from IPv4.
    pub fn parse(s: &str) -> Result<Self, String> {
        let (addr, len) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (address/length)"))?;
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("{s:?} is not a CIDR: bad address"))?;
        if let IpAddr::V6(v6) = addr
            && v6.to_ipv4_mapped().is_some()
        {
            return Err(format!("{s:?} is IPv4-mapped IPv6; use the IPv4 form"));
        }
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let len = len
            .parse::<u8>()
            .ok()
            .filter(|&l| l <= max && !len.starts_with('+'))
            .ok_or_else(|| format!("{s:?} is not a CIDR: prefix length must be 0-{max}"))?;
        Ok(Self::new(addr, len))
    }

    /// The prefix of length `len` containing `addr` (`len` at most the family's width).
    pub fn new(addr: IpAddr, len: u8) -> Self {
        let addr = match addr {
            IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u32::from(a) & mask).to_be_bytes())
            }
            IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(len)).unwrap_or(0);
                IpAddr::from((u128::from(a) & mask).to_be_bytes())
            }
        };
        Self { addr, len }
    }

    /// Whether `other` lies within this prefix (same family, at least as long).
    pub fn contains(&self, other: &Cidr) -> bool {
        self.addr.is_ipv4() == other.addr.is_ipv4()
            && other.len >= self.len
            && Cidr::new(other.addr, self.len) == *self
    }
}

impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}
