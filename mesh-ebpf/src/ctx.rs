//! Safe accessors over the raw hook context: the only place that dereferences it.

use aya_ebpf::{
    EbpfContext,
    bindings::bpf_sock_addr,
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    programs::{SkLookupContext, SockAddrContext},
};
use mesh_common::{Addr, SockKey};

/// The address argument of a socket call (connect, sendmsg, recvmsg, getpeername).
pub struct SockAddr<'a> {
    ctx: &'a SockAddrContext,
}

impl<'a> SockAddr<'a> {
    pub fn new(ctx: &'a SockAddrContext) -> Self {
        Self { ctx }
    }

    fn raw(&self) -> *mut bpf_sock_addr {
        self.ctx.sock_addr
    }

    /// The IPv4 address (connect4, sendmsg4, recvmsg4, getpeername4), mapped.
    pub fn addr4(&self) -> Addr {
        // SAFETY: the kernel hands the hook a valid bpf_sock_addr for its lifetime, and
        // user_ip4 is readable in every IPv4 sock_addr hook.
        Addr::from_v4_be(unsafe { (*self.raw()).user_ip4 })
    }

    /// The IPv6 address (connect6, sendmsg6, recvmsg6, getpeername6).
    pub fn addr6(&self) -> Addr {
        // The verifier only allows 32-bit reads of user_ip6, one word at a time.
        // SAFETY: as in `addr4`, for the IPv6 hooks.
        unsafe {
            let r = self.raw();
            Addr([
                (*r).user_ip6[0],
                (*r).user_ip6[1],
                (*r).user_ip6[2],
                (*r).user_ip6[3],
            ])
        }
    }

    /// Port, network byte order (16 meaningful bits of a u32).
    pub fn port(&self) -> u16 {
        // SAFETY: as in `addr4`.
        unsafe { (*self.raw()).user_port as u16 }
    }

    /// IP protocol of the socket (IPPROTO_TCP, IPPROTO_UDP).
    pub fn protocol(&self) -> u8 {
        // SAFETY: as in `addr4`.
        unsafe { (*self.raw()).protocol as u8 }
    }

    /// Rewrite the IPv4 address and the port (both network byte order).
    pub fn set4(&self, ip4_be: u32, port: u16) {
        // SAFETY: user_ip4/user_port are writable in the IPv4 hooks; 32-bit stores.
        unsafe {
            (*self.raw()).user_ip4 = ip4_be;
            (*self.raw()).user_port = u32::from(port);
        }
    }

    /// Rewrite the IPv6 address and the port (both network byte order).
    pub fn set6(&self, addr: &Addr, port: u16) {
        // SAFETY: user_ip6/user_port are writable in the IPv6 hooks; 32-bit stores.
        unsafe {
            let r = self.raw();
            (*r).user_ip6[0] = addr.0[0];
            (*r).user_ip6[1] = addr.0[1];
            (*r).user_ip6[2] = addr.0[2];
            (*r).user_ip6[3] = addr.0[3];
            (*r).user_port = u32::from(port);
        }
    }

    /// Cookie of the socket, stable for its lifetime.
    pub fn socket_cookie(&self) -> u64 {
        // SAFETY: helper call on the hook's own context.
        unsafe { bpf_get_socket_cookie(self.ctx.as_ptr()) }
    }

    /// Cookie of the socket's network namespace: identifies the client pod.
    pub fn netns_cookie(&self) -> u64 {
        // SAFETY: helper call on the hook's own context.
        unsafe { bpf_get_netns_cookie(self.ctx.as_ptr()) }
    }
}

// Family-generic access is monomorphised (`const V6: bool`), never a runtime choice: the
// verifier rejects context reads at a computed offset ("dereference of modified ctx ptr").
impl SockAddr<'_> {
    /// The address in the family's fields (IPv6 when `V6`, else IPv4 mapped).
    #[inline(always)]
    pub fn addr<const V6: bool>(&self) -> Addr {
        if V6 { self.addr6() } else { self.addr4() }
    }

    /// Rewrites address and port in the family's fields; false when an IPv6 address
    /// cannot be written to an IPv4 hook (a misconfigured Service mixing families).
    #[inline(always)]
    pub fn set<const V6: bool>(&self, addr: &Addr, port: u16) -> bool {
        if V6 {
            self.set6(addr, port);
            return true;
        }
        match addr.v4_be() {
            Some(ip4) => {
                self.set4(ip4, port);
                true
            }
            None => false,
        }
    }
}

/// The 4-tuple of the socket behind a sock_ops (`*mut bpf_sock_ops`) or sk_msg
/// (`*mut sk_msg_md`) context, which name these fields alike; None for a family other
/// than IPv4/IPv6. A macro because the two contexts are distinct types.
///
/// Every address field is read at its fixed offset, one 32-bit word at a time, before
/// choosing by family: the verifier rejects context loads at a computed offset or wider
/// than the field, which the compiler produces if it may merge the two branches' reads.
/// `local_port` is in host byte order; `remote_port` holds the network-order port in its
/// upper half on little-endian machines, which `from_be` turns into host order.
macro_rules! sock_key {
    ($ptr:expr) => {{
        const AF_INET: u32 = 2;
        const AF_INET6: u32 = 10;
        let p = $ptr;
        // SAFETY: `p` is the kernel's context for this call; all reads are of its fields.
        unsafe {
            let word = |f: *const u32| core::ptr::read_volatile(f);
            let family = word(core::ptr::addr_of!((*p).family));
            let l4 = word(core::ptr::addr_of!((*p).local_ip4));
            let r4 = word(core::ptr::addr_of!((*p).remote_ip4));
            let l6 = core::ptr::addr_of!((*p).local_ip6) as *const u32;
            let r6 = core::ptr::addr_of!((*p).remote_ip6) as *const u32;
            let l6 = [word(l6), word(l6.add(1)), word(l6.add(2)), word(l6.add(3))];
            let r6 = [word(r6), word(r6.add(1)), word(r6.add(2)), word(r6.add(3))];
            let addrs = match family {
                AF_INET => Some((
                    ::mesh_common::Addr::from_v4_be(l4),
                    ::mesh_common::Addr::from_v4_be(r4),
                )),
                AF_INET6 => Some((::mesh_common::Addr(l6), ::mesh_common::Addr(r6))),
                _ => None,
            };
            addrs.map(|(local, remote)| ::mesh_common::SockKey {
                local,
                remote,
                local_port: word(core::ptr::addr_of!((*p).local_port)),
                // bpf_sk_lookup declares it 16-bit with padding; the verifier keeps
                // allowing the 32-bit read the other contexts take.
                remote_port: u32::from_be(word(core::ptr::addr_of!((*p).remote_port).cast())),
            })
        }
    }};
}
pub(crate) use sock_key;

/// The connection an sk_lookup program is asked about: a packet looking for a socket.
pub struct Lookup<'a> {
    ctx: &'a SkLookupContext,
}

impl<'a> Lookup<'a> {
    pub fn new(ctx: &'a SkLookupContext) -> Self {
        Self { ctx }
    }

    /// IP protocol (IPPROTO_TCP, IPPROTO_UDP).
    pub fn protocol(&self) -> u8 {
        // SAFETY: the kernel hands the program a valid bpf_sk_lookup for its lifetime,
        // and protocol is a readable 32-bit field.
        unsafe { core::ptr::read_volatile(core::ptr::addr_of!((*self.ctx.lookup).protocol)) as u8 }
    }

    /// Its addresses and ports (IPv4 mapped); None for another family.
    pub fn key(&self) -> Option<SockKey> {
        sock_key!(self.ctx.lookup)
    }
}
