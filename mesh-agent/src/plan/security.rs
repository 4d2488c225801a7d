//! Istio ambient security, compiled for the node proxy: which pods are in the mesh,
//! their SPIFFE identities, the mTLS mode PeerAuthentications give each workload, and
//! the AuthorizationPolicies that apply to it ([`mesh_common::security`]).
//!
//! Pure: State in, compiled settings out, sorted, so equal inputs give equal snapshots.
//! The semantics are Istio's:
//!
//! - A pod is in the mesh when its namespace is labelled `istio.io/dataplane-mode:
//!   ambient` and the pod is not labelled `istio.io/dataplane-mode: none`, or when the
//!   pod itself is labelled `ambient` ([`State::enrolled`], which the kernel's mesh
//!   flags follow too, so proxy and kernel agree on who is in the mesh).
//! - Identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
//! - PeerAuthentication: the workload's own policy (selector) over its namespace's
//!   (no selector) over the mesh's (no selector, root namespace); `UNSET` inherits from
//!   the next level, the default is PERMISSIVE; among several at one level the oldest
//!   (creation time, then name) wins; `portLevelMtls` overrides per container port.
//! - AuthorizationPolicy: a policy applies to the workloads of its namespace (all of
//!   them without selector or targetRefs, those its selector matches, or the pods of the
//!   Services its targetRefs name), or to the whole mesh from the root namespace.

use std::collections::BTreeMap;
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service};
use mesh_common::security::{
    AuthzAction, AuthzPolicy, AuthzRule, Condition, IpNet, Matches, MeshEndpoint, MtlsMode,
    Operation, Pattern, PortMtls, Source, WorkloadSecurity,
};

use super::routes::object_ref;
use crate::state::istio::{
    AuthorizationPolicy, AuthzCondition, AuthzOperation, AuthzSource, DEFAULT_ROOT_NAMESPACE,
    DEFAULT_TRUST_DOMAIN, PeerAuthentication, PeerMtls, WorkloadSelector, header_name,
    parse_ip_block, parse_port,
};
use crate::state::{ObjectKey, State, pod_ips, service_selector};

/// The mesh's security settings for one state, ready to be asked per pod.
pub struct MeshSecurity<'a> {
    state: &'a State,
    trust_domain: String,
    root_namespace: String,
    /// Every AuthorizationPolicy, compiled once.
    policies: Vec<(&'a ObjectKey, &'a AuthorizationPolicy, AuthzPolicy)>,
}

impl<'a> MeshSecurity<'a> {
    /// The settings of `state`. `trust_domain` (the agent's `--trust-domain`) wins over
    /// MeshConfig's `trustDomain`, which wins over `cluster.local`.
    pub fn new(state: &'a State, trust_domain: Option<&str>) -> Self {
        let mesh = state.mesh_config();
        let trust_domain = trust_domain
            .map(str::to_owned)
            .or(mesh.trust_domain)
            .unwrap_or_else(|| DEFAULT_TRUST_DOMAIN.to_owned());
        let root_namespace = mesh
            .root_namespace
            .unwrap_or_else(|| DEFAULT_ROOT_NAMESPACE.to_owned());
        let policies = state
            .authorization_policies()
            .map(|(key, policy)| (key, policy, compile_policy(key, policy)))
            .collect();
        Self {
            state,
            trust_domain,
            root_namespace,
            policies,
        }
    }

    /// The trust domain in force.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The pod's SPIFFE identity (whether or not it is enrolled).
    pub fn identity(&self, key: &ObjectKey, pod: &Pod) -> String {
        let spec = pod.spec.as_ref();
        let account = spec
            .and_then(|s| s.service_account_name.as_deref())
            // The deprecated alias, still set by older manifests.
            .or_else(|| spec.and_then(|s| s.service_account.as_deref()))
            .filter(|sa| !sa.is_empty())
            .unwrap_or("default");
        format!(
            "spiffe://{}/ns/{}/sa/{account}",
            self.trust_domain, key.namespace
        )
    }

    /// The identity and security settings of an enrolled pod; `None` when it is not in
    /// the mesh.
    pub fn workload(&self, key: &ObjectKey, pod: &Pod) -> Option<(String, WorkloadSecurity)> {
        if !self.state.enrolled(key, pod) {
            return None;
        }
        let labels = pod.metadata.labels.clone().unwrap_or_default();
        let (mtls, port_mtls) = self.peer_authentication(&key.namespace, &labels);
        let policies = self
            .policies
            .iter()
            .filter(|(pkey, policy, _)| self.applies(pkey, policy, &key.namespace, &labels))
            .map(|(_, _, compiled)| compiled.clone())
            .collect();
        // HTTP ports come from the L7 Service ports, known to the proxy configuration.
        let security = WorkloadSecurity {
            mtls,
            port_mtls,
            policies,
            http_ports: Vec::new(),
        };
        Some((self.identity(key, pod), security))
    }

