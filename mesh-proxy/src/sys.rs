//! The system calls the proxy needs beyond std and tokio: entering a network namespace,
//! checking which namespace a file is, the original destination of a redirected
//! connection, and the namespace's accept-queue migration sysctl. All go through nix's
//! safe wrappers (or plain files), so this module holds no `unsafe`.

use std::{
    io,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6},
    os::fd::{AsFd, OwnedFd},
    path::Path,
};

use nix::{
    sched::{CloneFlags, setns},
    sys::{
        socket::{getsockopt, sockopt},
        stat::fstat,
    },
};

/// Opens `/proc/<pid>/ns/net` and returns it with its inode.
pub fn open_netns(pid: u32) -> io::Result<(OwnedFd, u64)> {
    let path = format!("/proc/{pid}/ns/net");
    let file = std::fs::File::open(Path::new(&path))?;
    let fd = OwnedFd::from(file);
    let stat = fstat(fd.as_fd()).map_err(io::Error::from)?;
    Ok((fd, stat.st_ino))
}

/// Moves the calling thread into the network namespace `fd`.
pub fn enter_netns(fd: impl AsFd) -> io::Result<()> {
    setns(fd, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Sets `net.ipv4.tcp_migrate_req = 1` in the calling thread's network namespace: when
/// a listener of a SO_REUSEPORT group closes, the connections in its accept queue move
/// to another listener of the group instead of being reset. `/proc/sys/net` resolves to
/// the namespace of the thread that opens it, so a thread that entered a pod's namespace
/// sets the pod's.
pub fn enable_request_migration() -> io::Result<()> {
    std::fs::write("/proc/sys/net/ipv4/tcp_migrate_req", "1")
}

/// The destination a redirected connection was dialled to (`SO_ORIGINAL_DST`, or
/// `IP6T_SO_ORIGINAL_DST` for IPv6 sockets), as the datapath's getsockopt hook answers.
pub fn original_dst(sock: impl AsFd, ipv6: bool) -> io::Result<SocketAddr> {
    if ipv6 {
        let a = getsockopt(&sock, sockopt::Ip6tOriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V6(SocketAddrV6::new(
            Ipv6Addr::from(a.sin6_addr.s6_addr),
            u16::from_be(a.sin6_port),
            0,
            a.sin6_scope_id,
        )))
    } else {
        let a = getsockopt(&sock, sockopt::OriginalDst).map_err(io::Error::from)?;
        Ok(SocketAddr::V4(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
            u16::from_be(a.sin_port),
        )))
    }
}

/// Whether an error is the kernel refusing the connect (EPERM/EACCES: the connect
/// hooks' NetworkPolicy verdict).
pub fn is_denied(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::EPERM | libc::EACCES))
}
