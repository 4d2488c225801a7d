//! Backend connections: pooled per (source pod namespace, endpoint, wire protocol),
//! opened inside the source pod's namespace, and bounded per Service by its circuit
//! breaker ([`Resilience`]): `max_connections` open connections in all, at most
//! `max_pending_requests` requests waiting for one (more overflow: 503 `UO`), and a
//! connection retired after `max_requests_per_connection` requests.

use std::{
    collections::HashMap,
    error::Error as StdError,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::combinators::UnsyncBoxBody;
use hyper::{
    body::Incoming,
    client::conn::{http1, http2},
};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_common::l7::Resilience;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};

use crate::{
    inpod::Netns,
    mesh::{Via, ViaError},
    sys,
    transport::Transport,
};

/// Any error a body can carry.
pub type BoxError = Box<dyn StdError + Send + Sync>;
/// The body type the proxy sends (requests to backends, responses to clients).
pub type Body = UnsyncBoxBody<Bytes, BoxError>;

/// How a backend is spoken to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Wire {
    /// HTTP/1.1.
    Http1,
    /// HTTP/2 with prior knowledge.
    Http2,
}

/// Why a request could not be exchanged with a backend.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The circuit breaker's pending queue is full (503, `UO`).
    #[error(
        "{service}: circuit breaker overflow (max_connections and max_pending_requests reached)"
    )]
    Overflow {
        /// The Service port.
        service: String,
    },
    /// The kernel refused the connect: NetworkPolicy denies the source pod.
    #[error("connect {addr} from pod {pod}: denied by policy: {source}")]
    Denied {
        addr: SocketAddr,
        pod: String,
        #[source]
        source: io::Error,
    },
    /// The connect did not complete in time (a policy drop, or a dead endpoint).
    #[error("connect {addr} from pod {pod}: timed out after {after:?}")]
    ConnectTimeout {
        addr: SocketAddr,
        pod: String,
        after: Duration,
    },
    /// The connect failed (`UF`).
    #[error("connect {addr} from pod {pod}: {source}")]
    Connect {
        addr: SocketAddr,
        pod: String,
        #[source]
        source: io::Error,
    },
    /// The HTTP handshake failed (`UF`).
    #[error("handshake with {addr}: {source}")]
    Handshake {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The exchange failed after the connection was up (`UC`).
    #[error("request to {addr}: {source}")]
    Reset {
        addr: SocketAddr,
        #[source]
        source: hyper::Error,
    },
}

impl UpstreamError {
    /// Whether the client's connection must be reset instead of answered: a denied
    /// client stays denied, it does not get an HTTP answer from the proxy.
    pub fn resets_client(&self) -> bool {
        matches!(self, Self::Denied { .. } | Self::ConnectTimeout { .. })
    }
}

/// Connection settings shared by every pool.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Bound on TCP connect.
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long; HTTP/2 keepalive interval.
    pub idle_timeout: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct ConnKey {
    netns: u64,
    addr: SocketAddr,
    wire: Wire,
    /// Through the mesh tunnel (a pod that joins or leaves the mesh gets new
    /// connections, not the other kind's).
    tunnel: bool,
}

struct Idle {
    send: http1::SendRequest<Body>,
    used: u32,
    since: Instant,
    /// The pool's generation when the connection was made (see [`ServicePool::flush`]).
    generation: u64,
}

struct Shared {
    send: http2::SendRequest<Body>,
    used: Arc<AtomicU32>,
}

/// One Service port's connections and circuit breaker.
pub struct ServicePool {
    name: String,
    settings: Settings,
    conns: Arc<Semaphore>,
    max_connections: AtomicU32,
    max_pending: AtomicU32,
    max_per_conn: AtomicU32,
    pending: AtomicU32,
    idle: Mutex<HashMap<ConnKey, Vec<Idle>>>,
    shared: Mutex<HashMap<ConnKey, Shared>>,
    generation: AtomicU64,
    returned: Notify,
}

/// A response from a backend; its body returns an HTTP/1.1 connection to the pool
/// when it is done.
pub type UpstreamResponse = http::Response<PooledBody>;

impl ServicePool {
    /// A pool for the Service port `name`.
    pub fn new(name: String, cfg: &Resilience, settings: Settings) -> Arc<Self> {
        Arc::new(Self {
            name,
            settings,
            conns: Arc::new(Semaphore::new(cfg.max_connections as usize)),
            max_connections: AtomicU32::new(cfg.max_connections),
            max_pending: AtomicU32::new(cfg.max_pending_requests),
            max_per_conn: AtomicU32::new(cfg.max_requests_per_connection),
            pending: AtomicU32::new(0),
            idle: Mutex::default(),
            shared: Mutex::default(),
            generation: AtomicU64::new(0),
            returned: Notify::new(),
        })
    }

