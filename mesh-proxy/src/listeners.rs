//! The proxy's listeners inside each local pod's network namespace (`127.0.0.1:15001`,
//! and `[::1]:15001` where the pod has IPv6 loopback), reconciled with every
//! configuration: new pods get listeners, pods that went away lose theirs (connections
//! already accepted go on). Each accepted connection is looked up by its original
//! destination and served as its frontend's protocol, or, between two pods of the mesh,
//! carried through the tunnel. Enrolled pods also get the HBONE listener on port 15008
//! of their own addresses, where the node proxies' tunnels end, and the listener for
//! their captured plaintext inbound connections.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering},
    },
    time::Duration,
};

use mesh_common::l7::{LocalPod, ProxyConfig};
use tokio::{
    net::{TcpListener, TcpStream},
    task::JoinHandle,
};
use tracing::Instrument as _;

use crate::{
    forward::{Conn, Proxy, Source},
    gate::MeshGate,
    hbone::{
        self, HBONE_PORT,
        inbound::{Gate, InboundPod},
    },
    inpod::{self, Netns},
    l4,
    mesh::Mesh,
    plaintext,
    server::{self, Drain, Limits},
    sys,
};

/// Identifies a pod's listeners: a pod recreated under the same name has a new
/// namespace, and gets new listeners.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct PodKey {
    namespace: String,
    name: String,
    inode: u64,
}

struct PodListeners {
    pod: LocalPod,
    accepts: Vec<JoinHandle<()>>,
}

impl Drop for PodListeners {
    fn drop(&mut self) {
        for a in &self.accepts {
            a.abort();
        }
    }
}

/// Every pod's listeners.
pub struct Listeners {
    proxy: Arc<Proxy>,
    limits: Limits,
    graceful: Arc<Drain>,
    active: Arc<AtomicI64>,
    pods: HashMap<PodKey, PodListeners>,
}

impl Listeners {
    /// No listeners yet.
    pub fn new(proxy: Arc<Proxy>, limits: Limits, graceful: Arc<Drain>) -> Self {
        Self {
            proxy,
            limits,
            graceful,
            active: Arc::default(),
            pods: HashMap::new(),
        }
    }

    /// Opens listeners for the pods of `config` that have none, and closes those of
    /// pods it no longer lists.
    pub async fn reconcile(&mut self, config: &ProxyConfig) {
        let wanted: HashMap<PodKey, &LocalPod> = config
            .pods
            .iter()
            .map(|p| {
                let key = PodKey {
                    namespace: p.pod.namespace.clone(),
                    name: p.pod.name.clone(),
                    inode: p.netns.inode,
                };
                (key, p)
            })
            .collect();
        // New listeners first (SO_REUSEPORT lets them share the port), so a pod whose
        // entry changed is never without one; then the old ones close.
        for (key, pod) in &wanted {
            if self.pods.get(key).is_some_and(|l| l.pod == **pod) {
                continue;
            }
            let Some(netns) = inpod::open_pod(pod) else {
                continue;
            };
            if let Some(l) = self.open(pod, Arc::new(netns)).await {
                self.pods.insert(key.clone(), l);
            }
        }
        self.pods.retain(|k, _| {
            let keep = wanted.contains_key(k);
            if !keep {
                tracing::info!(pod = %format!("{}/{}", k.namespace, k.name), "closing pod listeners");
            }
            keep
        });
    }

    /// Opens a pod's listeners in `netns`; `None` (logged) when IPv4 fails.
    async fn open(&self, pod: &LocalPod, netns: Arc<Netns>) -> Option<PodListeners> {
        let source = Arc::new(Source {
            pod: pod.clone(),
            netns: Arc::clone(&netns),
        });
        let mut accepts = Vec::new();
        if let (Some(mesh), Some(identity)) = (&self.proxy.mesh, &pod.identity) {
            self.open_inbound(mesh, pod, identity, &netns, &mut accepts)
                .await;
        }
        for addr in inpod::listen_addrs() {
            match netns.listen(addr).await {
                Ok(l) => {
                    tracing::info!(pod = %netns.name, %addr, "listening");
                    accepts.push(tokio::spawn(self.accept_loop(l, Arc::clone(&source))));
                }
                // No IPv6 loopback in this pod: IPv4 only.
                Err(e) if addr.is_ipv6() && is_no_address(&e) => {}
                Err(e) => {
                    tracing::warn!(pod = %netns.name, %addr, error = %e, "cannot listen in pod");
                    if addr.is_ipv4() {
                        return None;
                    }
                }
            }
        }
        Some(PodListeners {
            pod: pod.clone(),
            accepts,
        })
    }

