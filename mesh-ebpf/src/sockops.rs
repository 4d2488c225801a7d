//! sock_ops: every established TCP socket of the node's pods (the connecting and the
//! accepting side) whose peer address is on this node too (IPCACHE marks local pods and
//! the node's own addresses) goes into SOCKS, keyed by its 4-tuple, with its path in
//! SOCK_PATHS still undecided (`redirect.rs` decides at the first message). Sockets of
//! connections to other nodes are left alone entirely. The kernel drops a socket from
//! SOCKS when it closes; its SOCK_PATHS entry goes at the same time (state callback).

use aya_ebpf::{
    bindings::{
        BPF_ANY, BPF_NOEXIST, BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB,
        BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB, BPF_SOCK_OPS_STATE_CB, BPF_SOCK_OPS_STATE_CB_FLAG,
        bpf_sock_ops,
    },
    macros::sock_ops,
    maps::lpm_trie::Key,
    programs::SockOpsContext,
};
use mesh_common::{Addr, SockKey, policy::IPCACHE_LOCAL, redirect::path};

use crate::maps::{IPCACHE, SOCK_PATHS, SOCKS};

const AF_INET: u32 = 2;
const AF_INET6: u32 = 10;
/// `TCP_CLOSE` of the kernel's TCP states (the new state is the callback's args[1]).
const TCP_CLOSE: u32 = 7;

#[sock_ops]
pub fn mesh_sockops(ctx: SockOpsContext) -> u32 {
    match ctx.op() {
        BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB | BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB => {
            established(&ctx)
        }
        BPF_SOCK_OPS_STATE_CB if ctx.arg(1) == TCP_CLOSE => {
            if let Some(key) = sock_key(ctx.ops) {
                // Absent when the socket never got one: nothing to do.
                let _ = SOCK_PATHS.remove(key);
            }
        }
        _ => {}
    }
    0
}

fn established(ctx: &SockOpsContext) {
    let Some(mut key) = sock_key(ctx.ops) else {
        return;
    };
    let local_peer = IPCACHE
        .get(Key::new(128, key.remote))
        .is_some_and(|v| v.flags & IPCACHE_LOCAL != 0);
    if !local_peer {
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

/// The socket's 4-tuple; None for a family other than IPv4/IPv6.
fn sock_key(ops: *mut bpf_sock_ops) -> Option<SockKey> {
    // Every address field is read at its fixed offset, one 32-bit word at a time, before
    // choosing by family: the verifier rejects context loads at a computed offset or
    // wider than the field, which the compiler produces if it may merge the branches.
    // SAFETY: `ops` is the kernel's bpf_sock_ops for this call; reads are of its fields.
    unsafe {
        let word = |p: *const u32| core::ptr::read_volatile(p);
        let family = word(core::ptr::addr_of!((*ops).family));
        let l4 = word(core::ptr::addr_of!((*ops).local_ip4));
        let r4 = word(core::ptr::addr_of!((*ops).remote_ip4));
        let l6 = core::ptr::addr_of!((*ops).local_ip6) as *const u32;
        let r6 = core::ptr::addr_of!((*ops).remote_ip6) as *const u32;
        let l6 = [word(l6), word(l6.add(1)), word(l6.add(2)), word(l6.add(3))];
        let r6 = [word(r6), word(r6.add(1)), word(r6.add(2)), word(r6.add(3))];
        let (local, remote) = match family {
            AF_INET => (Addr::from_v4_be(l4), Addr::from_v4_be(r4)),
            AF_INET6 => (Addr(l6), Addr(r6)),
            _ => return None,
        };
        // local_port is in host byte order; remote_port holds the network-order port in
        // its upper half on little-endian machines, which from_be turns into host order.
        Some(SockKey {
            local,
            remote,
            local_port: word(core::ptr::addr_of!((*ops).local_port)),
            remote_port: u32::from_be(word(core::ptr::addr_of!((*ops).remote_port))),
        })
    }
}
