//! The proxy's refusals, reported to the agent (`POST /v1/proxy/flows` on its admin
//! socket) so that they show in `mesh-agent observe` next to the kernel's verdicts.
//! Best effort and bounded: flows are batched, a full queue or an absent agent loses
//! reports (counted in the log at debug level), never a verdict.

use std::path::PathBuf;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use mesh_common::l7::{PROXY_FLOWS_PATH, ProxyFlow};
use tokio::{net::UnixStream, sync::mpsc};

/// Flows waiting to be sent; more are dropped.
const QUEUE: usize = 1024;
/// Most flows in one report.
const MAX_BATCH: usize = 256;

/// Sends refusals to the agent.
#[derive(Clone)]
pub struct FlowReporter {
    tx: mpsc::Sender<ProxyFlow>,
}

impl FlowReporter {
    /// Starts the sender towards the agent's admin socket `socket`.
    pub fn start(socket: PathBuf) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(socket, rx));
        Self { tx }
    }

    /// Queues `flow`; dropped when the queue is full (the agent is away or slow).
    pub fn report(&self, flow: ProxyFlow) {
        if self.tx.try_send(flow).is_err() {
            tracing::debug!("flow report queue full; refusal not reported");
        }
    }
}

async fn run(socket: PathBuf, mut rx: mpsc::Receiver<ProxyFlow>) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(f) => batch.push(f),
                Err(_) => break,
            }
        }
        if let Err(e) = post(&socket, &batch).await {
            tracing::debug!(agent = %socket.display(), error = %e, lost = batch.len(), "flow report not delivered");
        }
    }
}

async fn post(socket: &PathBuf, batch: &[ProxyFlow]) -> Result<(), String> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(conn);
    let mut body = String::new();
    for f in batch {
        body.push_str(&serde_json::to_string(f).map_err(|e| e.to_string())?);
        body.push('\n');
    }
    let req = Request::post(PROXY_FLOWS_PATH)
        .header(header::HOST, "agent")
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("agent answered {}", resp.status()));
    }
    Ok(())
}
