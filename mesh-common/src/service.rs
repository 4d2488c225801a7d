//! Service load-balancing tables.
//!
//! Lookup in connect(): `SERVICES[(vip, port, proto)]` gives the service id and the
//! number of backend slots `n`; a random slot `1..=n` is looked up in
//! `SERVICE_BACKENDS[(id, slot)]`, which names a backend id; `BACKENDS[id]` gives the
//! address to connect to. The indirection lets a backend's address be stored once however
//! many services use it, and lets the agent grow or shrink a service without a window
//! in which a lookup misses (slots are written before the count grows, and removed
//! after it shrinks).

/// IP protocol number of TCP (IPPROTO_TCP).
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP (IPPROTO_UDP).
pub const PROTO_UDP: u8 = 17;

/// `ServiceKey` with `port == 0 && proto == 0`: marks an address as a cluster IP, so a
/// connect() to a port the Service does not expose is refused instead of leaking out.
pub const VIP_MARKER_PORT: u16 = 0;

/// Key of the SERVICES map: one frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    /// Cluster IP, network byte order (as in `bpf_sock_addr.user_ip4`).
    pub addr: u32,
    /// Service port, network byte order; 0 for the VIP marker entry.
    pub port: u16,
    /// IP protocol ([`PROTO_TCP`], [`PROTO_UDP`]); 0 for the VIP marker entry.
    pub proto: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 8);

impl ServiceKey {
    /// The frontend `addr:port/proto` (`addr` and `port` in host byte order).
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self { addr: addr.to_be(), port: port.to_be(), proto, _pad: 0 }
    }

    /// The marker entry that says `addr` (host byte order) is a cluster IP.
    pub const fn vip_marker(addr: u32) -> Self {
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
    /// Service id, host byte order; the first half of [`BackendSlotKey`]. 0 for the VIP marker.
    pub id: u32,
    /// Number of backend slots (1..=count are valid), host byte order. 0 means the
    /// frontend exists but has no ready backend: connect() is refused.
    pub count: u32,
}
const _: () = assert!(core::mem::size_of::<ServiceValue>() == 8);

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
    /// Backend (pod) IPv4 address, network byte order.
    pub addr: u32,
    /// Target port, network byte order.
    pub port: u16,
    /// IP protocol, as in [`ServiceKey::proto`].
    pub proto: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 8);

impl Backend {
    /// The backend `addr:port/proto` (`addr` and `port` in host byte order).
    pub const fn new(addr: u32, port: u16, proto: u8) -> Self {
        Self { addr: addr.to_be(), port: port.to_be(), proto, _pad: 0 }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::ServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::ServiceValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::BackendSlotKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::Backend {}
}
