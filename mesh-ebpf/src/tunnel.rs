//! Mesh capture in connect4/6: a TCP connection from an enrolled pod to an enrolled pod
//! (on any node) goes to the node proxy on the pod's own loopback, which carries it
//! through its mutual-TLS tunnel (HBONE), where the destination authorizes it. Decided after load balancing and egress
//! policy, so the proxy gets the pod actually chosen, and a denied connection is
//! refused here as without the mesh.

use mesh_common::{
    ServiceKey,
    policy::{ENDPOINT_MESH, tunnelled},
    service::PROTO_TCP,
};

use crate::{
    ctx::SockAddr,
    lb::{self, Miss},
    maps::ENDPOINTS,
    policy,
};

/// Sends the call to the proxy when the mesh carries it. `dialled` is the Service
/// frontend the application dialled and its service id, when load balancing
/// translated the call (getpeername keeps showing it).
#[inline(always)]
pub fn capture<const V6: bool>(
    sa: &SockAddr,
    dialled: Option<(ServiceKey, u32)>,
) -> Result<bool, Miss> {
    let (dst, port) = (sa.addr::<V6>(), sa.port());
    // SAFETY: plain data; a concurrent update can at worst give a stale copy.
    let enrolled =
        unsafe { ENDPOINTS.get(&sa.netns_cookie()) }.is_some_and(|e| e.flags & ENDPOINT_MESH != 0);
    if !enrolled || !tunnelled(&policy::ipcache(&dst), port) {
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