    /// Every enrolled pod's addresses, sorted by address. Finished pods are left out
    /// (their addresses are free for new pods), and so is an address that several
    /// enrolled pods claim: guessing would give a destination the wrong identity.
    pub fn mesh_endpoints(&self) -> Vec<MeshEndpoint> {
        let mut by_addr: BTreeMap<IpAddr, Vec<MeshEndpoint>> = BTreeMap::new();
        for (key, pod) in self.state.pods() {
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            if matches!(phase, Some("Succeeded" | "Failed")) || !self.state.enrolled(key, pod) {
                continue;
            }
            let node = pod.spec.as_ref().and_then(|s| s.node_name.clone());
            let identity = self.identity(key, pod);
            for addr in pod_ips(pod) {
                by_addr.entry(addr).or_default().push(MeshEndpoint {
                    addr,
                    node: node.clone().unwrap_or_default(),
                    identity: identity.clone(),
                    namespace: key.namespace.clone(),
                    workload: super::proxy::workload(pod, &key.name),
                });
            }
        }
        by_addr
            .into_values()
            .filter_map(|mut claims| (claims.len() == 1).then(|| claims.remove(0)))
            .collect()
    }

    /// The workload's mode and its per-port modes, by Istio's precedence.
    fn peer_authentication(
        &self,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> (MtlsMode, Vec<PortMtls>) {
        let all = self.state.peer_authentications();
        let in_ns = |ns: &str| {
            let ns = ns.to_owned();
            self.state
                .peer_authentications()
                .filter(move |(k, _)| k.namespace == ns)
        };
        let wide = |pa: &&PeerAuthentication| selector_labels(pa.spec.selector.as_ref()).is_none();
        let mesh = oldest(in_ns(&self.root_namespace).filter(|(_, pa)| wide(pa)));
        let namespace_wide = oldest(in_ns(namespace).filter(|(_, pa)| wide(pa)));
        let workload = oldest(all.filter(|(k, pa)| {
            k.namespace == namespace
                && selector_labels(pa.spec.selector.as_ref())
                    .is_some_and(|sel| selector_matches(sel, labels))
        }));
        let mut mode = MtlsMode::Permissive;
        for pa in [mesh, namespace_wide, workload].into_iter().flatten() {
            if let Some(m) = pa.spec.mtls.as_ref().and_then(mode_of) {
                mode = m;
            }
        }
        let port_mtls = workload
            .iter()
            .flat_map(|pa| &pa.spec.port_level_mtls)
            .filter_map(|(port, mtls)| {
                Some(PortMtls {
                    port: parse_port(port)?,
                    mode: mode_of(mtls).unwrap_or(mode),
                })
            })
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        (mode, port_mtls)
    }

    /// Whether the policy `key` applies to a workload of `namespace` with `labels`.
    fn applies(
        &self,
        key: &ObjectKey,
        policy: &AuthorizationPolicy,
        namespace: &str,
        labels: &BTreeMap<String, String>,
    ) -> bool {
        if key.namespace != namespace && key.namespace != self.root_namespace {
            return false;
        }
        let spec = &policy.spec;
        if let Some(selector) = selector_labels(spec.selector.as_ref()) {
            return selector_matches(selector, labels);
        }
        let mut refs = spec.target_ref.iter().chain(&spec.target_refs).peekable();
        if refs.peek().is_none() {
            return true;
        }
        // Gateway targets are the Gateway's controller's business (see the loader's
        // warning): they select no pod here.
        refs.filter(|r| r.kind == "Service" && r.group.as_deref().unwrap_or_default().is_empty())
            .any(|r| {
                let service = ObjectKey {
                    namespace: key.namespace.clone(),
                    name: r.name.clone(),
                };
                service.namespace == namespace
                    && self
                        .state
                        .service(&service)
                        .is_some_and(|svc| service_selects(svc, labels))
            })
    }
}

/// A Service's `spec.selector` matches the labels; a Service without one selects no pod.
fn service_selects(svc: &Service, labels: &BTreeMap<String, String>) -> bool {
    service_selector(svc).is_some_and(|sel| selector_matches(sel, labels))
}

/// A selector's labels; `None` when it has none (Istio treats an empty selector as no
/// selector).
fn selector_labels(selector: Option<&WorkloadSelector>) -> Option<&BTreeMap<String, String>> {
    selector
        .map(|s| &s.match_labels)
        .filter(|labels| !labels.is_empty())
}

fn selector_matches(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The policy Istio picks among several at one level: the oldest, then by name.
fn oldest<'s>(
    candidates: impl Iterator<Item = (&'s ObjectKey, &'s PeerAuthentication)>,
) -> Option<&'s PeerAuthentication> {
    candidates
        .min_by(|(ka, a), (kb, b)| {
            let created = |pa: &PeerAuthentication| pa.metadata.creation_timestamp.clone();
            created(a).cmp(&created(b)).then_with(|| ka.cmp(kb))
        })
        .map(|(_, pa)| pa)
}

