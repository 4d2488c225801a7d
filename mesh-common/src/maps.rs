//! The map registry: every map of the datapath, described once. The contract between the
//! kernel programs, the agent and anyone reading `<bpffs>/mesh/<node>/` with bpftool.
//!
//! A name is also the file name of the map's pin; a layout change bumps its suffix. The
//! kernel programs take each map's capacity and flags from [`REGISTRY`] (see
//! [`spec`]); the agent drives from it the map sizes it loads with (`--map-size-*`),
//! the planner's capacity checks, and the fill levels of `status` and `/metrics`. A unit
//! test of the agent checks the built eBPF object against this table.

use core::mem::size_of;

use crate::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, EndpointValue, IpcacheKey,
    IpcacheValue, LbMetricsKey, OrigDstKey, OrigDstValue, PolicyKey, PolicyValue, RevNatKey,
    RevNatValue, ServiceKey, ServiceValue, SockKey,
    event::{VerdictKey, config},
    redirect::counter,
};

/// Frontends (VIP, port, protocol) → service id, backend count, affinity.
pub const SERVICES: &str = "SERVICES_V2";
/// Backend slots: (service id, slot 1..=count) → backend id.
pub const SERVICE_BACKENDS: &str = "SVC_BACKENDS_V1";
/// Backends: backend id → address, port, protocol, state.
pub const BACKENDS: &str = "BACKENDS_V2";
/// Session affinity (LRU): (client netns cookie, service id) → backend, last use.
pub const AFFINITY: &str = "AFFINITY_V1";
/// Reverse translation (LRU): (socket cookie, backend address, port) → VIP and port.
pub const REV_NAT: &str = "REV_NAT_V1";
/// Per-CPU connection counters: (service id, backend id) → count.
pub const LB_METRICS: &str = "LB_METRICS_V1";

/// Local pods: network namespace cookie → security identity.
pub const ENDPOINTS: &str = "ENDPOINTS_V1";
/// Addresses and prefixes → identity (LPM trie).
pub const IPCACHE: &str = "IPCACHE_V2";
/// (subject, direction, peer, protocol, port prefix) → allow / isolation (LPM trie).
pub const POLICY: &str = "POLICY_V1";

/// Flow events (ring buffer of `FlowEvent`), read by the agent.
pub const EVENTS: &str = "EVENTS_V1";
/// Datapath settings (array of u32, indexes in `event::config`).
pub const CONFIG: &str = "CONFIG_V1";
/// Per-CPU policy verdict counters: (direction, verdict) → count.
pub const POLICY_METRICS: &str = "POLICY_METRICS_V1";

/// UDP peers a local socket sent to (LRU): (socket cookie, peer, port) → 1, so ingress
/// policy lets their replies in.
pub const UDP_PEERS: &str = "UDP_PEERS_V1";

/// Established same-node TCP sockets (sockhash), keyed by 4-tuple.
pub const SOCKS: &str = "SOCKS_V1";
/// Per socket of SOCKS: whether its messages are redirected (LRU hash, SockKey → u32).
pub const SOCK_PATHS: &str = "SOCK_PATHS_V1";
/// Per-CPU sockmap counters (array, indexes in `redirect::counter`).
pub const SOCKMAP_METRICS: &str = "SOCKMAP_METRICS_V1";

/// Connections redirected to the node proxy, until established (LRU): socket cookie →
/// the VIP and port the client dialled.
pub const ORIG_DST_PENDING: &str = "ORIG_DST_PENDING_V1";
/// Established connections redirected to the node proxy (LRU): (client netns, client
/// loopback address, port) → the VIP and port it dialled, for `SO_ORIGINAL_DST`.
pub const ORIG_DST: &str = "ORIG_DST_V1";

/// The node proxy's plaintext inbound listeners (sockhash), by the local pod address
/// they serve: where the sk_lookup program hands captured connections.
pub const INBOUND_SOCKS: &str = "INBOUND_SOCKS_V1";

/// `BPF_F_NO_PREALLOC` (uapi `linux/bpf.h`): the kernel allocates a hash map's entries
/// when they are inserted instead of all of them at creation. LPM tries always carry it;
/// LRU maps cannot (their eviction lists are preallocated).
pub const NO_PREALLOC: u32 = 1;

/// The kind of a map: its `BPF_MAP_TYPE_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// `BPF_MAP_TYPE_HASH`.
    Hash,
    /// `BPF_MAP_TYPE_LRU_HASH`: full → the least recently used entry is evicted.
    LruHash,
    /// `BPF_MAP_TYPE_PERCPU_HASH`: one value per CPU.
    PerCpuHash,
    /// `BPF_MAP_TYPE_LPM_TRIE`: longest-prefix match; keys start with a u32 prefix length.
    LpmTrie,
    /// `BPF_MAP_TYPE_ARRAY`: every index exists from creation.
    Array,
    /// `BPF_MAP_TYPE_PERCPU_ARRAY`.
    PerCpuArray,
    /// `BPF_MAP_TYPE_RINGBUF`: its capacity is a size in bytes.
    RingBuf,
    /// `BPF_MAP_TYPE_SOCKHASH`: sockets by key.
    SockHash,
}

