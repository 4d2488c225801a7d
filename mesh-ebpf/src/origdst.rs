//! The original destination of connections sent to the node proxy (`lb.rs` rewrites a
//! connect() to an L7 frontend to the proxy's listener on the pod's loopback and
//! remembers the VIP in ORIG_DST_PENDING, by socket cookie).
//!
//! - sock_ops (`mesh_origdst`, attached with or without sockmap): when the client's
//!   connection is established, its entry moves to ORIG_DST under the key the proxy can
//!   compute from its accepted socket: (netns cookie, client address, client port). When
//!   the proxy's accepted socket closes, the entry goes.
//! - cgroup/getsockopt (`mesh_getsockopt`): `SO_ORIGINAL_DST` (SOL_IP, a `sockaddr_in`,
//!   for an IPv4 VIP) and `IP6T_SO_ORIGINAL_DST` (SOL_IPV6, a `sockaddr_in6`; an IPv4
//!   VIP in its mapped form) on a socket whose peer has an ORIG_DST entry in the
//!   socket's netns are answered with the VIP and port (the Merbridge pattern); every
//!   other call keeps the kernel's answer.
//!
//! Entries of connections that never got established (no proxy listening) or whose
//! proxy socket was never in the node's cgroup age out of the LRU maps.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB, BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG, bpf_sock,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sockopt, sock_ops},
    programs::{SockOpsContext, SockoptContext},
};
use mesh_common::{
    Addr, OrigDstKey,
    origdst::sockopt::{IP6T_SO_ORIGINAL_DST, SO_ORIGINAL_DST, SOL_IP, SOL_IPV6},
};

use crate::{
    ctx::sock_key,
    maps::{ORIG_DST, ORIG_DST_PENDING},
};

/// `TCP_CLOSE` of the kernel's TCP states (the new state is the callback's args[1]).
const TCP_CLOSE: u32 = 7;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;
/// sock_ops and cgroup getsockopt: let the call proceed.
const PROCEED: i32 = 1;

#[sock_ops]
pub fn mesh_origdst(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB => client_established(&ctx),
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => proxy_accepted(&ctx),
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => proxy_closed(&ctx),
        _ => {}
    }
    PROCEED as u32
}

/// The client end of a redirected connection is established: re-key its entry by the
/// client's address and port, which the proxy sees as its peer.
fn client_established(ctx: &SockOpsContext) {
    // SAFETY: helper call on the hook's own context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: plain data, copied out at once.
    let Some(orig) = (unsafe { ORIG_DST_PENDING.get(&cookie) }).copied() else {
        return;
    };
    let _ = ORIG_DST_PENDING.remove(&cookie);
    let Some(sock) = sock_key!(ctx.ops) else {
        return;
    };
    let key = orig_dst_key(netns_cookie(ctx), sock.local, sock.local_port);
    // Overwrites what an earlier connection from the same address and port left.
    let _ = ORIG_DST.insert(&key, &orig, 0);
}

