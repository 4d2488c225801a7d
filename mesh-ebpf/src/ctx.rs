//! Safe accessors over the raw hook contexts: the only place that dereferences them.

use aya_ebpf::{EbpfContext, programs::SockAddrContext};

/// Destination of a connect() as the application asked for it.
pub struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> SockAddr<'a> {
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx }
    }

    /// Destination IPv4 address, network byte order.
    pub fn user_ip4(&self) -> u32 {
        // SAFETY: the kernel hands the hook a valid bpf_sock_addr for its lifetime.
        unsafe { (*self.ctx.sock_addr).user_ip4 }
    }

    /// Destination port, network byte order (16 meaningful bits of a u32).
    pub fn user_port(&self) -> u16 {
        // SAFETY: as in `user_ip4`.
        unsafe { (*self.ctx.sock_addr).user_port as u16 }
    }

    /// IP protocol of the socket (IPPROTO_TCP, IPPROTO_UDP).
    pub fn protocol(&self) -> u8 {
        // SAFETY: as in `user_ip4`.
        unsafe { (*self.ctx.sock_addr).protocol as u8 }
    }

    /// Rewrite the destination (both in network byte order).
    pub fn set_dst4(&self, ip4: u32, port: u16) {
        let sa = self.ctx.as_ptr() as *mut aya_ebpf::bindings::bpf_sock_addr;
        // SAFETY: user_ip4 and user_port are writable in connect4/sendmsg4; the verifier
        // checks the access size (32 bits for both).
        unsafe {
            (*sa).user_ip4 = ip4;
            (*sa).user_port = u32::from(port);
        }
    }
}
