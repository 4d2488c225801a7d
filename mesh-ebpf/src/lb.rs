//! The load-balancing decision shared by connect() and unconnected sendmsg().
//!
//! Decision order for a call to `addr:port` with protocol `p`:
//! 1. `SERVICES[(addr, port, p)]` exists: a frontend.
//!    - an L7 frontend (`SVC_FLAG_L7`, TCP): the node proxy serves it, whatever its
//!      backends (it answers a request it cannot route itself). Rewrite to the proxy's
//!      listener on the caller's own loopback (`127.0.0.1`, or `::1` / the mapped
//!      `::ffff:127.0.0.1` in connect6), port `PROXY_OUTBOUND_PORT`; remember the VIP in
//!      ORIG_DST_PENDING (for `SO_ORIGINAL_DST`, see `origdst.rs`) and in REV_NAT (for
//!      getpeername). Not counted in LB_METRICS: no backend was chosen here; the proxy
//!      counts its requests. No proxy listening in the pod: the connect fails with
//!      ECONNREFUSED from the pod's own loopback.
//!    - count == 0 (no usable backend): refuse (ECONNREFUSED), counted as refused.
//!    - session affinity on, and the client's netns has an unexpired entry whose backend
//!      is still active: that backend.
//!    - otherwise slot `1 + random % count`; with affinity, remember the choice.
//!    Then translate, remember (socket, backend) → VIP for recvmsg/getpeername, count.
//! 2. `SERVICES[(addr, 0, 0)]` exists: `addr` is a cluster IP, but not with this port or
//!    protocol: refuse, as kube-proxy's reject rule does, at once.
//! 3. Otherwise: not ours, pass untouched.

use aya_ebpf::helpers::{bpf_get_prandom_u32, bpf_ktime_get_ns};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, LbMetricsKey, OrigDstValue,
    RevNatKey, RevNatValue, ServiceKey, ServiceValue,
    service::{BACKEND_ACTIVE, PROTO_TCP, PROXY_OUTBOUND_PORT, SVC_FLAG_AFFINITY, SVC_FLAG_L7},
};

use crate::{
    ctx::SockAddr,
    maps::{AFFINITY, BACKENDS, LB_METRICS, ORIG_DST_PENDING, REV_NAT, SERVICE_BACKENDS, SERVICES},
};

/// 127.0.0.1, network byte order.
const LOOPBACK4_BE: u32 = u32::from_ne_bytes([127, 0, 0, 1]);
/// ::1, as `Addr` words (network byte order).
const LOOPBACK6: Addr = Addr([0, 0, 0, u32::from_ne_bytes([0, 0, 0, 1])]);

/// What happened to one call.
pub enum Verdict {
    /// Not a service address.
    Pass,
    /// Translated to a backend; the frontend dialled and its service id (what
    /// getpeername shows).
    Translated(ServiceKey, u32),
    /// Sent to the node proxy on the caller's loopback (an L7 frontend).
    Proxied,
    /// A cluster IP with no usable backend for this port and protocol.
    Refuse,
}

/// A lookup that missed in the middle of a translation (an update racing the call).
pub struct Miss;

/// Looks up the destination and, for a Service, rewrites it to a backend.
#[inline(always)]
pub fn translate<const V6: bool>(sa: &SockAddr) -> Result<Verdict, Miss> {
    let addr = sa.addr::<V6>();
    let key = ServiceKey {
        addr,
        port: sa.port(),
        proto: sa.protocol(),
        _pad: 0,
    };
    // SAFETY (map reads here and below): values are plain data; a concurrent update can
    // at worst give a stale copy.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        let marker = ServiceKey {
            addr,
            port: 0,
            proto: 0,
            _pad: 0,
        };
        return Ok(match unsafe { SERVICES.get(&marker) } {
            Some(_) => Verdict::Refuse,
            None => Verdict::Pass,
        });
    };
    let svc = *svc;
    if svc.flags & SVC_FLAG_L7 != 0 && key.proto == PROTO_TCP {
        to_proxy::<V6>(sa, &key, svc.id, &key)?;
        return Ok(Verdict::Proxied);
    }
    if svc.count == 0 {
        count(svc.id, 0);
        return Ok(Verdict::Refuse);
    }
    let (backend_id, backend) = choose(sa, &svc)?;
    rewrite::<V6>(sa, &key, svc.id, &backend.addr, backend.port)?;
    count(svc.id, backend_id);
    Ok(Verdict::Translated(key, svc.id))
}

