//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) → ENDPOINTS, IPCACHE and POLICY
//! entries (see [`mesh_common::policy`] for the tables and the datapath's decision
//! order). Pure: unit-tested without root.
//!
//! Semantics, as Kubernetes defines them:
//! - A pod is isolated for a direction iff a policy of its namespace selects it
//!   (`podSelector`, absent or empty = every pod of the namespace) and has that
//!   direction in `policyTypes`. Absent or empty `policyTypes` defaults, as the API
//!   server does, to Ingress, plus Egress when `spec.egress` is non-empty.
//! - Isolated: the isolation marker plus one allow entry per (peer identity, protocol,
//!   port prefix) some rule allows; rules and policies are additive.
//! - A rule without peers allows every peer ([`IDENTITY_ANY`], world included); without
//!   ports, every protocol and port. A peer's `podSelector` alone picks pods of the
//!   policy's namespace, `namespaceSelector` alone every pod of the matching
//!   namespaces, both together the matching pods of the matching namespaces.
//! - Named ports resolve, per protocol, against the container ports of the subject's
//!   local pods (ingress) or of each peer's pods (egress; with no peers, of every pod).
//!   A name no pod declares allows nothing.
//! - `endPort` ranges become aligned power-of-two port prefixes.
//!
//! Pods are identified by namespace and labels; policies only see those, so pods that
//! share them share an identity. Host-network pods are left out (their address is the
//! node's, and NetworkPolicy does not apply to them), and so are finished pods (phase
//! Succeeded or Failed), whose addresses may already belong to new pods.
//!
//! ipBlock: the datapath resolves a peer address to an identity by longest-prefix match
//! in IPCACHE, where every pod address is a /32 or /128. So a pod address always
//! resolves to its pod's identity, and ipBlocks only match addresses that are not pods
//! (as in Cilium; Kubernetes means ipBlock for cluster-external addresses). Every
//! distinct prefix of any `cidr` or `except` gets a CIDR identity and an IPCACHE entry,
//! and a block {cidr C, except E} allows the identity of each such prefix P with P ⊆ C
//! and P ⊄ e for all e ∈ E. Addresses no prefix covers miss IPCACHE, which the datapath
//! reads as [`IDENTITY_WORLD`]; only peer-less rules (peer ANY) allow those.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_common::Addr;
use mesh_common::maps;
use mesh_common::policy::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_NO_SOCKMAP, EndpointValue, IDENTITY_ANY, IDENTITY_HOST,
    IDENTITY_WORLD, IPCACHE_REDIRECT, IpcacheKey, IpcacheValue, POLICY_ALLOW, POLICY_FIXED_PREFIX,
    POLICY_ISOLATED, PolicyKey, PolicyValue,
};

use super::PlanError;
pub use super::identity::{IdentityIds, IdentityKey};
use crate::state::{Cidr, ObjectKey, State, pod_ips, protocol, selector_matches};

/// What a policy plan depends on besides the cluster state.
#[derive(Clone, Copy, Debug)]
pub struct PolicyContext<'a> {
    /// This agent's node name, as Pods' `spec.nodeName` gives it: its pods are the
    /// local ones, the only subjects of POLICY entries.
    pub node: &'a str,
    /// Local pod address → network namespace cookie, as the agent discovered them.
    pub local_netns: &'a BTreeMap<IpAddr, u64>,
    /// The node's own addresses: host identity, which ingress policy always lets in.
    pub node_addrs: &'a [IpAddr],
    /// Entries the policy maps hold.
    pub capacities: PolicyCapacities,
}

/// Entries the policy maps hold, as the datapath created them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PolicyCapacities {
    /// ENDPOINTS: local network namespaces.
    pub endpoints: u32,
    /// IPCACHE: pod addresses and ipBlock prefixes.
    pub ipcache: u32,
    /// POLICY: markers and allow entries of the local subjects.
    pub policy: u32,
}

impl Default for PolicyCapacities {
    /// The default map sizes of [`mesh_common::maps`].
    fn default() -> Self {
        Self {
            endpoints: maps::spec(maps::ENDPOINTS).capacity,
            ipcache: maps::spec(maps::IPCACHE).capacity,
            policy: maps::spec(maps::POLICY).capacity,
        }
    }
}

