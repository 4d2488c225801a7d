//! The destination side of HBONE: a listener on each enrolled pod's own address, port
//! 15008, inside the pod's namespace. Each connection must prove a workload identity
//! of the trust domain (mutual TLS 1.3); each CONNECT stream on it names a port of this
//! pod, is authorized, and is then joined to a connection to the application.

use std::{
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Empty;
use hyper::{body::Incoming, server::conn::http2, service::service_fn};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use mesh_identity::SpiffeId;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::{CONNECTION_WINDOW, COPY_BUFFER, HANDSHAKE_TIMEOUT, MAX_STREAMS, STREAM_WINDOW};
use crate::{
    inpod::Netns,
    listeners,
    metrics::{ProxyMetrics, TcpLabels},
    throttle,
};

/// How long the application may take to accept a tunnelled connection.
const APP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// One tunnelled stream asking to reach this pod.
#[derive(Debug)]
pub struct StreamRequest<'a> {
    /// The tunnel's source address (the client pod's own address).
    pub peer: SocketAddr,
    /// The identity the client's certificate proved; `None` for a plaintext client
    /// (captured inbound), which has neither principal nor namespace.
    pub principal: Option<&'a SpiffeId>,
    /// The pod address and port the stream is for.
    pub target: SocketAddr,
}

/// Why a stream was refused, for the log, the counter and the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// Metric label: `not_hosted`, `network_policy`, `authorization`, ...
    pub reason: &'static str,
    /// Human-readable detail (which policy, which rule).
    pub detail: String,
    /// The AuthorizationPolicy that decided (`namespace/name`), when one did.
    pub policy: Option<String>,
}

/// How an admitted stream is served.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Admission {
    /// Its bytes go to the application as they are.
    Bytes,
    /// It goes to an HTTP port: each request in it is judged
    /// ([`Gate::check_request`]) before it reaches the application.
    PerRequest,
}

/// Decides whether a stream may reach its pod (NetworkPolicy and AuthorizationPolicy).
pub trait Gate: Send + Sync {
    /// `Ok` lets the stream through, served as the [`Admission`] says.
    fn check(&self, pod: &InboundPod, stream: &StreamRequest<'_>) -> Result<Admission, Refusal>;

    /// For a [`Admission::PerRequest`] stream: whether the request `parts` may pass.
    fn check_request(
        &self,
        pod: &InboundPod,
        stream: &StreamRequest<'_>,
        parts: &http::request::Parts,
    ) -> Result<(), Refusal>;
}

/// A pod served by an HBONE listener.
pub struct InboundPod {
    /// `namespace/name`, for logs.
    pub name: String,
    /// The pod, to find its current security settings.
    pub key: mesh_common::l7::ObjectRef,
    /// The pod's SPIFFE identity.
    pub identity: String,
    /// The pod's workload name (a metric label).
    pub workload: String,
    /// The pod's addresses: a stream for another address is refused.
    pub addrs: Vec<IpAddr>,
    /// The pod's namespace, where connections to the application are made.
    pub netns: Arc<Netns>,
    /// TLS server configuration presenting the pod's current SVID and requiring a
    /// client certificate of the trust domain.
    pub tls: Arc<rustls::ServerConfig>,
}

/// Accepts tunnels on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<InboundPod>,
    gate: Arc<dyn Gate>,
    metrics: Arc<ProxyMetrics>,
) {
    let acceptor = TlsAcceptor::from(Arc::clone(&pod.tls));
    loop {
        let (tcp, peer) = listeners::accept(&listener, &pod.name, "HBONE").await;
        let (pod, gate, metrics, acceptor) = (
            Arc::clone(&pod),
            Arc::clone(&gate),
            Arc::clone(&metrics),
            acceptor.clone(),
        );
        tokio::spawn(async move { tunnel(tcp, peer, acceptor, pod, gate, metrics).await });
    }
}

/// One tunnel connection: handshake, then its streams until the client closes it.
async fn tunnel(
    tcp: TcpStream,
    peer: SocketAddr,
    acceptor: TlsAcceptor,
    pod: Arc<InboundPod>,
    gate: Arc<dyn Gate>,
    metrics: Arc<ProxyMetrics>,
) {
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            metrics.record_hbone_refusal("handshake");
            if let Some(suppressed) = throttle::refusal("hbone", "handshake") {
                tracing::warn!(pod = %pod.name, %peer, error = %e, suppressed, "HBONE handshake refused");
            }
            return;
        }
        Err(_) => {
            metrics.record_hbone_refusal("handshake_timeout");
            if let Some(suppressed) = throttle::refusal("hbone", "handshake_timeout") {
                tracing::warn!(pod = %pod.name, %peer, suppressed, "HBONE handshake timed out");
            }
            return;
        }
    };
    // The verifier admits only certificates with one SPIFFE ID of our trust domain.
    let Some(principal) = mesh_identity::tls::peer_identity(tls.get_ref().1) else {
        metrics.record_hbone_refusal("no_identity");
        if let Some(suppressed) = throttle::refusal("hbone", "no_identity") {
            tracing::warn!(pod = %pod.name, %peer, suppressed, "HBONE client proved no identity");
        }
        return;
    };
    let principal = Arc::new(principal);
    let service = service_fn(move |req| {
        let (pod, gate, metrics, principal) = (
            Arc::clone(&pod),
            Arc::clone(&gate),
            Arc::clone(&metrics),
            Arc::clone(&principal),
        );
        async move {
            Ok::<_, std::convert::Infallible>(
                stream(req, peer, &principal, &pod, &gate, &metrics).await,
            )
        }
    });
    let served = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_concurrent_streams(MAX_STREAMS)
        .serve_connection(TokioIo::new(tls), service)
        .await;
    if let Err(e) = served {
        tracing::debug!(%peer, error = %e, "HBONE tunnel ended");
    }
}

