//! Workload security for the node proxy, compiled by the agent from Istio's APIs
//! (`security.istio.io/v1` PeerAuthentication and AuthorizationPolicy) with Istio
//! ambient semantics: which pods are in the mesh, their SPIFFE identities, the mTLS mode
//! each workload port requires, and the authorization policies that apply to each
//! workload.
//!
//! Everything that can be resolved without a request is: policy scoping (root
//! namespace, namespace, selector, targetRefs), PeerAuthentication precedence and
//! inheritance, ports as numbers, CIDRs as address and prefix length, `*` patterns as
//! their match kind. The proxy only evaluates (see `mesh-proxy`'s `authz`).

use std::{net::IpAddr, string::String, vec::Vec};

use serde::{Deserialize, Serialize};

use crate::l7::ObjectRef;

/// A pod of the mesh (enrolled in ambient mode), anywhere in the cluster: a node proxy
/// tells from it whether a destination address is in the mesh, and whose it is.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshEndpoint {
    /// One address of the pod (a dual-stack pod has one entry per address).
    pub addr: IpAddr,
    /// The node it runs on (`spec.nodeName`).
    pub node: String,
    /// Its SPIFFE identity, `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    pub identity: String,
    /// Its namespace (a metric label).
    #[serde(default)]
    pub namespace: String,
    /// Its workload name, as [`crate::l7::LocalPod::workload`] (a metric label).
    #[serde(default)]
    pub workload: String,
}

/// The security settings of one enrolled workload (pod).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkloadSecurity {
    /// The mTLS mode of the workload's ports, after PeerAuthentication precedence
    /// (workload > namespace > mesh, `UNSET` inheriting, default permissive).
    pub mtls: MtlsMode,
    /// Per container port overrides of [`WorkloadSecurity::mtls`]: the
    /// `portLevelMtls` of the workload's own policy, `UNSET` resolved to the workload's
    /// mode, sorted by port.
    pub port_mtls: Vec<PortMtls>,
    /// The AuthorizationPolicies that apply to the workload, by namespace and name.
    pub policies: Vec<AuthzPolicy>,
    /// Container ports served as HTTP (an L7 Service port, by HTTPRoute or
    /// `appProtocol`, targets them), sorted: AuthorizationPolicy is evaluated per
    /// request there, with its HTTP fields, as Istio does on HTTP ports.
    #[serde(default)]
    pub http_ports: Vec<u16>,
}

impl WorkloadSecurity {
    /// Whether the node proxy must see the workload's plaintext inbound connections:
    /// some port refuses them (STRICT), or an AuthorizationPolicy must judge them.
    /// Otherwise plaintext reaches the workload directly, as Istio's PERMISSIVE default
    /// lets it.
    pub fn judges_plaintext(&self) -> bool {
        self.mtls == MtlsMode::Strict
            || self.port_mtls.iter().any(|p| p.mode == MtlsMode::Strict)
            || !self.policies.is_empty()
    }
}

/// What a workload port accepts, as PeerAuthentication's `mtls.mode` (with `UNSET`
/// resolved by inheritance).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum MtlsMode {
    /// Plaintext only: the connection is not tunnelled.
    Disable,
    /// mTLS and plaintext alike (Istio's default).
    #[default]
    Permissive,
    /// mTLS only: plaintext connections are refused.
    Strict,
}

/// The mTLS mode of one container port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PortMtls {
    /// The container (target) port.
    pub port: u16,
    /// Its mode.
    pub mode: MtlsMode,
}

/// An AuthorizationPolicy, compiled.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzPolicy {
    /// The policy, for logs and reports.
    pub policy: ObjectRef,
    /// What a match does.
    pub action: AuthzAction,
    /// Any one matching makes the policy match. Empty: the policy matches nothing (an
    /// ALLOW policy without rules therefore denies everything it applies to).
    pub rules: Vec<AuthzRule>,
}

/// `spec.action`. CUSTOM (external authorization) is rejected by the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum AuthzAction {
    /// Requests must match one ALLOW policy, when any applies.
    Allow,
    /// A matching request is denied, whatever the ALLOW policies say.
    Deny,
    /// A matching request is marked as audited; the decision is unchanged.
    Audit,
}

/// One `rules[]` entry: every part that is given must match (an empty rule matches
/// every request).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AuthzRule {
    /// `from[].source`: any one matching. Empty: any source.
    pub from: Vec<Source>,
    /// `to[].operation`: any one matching. Empty: any operation.
    pub to: Vec<Operation>,
    /// `when[]`: all must match.
    pub when: Vec<Condition>,
}

/// Values a request attribute must (`values`) and must not (`not_values`) match. An
/// empty list sets no condition; a non-empty `values` needs one match, a non-empty
/// `not_values` needs none.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Matches<T> {
    /// One of these must match.
    pub values: Vec<T>,
    /// None of these may match.
    pub not_values: Vec<T>,
}

impl<T> Default for Matches<T> {
    fn default() -> Self {
        Self {
            values: Vec::new(),
            not_values: Vec::new(),
        }
    }
}

impl<T> Matches<T> {
    /// Whether it sets no condition at all.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty() && self.not_values.is_empty()
    }
}

