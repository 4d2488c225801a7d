//! Service load-balancing tables.
//!
//! Lookup in connect()/sendmsg(): `SERVICES[(vip, port, proto)]` gives the service id
//! and the number of active backend slots `n`; with session affinity an unexpired
//! `AFFINITY[(client netns, service)]` entry whose backend is still active wins,
//! otherwise a random slot `1..=n` is looked up in `SERVICE_BACKENDS[(id, slot)]`,
//! which names a backend id; `BACKENDS[id]` gives the address to connect to. The
//! indirection stores a backend once however many services use it, and lets the agent
//! grow or shrink a service without a window in which a lookup misses (slots are
//! written before the count grows, and removed after it shrinks).

use crate::{Addr, wire::wire_enum};

wire_enum! {
    /// An IP protocol (IANA protocol number), named as Kubernetes spells it.
    pub enum Protocol {
        /// IPPROTO_TCP.
        Tcp = 6 => "TCP",
        /// IPPROTO_UDP.
        Udp = 17 => "UDP",
        /// IPPROTO_SCTP (validated in policies; the load balancer does not serve it).
        Sctp = 132 => "SCTP",
    }
}

/// IP protocol number of TCP (IPPROTO_TCP).
pub const PROTO_TCP: u8 = Protocol::Tcp as u8;
/// IP protocol number of UDP (IPPROTO_UDP).
pub const PROTO_UDP: u8 = Protocol::Udp as u8;

/// `ServiceKey` with `port == 0 && proto == 0`: marks an address as a cluster IP, so a
/// connect() to a port the Service does not expose is refused instead of leaking out.
pub const VIP_MARKER_PORT: u16 = 0;

/// [`ServiceValue::flags`]: ClientIP session affinity is on.
pub const SVC_FLAG_AFFINITY: u32 = 1;
/// [`ServiceValue::flags`]: an L7 frontend. connect4/6 send the client to the node
/// proxy's in-pod listener ([`PROXY_OUTBOUND_PORT`] on the pod's loopback) instead of
/// a backend, and remember the original destination for it.
pub const SVC_FLAG_L7: u32 = 2;

/// Port of the node proxy's outbound listener inside each pod's network namespace, on
/// the pod's loopback (127.0.0.1 and ::1), as ztunnel's in-pod mode uses 15001.
pub const PROXY_OUTBOUND_PORT: u16 = 15001;

/// Port of the node proxy's HBONE listener (mTLS tunnels between node proxies) on each
/// enrolled pod's own address, as in Istio ambient.
pub const HBONE_PORT: u16 = 15008;

wire_enum! {
    /// [`Backend::state`]: whether a backend takes new connections.
    pub enum BackendState {
        /// Receives new connections.
        Active = 0 => "active",
        /// Terminating; no new connections, existing ones untouched.
        Terminating = 1 => "terminating",
        /// Failed its health checks; no new connections.
        Unhealthy = 2 => "unhealthy",
    }
}

/// [`Backend::state`]: [`BackendState::Active`].
pub const BACKEND_ACTIVE: u8 = BackendState::Active as u8;
/// [`Backend::state`]: [`BackendState::Terminating`].
pub const BACKEND_TERMINATING: u8 = BackendState::Terminating as u8;
/// [`Backend::state`]: [`BackendState::Unhealthy`].
pub const BACKEND_UNHEALTHY: u8 = BackendState::Unhealthy as u8;

impl BackendState {
    /// The name of a wire state; a code this build does not know reads as unhealthy,
    /// which is what the datapath makes of it (no new connections).
    pub fn name_of(code: u8) -> &'static str {
        Self::from_u8(code).unwrap_or(Self::Unhealthy).as_str()
    }
}

/// Key of the SERVICES map: one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Cluster IP (IPv4 mapped), network byte order.
    pub addr: Addr,
    /// Service port, network byte order; 0 for the VIP marker entry.
    pub port: u16,
    /// [`Protocol`] code ([`PROTO_TCP`], [`PROTO_UDP`]); 0 for the VIP marker entry.
    pub proto: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    /// The frontend `addr:port/proto` (`port` in host byte order).
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port: port.to_be(),
            proto,
            _pad: 0,
        }
    }

    /// The marker entry that says `addr` is a cluster IP.
    pub const fn vip_marker(addr: Addr) -> Self {
        Self::new(addr, VIP_MARKER_PORT, 0)
    }

    /// True for the marker entry of [`ServiceKey::vip_marker`].
    pub const fn is_vip_marker(&self) -> bool {
        self.port == 0 && self.proto == 0
    }
}

