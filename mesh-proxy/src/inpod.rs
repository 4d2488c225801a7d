//! Sockets inside a pod's network namespace (the in-pod pattern): the proxy's listener
//! on the pod's loopback, and its outbound sockets to backends, which carry the pod's
//! own address so the kernel's NetworkPolicy hooks judge them as the pod's.
//!
//! A socket keeps the namespace it was created in for life, so only its creation needs
//! to happen inside: on one thread per namespace that entered it once and creates the
//! sockets asked for, so no tokio worker (or pooled blocking thread) is ever left in a
//! pod's namespace. The thread keeps a few unconnected sockets ready, so a new
//! connection usually costs not even a channel round trip (let alone a thread start and
//! a setns). The thread ends when the [`Netns`] is dropped.

use std::{
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::OwnedFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
};

use mesh_common::l7::{LocalPod, NetnsRef, ObjectRef};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::sync::oneshot;

use crate::sys;

/// Errors of in-pod socket work, naming the pod.
#[derive(Debug, thiserror::Error)]
pub enum InpodError {
    /// The namespace could not be opened.
    #[error("pod {pod}: open /proc/{pid}/ns/net: {source}")]
    Open {
        pod: String,
        pid: u32,
        #[source]
        source: io::Error,
    },
    /// The pid now lives in another namespace: the pod's process exited.
    #[error(
        "pod {pod}: /proc/{pid}/ns/net is net:[{found}], expected net:[{expected}] (pid reused?)"
    )]
    Reused {
        pod: String,
        pid: u32,
        found: u64,
        expected: u64,
    },
}

/// A network namespace sockets are created in.
#[derive(Debug)]
pub struct Netns {
    /// Who it belongs to, for logs.
    pub name: String,
    /// The namespace's inode (its identity).
    pub inode: u64,
    /// The thread inside the namespace; `None`: the proxy's own namespace (tests, and
    /// nothing to enter).
    worker: Option<std::sync::mpsc::Sender<Job>>,
    /// Sockets made ahead by the thread, for new outbound connections.
    spares: Arc<Spares>,
}

/// Work for a namespace's thread.
type Job = Box<dyn FnOnce() + Send>;

impl Netns {
    /// Opens the namespace of `pod`, checking it is still the pod's.
    pub fn open(pod: &ObjectRef, netns: &NetnsRef) -> Result<Self, InpodError> {
        let name = format!("{}/{}", pod.namespace, pod.name);
        let (fd, inode) = sys::open_netns(netns.pid).map_err(|source| InpodError::Open {
            pod: name.clone(),
            pid: netns.pid,
            source,
        })?;
        if inode != netns.inode {
            return Err(InpodError::Reused {
                pod: name,
                pid: netns.pid,
                found: inode,
                expected: netns.inode,
            });
        }
        let worker = spawn_worker(fd).map_err(|source| InpodError::Open {
            pod: name.clone(),
            pid: netns.pid,
            source,
        })?;
        let netns = Self {
            name,
            inode,
            worker: Some(worker),
            spares: Arc::default(),
        };
        netns.top_up(false);
        Ok(netns)
    }

    /// The proxy's own namespace: sockets are created directly (used by unit tests,
    /// which run without the privilege to enter namespaces).
    pub fn current(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            inode: 0,
            worker: None,
            spares: Arc::default(),
        }
    }

    /// Runs `make` inside this namespace and returns its result.
    async fn run<T: Send + 'static>(
        self: &Arc<Self>,
        make: impl FnOnce() -> io::Result<T> + Send + 'static,
    ) -> io::Result<T> {
        let Some(worker) = &self.worker else {
            return make();
        };
        let (tx, rx) = oneshot::channel();
        worker
            .send(Box::new(move || {
                let _ = tx.send(make());
            }))
            .map_err(|_| io::Error::other("the namespace's thread has ended"))?;
        rx.await
            .map_err(|_| io::Error::other("namespace thread ended without a result"))?
    }

    /// A listener on `addr` inside the namespace (SO_REUSEADDR and SO_REUSEPORT, so a
    /// new proxy can listen before the old one drains). In a pod's namespace it also
    /// turns on `net.ipv4.tcp_migrate_req` there, so that connections still waiting in
    /// this listener's accept queue when it closes move to the successor's listener
    /// instead of being reset.
    pub async fn listen(self: &Arc<Self>, addr: SocketAddr) -> io::Result<tokio::net::TcpListener> {
        let entered = self.worker.is_some();
        let name = self.name.clone();
        let std = self
            .run(move || {
                if entered && let Err(e) = sys::enable_request_migration() {
                    // Kernels before 5.14: a takeover may reset queued connections.
                    tracing::warn!(pod = %name, error = %e, "cannot set net.ipv4.tcp_migrate_req");
                }
                let s = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
                if addr.is_ipv6() {
                    s.set_only_v6(true)?;
                }
                s.set_reuse_address(true)?;
                s.set_reuse_port(true)?;
                s.set_nonblocking(true)?;
                s.bind(&addr.into())?;
                s.listen(1024)?;
                Ok(std::net::TcpListener::from(s))
            })
            .await?;
        tokio::net::TcpListener::from_std(std)
    }

    /// An unconnected TCP socket for `dst`, inside the namespace: one of the spares
    /// when there is one (no trip to the namespace's thread on a new connection's
    /// path), else made now. Either way the spares are topped up behind it.
    pub async fn tcp_socket(
        self: &Arc<Self>,
        dst: SocketAddr,
    ) -> io::Result<tokio::net::TcpSocket> {
        let v6 = dst.is_ipv6();
        let sock = match self.spares.take(v6) {
            Some(s) => s,
            None => self.run(move || stream_socket(v6)).await?,
        };
        self.top_up(v6);
        Ok(tokio::net::TcpSocket::from_std_stream(sock.into()))
    }

    /// Asks the namespace's thread to fill the spares of a family up again, unless it
    /// is already asked to.
    fn top_up(&self, v6: bool) {
        let Some(worker) = &self.worker else {
            return;
        };
        if self.spares.refilling(v6).swap(true, Ordering::AcqRel) {
            return;
        }
        let spares = Arc::clone(&self.spares);
        let job: Job = Box::new(move || spares.fill(v6));
        if worker.send(job).is_err() {
            self.spares.refilling(v6).store(false, Ordering::Release);
        }
    }
}