/// Desired contents of the ENDPOINTS, IPCACHE and POLICY maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PolicyPlan {
    /// Netns cookie → identity, for the local pods found in
    /// [`PolicyContext::local_netns`] by any of their addresses.
    pub endpoints: BTreeMap<u64, EndpointValue>,
    /// Every pod address of the cluster (/32, /128) → its pod identity, and every
    /// ipBlock prefix → its CIDR identity (a pod address wins over an equal prefix).
    /// When an IPv6 prefix covers the IPv4-mapped range, `::ffff:0:0/96` →
    /// [`IDENTITY_WORLD`] keeps IPv4 addresses out of it.
    pub ipcache: BTreeMap<IpcacheKey, IpcacheValue>,
    /// Isolation markers and allow entries whose subjects are identities of local pods.
    /// Where several rules produce one key, flags are or-ed and the first policy (in
    /// [`PolicyPlan::policies`] order) names the entry.
    pub policy: BTreeMap<PolicyKey, PolicyValue>,
    /// Every identity, by id.
    pub identities: Vec<IdentityInfo>,
    /// Every NetworkPolicy, ordered by namespace and name; `policies[i].id == i`.
    pub policies: Vec<PolicyInfo>,
}

/// An identity as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdentityInfo {
    /// Identity number in the maps.
    pub id: u32,
    /// Namespace and labels, or the prefix.
    pub key: IdentityKey,
    /// The pods that have it (none for CIDR identities).
    pub pods: Vec<ObjectKey>,
}

impl fmt::Display for IdentityInfo {
    /// `256 shop {app=web}: shop/web-1, shop/web-2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.id, self.key)?;
        for (i, pod) in self.pods.iter().enumerate() {
            f.write_str(if i == 0 { ": " } else { ", " })?;
            write!(f, "{pod}")?;
        }
        Ok(())
    }
}

/// A NetworkPolicy as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PolicyInfo {
    /// [`PolicyValue::policy_id`] of the entries it produced.
    pub id: u32,
    /// The NetworkPolicy.
    pub policy: ObjectKey,
    /// It isolates the pods it selects for ingress.
    pub ingress: bool,
    /// It isolates the pods it selects for egress.
    pub egress: bool,
    /// The pods it selects, cluster-wide (not only local ones), by namespace and name.
    pub selected: Vec<ObjectKey>,
}

impl fmt::Display for PolicyInfo {
    /// `#0 shop/deny [ingress] [egress] -> shop/web-1, shop/web-2`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{} {}", self.id, self.policy)?;
        if self.ingress {
            f.write_str(" [ingress]")?;
        }
        if self.egress {
            f.write_str(" [egress]")?;
        }
        f.write_str(" ->")?;
        if self.selected.is_empty() {
            f.write_str(" (no pod)")?;
        }
        for (i, pod) in self.selected.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{pod}")?;
        }
        Ok(())
    }
}

/// IP protocol numbers of the `protocol` values validation accepts.
fn proto_number(name: &str) -> u8 {
    match name {
        "UDP" => 17,
        "SCTP" => 132,
        _ => 6,
    }
}

/// A pod as policies see it.
struct PodView<'a> {
    key: &'a ObjectKey,
    identity: IdentityKey,
    ips: Vec<IpAddr>,
    local: bool,
    /// Whether its connections may be redirected socket to socket (annotation).
    sockmap: bool,
    /// Named container ports: (name, protocol number, port).
    named_ports: Vec<(&'a str, u8, u16)>,
}

impl<'a> PodView<'a> {
    /// `None` for pods policies do not apply to (host network, finished).
    fn new(state: &State, key: &'a ObjectKey, pod: &'a Pod, node: &str) -> Option<Self> {
        let spec = pod.spec.as_ref();
        if spec.and_then(|s| s.host_network) == Some(true) {
            return None;
        }
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if matches!(phase, Some("Succeeded" | "Failed")) {
            return None;
        }
        let containers = spec.map(|s| s.containers.as_slice()).unwrap_or_default();
        let named_ports = containers
            .iter()
            .flat_map(|c| c.ports.iter().flatten())
            .filter_map(|p| {
                let name = p.name.as_deref().filter(|n| !n.is_empty())?;
                let port = u16::try_from(p.container_port).ok()?;
                Some((name, proto_number(protocol(p.protocol.as_ref())), port))
            })
            .collect();
        Some(Self {
            key,
            identity: IdentityKey::Pods {
                namespace: key.namespace.clone(),
                labels: pod.metadata.labels.clone().unwrap_or_default(),
            },
            ips: pod_ips(pod),
            local: !node.is_empty() && spec.and_then(|s| s.node_name.as_deref()) == Some(node),
            sockmap: state.sockmap_allowed(key, pod),
            named_ports,
        })
    }

