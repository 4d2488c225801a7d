//! The node proxy's configuration: what the agent compiles from the cluster state and
//! streams to `mesh-proxy` (admin API `GET /v1/proxy/config`, one JSON snapshot per
//! line). Every snapshot is complete; the proxy swaps it in whole, so it never serves a
//! half-applied state, and it keeps the last one while the agent is away.
//!
//! Everything here is resolved by the agent: routes are attached, merged and sorted by
//! Gateway API precedence, durations are milliseconds, backend Services are expanded to
//! their endpoints. The proxy only matches and forwards.

use std::{net::IpAddr, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

use crate::security::{MeshEndpoint, WorkloadSecurity};
pub use crate::service::{HBONE_PORT, PROXY_OUTBOUND_PORT};

/// Where the node proxy reports the connections and requests it refused to the agent's
/// admin socket (`POST`, one [`ProxyFlow`] JSON object per line), for the agent's flow
/// log (`mesh-agent observe`).
pub const PROXY_FLOWS_PATH: &str = "/v1/proxy/flows";

/// A connection or request the node proxy refused.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProxyFlow {
    /// When, in nanoseconds since the Unix epoch.
    pub time_unix_ns: u64,
    /// The client's address and port (the tunnel's source).
    pub src: std::net::SocketAddr,
    /// The server pod's address and the port the client asked for.
    pub dst: std::net::SocketAddr,
    /// The client's proven SPIFFE identity.
    pub source_principal: Option<String>,
    /// The server pod's SPIFFE identity.
    pub destination_principal: Option<String>,
    /// What refused it.
    pub denial: ProxyDenial,
    /// The AuthorizationPolicy that decided (`namespace/name`), when one did.
    pub policy: Option<String>,
}

/// What refused a [`ProxyFlow`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum ProxyDenial {
    /// The server pod's ingress NetworkPolicy, for the stream's port.
    NetworkPolicy,
    /// An AuthorizationPolicy of the server pod.
    Authorization,
}

/// File in the node's run directory (`<run-dir>/<node>/`) where the node proxy lists
/// its workload certificates for `mesh-agent certs`: JSON, identities, serials,
/// validity and chain subjects, never keys.
pub const CERTS_FILE: &str = "certs.json";

/// One complete configuration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProxyConfig {
    /// Increases with every snapshot the agent makes (restarts from 1 with the agent).
    pub version: u64,
    /// The node this configuration is for.
    pub node: String,
    /// The pods on this node: the proxy listens inside each one's network namespace.
    pub pods: Vec<LocalPod>,
    /// The L7 frontends (Service cluster IP and port): connections redirected to the
    /// proxy with one of these as original destination are served by its route table.
    pub frontends: Vec<Frontend>,
    /// Every Service port a route or frontend sends traffic to, with its endpoints.
    pub services: Vec<ServiceTarget>,
    /// Changes whenever the network policy the kernel enforces on this node changes.
    /// Policy judges a connection when it is made, so the proxy then stops reusing the
    /// backend connections it pooled under the old policy.
    #[serde(default)]
    pub policy_epoch: u64,
    /// The mesh's SPIFFE trust domain (`--trust-domain`, else MeshConfig
    /// `trustDomain`, else `cluster.local`).
    #[serde(default)]
    pub trust_domain: String,
    /// Every pod of the mesh in the cluster (Istio ambient enrollment), by address:
    /// which destinations are in the mesh, on which node, with which identity.
    #[serde(default)]
    pub mesh: Vec<MeshEndpoint>,
}

/// Namespace and name of an object.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ObjectRef {
    /// `metadata.namespace`.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
}

/// A pod on this node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LocalPod {
    /// The pod.
    pub pod: ObjectRef,
    /// Its workload name (label `app.kubernetes.io/name`, else `app`, else the pod
    /// name), for `source_workload`.
    pub workload: String,
    /// Its addresses (status.podIPs).
    pub addrs: Vec<IpAddr>,
    /// Where to find its network namespace.
    pub netns: NetnsRef,
    /// Its SPIFFE identity when it is in the mesh (see [`ProxyConfig::mesh`]).
    #[serde(default)]
    pub identity: Option<String>,
    /// Its mTLS modes and authorization policies when it is in the mesh.
    #[serde(default)]
    pub security: Option<WorkloadSecurity>,
}

/// A network namespace, found through a process that lives in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetnsRef {
    /// A process in the namespace: open `/proc/<pid>/ns/net`.
    pub pid: u32,
    /// The namespace's inode (`net:[inode]`); the opened file must have it, else the
    /// process exited and its pid was reused.
    pub inode: u64,
    /// The namespace's cookie (SO_NETNS_COOKIE), as the kernel hooks see it.
    pub cookie: u64,
}

