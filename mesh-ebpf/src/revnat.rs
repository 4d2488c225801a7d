//! Reverse translation: the application sees the VIP it dialled, never the backend.
//! cgroup/recvmsg4/6 rewrite the source of UDP replies; cgroup/getpeername4/6 rewrite
//! the peer of connected sockets. Both look up (socket cookie, backend address, port)
//! in REV_NAT, written when the call was translated. These hooks cannot fail a call.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use mesh_common::RevNatKey;

use crate::{connect::ALLOW, ctx::SockAddr, maps::REV_NAT};

#[inline(always)]
fn reverse<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = SockAddr::new(ctx);
    let key = RevNatKey {
        cookie: sa.socket_cookie(),
        addr: sa.addr::<V6>(),
        port: sa.port(),
        _pad: [0; 6],
    };
    // SAFETY: plain data; a concurrent update can at worst give a stale copy.
    if let Some(vip) = unsafe { REV_NAT.get(&key) } {
        // Never fails here: the VIP has the family of the address it replaces.
        let _ = sa.set::<V6>(&vip.addr, vip.port);
    }
    ALLOW
}

#[cgroup_sock_addr(recvmsg4)]
pub fn mesh_recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx)
}

#[cgroup_sock_addr(recvmsg6)]
pub fn mesh_recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx)
}

#[cgroup_sock_addr(getpeername4)]
pub fn mesh_getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::<false>(&ctx)
}

#[cgroup_sock_addr(getpeername6)]
pub fn mesh_getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::<true>(&ctx)
}