impl MapKind {
    /// The kernel's `BPF_MAP_TYPE_*` number.
    pub const fn bpf_type(self) -> u32 {
        match self {
            Self::Hash => 1,
            Self::Array => 2,
            Self::PerCpuHash => 5,
            Self::PerCpuArray => 6,
            Self::LruHash => 9,
            Self::LpmTrie => 11,
            Self::SockHash => 18,
            Self::RingBuf => 27,
        }
    }

    /// Short name, as `bpftool map show` spells the type.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Hash => "hash",
            Self::LruHash => "lru_hash",
            Self::PerCpuHash => "percpu_hash",
            Self::LpmTrie => "lpm_trie",
            Self::Array => "array",
            Self::PerCpuArray => "percpu_array",
            Self::RingBuf => "ringbuf",
            Self::SockHash => "sockhash",
        }
    }

    /// Whether the map has a fixed fill: an array holds every index from creation, a
    /// ring buffer its whole size. Other kinds hold the entries inserted.
    pub const fn fixed_fill(self) -> bool {
        matches!(self, Self::Array | Self::PerCpuArray | Self::RingBuf)
    }
}

/// How a map's capacity is chosen when the agent creates it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sizing {
    /// Fixed by the datapath (array indexes, ring buffer bytes, a few counters).
    Fixed,
    /// `--<flag>` entries, by default [`MapSpec::capacity`]. The map is not preallocated,
    /// so a generous capacity costs only its hash buckets until entries arrive.
    Flag(&'static str),
    /// `--<flag>` entries; by default a share of `--map-size-ratio` of the node's memory,
    /// between `min` and [`MapSpec::capacity`]. For the maps of per-connection state,
    /// LRU maps the kernel preallocates whole (and SOCKS, sized with SOCK_PATHS).
    NodeMemory {
        /// The command-line flag, without its leading dashes.
        flag: &'static str,
        /// The smallest capacity the node's memory may give it.
        min: u32,
    },
}

impl Sizing {
    /// The `--map-size-*` flag (without dashes) that sets the capacity, if any.
    pub const fn flag(self) -> Option<&'static str> {
        match self {
            Self::Fixed => None,
            Self::Flag(flag) | Self::NodeMemory { flag, .. } => Some(flag),
        }
    }
}

/// One datapath map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// Name, as pinned under `<bpffs>/mesh/<node>/`.
    pub name: &'static str,
    /// Map type.
    pub kind: MapKind,
    /// Key size in bytes, as the kernel sees it (an LPM key includes its prefix length).
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU kinds).
    pub value_size: u32,
    /// `max_entries` in the eBPF object: the default when sized by a flag, the ceiling
    /// when sized by node memory, bytes for a ring buffer.
    pub capacity: u32,
    /// Creation flags (`map_flags`), e.g. [`NO_PREALLOC`].
    pub flags: u32,
    /// How the agent sizes it.
    pub sizing: Sizing,
    /// What one entry stands for (command-line help); for a ring buffer, its bytes.
    pub purpose: &'static str,
}

impl MapSpec {
    const fn new<K, V>(
        name: &'static str,
        kind: MapKind,
        capacity: u32,
        purpose: &'static str,
    ) -> Self {
        let flags = match kind {
            // Entries arrive with the cluster's objects (written by the agent, read by
            // the programs): no reason to pay for all of them up front. Lookups cost
            // the same; only an insert allocates.
            MapKind::Hash | MapKind::PerCpuHash | MapKind::LpmTrie => NO_PREALLOC,
            _ => 0,
        };
        Self {
            name,
            kind,
            key_size: size_of::<K>() as u32,
            value_size: size_of::<V>() as u32,
            capacity,
            flags,
            sizing: Sizing::Fixed,
            purpose,
        }
    }

    const fn sized(self, sizing: Sizing) -> Self {
        Self { sizing, ..self }
    }

    const fn preallocated(self) -> Self {
        Self { flags: 0, ..self }
    }
}

