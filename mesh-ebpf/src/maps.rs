//! Every map of the datapath, one place. Capacities and flags come from the registry
//! (`mesh_common::maps::REGISTRY`, through `spec`, evaluated at compile time: a name
//! missing from it does not build). The `name` literals must equal the registry's names;
//! the agent's unit test checks this object against the registry (kind, key and value
//! sizes, capacity, flags). Maps are pinned by name, so an agent restart reuses them and
//! `bpftool map dump pinned <bpffs>/mesh/<node>/<NAME>` reads them. Capacities are
//! defaults; the agent sizes the maps before loading.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, EndpointValue, IpcacheValue,
    LbMetricsKey, OrigDstKey, OrigDstValue, PolicyKeyData, PolicyValue, RevNatKey, RevNatValue,
    ServiceKey, ServiceValue, SockKey,
    event::VerdictKey,
    maps::{self as names, spec},
};

/// Frontends (VIP, port, proto) → service id, backend count, affinity; plus VIP markers.
#[map(name = "SERVICES_V2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(spec(names::SERVICES).capacity, spec(names::SERVICES).flags);

/// (service id, slot) → backend id.
#[map(name = "SVC_BACKENDS_V1")]
pub static SERVICE_BACKENDS: HashMap<BackendSlotKey, u32> = HashMap::pinned(
    spec(names::SERVICE_BACKENDS).capacity,
    spec(names::SERVICE_BACKENDS).flags,
);

/// Backend id → backend address and state.
#[map(name = "BACKENDS_V2")]
pub static BACKENDS: HashMap<u32, Backend> =
    HashMap::pinned(spec(names::BACKENDS).capacity, spec(names::BACKENDS).flags);

/// (client netns, service) → the backend it sticks to (ClientIP session affinity).
#[map(name = "AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(spec(names::AFFINITY).capacity, spec(names::AFFINITY).flags);

/// (socket, backend) → the VIP the application dialled, for recvmsg and getpeername.
#[map(name = "REV_NAT_V1")]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::pinned(spec(names::REV_NAT).capacity, spec(names::REV_NAT).flags);

/// (service, backend) → translated connections, per CPU (no atomics on the hot path).
/// Not preallocated (as every plain hash map here): a per-CPU map would otherwise reserve
/// capacity × CPUs counters up front, while only the pairs that see traffic need one.
#[map(name = "LB_METRICS_V1")]
pub static LB_METRICS: PerCpuHashMap<LbMetricsKey, u64> = PerCpuHashMap::pinned(
    spec(names::LB_METRICS).capacity,
    spec(names::LB_METRICS).flags,
);

/// Local pods: network namespace cookie → security identity.
#[map(name = "ENDPOINTS_V1")]
pub static ENDPOINTS: HashMap<u64, EndpointValue> = HashMap::pinned(
    spec(names::ENDPOINTS).capacity,
    spec(names::ENDPOINTS).flags,
);

/// Address prefixes → peer identity and owner (pods, the node, ipBlock CIDRs); a miss is
/// the world.
#[map(name = "IPCACHE_V2")]
pub static IPCACHE: LpmTrie<Addr, IpcacheValue> =
    LpmTrie::pinned(spec(names::IPCACHE).capacity, spec(names::IPCACHE).flags);

/// Compiled NetworkPolicy: (subject, peer, direction, proto, port prefix) → allow, plus
/// one isolation marker per isolated (subject, direction).
#[map(name = "POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKeyData, PolicyValue> =
    LpmTrie::pinned(spec(names::POLICY).capacity, spec(names::POLICY).flags);

/// Flow events for the agent (`mesh-agent observe`); full → events are dropped, never
/// traffic.
#[map(name = "EVENTS_V1")]
pub static EVENTS: RingBuf =
    RingBuf::pinned(spec(names::EVENTS).capacity, spec(names::EVENTS).flags);

/// Datapath settings written by the agent (policy audit mode).
#[map(name = "CONFIG_V1")]
pub static CONFIG: Array<u32> =
    Array::pinned(spec(names::CONFIG).capacity, spec(names::CONFIG).flags);

/// (direction, verdict, reason) → count, per CPU.
#[map(name = "POLICY_METRICS_V1")]
pub static POLICY_METRICS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(
    spec(names::POLICY_METRICS).capacity,
    spec(names::POLICY_METRICS).flags,
);

/// UDP peers local sockets sent to: their replies are not new inbound flows.
#[map(name = "UDP_PEERS_V1")]
pub static UDP_PEERS: LruHashMap<RevNatKey, u8> = LruHashMap::pinned(
    spec(names::UDP_PEERS).capacity,
    spec(names::UDP_PEERS).flags,
);

/// Established TCP sockets of the node's pods, by 4-tuple (sockhash).
#[map(name = "SOCKS_V1")]
pub static SOCKS: SockHash<SockKey> =
    SockHash::pinned(spec(names::SOCKS).capacity, spec(names::SOCKS).flags);

/// Per socket of SOCKS: whether its messages are redirected (`redirect::path`).
#[map(name = "SOCK_PATHS_V1")]
pub static SOCK_PATHS: LruHashMap<SockKey, u32> = LruHashMap::pinned(
    spec(names::SOCK_PATHS).capacity,
    spec(names::SOCK_PATHS).flags,
);

/// Redirected messages and bytes, passed messages, per CPU.
#[map(name = "SOCKMAP_METRICS_V1")]
pub static SOCKMAP_METRICS: PerCpuArray<u64> = PerCpuArray::pinned(
    spec(names::SOCKMAP_METRICS).capacity,
    spec(names::SOCKMAP_METRICS).flags,
);

/// The node proxy's plaintext inbound listeners, by the local pod address they serve
/// (sk_lookup hands captured connections to them).
#[map(name = "INBOUND_SOCKS_V1")]
pub static INBOUND_SOCKS: SockHash<Addr> = SockHash::pinned(
    spec(names::INBOUND_SOCKS).capacity,
    spec(names::INBOUND_SOCKS).flags,
);

/// Connections connect4/6 sent to the node proxy, until established: socket cookie →
/// the VIP and port dialled (`origdst.rs` moves them to ORIG_DST).
#[map(name = "ORIG_DST_PENDING_V1")]
pub static ORIG_DST_PENDING: LruHashMap<u64, OrigDstValue> = LruHashMap::pinned(
    spec(names::ORIG_DST_PENDING).capacity,
    spec(names::ORIG_DST_PENDING).flags,
);

/// Established connections to the node proxy: (client netns, client loopback address,
/// port) → the VIP and port dialled, for the getsockopt program.
#[map(name = "ORIG_DST_V1")]
pub static ORIG_DST: LruHashMap<OrigDstKey, OrigDstValue> =
    LruHashMap::pinned(spec(names::ORIG_DST).capacity, spec(names::ORIG_DST).flags);
