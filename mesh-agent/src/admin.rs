//! The agent's admin API: HTTP/1.1 over a Unix socket at `<run-dir>/<node>/agent.sock`
//! (default `/run/mesh/<node>/agent.sock`, directory mode 0700).
//!
//! A Unix socket rather than TCP because the agent runs inside the node's network
//! namespace: a path in the file system is reachable from any namespace (an operator's
//! shell on the host, a test harness), and file permissions guard it, so flows and
//! policy details are only shown to whoever may read the directory.
//!
//! - `GET /v1/flows`: the stored flows (the last [`crate::flows::FLOW_CAPACITY`]) as
//!   NDJSON, one [`Flow`] per line, oldest first. `follow=true` keeps the response open
//!   (chunked) and streams each new flow as it comes; `verdict=dropped|audit` and
//!   `pod=NAMESPACE/NAME` (source or destination) filter.
//! - `GET /v1/policy`: a [`PolicyReport`](crate::report::PolicyReport) as JSON:
//!   policies with the pods they select, identities, and the local pods with their
//!   identities.
//! - `GET /v1/status`: an [`AgentStatus`] as JSON: readiness (datapath attached) and
//!   the reconcile record (states applied, errors, last outcome).
//! - `GET /v1/proxy/config`: the node proxy's configuration
//!   ([`ProxyConfig`](mesh_common::l7::ProxyConfig)) as NDJSON, chunked: the current
//!   snapshot as one line at once (or as soon as the first state is applied), then one
//!   line per change, until the client leaves or the agent stops ([`crate::proxyfeed`]).
//! - `GET /v1/routes`: the HTTPRoute statuses of the applied state as a JSON list of
//!   [`RouteStatus`](crate::plan::routes::RouteStatus).
//! - `POST /v1/proxy/flows`: the node proxy's refusals, added to the flow log
//!   ([`proxyflows`]).
//!
//! `client` is the other end, for `mesh-agent observe` and `mesh-agent policy`.

pub mod client;
mod proxyflows;

use std::{
    convert::Infallible,
    future::Future,
    io,
    os::unix::fs::{DirBuilderExt as _, FileTypeExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use hyper::{
    Method, Request, Response, StatusCode,
    body::{Body, Bytes, Frame, SizeHint},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::{
    net::UnixListener,
    sync::{broadcast, mpsc, watch},
};
use tracing::{debug, info, warn};

use crate::{
    flows::{FlowLog, SharedView},
    proxyfeed,
    report::{Flow, FlowFilter, Verdict},
    telemetry::{AgentStatus, Telemetry},
};

/// Default parent of the per-node socket directories.
pub const DEFAULT_RUN_DIR: &str = "/run/mesh";
/// File name of the socket inside `<run-dir>/<node>/`.
pub const SOCKET_NAME: &str = "agent.sock";

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for requests in flight (followers are ended at once).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept, so that running out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Lines buffered towards a following client before its forwarder waits.
const FOLLOW_BUFFER: usize = 64;

/// Errors of the admin endpoint.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// The socket's directory could not be made private.
    #[error("create {path} (mode 0700): {source}")]
    Dir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Another process serves this socket.
    #[error("{0}: another agent for this node is serving there; stop it first")]
    InUse(PathBuf),
    /// The socket could not be created.
    #[error("bind {path}: {source}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The listening socket broke.
    #[error("accept on {path}: {source}")]
    Accept {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// `<run_dir>/<node>/agent.sock`.
pub fn socket_path(run_dir: &Path, node: &str) -> PathBuf {
    run_dir.join(node).join(SOCKET_NAME)
}

/// A bound admin socket; the socket file is removed when this is dropped.
#[derive(Debug)]
pub struct AdminServer {
    listener: UnixListener,
    path: PathBuf,
}

/// Creates `<run_dir>/<node>/` (mode 0700) and listens on `agent.sock` in it. A socket
/// file left by an agent that died is replaced; one a live agent answers on is not.
///
/// # Errors
/// [`AdminError`] naming the path.
pub fn bind(run_dir: &Path, node: &str) -> Result<AdminServer, AdminError> {
    let path = socket_path(run_dir, node);
    let dir = run_dir.join(node);
    let dir_err = |source| AdminError::Dir {
        path: dir.clone(),
        source,
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&dir)
        .map_err(dir_err)?;
    // An existing directory keeps its mode through create(); tighten it.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(dir_err)?;
    if std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_socket()) {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            return Err(AdminError::InUse(path));
        }
        let _ = std::fs::remove_file(&path);
    }
    let listener = UnixListener::bind(&path).map_err(|source| AdminError::Bind {
        path: path.clone(),
        source,
    })?;
    Ok(AdminServer { listener, path })
}

impl Drop for AdminServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        // The node directory goes too when empty, so `--node` can be omitted on a host
        // with one running agent.
        if let Some(dir) = self.path.parent() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

impl AdminServer {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `shutdown` resolves; then ends follow streams, waits briefly for
    /// requests in flight and removes the socket.
    ///
    /// # Errors
    /// [`AdminError::Accept`] only when the listening socket breaks.
    pub async fn run(
        self,
        view: SharedView,
        log: Arc<FlowLog>,
        telemetry: Arc<Telemetry>,
        proxy: proxyfeed::Subscription,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), AdminError> {
        info!(component = "admin", path = %self.path.display(), "serving /v1/flows, /v1/policy, /v1/status and /v1/proxy/config");
        let graceful = GracefulShutdown::new();
        let (stop_followers, stopping) = watch::channel(false);
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let stream = tokio::select! {
                () = &mut shutdown => break,
                accepted = self.listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(err) if matches!(err.raw_os_error(), Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK)) => {
                        return Err(AdminError::Accept { path: self.path.clone(), source: err });
                    }
                    Err(err) => {
                        warn!(component = "admin", error = %err, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let (view, log, telemetry, proxy, stopping) = (
                view.clone(),
                log.clone(),
                telemetry.clone(),
                proxy.clone(),
                stopping.clone(),
            );
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request: Request<hyper::body::Incoming>| {
                        let status = telemetry.status();
                        let (view, log, proxy) = (view.clone(), log.clone(), proxy.clone());
                        let stopping = stopping.clone();
                        async move {
                            // The one endpoint with a body: the node proxy's refusals.
                            if request.method() == Method::POST
                                && request.uri().path() == mesh_common::l7::PROXY_FLOWS_PATH
                            {
                                return Ok(proxyflows::receive(request, &view, &log).await);
                            }
                            handle(request, view, log, proxy, status, stopping).await
                        }
                    }),
                );
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    debug!(component = "admin", error = %err, "connection failed");
                }
            });
        }
        // Followers would hold their connections forever: end their streams first.
        let _ = stop_followers.send(true);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(
                component = "admin",
                "connections still open after shutdown grace; dropped"
            );
        }
        Ok(())
    }
}

