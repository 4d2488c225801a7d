//! Registers the plaintext inbound listeners with the kernel: INBOUND_SOCKS (pinned by
//! the agent) maps each local enrolled pod address to the listener in that pod's
//! namespace, where the pod's sk_lookup program hands the connections it captures. A
//! listener's entry goes away by itself when the socket closes; a successor's
//! registration replaces it.

use std::{
    io,
    net::IpAddr,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use aya::maps::{Map, MapData, SockHash};
use mesh_common::{Addr, maps::INBOUND_SOCKS};

/// Why a listener could not be registered.
#[derive(Debug, thiserror::Error)]
#[error("register the inbound listener for {addr} in {}: {source}", path.display())]
pub struct CaptureError {
    addr: IpAddr,
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// Makes `listener` the one the kernel hands captured connections to `addr` to.
/// `node_dir` is the node's pin directory (`<bpffs>/mesh/<node>`).
pub fn register(
    node_dir: &Path,
    addr: IpAddr,
    listener: &impl AsRawFd,
) -> Result<(), CaptureError> {
    let path = node_dir.join(INBOUND_SOCKS);
    let error = |e: &dyn std::fmt::Display| CaptureError {
        addr,
        path: path.clone(),
        source: io::Error::other(e.to_string()),
    };
    let data = MapData::from_pin(&path).map_err(|e| error(&e))?;
    let mut socks: SockHash<MapData, Addr> =
        SockHash::try_from(Map::SockHash(data)).map_err(|e| error(&e))?;
    socks
        .insert(Addr::from(addr), listener.as_raw_fd(), 0)
        .map_err(|e| error(&e))
}