    /// The pod's inbound listeners: HBONE (port 15008 on each of its addresses), where
    /// the node proxies' tunnels end, and plaintext ([`plaintext`], registered for the
    /// kernel's capture of each address). A pod without an SVID yet gets none (logged);
    /// the next configuration retries, and the kernel refuses captured plaintext
    /// meanwhile.
    async fn open_inbound(
        &self,
        mesh: &Arc<Mesh>,
        pod: &LocalPod,
        identity: &str,
        netns: &Arc<Netns>,
        accepts: &mut Vec<JoinHandle<()>>,
    ) {
        let Some(tls) = mesh.identities.server(identity) else {
            tracing::warn!(pod = %netns.name, %identity, "no certificate yet; no inbound listeners");
            return;
        };
        let inbound = Arc::new(InboundPod {
            name: netns.name.clone(),
            key: pod.pod.clone(),
            identity: identity.to_owned(),
            workload: pod.workload.clone(),
            addrs: pod.addrs.clone(),
            netns: Arc::clone(netns),
            tls,
        });
        let gate: Arc<dyn Gate> = Arc::new(MeshGate::new(Arc::clone(&self.proxy)));
        for &ip in &pod.addrs {
            let addr = SocketAddr::new(ip, HBONE_PORT);
            match netns.listen(addr).await {
                Ok(l) => {
                    tracing::info!(pod = %netns.name, %addr, "HBONE listening");
                    accepts.push(tokio::spawn(hbone::inbound::serve(
                        l,
                        Arc::clone(&inbound),
                        Arc::clone(&gate),
                        Arc::clone(&self.proxy.metrics),
                    )));
                }
                Err(e) => {
                    tracing::warn!(pod = %netns.name, %addr, error = %e, "cannot listen for HBONE in pod");
                }
            }
        }
        for addr in plaintext::listen_addrs(&pod.addrs) {
            let listener = match netns.listen(addr).await {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(pod = %netns.name, %addr, error = %e, "cannot listen for plaintext in pod");
                    continue;
                }
            };
            let family = pod.addrs.iter().filter(|ip| ip.is_ipv4() == addr.is_ipv4());
            for &ip in family {
                if let Err(e) = mesh.capture(ip, &listener) {
                    tracing::warn!(pod = %netns.name, error = %e, "captured plaintext refused by the kernel meanwhile");
                }
            }
            tracing::info!(pod = %netns.name, %addr, "plaintext inbound listening");
            accepts.push(tokio::spawn(plaintext::serve(
                listener,
                Arc::clone(&inbound),
                Arc::clone(&gate),
                Arc::clone(&self.proxy.metrics),
            )));
        }
    }

    /// Stops accepting everywhere, and returns once every accept loop has ended.
    pub async fn close_all(&mut self) {
        for (_, mut l) in self.pods.drain() {
            for a in std::mem::take(&mut l.accepts) {
                a.abort();
                let _ = a.await;
            }
        }
    }

    fn accept_loop(
        &self,
        listener: TcpListener,
        source: Arc<Source>,
    ) -> impl Future<Output = ()> + use<> {
        let proxy = Arc::clone(&self.proxy);
        let limits = self.limits;
        let graceful = Arc::clone(&self.graceful);
        let active = Arc::clone(&self.active);
        async move {
            loop {
                let (stream, peer) = accept(&listener, &source.netns.name, "outbound").await;
                let dst = match sys::original_dst(&stream, peer.is_ipv6()) {
                    Ok(d) => d,
                    Err(e) => {
                        tracing::warn!(pod = %source.netns.name, %peer, error = %e, "no original destination; closing");
                        continue;
                    }
                };
                let Some(protocol) = frontend_protocol(&proxy, dst) else {
                    // Not an L7 frontend: plain TCP between two pods of the mesh.
                    let via = proxy.mesh.as_ref().and_then(|m| {
                        let pod = &source.pod;
                        m.via(
                            &source.netns,
                            pod.netns.cookie,
                            pod.identity.as_deref(),
                            dst.ip(),
                        )
                    });
                    match via {
                        Some(via) => {
                            let metrics = Arc::clone(&proxy.metrics);
                            tokio::spawn(l4::forward(
                                stream,
                                dst,
                                Arc::clone(&source),
                                via,
                                metrics,
                            ));
                        }
                        None => {
                            tracing::warn!(pod = %source.netns.name, %dst, "neither an L7 frontend nor a mesh destination; closing");
                        }
                    }
                    continue;
                };
                let conn = Arc::new(Conn {
                    proxy: Arc::clone(&proxy),
                    source: Arc::clone(&source),
                    dst,
                });
                let watcher = graceful.watcher();
                let active = Arc::clone(&active);
                let metrics = Arc::clone(&proxy.metrics);
                metrics.set_connections(active.fetch_add(1, Ordering::AcqRel) + 1);
                // A debug span: at the default level it is disabled, so polling the
                // connection enters no span (a cost on every wake-up); the few events
                // above debug name the pod and destination themselves.
                let span = tracing::debug_span!("conn", pod = %source.netns.name, %peer, %dst);
                tokio::spawn(
                    async move {
                        server::serve(stream, conn, protocol, limits, watcher).await;
                        metrics.set_connections(active.fetch_sub(1, Ordering::AcqRel) - 1);
                    }
                    .instrument(span),
                );
            }
        }
    }
}

/// The next connection on one of a pod's listeners (`what` names it in logs), Nagle
/// off. An accept error (out of descriptors and the like) pauses instead of spinning.
pub async fn accept(listener: &TcpListener, pod: &str, what: &str) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                let _ = tcp.set_nodelay(true);
                return (tcp, peer);
            }
            Err(e) => {
                tracing::warn!(pod, listener = what, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

fn frontend_protocol(proxy: &Proxy, dst: SocketAddr) -> Option<mesh_common::l7::AppProtocol> {
    let snapshot = proxy.snapshot.borrow();
    snapshot.routes.frontend(dst).map(|f| f.frontend.protocol)
}

fn is_no_address(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EADDRNOTAVAIL | libc::EAFNOSUPPORT)
    )
}
