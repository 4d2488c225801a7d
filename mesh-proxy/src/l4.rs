//! Plain TCP connections the kernel sent to the proxy because both ends are in the
//! mesh: the bytes ride a stream of the mutual-TLS tunnel to the destination pod,
//! untouched. A stream the tunnel cannot open resets the client's connection, as a
//! refused connection would.

use std::{net::SocketAddr, sync::Arc};

use tokio::net::TcpStream;

use crate::{
    forward::Source,
    hbone::COPY_BUFFER,
    mesh::Via,
    metrics::{ProxyMetrics, TcpLabels},
};

/// Carries `client` (which dialled `dst`) through `via` until either side closes.
pub async fn forward(
    client: TcpStream,
    dst: SocketAddr,
    source: Arc<Source>,
    via: Via,
    metrics: Arc<ProxyMetrics>,
) {
    let labels = TcpLabels {
        reporter: "source",
        source_workload: source.pod.workload.clone(),
        source_workload_namespace: source.pod.pod.namespace.clone(),
        source_principal: via.source_principal().to_owned(),
        destination_workload: via.peer.workload.clone(),
        destination_workload_namespace: via.peer.namespace.clone(),
        destination_principal: via.peer.identity.clone(),
        destination_service: String::new(),
        connection_security_policy: "mutual_tls",
    };
    // connect4/6 judged the client's egress to `dst` before sending it here.
    let mut tunnel = match via.open_judged(dst).await {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(pod = %source.netns.name, %dst, error = %e, "tunnel refused; resetting the client");
            // Linger 0: close() sends RST, so the client sees a refusal, not an EOF.
            let _ = socket2::SockRef::from(&client).set_linger(Some(std::time::Duration::ZERO));
            return;
        }
    };
    metrics.record_tcp_open(&labels);
    let mut client = client;
    let copied = tokio::io::copy_bidirectional_with_sizes(
        &mut client,
        &mut tunnel,
        COPY_BUFFER,
        COPY_BUFFER,
    )
    .await;
    let (sent_up, sent_down) = match copied {
        Ok(n) => n,
        Err(e) => {
            tracing::debug!(pod = %source.netns.name, %dst, error = %e, "tunnelled connection ended");
            (0, 0)
        }
    };
    // Istio counts from the client's view: sent = to the client, received = from it.
    metrics.record_tcp_close(&labels, sent_down, sent_up);
}
