//! Original destinations of connections redirected to the node proxy (L7 Services).
//!
//! connect4/6 send a client's connection to an L7 frontend to the proxy's listener on
//! the client pod's own loopback ([`crate::service::PROXY_OUTBOUND_PORT`]) and remember
//! the VIP it dialled in ORIG_DST_PENDING, by socket cookie. Once the connection is
//! established, sock_ops moves the entry to ORIG_DST, keyed by what the proxy sees of
//! the client: the pod's network namespace and the client's loopback address and port
//! (the peer of the proxy's accepted socket). The cgroup getsockopt program answers
//! `SO_ORIGINAL_DST` / `IP6T_SO_ORIGINAL_DST` from it, so the proxy uses the standard
//! socket option. The client's sock_ops state callback removes both entries when its
//! socket closes; both maps are LRU, so entries of sockets that never got there age out.

use crate::Addr;

/// Value of ORIG_DST_PENDING and ORIG_DST: what the client dialled.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrigDstValue {
    /// The Service VIP (IPv4 mapped), network byte order.
    pub addr: Addr,
    /// The Service port, network byte order.
    pub port: u16,
    /// IP protocol ([`crate::service::PROTO_TCP`]).
    pub proto: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
    /// Service id of the frontend (as in SERVICES), host byte order.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<OrigDstValue>() == 24);

/// Key of ORIG_DST: the client end of a redirected connection, as the proxy's accepted
/// socket sees its peer.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OrigDstKey {
    /// Cookie of the client pod's network namespace (`bpf_get_netns_cookie`), host byte
    /// order.
    pub netns_cookie: u64,
    /// The client's local address: the loopback it connected from (IPv4 mapped), network
    /// byte order.
    pub addr: Addr,
    /// The client's local port, network byte order.
    pub port: u16,
    /// Explicit padding, always 0.
    pub _pad: [u8; 6],
}
const _: () = assert!(core::mem::size_of::<OrigDstKey>() == 32);

/// `getsockopt` level and option names the getsockopt program answers.
pub mod sockopt {
    /// `SOL_IP` (= `IPPROTO_IP`).
    pub const SOL_IP: i32 = 0;
    /// `SOL_IPV6` (= `IPPROTO_IPV6`).
    pub const SOL_IPV6: i32 = 41;
    /// `SO_ORIGINAL_DST` (`linux/netfilter_ipv4.h`): a `sockaddr_in`.
    pub const SO_ORIGINAL_DST: i32 = 80;
    /// `IP6T_SO_ORIGINAL_DST` (`linux/netfilter_ipv6/ip6_tables.h`): a `sockaddr_in6`.
    pub const IP6T_SO_ORIGINAL_DST: i32 = 80;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY (both): plain-old-data, repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::OrigDstValue {}
    unsafe impl aya::Pod for super::OrigDstKey {}
}
