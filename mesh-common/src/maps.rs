//! Map names and capacities: the contract between the kernel programs, the agent and
//! anyone reading `<bpffs>/mesh/<node>/` with bpftool.
//!
//! A name is also the file name of the map's pin. A layout change bumps the suffix.
//! Capacities are defaults: the agent can size the maps at load time.

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

/// Every map, for pinning, cleanup and status.
pub const ALL: [&str; 16] = [
    SERVICES,
    SERVICE_BACKENDS,
    BACKENDS,
    AFFINITY,
    REV_NAT,
    LB_METRICS,
    ENDPOINTS,
    IPCACHE,
    POLICY,
    EVENTS,
    CONFIG,
    POLICY_METRICS,
    UDP_PEERS,
    SOCKS,
    SOCK_PATHS,
    SOCKMAP_METRICS,
];

/// Capacity of [`SOCKS`] (established sockets of the node's pods).
pub const SOCKS_CAPACITY: u32 = 65_536;

/// Capacity of [`UDP_PEERS`].
pub const UDP_PEERS_CAPACITY: u32 = 65_536;

/// Size of [`EVENTS`] in bytes (a power of two; 4,096 events of 64 bytes).
pub const EVENTS_BYTES: u32 = 256 * 1024;

/// Default capacity of [`SERVICES`] (frontends, plus one VIP marker per cluster IP).
pub const SERVICES_CAPACITY: u32 = 65_536;
/// Default capacity of [`SERVICE_BACKENDS`] (sum of all frontends' backend counts).
pub const SERVICE_BACKENDS_CAPACITY: u32 = 262_144;
/// Default capacity of [`BACKENDS`] (distinct backend address/port/protocol triples).
pub const BACKENDS_CAPACITY: u32 = 131_072;
/// Capacity of [`AFFINITY`]: least recently used entries are evicted.
pub const AFFINITY_CAPACITY: u32 = 65_536;
/// Capacity of [`REV_NAT`]: one entry per translated socket and backend; LRU.
pub const REV_NAT_CAPACITY: u32 = 262_144;
/// Capacity of [`LB_METRICS`]: (service, backend) pairs plus one "refused" per service.
pub const LB_METRICS_CAPACITY: u32 = 262_144;

/// Default capacity of [`ENDPOINTS`] (pods on one node).
pub const ENDPOINTS_CAPACITY: u32 = 4_096;
/// Default capacity of [`IPCACHE`] (pod addresses and policy CIDRs cluster-wide).
pub const IPCACHE_CAPACITY: u32 = 262_144;
/// Default capacity of [`POLICY`] (compiled rule entries on one node).
pub const POLICY_CAPACITY: u32 = 65_536;

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
    /// Every program: the sock_addr ones, then the ingress program.
    pub const ALL: [&str; 9] = {
        let mut all = [INGRESS; 9];
        let mut i = 0;
        while i < SOCK_ADDR.len() {
            all[i] = SOCK_ADDR[i];
            i += 1;
        }
        all
    };
}