/// A response body: all at once, or lines as they come.
pub enum ApiBody {
    /// The whole body (taken when sent).
    Full(Option<Bytes>),
    /// Chunks until the sender goes away.
    Stream(mpsc::Receiver<Bytes>),
}

impl Body for ApiBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            ApiBody::Full(body) => Poll::Ready(body.take().map(|b| Ok(Frame::data(b)))),
            ApiBody::Stream(rx) => rx
                .poll_recv(cx)
                .map(|chunk| chunk.map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        matches!(self, ApiBody::Full(None))
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ApiBody::Full(body) => {
                SizeHint::with_exact(body.as_ref().map_or(0, |b| b.len() as u64))
            }
            ApiBody::Stream(_) => SizeHint::default(),
        }
    }
}

/// What `GET /v1/flows` asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowQuery {
    /// Keep streaming new flows.
    pub follow: bool,
    /// Which flows.
    pub filter: FlowFilter,
}

impl FlowQuery {
    /// Parses `follow=true&verdict=dropped&pod=ns%2Fname`.
    ///
    /// # Errors
    /// A message naming the parameter or value not understood.
    pub fn parse(query: &str) -> Result<Self, String> {
        let mut q = Self::default();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            let value = percent_decode(value);
            match key {
                "follow" => {
                    q.follow = match value.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => return Err(format!("follow={value}: use true or false")),
                    }
                }
                "verdict" => {
                    q.filter.verdict = Some(match value.to_ascii_lowercase().as_str() {
                        "dropped" => Verdict::Dropped,
                        "audit" => Verdict::Audit,
                        _ => return Err(format!("verdict={value}: use dropped or audit")),
                    })
                }
                "pod"
                    if value
                        .split_once('/')
                        .is_some_and(|(ns, n)| !ns.is_empty() && !n.is_empty()) =>
                {
                    q.filter.pod = Some(value);
                }
                "pod" => return Err(format!("pod={value}: use NAMESPACE/NAME")),
                _ => return Err(format!("unknown parameter {key:?} (follow, verdict, pod)")),
            }
        }
        Ok(q)
    }

    /// The query string that [`FlowQuery::parse`] reads back, valid in a request line
    /// whatever the pod name holds.
    pub fn to_query(&self) -> String {
        let mut parts = Vec::new();
        if self.follow {
            parts.push("follow=true".to_owned());
        }
        if let Some(v) = self.filter.verdict {
            parts.push(format!("verdict={}", v.as_str()));
        }
        if let Some(pod) = &self.filter.pod {
            parts.push(format!("pod={}", percent_encode(pod)));
        }
        parts.join("&")
    }
}