/// `from[].source`: every field that is given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Source {
    /// `principals` / `notPrincipals`: the peer's identity without `spiffe://`.
    pub principals: Matches<Pattern>,
    /// `namespaces` / `notNamespaces`: the peer's namespace (from its identity).
    pub namespaces: Matches<Pattern>,
    /// `ipBlocks` / `notIpBlocks`: the connection's source address.
    pub ip_blocks: Matches<IpNet>,
    /// `remoteIpBlocks` / `notRemoteIpBlocks`: the original client address.
    pub remote_ip_blocks: Matches<IpNet>,
}

/// `to[].operation`: every field that is given must match. Hosts, methods and paths
/// are HTTP-only.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Operation {
    /// `hosts` / `notHosts`: the request's host (case-insensitive; a pattern without a
    /// port also matches the host with any port).
    pub hosts: Matches<Pattern>,
    /// `ports` / `notPorts`: the destination (container) port.
    pub ports: Matches<u16>,
    /// `methods` / `notMethods`.
    pub methods: Matches<Pattern>,
    /// `paths` / `notPaths`: the request path without its query string.
    pub paths: Matches<Pattern>,
}

impl Operation {
    /// Whether it has a field that only HTTP requests have.
    pub fn has_http_fields(&self) -> bool {
        !(self.hosts.is_empty() && self.methods.is_empty() && self.paths.is_empty())
    }
}

/// A `when[]` condition, by key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Condition {
    /// `source.principal`.
    SourcePrincipal(Matches<Pattern>),
    /// `source.namespace`.
    SourceNamespace(Matches<Pattern>),
    /// `source.ip`.
    SourceIp(Matches<IpNet>),
    /// `remote.ip`.
    RemoteIp(Matches<IpNet>),
    /// `destination.ip`.
    DestinationIp(Matches<IpNet>),
    /// `destination.port`.
    DestinationPort(Matches<u16>),
    /// `request.headers[name]` (HTTP-only).
    RequestHeader {
        /// The header name, lowercase.
        name: String,
        /// Conditions on its value.
        matches: Matches<Pattern>,
    },
}

impl Condition {
    /// Whether it is about something only HTTP requests have.
    pub fn is_http(&self) -> bool {
        matches!(self, Condition::RequestHeader { .. })
    }
}

/// An Istio string match: `*` (any value, but one must be present), `abc*` (prefix),
/// `*abc` (suffix), anything else exact.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Pattern {
    /// `*`.
    Any,
    /// Equal to this.
    Exact(String),
    /// `abc*`: starts with this.
    Prefix(String),
    /// `*abc`: ends with this.
    Suffix(String),
}

impl Pattern {
    /// The pattern Istio reads in `value`.
    pub fn parse(value: &str) -> Self {
        if value == "*" {
            Pattern::Any
        } else if let Some(prefix) = value.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else if let Some(suffix) = value.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else {
            Pattern::Exact(value.into())
        }
    }

    /// Whether `value` matches, comparing exactly.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == s,
            Pattern::Prefix(s) => value.starts_with(s.as_str()),
            Pattern::Suffix(s) => value.ends_with(s.as_str()),
        }
    }

    /// Whether `value` matches, ignoring ASCII case.
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        let (v, len) = (value.as_bytes(), value.len());
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value.eq_ignore_ascii_case(s),
            Pattern::Prefix(s) => len >= s.len() && v[..s.len()].eq_ignore_ascii_case(s.as_bytes()),
            Pattern::Suffix(s) => {
                len >= s.len() && v[len - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// An IP prefix (an `ipBlocks` entry: an address is a full-length prefix).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpNet {
    /// The network address (host bits cleared).
    pub addr: IpAddr,
    /// The prefix length: up to 32 for IPv4, 128 for IPv6.
    pub prefix: u8,
}

impl IpNet {
    /// Whether `ip` is inside. An IPv4-mapped IPv6 address counts as its IPv4 address,
    /// since dual-stack sockets report IPv4 peers that way.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(ip) & mask == u32::from(net)
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(ip) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_follow_istio() {
        assert_eq!(Pattern::parse("*"), Pattern::Any);
        assert_eq!(Pattern::parse("/api/*"), Pattern::Prefix("/api/".into()));
        assert_eq!(Pattern::parse("*.svc"), Pattern::Suffix(".svc".into()));
        // A `*` inside the value is a literal, as in Istio.
        assert_eq!(Pattern::parse("a*b"), Pattern::Exact("a*b".into()));
        assert!(Pattern::parse("*.Example.com").matches_ignore_case("web.example.COM"));
        assert!(!Pattern::parse("*.example.com").matches_ignore_case("com"));
        assert!(Pattern::parse("WEB*").matches_ignore_case("web.shop"));
        assert!(!Pattern::parse("GET").matches("get"));
    }

    #[test]
    fn ip_nets_contain_mapped_addresses() {
        let net = IpNet {
            addr: "10.1.0.0".parse().unwrap(),
            prefix: 16,
        };
        assert!(net.contains("10.1.2.3".parse().unwrap()));
        assert!(net.contains("::ffff:10.1.2.3".parse().unwrap()));
        assert!(!net.contains("10.2.0.1".parse().unwrap()));
        let all = IpNet {
            addr: "::".parse().unwrap(),
            prefix: 0,
        };
        assert!(all.contains("fd00::1".parse().unwrap()));
        assert!(!all.contains("10.0.0.1".parse().unwrap()));
    }
}