/// The protocol a Service port speaks, from its `appProtocol` (or HTTP when only an
/// HTTPRoute makes it L7).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AppProtocol {
    /// `http`, or no appProtocol: HTTP/1.1, or HTTP/2 with prior knowledge when the
    /// client opens with the h2 preface; the backend is spoken to as the client spoke.
    #[default]
    Http,
    /// `kubernetes.io/h2c`: HTTP/2 prior knowledge on both sides.
    H2c,
    /// `grpc`: HTTP/2 prior knowledge on both sides, gRPC status in metrics.
    Grpc,
}

/// An L7 frontend: a Service cluster IP and port whose connections the proxy serves.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Frontend {
    /// The cluster IP.
    pub addr: IpAddr,
    /// The Service port.
    pub port: u16,
    /// The Service.
    pub service: ObjectRef,
    /// What the port speaks.
    pub protocol: AppProtocol,
    /// The attached routes, compiled. `None`: no HTTPRoute is attached, every request
    /// goes to the Service itself (its [`ServiceTarget`] for `port`). `Some`: a request
    /// matching no rule gets 404.
    pub routes: Option<RouteTable>,
}

/// The merged rules of every HTTPRoute attached to one Service port.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteTable {
    /// Every match of every rule, in Gateway API precedence order: the first that
    /// matches a request selects its rule.
    pub matches: Vec<RouteMatch>,
    /// The rules, indexed by [`RouteMatch::rule`].
    pub rules: Vec<Rule>,
}

/// One `matches[]` entry of a rule (a rule without matches has one: path prefix `/`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RouteMatch {
    /// The path condition.
    pub path: PathMatch,
    /// Header conditions, all of which must hold; names are lowercase.
    pub headers: Vec<HeaderMatch>,
    /// Query parameter conditions, all of which must hold; names are exact (case
    /// sensitive), the first value of a repeated parameter is the one compared.
    pub query_params: Vec<HeaderMatch>,
    /// The method, when the match names one.
    pub method: Option<String>,
    /// Index into [`RouteTable::rules`].
    pub rule: u32,
}

/// How a request path is matched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathMatch {
    /// The path equals this.
    Exact(String),
    /// The path's `/`-separated elements start with this prefix's elements (`/foo`
    /// matches `/foo` and `/foo/bar`, not `/foobar`); a trailing `/` is ignored.
    PathPrefix(String),
    /// The whole path matches this regular expression (RE2 syntax, anchored).
    RegularExpression(String),
}

/// A named condition on a header or a query parameter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderMatch {
    /// Header name (lowercase) or query parameter name.
    pub name: String,
    /// The condition on its value.
    pub value: StringMatch,
}

/// A condition on a value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum StringMatch {
    /// Equals this.
    Exact(String),
    /// Wholly matches this regular expression (anchored).
    RegularExpression(String),
}

/// One rule of one HTTPRoute.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// The HTTPRoute it comes from.
    pub route: ObjectRef,
    /// Its index in that route's `spec.rules`.
    pub index: u32,
    /// The rule's filters, applied in order.
    pub filters: Vec<Filter>,
    /// Weighted backends. Empty (or all weights 0, or a RequestRedirect filter): no
    /// backend; without a redirect the answer is 500.
    pub backends: Vec<WeightedBackend>,
    /// Timeouts.
    pub timeouts: Timeouts,
    /// Retries; `None`: none.
    pub retry: Option<RetryPolicy>,
}

/// A backendRef with its weight.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WeightedBackend {
    /// Relative weight; 0 gets no traffic.
    pub weight: u32,
    /// Where its share goes.
    pub target: BackendTarget,
    /// Filters of this backendRef, applied after the rule's.
    pub filters: Vec<Filter>,
}

/// Where a backendRef points.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum BackendTarget {
    /// A Service port: look it up in [`ProxyConfig::services`].
    Service(ServicePortRef),
    /// An unresolvable reference (Service missing, port missing, unsupported kind):
    /// requests given to it are answered 500. The reason is the route's ResolvedRefs
    /// reason.
    Invalid {
        /// E.g. `BackendNotFound`.
        reason: String,
    },
}

/// A Service port.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ServicePortRef {
    /// The Service.
    pub service: ObjectRef,
    /// The Service port number.
    pub port: u16,
}