/// Every map of the datapath.
pub const REGISTRY: [MapSpec; 19] = [
    MapSpec::new::<ServiceKey, ServiceValue>(
        SERVICES,
        MapKind::Hash,
        65_536,
        "frontends plus one entry per cluster IP",
    )
    .sized(Sizing::Flag("map-size-services")),
    MapSpec::new::<BackendSlotKey, u32>(
        SERVICE_BACKENDS,
        MapKind::Hash,
        262_144,
        "the sum of all frontends' backend counts",
    )
    .sized(Sizing::Flag("map-size-backend-slots")),
    MapSpec::new::<u32, Backend>(
        BACKENDS,
        MapKind::Hash,
        131_072,
        "distinct backend address/port/protocol triples",
    )
    .sized(Sizing::Flag("map-size-backends")),
    MapSpec::new::<AffinityKey, AffinityValue>(
        AFFINITY,
        MapKind::LruHash,
        65_536,
        "client/service pairs remembered for session affinity (LRU)",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-affinity",
        min: 4_096,
    }),
    MapSpec::new::<RevNatKey, RevNatValue>(
        REV_NAT,
        MapKind::LruHash,
        262_144,
        "translated sockets remembered for getpeername/recvmsg (LRU)",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-rev-nat",
        min: 16_384,
    }),
    MapSpec::new::<LbMetricsKey, u64>(
        LB_METRICS,
        MapKind::PerCpuHash,
        262_144,
        "(service, backend) connection counters plus one refusal counter per service",
    )
    .sized(Sizing::Flag("map-size-metrics")),
    MapSpec::new::<u64, EndpointValue>(ENDPOINTS, MapKind::Hash, 4_096, "pods on this node")
        .sized(Sizing::Flag("map-size-endpoints")),
    // One listener per local pod address: sized with ENDPOINTS (pods on this node).
    MapSpec::new::<Addr, u32>(
        INBOUND_SOCKS,
        MapKind::SockHash,
        4_096,
        "node proxy listeners for captured inbound plaintext, by local pod address",
    )
    .sized(Sizing::Flag("map-size-endpoints")),
    MapSpec::new::<IpcacheKey, IpcacheValue>(
        IPCACHE,
        MapKind::LpmTrie,
        262_144,
        "pod addresses and policy CIDRs, cluster-wide",
    )
    .sized(Sizing::Flag("map-size-ipcache")),
    MapSpec::new::<PolicyKey, PolicyValue>(
        POLICY,
        MapKind::LpmTrie,
        65_536,
        "compiled policy entries of this node's pods",
    )
    .sized(Sizing::Flag("map-size-policy")),
    // A ring buffer's size is a power of two (of pages).
    MapSpec::new::<(), ()>(
        EVENTS,
        MapKind::RingBuf,
        256 * 1024,
        "bytes of flow events: 4,096 events of 64 bytes",
    ),
    MapSpec::new::<u32, u32>(
        CONFIG,
        MapKind::Array,
        config::LEN,
        "datapath settings, by `event::config` index",
    ),
    // A few dozen triples at most: preallocating them spares the hot path an allocation.
    MapSpec::new::<VerdictKey, u64>(
        POLICY_METRICS,
        MapKind::PerCpuHash,
        64,
        "(direction, verdict, reason) counters",
    )
    .preallocated(),
    MapSpec::new::<RevNatKey, u8>(
        UDP_PEERS,
        MapKind::LruHash,
        65_536,
        "peers local UDP sockets sent to, whose replies pass ingress policy (LRU)",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-udp-peers",
        min: 4_096,
    }),
    // SOCKS and SOCK_PATHS hold the same sockets: one flag sizes both.
    MapSpec::new::<SockKey, u32>(
        SOCKS,
        MapKind::SockHash,
        65_536,
        "established same-node sockets redirected by sockmap",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-socks",
        min: 4_096,
    }),
    MapSpec::new::<SockKey, u32>(
        SOCK_PATHS,
        MapKind::LruHash,
        65_536,
        "established same-node sockets redirected by sockmap",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-socks",
        min: 4_096,
    }),
    MapSpec::new::<u32, u64>(
        SOCKMAP_METRICS,
        MapKind::PerCpuArray,
        counter::LEN,
        "sockmap counters, by `redirect::counter` index",
    ),
    // A connection sits in ORIG_DST_PENDING for one handshake, then in ORIG_DST for its
    // life: one flag sizes both.
    MapSpec::new::<u64, OrigDstValue>(
        ORIG_DST_PENDING,
        MapKind::LruHash,
        65_536,
        "connections redirected to the node proxy (LRU)",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-orig-dst",
        min: 4_096,
    }),
    MapSpec::new::<OrigDstKey, OrigDstValue>(
        ORIG_DST,
        MapKind::LruHash,
        65_536,
        "connections redirected to the node proxy (LRU)",
    )
    .sized(Sizing::NodeMemory {
        flag: "map-size-orig-dst",
        min: 4_096,
    }),
];

/// The registry entry of map `name`; a name not in the registry fails compilation when
/// evaluated in a constant (as the kernel programs' map definitions do).
pub const fn spec(name: &str) -> MapSpec {
    let mut i = 0;
    while i < REGISTRY.len() {
        if str_eq(REGISTRY[i].name, name) {
            return REGISTRY[i];
        }
        i += 1;
    }
    panic!("map not in the registry")
}