    /// The port a named port means on this pod for `proto`, if it declares one.
    fn named_port(&self, name: &str, proto: u8) -> Option<u16> {
        self.named_ports
            .iter()
            .find(|&&(n, p, _)| n == name && p == proto)
            .map(|&(_, _, port)| port)
    }
}

/// The prefixes of an ipBlock; validation has checked that they parse.
fn block_prefixes(peer: &NetworkPolicyPeer) -> Option<(Cidr, Vec<Cidr>)> {
    let block = peer.ip_block.as_ref()?;
    let cidr = Cidr::parse(&block.cidr).ok()?;
    let except = block.except.iter().flatten();
    Some((cidr, except.filter_map(|e| Cidr::parse(e).ok()).collect()))
}

/// The rules of one direction of a policy, as (peers, ports) pairs.
type Rules<'a> = Vec<(&'a [NetworkPolicyPeer], &'a [NetworkPolicyPort])>;

/// A NetworkPolicy reduced to what planning needs.
struct PolicyView<'a> {
    key: &'a ObjectKey,
    spec: &'a NetworkPolicySpec,
    ingress: Option<Rules<'a>>,
    egress: Option<Rules<'a>>,
}

impl<'a> PolicyView<'a> {
    fn new(key: &'a ObjectKey, spec: &'a NetworkPolicySpec) -> Self {
        let types = spec.policy_types.as_deref().unwrap_or_default();
        let egress_rules = spec.egress.as_deref().unwrap_or_default();
        // The API server's defaulting of an absent or empty policyTypes.
        let (ingress, egress) = if types.is_empty() {
            (true, !egress_rules.is_empty())
        } else {
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        };
        let ingress_rules = spec.ingress.iter().flatten();
        Self {
            key,
            spec,
            ingress: ingress.then(|| {
                ingress_rules
                    .map(|r| {
                        (
                            r.from.as_deref().unwrap_or_default(),
                            r.ports.as_deref().unwrap_or_default(),
                        )
                    })
                    .collect()
            }),
            egress: egress.then(|| {
                egress_rules
                    .iter()
                    .map(|r| {
                        (
                            r.to.as_deref().unwrap_or_default(),
                            r.ports.as_deref().unwrap_or_default(),
                        )
                    })
                    .collect()
            }),
        }
    }

    fn peers(&self) -> impl Iterator<Item = &'a NetworkPolicyPeer> {
        let rules = self.ingress.iter().chain(&self.egress).flatten();
        rules.flat_map(|(peers, _)| peers.iter())
    }
}

