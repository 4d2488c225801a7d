//! The agent's Prometheus endpoint: `GET /metrics` (text exposition 0.0.4) and
//! `GET /healthz`.
//!
//! The agent keeps no metric state of its own. The kernel already counts translated and
//! refused connections, and policy verdicts, in per-CPU maps, so every scrape asks a [`SnapshotSource`] for a
//! fresh [`Snapshot`] and [`render`]s it through a registry built for that scrape alone.
//! Counters therefore carry the kernel's cumulative values, and a service or map that left
//! the datapath leaves the exposition with it instead of lingering as a stale series.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
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
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, error, info, warn};

use crate::telemetry::AgentStatus;

/// Everything a scrape reports, read from the kernel maps when scraped.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    /// One entry per service frontend.
    pub services: Vec<ServiceCounters>,
    /// Program name and whether it is attached.
    pub programs_attached: Vec<(String, bool)>,
    /// Fill level of each datapath map.
    pub maps: Vec<MapFill>,
    /// Cumulative count of rejected cluster states plus failed datapath applies.
    pub reconcile_errors: u64,
    /// Whether the most recent reconcile validated and applied its state.
    pub last_reconcile_ok: bool,
    /// Policy verdicts the kernel counted (denials and audits).
    pub policy_verdicts: Vec<VerdictCount>,
    /// Same-node socket redirection.
    pub sockmap: SockmapCounters,
    /// The running agent's status (its state source, the planner's cost); `None` when
    /// the snapshot is read from pins alone.
    pub agent: Option<AgentStatus>,
}

/// Same-node socket redirection (sockmap), as the kernel counted it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SockmapCounters {
    /// Whether sock_ops is attached (the agent runs with `--sockmap=true`).
    pub enabled: bool,
    /// Established same-node sockets currently in the SOCKS map.
    pub sockets: u64,
    /// Messages handed socket to socket.
    pub redirected_messages: u64,
    /// Bytes of those messages.
    pub redirected_bytes: u64,
    /// Messages of same-node sockets that went through the TCP/IP stack instead.
    pub stack_messages: u64,
}

/// A kernel count of policy verdicts.
#[derive(Debug, Clone)]
pub struct VerdictCount {
    /// One of [`DIRECTIONS`].
    pub direction: &'static str,
    /// One of [`VERDICTS`], or `forwarded`.
    pub verdict: &'static str,
    /// Why, e.g. `policy-denied`.
    pub reason: &'static str,
    /// Flows so judged since the datapath was created.
    pub count: u64,
}

/// Directions `mesh_policy_verdicts_total` always reports.
pub const DIRECTIONS: [&str; 2] = ["egress", "ingress"];
/// Verdicts `mesh_policy_verdicts_total` always reports, zero or not, so that a rate
/// over a series that has not counted yet is 0 rather than absent.
pub const VERDICTS: [&str; 2] = ["dropped", "audit"];

/// Kernel counters of one service frontend.
#[derive(Debug, Clone)]
pub struct ServiceCounters {
    /// The Service, as `namespace/name`.
    pub service: String,
    /// The frontend, as `10.96.0.10:80/TCP` or `[fd00::a]:80/TCP`.
    pub frontend: String,
    /// Connections refused because the frontend had no usable backend.
    pub refused: u64,
    /// The frontend's backends with their connection counts.
    pub backends: Vec<BackendCounter>,
}

/// Kernel counter of one backend of a frontend.
#[derive(Debug, Clone)]
pub struct BackendCounter {
    /// The backend, as `10.244.1.11:8080` or `[fd00::b]:8080`.
    pub backend: String,
    /// One of [`BACKEND_STATES`].
    pub state: &'static str,
    /// Connections translated to this backend since its counter was created.
    pub connections: u64,
}