/// How many unconnected sockets of each family a namespace keeps ready.
const SPARES: usize = 4;

/// Sockets made ahead in a namespace, per family.
#[derive(Debug, Default)]
struct Spares {
    v4: Mutex<Vec<Socket>>,
    v6: Mutex<Vec<Socket>>,
    refilling_v4: AtomicBool,
    refilling_v6: AtomicBool,
}

impl Spares {
    fn stock(&self, v6: bool) -> &Mutex<Vec<Socket>> {
        if v6 { &self.v6 } else { &self.v4 }
    }

    fn refilling(&self, v6: bool) -> &AtomicBool {
        if v6 {
            &self.refilling_v6
        } else {
            &self.refilling_v4
        }
    }

    fn take(&self, v6: bool) -> Option<Socket> {
        self.stock(v6)
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop()
    }

    /// Run on the namespace's thread: makes sockets until the stock is full (a family
    /// the namespace cannot make, e.g. without IPv6, stays empty).
    fn fill(&self, v6: bool) {
        loop {
            let missing = SPARES.saturating_sub(self.stock(v6).lock().map_or(SPARES, |s| s.len()));
            if missing == 0 {
                break;
            }
            match stream_socket(v6) {
                Ok(s) => self
                    .stock(v6)
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(s),
                Err(_) => break,
            }
        }
        self.refilling(v6).store(false, Ordering::Release);
    }
}

/// A nonblocking TCP socket with Nagle off, in the calling thread's namespace.
fn stream_socket(v6: bool) -> io::Result<Socket> {
    let domain = if v6 { Domain::IPV6 } else { Domain::IPV4 };
    let s = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    s.set_nonblocking(true)?;
    s.set_tcp_nodelay(true)?;
    Ok(s)
}

/// Starts the thread that enters the namespace of `fd` once and then runs the jobs sent
/// to it, until the sender is dropped. Returns once the thread is inside.
fn spawn_worker(fd: OwnedFd) -> io::Result<std::sync::mpsc::Sender<Job>> {
    let (jobs, queue) = std::sync::mpsc::channel::<Job>();
    let (entered_tx, entered_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name("mesh-proxy-netns".into())
        .spawn(move || {
            let entered = sys::enter_netns(&fd);
            let ok = entered.is_ok();
            let _ = entered_tx.send(entered);
            drop(fd);
            if ok {
                while let Ok(job) = queue.recv() {
                    job();
                }
            }
        })?;
    entered_rx
        .recv()
        .map_err(|_| io::Error::other("namespace thread ended before entering"))??;
    Ok(jobs)
}

/// The pod's listener addresses: `127.0.0.1:15001` and `[::1]:15001` (the listeners skip
/// IPv6 quietly in a pod without `::1`).
pub fn listen_addrs() -> [SocketAddr; 2] {
    let port = mesh_common::l7::PROXY_OUTBOUND_PORT;
    [
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port),
        SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), port),
    ]
}

/// Opens a pod's namespace, logging why not (and returning `None`) when it cannot.
pub fn open_pod(pod: &LocalPod) -> Option<Netns> {
    match Netns::open(&pod.pod, &pod.netns) {
        Ok(ns) => Some(ns),
        Err(e) => {
            tracing::warn!(error = %e, "skipping pod");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn current_namespace_sockets() {
        let ns = Arc::new(Netns::current("test"));
        let l = ns.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = ns.tcp_socket(addr).await.unwrap();
        let _c = s.connect(addr).await.unwrap();
        let _ = l.accept().await.unwrap();
    }

    #[test]
    fn reused_pid_is_refused() {
        let pod = ObjectRef {
            namespace: "default".into(),
            name: "p".into(),
        };
        let netns = NetnsRef {
            pid: std::process::id(),
            inode: 1,
            cookie: 0,
        };
        let err = Netns::open(&pod, &netns).unwrap_err();
        assert!(matches!(err, InpodError::Reused { .. }), "{err}");
    }
}
