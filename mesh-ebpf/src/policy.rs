//! Egress network policy at socket level: after load balancing, a connect() or
//! sendmsg() is checked against the compiled NetworkPolicy of the calling pod, with the
//! selected backend as the peer. Denied calls fail at once with EPERM.
//!
//! Decision order (as documented in `mesh_common::policy`):
//! 1. The caller's netns is not a known local pod (ENDPOINTS miss): allow. Processes of
//!    the node itself are not pods, and a pod is known once the agent has seen it.
//! 2. No isolation marker for (pod identity, egress): allow (no policy selects the pod).
//! 3. Peer identity = longest-prefix match of the destination in IPCACHE (miss: world).
//!    Allow iff an entry with POLICY_ALLOW matches (peer, proto, port), trying the exact
//!    peer then any peer, and the exact protocol then any protocol; else deny.

use aya_ebpf::maps::lpm_trie::Key;
use mesh_common::{
    Addr, PolicyKeyData,
    policy::{
        DIR_EGRESS, IDENTITY_ANY, IDENTITY_WORLD, POLICY_ALLOW, POLICY_FIXED_PREFIX,
        POLICY_ISOLATED,
    },
};

use crate::{
    ctx::SockAddr,
    maps::{ENDPOINTS, IPCACHE, POLICY},
};

/// Full key length of POLICY lookups: fixed fields plus all 16 port bits.
const POLICY_FULL_PREFIX: u32 = POLICY_FIXED_PREFIX + 16;

/// Whether the calling pod may send to `dst`:`port_be` over `proto`.
#[inline(always)]
pub fn egress_allowed(sa: &SockAddr, dst: &Addr, port_be: u16, proto: u8) -> bool {
    // SAFETY (map reads here and below): plain data; a concurrent update can at worst
    // give a stale copy.
    let Some(endpoint) = (unsafe { ENDPOINTS.get(&sa.netns_cookie()) }) else {
        return true;
    };
    let subject = endpoint.identity;
    let isolated = POLICY
        .get(Key::new(POLICY_FULL_PREFIX, data(subject, IDENTITY_ANY, 0, 0)))
        .is_some_and(|v| v.flags & POLICY_ISOLATED != 0);
    if !isolated {
        return true;
    }
    let peer = IPCACHE.get(Key::new(128, *dst)).map_or(IDENTITY_WORLD, |v| v.identity);
    for peer in [peer, IDENTITY_ANY] {
        for (proto, port) in [(proto, port_be), (0, 0)] {
            let allowed = POLICY
                .get(Key::new(POLICY_FULL_PREFIX, data(subject, peer, proto, port)))
                .is_some_and(|v| v.flags & POLICY_ALLOW != 0);
            if allowed {
                return true;
            }
        }
    }
    false
}

#[inline(always)]
fn data(subject: u32, peer: u32, proto: u8, port_be: u16) -> PolicyKeyData {
    PolicyKeyData { subject, peer, direction: DIR_EGRESS, proto, port_be }
}