/// Computes the desired policy maps for `state` on `ctx.node`, reusing the identities
/// of `prev` where the pods or prefix still exist. Returns the plan and the identities
/// to pass next time. The same state and context always give the same plan.
pub fn plan_policy(
    state: &State,
    prev: &IdentityIds,
    ctx: &PolicyContext<'_>,
) -> Result<(PolicyPlan, IdentityIds), PlanError> {
    let pods: Vec<PodView<'_>> = state
        .pods()
        .filter_map(|(key, pod)| PodView::new(state, key, pod, ctx.node))
        .collect();
    let policies: Vec<PolicyView<'_>> = state
        .network_policies()
        .filter_map(|(key, np)| np.spec.as_ref().map(|spec| PolicyView::new(key, spec)))
        .collect();
    let prefixes: BTreeSet<Cidr> = policies
        .iter()
        .flat_map(PolicyView::peers)
        .filter_map(block_prefixes)
        .flat_map(|(cidr, except)| std::iter::once(cidr).chain(except))
        .collect();

    let ids = IdentityIds::allocate(
        prev,
        pods.iter()
            .map(|p| p.identity.clone())
            .chain(prefixes.iter().copied().map(IdentityKey::Cidr)),
    );
    let pod_ids: Vec<u32> = pods.iter().map(|p| ids.get(&p.identity)).collect();
    let mut members: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    for (i, &id) in pod_ids.iter().enumerate() {
        members.entry(id).or_default().push(i);
    }

    let mut plan = PolicyPlan::default();
    // Pods first, so that a pod address wins over an ipBlock prefix of the same length
    // (a /32 or /128 block): pods are always matched by their pod identity. Of two pods
    // claiming one address (a stale object), the first by namespace/name keeps it.
    for (pod, &id) in pods.iter().zip(&pod_ids) {
        let flags = if pod.local && pod.sockmap {
            IPCACHE_REDIRECT
        } else {
            0
        };
        for &ip in &pod.ips {
            let len = if ip.is_ipv4() { 32 } else { 128 };
            ipcache_insert(&mut plan.ipcache, Cidr::new(ip, len), id, flags);
        }
    }
    for &prefix in &prefixes {
        ipcache_insert(
            &mut plan.ipcache,
            prefix,
            ids.get(&IdentityKey::Cidr(prefix)),
            0,
        );
    }
    // IPv4 addresses are IPv4-mapped IPv6 in the trie, so an IPv6 prefix that covers
    // ::ffff:0:0/96 (such as ::/0) would claim IPv4 peers; this entry sends them back to
    // world. An IPv4 0.0.0.0/0 block has this very key, and keeps it.
    let mapped = Cidr::new(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), 96);
    if prefixes.iter().any(|p| p.contains(&mapped)) {
        ipcache_insert(&mut plan.ipcache, mapped, IDENTITY_WORLD, 0);
    }
    // After the pods: an address both a pod and the node claim stays the pod's.
    for &ip in ctx.node_addrs {
        let len = if ip.is_ipv4() { 32 } else { 128 };
        ipcache_insert(
            &mut plan.ipcache,
            Cidr::new(ip, len),
            IDENTITY_HOST,
            IPCACHE_REDIRECT,
        );
    }

    for (pod, &id) in pods.iter().zip(&pod_ids) {
        if !pod.local {
            continue;
        }
        for ip in &pod.ips {
            if let Some(&cookie) = ctx.local_netns.get(ip) {
                plan.endpoints.entry(cookie).or_insert(EndpointValue {
                    identity: id,
                    flags: if pod.sockmap { 0 } else { ENDPOINT_NO_SOCKMAP },
                });
            }
        }
    }

    let resolver = Resolver {
        state,
        pods: &pods,
        pod_ids: &pod_ids,
        members: &members,
        prefixes: &prefixes,
        ids: &ids,
    };
    for (policy_id, policy) in (0..).zip(&policies) {
        let selected: BTreeSet<u32> = pods
            .iter()
            .zip(&pod_ids)
            .filter(|(pod, _)| {
                let IdentityKey::Pods { namespace, labels } = &pod.identity else {
                    unreachable!("pods have pod identities")
                };
                *namespace == policy.key.namespace
                    && policy
                        .spec
                        .pod_selector
                        .as_ref()
                        .is_none_or(|s| selector_matches(s, labels))
            })
            .map(|(_, &id)| id)
            .collect();
        let mut selected_pods: Vec<ObjectKey> = selected
            .iter()
            .flat_map(|id| &members[id])
            .map(|&i| pods[i].key.clone())
            .collect();
        selected_pods.sort();
        plan.policies.push(PolicyInfo {
            id: policy_id,
            policy: policy.key.clone(),
            ingress: policy.ingress.is_some(),
            egress: policy.egress.is_some(),
            selected: selected_pods,
        });
        for &subject in &selected {
            // Subjects are the identities of local pods; other nodes enforce the rest.
            let locals: Vec<&PodView<'_>> = members[&subject]
                .iter()
                .map(|&i| &pods[i])
                .filter(|p| p.local)
                .collect();
            if locals.is_empty() {
                continue;
            }
            let directions = [(DIR_INGRESS, &policy.ingress), (DIR_EGRESS, &policy.egress)];
            for (direction, rules) in directions {
                let Some(rules) = rules else { continue };
                let mut emit = |peer, proto, port, bits| {
                    let flags = POLICY_ALLOW;
                    policy_insert(
                        &mut plan.policy,
                        (subject, direction, peer, proto, port, bits),
                        flags,
                        policy_id,
                    );
                };
                for (peers, ports) in rules {
                    let peers = resolver.peers(&policy.key.namespace, peers);
                    resolver.rule(direction, &locals, peers.as_ref(), ports, &mut emit);
                }
                let marker = (subject, direction, IDENTITY_ANY, 0, 0, 0);
                policy_insert(&mut plan.policy, marker, POLICY_ISOLATED, policy_id);
            }
        }
    }

    plan.identities = ids
        .iter()
        .map(|(key, id)| IdentityInfo {
            id,
            key: key.clone(),
            pods: members
                .get(&id)
                .into_iter()
                .flatten()
                .map(|&i| pods[i].key.clone())
                .collect(),
        })
        .collect();
    plan.identities.sort_by_key(|i| i.id);

    let full = [
        (
            plan.endpoints.len(),
            maps::ENDPOINTS,
            ctx.capacities.endpoints,
        ),
        (plan.ipcache.len(), maps::IPCACHE, ctx.capacities.ipcache),
        (plan.policy.len(), maps::POLICY, ctx.capacities.policy),
    ]
    .into_iter()
    .find(|&(used, _, capacity)| used > capacity as usize);
    if let Some((needed, map, capacity)) = full {
        return Err(PlanError::PolicyCapacity {
            map,
            capacity,
            needed,
        });
    }
    Ok((plan, ids))
}

