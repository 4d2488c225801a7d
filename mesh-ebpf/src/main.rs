//! Kernel side of the mesh. One file per hook; maps live in `maps.rs`; raw context
//! reads and writes are confined to `ctx.rs`.
#![no_std]
#![no_main]

mod ctx;
mod maps;
mod sock_addr;

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
