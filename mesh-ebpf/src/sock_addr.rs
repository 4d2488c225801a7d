//! cgroup/connect4: socket-level service load balancing.
//!
//! Decision order for a connect() to `addr:port` with protocol `p`:
//! 1. `SERVICES[(addr, port, p)]` exists: a frontend.
//!    - count == 0 (no ready backend): refuse with ECONNREFUSED.
//!    - else pick slot `1 + random % count`, translate to that backend.
//! 2. `SERVICES[(addr, 0, 0)]` exists: `addr` is a cluster IP but not this port or
//!    protocol: refuse with ECONNREFUSED (as kube-proxy's reject rule does), at once.
//! 3. Otherwise: not ours, pass untouched.
//!
//! Failure policy (decided once, in the entry): a lookup that misses in the middle of a
//! translation (an update racing the connect) refuses the connect; a VIP has no route,
//! so passing it on would only turn a refusal into a timeout.

use aya_ebpf::{
    helpers::{bpf_get_prandom_u32, bpf_set_retval},
    macros::cgroup_sock_addr,
    programs::SockAddrContext,
};
use mesh_common::{BackendSlotKey, ServiceKey};

use crate::{
    ctx::SockAddr,
    maps::{BACKENDS, SERVICE_BACKENDS, SERVICES},
};

/// Return value of a cgroup sock_addr program that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value that fails the syscall (with the errno set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// What to do with one connect().
enum Verdict {
    /// Not a service address.
    Pass,
    /// Translated to a backend.
    Translated,
    /// A cluster IP with no usable backend for this port.
    Refuse,
}

#[cgroup_sock_addr(connect4)]
pub fn mesh_connect4(ctx: SockAddrContext) -> i32 {
    match try_connect4(&SockAddr::new(&ctx)) {
        Ok(Verdict::Pass | Verdict::Translated) => ALLOW,
        Ok(Verdict::Refuse) | Err(()) => refuse(),
    }
}

fn refuse() -> i32 {
    // SAFETY: helper call; set_retval is allowed in cgroup connect hooks (kernel 5.18+).
    unsafe { bpf_set_retval(-ECONNREFUSED) };
    REJECT
}

fn try_connect4(sa: &SockAddr) -> Result<Verdict, ()> {
    let addr = sa.user_ip4();
    let key = ServiceKey { addr, port: sa.user_port(), proto: sa.protocol(), _pad: 0 };
    // SAFETY: values are plain data; a concurrent update can at worst give a stale copy.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        let marker = ServiceKey { addr, port: 0, proto: 0, _pad: 0 };
        // SAFETY: as above.
        return Ok(match unsafe { SERVICES.get(&marker) } {
            Some(_) => Verdict::Refuse,
            None => Verdict::Pass,
        });
    };
    let count = svc.count;
    if count == 0 {
        return Ok(Verdict::Refuse);
    }
    // SAFETY: helper call without arguments.
    let slot = unsafe { bpf_get_prandom_u32() } % count + 1;
    let slot_key = BackendSlotKey { service_id: svc.id, slot };
    // SAFETY: as above.
    let backend_id = unsafe { SERVICE_BACKENDS.get(&slot_key) }.ok_or(())?;
    // SAFETY: as above.
    let backend = unsafe { BACKENDS.get(backend_id) }.ok_or(())?;
    sa.set_dst4(backend.addr, backend.port);
    Ok(Verdict::Translated)
}