/// Fill level of one datapath map.
#[derive(Debug, Clone)]
pub struct MapFill {
    /// The map's pinned name.
    pub name: String,
    /// Entries currently in the map.
    pub entries: u64,
    /// The map's `max_entries`.
    pub capacity: u64,
    /// Memory the kernel charges for the map, in bytes.
    pub memory_bytes: u64,
}

/// Reads the datapath when a scrape arrives.
///
/// Called on a blocking thread (see [`MetricsServer::run`]), so an implementation may do
/// map syscalls directly.
pub trait SnapshotSource: Send + Sync + 'static {
    /// The current values; called once per scrape.
    fn snapshot(&self) -> Snapshot;
}

/// Backend states `mesh_lb_backends` always reports, zero or not, so that an alert such
/// as `mesh_lb_backends{state="active"} == 0` finds a series to fire on.
pub const BACKEND_STATES: [&str; 3] = ["active", "terminating", "unhealthy"];

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be set up.
    #[error("bind {addr}: {source}{}", bind_hint(source))]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// The listening socket itself is broken; other accept failures are retried.
    #[error("accept on {addr}: {source}")]
    Accept {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
}

fn bind_hint(err: &io::Error) -> &'static str {
    match err.kind() {
        io::ErrorKind::AddrInUse => " (another process, perhaps a second agent, listens there)",
        io::ErrorKind::AddrNotAvailable => " (no interface of this host has that address)",
        io::ErrorKind::PermissionDenied => " (ports below 1024 need CAP_NET_BIND_SERVICE)",
        _ => "",
    }
}

/// How long a client may take to send its request headers: a scraper sends them at once,
/// so a slower client is stuck or hostile and should not hold a task.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// How long shutdown waits for scrapes in flight before dropping them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Pause after a failed accept, so that running out of file descriptors does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A bound, not yet serving, metrics endpoint.
///
/// Binding is separate from serving so that the agent fails at startup on a taken
/// address, and so that tests can bind port 0 and learn the port.
#[derive(Debug)]
pub struct MetricsServer {
    listener: TcpListener,
    addr: SocketAddr,
}

/// Binds the metrics endpoint to `addr` (port 0 picks a free port).
///
/// # Errors
/// [`MetricsError::Bind`] when the address is taken, not local, or needs a privilege.
pub async fn bind(addr: SocketAddr) -> Result<MetricsServer, MetricsError> {
    let bind_err = |source| MetricsError::Bind { addr, source };
    let listener = TcpListener::bind(addr).await.map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok(MetricsServer { listener, addr })
}

impl MetricsServer {
    /// The address actually bound, with the port the kernel chose for port 0.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Serves scrapes until `shutdown` resolves, then waits briefly for scrapes in flight.
    ///
    /// # Errors
    /// [`MetricsError::Accept`] only when the listening socket itself breaks; failures of
    /// single connections and transient accept errors (such as running out of file
    /// descriptors) are logged and serving goes on.
    pub async fn run(
        self,
        source: Arc<dyn SnapshotSource>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), MetricsError> {
        let Self { listener, addr } = self;
        info!(component = "metrics", %addr, "serving /metrics and /healthz");
        let graceful = GracefulShutdown::new();
        let mut shutdown = std::pin::pin!(shutdown);
        loop {
            let (stream, peer) = tokio::select! {
                () = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(source) if listener_broken(&source) => {
                        return Err(MetricsError::Accept { addr, source });
                    }
                    Err(err) => {
                        warn!(component = "metrics", %addr, error = %err, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                },
            };
            let source = Arc::clone(&source);
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT)
                .serve_connection(
                    TokioIo::new(stream),
                    service_fn(move |request| handle(request, Arc::clone(&source))),
                );
            let connection = graceful.watch(connection);
            tokio::spawn(async move {
                if let Err(err) = connection.await {
                    debug!(component = "metrics", %peer, error = %err, "connection failed");
                }
            });
        }
        // Stop accepting first, then let scrapes in flight finish (idle keep-alive
        // connections close at once); bounded, so a stuck client cannot delay agent exit.
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            warn!(component = "metrics", %addr, "connections still open after shutdown grace; dropped");
        }
        Ok(())
    }
}

