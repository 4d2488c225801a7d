//! Same-node socket redirection: established TCP sockets whose both ends are on this
//! node sit in a SOCKHASH keyed by their 4-tuple, and sk_msg hands each sendmsg
//! straight to the peer socket's receive queue.
//!
//! Each direction of a connection decides once, at its first message, whether it is
//! redirected (SOCK_PATHS): if the peer socket was not in the map yet, that message took
//! the TCP path, and redirecting later ones could overtake it, so the direction stays on
//! the TCP path for good.

use crate::Addr;

/// Key of the SOCKS sockhash: one socket's 4-tuple, seen from that socket.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SockKey {
    /// Local address (IPv4 mapped), network byte order.
    pub local: Addr,
    /// Remote address (IPv4 mapped), network byte order.
    pub remote: Addr,
    /// Local port, host byte order.
    pub local_port: u32,
    /// Remote port, host byte order (the hooks' `remote_port` is converted).
    pub remote_port: u32,
}
const _: () = assert!(core::mem::size_of::<SockKey>() == 40);

impl SockKey {
    /// The key of the socket at the other end of the same connection.
    pub const fn peer(&self) -> Self {
        Self {
            local: self.remote,
            remote: self.local,
            local_port: self.remote_port,
            remote_port: self.local_port,
        }
    }
}

/// Value of SOCK_PATHS: how one socket's messages travel.
pub mod path {
    /// Established; no message sent yet.
    pub const UNDECIDED: u32 = 0;
    /// Messages go straight to the peer socket.
    pub const REDIRECT: u32 = 1;
    /// Messages go through the TCP/IP stack.
    pub const STACK: u32 = 2;
}

/// Index of the SOCKMAP_METRICS per-CPU array (u64 values).
pub mod counter {
    /// Messages handed socket to socket.
    pub const REDIRECTED_MSGS: u32 = 0;
    /// Bytes of those messages.
    pub const REDIRECTED_BYTES: u32 = 1;
    /// Messages of same-node sockets sent through the TCP/IP stack (their direction's
    /// first message found no peer socket in the map yet).
    pub const STACK_MSGS: u32 = 2;
    /// Number of counters.
    pub const LEN: u32 = 3;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), no padding, every bit pattern valid.
    unsafe impl aya::Pod for super::SockKey {}
}
