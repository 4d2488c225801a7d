//! Kernel side of the mesh: socket-level service load balancing and egress policy in
//! cgroup sock_addr hooks. One file per hook family (`connect.rs`, `sendmsg.rs`,
//! `revnat.rs`), the shared decisions in `lb.rs` and `policy.rs`, every map in `maps.rs`,
//! raw context access only in `ctx.rs`. Besides: ingress policy (`ingress.rs`), same-node
//! socket redirection (`sockops.rs`, `redirect.rs`), and the original destination of
//! connections sent to the node proxy for L7 Services (`origdst.rs`: sock_ops re-keying
//! and the getsockopt program answering `SO_ORIGINAL_DST`), and the capture of plaintext
//! inbound connections for the node proxy (`inbound.rs`, sk_lookup).
#![no_std]
#![no_main]

mod connect;
mod ctx;
mod inbound;
mod ingress;
mod lb;
mod maps;
mod origdst;
mod policy;
mod redirect;
mod revnat;
mod sendmsg;
mod sockops;
mod tunnel;

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // The verifier rejects any program that could reach a panic, so this never runs.
    loop {}
}

/// Kernel license: GPL, because the socket hooks use GPL-only helpers.
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
