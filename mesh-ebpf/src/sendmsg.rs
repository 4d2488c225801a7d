//! cgroup/sendmsg4 and cgroup/sendmsg6: unconnected UDP (DNS style). Each datagram to a
//! VIP goes to a backend chosen like a connect() (with affinity when configured); the
//! reply is made to look like it came from the VIP in `revnat.rs`.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::connect::verdict;

#[cgroup_sock_addr(sendmsg4)]
pub fn mesh_sendmsg4(ctx: SockAddrContext) -> i32 {
    verdict::<false>(&ctx)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn mesh_sendmsg6(ctx: SockAddrContext) -> i32 {
    verdict::<true>(&ctx)
}
