//! The only module with `unsafe`: the raw Linux calls the test bed needs (setns, a write
//! between fork and exec, SO_NETNS_COOKIE). Everything above it is safe code.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

/// `SO_NETNS_COOKIE` (Linux 5.14+); not exported by every libc version.
const SO_NETNS_COOKIE: libc::c_int = 71;

/// Moves the calling process into a cgroup and a network namespace, from preopened fds.
///
/// Meant for `CommandExt::pre_exec`, i.e. between fork and exec. It makes only two
/// syscalls and allocates nothing, so it is safe to call in the forked child of a
/// multi-threaded parent. The cgroup move comes first so that the process is already
/// in the cgroup when it creates its first socket (cgroup BPF hooks key on the cgroup
/// of the socket's creator).
///
/// `cgroup_procs` is an fd of `<cgroup>/cgroup.procs` opened for writing; writing "0"
/// to it moves the writer itself. `netns` is an fd of a netns file (`/run/netns/X`).
pub(crate) fn enter_cgroup_and_netns(cgroup_procs: Option<&File>, netns: &File) -> io::Result<()> {
    if let Some(procs) = cgroup_procs {
        // SAFETY: the fd is open for as long as `procs` is borrowed; the buffer is a
        // static 1-byte slice.
        let n = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
        if n != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    setns_net(netns)
}

/// Switches the calling thread's network namespace to the one `netns` refers to.
///
/// Only the calling thread moves (setns affects the caller's task); callers use a
/// dedicated thread or a pre-exec child so that the test process stays where it is.
pub(crate) fn setns_net(netns: &File) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we own for the duration of the call.
    let rc = unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has entered the network namespace at `netns_path`.
///
/// The thread is thrown away afterwards, so the namespace switch never leaks into the
/// rest of the process. The thread stays in the caller's cgroup.
pub(crate) fn in_netns<T: Send>(netns_path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    let netns = File::open(netns_path)?;
    std::thread::scope(|scope| {
        scope
            .spawn(move || {
                setns_net(&netns)?;
                Ok(f())
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// The cookie of the network namespace the calling thread is in (SO_NETNS_COOKIE on a
/// throwaway socket), the same value `bpf_get_netns_cookie` returns in eBPF.
pub(crate) fn current_netns_cookie() -> io::Result<u64> {
    // SAFETY: plain syscall; the returned fd is immediately owned by `OwnedFd`.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a freshly created, valid descriptor that nothing else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let mut cookie: u64 = 0;
    let mut len = size_of::<u64>() as libc::socklen_t;
    // SAFETY: `cookie` and `len` are valid for writes and `len` holds the buffer size.
    let rc = unsafe {
        libc::getsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cookie)
}

/// Effective user id of this process.
pub(crate) fn euid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

/// Sends `signal` to `pid`.
///
/// # Safety
/// The caller must guarantee that `pid` still names the process it means, i.e. that
/// the process is its own child that has not been reaped yet (a reaped pid can be
/// reused by an unrelated process).
pub(crate) unsafe fn kill(pid: u32, signal: libc::c_int) -> io::Result<()> {
    let pid = libc::pid_t::try_from(pid).map_err(|_| io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: plain syscall; the pid's identity is the caller's obligation (see above).
    if unsafe { libc::kill(pid, signal) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