    /// Applies new limits; open connections stay (a lowered maximum takes effect as
    /// they close).
    pub fn update(&self, cfg: &Resilience) {
        let old = self
            .max_connections
            .swap(cfg.max_connections, Ordering::AcqRel);
        if cfg.max_connections > old {
            self.conns.add_permits((cfg.max_connections - old) as usize);
        } else {
            let mut owed = (old - cfg.max_connections) as usize;
            owed -= self.conns.forget_permits(owed);
            if owed > 0 {
                // Permits in use: take them as their connections close.
                let conns = Arc::clone(&self.conns);
                tokio::spawn(async move {
                    if let Ok(p) = conns.acquire_many_owned(owed as u32).await {
                        p.forget();
                    }
                });
            }
        }
        self.max_pending
            .store(cfg.max_pending_requests, Ordering::Release);
        self.max_per_conn
            .store(cfg.max_requests_per_connection, Ordering::Release);
    }

    /// Stops reusing every connection made so far: idle ones close now, HTTP/2 ones
    /// take no new requests, busy HTTP/1.1 ones close when their exchange ends. For a
    /// policy change: a new connection is judged by the new policy.
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.idle.lock().unwrap_or_else(|p| p.into_inner()).clear();
        self.shared
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
    }

    /// Closes connections idle longer than the idle timeout.
    pub fn sweep(&self) {
        let max = self.settings.idle_timeout;
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.retain(|_, list| {
            list.retain(|i| i.since.elapsed() < max && !i.send.is_closed());
            !list.is_empty()
        });
        drop(idle);
        let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
        shared.retain(|_, s| !s.send.is_closed());
    }

    /// Backend connections open now (idle or busy).
    pub fn open_connections(&self) -> usize {
        let max = self.max_connections.load(Ordering::Acquire) as usize;
        max.saturating_sub(self.conns.available_permits())
    }

    /// Sends `req` to `addr` from the pod namespace `ns`, through the mesh tunnel when
    /// `via` is given.
    pub async fn send(
        self: &Arc<Self>,
        ns: &Arc<Netns>,
        addr: SocketAddr,
        wire: Wire,
        req: http::Request<Body>,
        via: Option<&Via>,
    ) -> Result<UpstreamResponse, UpstreamError> {
        let key = ConnKey {
            netns: ns.inode,
            addr,
            wire,
            tunnel: via.is_some(),
        };
        let reset = |source| UpstreamError::Reset { addr, source };
        match wire {
            Wire::Http1 => {
                let mut conn = self.checkout_http1(ns, key, via).await?;
                let resp = conn.send.send_request(req).await.map_err(reset)?;
                conn.used += 1;
                let max = self.max_per_conn.load(Ordering::Acquire);
                let keep = (max == 0 || conn.used < max)
                    && resp.status() != http::StatusCode::SWITCHING_PROTOCOLS;
                let ret = keep.then(|| (Arc::clone(self), key, conn));
                Ok(resp.map(|inner| PooledBody { inner, ret }))
            }
            Wire::Http2 => {
                let mut send = self.checkout_http2(ns, key, via).await?;
                let resp = send.send_request(req).await.map_err(reset)?;
                Ok(resp.map(|inner| PooledBody { inner, ret: None }))
            }
        }
    }

    async fn checkout_http1(
        &self,
        ns: &Arc<Netns>,
        key: ConnKey,
        via: Option<&Via>,
    ) -> Result<Idle, UpstreamError> {
        loop {
            if let Some(idle) = self.take_idle(key).await {
                return Ok(idle);
            }
            let permit = match self.permit().await? {
                Some(p) => p,
                None => continue,
            };
            let stream = self.connect(ns, key.addr, via).await?;
            let (send, conn) = http1::Builder::new()
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| UpstreamError::Handshake {
                    addr: key.addr,
                    source,
                })?;
            tokio::spawn(async move {
                let _ = conn.with_upgrades().await;
                drop(permit);
            });
            return Ok(Idle {
                send,
                used: 0,
                since: Instant::now(),
                generation: self.generation.load(Ordering::Acquire),
            });
        }
    }

    async fn checkout_http2(
        &self,
        ns: &Arc<Netns>,
        key: ConnKey,
        via: Option<&Via>,
    ) -> Result<http2::SendRequest<Body>, UpstreamError> {
        let max = self.max_per_conn.load(Ordering::Acquire);
        loop {
            {
                let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
                if let Some(s) = shared.get(&key) {
                    let used = s.used.fetch_add(1, Ordering::AcqRel) + 1;
                    if !s.send.is_closed() && (max == 0 || used <= max) {
                        return Ok(s.send.clone());
                    }
                    // Retired: in-flight streams finish, then the connection closes.
                    shared.remove(&key);
                }
            }
            let Some(permit) = self.permit().await? else {
                continue;
            };
            let stream = self.connect(ns, key.addr, via).await?;
            let (send, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(self.settings.idle_timeout)
                .keep_alive_timeout(Duration::from_secs(20))
                .handshake(TokioIo::new(stream))
                .await
                .map_err(|source| UpstreamError::Handshake {
                    addr: key.addr,
                    source,
                })?;
            tokio::spawn(async move {
                let _ = conn.await;
                drop(permit);
            });
            let mut shared = self.shared.lock().unwrap_or_else(|p| p.into_inner());
            shared.insert(
                key,
                Shared {
                    send: send.clone(),
                    used: Arc::new(AtomicU32::new(1)),
                },
            );
            return Ok(send);
        }
    }

    /// A ready idle HTTP/1.1 connection for `key`, if any.
    async fn take_idle(&self, key: ConnKey) -> Option<Idle> {
        loop {
            let mut conn = {
                let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
                idle.get_mut(&key)?.pop()?
            };
            if conn.since.elapsed() >= self.settings.idle_timeout {
                continue;
            }
            // A connection whose last response body just ended becomes ready at once;
            // one that does not is closing.
            if let Ok(Ok(())) =
                tokio::time::timeout(Duration::from_secs(1), conn.send.ready()).await
            {
                return Some(conn);
            }
        }
    }

    /// A connection permit; `None` when an idle connection came back meanwhile.
    async fn permit(&self) -> Result<Option<OwnedSemaphorePermit>, UpstreamError> {
        if let Ok(p) = Arc::clone(&self.conns).try_acquire_owned() {
            return Ok(Some(p));
        }
        // At the maximum: an idle connection to another endpoint gives its place.
        self.evict_idle();
        let max_pending = self.max_pending.load(Ordering::Acquire);
        if self.pending.fetch_add(1, Ordering::AcqRel) >= max_pending {
            self.pending.fetch_sub(1, Ordering::AcqRel);
            return Err(UpstreamError::Overflow {
                service: self.name.clone(),
            });
        }
        let result = tokio::select! {
            p = Arc::clone(&self.conns).acquire_owned() => p.ok(),
            () = self.returned.notified() => None,
        };
        self.pending.fetch_sub(1, Ordering::AcqRel);
        Ok(result)
    }

    fn evict_idle(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = idle.values_mut().find(|l| !l.is_empty()) {
            list.remove(0);
        }
    }

    fn give_back(&self, key: ConnKey, mut conn: Idle) {
        if conn.generation != self.generation.load(Ordering::Acquire) {
            // Made before a flush: closed by the drop.
            return;
        }
        conn.since = Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        idle.entry(key).or_default().push(conn);
        drop(idle);
        self.returned.notify_one();
    }

    async fn connect(
        &self,
        ns: &Arc<Netns>,
        addr: SocketAddr,
        via: Option<&Via>,
    ) -> Result<Transport, UpstreamError> {
        let pod = || ns.name.clone();
        if let Some(via) = via {
            return match via.open(addr).await {
                Ok(t) => Ok(Transport::Tunnel(t)),
                Err(ViaError::Denied { .. }) => Err(UpstreamError::Denied {
                    addr,
                    pod: pod(),
                    source: io::Error::from_raw_os_error(libc::EPERM),
                }),
                Err(e) => Err(UpstreamError::Connect {
                    addr,
                    pod: pod(),
                    source: io::Error::other(e.to_string()),
                }),
            };
        }
        let classify = |source: io::Error| {
            if sys::is_denied(&source) {
                UpstreamError::Denied {
                    addr,
                    pod: pod(),
                    source,
                }
            } else {
                UpstreamError::Connect {
                    addr,
                    pod: pod(),
                    source,
                }
            }
        };
        let sock = ns.tcp_socket(addr).await.map_err(classify)?;
        match tokio::time::timeout(self.settings.connect_timeout, sock.connect(addr)).await {
            Ok(r) => r.map(Transport::Tcp).map_err(classify),
            Err(_) => Err(UpstreamError::ConnectTimeout {
                addr,
                pod: pod(),
                after: self.settings.connect_timeout,
            }),
        }
    }
}

/// A backend response body; an HTTP/1.1 connection goes back to its pool when the
/// body is dropped (finished, or abandoned: then the connection is closing and the
/// pool discards it).
pub struct PooledBody {
    inner: Incoming,
    ret: Option<(Arc<ServicePool>, ConnKey, Idle)>,
}

impl HttpBody for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some((pool, key, conn)) = self.ret.take() {
            pool.give_back(key, conn);
        }
    }
}