/// Value of the SERVICES map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceValue {
    /// Service id (host byte order), the first half of [`BackendSlotKey`]; 0 for the VIP
    /// marker.
    pub id: u32,
    /// Number of active backend slots (1..=count are valid), host byte order. 0 means
    /// the frontend exists but has no usable backend: connect() is refused.
    pub count: u32,
    /// `SVC_FLAG_*` bits, host byte order.
    pub flags: u32,
    /// Session affinity timeout in seconds (with [`SVC_FLAG_AFFINITY`]), host byte order.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 16);

impl ServiceValue {
    /// Value of a VIP marker entry.
    pub const MARKER: Self = Self {
        id: 0,
        count: 0,
        flags: 0,
        affinity_timeout_s: 0,
    };
}

/// Key of the SERVICE_BACKENDS map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendSlotKey {
    /// Service id, host byte order.
    pub service_id: u32,
    /// Slot number, 1-based, host byte order.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<BackendSlotKey>() == 8);

/// Value of the BACKENDS map (key: backend id, `u32` host byte order, never 0).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Backend {
    /// Backend (pod) address (IPv4 mapped), network byte order.
    pub addr: Addr,
    /// Target port, network byte order.
    pub port: u16,
    /// IP protocol, as in [`ServiceKey::proto`].
    pub proto: u8,
    /// [`BackendState`] code (`BACKEND_*`). Only active backends are in slots; the state lets affinity
    /// entries and operators see a terminating or unhealthy backend at once.
    pub state: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    /// The active backend `addr:port/proto` (`port` in host byte order).
    pub const fn new(addr: Addr, port: u16, proto: u8) -> Self {
        Self {
            addr,
            port: port.to_be(),
            proto,
            state: BACKEND_ACTIVE,
        }
    }
}

/// Key of the AFFINITY map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityKey {
    /// Network namespace cookie of the client (its pod), host byte order.
    pub netns_cookie: u64,
    /// Service id, host byte order.
    pub service_id: u32,
    /// Explicit padding, always 0.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// Value of the AFFINITY map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AffinityValue {
    /// Backend id the client sticks to, host byte order.
    pub backend_id: u32,
    /// Explicit padding, always 0.
    pub _pad: u32,
    /// `bpf_ktime_get_ns` of the last connection that used this entry.
    pub last_used_ns: u64,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// Key of the REV_NAT map: one translated socket and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatKey {
    /// Socket cookie (`bpf_get_socket_cookie`), host byte order.
    pub cookie: u64,
    /// Backend address (IPv4 mapped), network byte order.
    pub addr: Addr,
    /// Backend port, network byte order.
    pub port: u16,
    /// Explicit padding, always 0.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);

/// Value of the REV_NAT map: what the application dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RevNatValue {
    /// VIP (IPv4 mapped), network byte order.
    pub addr: Addr,
    /// Service port, network byte order.
    pub port: u16,
    /// Explicit padding, always 0.
    pub _pad: u16,
    /// Service id, host byte order.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<RevNatValue>() == 24);

/// Key of the per-CPU LB_METRICS map; the value is a `u64` count of connections (or,
/// for UDP sendmsg, datagrams) translated to that backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct LbMetricsKey {
    /// Service id, host byte order.
    pub service_id: u32,
    /// Backend id, host byte order; 0 counts connections refused for lack of a backend.
    pub backend_id: u32,
}
const _: () = assert!(core::mem::size_of::<LbMetricsKey>() == 8);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all below): plain-old-data, repr(C), explicit padding, every bit pattern
    // valid.
    unsafe impl aya::Pod for crate::Addr {}
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::ServiceValue {}
    unsafe impl aya::Pod for super::BackendSlotKey {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::AffinityKey {}
    unsafe impl aya::Pod for super::AffinityValue {}
    unsafe impl aya::Pod for super::RevNatKey {}
    unsafe impl aya::Pod for super::RevNatValue {}
    unsafe impl aya::Pod for super::LbMetricsKey {}
}
