//! Network policy decisions, shared by the egress check in the socket hooks and the
//! ingress check in `ingress.rs`.
//!
//! Decision order (as documented in `mesh_common::policy`), for subject S, direction D:
//! 1. No isolation marker for (S, D): allow (no policy selects the pod that way).
//! 2. Peer identity = longest-prefix match of the peer address in IPCACHE (miss: world).
//!    Allow iff an entry with POLICY_ALLOW matches (peer, proto, port), trying the exact
//!    peer then any peer, and the exact protocol then any protocol; else deny. This
//!    step and the first are `mesh_common::policy::policy_allows`, shared with the
//!    planner's tests.
//! 3. A deny in audit mode (CONFIG[POLICY_AUDIT] = 1) is reported and let through.
//!
//! Every deny and audit is counted in POLICY_METRICS and reported on EVENTS.

use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::lpm_trie::Key};
use mesh_common::{
    Addr, EndpointValue, FlowEvent, IpcacheValue,
    event::{REASON_POLICY_DENIED, VERDICT_AUDIT, VERDICT_DROPPED, VerdictKey, config},
    policy::{
        DIR_EGRESS, ENDPOINT_MESH, IDENTITY_WORLD, POLICY_FIXED_PREFIX, policy_allows, tunnel_port,
    },
};

use crate::{
    ctx::SockAddr,
    maps::{CONFIG, ENDPOINTS, EVENTS, IPCACHE, POLICY, POLICY_METRICS},
};

/// Full key length of POLICY lookups: fixed fields plus all 16 port bits.
const POLICY_FULL_PREFIX: u32 = POLICY_FIXED_PREFIX + 16;

/// The flow being judged.
pub struct Flow {
    pub src: Addr,
    pub dst: Addr,
    pub src_port: u16,
    pub dst_port: u16,
    pub proto: u8,
}

/// What IPCACHE says of an address (longest-prefix match); a miss is the world.
#[inline(always)]
pub fn ipcache(addr: &Addr) -> IpcacheValue {
    IPCACHE
        .get(Key::new(128, *addr))
        .copied()
        .unwrap_or(IpcacheValue {
            identity: IDENTITY_WORLD,
            owner: IDENTITY_WORLD,
            flags: 0,
        })
}

/// Whether `subject` may exchange `proto`/`port_be` with `peer` in `direction`, by the
/// decision order of [`policy_allows`] on the POLICY trie.
#[inline(always)]
fn allowed(subject: u32, direction: u8, peer: u32, proto: u8, port_be: u16) -> bool {
    let lookup = |data| POLICY.get(Key::new(POLICY_FULL_PREFIX, data)).copied();
    policy_allows(lookup, subject, direction, peer, proto, port_be)
}

/// Judges `flow` for `subject` in `direction` with `peer` as the other side; reports and
/// counts what policy denies. Returns whether the flow may pass (audit mode included).
#[inline(always)]
pub fn judge(subject: u32, peer: u32, direction: u8, flow: &Flow) -> bool {
    // Both directions match the destination port: the service the subject dials
    // (egress) or serves (ingress).
    if allowed(subject, direction, peer, flow.proto, flow.dst_port) {
        return true;
    }
    let audit = CONFIG.get(config::POLICY_AUDIT).is_some_and(|v| *v == 1);
    let verdict = if audit {
        VERDICT_AUDIT
    } else {
        VERDICT_DROPPED
    };
    count(direction, verdict);
    let (src_identity, dst_identity) = if direction == DIR_EGRESS {
        (subject, peer)
    } else {
        (peer, subject)
    };
    let event = FlowEvent {
        // SAFETY: helper without arguments.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        src: flow.src,
        dst: flow.dst,
        src_identity,
        dst_identity,
        src_port: flow.src_port,
        dst_port: flow.dst_port,
        proto: flow.proto,
        direction,
        verdict,
        reason: REASON_POLICY_DENIED,
        _pad: 0,
    };
    // A full ring buffer loses the event, never the verdict.
    let _ = EVENTS.output::<FlowEvent>(&event, 0);
    audit
}

fn count(direction: u8, verdict: u8) {
    let key = VerdictKey {
        direction,
        verdict,
        reason: REASON_POLICY_DENIED,
        _pad: 0,
    };
    match POLICY_METRICS.get_ptr_mut(&key) {
        // SAFETY: per-CPU value, not shared with other CPUs; no re-entry on this CPU.
        Some(n) => unsafe { *n += 1 },
        None => {
            let _ = POLICY_METRICS.insert(&key, &1, 0);
        }
    }
}

/// A call egress policy denied.
pub struct Denied;

/// Egress check in the socket hooks: the calling pod (by netns cookie) sending to
/// `dst`:`port_be`. Callers that are not known local pods (the node's own processes, a
/// pod not discovered yet) pass, and so do loopback traffic and the node proxy's
/// tunnels between enrolled pods (their streams are judged one by one by the proxies).
/// An allowed call of a known pod returns what the lookups found (the caller's
/// ENDPOINTS entry, the destination's IPCACHE entry), so the mesh capture that follows
/// does not look them up again.
#[inline(always)]
pub fn egress(
    sa: &SockAddr,
    dst: &Addr,
    port_be: u16,
    proto: u8,
) -> Result<Option<(EndpointValue, IpcacheValue)>, Denied> {
    // Loopback never leaves the pod: NetworkPolicy does not apply to it.
    if dst.is_loopback() {
        return Ok(None);
    }
    // SAFETY: plain data; a concurrent update can at worst give a stale copy.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&sa.netns_cookie()) }).copied() else {
        return Ok(None);
    };
    let peer = ipcache(dst);
    if tunnel_port(endpoint.flags & ENDPOINT_MESH != 0, &peer, port_be) {
        return Ok(Some((endpoint, peer)));
    }
    let flow = Flow {
        src: Addr([0; 4]),
        dst: *dst,
        src_port: 0,
        dst_port: port_be,
        proto,
    };
    if judge(endpoint.identity, peer.identity, DIR_EGRESS, &flow) {
        Ok(Some((endpoint, peer)))
    } else {
        Err(Denied)
    }
}

/// [`egress`], as a yes or no.
#[inline(always)]
pub fn egress_allowed(sa: &SockAddr, dst: &Addr, port_be: u16, proto: u8) -> bool {
    egress(sa, dst, port_be, proto).is_ok()
}