/// Rewrites the call's destination to `addr:port_be` and remembers (socket, new
/// destination) → frontend `key` of service `service_id` in REV_NAT, so getpeername and
/// recvmsg show the VIP the application dialled.
#[inline(always)]
fn rewrite<const V6: bool>(
    sa: &SockAddr,
    key: &ServiceKey,
    service_id: u32,
    addr: &Addr,
    port_be: u16,
) -> Result<u64, Miss> {
    if !sa.set::<V6>(addr, port_be) {
        return Err(Miss);
    }
    let cookie = sa.socket_cookie();
    let rev_key = RevNatKey {
        cookie,
        addr: *addr,
        port: port_be,
        _pad: [0; 6],
    };
    let rev = RevNatValue {
        addr: key.addr,
        port: key.port,
        _pad: 0,
        service_id,
    };
    // A full LRU map evicts the oldest entry; the insert itself cannot fail for lack of room.
    let _ = REV_NAT.insert(&rev_key, &rev, 0);
    Ok(cookie)
}

/// Rewrites the call to the node proxy's listener on the caller's own loopback. REV_NAT
/// remembers `shown` (what the application dialled: the frontend of service
/// `service_id`, for getpeername), ORIG_DST_PENDING `orig` (where the proxy takes the
/// connection: the same frontend for L7, the chosen pod for a tunnel).
#[inline(always)]
pub fn to_proxy<const V6: bool>(
    sa: &SockAddr,
    shown: &ServiceKey,
    service_id: u32,
    orig: &ServiceKey,
) -> Result<(), Miss> {
    // The loopback of the destination's family: an IPv6 socket dialling a mapped IPv4
    // address makes an IPv4 connection, which the proxy's IPv4 listener takes.
    let proxy = if V6 && orig.addr.v4_be().is_none() {
        LOOPBACK6
    } else {
        Addr::from_v4_be(LOOPBACK4_BE)
    };
    let cookie = rewrite::<V6>(sa, shown, service_id, &proxy, PROXY_OUTBOUND_PORT.to_be())?;
    let orig = OrigDstValue {
        addr: orig.addr,
        port: orig.port,
        proto: orig.proto,
        _pad: 0,
        service_id,
    };
    // LRU map: an insert evicts the oldest entry rather than fail for lack of room.
    let _ = ORIG_DST_PENDING.insert(&cookie, &orig, 0);
    Ok(())
}

/// Picks the backend: the affinity entry when valid, else a random slot.
fn choose(sa: &SockAddr, svc: &ServiceValue) -> Result<(u32, Backend), Miss> {
    if svc.flags & SVC_FLAG_AFFINITY == 0 {
        return random_backend(svc);
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let key = AffinityKey {
        netns_cookie: sa.netns_cookie(),
        service_id: svc.id,
        _pad: 0,
    };
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: the pointer is valid for the program's run; a racing writer can only
        // make the read stale.
        let (backend_id, last) = unsafe { ((*entry).backend_id, (*entry).last_used_ns) };
        let timeout_ns = u64::from(svc.affinity_timeout_s).saturating_mul(1_000_000_000);
        let fresh = now.saturating_sub(last) <= timeout_ns;
        if fresh {
            if let Some(b) = unsafe { BACKENDS.get(&backend_id) } {
                if b.state == BACKEND_ACTIVE {
                    // SAFETY: as above; refreshing the timestamp keeps an active client's
                    // affinity alive, like kube-proxy's `recent` match.
                    unsafe { (*entry).last_used_ns = now };
                    return Ok((backend_id, *b));
                }
            }
        }
    }
    let (backend_id, backend) = random_backend(svc)?;
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    let _ = AFFINITY.insert(&key, &value, 0);
    Ok((backend_id, backend))
}

fn random_backend(svc: &ServiceValue) -> Result<(u32, Backend), Miss> {
    // SAFETY: helper without arguments.
    let random = unsafe { bpf_get_prandom_u32() };
    // `checked_rem`: the compiler cannot see that count != 0 here, and a division-by-zero
    // panic path would make the program unverifiable.
    let slot = random.checked_rem(svc.count).ok_or(Miss)? + 1;
    let slot_key = BackendSlotKey {
        service_id: svc.id,
        slot,
    };
    let backend_id = *unsafe { SERVICE_BACKENDS.get(&slot_key) }.ok_or(Miss)?;
    let backend = *unsafe { BACKENDS.get(&backend_id) }.ok_or(Miss)?;
    Ok((backend_id, backend))
}

/// Counts one translation (or, with `backend_id` 0, one refusal) on this CPU.
fn count(service_id: u32, backend_id: u32) {
    let key = LbMetricsKey {
        service_id,
        backend_id,
    };
    match LB_METRICS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value: no other CPU writes it, and this program is not
        // re-entered on the same CPU.
        Some(n) => unsafe { *n += 1 },
        // A full map drops the count, never the connection.
        None => {
            let _ = LB_METRICS.insert(&key, &1, 0);
        }
    }
}
