//! Every map of the datapath, one place. Names and capacities come from
//! `mesh_common::maps` (the `name` literals below must equal those constants; the agent
//! fails to load an object where one is missing). Maps are pinned by name, so an agent
//! restart reuses them and `bpftool map dump pinned <bpffs>/mesh/<node>/<NAME>` reads
//! them. Capacities are defaults; the agent may resize before loading.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, PerCpuHashMap, RingBuf, SockHash},
};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, EndpointValue, IpcacheValue,
    LbMetricsKey, PolicyKeyData, PolicyValue, RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    SockKey,
    event::{VerdictKey, config},
    maps as names,
    redirect::counter,
};

/// Frontends (VIP, port, proto) → service id, backend count, affinity; plus VIP markers.
#[map(name = "SERVICES_V2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(names::SERVICES_CAPACITY, 0);

/// (service id, slot) → backend id.
#[map(name = "SVC_BACKENDS_V1")]
pub static SERVICE_BACKENDS: HashMap<BackendSlotKey, u32> =
    HashMap::pinned(names::SERVICE_BACKENDS_CAPACITY, 0);

/// Backend id → backend address and state.
#[map(name = "BACKENDS_V2")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(names::BACKENDS_CAPACITY, 0);

/// (client netns, service) → the backend it sticks to (ClientIP session affinity).
#[map(name = "AFFINITY_V1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(names::AFFINITY_CAPACITY, 0);

/// (socket, backend) → the VIP the application dialled, for recvmsg and getpeername.
#[map(name = "REV_NAT_V1")]
pub static REV_NAT: LruHashMap<RevNatKey, RevNatValue> =
    LruHashMap::pinned(names::REV_NAT_CAPACITY, 0);

/// (service, backend) → translated connections, per CPU (no atomics on the hot path).
/// Not preallocated: a per-CPU map would otherwise reserve capacity × CPUs counters up
/// front, while only the pairs that see traffic need one.
#[map(name = "LB_METRICS_V1")]
pub static LB_METRICS: PerCpuHashMap<LbMetricsKey, u64> =
    PerCpuHashMap::pinned(names::LB_METRICS_CAPACITY, BPF_F_NO_PREALLOC);

/// Local pods: network namespace cookie → security identity.
#[map(name = "ENDPOINTS_V1")]
pub static ENDPOINTS: HashMap<u64, EndpointValue> = HashMap::pinned(names::ENDPOINTS_CAPACITY, 0);

/// Address prefixes → peer identity and owner (pods, the node, ipBlock CIDRs); a miss is
/// the world.
#[map(name = "IPCACHE_V2")]
pub static IPCACHE: LpmTrie<Addr, IpcacheValue> = LpmTrie::pinned(names::IPCACHE_CAPACITY, 0);

/// Compiled NetworkPolicy: (subject, peer, direction, proto, port prefix) → allow, plus
/// one isolation marker per isolated (subject, direction).
#[map(name = "POLICY_V1")]
pub static POLICY: LpmTrie<PolicyKeyData, PolicyValue> = LpmTrie::pinned(names::POLICY_CAPACITY, 0);

/// Flow events for the agent (`mesh-agent observe`); full → events are dropped, never
/// traffic.
#[map(name = "EVENTS_V1")]
pub static EVENTS: RingBuf = RingBuf::pinned(names::EVENTS_BYTES, 0);

/// Datapath settings written by the agent (policy audit mode).
#[map(name = "CONFIG_V1")]
pub static CONFIG: Array<u32> = Array::pinned(config::LEN, 0);

/// (direction, verdict, reason) → count, per CPU.
#[map(name = "POLICY_METRICS_V1")]
pub static POLICY_METRICS: PerCpuHashMap<VerdictKey, u64> = PerCpuHashMap::pinned(64, 0);

/// UDP peers local sockets sent to: their replies are not new inbound flows.
#[map(name = "UDP_PEERS_V1")]
pub static UDP_PEERS: LruHashMap<RevNatKey, u8> = LruHashMap::pinned(names::UDP_PEERS_CAPACITY, 0);

/// Established TCP sockets of the node's pods, by 4-tuple (sockhash).
#[map(name = "SOCKS_V1")]
pub static SOCKS: SockHash<SockKey> = SockHash::pinned(names::SOCKS_CAPACITY, 0);

/// Per socket of SOCKS: whether its messages are redirected (`redirect::path`).
#[map(name = "SOCK_PATHS_V1")]
pub static SOCK_PATHS: LruHashMap<SockKey, u32> = LruHashMap::pinned(names::SOCKS_CAPACITY, 0);

/// Redirected messages and bytes, passed messages, per CPU.
#[map(name = "SOCKMAP_METRICS_V1")]
pub static SOCKMAP_METRICS: PerCpuArray<u64> = PerCpuArray::pinned(counter::LEN, 0);