/// The proxy accepted a redirected connection: ask for its state changes, to drop the
/// entry when it closes.
fn proxy_accepted(ctx: &SockOpsContext) {
    let Some(key) = peer_key(ctx) else {
        return;
    };
    // SAFETY: plain data; only presence matters.
    if unsafe { ORIG_DST.get(&key) }.is_some() {
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// A socket with state callbacks closed; if it was the proxy's end of a redirected
/// connection, its peer's entry is no longer needed. (Sockets of sockmap get state
/// callbacks too; the key of any other socket matches no entry.)
fn proxy_closed(ctx: &SockOpsContext) {
    if let Some(key) = peer_key(ctx) {
        let _ = ORIG_DST.remove(&key);
    }
}

/// The ORIG_DST key of the socket's peer, if that peer is a loopback address.
fn peer_key(ctx: &SockOpsContext) -> Option<OrigDstKey> {
    let sock = sock_key!(ctx.ops)?;
    if !sock.remote.is_loopback() {
        return None;
    }
    Some(orig_dst_key(
        netns_cookie(ctx),
        sock.remote,
        sock.remote_port,
    ))
}

fn netns_cookie(ctx: &SockOpsContext) -> u64 {
    // SAFETY: helper call on the hook's own context.
    unsafe { bpf_get_netns_cookie(ctx.ops.cast()) }
}

/// `port_host`: a port in host byte order in a u32, as `SockKey` holds it.
fn orig_dst_key(netns_cookie: u64, addr: Addr, port_host: u32) -> OrigDstKey {
    OrigDstKey {
        netns_cookie,
        addr,
        port: (port_host as u16).to_be(),
        _pad: [0; 6],
    }
}

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    /// Network byte order.
    port: u16,
    /// Network byte order.
    addr: u32,
    zero: [u8; 8],
}
const _: () = assert!(core::mem::size_of::<SockaddrIn>() == 16);

/// `struct sockaddr_in6`.
#[repr(C)]
struct SockaddrIn6 {
    family: u16,
    /// Network byte order.
    port: u16,
    flowinfo: u32,
    /// Network byte order.
    addr: [u32; 4],
    scope_id: u32,
}
const _: () = assert!(core::mem::size_of::<SockaddrIn6>() == 28);

#[cgroup_sockopt(getsockopt)]
pub fn mesh_getsockopt(ctx: SockoptContext) -> i32 {
    answer(&ctx);
    // Never fail the call: unanswered, it keeps the kernel's result.
    PROCEED
}

fn answer(ctx: &SockoptContext) {
    let opt = ctx.sockopt;
    // SAFETY: the kernel's bpf_sockopt for this call; level and optname are readable.
    let (level, optname) = unsafe { ((*opt).level, (*opt).optname) };
    let v6 = match (level, optname) {
        (SOL_IP, SO_ORIGINAL_DST) => false,
        (SOL_IPV6, IP6T_SO_ORIGINAL_DST) => true,
        _ => return,
    };
    // SAFETY: `sk` is always set (a PTR_TO_SOCKET) in a sockopt context.
    let sk = unsafe { (*opt).__bindgen_anon_1.sk };
    let Some(peer) = peer(sk) else {
        return;
    };
    // SAFETY: helper call on the hook's own context.
    let netns = unsafe { bpf_get_netns_cookie(ctx.as_ptr()) };
    let key = OrigDstKey {
        netns_cookie: netns,
        addr: peer.0,
        port: peer.1,
        _pad: [0; 6],
    };
    // SAFETY: plain data, copied out at once.
    let Some(orig) = (unsafe { ORIG_DST.get(&key) }).copied() else {
        return;
    };
    if v6 {
        write(
            ctx,
            &SockaddrIn6 {
                family: AF_INET6,
                port: orig.port,
                flowinfo: 0,
                addr: orig.addr.0,
                scope_id: 0,
            },
        );
    } else if let Some(ip4) = orig.addr.v4_be() {
        write(
            ctx,
            &SockaddrIn {
                family: AF_INET,
                port: orig.port,
                addr: ip4,
                zero: [0; 8],
            },
        );
    }
}

/// The peer address and port (network byte order) of an IPv4 or IPv6 socket.
fn peer(sk: *mut bpf_sock) -> Option<(Addr, u16)> {
    // SAFETY: `sk` is the kernel's socket for this call; every read is of one of its
    // fields at a fixed offset, 32 bits at a time (16 for the port), as the verifier
    // requires.
    unsafe {
        let word = |f: *const u32| core::ptr::read_volatile(f);
        let family = word(core::ptr::addr_of!((*sk).family));
        let ip4 = word(core::ptr::addr_of!((*sk).dst_ip4));
        let ip6 = core::ptr::addr_of!((*sk).dst_ip6) as *const u32;
        let ip6 = [
            word(ip6),
            word(ip6.add(1)),
            word(ip6.add(2)),
            word(ip6.add(3)),
        ];
        let port = core::ptr::read_volatile(core::ptr::addr_of!((*sk).dst_port));
        let addr = match family as u16 {
            AF_INET => Addr::from_v4_be(ip4),
            AF_INET6 => Addr(ip6),
            _ => return None,
        };
        Some((addr, port))
    }
}

/// Writes `value` as the option's value, with its length and success, when the
/// caller's buffer holds it.
#[inline(always)]
fn write<T>(ctx: &SockoptContext, value: &T) {
    let opt = ctx.sockopt;
    let len = core::mem::size_of::<T>();
    // SAFETY: optval..optval_end is the kernel's buffer for the option's value; the
    // write below is checked against its end first, in the form the verifier tracks.
    unsafe {
        let start = (*opt).__bindgen_anon_2.optval as usize;
        let end = (*opt).__bindgen_anon_3.optval_end as usize;
        if start + len > end {
            return;
        }
        core::ptr::copy_nonoverlapping((value as *const T).cast::<u8>(), start as *mut u8, len);
        (*opt).optlen = len as i32;
        (*opt).retval = 0;
    }
}
