//! The agent's only `unsafe` code: a few system interfaces that neither std, nix nor aya
//! offer safely, each wrapped in a safe function whose `SAFETY` comment says why the call
//! is sound. The rest of the crate is `#![deny(unsafe_code)]`.
#![expect(
    unsafe_code,
    reason = "the one module that wraps unsafe system interfaces in safe functions"
)]

use std::{
    ffi::CString,
    io,
    os::{
        fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::Path,
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

/// `BPF_OBJ_PIN` of `enum bpf_cmd`.
const BPF_OBJ_PIN: libc::c_long = 6;
/// `BPF_LINK_CREATE` of `enum bpf_cmd`.
const BPF_LINK_CREATE: libc::c_long = 28;

/// The `BPF_LINK_CREATE` member of `union bpf_attr` (the kernel zero-fills the rest).
#[repr(C)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
}

/// The `BPF_OBJ_*` member of `union bpf_attr`.
#[repr(C)]
struct ObjPinAttr {
    pathname: u64,
    bpf_fd: u32,
    file_flags: u32,
    path_fd: i32,
    _pad: u32,
}

/// `bpf(cmd, attr, sizeof attr)`.
///
/// # Safety
/// `attr` must be the `bpf_attr` member `cmd` reads, with every pointer in it valid for
/// the call.
unsafe fn bpf<T>(cmd: libc::c_long, attr: &T) -> io::Result<libc::c_long> {
    // SAFETY: the caller vouches for `attr`; the kernel reads size_of::<T>() bytes of it.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            (attr as *const T).cast::<libc::c_void>(),
            size_of::<T>() as libc::c_uint,
        )
    };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

/// Attaches program `prog` to `target` (a cgroup) with a new bpf_link of `attach_type`
/// (`enum bpf_attach_type`), for the program types whose aya link cannot be pinned.
///
/// # Errors
/// The kernel refused the link (e.g. a program of another type, or no permission).
pub fn bpf_link_create(
    prog: BorrowedFd<'_>,
    target: BorrowedFd<'_>,
    attach_type: u32,
) -> io::Result<OwnedFd> {
    let attr = LinkCreateAttr {
        prog_fd: prog.as_raw_fd() as u32,
        target_fd: target.as_raw_fd() as u32,
        attach_type,
        flags: 0,
    };
    // SAFETY: the BPF_LINK_CREATE member, with two fds borrowed for the call.
    let fd = unsafe { bpf(BPF_LINK_CREATE, &attr) }?;
    // SAFETY: on success the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins the bpf object `fd` (a link, a map...) at `path` on a bpffs.
///
/// # Errors
/// The path exists, is not on a bpffs, or contains a NUL byte.
pub fn bpf_obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjPinAttr {
        pathname: path.as_ptr() as u64,
        bpf_fd: fd.as_raw_fd() as u32,
        file_flags: 0,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: the BPF_OBJ_PIN member; `path` (NUL-terminated) and `fd` outlive the call.
    unsafe { bpf(BPF_OBJ_PIN, &attr) }.map(drop)
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
