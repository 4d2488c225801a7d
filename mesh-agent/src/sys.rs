//! The agent's only `unsafe` code: a few system interfaces that neither std, nix nor aya
//! offer safely, each wrapped in a safe function whose `SAFETY` comment says why the call
//! is sound. The rest of the crate is `#![deny(unsafe_code)]`.
#![expect(
    unsafe_code,
    reason = "the one module that wraps unsafe system interfaces in safe functions"
)]

use std::{
    io,
    os::fd::{AsRawFd as _, BorrowedFd},
};

use aya::maps::{MapData, RingBuf};
use nix::errno::Errno;
use tokio::io::{Interest, unix::AsyncFd};

/// Registers a ring buffer with the tokio reactor, to wait until it is readable.
///
/// # Errors
/// The reactor refused the fd.
pub fn readable_ring_buf(events: RingBuf<MapData>) -> io::Result<AsyncFd<RingBuf<MapData>>> {
    // SAFETY: tokio requires the fd to stay open and the same for the AsyncFd's lifetime.
    // The RingBuf owns its map's fd (MapData holds an OwnedFd), the AsyncFd owns the
    // RingBuf, and RingBuf::as_raw_fd always reports that one fd.
    unsafe { AsyncFd::register_with_interest(events, Interest::READABLE) }
        .map_err(|e| e.into_parts().1)
}

/// A `T` read from the start of `bytes` (which need not be aligned for it); `None` unless
/// `bytes` is exactly as long as a `T`.
pub fn read_pod<T: aya::Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != size_of::<T>() {
        return None;
    }
    // SAFETY: the length matches, T is plain old data valid for every bit pattern
    // (aya::Pod), and read_unaligned copes with any alignment.
    Some(unsafe { bytes.as_ptr().cast::<T>().read_unaligned() })
}

/// The bytes of a plain-old-data value, as the kernel would hand them over.
#[cfg(test)]
pub fn pod_bytes<T: aya::Pod>(value: &T) -> &[u8] {
    // SAFETY: T is plain old data without uninitialised bytes (aya::Pod: repr(C) with
    // explicit padding), and the slice borrows `value` for its whole length.
    unsafe { std::slice::from_raw_parts((&raw const *value).cast::<u8>(), size_of::<T>()) }
}

/// Now on `clock` (a `libc::CLOCK_*` id) in nanoseconds; 0 for a clock the kernel does
/// not know.
pub fn clock_ns(clock: libc::clockid_t) -> i128 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a pointer to a live timespec; the kernel checks the clock id (EINVAL, and
    // `ts` stays zero, for an unknown one).
    unsafe { libc::clock_gettime(clock, &mut ts) };
    i128::from(ts.tv_sec) * 1_000_000_000 + i128::from(ts.tv_nsec)
}

/// The cookie of the network namespace `socket` was created in (`SO_NETNS_COOKIE`): the
/// value `bpf_get_netns_cookie` gives the eBPF programs for that namespace.
///
/// # Errors
/// The getsockopt call failed (a kernel without `SO_NETNS_COOKIE`: before 5.14).
pub fn netns_cookie(socket: BorrowedFd<'_>) -> Result<u64, Errno> {
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `socket` is an open socket for the whole call (borrowed), and `cookie`/`len`
    // are valid, writable and describe a buffer of exactly `len` bytes; the kernel writes
    // at most that.
    let rc = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(Errno::last());
    }
    // A shorter value would leave part of `cookie` unset; the kernel always writes a u64.
    if len as usize != size_of::<u64>() {
        return Err(Errno::EINVAL);
    }
    Ok(cookie)
}

/// Whether the process runs as root (root-only tests check this first).
#[cfg(test)]
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd as _;

    use super::*;

    #[test]
    fn pod_values_round_trip_through_bytes_of_any_alignment() {
        let value: u64 = 0x0102_0304_0506_0708;
        let mut buf = [0u8; 9];
        buf[1..].copy_from_slice(pod_bytes(&value));
        assert_eq!(read_pod::<u64>(&buf[1..]), Some(value));
        assert_eq!(read_pod::<u64>(&buf), None, "too long");
        assert_eq!(read_pod::<u64>(&buf[2..]), None, "too short");
    }

    #[test]
    fn clocks_tick_and_unknown_ones_read_zero() {
        assert!(clock_ns(libc::CLOCK_REALTIME) > 0);
        assert!(clock_ns(libc::CLOCK_MONOTONIC) > 0);
        assert_eq!(clock_ns(1_000), 0);
    }

    #[test]
    fn sockets_of_one_namespace_share_its_cookie() {
        let socket = || std::net::UdpSocket::bind("127.0.0.1:0").expect("bind");
        let (a, b) = (socket(), socket());
        let cookie = netns_cookie(a.as_fd()).expect("cookie");
        assert_ne!(cookie, 0);
        assert_eq!(netns_cookie(b.as_fd()), Ok(cookie));
    }
}