/// Adds `prefix` unless an entry holds it already; `flags` is [`IPCACHE_REDIRECT`] for
/// addresses on this node open to socket redirection.
fn ipcache_insert(
    ipcache: &mut BTreeMap<IpcacheKey, IpcacheValue>,
    prefix: Cidr,
    identity: u32,
    flags: u32,
) {
    let key = IpcacheKey {
        prefixlen: u32::from(prefix.len) + if prefix.addr.is_ipv4() { 96 } else { 0 },
        addr: Addr::from(prefix.addr),
    };
    ipcache
        .entry(key)
        .or_insert(IpcacheValue { identity, flags });
}

/// (subject, direction, peer, protocol, port, port prefix bits).
type Entry = (u32, u8, u32, u8, u16, u8);

fn policy_insert(
    policy: &mut BTreeMap<PolicyKey, PolicyValue>,
    (subject, direction, peer, proto, port, bits): Entry,
    flags: u32,
    policy_id: u32,
) {
    let mask = u16::MAX.checked_shl(16 - u32::from(bits)).unwrap_or(0);
    let key = PolicyKey {
        prefixlen: POLICY_FIXED_PREFIX + u32::from(bits),
        subject,
        peer,
        direction,
        proto,
        port_be: (port & mask).to_be(),
    };
    policy
        .entry(key)
        .or_insert(PolicyValue {
            flags: 0,
            policy_id,
        })
        .flags |= flags;
}

/// Resolves peers and ports of rules to identities and port prefixes.
struct Resolver<'s, 'a> {
    state: &'s State,
    pods: &'s [PodView<'a>],
    pod_ids: &'s [u32],
    members: &'s BTreeMap<u32, Vec<usize>>,
    prefixes: &'s BTreeSet<Cidr>,
    ids: &'s IdentityIds,
}

impl Resolver<'_, '_> {
    /// The identities a rule's peers allow; `None` for every peer (no peers given).
    fn peers(&self, namespace: &str, peers: &[NetworkPolicyPeer]) -> Option<BTreeSet<u32>> {
        if peers.is_empty() {
            return None;
        }
        let mut ids = BTreeSet::new();
        let mut ns_labels = BTreeMap::new();
        for peer in peers {
            if let Some((cidr, except)) = block_prefixes(peer) {
                // P ⊆ C, P ⊄ any e. Correct under longest-prefix match: for an address a
                // whose longest covering prefix is L, a ∈ C ⇒ L ⊆ C (C covers a, L is at
                // least as long), and a ∈ e ⇒ L ⊆ e; conversely a ∈ L, so a ∈ C \ ∪E ⇔ L ⊆ C ∧ ∀e: L ⊄ e.
                let inside = self
                    .prefixes
                    .iter()
                    .filter(|p| cidr.contains(p) && !except.iter().any(|e| e.contains(p)));
                ids.extend(inside.map(|&p| self.ids.get(&IdentityKey::Cidr(p))));
                continue;
            }
            for (pod, &id) in self.pods.iter().zip(self.pod_ids) {
                let IdentityKey::Pods {
                    namespace: pod_ns,
                    labels,
                } = &pod.identity
                else {
                    unreachable!("pods have pod identities")
                };
                let in_namespace = match &peer.namespace_selector {
                    Some(selector) => {
                        let labels = ns_labels
                            .entry(pod_ns.as_str())
                            .or_insert_with(|| self.state.namespace_labels(pod_ns));
                        selector_matches(selector, labels)
                    }
                    None => pod_ns == namespace,
                };
                let selected = peer
                    .pod_selector
                    .as_ref()
                    .is_none_or(|s| selector_matches(s, labels));
                if in_namespace && selected {
                    ids.insert(id);
                }
            }
        }
        Some(ids)
    }

