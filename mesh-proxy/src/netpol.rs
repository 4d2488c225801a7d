//! NetworkPolicy for tunnelled streams. One HBONE tunnel carries streams to several
//! ports, so the kernel cannot judge them by the tunnel's own connection; the node
//! proxies judge each stream instead, with the very maps and decision function
//! (`mesh_common::policy::policy_allows`) the kernel's hooks use: the source side the
//! client's egress, the destination side the server's ingress.

use std::{
    io,
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::maps::{Array, HashMap, LpmTrie, Map, MapData, lpm_trie::Key};
use mesh_common::{
    Addr, EndpointValue, IpcacheValue,
    event::config::POLICY_AUDIT,
    maps::{CONFIG, ENDPOINTS, IPCACHE, POLICY},
    policy::{
        DIR_EGRESS, DIR_INGRESS, IDENTITY_HOST, IDENTITY_WORLD, POLICY_FIXED_PREFIX, PolicyKeyData,
        PolicyValue, policy_allows,
    },
    service::PROTO_TCP,
};

/// Full key length of POLICY lookups: fixed fields plus all 16 port bits.
const POLICY_FULL_PREFIX: u32 = POLICY_FIXED_PREFIX + 16;

/// Why the pinned maps could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("open pinned map {}: {source}", path.display())]
pub struct NetpolError {
    path: PathBuf,
    #[source]
    source: io::Error,
}

/// The node's policy maps, read-only.
pub struct Netpol {
    config: Array<MapData, u32>,
    endpoints: HashMap<MapData, u64, EndpointValue>,
    ipcache: LpmTrie<MapData, Addr, IpcacheValue>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
}

impl Netpol {
    /// Opens the maps the agent pinned in `node_dir` (`<bpffs>/mesh/<node>`).
    pub fn open(node_dir: &Path) -> Result<Self, NetpolError> {
        let data = |name: &str| {
            let path = node_dir.join(name);
            MapData::from_pin(&path).map_err(|e| NetpolError {
                path,
                source: io::Error::other(e.to_string()),
            })
        };
        let invalid = |name: &str, e: aya::maps::MapError| NetpolError {
            path: node_dir.join(name),
            source: io::Error::other(e.to_string()),
        };
        Ok(Self {
            config: Array::try_from(Map::Array(data(CONFIG)?)).map_err(|e| invalid(CONFIG, e))?,
            endpoints: HashMap::try_from(Map::HashMap(data(ENDPOINTS)?))
                .map_err(|e| invalid(ENDPOINTS, e))?,
            ipcache: LpmTrie::try_from(Map::LpmTrie(data(IPCACHE)?))
                .map_err(|e| invalid(IPCACHE, e))?,
            policy: LpmTrie::try_from(Map::LpmTrie(data(POLICY)?))
                .map_err(|e| invalid(POLICY, e))?,
        })
    }

    /// Whether the local pod of network namespace `netns_cookie` may open a TCP
    /// connection to `dst`:`port` (its egress rules). A namespace the maps do not know
    /// passes, as in the kernel.
    pub fn egress_allowed(&self, netns_cookie: u64, dst: IpAddr, port: u16) -> bool {
        let Ok(endpoint) = self.endpoints.get(&netns_cookie, 0) else {
            return true;
        };
        let peer = self.ipcache(dst).identity;
        self.allowed(endpoint.identity, DIR_EGRESS, peer, port)
    }

    /// Whether the local pod at `dst` may accept a TCP connection from `src` on `port`
    /// (its ingress rules). The node's own addresses pass, as in the kernel.
    pub fn ingress_allowed(&self, src: IpAddr, dst: IpAddr, port: u16) -> bool {
        let peer = self.ipcache(src);
        if peer.owner == IDENTITY_HOST {
            return true;
        }
        self.allowed(self.ipcache(dst).owner, DIR_INGRESS, peer.identity, port)
    }

    fn ipcache(&self, addr: IpAddr) -> IpcacheValue {
        self.ipcache
            .get(&Key::new(128, Addr::from(addr)), 0)
            .unwrap_or(IpcacheValue {
                identity: IDENTITY_WORLD,
                owner: IDENTITY_WORLD,
                flags: 0,
            })
    }

    /// The kernel's decision, audit mode included: there a denial is let through.
    fn allowed(&self, subject: u32, direction: u8, peer: u32, port: u16) -> bool {
        let lookup = |data| self.policy.get(&Key::new(POLICY_FULL_PREFIX, data), 0).ok();
        policy_allows(lookup, subject, direction, peer, PROTO_TCP, port.to_be())
            || self.config.get(&POLICY_AUDIT, 0).is_ok_and(|v| v == 1)
    }
}
