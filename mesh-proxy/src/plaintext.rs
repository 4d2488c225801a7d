//! The destination side for plaintext: connections to an enrolled pod that did not come
//! through the tunnel (clients outside the mesh), captured by the pod's sk_lookup
//! program whenever its PeerAuthentication or AuthorizationPolicy must see them
//! ([`crate::capture`]). The listener lives in the pod's namespace on its loopback
//! (`127.0.0.1:15006`, `[::1]:15006`, as ztunnel's inbound plaintext port), so it is
//! reachable only through the capture. Each connection keeps the addresses its client
//! used: its local address is the pod address and port it was for. It is judged as a
//! tunnelled stream is, without a principal ([`Gate`]); refused, it is reset; admitted,
//! it is joined to the application on the pod's loopback.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::{
    hbone::{
        COPY_BUFFER,
        inbound::{Admission, Gate, InboundPod, Refusal, StreamRequest, connect_app},
    },
    listeners,
    metrics::{ProxyMetrics, TcpLabels},
    throttle,
};

/// ztunnel's inbound plaintext port.
pub const PLAINTEXT_PORT: u16 = 15006;

/// The listener addresses for a pod with addresses of these families.
pub fn listen_addrs(addrs: &[IpAddr]) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    if addrs.iter().any(IpAddr::is_ipv4) {
        out.push(SocketAddr::new(Ipv4Addr::LOCALHOST.into(), PLAINTEXT_PORT));
    }
    if addrs.iter().any(IpAddr::is_ipv6) {
        out.push(SocketAddr::new(Ipv6Addr::LOCALHOST.into(), PLAINTEXT_PORT));
    }
    out
}

/// Accepts captured connections on `listener` until the task is aborted.
pub async fn serve(
    listener: TcpListener,
    pod: Arc<InboundPod>,
    gate: Arc<dyn Gate>,
    metrics: Arc<ProxyMetrics>,
) {
    loop {
        let (tcp, peer) = listeners::accept(&listener, &pod.name, "plaintext").await;
        let (pod, gate, metrics) = (Arc::clone(&pod), Arc::clone(&gate), Arc::clone(&metrics));
        tokio::spawn(async move { connection(tcp, peer, pod, gate, metrics).await });
    }
}

/// One captured connection: judged, then joined to the application or reset.
async fn connection(
    tcp: TcpStream,
    peer: SocketAddr,
    pod: Arc<InboundPod>,
    gate: Arc<dyn Gate>,
    metrics: Arc<ProxyMetrics>,
) {
    let refuse = |tcp: TcpStream, refusal: Refusal| {
        metrics.record_plaintext_refusal(refusal.reason);
        if let Some(suppressed) = throttle::refusal("plaintext", refusal.reason) {
            tracing::warn!(
                pod = %pod.name, %peer, reason = refusal.reason, detail = %refusal.detail,
                suppressed, "plaintext connection refused"
            );
        }
        // A reset, as a refused connection gets from Istio's ztunnel (a zero linger
        // does not block the close).
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
    };
    let target = match tcp.local_addr() {
        Ok(t) if pod.addrs.contains(&t.ip()) => t,
        Ok(t) => {
            let detail = format!("{t} is not an address of this pod");
            return refuse(
                tcp,
                Refusal {
                    reason: "not_hosted",
                    detail,
                    policy: None,
                },
            );
        }
        Err(e) => {
            tracing::debug!(pod = %pod.name, %peer, error = %e, "plaintext connection gone");
            return;
        }
    };
    let request = StreamRequest {
        peer,
        principal: None,
        target,
    };
    let admission = match gate.check(&pod, &request) {
        Ok(a) => a,
        Err(refusal) => return refuse(tcp, refusal),
    };
    let mut app = match connect_app(&pod.netns, target).await {
        Ok(app) => app,
        Err(e) => {
            let refusal = Refusal {
                reason: "app_unreachable",
                detail: e.to_string(),
                policy: None,
            };
            return refuse(tcp, refusal);
        }
    };
    if admission == Admission::PerRequest {
        let check = move |parts: &http::request::Parts| {
            let stream = StreamRequest {
                peer,
                principal: None,
                target,
            };
            gate.check_request(&pod, &stream, parts)
        };
        return crate::hbone::http::serve(TokioIo::new(tcp), app, target, check).await;
    }
    // Istio's destination-side view of a plaintext client: no identity.
    let labels = TcpLabels {
        reporter: "destination",
        source_workload: "unknown".into(),
        source_workload_namespace: "unknown".into(),
        source_principal: "unknown".into(),
        destination_workload: pod.workload.clone(),
        destination_workload_namespace: pod.key.namespace.clone(),
        destination_principal: pod.identity.clone(),
        destination_service: String::new(),
        connection_security_policy: "none",
    };
    metrics.record_tcp_open(&labels);
    let mut tcp = tcp;
    let copied =
        tokio::io::copy_bidirectional_with_sizes(&mut tcp, &mut app, COPY_BUFFER, COPY_BUFFER)
            .await;
    let (received, sent) = copied.unwrap_or_else(|e| {
        tracing::debug!(pod = %pod.name, %target, error = %e, "plaintext connection ended");
        (0, 0)
    });
    metrics.record_tcp_close(&labels, sent, received);
}
