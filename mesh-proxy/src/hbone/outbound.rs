//! The source side of HBONE: streams to destinations in enrolled pods, each a
//! CONNECT request on a shared mutual-TLS HTTP/2 connection to the destination pod's
//! port 15008, opened from the client pod's own network namespace.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, SocketAddr},
    sync::{Arc, Mutex},
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Empty;
use hyper::{client::conn::http2, upgrade::Upgraded};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_identity::SpiffeId;
use tokio_rustls::TlsConnector;

use super::{CONNECTION_WINDOW, HANDSHAKE_TIMEOUT, HBONE_PORT, STREAM_WINDOW};
use crate::{inpod::Netns, sys};

/// A tunnelled stream: bytes written reach the destination's application.
pub type TunnelStream = TokioIo<Upgraded>;

/// Why a stream could not be opened, naming the destination.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The TCP connection to the destination's HBONE port failed.
    #[error("HBONE {peer}: connect from pod {pod}: {source}")]
    Connect {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        /// The client pod.
        pod: String,
        #[source]
        source: io::Error,
    },
    /// The kernel's NetworkPolicy refused the connection.
    #[error("HBONE {peer}: denied by network policy for pod {pod}")]
    Denied {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        /// The client pod.
        pod: String,
    },
    /// No TLS session: the handshake failed (untrusted, expired, wrong identity) or
    /// timed out.
    #[error("HBONE {peer}: TLS handshake: {reason}")]
    Handshake {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        /// What failed.
        reason: String,
    },
    /// The destination presented another identity than the one it is known by.
    #[error("HBONE {peer}: peer is {found}, expected {expected}")]
    WrongPeer {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        /// The identity the configuration gives the destination.
        expected: String,
        /// The identity its certificate proved.
        found: String,
    },
    /// The HTTP/2 layer failed (handshake, or the tunnel closed under the request).
    #[error("HBONE {peer}: HTTP/2: {source}")]
    Http {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        #[source]
        source: hyper::Error,
    },
    /// The destination refused the stream (403: not authorized; 503: its application
    /// did not answer; 400: it does not host the destination).
    #[error("HBONE {peer}: CONNECT {target} answered {status}")]
    Refused {
        /// The destination pod's HBONE address.
        peer: SocketAddr,
        /// The stream's destination.
        target: SocketAddr,
        /// The status the destination answered.
        status: StatusCode,
    },
}

/// Who opens a stream: the client pod's namespace and its workload identity.
pub struct Origin<'a> {
    /// The client pod's network namespace (the tunnel leaves from there).
    pub netns: &'a Arc<Netns>,
    /// The client pod's SPIFFE identity, as a tunnel key.
    pub identity: &'a str,
    /// TLS client configuration presenting the client's current SVID.
    pub tls: Arc<rustls::ClientConfig>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct TunnelKey {
    netns: u64,
    identity: String,
    peer: IpAddr,
}

/// A tunnel's slot: the lock makes concurrent first streams to one destination wait
/// for a single handshake instead of racing their own.
type Slot = Arc<tokio::sync::Mutex<Option<http2::SendRequest<Empty<Bytes>>>>>;

/// Open tunnels, one per (client namespace, identity, destination pod).
pub struct Tunnels {
    connect_timeout: Duration,
    slots: Mutex<HashMap<TunnelKey, Slot>>,
}

