//! sock_ops: every established TCP socket of the node's pods (the connecting and the
//! accepting side) whose peer address is on this node too, and neither end opted out
//! (IPCACHE marks such local pods and the node's own addresses), goes into SOCKS, keyed by its 4-tuple, with its path in
//! SOCK_PATHS still undecided (`redirect.rs` decides at the first message). Sockets of
//! connections to other nodes are left alone entirely. The kernel drops a socket from
//! SOCKS when it closes; its SOCK_PATHS entry goes at the same time (state callback).
//! Attached only with `--sockmap=true`; the node proxy's original destinations have a
//! sock_ops program of their own (`origdst.rs`), attached either way.

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
    },
    helpers::bpf_get_netns_cookie,
    macros::sock_ops,
    maps::lpm_trie::Key,
    programs::SockOpsContext,
};
use mesh_common::{
    Addr,
    policy::{ENDPOINT_NO_SOCKMAP, IPCACHE_REDIRECT},
    redirect::path,
};

use crate::{
    ctx::sock_key,
    maps::{ENDPOINTS, IPCACHE, SOCK_PATHS, SOCKS},
};

/// `TCP_CLOSE` of the kernel's TCP states (the new state is the callback's args[1]).
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            established(&ctx)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            if let Some(key) = sock_key!(ctx.ops) {
                // Absent when the socket never got one: nothing to do.
                let _ = SOCK_PATHS.remove(key);
            }
        }
        _ => {}
    }
    0
}

fn established(ctx: &SockOpsContext) {
    let Some(mut key) = sock_key!(ctx.ops) else {
        return;
    };
    // Both ends: the peer must be on this node, and neither pod may have opted out
    // (by address, and by network namespace for loopback connections inside a pod).
    if !redirectable(&key.remote) || !redirectable(&key.local) || opted_out(ctx) {
        return;
    }
    // SAFETY: the context pointer is the kernel's bpf_sock_ops for this call.
    let ops = unsafe { &mut *ctx.ops };
    // A full map only means this connection is not accelerated.
    if SOCKS.update(&mut key, ops, u64::from(BPF_NOEXIST)).is_err() {
        return;
    }
    // Overwrites whatever an earlier connection with this 4-tuple left.
    if SOCK_PATHS
        .insert(key, path::UNDECIDED, u64::from(BPF_ANY))
        .is_ok()
    {
        // Ask for state changes, to drop the entry when the socket closes.
        let _ = ctx.set_cb_flags((ctx.cb_flags() | BPF_SOCK_OPS_STATE_CB_FLAG) as i32);
    }
}

/// Whether `addr` is on this node and open to redirection: loopback, or marked so in
/// IPCACHE (a local pod's address, or the node's).
fn redirectable(addr: &Addr) -> bool {
    addr.is_loopback()
        || IPCACHE
            .get(Key::new(128, *addr))
            .is_some_and(|v| v.flags & IPCACHE_REDIRECT != 0)
}

/// Whether the socket's pod (found by its network namespace) opted out.
fn opted_out(ctx: &SockOpsContext) -> bool {
    // SAFETY: helper call on the hook's own context.
    let cookie = unsafe { bpf_get_netns_cookie(ctx.ops.cast()) };
    // SAFETY: plain-data value, read once.
    unsafe { ENDPOINTS.get(&cookie) }.is_some_and(|e| e.flags & ENDPOINT_NO_SOCKMAP != 0)
}