/// One CONNECT stream: checked, authorized, joined to the application.
async fn stream(
    req: Request<Incoming>,
    peer: SocketAddr,
    principal: &SpiffeId,
    pod: &Arc<InboundPod>,
    gate: &Arc<dyn Gate>,
    metrics: &Arc<ProxyMetrics>,
) -> Response<Empty<Bytes>> {
    let refuse = |status: StatusCode, refusal: Refusal| {
        metrics.record_hbone_refusal(refusal.reason);
        if let Some(suppressed) = throttle::refusal("hbone", refusal.reason) {
            tracing::warn!(
                pod = %pod.name, %peer, %principal, reason = refusal.reason,
                detail = %refusal.detail, suppressed, "HBONE stream refused"
            );
        }
        status_only(status)
    };
    if req.method() != Method::CONNECT {
        return refuse(
            StatusCode::METHOD_NOT_ALLOWED,
            Refusal {
                reason: "not_connect",
                detail: format!("method {}", req.method()),
                policy: None,
            },
        );
    }
    let Some(target) = req
        .uri()
        .authority()
        .and_then(|a| a.as_str().parse::<SocketAddr>().ok())
    else {
        return refuse(
            StatusCode::BAD_REQUEST,
            Refusal {
                reason: "bad_target",
                detail: format!("authority {:?} is no address:port", req.uri()),
                policy: None,
            },
        );
    };
    if !pod.addrs.contains(&target.ip()) {
        return refuse(
            StatusCode::BAD_REQUEST,
            Refusal {
                reason: "not_hosted",
                detail: format!("{target} is not an address of this pod"),
                policy: None,
            },
        );
    }
    let request = StreamRequest {
        peer,
        principal: Some(principal),
        target,
    };
    let admission = match gate.check(pod, &request) {
        Ok(a) => a,
        Err(refusal) => return refuse(StatusCode::FORBIDDEN, refusal),
    };
    let app = match connect_app(&pod.netns, target).await {
        Ok(app) => app,
        Err(e) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                Refusal {
                    reason: "app_unreachable",
                    detail: e.to_string(),
                    policy: None,
                },
            );
        }
    };
    let name = pod.name.clone();
    // Istio's destination-side view: the client is known by its identity only.
    let labels = TcpLabels {
        reporter: "destination",
        source_workload: "unknown".into(),
        source_workload_namespace: principal.namespace().to_owned(),
        source_principal: principal.to_string(),
        destination_workload: pod.workload.clone(),
        destination_workload_namespace: pod.key.namespace.clone(),
        destination_principal: pod.identity.clone(),
        destination_service: String::new(),
        connection_security_policy: "mutual_tls",
    };
    let metrics = Arc::clone(metrics);
    let per_request = (admission == Admission::PerRequest).then(|| {
        let (gate, pod, principal) = (Arc::clone(gate), Arc::clone(pod), principal.clone());
        move |parts: &http::request::Parts| {
            let stream = StreamRequest {
                peer,
                principal: Some(&principal),
                target,
            };
            gate.check_request(&pod, &stream, parts)
        }
    });
    tokio::spawn(async move {
        match hyper::upgrade::on(req).await {
            Ok(upgraded) => match per_request {
                Some(check) => super::http::serve(upgraded, app, target, check).await,
                None => {
                    metrics.record_tcp_open(&labels);
                    let mut tunnel = TokioIo::new(upgraded);
                    let mut app = app;
                    let copied = tokio::io::copy_bidirectional_with_sizes(
                        &mut tunnel,
                        &mut app,
                        COPY_BUFFER,
                        COPY_BUFFER,
                    )
                    .await;
                    let (received, sent) = copied.unwrap_or_else(|e| {
                        tracing::debug!(pod = %name, %target, error = %e, "HBONE stream ended");
                        (0, 0)
                    });
                    metrics.record_tcp_close(&labels, sent, received);
                }
            },
            Err(e) => tracing::debug!(pod = %name, %target, error = %e, "HBONE upgrade failed"),
        }
    });
    status_only(StatusCode::OK)
}

/// Connects to the application from inside its pod, on the pod's loopback at the
/// stream's port: the connection never leaves the pod, so the kernel's policy hooks
/// (which already let the tunnel in, and left this stream to [`Gate`]) do not judge it
/// again as the pod talking to itself.
pub(crate) async fn connect_app(
    netns: &Arc<Netns>,
    target: SocketAddr,
) -> std::io::Result<TcpStream> {
    let local = match target {
        SocketAddr::V4(_) => SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), target.port()),
        SocketAddr::V6(_) => SocketAddr::new(std::net::Ipv6Addr::LOCALHOST.into(), target.port()),
    };
    let sock = netns.tcp_socket(local).await?;
    match tokio::time::timeout(APP_CONNECT_TIMEOUT, sock.connect(local)).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("{local}: no answer within {APP_CONNECT_TIMEOUT:?}"),
        )),
    }
}

fn status_only(status: StatusCode) -> Response<Empty<Bytes>> {
    let mut resp = Response::new(Empty::new());
    *resp.status_mut() = status;
    resp
}