/// Accept errors that mean the listening socket is unusable, so retrying cannot help.
/// Everything else (a peer that reset before we took it, EMFILE, ENOBUFS, ...) concerns
/// one connection or a passing shortage.
fn listener_broken(err: &io::Error) -> bool {
    matches!(
        err.raw_os_error(),
        Some(libc::EBADF | libc::EINVAL | libc::ENOTSOCK | libc::EFAULT)
    )
}

async fn handle(
    request: Request<Incoming>,
    source: Arc<dyn SnapshotSource>,
) -> Result<Response<String>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => {
            // Reading the maps is a series of syscalls (per-CPU maps: one value per CPU),
            // which must not stall the runtime that also runs the reconcile loop.
            match tokio::task::spawn_blocking(move || render(&source.snapshot())).await {
                Ok(body) => reply(StatusCode::OK, prometheus_text::CONTENT_TYPE, body),
                Err(err) => {
                    error!(component = "metrics", error = %err, "reading the datapath snapshot failed");
                    reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        PLAIN_TEXT,
                        "reading the datapath failed; see the agent log\n".to_owned(),
                    )
                }
            }
        }
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

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectionLabels {
    service: String,
    frontend: String,
    backend: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FrontendLabels {
    service: String,
    frontend: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendStateLabels {
    service: String,
    frontend: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ProgramLabels {
    program: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VerdictLabels {
    direction: &'static str,
    verdict: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DropLabels {
    direction: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabels {
    map: String,
}

/// Kernel values are unsigned 64-bit; a u64 gauge exports them without conversion.
type U64Gauge = Gauge<u64, AtomicU64>;

/// Encodes `snapshot` in the Prometheus text exposition format (version 0.0.4).
///
/// Counter names are registered without `_total`: the encoder appends it (and the full
/// stop at the end of each HELP text).
#[must_use]
pub fn render(snapshot: &Snapshot) -> String {
    let mut registry = Registry::default();
    register_lb(&mut registry, &snapshot.services);
    register_datapath(&mut registry, snapshot);
    register_reconcile(&mut registry, snapshot);
    register_policy(&mut registry, &snapshot.policy_verdicts);
    register_sockmap(&mut registry, &snapshot.sockmap);
    if let Some(agent) = &snapshot.agent {
        register_agent(&mut registry, agent);
    }
    let mut text = String::new();
    prometheus_text::encode(&mut text, &registry).expect("writing to a String cannot fail");
    text
}

fn register_lb(registry: &mut Registry, services: &[ServiceCounters]) {
    let connections = Family::<ConnectionLabels, Counter>::default();
    let refused = Family::<FrontendLabels, Counter>::default();
    let backends = Family::<BackendStateLabels, U64Gauge>::default();
    for svc in services {
        let frontend = FrontendLabels {
            service: svc.service.clone(),
            frontend: svc.frontend.clone(),
        };
        // get_or_create + inc_by sums duplicates, so a snapshot listing a frontend or
        // backend twice still yields one series instead of an invalid exposition.
        refused.get_or_create(&frontend).inc_by(svc.refused);
        let by_state = |state| BackendStateLabels {
            service: svc.service.clone(),
            frontend: svc.frontend.clone(),
            state,
        };
        for state in BACKEND_STATES {
            // Adds the series at 0; not set(0), which would wipe a duplicate's count.
            backends.get_or_create(&by_state(state)).inc_by(0);
        }
        for backend in &svc.backends {
            backends.get_or_create(&by_state(backend.state)).inc();
            connections
                .get_or_create(&ConnectionLabels {
                    service: svc.service.clone(),
                    frontend: svc.frontend.clone(),
                    backend: backend.backend.clone(),
                    state: backend.state,
                })
                .inc_by(backend.connections);
        }
    }
    registry.register(
        "mesh_lb_connections",
        "Connections the kernel translated from a service frontend to this backend, \
         cumulative since the datapath counter was created",
        connections,
    );
    registry.register(
        "mesh_lb_refused",
        "Connections to a service frontend refused with ECONNREFUSED because it had no \
         usable backend",
        refused,
    );
    registry.register(
        "mesh_lb_backends",
        "Backends of a service frontend by state: active backends take new connections, \
         terminating ones keep existing connections only, unhealthy ones get none",
        backends,
    );
}

fn register_datapath(registry: &mut Registry, snapshot: &Snapshot) {
    let attached = Family::<ProgramLabels, U64Gauge>::default();
    for (program, is_attached) in &snapshot.programs_attached {
        attached
            .get_or_create(&ProgramLabels {
                program: program.clone(),
            })
            .set(u64::from(*is_attached));
    }
    registry.register(
        "mesh_datapath_program_attached",
        "Whether a datapath eBPF program is attached (1) or not (0)",
        attached,
    );

    let entries = Family::<MapLabels, U64Gauge>::default();
    let capacity = Family::<MapLabels, U64Gauge>::default();
    let memory = Family::<MapLabels, U64Gauge>::default();
    for map in &snapshot.maps {
        let labels = MapLabels {
            map: map.name.clone(),
        };
        entries.get_or_create(&labels).set(map.entries);
        capacity.get_or_create(&labels).set(map.capacity);
        memory.get_or_create(&labels).set(map.memory_bytes);
    }
    registry.register(
        "mesh_datapath_map_entries",
        "Entries currently in a datapath eBPF map; compare with \
         mesh_datapath_map_capacity, a full map makes updates fail",
        entries,
    );
    registry.register(
        "mesh_datapath_map_capacity",
        "Maximum number of entries of a datapath eBPF map (max_entries)",
        capacity,
    );
    registry.register(
        "mesh_datapath_map_memory_bytes",
        "Memory the kernel charges for a datapath eBPF map, in bytes",
        memory,
    );
}

fn register_reconcile(registry: &mut Registry, snapshot: &Snapshot) {
    let errors = Counter::<u64>::default();
    errors.inc_by(snapshot.reconcile_errors);
    registry.register(
        "mesh_reconcile_errors",
        "Cluster states rejected by validation plus datapath applies that failed, \
         since the agent started",
        errors,
    );
    let last_ok = U64Gauge::default();
    last_ok.set(u64::from(snapshot.last_reconcile_ok));
    registry.register(
        "mesh_reconcile_last_success",
        "Whether the last reconcile (validate the cluster state, apply it to the \
         datapath) succeeded (1) or not (0)",
        last_ok,
    );
}

fn register_agent(registry: &mut Registry, agent: &AgentStatus) {
    let source = &agent.source;
    let gauge = |value: u64| {
        let g = U64Gauge::default();
        g.set(value);
        g
    };
    let info = Family::<SourceLabels, U64Gauge>::default();
    info.get_or_create(&SourceLabels {
        source: source.kind.as_str(),
    })
    .set(1);
    registry.register(
        "mesh_agent_source_info",
        "The cluster state source the agent reads (files, etcd, kubernetes)",
        info,
    );
    registry.register(
        "mesh_agent_source_stale",
        "Whether the cluster state source is unreachable (1): the last good state stays \
         in force",
        gauge(u64::from(source.stale)),
    );
    registry.register(
        "mesh_agent_source_stale_since_seconds",
        "Since when the source is stale (Unix time), 0 while it is not",
        gauge(source.stale_since.unwrap_or(0)),
    );
    registry.register(
        "mesh_agent_source_revision",
        "Newest revision the source delivered (etcd revision; a count of states delivered \
         for files and Kubernetes)",
        gauge(source.revision),
    );
    registry.register(
        "mesh_agent_source_applied_revision",
        "Newest source revision the datapath applied",
        gauge(source.applied_revision),
    );
    registry.register(
        "mesh_agent_source_rejected_objects",
        "Objects of the source rejected by validation and left out (their last good \
         version stays)",
        gauge(source.rejected_objects),
    );
    let seconds = |micros: u64| {
        let g = Gauge::<f64, AtomicU64>::default();
        g.set(micros as f64 / 1e6);
        g
    };
    registry.register(
        "mesh_agent_plan_seconds",
        "How long the last plan took: the whole state to the desired map contents, per change",
        seconds(agent.last_plan_us),
    );
    registry.register(
        "mesh_agent_apply_seconds",
        "How long writing the last plan's changes to the maps took",
        seconds(agent.last_apply_us),
    );
    registry.register(
        "mesh_agent_plan_services",
        "Services the last plan re-planned: all for the first state, then those the change touched",
        gauge(agent.last_plan_services),
    );
    registry.register(
        "mesh_agent_map_writes",
        "Map entries the last plan wrote or removed",
        gauge(agent.last_map_writes),
    );
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabels {
    source: &'static str,
}

fn register_policy(registry: &mut Registry, counts: &[VerdictCount]) {
    let verdicts = Family::<VerdictLabels, Counter>::default();
    let drops = Family::<DropLabels, Counter>::default();
    for direction in DIRECTIONS {
        for verdict in VERDICTS {
            verdicts
                .get_or_create(&VerdictLabels { direction, verdict })
                .inc_by(0);
        }
    }
    for c in counts {
        verdicts
            .get_or_create(&VerdictLabels {
                direction: c.direction,
                verdict: c.verdict,
            })
            .inc_by(c.count);
        if c.verdict == "dropped" {
            drops
                .get_or_create(&DropLabels {
                    direction: c.direction,
                    reason: c.reason,
                })
                .inc_by(c.count);
        }
    }
    registry.register(
        "mesh_policy_verdicts",
        "Flows network policy denied (dropped) or would have denied (audit, let through), \
         by direction, as counted by the kernel since the datapath was created",
        verdicts,
    );
    registry.register(
        "mesh_drops",
        "Flows the datapath dropped (ingress) or refused with EPERM (egress), by reason",
        drops,
    );
}

fn register_sockmap(registry: &mut Registry, s: &SockmapCounters) {
    let gauge = |v: u64| {
        let g = U64Gauge::default();
        g.set(v);
        g
    };
    let counter = |v: u64| {
        let c = Counter::<u64>::default();
        c.inc_by(v);
        c
    };
    registry.register(
        "mesh_sockmap_enabled",
        "Whether same-node socket redirection is on (1: sock_ops attached) or off (0)",
        gauge(u64::from(s.enabled)),
    );
    registry.register(
        "mesh_sockmap_sockets",
        "Established TCP sockets with both ends on this node, currently in the sockmap",
        gauge(s.sockets),
    );
    registry.register(
        "mesh_sockmap_redirected_messages",
        "Messages (sendmsg calls) handed straight to the peer socket, bypassing the \
         TCP/IP stack, since the datapath was created",
        counter(s.redirected_messages),
    );
    registry.register(
        "mesh_sockmap_redirected_bytes",
        "Bytes handed straight to the peer socket, since the datapath was created",
        counter(s.redirected_bytes),
    );
    registry.register(
        "mesh_sockmap_stack_messages",
        "Messages of same-node sockets sent through the TCP/IP stack because their \
         direction's first message went out before the peer socket was in the sockmap",
        counter(s.stack_messages),
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    fn sample() -> Snapshot {
        Snapshot {
            services: vec![
                ServiceCounters {
                    service: "default/web".into(),
                    frontend: "10.96.0.10:80/TCP".into(),
                    refused: 3,
                    backends: vec![
                        BackendCounter {
                            backend: "10.244.1.11:8080".into(),
                            state: "active",
                            connections: 42,
                        },
                        BackendCounter {
                            backend: "10.244.1.12:8080".into(),
                            state: "terminating",
                            connections: 7,
                        },
                        BackendCounter {
                            backend: "10.244.1.13:8080".into(),
                            state: "active",
                            connections: 0,
                        },
                    ],
                },
                ServiceCounters {
                    service: "default/web".into(),
                    frontend: "[fd00::a]:80/TCP".into(),
                    refused: 0,
                    backends: vec![],
                },
            ],
            programs_attached: vec![
                ("mesh_connect4".into(), true),
                ("mesh_connect6".into(), false),
            ],
            maps: vec![MapFill {
                name: "MESH_SERVICES".into(),
                entries: 2,
                capacity: 65536,
                memory_bytes: 1_234_567,
            }],
            reconcile_errors: 5,
            last_reconcile_ok: true,
            policy_verdicts: vec![
                VerdictCount {
                    direction: "egress",
                    verdict: "dropped",
                    reason: "policy-denied",
                    count: 4,
                },
                VerdictCount {
                    direction: "ingress",
                    verdict: "audit",
                    reason: "policy-denied",
                    count: 2,
                },
            ],
            sockmap: SockmapCounters {
                enabled: true,
                sockets: 4,
                redirected_messages: 10,
                redirected_bytes: 65_536,
                stack_messages: 1,
            },
            agent: None,
        }
    }

    fn lines(text: &str) -> HashSet<&str> {
        text.lines().collect()
    }

    #[test]
    fn renders_each_series_with_its_value() {
        let text = render(&sample());
        let got = lines(&text);
        for want in [
            r#"mesh_lb_connections_total{service="default/web",frontend="10.96.0.10:80/TCP",backend="10.244.1.11:8080",state="active"} 42"#,
            r#"mesh_lb_connections_total{service="default/web",frontend="10.96.0.10:80/TCP",backend="10.244.1.12:8080",state="terminating"} 7"#,
            r#"mesh_lb_connections_total{service="default/web",frontend="10.96.0.10:80/TCP",backend="10.244.1.13:8080",state="active"} 0"#,
            r#"mesh_lb_refused_total{service="default/web",frontend="10.96.0.10:80/TCP"} 3"#,
            r#"mesh_lb_refused_total{service="default/web",frontend="[fd00::a]:80/TCP"} 0"#,
            r#"mesh_lb_backends{service="default/web",frontend="10.96.0.10:80/TCP",state="active"} 2"#,
            r#"mesh_lb_backends{service="default/web",frontend="10.96.0.10:80/TCP",state="terminating"} 1"#,
            r#"mesh_lb_backends{service="default/web",frontend="10.96.0.10:80/TCP",state="unhealthy"} 0"#,
            r#"mesh_lb_backends{service="default/web",frontend="[fd00::a]:80/TCP",state="active"} 0"#,
            r#"mesh_datapath_program_attached{program="mesh_connect4"} 1"#,
            r#"mesh_datapath_program_attached{program="mesh_connect6"} 0"#,
            r#"mesh_datapath_map_entries{map="MESH_SERVICES"} 2"#,
            r#"mesh_datapath_map_capacity{map="MESH_SERVICES"} 65536"#,
            r#"mesh_datapath_map_memory_bytes{map="MESH_SERVICES"} 1234567"#,
            "mesh_reconcile_errors_total 5",
            "mesh_reconcile_last_success 1",
            r#"mesh_policy_verdicts_total{direction="egress",verdict="dropped"} 4"#,
            r#"mesh_policy_verdicts_total{direction="ingress",verdict="audit"} 2"#,
            r#"mesh_policy_verdicts_total{direction="ingress",verdict="dropped"} 0"#,
            r#"mesh_drops_total{direction="egress",reason="policy-denied"} 4"#,
            "mesh_sockmap_enabled 1",
            "mesh_sockmap_sockets 4",
            "mesh_sockmap_redirected_messages_total 10",
            "mesh_sockmap_redirected_bytes_total 65536",
            "mesh_sockmap_stack_messages_total 1",
            "# TYPE mesh_sockmap_redirected_bytes_total counter",
            "# TYPE mesh_policy_verdicts_total counter",
            "# TYPE mesh_drops_total counter",
            "# TYPE mesh_lb_connections_total counter",
            "# TYPE mesh_lb_refused_total counter",
            "# TYPE mesh_lb_backends gauge",
            "# TYPE mesh_reconcile_errors_total counter",
            "# TYPE mesh_datapath_map_memory_bytes gauge",
        ] {
            assert!(got.contains(want), "missing line {want:?} in:\n{text}");
        }
        assert!(!text.contains("_total_total"), "{text}");
    }

    #[test]
    fn every_family_is_described_exactly_once() {
        let text = render(&sample());
        let mut help = HashSet::new();
        let mut kind = HashSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(help.insert(name), "duplicate HELP for {name}");
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap_or_default();
                assert!(kind.insert(name), "duplicate TYPE for {name}");
            } else {
                // Every sample belongs to a family described above it.
                let name = line.split(['{', ' ']).next().unwrap_or_default();
                assert!(kind.contains(name), "sample {line:?} before its TYPE");
            }
        }
        let want: HashSet<&str> = [
            "mesh_lb_connections_total",
            "mesh_lb_refused_total",
            "mesh_lb_backends",
            "mesh_datapath_program_attached",
            "mesh_datapath_map_entries",
            "mesh_datapath_map_capacity",
            "mesh_datapath_map_memory_bytes",
            "mesh_reconcile_errors_total",
            "mesh_reconcile_last_success",
            "mesh_policy_verdicts_total",
            "mesh_drops_total",
            "mesh_sockmap_enabled",
            "mesh_sockmap_sockets",
            "mesh_sockmap_redirected_messages_total",
            "mesh_sockmap_redirected_bytes_total",
            "mesh_sockmap_stack_messages_total",
        ]
        .into();
        assert_eq!(help, want);
        assert_eq!(kind, want);
    }

    #[test]
    fn a_running_agent_reports_its_source_and_planner_cost() {
        use crate::source::{SourceKind, SourceStatus};
        let snapshot = Snapshot {
            agent: Some(AgentStatus {
                source: SourceStatus {
                    kind: SourceKind::Etcd,
                    stale: true,
                    stale_since: Some(1_700_000_000),
                    revision: 42,
                    applied_revision: 41,
                    rejected_objects: 2,
                },
                last_plan_us: 1_500,
                last_plan_services: 1,
                last_map_writes: 4,
                ..AgentStatus::default()
            }),
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        let got = lines(&text);
        for want in [
            r#"mesh_agent_source_info{source="etcd"} 1"#,
            "mesh_agent_source_stale 1",
            "mesh_agent_source_stale_since_seconds 1700000000",
            "mesh_agent_source_revision 42",
            "mesh_agent_source_applied_revision 41",
            "mesh_agent_source_rejected_objects 2",
            "mesh_agent_plan_seconds 0.0015",
            "mesh_agent_apply_seconds 0.0",
            "mesh_agent_plan_services 1",
            "mesh_agent_map_writes 4",
        ] {
            assert!(got.contains(want), "missing line {want:?} in:\n{text}");
        }
        assert!(!render(&sample()).contains("mesh_agent_source"));
    }

    #[test]
    fn label_values_are_escaped() {
        let snapshot = Snapshot {
            programs_attached: vec![(
                r#"odd"name\with
newline"#
                    .into(),
                true,
            )],
            ..Snapshot::default()
        };
        let text = render(&snapshot);
        assert!(
            lines(&text).contains(
                r#"mesh_datapath_program_attached{program="odd\"name\\with\nnewline"} 1"#
            ),
            "{text}"
        );
    }

    #[test]
    fn duplicate_entries_merge_into_one_series() {
        let mut snapshot = sample();
        let copy = snapshot.services[0].clone();
        snapshot.services.push(copy);
        let text = render(&snapshot);
        let got = lines(&text);
        assert!(got.contains(
            r#"mesh_lb_connections_total{service="default/web",frontend="10.96.0.10:80/TCP",backend="10.244.1.11:8080",state="active"} 84"#
        ));
        assert!(got.contains(
            r#"mesh_lb_backends{service="default/web",frontend="10.96.0.10:80/TCP",state="active"} 4"#
        ));
    }

    #[test]
    fn empty_snapshot_still_reports_reconcile_state() {
        let text = render(&Snapshot::default());
        let got = lines(&text);
        assert!(got.contains("mesh_reconcile_errors_total 0"), "{text}");
        assert!(got.contains("mesh_reconcile_last_success 0"), "{text}");
        assert!(!text.contains("mesh_lb_connections_total{"), "{text}");
        // Verdict series exist at 0 from the start; drops appear once counted.
        assert!(
            got.contains(r#"mesh_policy_verdicts_total{direction="egress",verdict="dropped"} 0"#),
            "{text}"
        );
        assert!(!text.contains("mesh_drops_total{"), "{text}");
    }

    #[test]
    fn bind_error_names_the_address() {
        let err = MetricsError::Bind {
            addr: "127.0.0.1:9464".parse().expect("addr"),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        let msg = err.to_string();
        assert!(msg.starts_with("bind 127.0.0.1:9464: "), "{msg}");
        assert!(msg.contains("another process"), "{msg}");
    }

    struct Fixed(Snapshot);

    impl SnapshotSource for Fixed {
        fn snapshot(&self) -> Snapshot {
            self.0.clone()
        }
    }

    /// One HTTP/1.1 request on its own connection; returns the status line, the
    /// lower-cased headers and the body.
    async fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
        let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("write");
        let mut raw = String::new();
        stream.read_to_string(&mut raw).await.expect("read");
        let (head, body) = raw.split_once("\r\n\r\n").expect("header end");
        let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
        (status.to_owned(), headers.to_lowercase(), body.to_owned())
    }

    #[tokio::test]
    async fn serves_metrics_health_and_404_until_shutdown() {
        let server = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let addr = server.local_addr();
        assert_ne!(addr.port(), 0);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(server.run(Arc::new(Fixed(sample())), async {
            let _ = stopped.await;
        }));

        let (status, headers, body) = get(addr, "/metrics").await;
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers.contains("content-type: text/plain; version=0.0.4; charset=utf-8"),
            "{headers}"
        );
        assert!(
            lines(&body).contains("mesh_reconcile_errors_total 5"),
            "{body}"
        );
        // Series order follows hash maps, so compare line sets.
        assert_eq!(lines(&body), lines(&render(&sample())));

        let (status, _, body) = get(addr, "/healthz").await;
        assert_eq!((status.as_str(), body.as_str()), ("HTTP/1.1 200 OK", "ok"));

        let (status, _, _) = get(addr, "/nope").await;
        assert_eq!(status, "HTTP/1.1 404 Not Found");

        stop.send(()).expect("server still running");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("server stops after shutdown")
            .expect("server task")
            .expect("server ran cleanly");
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "listener closed"
        );
    }

    #[tokio::test]
    async fn bind_fails_on_a_taken_port() {
        let first = bind("127.0.0.1:0".parse().expect("addr"))
            .await
            .expect("bind");
        let taken = first.local_addr();
        let err = bind(taken).await.expect_err("second bind");
        assert!(
            err.to_string().starts_with(&format!("bind {taken}: ")),
            "{err}"
        );
    }
}
