//! The proxy's Prometheus endpoint: Istio's standard request metrics, so that Istio
//! dashboards and Kiali read them unchanged, and the proxy's own `mesh_proxy_*` metrics
//! (retries, circuit breaking, ejections, configuration, connections).
//!
//! Unlike the agent, the proxy owns its counts: they live in one registry made at
//! start, and each scrape encodes it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicI64, AtomicU64};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode, header};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use prometheus_client::encoding::{EncodeLabelSet, prometheus_text};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// Istio's default buckets of `istio_request_duration_milliseconds`.
pub const DURATION_BUCKETS_MS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];
/// Istio's default buckets of `istio_request_bytes` and `istio_response_bytes`
/// (powers of ten from 1 B to 1 GB).
pub const BYTES_BUCKETS: [f64; 10] = [1.0, 10.0, 100.0, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9];

/// Istio's value for a label the proxy does not know.
const UNKNOWN: &str = "unknown";

/// The labels of one request, as Istio's standard metrics name them. Empty strings are
/// exported as `unknown`, as Istio does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct RequestLabels {
    /// `source`: this proxy reports for the client.
    pub reporter: &'static str,
    /// The client pod's workload.
    pub source_workload: String,
    /// The client pod's namespace.
    pub source_workload_namespace: String,
    /// The client's identity (`spiffe://...`), empty without mTLS.
    pub source_principal: String,
    /// The destination Service's host, `<name>.<namespace>.svc.cluster.local`.
    pub destination_service: String,
    /// The destination Service's name.
    pub destination_service_name: String,
    /// The destination Service's namespace.
    pub destination_service_namespace: String,
    /// The chosen endpoint's workload.
    pub destination_workload: String,
    /// The chosen endpoint's namespace.
    pub destination_workload_namespace: String,
    /// The server's identity, empty without mTLS.
    pub destination_principal: String,
    /// `http` or `grpc`.
    pub request_protocol: &'static str,
    /// The HTTP status returned to the client (0 when none was).
    pub response_code: u16,
    /// The gRPC status code (`grpc-status`), empty for HTTP.
    pub grpc_response_status: String,
    /// Envoy-style response flags (`UF`, `UO`, `URX`, ...), `-` or empty for none.
    pub response_flags: String,
    /// `none` (plaintext) or `mutual_tls`.
    pub connection_security_policy: &'static str,
}

/// Istio's full standard label set. The labels this proxy has no source for (app and
/// version labels, clusters) are `unknown`; the canonical service is the workload name
/// (the agent derives it as Istio derives canonical names: `app.kubernetes.io/name`,
/// else `app`), the canonical revision Istio's default, `latest`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IstioLabels {
    reporter: &'static str,
    source_workload: String,
    source_workload_namespace: String,
    source_principal: String,
    source_app: &'static str,
    source_version: &'static str,
    source_canonical_service: String,
    source_canonical_revision: &'static str,
    source_cluster: &'static str,
    destination_workload: String,
    destination_workload_namespace: String,
    destination_principal: String,
    destination_app: &'static str,
    destination_version: &'static str,
    destination_service: String,
    destination_service_name: String,
    destination_service_namespace: String,
    destination_canonical_service: String,
    destination_canonical_revision: &'static str,
    destination_cluster: &'static str,
    request_protocol: &'static str,
    response_code: u16,
    grpc_response_status: String,
    response_flags: String,
    connection_security_policy: &'static str,
}

impl From<&RequestLabels> for IstioLabels {
    fn from(l: &RequestLabels) -> Self {
        Self {
            reporter: or_unknown_static(l.reporter),
            source_workload: or_unknown(&l.source_workload),
            source_workload_namespace: or_unknown(&l.source_workload_namespace),
            source_principal: or_unknown(&l.source_principal),
            source_app: UNKNOWN,
            source_version: UNKNOWN,
            source_canonical_service: or_unknown(&l.source_workload),
            source_canonical_revision: "latest",
            source_cluster: UNKNOWN,
            destination_workload: or_unknown(&l.destination_workload),
            destination_workload_namespace: or_unknown(&l.destination_workload_namespace),
            destination_principal: or_unknown(&l.destination_principal),
            destination_app: UNKNOWN,
            destination_version: UNKNOWN,
            destination_service: or_unknown(&l.destination_service),
            destination_service_name: or_unknown(&l.destination_service_name),
            destination_service_namespace: or_unknown(&l.destination_service_namespace),
            destination_canonical_service: or_unknown(&l.destination_workload),
            destination_canonical_revision: "latest",
            destination_cluster: UNKNOWN,
            request_protocol: or_unknown_static(l.request_protocol),
            response_code: l.response_code,
            grpc_response_status: l.grpc_response_status.clone(),
            response_flags: if l.response_flags.is_empty() {
                "-".to_owned()
            } else {
                l.response_flags.clone()
            },
            connection_security_policy: or_unknown_static(l.connection_security_policy),
        }
    }
}