    /// Emits (peer, protocol, port, prefix bits) for one rule of `direction` whose
    /// subject's local pods are `locals`.
    fn rule(
        &self,
        direction: u8,
        locals: &[&PodView<'_>],
        peers: Option<&BTreeSet<u32>>,
        ports: &[NetworkPolicyPort],
        emit: &mut impl FnMut(u32, u8, u16, u8),
    ) {
        let any = BTreeSet::from([IDENTITY_ANY]);
        let peers_or_any = peers.unwrap_or(&any);
        if ports.is_empty() {
            for &peer in peers_or_any {
                emit(peer, 0, 0, 0);
            }
            return;
        }
        for port in ports {
            let proto = proto_number(protocol(port.protocol.as_ref()));
            match &port.port {
                None => {
                    for &peer in peers_or_any {
                        emit(peer, proto, 0, 0);
                    }
                }
                Some(IntOrString::Int(n)) => {
                    let Ok(start) = u16::try_from(*n) else {
                        continue;
                    };
                    let end = port
                        .end_port
                        .and_then(|e| u16::try_from(e).ok())
                        .unwrap_or(start);
                    for (prefix, bits) in port_prefixes(start, end) {
                        for &peer in peers_or_any {
                            emit(peer, proto, prefix, bits);
                        }
                    }
                }
                Some(IntOrString::String(name)) if direction == DIR_INGRESS => {
                    // The subject's own port: the pods sharing its identity may declare it
                    // differently, so all their numbers are allowed.
                    let numbers: BTreeSet<u16> = locals
                        .iter()
                        .filter_map(|p| p.named_port(name, proto))
                        .collect();
                    for number in numbers {
                        for &peer in peers_or_any {
                            emit(peer, proto, number, 16);
                        }
                    }
                }
                Some(IntOrString::String(name)) => {
                    // The peer's port: resolved per peer identity (every pod identity
                    // when the rule allows any peer; CIDR identities have no ports).
                    let mut each = |peer: u32| {
                        let members = self.members.get(&peer).into_iter().flatten();
                        let numbers: BTreeSet<u16> = members
                            .filter_map(|&i| self.pods[i].named_port(name, proto))
                            .collect();
                        for number in numbers {
                            emit(peer, proto, number, 16);
                        }
                    };
                    match peers {
                        Some(peers) => peers.iter().copied().for_each(&mut each),
                        None => self.members.keys().copied().for_each(&mut each),
                    }
                }
            }
        }
    }
}

/// The aligned power-of-two blocks covering `start..=end`, as (first port, prefix
/// bits): the POLICY trie matches ports by prefix. At most 30 blocks (1..=65535 takes
/// 16).
pub(super) fn port_prefixes(start: u16, end: u16) -> Vec<(u16, u8)> {
    let (mut lo, end) = (u32::from(start), u32::from(end));
    let mut out = Vec::new();
    while lo <= end {
        // The largest block aligned at `lo` that does not pass `end`.
        let mut size_bits = lo.trailing_zeros().min(16);
        while lo + (1 << size_bits) - 1 > end {
            size_bits -= 1;
        }
        out.push((lo as u16, (16 - size_bits) as u8));
        lo += 1 << size_bits;
    }
    out
}

#[cfg(test)]
#[path = "policy_tests.rs"]
mod tests;