/// An HTTPRoute filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Filter {
    /// Edits the request's headers before it is forwarded.
    RequestHeaderModifier(HeaderModifier),
    /// Edits the response's headers before it is returned.
    ResponseHeaderModifier(HeaderModifier),
    /// Answers with a redirect instead of forwarding.
    RequestRedirect(Redirect),
    /// Rewrites host and path before forwarding.
    UrlRewrite(Rewrite),
    /// Sends a copy of the request to another backend, and ignores its answer.
    RequestMirror(Mirror),
}

/// Header edits, applied in the order set, add, remove.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HeaderModifier {
    /// Replace (or add) these headers.
    pub set: Vec<(String, String)>,
    /// Append these values (keeping existing ones).
    pub add: Vec<(String, String)>,
    /// Remove these headers (lowercase names).
    pub remove: Vec<String>,
}

/// A RequestRedirect filter: absent fields keep the request's value.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Redirect {
    /// `http` or `https`.
    pub scheme: Option<String>,
    /// New host name.
    pub hostname: Option<String>,
    /// New port. When absent, the scheme's well-known port is used if the scheme
    /// changed, else the request's port (and a well-known port is left out of Location).
    pub port: Option<u16>,
    /// New path.
    pub path: Option<PathModifier>,
    /// 301 or 302 (default 302).
    pub status: u16,
}

/// A URLRewrite filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Rewrite {
    /// New `Host` / `:authority`.
    pub hostname: Option<String>,
    /// New path.
    pub path: Option<PathModifier>,
}

/// A path change.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum PathModifier {
    /// The whole path becomes this (the query string is kept).
    ReplaceFullPath(String),
    /// The matched PathPrefix is replaced by this (only with a PathPrefix match).
    ReplacePrefixMatch(String),
}

/// A RequestMirror filter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Mirror {
    /// Where the copy goes.
    pub target: BackendTarget,
    /// Share of requests mirrored, in parts per million (1_000_000 = all).
    pub fraction_ppm: u32,
}

/// Gateway API timeouts, in milliseconds; `None` or 0 is no timeout.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// From the request's arrival to the end of the response headers, retries included.
    pub request_ms: Option<u64>,
    /// For each attempt at a backend.
    pub backend_request_ms: Option<u64>,
}

/// HTTPRoute `retry`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RetryPolicy {
    /// Retries after the first attempt.
    pub attempts: u32,
    /// Response codes that are retried (connect failures and resets always are).
    pub codes: Vec<u16>,
    /// Delay before the first retry, doubled for each further one (with jitter).
    pub backoff_ms: u64,
}

/// A Service port with its endpoints: where the proxy sends requests.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceTarget {
    /// The Service port.
    pub target: ServicePortRef,
    /// What the port speaks.
    pub protocol: AppProtocol,
    /// `<name>.<namespace>.svc.cluster.local`, for `destination_service`.
    pub host: String,
    /// Ready endpoints (serving and not terminating), deduplicated.
    pub endpoints: Vec<Endpoint>,
    /// The Service's resilience settings (annotations).
    pub resilience: Resilience,
}

/// One endpoint of a Service port.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Endpoint {
    /// Pod address.
    pub addr: IpAddr,
    /// Target port.
    pub port: u16,
    /// The pod behind it, when known.
    pub pod: Option<ObjectRef>,
    /// Its workload name (as [`LocalPod::workload`]), `unknown` when no pod is known.
    pub workload: String,
}

/// Per-Service resilience settings, from the Service's `mesh.io/*` annotations (see
/// the README); the defaults are those an annotation-free Service gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    /// Circuit breaker: most connections open to all endpoints together.
    pub max_connections: u32,
    /// Circuit breaker: most requests waiting for a connection.
    pub max_pending_requests: u32,
    /// Most requests sent over one backend connection before it is closed (0: no limit).
    pub max_requests_per_connection: u32,
    /// Outlier ejection after this many consecutive 5xx answers (0: never).
    pub consecutive_5xx: u32,
    /// Outlier ejection after this many consecutive connect failures (0: never).
    pub consecutive_connect_failures: u32,
    /// First ejection time; the n-th ejection of the same endpoint lasts n times this.
    pub base_ejection_ms: u64,
    /// At most this share (percent) of a Service's endpoints are ejected at once.
    pub max_ejection_percent: u32,
    /// Retry budget: retries may add at most this percentage of the requests...
    pub retry_budget_percent: u32,
    /// ...plus this many retries per second.
    pub retry_budget_min_per_sec: u32,
}

impl Default for Resilience {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests_per_connection: 0,
            consecutive_5xx: 5,
            consecutive_connect_failures: 5,
            base_ejection_ms: 30_000,
            max_ejection_percent: 50,
            retry_budget_percent: 20,
            retry_budget_min_per_sec: 10,
        }
    }
}