fn or_unknown(value: &str) -> String {
    if value.is_empty() { UNKNOWN } else { value }.to_owned()
}

fn or_unknown_static(value: &'static str) -> &'static str {
    if value.is_empty() { UNKNOWN } else { value }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RetryLabels {
    destination_service: String,
    outcome: &'static str,
}

/// The labels of one tunnelled TCP connection, with Istio's names.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TcpLabels {
    /// `source` (the client's node proxy) or `destination` (the server's).
    pub reporter: &'static str,
    /// The client pod's workload (`unknown` when the destination side cannot tell).
    pub source_workload: String,
    /// The client pod's namespace.
    pub source_workload_namespace: String,
    /// The client's SPIFFE identity.
    pub source_principal: String,
    /// The server pod's workload.
    pub destination_workload: String,
    /// The server pod's namespace.
    pub destination_workload_namespace: String,
    /// The server's SPIFFE identity.
    pub destination_principal: String,
    /// The Service the client dialled, when it dialled one.
    pub destination_service: String,
    /// `mutual_tls` through a tunnel, `none` otherwise.
    pub connection_security_policy: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabels {
    destination_service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    destination_service: String,
    endpoint: String,
}

type HistogramFamily = Family<IstioLabels, Histogram, fn() -> Histogram>;

/// One label set's series in the four request families: looked up once per label set,
/// then shared (the handles point at the families' own counts).
#[derive(Clone, Debug)]
struct RequestSeries {
    requests: Counter,
    duration: Histogram,
    request_bytes: Histogram,
    response_bytes: Histogram,
}

/// The series of the label sets seen so far, by the proxy's own (short) labels with a
/// fast hash: spares each request building Istio's 25 labels and hashing them into
/// four families.
type SeriesCache = RwLock<HashMap<RequestLabels, RequestSeries, foldhash::fast::RandomState>>;

/// The proxy's metrics, shared by every connection.
#[derive(Debug)]
pub struct ProxyMetrics {
    registry: Registry,
    requests: Family<IstioLabels, Counter>,
    duration: HistogramFamily,
    request_bytes: HistogramFamily,
    response_bytes: HistogramFamily,
    series: SeriesCache,
    retries: Family<RetryLabels, Counter>,
    overflows: Family<ServiceLabels, Counter>,
    ejections: Family<EndpointLabels, Counter>,
    config_version: Gauge<u64, AtomicU64>,
    connections: Gauge<i64, AtomicI64>,
    tcp_opened: Family<TcpLabels, Counter>,
    tcp_closed: Family<TcpLabels, Counter>,
    tcp_sent: Family<TcpLabels, Counter>,
    tcp_received: Family<TcpLabels, Counter>,
    hbone_refusals: Family<ReasonLabels, Counter>,
    plaintext_refusals: Family<ReasonLabels, Counter>,
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ProxyMetrics {
    /// Every metric at zero (labelled ones without series yet).
    pub fn new() -> Self {
        let requests = Family::<IstioLabels, Counter>::default();
        let duration: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(DURATION_BUCKETS_MS));
        let request_bytes: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS));
        let response_bytes: HistogramFamily =
            Family::new_with_constructor(|| Histogram::new(BYTES_BUCKETS));
        let retries = Family::<RetryLabels, Counter>::default();
        let overflows = Family::<ServiceLabels, Counter>::default();
        let ejections = Family::<EndpointLabels, Counter>::default();
        let config_version = Gauge::<u64, AtomicU64>::default();
        let connections = Gauge::<i64, AtomicI64>::default();
        let tcp_opened = Family::<TcpLabels, Counter>::default();
        let tcp_closed = Family::<TcpLabels, Counter>::default();
        let tcp_sent = Family::<TcpLabels, Counter>::default();
        let tcp_received = Family::<TcpLabels, Counter>::default();
        let hbone_refusals = Family::<ReasonLabels, Counter>::default();
        let plaintext_refusals = Family::<ReasonLabels, Counter>::default();

        // Counter names are registered without `_total`: the encoder appends it.
        let mut registry = Registry::default();
        registry.register(
            "istio_requests",
            "Requests handled by the proxy (Istio standard metric)",
            requests.clone(),
        );
        registry.register(
            "istio_request_duration_milliseconds",
            "Request duration in milliseconds, from the request's arrival to the end of \
             the response (Istio standard metric)",
            duration.clone(),
        );
        registry.register(
            "istio_request_bytes",
            "Request body size in bytes (Istio standard metric)",
            request_bytes.clone(),
        );
        registry.register(
            "istio_response_bytes",
            "Response body size in bytes (Istio standard metric)",
            response_bytes.clone(),
        );
        registry.register(
            "mesh_proxy_retries",
            "Retries the proxy wanted to make, by whether the Service's retry budget \
             allowed them (allowed) or not (budget_exhausted)",
            retries.clone(),
        );
        registry.register(
            "mesh_proxy_overflows",
            "Requests the circuit breaker rejected (connection or pending-request limit \
             of the Service reached)",
            overflows.clone(),
        );
        registry.register(
            "mesh_proxy_ejections",
            "Outlier ejections of a Service endpoint (consecutive 5xx or connect failures)",
            ejections.clone(),
        );
        registry.register(
            "mesh_proxy_config_version",
            "Version of the configuration snapshot in force (0: none received yet)",
            config_version.clone(),
        );
        registry.register(
            "mesh_proxy_active_connections",
            "Client connections the proxy is serving",
            connections.clone(),
        );
        registry.register(
            "istio_tcp_connections_opened",
            "TCP connections opened (Istio standard metric)",
            tcp_opened.clone(),
        );
        registry.register(
            "istio_tcp_connections_closed",
            "TCP connections closed (Istio standard metric)",
            tcp_closed.clone(),
        );
        registry.register(
            "istio_tcp_sent_bytes",
            "Bytes sent to the client during TCP connections (Istio standard metric)",
            tcp_sent.clone(),
        );
        registry.register(
            "istio_tcp_received_bytes",
            "Bytes received from the client during TCP connections (Istio standard metric)",
            tcp_received.clone(),
        );
        registry.register(
            "mesh_proxy_hbone_refusals",
            "HBONE tunnels and streams refused, by reason (handshake, handshake_timeout, \
             no_identity, not_connect, bad_target, not_hosted, network_policy, \
             authorization, app_unreachable)",
            hbone_refusals.clone(),
        );
        registry.register(
            "mesh_proxy_plaintext_refusals",
            "Plaintext connections to enrolled pods (captured inbound) refused, by reason \
             (mtls_strict, not_hosted, network_policy, authorization, app_unreachable)",
            plaintext_refusals.clone(),
        );
        Self {
            plaintext_refusals,
            tcp_opened,
            tcp_closed,
            tcp_sent,
            tcp_received,
            hbone_refusals,
            registry,
            requests,
            duration,
            request_bytes,
            response_bytes,
            series: RwLock::default(),
            retries,
            overflows,
            ejections,
            config_version,
            connections,
        }
    }

    /// Counts one finished request: its duration (arrival to end of response) and body
    /// sizes.
    pub fn record_request(
        &self,
        labels: &RequestLabels,
        duration: Duration,
        request_bytes: u64,
        response_bytes: u64,
    ) {
        let series = self.series(labels);
        series.requests.inc();
        series.duration.observe(duration.as_secs_f64() * 1000.0);
        series.request_bytes.observe(request_bytes as f64);
        series.response_bytes.observe(response_bytes as f64);
    }

    /// The series of `labels`, made in the families on first use.
    fn series(&self, labels: &RequestLabels) -> RequestSeries {
        let cached = self.series.read().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = cached.get(labels) {
            return s.clone();
        }
        drop(cached);
        let istio = IstioLabels::from(labels);
        let series = RequestSeries {
            requests: self.requests.get_or_create(&istio).clone(),
            duration: self.duration.get_or_create(&istio).clone(),
            request_bytes: self.request_bytes.get_or_create(&istio).clone(),
            response_bytes: self.response_bytes.get_or_create(&istio).clone(),
        };
        self.series
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(labels.clone(), series.clone());
        series
    }

    /// Counts a retry the proxy wanted to make to `destination_service`.
    pub fn record_retry(&self, destination_service: &str, budget_exhausted: bool) {
        self.retries
            .get_or_create(&RetryLabels {
                destination_service: destination_service.to_owned(),
                outcome: if budget_exhausted {
                    "budget_exhausted"
                } else {
                    "allowed"
                },
            })
            .inc();
    }

    /// Counts a request the circuit breaker rejected.
    pub fn record_overflow(&self, destination_service: &str) {
        self.overflows
            .get_or_create(&ServiceLabels {
                destination_service: destination_service.to_owned(),
            })
            .inc();
    }

    /// Counts an outlier ejection of `endpoint` (`addr:port`).
    pub fn record_ejection(&self, destination_service: &str, endpoint: &str) {
        self.ejections
            .get_or_create(&EndpointLabels {
                destination_service: destination_service.to_owned(),
                endpoint: endpoint.to_owned(),
            })
            .inc();
    }

    /// The configuration version in force.
    pub fn set_config_version(&self, version: u64) {
        self.config_version.set(version);
    }

    /// The number of client connections being served.
    pub fn set_connections(&self, active: i64) {
        self.connections.set(active);
    }

    /// Counts a TCP connection the proxy opened for `labels`.
    pub fn record_tcp_open(&self, labels: &TcpLabels) {
        self.tcp_opened.get_or_create(labels).inc();
    }

    /// Counts a TCP connection's end and the bytes it carried each way.
    pub fn record_tcp_close(&self, labels: &TcpLabels, sent: u64, received: u64) {
        self.tcp_closed.get_or_create(labels).inc();
        self.tcp_sent.get_or_create(labels).inc_by(sent);
        self.tcp_received.get_or_create(labels).inc_by(received);
    }

    /// Counts an HBONE tunnel or stream refused for `reason`.
    pub fn record_hbone_refusal(&self, reason: &'static str) {
        self.hbone_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Counts a captured plaintext connection refused, by reason.
    pub fn record_plaintext_refusal(&self, reason: &'static str) {
        self.plaintext_refusals
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn encode(&self) -> String {
        let mut text = String::new();
        prometheus_text::encode(&mut text, &self.registry)
            .expect("writing to a String cannot fail");
        text
    }
}

/// How long a client may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for scrapes in flight before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept, so that running out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Serves `GET /metrics` and `GET /healthz` (200 `ok`) on `listener` until `shutdown`
/// resolves, then waits briefly for scrapes in flight; anything else is 404.
///
/// # Errors
/// Only when the listening socket itself breaks; failures of single connections and
/// passing accept errors (such as running out of file descriptors) are logged.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<ProxyMetrics>,
    shutdown: impl Future<Output = ()>,
) -> io::Result<()> {
    let addr = listener.local_addr()?;
    info!(component = "metrics", %addr, "serving /metrics and /healthz");
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) if listener_broken(&err) => return Err(err),
                Err(err) => {
                    warn!(component = "metrics", %addr, error = %err, "accept failed; retrying");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            },
        };
        let metrics = Arc::clone(&metrics);
        let connection = http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(HEADER_READ_TIMEOUT)
            .serve_connection(
                TokioIo::new(stream),
                service_fn(move |request| handle(request, Arc::clone(&metrics))),
            );
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                debug!(component = "metrics", %peer, error = %err, "connection failed");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(component = "metrics", %addr, "connections still open after shutdown grace; dropped");
    }
    Ok(())
}

/// Accept errors that mean the listening socket is unusable, so retrying cannot help.
fn listener_broken(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT)
    )
}

async fn handle(
    request: Request<Incoming>,
    metrics: Arc<ProxyMetrics>,
) -> Result<Response<String>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            prometheus_text::CONTENT_TYPE,
            metrics.encode(),
        ),
        (&Method::GET, "/healthz") => reply(StatusCode::OK, PLAIN_TEXT, "ok".to_owned()),
        _ => reply(StatusCode::NOT_FOUND, PLAIN_TEXT, "not found\n".to_owned()),
    };
    Ok(response)
}

const PLAIN_TEXT: &str = "text/plain; charset=utf-8";

fn reply(status: StatusCode, content_type: &'static str, body: String) -> Response<String> {
    let mut response = Response::new(body);
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

#[cfg(test)]
mod tests;