/// Every byte but the unreserved ones (RFC 3986) and `/` as `%XX`: a space, `+`, `#`
/// or a control character would otherwise change the value or break the request line.
fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        // Two hex digits exactly (from_str_radix alone would take a sign: "%+1").
        let hex = bytes
            .get(i + 1..i + 3)
            .filter(|h| h.iter().all(u8::is_ascii_hexdigit))
            .and_then(|h| std::str::from_utf8(h).ok());
        match (bytes[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(b)) => {
                out.push(b);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Answers one request (the body is never read: every endpoint is a GET). Follow
/// streams end when the client drops the body or `stopping` turns true.
pub async fn handle<B>(
    request: Request<B>,
    view: SharedView,
    log: Arc<FlowLog>,
    proxy: proxyfeed::Subscription,
    status: AgentStatus,
    stopping: watch::Receiver<bool>,
) -> Result<Response<ApiBody>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/v1/flows") => {
            match FlowQuery::parse(request.uri().query().unwrap_or_default()) {
                Ok(query) if query.follow => follow(&log, query.filter, stopping),
                Ok(query) => {
                    let body: String = log
                        .stored()
                        .iter()
                        .filter(|f| query.filter.matches(f))
                        .map(|f| ndjson(f))
                        .collect();
                    reply(StatusCode::OK, NDJSON, body)
                }
                Err(problem) => reply(StatusCode::BAD_REQUEST, PLAIN_TEXT, format!("{problem}\n")),
            }
        }
        (&Method::GET, "/v1/policy") => match serde_json::to_string_pretty(view.get().report()) {
            Ok(body) => reply(StatusCode::OK, JSON, body + "\n"),
            Err(err) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN_TEXT,
                format!("{err}\n"),
            ),
        },
        (&Method::GET, "/v1/routes") => match serde_json::to_string(view.get().routes()) {
            Ok(body) => reply(StatusCode::OK, JSON, body + "\n"),
            Err(err) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN_TEXT,
                format!("{err}\n"),
            ),
        },
        (&Method::GET, "/v1/status") => match serde_json::to_string(&status) {
            Ok(body) => reply(StatusCode::OK, JSON, body + "\n"),
            Err(err) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                PLAIN_TEXT,
                format!("{err}\n"),
            ),
        },
        (&Method::GET, "/v1/proxy/config") => follow_proxy_config(proxy, stopping),
        _ => reply(
            StatusCode::NOT_FOUND,
            PLAIN_TEXT,
            "not found (GET /v1/flows, GET /v1/policy, GET /v1/routes, GET /v1/status, GET /v1/proxy/config)\n"
                .to_owned(),
        ),
    };
    Ok(response)
}

/// The stored flows, then every new one, until the client leaves or the agent stops.
fn follow(
    log: &FlowLog,
    filter: FlowFilter,
    mut stopping: watch::Receiver<bool>,
) -> Response<ApiBody> {
    let (stored, mut new) = log.follow();
    let (tx, rx) = mpsc::channel(FOLLOW_BUFFER);
    tokio::spawn(async move {
        let backlog: String = stored
            .iter()
            .filter(|f| filter.matches(f))
            .map(|f| ndjson(f))
            .collect();
        if !backlog.is_empty() && tx.send(Bytes::from(backlog)).await.is_err() {
            return;
        }
        loop {
            let flow = tokio::select! {
                () = tx.closed() => return,
                _ = stopping.wait_for(|&stop| stop) => return,
                flow = new.recv() => flow,
            };
            match flow {
                Ok(flow) if filter.matches(&flow) => {
                    if tx.send(Bytes::from(ndjson(&flow))).await.is_err() {
                        return;
                    }
                }
                Ok(_) => {}
                Err(broadcast::error::RecvError::Lagged(skipped)) => {
                    warn!(
                        component = "admin",
                        skipped, "flow follower too slow; flows skipped"
                    );
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    });
    let mut response = Response::new(ApiBody::Stream(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(NDJSON),
    );
    response
}

/// The current proxy configuration, then each new one, until the client leaves or the
/// agent stops. The forwarder holds at most one line besides the latest snapshot (the
/// channel has room for one): a slow reader skips snapshots, it never queues them.
fn follow_proxy_config(
    mut proxy: proxyfeed::Subscription,
    mut stopping: watch::Receiver<bool>,
) -> Response<ApiBody> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        // The current value counts as new, so it is sent first.
        proxy.mark_changed();
        loop {
            tokio::select! {
                () = tx.closed() => return,
                _ = stopping.wait_for(|&stop| stop) => return,
                changed = proxy.changed() => if changed.is_err() { return },
            }
            let line = proxy.borrow_and_update().as_ref().map(|s| s.line.clone());
            if let Some(line) = line
                && tx.send(line).await.is_err()
            {
                return;
            }
        }
    });
    let mut response = Response::new(ApiBody::Stream(rx));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(NDJSON),
    );
    response
}

fn ndjson(flow: &Flow) -> String {
    // A Flow is plain strings and numbers: serializing it cannot fail.
    let mut line = serde_json::to_string(flow).unwrap_or_default();
    line.push('\n');
    line
}

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const NDJSON: &str = "application/x-ndjson";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<ApiBody> {
    let mut response = Response::new(ApiBody::Full(Some(Bytes::from(body))));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests;
