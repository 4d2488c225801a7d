//! Mesh capture in connect4/6: a TCP connection from an enrolled pod to an enrolled pod
//! (on any node) goes to the node proxy on the pod's own loopback, which carries it
//! through its mutual-TLS tunnel (HBONE), where the destination authorizes it. Decided
//! after load balancing and egress policy (reusing its lookups), so the proxy gets the
//! pod actually chosen, and a denied connection is refused here as without the mesh.

use mesh_common::{
    EndpointValue, IpcacheValue, ServiceKey,
    policy::{ENDPOINT_MESH, tunnelled},
    service::PROTO_TCP,
};

use crate::{
    ctx::SockAddr,
    lb::{self, Miss},
};

/// Sends the call of `caller` (its ENDPOINTS entry) to the proxy when the mesh carries
/// it; `peer` is the destination's IPCACHE entry (both as egress policy found them).
/// `dialled` is the Service frontend the application dialled and its service id, when
/// load balancing translated the call (getpeername keeps showing it).
#[inline(always)]
pub fn capture<const V6: bool>(
    sa: &SockAddr,
    caller: &EndpointValue,
    peer: &IpcacheValue,
    dialled: Option<(ServiceKey, u32)>,
) -> Result<bool, Miss> {
    let (dst, port) = (sa.addr::<V6>(), sa.port());
    if caller.flags & ENDPOINT_MESH == 0 || !tunnelled(peer, port) {
        return Ok(false);
    }
    let orig = ServiceKey {
        addr: dst,
        port,
        proto: PROTO_TCP,
        _pad: 0,
    };
    let (shown, service_id) = dialled.unwrap_or((orig, 0));
    lb::to_proxy::<V6>(sa, &shown, service_id, &orig)?;
    Ok(true)
}
