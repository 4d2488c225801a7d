//! cgroup/connect4 and cgroup/connect6: translate connect() to a Service VIP (TCP, and
//! connected UDP) into a connect() to a backend; see `lb.rs` for the decision order.
//!
//! Failure policy: a lookup that misses mid-translation refuses the connect. A VIP has no
//! route, so passing it on would only turn a refusal into a timeout.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    ctx::SockAddr,
    lb::{self, Verdict},
};

/// Lets the call proceed.
pub const ALLOW: i32 = 1;
/// Fails the call (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Fails the call with ECONNREFUSED.
pub fn refuse() -> i32 {
    // SAFETY: helper call; set_retval is allowed in cgroup connect/sendmsg hooks (5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Entry decision shared by the connect and sendmsg hooks (IPv6 fields when `V6`).
#[inline(always)]
pub fn verdict<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    match lb::translate::<V6>(&SockAddr::new(ctx)) {
        Ok(Verdict::Pass | Verdict::Translated) => ALLOW,
        Ok(Verdict::Refuse) | Err(lb::Miss) => refuse(),
    }
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    verdict::<false>(&ctx)
}

#[cgroup_sock_addr(connect6)]
pub fn mesh_connect6(ctx: SockAddrContext) -> i32 {
    verdict::<true>(&ctx)
}
