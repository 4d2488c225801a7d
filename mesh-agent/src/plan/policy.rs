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
//! ipBlock: a peer address matches a rule when it matches the rule's pod/namespace
//! selectors *or* lies in one of its ipBlocks (`cidr` minus `except`), for pods, the
//! node and the world alike, as the upstream Kubernetes e2e suite has it. The datapath
//! resolves a peer address to one identity by longest-prefix match in IPCACHE, where
//! pod and node addresses are /32 or /128 entries: where ipBlock bounds split the
//! addresses of pods sharing an identity (or of the node), the parts get peer
//! identities of their own ([`blocks`]), which selector rules allow along with their
//! owner and ipBlock rules allow when the part lies in the block. Addresses of no pod
//! resolve to the CIDR identity of their longest covering prefix: every distinct
//! prefix of any `cidr` or `except` gets one and an IPCACHE entry, and a block
//! {cidr C, except E} allows each such prefix P with P ⊆ C and P ⊄ e for all e ∈ E.
//! Addresses no prefix covers miss IPCACHE, which the datapath reads as
//! [`IDENTITY_WORLD`]; only peer-less rules (peer ANY) allow those.

mod blocks;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::{NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use mesh_common::Addr;
use mesh_common::maps;
use mesh_common::policy::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_MESH, ENDPOINT_NO_SOCKMAP, EndpointValue, IDENTITY_ANY,
    IDENTITY_HOST, IDENTITY_WORLD, IPCACHE_INBOUND, IPCACHE_LOCAL, IPCACHE_MESH, IPCACHE_REDIRECT,
    IpcacheKey, IpcacheValue, POLICY_ALLOW, POLICY_FIXED_PREFIX, POLICY_ISOLATED, PolicyKey,
    PolicyValue,
};

pub use super::identity::{IdentityIds, IdentityKey};
use super::ids::IdAllocator;
use super::security::MeshSecurity;
use super::selector::LabelIndex;
use super::{PlanCost, PlanError};
use crate::state::{Cidr, ObjectKey, State, pod_ips, protocol, selector_matches};
use blocks::{Blocks, block_of, in_block, split};

/// Labels of an object.
type Labels = BTreeMap<String, String>;

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
    /// Every pod address of the cluster (/32, /128) → its peer identity and its pod's
    /// identity, the node's addresses → host (or a part of it), and every ipBlock
    /// prefix → its CIDR identity (a pod or node address wins over an equal prefix).
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
    /// What ipBlocks that cut through pods' or the node's addresses added.
    pub split: SplitStats,
    /// What computing the plan cost.
    pub cost: PlanCost,
}

/// What ipBlock bounds that split the addresses of an identity's pods (or of the node)
/// cost: at most one identity per address some ipBlock prefix covers, and the allow
/// entries naming them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SplitStats {
    /// Peer identities split off their owner.
    pub identities: usize,
    /// POLICY entries whose peer is one of them.
    pub entries: usize,
}

impl fmt::Display for SplitStats {
    /// `2 identities split by ipBlocks, 6 entries`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} identities split by ipBlocks, {} entries",
            self.identities, self.entries
        )
    }
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
    mesh_common::service::Protocol::from_name(name)
        .map_or(mesh_common::service::PROTO_TCP, |p| p as u8)
}

/// Labels of an object that has none.
static NO_LABELS: Labels = BTreeMap::new();

/// A pod as policies see it.
struct PodView<'a> {
    key: &'a ObjectKey,
    labels: &'a Labels,
    ips: Vec<IpAddr>,
    local: bool,
    /// Whether its connections may be redirected socket to socket (annotation).
    sockmap: bool,
    /// Whether it is in the mesh (Istio ambient enrollment).
    mesh: bool,
    /// Whether it is local and in the mesh, and its plaintext inbound connections go to
    /// the node proxy (PeerAuthentication STRICT, or an AuthorizationPolicy applies).
    inbound: bool,
    /// Named container ports: (name, protocol number, port).
    named_ports: Vec<(&'a str, u8, u16)>,
}