impl Tunnels {
    /// No tunnels yet; new TCP connections give up after `connect_timeout`.
    pub fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            slots: Mutex::default(),
        }
    }

    /// Opens a stream to `target` (a pod address and port) in a pod that proves
    /// `expected` as its identity, reusing the tunnel to that pod when one is open.
    pub async fn open(
        &self,
        origin: &Origin<'_>,
        target: SocketAddr,
        expected: &str,
    ) -> Result<TunnelStream, HboneError> {
        let key = TunnelKey {
            netns: origin.netns.inode,
            identity: origin.identity.to_owned(),
            peer: target.ip(),
        };
        let slot = Arc::clone(
            self.slots
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(key)
                .or_default(),
        );
        let mut sender = {
            let mut guard = slot.lock().await;
            match guard.as_ref() {
                Some(s) if !s.is_closed() => s.clone(),
                _ => {
                    let s = self.handshake(origin, target.ip(), expected).await?;
                    *guard = Some(s.clone());
                    s
                }
            }
        };
        let peer = SocketAddr::new(target.ip(), HBONE_PORT);
        let req = Request::builder()
            .method(Method::CONNECT)
            .uri(target.to_string())
            .body(Empty::new())
            .expect("a socket address is a valid authority");
        let resp = sender
            .send_request(req)
            .await
            .map_err(|source| HboneError::Http { peer, source })?;
        if resp.status() != StatusCode::OK {
            return Err(HboneError::Refused {
                peer,
                target,
                status: resp.status(),
            });
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|source| HboneError::Http { peer, source })?;
        Ok(TokioIo::new(upgraded))
    }

    /// Drops tunnels that have closed, so the map does not keep destinations that are
    /// gone (called periodically).
    pub fn sweep(&self) {
        self.slots
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, slot| {
                slot.try_lock()
                    .map(|s| s.as_ref().is_some_and(|s| !s.is_closed()))
                    // Busy: a stream is being opened on it right now.
                    .unwrap_or(true)
            });
    }

    /// Number of open tunnels.
    pub fn len(&self) -> usize {
        self.slots.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Whether no tunnel is open.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A new tunnel: TCP from the client's namespace, TLS proving both identities,
    /// then HTTP/2 whose connection task runs until the tunnel closes.
    async fn handshake(
        &self,
        origin: &Origin<'_>,
        pod: IpAddr,
        expected: &str,
    ) -> Result<http2::SendRequest<Empty<Bytes>>, HboneError> {
        let peer = SocketAddr::new(pod, HBONE_PORT);
        let pod_name = || origin.netns.name.clone();
        let classify = |source: io::Error| {
            if sys::is_denied(&source) {
                HboneError::Denied {
                    peer,
                    pod: pod_name(),
                }
            } else {
                HboneError::Connect {
                    peer,
                    pod: pod_name(),
                    source,
                }
            }
        };
        let sock = origin.netns.tcp_socket(peer).await.map_err(classify)?;
        let tcp = match tokio::time::timeout(self.connect_timeout, sock.connect(peer)).await {
            Ok(r) => r.map_err(classify)?,
            Err(_) => {
                return Err(classify(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no answer within {:?}", self.connect_timeout),
                )));
            }
        };
        // The name tells the destination which of its SVIDs to present; identities
        // are checked on the SPIFFE ID, not on a DNS name.
        let expected_id: SpiffeId = expected.parse().map_err(|e| HboneError::Handshake {
            peer,
            reason: format!("expected identity {expected:?}: {e}"),
        })?;
        let name = mesh_identity::tls::server_name(&expected_id);
        let tls = match tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::clone(&origin.tls)).connect(name, tcp),
        )
        .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                return Err(HboneError::Handshake {
                    peer,
                    reason: e.to_string(),
                });
            }
            Err(_) => {
                return Err(HboneError::Handshake {
                    peer,
                    reason: format!("no answer within {HANDSHAKE_TIMEOUT:?}"),
                });
            }
        };
        let found = mesh_identity::tls::peer_identity(tls.get_ref().1);
        let found_str = found.as_ref().map(SpiffeId::to_string).unwrap_or_default();
        if found_str != expected {
            return Err(HboneError::WrongPeer {
                peer,
                expected: expected.to_owned(),
                found: found_str,
            });
        }
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .handshake(TokioIo::new(tls))
            .await
            .map_err(|source| HboneError::Http { peer, source })?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%peer, error = %e, "HBONE tunnel closed");
            }
        });
        Ok(sender)
    }
}
