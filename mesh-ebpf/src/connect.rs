//! cgroup/connect4 and cgroup/connect6: translate connect() to a Service VIP (TCP, and
//! connected UDP) into a connect() to a backend (see `lb.rs` for the decision order),
//! then apply egress policy to the final destination (`policy.rs`). A connect() to an
//! L7 frontend goes to the node proxy on the pod's own loopback instead, without a
//! policy check: the proxy's own connection to the backend, opened inside the pod's
//! network namespace, is judged as the pod's. A TCP connection between enrolled pods goes
//! to the proxy too, after policy, for the mesh tunnel (`tunnel.rs`).
//!
//! Failure policy: a lookup that misses mid-translation refuses the connect. A VIP has no
//! route, so passing it on would only turn a refusal into a timeout.

use aya_ebpf::{helpers::bpf_set_retval, macros::cgroup_sock_addr, programs::SockAddrContext};

use mesh_common::{
    RevNatKey,
    service::{PROTO_TCP, PROTO_UDP},
};

use crate::{
    ctx::SockAddr,
    lb::{self, Verdict},
    maps::UDP_PEERS,
    policy, tunnel,
};

/// Lets the call proceed.
pub const ALLOW: i32 = 1;
/// Fails the call (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;
const EPERM: i32 = 1;

/// Fails the call with ECONNREFUSED.
pub fn refuse() -> i32 {
    // SAFETY: helper call; set_retval is allowed in cgroup connect/sendmsg hooks (5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

/// Fails the call with EPERM: denied by network policy.
fn deny() -> i32 {
    // SAFETY: as in `refuse`.
    unsafe { bpf_set_retval(-EPERM) };
    REJECT
}

/// Entry decision shared by the connect and sendmsg hooks (IPv6 fields when `V6`):
/// load balancing first, so that policy judges the backend actually dialled.
#[inline(always)]
pub fn verdict<const V6: bool>(ctx: &SockAddrContext) -> i32 {
    let sa = SockAddr::new(ctx);
    match lb::translate::<V6>(&sa) {
        Ok(Verdict::Proxied) => ALLOW,
        Ok(verdict @ (Verdict::Pass | Verdict::Translated(..))) => {
            let (dst, port, proto) = (sa.addr::<V6>(), sa.port(), sa.protocol());
            if proto == PROTO_TCP {
                let Ok(judged) = policy::egress(&sa, &dst, port, proto) else {
                    return deny();
                };
                // Only a known local pod can be in the mesh.
                let Some((caller, peer)) = judged else {
                    return ALLOW;
                };
                let dialled = match verdict {
                    Verdict::Translated(key, id) => Some((key, id)),
                    _ => None,
                };
                return match tunnel::capture::<V6>(&sa, &caller, &peer, dialled) {
                    Ok(_) => ALLOW,
                    Err(lb::Miss) => refuse(),
                };
            }
            if proto != PROTO_UDP {
                return if policy::egress_allowed(&sa, &dst, port, proto) {
                    ALLOW
                } else {
                    deny()
                };
            }
            // UDP has no handshake: a socket already exchanging with this peer (it sent
            // there, or ingress policy let the peer's datagram in) continues the flow,
            // like a reply; only a new peer is judged.
            let key = RevNatKey {
                cookie: sa.socket_cookie(),
                addr: dst,
                port,
                _pad: [0; 6],
            };
            // SAFETY: plain data.
            if unsafe { UDP_PEERS.get(&key) }.is_some() {
                return ALLOW;
            }
            if !policy::egress_allowed(&sa, &dst, port, proto) {
                return deny();
            }
            let _ = UDP_PEERS.insert(&key, &1, 0);
            ALLOW
        }
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