impl<'a> PodView<'a> {
    /// `None` for pods policies do not apply to (host network, finished).
    fn new(
        state: &State,
        security: &MeshSecurity<'_>,
        key: &'a ObjectKey,
        pod: &'a Pod,
        node: &str,
    ) -> Option<Self> {
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
        let local = !node.is_empty() && spec.and_then(|s| s.node_name.as_deref()) == Some(node);
        let inbound = local
            && security
                .workload(key, pod)
                .is_some_and(|(_, w)| w.judges_plaintext());
        Some(Self {
            key,
            labels: pod.metadata.labels.as_ref().unwrap_or(&NO_LABELS),
            ips: pod_ips(pod),
            local,
            sockmap: state.sockmap_allowed(key, pod),
            mesh: state.enrolled(key, pod),
            inbound,
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

/// Pods of one namespace with equal labels: one identity.
struct Group<'a> {
    namespace: &'a str,
    labels: &'a Labels,
    /// Indices into [`Identities::pods`], in pod order.
    pods: Vec<usize>,
    /// Its identity: the subject of its POLICY entries.
    id: u32,
    /// The peer identities of its addresses: `id`, then its parts (see [`blocks`]).
    peer_ids: Vec<u32>,
}

/// The peer identity of a set of addresses of one owner (see [`blocks`]).
struct PeerClass {
    /// Peer identity: the owner's, or the part's own.
    id: u32,
    /// The owner's identity ([`IDENTITY_HOST`] for the node).
    owner: u32,
    /// The ipBlock prefixes its addresses lie in.
    within: Vec<Cidr>,
    /// Its addresses, with the pod (index) each belongs to; `None` for the node.
    addrs: Vec<(IpAddr, Option<usize>)>,
}

impl PeerClass {
    /// Split off its owner, so an identity of its own.
    fn is_part(&self) -> bool {
        self.id != self.owner
    }
}

/// (subject, direction) of POLICY entries.
#[derive(Clone, Copy)]
struct Target {
    subject: u32,
    direction: u8,
}

/// What one allow entry allows: a peer identity, protocol (0: any) and port prefix.
#[derive(Clone, Copy)]
struct Allow {
    peer: u32,
    proto: u8,
    port: u16,
    /// Port prefix bits: 0 any port, 16 exactly `port`.
    bits: u8,
}

/// Everything compiled entries refer to: pods and their groups, peer classes, ipBlock
/// prefixes, each with its identity.
struct Identities<'a> {
    pods: Vec<PodView<'a>>,
    groups: Vec<Group<'a>>,
    classes: Vec<PeerClass>,
    blocks: Blocks,
    /// ipBlock prefix → its CIDR identity.
    cidr_ids: BTreeMap<Cidr, u32>,
    /// Peer identity → the pods with an address in it (for egress named ports).
    class_pods: BTreeMap<u32, Vec<usize>>,
    /// ipBlock prefix → the classes (indices) whose addresses lie in it.
    classes_in: BTreeMap<Cidr, Vec<usize>>,
    /// Labels (the automatic name label included) of the pods' namespaces.
    ns_labels: BTreeMap<&'a str, Labels>,
    /// Groups by namespace and label.
    index: LabelIndex<'a>,
}

/// Computes the desired policy maps for `state` on `ctx.node`, reusing the identities
/// of `prev` where the pods or prefix still exist. Returns the plan and the identities
/// to pass next time. The same state and context always give the same plan.
pub fn plan_policy(
    state: &State,
    prev: &IdentityIds,
    ctx: &PolicyContext<'_>,
) -> Result<(PolicyPlan, IdentityIds), PlanError> {
    let policies: Vec<PolicyView<'_>> = state
        .network_policies()
        .filter_map(|(key, np)| np.spec.as_ref().map(|spec| PolicyView::new(key, spec)))
        .collect();
    let mut alloc = prev.allocator();
    let identities = Identities::new(state, &policies, ctx, &mut alloc);
    let next = IdentityIds::from_allocator(alloc);

    let mut plan = PolicyPlan {
        ipcache: identities.ipcache(),
        endpoints: identities.endpoints(ctx.local_netns),
        identities: identities.infos(&next),
        ..PolicyPlan::default()
    };
    for (policy_id, policy) in (0..).zip(&policies) {
        identities.compile(policy_id, policy, &mut plan);
    }
    plan.split = identities.split_stats(&plan.policy);
    plan.cost = PlanCost {
        selector_candidates: identities.index.examined(),
        ..PlanCost::default()
    };
    check_capacity(&plan, ctx.capacities)?;
    Ok((plan, next))
}

/// An owner's addresses grouped by ipBlock signature ([`blocks::split`]).
type Parts = BTreeMap<Vec<Cidr>, Vec<(IpAddr, Option<usize>)>>;

fn part_key(owner: &IdentityKey, within: &[Cidr]) -> IdentityKey {
    IdentityKey::Part {
        owner: Box::new(owner.clone()),
        within: within.to_vec(),
    }
}

/// Allocates the ids of every identity the plan names, in key order (so that equal
/// states give equal plans): ipBlock prefixes, owners, and owners' parts.
fn allocate_in_key_order(
    alloc: &mut IdAllocator<'_, IdentityKey>,
    blocks: &Blocks,
    owners: &[(IdentityKey, Parts)],
    host_parts: &Parts,
) {
    let mut keys: BTreeSet<IdentityKey> = blocks
        .prefixes()
        .iter()
        .map(|&p| IdentityKey::Cidr(p))
        .collect();
    for (owner, parts) in owners {
        keys.insert(owner.clone());
        keys.extend(parts.keys().skip(1).map(|within| part_key(owner, within)));
    }
    let host_keys = host_parts.keys().skip(1);
    keys.extend(host_keys.map(|within| part_key(&IdentityKey::Host, within)));
    for key in &keys {
        alloc.id(key);
    }
}

/// Peer identity → the pods with an address in it, and ipBlock prefix → the classes
/// (indices) whose addresses lie in it.
fn index_classes(classes: &[PeerClass]) -> (BTreeMap<u32, Vec<usize>>, BTreeMap<Cidr, Vec<usize>>) {
    let mut class_pods: BTreeMap<u32, Vec<usize>> = BTreeMap::new();
    let mut classes_in: BTreeMap<Cidr, Vec<usize>> = BTreeMap::new();
    for (ci, class) in classes.iter().enumerate() {
        // A class lists each pod's addresses together.
        for pod in class.addrs.iter().filter_map(|&(_, pod)| pod) {
            let list = class_pods.entry(class.id).or_default();
            if list.last() != Some(&pod) {
                list.push(pod);
            }
        }
        for &prefix in &class.within {
            classes_in.entry(prefix).or_default().push(ci);
        }
    }
    (class_pods, classes_in)
}

/// Turns an owner's parts into peer classes: the first keeps `owner_id`, every other
/// gets its part identity. Returns the owner's peer identities.
fn add_classes(
    classes: &mut Vec<PeerClass>,
    alloc: &mut IdAllocator<'_, IdentityKey>,
    owner: &IdentityKey,
    owner_id: u32,
    parts: Parts,
) -> Vec<u32> {
    let mut peer_ids = vec![owner_id];
    for (n, (within, addrs)) in parts.into_iter().enumerate() {
        let id = if n > 0 {
            let id = alloc.id(&part_key(owner, &within));
            peer_ids.push(id);
            id
        } else {
            owner_id
        };
        classes.push(PeerClass {
            id,
            owner: owner_id,
            within,
            addrs,
        });
    }
    peer_ids
}

impl<'a> Identities<'a> {
    /// Pods, their groups and peer classes, and ipBlock prefixes, each with its
    /// identity. New identities are numbered in key order, so equal states give equal
    /// plans.
    fn new(
        state: &'a State,
        policies: &[PolicyView<'_>],
        ctx: &PolicyContext<'_>,
        alloc: &mut IdAllocator<'_, IdentityKey>,
    ) -> Self {
        // Only the local pods' PeerAuthentication and AuthorizationPolicy matter here
        // (whether to capture their plaintext), not the trust domain.
        let security = MeshSecurity::new(state, None);
        let pods: Vec<PodView<'a>> = state
            .pods()
            .filter_map(|(key, pod)| PodView::new(state, &security, key, pod, ctx.node))
            .collect();
        let blocks = Blocks::new(
            policies
                .iter()
                .flat_map(PolicyView::peers)
                .filter_map(block_of),
        );

        let mut members: BTreeMap<(&'a str, &'a Labels), Vec<usize>> = BTreeMap::new();
        for (i, pod) in pods.iter().enumerate() {
            let namespace = pod.key.namespace.as_str();
            members.entry((namespace, pod.labels)).or_default().push(i);
        }
        // Each owner's addresses split by ipBlock signature, in `members` order.
        let owners: Vec<(IdentityKey, Parts)> = members
            .iter()
            .map(|(&(namespace, labels), pods_of)| {
                let key = IdentityKey::Pods {
                    namespace: namespace.to_owned(),
                    labels: labels.clone(),
                };
                let addrs = pods_of.iter().flat_map(|&i| {
                    let ips = pods.get(i).map(|p| p.ips.as_slice()).unwrap_or_default();
                    ips.iter().map(move |&ip| (ip, Some(i)))
                });
                (key, split(&blocks, addrs))
            })
            .collect();
        let host_parts = split(&blocks, ctx.node_addrs.iter().map(|&ip| (ip, None)));

        allocate_in_key_order(alloc, &blocks, &owners, &host_parts);

        let mut classes = Vec::new();
        let groups: Vec<Group<'a>> = members
            .into_iter()
            .zip(owners)
            .map(|(((namespace, labels), pods_of), (owner, parts))| {
                let id = alloc.id(&owner);
                let peer_ids = add_classes(&mut classes, alloc, &owner, id, parts);
                Group {
                    namespace,
                    labels,
                    pods: pods_of,
                    id,
                    peer_ids,
                }
            })
            .collect();
        let host = IdentityKey::Host;
        add_classes(&mut classes, alloc, &host, IDENTITY_HOST, host_parts);

        let cidr_ids = blocks
            .prefixes()
            .iter()
            .map(|&p| (p, alloc.id(&IdentityKey::Cidr(p))))
            .collect();
        let (class_pods, classes_in) = index_classes(&classes);
        let index = LabelIndex::new(groups.iter().map(|g| (g.namespace, g.labels)));
        let ns_labels = index
            .namespaces()
            .map(|ns| (ns, state.namespace_labels(ns)))
            .collect();
        Self {
            pods,
            groups,
            classes,
            blocks,
            cidr_ids,
            class_pods,
            classes_in,
            ns_labels,
            index,
        }
    }

    /// IPCACHE: every pod address (/32, /128) → its peer class and owner, the node's
    /// addresses → host (or a part of it), every ipBlock prefix → its CIDR identity.
    fn ipcache(&self) -> BTreeMap<IpcacheKey, IpcacheValue> {
        let mut out = BTreeMap::new();
        // Pods first, in pod order: a pod address wins over an ipBlock prefix of the
        // same length, of two pods claiming one address (a stale object) the first by
        // namespace/name keeps it, and a pod keeps an address the node claims too.
        let mut pod_addrs: Vec<(usize, IpAddr, &PeerClass)> = self
            .classes
            .iter()
            .flat_map(|c| {
                c.addrs
                    .iter()
                    .filter_map(move |&(ip, pod)| Some((pod?, ip, c)))
            })
            .collect();
        pod_addrs.sort_by_key(|&(pod, ip, _)| (pod, ip));
        for (pod, ip, class) in pod_addrs {
            let view = self.pods.get(pod);
            let mut flags = 0;
            if view.is_some_and(|p| p.local && p.sockmap) {
                flags |= IPCACHE_REDIRECT;
            }
            if view.is_some_and(|p| p.local) {
                flags |= IPCACHE_LOCAL;
            }
            if view.is_some_and(|p| p.mesh) {
                flags |= IPCACHE_MESH;
            }
            if view.is_some_and(|p| p.inbound) {
                flags |= IPCACHE_INBOUND;
            }
            ipcache_insert(&mut out, address(ip), class.id, class.owner, flags);
        }
        // The node's addresses stay the host's even where an ipBlock prefix equals one.
        for class in &self.classes {
            for &(ip, _) in class.addrs.iter().filter(|(_, pod)| pod.is_none()) {
                ipcache_insert(
                    &mut out,
                    address(ip),
                    class.id,
                    class.owner,
                    IPCACHE_REDIRECT | IPCACHE_LOCAL,
                );
            }
        }
        for (&prefix, &id) in &self.cidr_ids {
            ipcache_insert(&mut out, prefix, id, id, 0);
        }
        // IPv4 addresses are IPv4-mapped IPv6 in the trie, so an IPv6 prefix that covers
        // ::ffff:0:0/96 (such as ::/0) would claim IPv4 peers; this entry sends them
        // back to world. An IPv4 0.0.0.0/0 block has this very key, and keeps it.
        let mapped = Cidr::new(IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0, 0)), 96);
        if self.blocks.prefixes().iter().any(|p| p.contains(&mapped)) {
            ipcache_insert(&mut out, mapped, IDENTITY_WORLD, IDENTITY_WORLD, 0);
        }
        out
    }

    /// ENDPOINTS: the netns cookie of every local pod found in `local_netns` by any of
    /// its addresses → its identity. Of two pods sharing a cookie, the first in pod
    /// order names it.
    fn endpoints(&self, local_netns: &BTreeMap<IpAddr, u64>) -> BTreeMap<u64, EndpointValue> {
        let mut pod_ids: Vec<(usize, u32)> = self
            .groups
            .iter()
            .flat_map(|g| g.pods.iter().map(move |&i| (i, g.id)))
            .collect();
        pod_ids.sort_unstable();
        let mut out = BTreeMap::new();
        for (i, identity) in pod_ids {
            let Some(pod) = self.pods.get(i).filter(|p| p.local) else {
                continue;
            };
            let mut flags = if pod.sockmap { 0 } else { ENDPOINT_NO_SOCKMAP };
            if pod.mesh {
                flags |= ENDPOINT_MESH;
            }
            for ip in &pod.ips {
                if let Some(&cookie) = local_netns.get(ip) {
                    out.entry(cookie)
                        .or_insert(EndpointValue { identity, flags });
                }
            }
        }
        out
    }

    /// Every identity of `ids` as an operator reads it, by id.
    fn infos(&self, ids: &IdentityIds) -> Vec<IdentityInfo> {
        let keys = |pods: &[usize]| -> Vec<ObjectKey> {
            let views = pods.iter().filter_map(|&i| self.pods.get(i));
            views.map(|p| p.key.clone()).collect()
        };
        let mut pods_by_id: BTreeMap<u32, Vec<ObjectKey>> = BTreeMap::new();
        for g in &self.groups {
            pods_by_id.insert(g.id, keys(&g.pods));
        }
        for class in self.classes.iter().filter(|c| c.is_part()) {
            let pods = self
                .class_pods
                .get(&class.id)
                .map_or(&[][..], Vec::as_slice);
            pods_by_id.insert(class.id, keys(pods));
        }
        let mut infos: Vec<IdentityInfo> = ids
            .iter()
            .map(|(key, id)| IdentityInfo {
                id,
                key: key.clone(),
                pods: pods_by_id.remove(&id).unwrap_or_default(),
            })
            .collect();
        infos.sort_by_key(|i| i.id);
        infos
    }

    /// Adds a policy's [`PolicyInfo`] and, for the identities of its local subjects,
    /// its isolation markers and allow entries.
    fn compile(&self, policy_id: u32, policy: &PolicyView<'_>, plan: &mut PolicyPlan) {
        let namespace = policy.key.namespace.as_str();
        let everything = LabelSelector::default();
        let selector = policy.spec.pod_selector.as_ref().unwrap_or(&everything);
        let subjects: Vec<&Group<'_>> = self
            .index
            .select(namespace, selector)
            .into_iter()
            .filter_map(|i| self.groups.get(i))
            .collect();
        let subjects: Vec<(u32, Vec<&PodView<'_>>)> = subjects
            .iter()
            .map(|g| {
                (
                    g.id,
                    g.pods.iter().filter_map(|&i| self.pods.get(i)).collect(),
                )
            })
            .collect();
        let mut selected: Vec<ObjectKey> = subjects
            .iter()
            .flat_map(|(_, pods)| pods.iter().map(|p| p.key.clone()))
            .collect();
        selected.sort();
        plan.policies.push(PolicyInfo {
            id: policy_id,
            policy: policy.key.clone(),
            ingress: policy.ingress.is_some(),
            egress: policy.egress.is_some(),
            selected,
        });

        // Subjects are the identities of local pods; other nodes enforce the rest.
        let locals: Vec<(u32, Vec<&PodView<'_>>)> = subjects
            .into_iter()
            .map(|(id, pods)| (id, pods.into_iter().filter(|p| p.local).collect()))
            .filter(|(_, pods): &(u32, Vec<_>)| !pods.is_empty())
            .collect();
        if locals.is_empty() {
            return;
        }
        let directions = [(DIR_INGRESS, &policy.ingress), (DIR_EGRESS, &policy.egress)];
        for (direction, rules) in directions {
            let Some(rules) = rules else { continue };
            let resolved: Vec<(Option<BTreeSet<u32>>, &[NetworkPolicyPort])> = rules
                .iter()
                .map(|&(peers, ports)| (self.peers(namespace, peers), ports))
                .collect();
            for (subject, pods) in &locals {
                let target = Target {
                    subject: *subject,
                    direction,
                };
                for (peers, ports) in &resolved {
                    self.rule(direction, pods, peers.as_ref(), ports, &mut |allow| {
                        policy_insert(&mut plan.policy, target, allow, POLICY_ALLOW, policy_id);
                    });
                }
                let marker = Allow {
                    peer: IDENTITY_ANY,
                    proto: 0,
                    port: 0,
                    bits: 0,
                };
                policy_insert(&mut plan.policy, target, marker, POLICY_ISOLATED, policy_id);
            }
        }
    }

    /// The peer identities a rule's peers allow; `None` for every peer (no peers given).
    fn peers(&self, namespace: &str, peers: &[NetworkPolicyPeer]) -> Option<BTreeSet<u32>> {
        if peers.is_empty() {
            return None;
        }
        let mut ids = BTreeSet::new();
        let everything = LabelSelector::default();
        for peer in peers {
            if let Some((cidr, except)) = block_of(peer) {
                // Addresses no pod or node has: the CIDR identities P ⊆ C, P ⊄ any e.
                // Correct under longest-prefix match: for an address a whose longest
                // covering prefix is L, a ∈ C ⇒ L ⊆ C (C covers a, L is at least as
                // long), and a ∈ e ⇒ L ⊆ e; conversely a ∈ L, so
                // a ∈ C \ ∪E ⇔ L ⊆ C ∧ ∀e: L ⊄ e.
                let inside = self.blocks.within(cidr);
                let kept = inside.filter(|p| !except.iter().any(|e| e.contains(p)));
                ids.extend(kept.filter_map(|p| self.cidr_ids.get(&p).copied()));
                // Pod and node addresses: the classes whose signature is in C \ ∪E.
                let candidates = self.classes_in.get(&cidr).into_iter().flatten();
                let classes = candidates.filter_map(|&ci| self.classes.get(ci));
                let inside = classes.filter(|c| in_block(&c.within, &cidr, &except));
                ids.extend(inside.map(|c| c.id));
                continue;
            }
            let namespaces: Vec<&str> = match &peer.namespace_selector {
                Some(selector) => self
                    .ns_labels
                    .iter()
                    .filter(|(_, labels)| selector_matches(selector, labels))
                    .map(|(&ns, _)| ns)
                    .collect(),
                None => vec![namespace],
            };
            let pod_selector = peer.pod_selector.as_ref().unwrap_or(&everything);
            for ns in namespaces {
                let groups = self.index.select(ns, pod_selector).into_iter();
                for group in groups.filter_map(|i| self.groups.get(i)) {
                    ids.extend(&group.peer_ids);
                }
            }
        }
        Some(ids)
    }

    /// Emits the allow entries of one rule of `direction` whose subject's local pods
    /// are `locals`.
    fn rule(
        &self,
        direction: u8,
        locals: &[&PodView<'_>],
        peers: Option<&BTreeSet<u32>>,
        ports: &[NetworkPolicyPort],
        emit: &mut impl FnMut(Allow),
    ) {
        let any = BTreeSet::from([IDENTITY_ANY]);
        let peers_or_any = peers.unwrap_or(&any);
        let each_peer = |proto, port, bits, emit: &mut dyn FnMut(Allow)| {
            for &peer in peers_or_any {
                emit(Allow {
                    peer,
                    proto,
                    port,
                    bits,
                });
            }
        };
        if ports.is_empty() {
            each_peer(0, 0, 0, emit);
            return;
        }
        for port in ports {
            let proto = proto_number(protocol(port.protocol.as_ref()));
            match &port.port {
                None => each_peer(proto, 0, 0, emit),
                Some(IntOrString::Int(n)) => {
                    let Ok(start) = u16::try_from(*n) else {
                        continue;
                    };
                    let end = port
                        .end_port
                        .and_then(|e| u16::try_from(e).ok())
                        .unwrap_or(start);
                    for (prefix, bits) in port_prefixes(start, end) {
                        each_peer(proto, prefix, bits, emit);
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
                        each_peer(proto, number, 16, emit);
                    }
                }
                Some(IntOrString::String(name)) => {
                    // The peer's port: resolved per peer identity against the pods with
                    // an address in it (every pod identity when the rule allows any
                    // peer; CIDR identities have no ports).
                    let ids: Vec<u32> = match peers {
                        Some(peers) => peers.iter().copied().collect(),
                        None => self.class_pods.keys().copied().collect(),
                    };
                    for peer in ids {
                        let pods = self.class_pods.get(&peer).into_iter().flatten();
                        let numbers: BTreeSet<u16> = pods
                            .filter_map(|&i| self.pods.get(i)?.named_port(name, proto))
                            .collect();
                        for number in numbers {
                            emit(Allow {
                                peer,
                                proto,
                                port: number,
                                bits: 16,
                            });
                        }
                    }
                }
            }
        }
    }

    /// How far ipBlocks split owners' addresses, given the compiled POLICY entries.
    fn split_stats(&self, policy: &BTreeMap<PolicyKey, PolicyValue>) -> SplitStats {
        let parts: BTreeSet<u32> = self
            .classes
            .iter()
            .filter(|c| c.is_part())
            .map(|c| c.id)
            .collect();
        SplitStats {
            identities: parts.len(),
            entries: policy.keys().filter(|k| parts.contains(&k.peer)).count(),
        }
    }
}

/// Fails when the plan needs more entries than a policy map holds.
fn check_capacity(plan: &PolicyPlan, capacities: PolicyCapacities) -> Result<(), PlanError> {
    let full = [
        (plan.endpoints.len(), maps::ENDPOINTS, capacities.endpoints),
        (plan.ipcache.len(), maps::IPCACHE, capacities.ipcache),
        (plan.policy.len(), maps::POLICY, capacities.policy),
    ]
    .into_iter()
    .find(|&(used, _, capacity)| used > capacity as usize);
    match full {
        Some((needed, map, capacity)) => Err(PlanError::PolicyCapacity {
            map,
            capacity,
            needed,
        }),
        None => Ok(()),
    }
}

/// The host prefix (/32, /128) of an address.
fn address(ip: IpAddr) -> Cidr {
    Cidr::new(ip, if ip.is_ipv4() { 32 } else { 128 })
}

/// Adds `prefix` unless an entry holds it already; `flags` is [`IPCACHE_REDIRECT`] for
/// addresses on this node open to socket redirection.
fn ipcache_insert(
    ipcache: &mut BTreeMap<IpcacheKey, IpcacheValue>,
    prefix: Cidr,
    identity: u32,
    owner: u32,
    flags: u32,
) {
    let key = IpcacheKey {
        prefixlen: u32::from(prefix.len) + if prefix.addr.is_ipv4() { 96 } else { 0 },
        addr: Addr::from(prefix.addr),
    };
    ipcache.entry(key).or_insert(IpcacheValue {
        identity,
        owner,
        flags,
    });
}

/// Adds an entry, or-ing `flags` into an existing one (the first policy keeps naming
/// it).
fn policy_insert(
    policy: &mut BTreeMap<PolicyKey, PolicyValue>,
    target: Target,
    allow: Allow,
    flags: u32,
    policy_id: u32,
) {
    let mask = u16::MAX
        .checked_shl(16 - u32::from(allow.bits))
        .unwrap_or(0);
    let key = PolicyKey {
        prefixlen: POLICY_FIXED_PREFIX + u32::from(allow.bits),
        subject: target.subject,
        peer: allow.peer,
        direction: target.direction,
        proto: allow.proto,
        port_be: (allow.port & mask).to_be(),
    };
    policy
        .entry(key)
        .or_insert(PolicyValue {
            flags: 0,
            policy_id,
        })
        .flags |= flags;
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
