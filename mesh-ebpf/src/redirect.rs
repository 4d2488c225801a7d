//! sk_msg on SOCKS: each message a socket sends is handed to the ingress queue of the
//! peer socket, skipping the TCP/IP stack on both sides. The first message decides for
//! the socket's whole life (SOCK_PATHS): redirected if the peer socket is in SOCKS by
//! then, otherwise that message went through the stack and every later one follows it,
//! since a redirected message could overtake bytes still in flight. Policy already ran:
//! a denied connection never became established, so it never entered the map.

use aya_ebpf::{
    bindings::{BPF_F_INGRESS, sk_action::SK_PASS},
    macros::sk_msg,
    programs::SkMsgContext,
};
use mesh_common::redirect::{counter, path};

use crate::{
    ctx::sock_key,
    maps::{SOCK_PATHS, SOCKMAP_METRICS, SOCKS},
};

#[sk_msg]
pub fn mesh_redirect(ctx: SkMsgContext) -> u32 {
    let Some(me) = sock_key!(ctx.msg) else {
        return SK_PASS;
    };
    // SAFETY: `ctx.msg` is the kernel's sk_msg_md for this call.
    let size = u64::from(unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*ctx.msg).size)) });
    // No entry (evicted): the stack, which never reorders what was redirected before.
    let Some(state) = SOCK_PATHS.get_ptr_mut(me) else {
        add(counter::STACK_MSGS, 1);
        return SK_PASS;
    };
    // SAFETY: the entry is this socket's; its sendmsg calls are serialised by the socket
    // lock, so nothing else writes it meanwhile.
    let decided = unsafe { *state };
    if decided == path::STACK {
        add(counter::STACK_MSGS, 1);
        return SK_PASS;
    }
    let mut peer = me.peer();
    let redirected =
        SOCKS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS);
    if decided == path::UNDECIDED {
        // SAFETY: as above.
        unsafe {
            *state = if redirected {
                path::REDIRECT
            } else {
                path::STACK
            }
        };
    }
    if redirected {
        add(counter::REDIRECTED_MSGS, 1);
        add(counter::REDIRECTED_BYTES, size);
    } else {
        // The peer socket is not (or no longer) in the map: the stack, as without us.
        add(counter::STACK_MSGS, 1);
    }
    SK_PASS
}

fn add(index: u32, n: u64) {
    if let Some(v) = SOCKMAP_METRICS.get_ptr_mut(index) {
        // SAFETY: per-CPU slot: no other CPU writes it, no re-entry on this CPU.
        unsafe { *v += n };
    }
}
