//! The mesh's state in the proxy: the workload identities of the node's enrolled pods
//! ([`Identities`]), the tunnels between node proxies ([`Tunnels`]), the node's policy
//! maps for judging tunnelled streams ([`Netpol`]), and which addresses are in the mesh.
//! [`Via`] is one client pod's way into the tunnel for one destination.

use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    sync::{Arc, RwLock},
};

use mesh_common::{l7::ProxyConfig, security::MeshEndpoint};

use crate::{
    flowreport::FlowReporter,
    hbone::outbound::{HboneError, Origin, TunnelStream, Tunnels},
    identities::Identities,
    inpod::Netns,
    netpol::Netpol,
};

/// Why a tunnelled stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ViaError {
    /// The client pod's egress NetworkPolicy denies the destination port.
    #[error("{target} from pod {pod}: denied by network policy")]
    Denied {
        /// The destination.
        target: SocketAddr,
        /// The client pod.
        pod: String,
    },
    /// The policy maps are not readable, so no stream can be judged (fails closed).
    #[error("{target} from pod {pod}: policy maps unavailable")]
    NoPolicy {
        /// The destination.
        target: SocketAddr,
        /// The client pod.
        pod: String,
    },
    /// The client pod has no SVID (yet).
    #[error("pod {pod}: no certificate for {identity}")]
    NoIdentity {
        /// The client pod.
        pod: String,
        /// Its SPIFFE ID.
        identity: String,
    },
    /// The tunnel failed.
    #[error(transparent)]
    Tunnel(#[from] HboneError),
}

/// The mesh side of the proxy, shared by every connection.
pub struct Mesh {
    /// SVIDs of the node's enrolled pods.
    pub identities: Arc<Identities>,
    /// Open tunnels.
    pub tunnels: Tunnels,
    /// Where refusals go: the agent's flow log.
    pub flows: FlowReporter,
    node_dir: PathBuf,
    netpol: RwLock<Option<Arc<Netpol>>>,
    peers: RwLock<Arc<HashMap<IpAddr, Arc<MeshEndpoint>>>>,
}

impl Mesh {
    /// A mesh whose policy maps are pinned in `node_dir` (`<bpffs>/mesh/<node>`).
    pub fn new(
        identities: Arc<Identities>,
        tunnels: Tunnels,
        flows: FlowReporter,
        node_dir: PathBuf,
    ) -> Self {
        Self {
            identities,
            tunnels,
            flows,
            node_dir,
            netpol: RwLock::default(),
            peers: RwLock::default(),
        }
    }

    /// Takes a new configuration: its enrolled addresses, SVIDs for its enrolled local
    /// pods, and the policy maps opened again (a new agent may have pinned new ones).
    pub fn update(&self, config: &ProxyConfig) {
        let peers: HashMap<IpAddr, Arc<MeshEndpoint>> = config
            .mesh
            .iter()
            .map(|m| (m.addr, Arc::new(m.clone())))
            .collect();
        *self.peers.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(peers);
        self.identities.sync(
            &config.trust_domain,
            config.pods.iter().filter_map(|p| p.identity.as_deref()),
        );
        let netpol = match Netpol::open(&self.node_dir) {
            Ok(n) => Some(Arc::new(n)),
            Err(e) => {
                tracing::warn!(error = %e, "tunnelled streams refused until the policy maps open");
                None
            }
        };
        *self.netpol.write().unwrap_or_else(|p| p.into_inner()) = netpol;
    }

    /// Registers `listener` for the kernel's capture of plaintext to `addr`
    /// ([`crate::capture`]).
    pub fn capture(
        &self,
        addr: IpAddr,
        listener: &impl std::os::fd::AsRawFd,
    ) -> Result<(), crate::capture::CaptureError> {
        crate::capture::register(&self.node_dir, addr, listener)
    }

    /// The policy maps, when open.
    pub fn netpol(&self) -> Option<Arc<Netpol>> {
        self.netpol
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The mesh endpoint at `addr`, when that address is an enrolled pod's.
    pub fn peer(&self, addr: IpAddr) -> Option<Arc<MeshEndpoint>> {
        self.peers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&addr)
            .cloned()
    }

    /// How a client pod (`identity`, in `netns`) reaches `addr`: through the tunnel
    /// when both are in the mesh, `None` for a direct connection.
    pub fn via(
        self: &Arc<Self>,
        netns: &Arc<Netns>,
        cookie: u64,
        identity: Option<&str>,
        addr: IpAddr,
    ) -> Option<Via> {
        let identity = identity?;
        let peer = self.peer(addr)?;
        Some(Via {
            mesh: Arc::clone(self),
            netns: Arc::clone(netns),
            cookie,
            identity: identity.to_owned(),
            peer,
        })
    }
}

/// One client pod's way to one enrolled destination pod.
pub struct Via {
    mesh: Arc<Mesh>,
    netns: Arc<Netns>,
    cookie: u64,
    identity: String,
    /// The destination pod.
    pub peer: Arc<MeshEndpoint>,
}

impl Via {
    /// The client's SPIFFE ID.
    pub fn source_principal(&self) -> &str {
        &self.identity
    }

    /// Opens a stream to `target` (a port of the destination pod), after the client's
    /// egress NetworkPolicy for that port (the proxy chose the destination: the kernel
    /// never judged it).
    pub async fn open(&self, target: SocketAddr) -> Result<TunnelStream, ViaError> {
        let pod = || self.netns.name.clone();
        let Some(netpol) = self.mesh.netpol() else {
            return Err(ViaError::NoPolicy { target, pod: pod() });
        };
        if !netpol.egress_allowed(self.cookie, target.ip(), target.port()) {
            return Err(ViaError::Denied { target, pod: pod() });
        }
        self.open_judged(target).await
    }

    /// Opens a stream to `target` whose egress the kernel already judged: the client's
    /// own connect() to it, which connect4/6 allowed before sending it to the proxy.
    pub async fn open_judged(&self, target: SocketAddr) -> Result<TunnelStream, ViaError> {
        let pod = || self.netns.name.clone();
        let Some(tls) = self.mesh.identities.client(&self.identity) else {
            return Err(ViaError::NoIdentity {
                pod: pod(),
                identity: self.identity.clone(),
            });
        };
        let origin = Origin {
            netns: &self.netns,
            identity: &self.identity,
            tls,
        };
        Ok(self
            .mesh
            .tunnels
            .open(&origin, target, &self.peer.identity)
            .await?)
    }
}