/// A mode that decides; `None` for UNSET (or absent), which inherits. Validation has
/// kept values to Istio's four.
fn mode_of(mtls: &PeerMtls) -> Option<MtlsMode> {
    match mtls.mode.as_deref()? {
        "DISABLE" => Some(MtlsMode::Disable),
        "PERMISSIVE" => Some(MtlsMode::Permissive),
        "STRICT" => Some(MtlsMode::Strict),
        _ => None,
    }
}

/// Compiles a validated policy. CUSTOM never gets here: validation refuses it.
fn compile_policy(key: &ObjectKey, policy: &AuthorizationPolicy) -> AuthzPolicy {
    let spec = &policy.spec;
    let action = match spec.action.as_deref() {
        Some("DENY") => AuthzAction::Deny,
        Some("AUDIT") => AuthzAction::Audit,
        _ => AuthzAction::Allow,
    };
    let rules = spec
        .rules
        .iter()
        .flatten()
        .map(|rule| AuthzRule {
            from: rule
                .from
                .iter()
                .flatten()
                .filter_map(|f| f.source.as_ref())
                .map(compile_source)
                .collect(),
            to: rule
                .to
                .iter()
                .flatten()
                .filter_map(|t| t.operation.as_ref())
                .map(compile_operation)
                .collect(),
            when: rule.when.iter().filter_map(compile_condition).collect(),
        })
        .collect();
    AuthzPolicy {
        policy: object_ref(key),
        action,
        rules,
    }
}

fn compile_source(s: &AuthzSource) -> Source {
    Source {
        principals: patterns(&s.principals, &s.not_principals),
        namespaces: patterns(&s.namespaces, &s.not_namespaces),
        ip_blocks: ip_nets(&s.ip_blocks, &s.not_ip_blocks),
        remote_ip_blocks: ip_nets(&s.remote_ip_blocks, &s.not_remote_ip_blocks),
    }
}

fn compile_operation(o: &AuthzOperation) -> Operation {
    Operation {
        hosts: patterns(&o.hosts, &o.not_hosts),
        ports: ports(&o.ports, &o.not_ports),
        methods: patterns(&o.methods, &o.not_methods),
        paths: patterns(&o.paths, &o.not_paths),
    }
}

/// A validated condition; `None` only for keys validation refuses.
fn compile_condition(c: &AuthzCondition) -> Option<Condition> {
    let (values, not) = (&c.values, &c.not_values);
    Some(match c.key.as_str() {
        "source.principal" => Condition::SourcePrincipal(patterns(values, not)),
        "source.namespace" => Condition::SourceNamespace(patterns(values, not)),
        "source.ip" => Condition::SourceIp(ip_nets(values, not)),
        "remote.ip" => Condition::RemoteIp(ip_nets(values, not)),
        "destination.ip" => Condition::DestinationIp(ip_nets(values, not)),
        "destination.port" => Condition::DestinationPort(ports(values, not)),
        key => Condition::RequestHeader {
            name: header_name(key)?.to_ascii_lowercase(),
            matches: patterns(values, not),
        },
    })
}

fn patterns(values: &[String], not: &[String]) -> Matches<Pattern> {
    let parse = |v: &[String]| v.iter().map(|s| Pattern::parse(s)).collect();
    Matches {
        values: parse(values),
        not_values: parse(not),
    }
}

fn ip_nets(values: &[String], not: &[String]) -> Matches<IpNet> {
    let parse = |v: &[String]| {
        v.iter()
            .filter_map(|s| parse_ip_block(s).ok())
            .map(|c| IpNet {
                addr: c.addr,
                prefix: c.len,
            })
            .collect()
    };
    Matches {
        values: parse(values),
        not_values: parse(not),
    }
}

fn ports(values: &[String], not: &[String]) -> Matches<u16> {
    let parse = |v: &[String]| v.iter().filter_map(|s| parse_port(s)).collect();
    Matches {
        values: parse(values),
        not_values: parse(not),
    }
}

#[cfg(test)]
mod tests;