const fn str_eq(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    let mut i = 0;
    while i < a.len() {
        if a[i] != b[i] {
            return false;
        }
        i += 1;
    }
    true
}

// Every name once; maps sharing a flag share their capacity (the agent gives them one
// size); the kernel's rules on preallocation (an LRU map always preallocates, an LPM
// trie never does); maps sized by a flag not preallocated; a floor below its ceiling.
const _: () = {
    let mut i = 0;
    while i < REGISTRY.len() {
        let spec = REGISTRY[i];
        match spec.kind {
            MapKind::LruHash => assert!(spec.flags & NO_PREALLOC == 0),
            MapKind::LpmTrie => assert!(spec.flags & NO_PREALLOC != 0),
            _ => {}
        }
        match spec.sizing {
            // A generous capacity costs a flag-sized map only its buckets.
            // (A sockhash takes no flag for it: it allocates each entry on insert.)
            Sizing::Flag(_) => {
                assert!(spec.flags & NO_PREALLOC != 0 || matches!(spec.kind, MapKind::SockHash))
            }
            Sizing::NodeMemory { min, .. } => assert!(min <= spec.capacity),
            Sizing::Fixed => {}
        }
        let mut j = i + 1;
        while j < REGISTRY.len() {
            assert!(!str_eq(REGISTRY[i].name, REGISTRY[j].name));
            if let (Some(a), Some(b)) = (REGISTRY[i].sizing.flag(), REGISTRY[j].sizing.flag()) {
                assert!(!str_eq(a, b) || REGISTRY[i].capacity == REGISTRY[j].capacity);
            }
            j += 1;
        }
        i += 1;
    }
};

/// Names of the programs, as pinned under `<bpffs>/mesh/<node>/` (their links get a
/// `_link` suffix).
pub mod programs {
    /// cgroup/connect4: service translation for IPv4 connect().
    pub const CONNECT4: &str = "mesh_connect4";
    /// cgroup/connect6: the same for IPv6 (and IPv4-mapped) connect().
    pub const CONNECT6: &str = "mesh_connect6";
    /// cgroup/sendmsg4: translation for unconnected UDP over IPv4.
    pub const SENDMSG4: &str = "mesh_sendmsg4";
    /// cgroup/sendmsg6: the same over IPv6.
    pub const SENDMSG6: &str = "mesh_sendmsg6";
    /// cgroup/recvmsg4: replies appear to come from the VIP (IPv4).
    pub const RECVMSG4: &str = "mesh_recvmsg4";
    /// cgroup/recvmsg6: the same over IPv6.
    pub const RECVMSG6: &str = "mesh_recvmsg6";
    /// cgroup/getpeername4: the application sees the VIP it dialled (IPv4).
    pub const GETPEERNAME4: &str = "mesh_getpeername4";
    /// cgroup/getpeername6: the same over IPv6.
    pub const GETPEERNAME6: &str = "mesh_getpeername6";
    /// cgroup_skb/ingress: ingress network policy where packets reach pod sockets.
    pub const INGRESS: &str = "mesh_ingress";
    /// sock_ops: established same-node TCP sockets into SOCKS.
    pub const SOCKOPS: &str = "mesh_sockops";
    /// sk_msg on SOCKS: socket-to-socket redirection.
    pub const SK_MSG: &str = "mesh_redirect";
    /// sock_ops: connections redirected to the node proxy, re-keyed for ORIG_DST once
    /// established (attached with or without sockmap).
    pub const ORIG_DST_OPS: &str = "mesh_origdst";
    /// cgroup/getsockopt: `SO_ORIGINAL_DST` for the node proxy's accepted sockets.
    pub const GETSOCKOPT: &str = "mesh_getsockopt";
    /// sk_lookup, attached to each local pod's network namespace: captured inbound
    /// plaintext to the node proxy's listener.
    pub const INBOUND: &str = "mesh_inbound";

    /// The cgroup sock_addr programs, in attach order.
    pub const SOCK_ADDR: [&str; 8] = [
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
    ];
    /// Every program attached in any configuration (SOCKOPS and SK_MSG come on top with
    /// sockmap), in attach order: the original-destination programs before connect4/6
    /// redirect anything to the proxy, then the sock_addr ones, then ingress.
    pub const ALL: [&str; 11] = [
        ORIG_DST_OPS,
        GETSOCKOPT,
        CONNECT4,
        CONNECT6,
        SENDMSG4,
        SENDMSG6,
        RECVMSG4,
        RECVMSG6,
        GETPEERNAME4,
        GETPEERNAME6,
        INGRESS,
    ];
}
