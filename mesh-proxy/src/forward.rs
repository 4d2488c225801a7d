//! Forwarding one request: route, filters, weighted backend choice, timeouts, retries
//! (under the Service's retry budget), mirrors, then the pooled backend exchange; and
//! the configuration snapshot it all reads ([`Snapshot`]: routes compiled, and per
//! Service port the balancer, retry budget and connection pool that outlive snapshots).

use std::{
    collections::HashMap,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::{
    HeaderMap, HeaderValue, Request, Response, StatusCode, Version, header, request::Parts,
};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use mesh_common::l7::{
    AppProtocol, BackendTarget, Filter, HeaderModifier, LocalPod, Mirror, ProxyConfig, Rule,
    ServicePortRef, ServiceTarget, Timeouts, WeightedBackend,
};
use tokio::sync::{Semaphore, watch};

use crate::{
    balance::{Balancer, Outcome, Pick},
    filters,
    inpod::Netns,
    mesh::{Mesh, Via},
    metrics::{ProxyMetrics, RequestLabels},
    retry::{RetryBudget, backoff},
    router::{Decision, Routes},
    server, trace,
    upstream::{Body, BoxError, ServicePool, Settings, UpstreamError, UpstreamResponse, Wire},
};

/// Largest request body kept for a retry or a mirror; a larger (or unsized) body is
/// streamed once, without retries or mirrors.
pub const MAX_REPLAY: usize = 64 << 10;
/// Most mirrored requests in flight at once (further mirrors are skipped).
pub const MAX_MIRRORS: usize = 64;

/// One Service port's forwarding state, kept across snapshots while the port exists.
pub struct Target {
    /// The Service port as last configured.
    pub service: ServiceTarget,
    /// Endpoint choice and outlier ejection.
    pub balancer: Arc<Balancer>,
    /// Retry budget.
    pub budget: Arc<RetryBudget>,
    /// Connections and circuit breaker.
    pub pool: Arc<ServicePool>,
}

/// A configuration ready to serve.
pub struct Snapshot {
    /// The configuration.
    pub config: Arc<ProxyConfig>,
    /// Its frontends, compiled.
    pub routes: Routes,
    /// Its Service ports.
    pub targets: HashMap<ServicePortRef, Arc<Target>>,
    /// The rule of each frontend without routes (everything to its own Service port),
    /// by cluster IP and port: made once here rather than per request.
    service_rules: HashMap<SocketAddr, Rule>,
}

impl Snapshot {
    /// Builds a snapshot from `config`, carrying over the state of Service ports that
    /// `prev` already had.
    pub fn build(config: Arc<ProxyConfig>, prev: Option<&Snapshot>, settings: Settings) -> Self {
        let targets = config
            .services
            .iter()
            .map(|s| {
                let t = match prev.and_then(|p| p.targets.get(&s.target)) {
                    Some(old) => {
                        old.balancer.update(&s.endpoints, &s.resilience);
                        old.budget.update(&s.resilience);
                        old.pool.update(&s.resilience);
                        Target {
                            service: s.clone(),
                            balancer: Arc::clone(&old.balancer),
                            budget: Arc::clone(&old.budget),
                            pool: Arc::clone(&old.pool),
                        }
                    }
                    None => Target {
                        service: s.clone(),
                        balancer: Arc::new(Balancer::new(&s.endpoints, &s.resilience)),
                        budget: Arc::new(RetryBudget::new(&s.resilience)),
                        pool: ServicePool::new(s.host.clone(), &s.resilience, settings),
                    },
                };
                (s.target.clone(), Arc::new(t))
            })
            .collect();
        let service_rules = config
            .frontends
            .iter()
            .filter(|f| f.routes.is_none())
            .map(|f| {
                let port = ServicePortRef {
                    service: f.service.clone(),
                    port: f.port,
                };
                (SocketAddr::new(f.addr, f.port), service_rule_for(port))
            })
            .collect();
        Self {
            routes: Routes::compile(&config),
            config,
            targets,
            service_rules,
        }
    }

    /// An empty snapshot (before the agent's first configuration).
    pub fn empty() -> Self {
        Self {
            config: Arc::default(),
            routes: Routes::default(),
            targets: HashMap::new(),
            service_rules: HashMap::new(),
        }
    }
}

/// What every connection shares.
pub struct Proxy {
    /// The configuration in force.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// Metrics.
    pub metrics: Arc<ProxyMetrics>,
    /// Bounds mirrors in flight.
    pub mirrors: Arc<Semaphore>,
    /// The mesh (identities and tunnels); `None` when the proxy runs without a CA.
    pub mesh: Option<Arc<Mesh>>,
}

/// A client pod: whose listener accepted, and the namespace its outbound sockets are
/// made in.
pub struct Source {
    /// The pod.
    pub pod: LocalPod,
    /// Its network namespace.
    pub netns: Arc<Netns>,
}

/// One accepted client connection.
pub struct Conn {
    /// Shared state.
    pub proxy: Arc<Proxy>,
    /// The client pod.
    pub source: Arc<Source>,
    /// The original destination (the Service's cluster IP and port).
    pub dst: SocketAddr,
}

/// The client's connection must be reset, not answered (a denied client stays denied).
#[derive(Debug, thiserror::Error)]
#[error("resetting the client connection: {0}")]
pub struct ResetClient(String);

/// How an exchange ended, before the response goes to the client.
enum Final {
    /// The backend's answer (with a response flag such as `URX`, or `-`).
    Upstream(Box<UpstreamResponse>, &'static str),
    /// The proxy's own answer.
    Local(StatusCode, &'static str),
    /// Reset the client.
    Reset(String),
}

impl Conn {
    /// The way to an endpoint at `addr` through the mesh tunnel, when the client pod
    /// and the endpoint are both in the mesh.
    fn via(&self, addr: std::net::IpAddr) -> Option<Via> {
        let pod = &self.source.pod;
        self.proxy.mesh.as_ref()?.via(
            &self.source.netns,
            pod.netns.cookie,
            pod.identity.as_deref(),
            addr,
        )
    }

    /// Serves one request.
    pub async fn handle(
        self: Arc<Self>,
        mut req: Request<Incoming>,
    ) -> Result<Response<Body>, ResetClient> {
        let upgrading = req.version() < Version::HTTP_2 && server::wants_upgrade(req.headers());
        let client_upgrade = upgrading.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        server::strip_hop_by_hop(&mut parts.headers, upgrading);
        trace::propagate(&mut parts.headers);
        let snapshot = self.proxy.snapshot.borrow().clone();
        let mut rec = Recorder::new(&self, &parts);
        let Some(frontend) = snapshot.routes.frontend(self.dst) else {
            return Ok(rec.local(StatusCode::NOT_FOUND, "NR", &[]));
        };
        let f = &frontend.frontend;
        rec.service(&frontend.host, &f.service.name, &f.service.namespace);
        if f.protocol == AppProtocol::Grpc {
            rec.labels.request_protocol = "grpc";
        }
        let (rule, prefix) = match frontend.route(&parts) {
            Decision::NoRoute => return Ok(rec.local(StatusCode::NOT_FOUND, "NR", &[])),
            Decision::Service => {
                let Some(rule) = snapshot.service_rules.get(&SocketAddr::new(f.addr, f.port))
                else {
                    return Ok(rec.local(StatusCode::NOT_FOUND, "NR", &[]));
                };
                (rule, None)
            }
            Decision::Rule { rule, prefix } => (rule, prefix),
        };
        let mut edits = Edits::default();
        if let Some(redirect) = edits.apply(&rule.filters, &mut parts, prefix, f.port) {
            return Ok(rec.local_with(redirect, "-", &edits.response));
        }
        let Some(backend) = choose(&rule.backends, rand::random::<u64>()) else {
            return Ok(rec.local(StatusCode::INTERNAL_SERVER_ERROR, "-", &edits.response));
        };
        if let Some(redirect) = edits.apply(&backend.filters, &mut parts, prefix, f.port) {
            return Ok(rec.local_with(redirect, "-", &edits.response));
        }
        let BackendTarget::Service(port_ref) = &backend.target else {
            return Ok(rec.local(StatusCode::INTERNAL_SERVER_ERROR, "-", &edits.response));
        };
        let Some(target) = snapshot.targets.get(port_ref) else {
            return Ok(rec.local(StatusCode::SERVICE_UNAVAILABLE, "UH", &edits.response));
        };
        rec.target(target);
        let wire = match target.service.protocol {
            AppProtocol::Http if parts.version < Version::HTTP_2 => Wire::Http1,
            _ => Wire::Http2,
        };
        let retries = rule.retry.as_ref().map_or(0, |r| r.attempts);
        let wants_replay = !upgrading && (retries > 0 || !edits.mirrors.is_empty());
        let mut body =
            match RequestBody::new(body, wants_replay, Arc::clone(&rec.request_bytes)).await {
                Ok(b) => b,
                Err(e) => return Err(ResetClient(format!("reading the request body: {e}"))),
            };
        for m in &edits.mirrors {
            self.mirror(&snapshot, m, &parts, &body, wire);
        }
        let exchange = self.exchange(target, rule, &parts, &mut body, wire, retries, &mut rec);
        let done = match nonzero_ms(rule.timeouts.request_ms) {
            Some(t) => tokio::time::timeout(t, exchange)
                .await
                .unwrap_or(Final::Local(StatusCode::GATEWAY_TIMEOUT, "UT")),
            None => exchange.await,
        };
        match done {
            Final::Local(status, flag) => Ok(rec.local(status, flag, &edits.response)),
            Final::Reset(why) => {
                rec.reset();
                Err(ResetClient(why))
            }
            Final::Upstream(resp, flag) => {
                let mut resp = *resp;
                let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                if let (true, Some(client)) = (switching, client_upgrade) {
                    let backend = hyper::upgrade::on(&mut resp);
                    tokio::spawn(tunnel(client, backend));
                }
                server::strip_hop_by_hop(resp.headers_mut(), switching);
                Ok(rec.upstream(resp, flag, &edits.response))
            }
        }
    }

    /// Attempts the exchange with `target`, retrying as `rule` allows.
    #[expect(
        clippy::too_many_arguments,
        reason = "one request's pieces, borrowed from handle"
    )]
    async fn exchange(
        &self,
        target: &Target,
        rule: &Rule,
        parts: &Parts,
        body: &mut RequestBody,
        wire: Wire,
        retries: u32,
        rec: &mut Recorder,
    ) -> Final {
        let per_attempt = nonzero_ms(rule.timeouts.backend_request_ms);
        let policy = rule.retry.as_ref();
        let service = target.service.host.as_str();
        target.budget.deposit();
        let mut retry = 0;
        // Endpoints NetworkPolicy refused to this client: the request goes to another
        // one, as an allowed client must not fail because the proxy chose for it.
        let mut denied: Vec<SocketAddr> = Vec::new();
        loop {
            let Some(pick) = target.balancer.pick_except(&denied) else {
                if !denied.is_empty() {
                    return Final::Reset(format!(
                        "every endpoint of {service} is denied to this client by NetworkPolicy"
                    ));
                }
                return Final::Local(StatusCode::SERVICE_UNAVAILABLE, "UH");
            };
            rec.endpoint(&pick.endpoint);
            let Some(b) = body.take() else {
                return Final::Local(StatusCode::SERVICE_UNAVAILABLE, "UC");
            };
            let addr = SocketAddr::new(pick.endpoint.addr, pick.endpoint.port);
            let req = to_wire(parts, b, wire);
            let sent = Instant::now();
            let via = self.via(addr.ip());
            rec.security(via.as_ref());
            let send = target
                .pool
                .send(&self.source.netns, addr, wire, req, via.as_ref());
            let can_retry = retry < retries && body.replayable();
            let result = match per_attempt {
                Some(t) => match tokio::time::timeout(t, send).await {
                    Ok(r) => r,
                    // Dropping the pick without finishing: cancelled, not a failure.
                    // A timed-out attempt is retried like a reset one (Envoy's per-try
                    // timeout), under the same budget.
                    Err(_) => {
                        drop(pick);
                        if !can_retry || policy.is_none() {
                            let flag = if retry > 0 { "URX" } else { "UT" };
                            return Final::Local(StatusCode::GATEWAY_TIMEOUT, flag);
                        }
                        if !target.budget.try_withdraw() {
                            self.proxy.metrics.record_retry(service, true);
                            return Final::Local(StatusCode::GATEWAY_TIMEOUT, "URX");
                        }
                        retry += 1;
                        self.proxy.metrics.record_retry(service, false);
                        tracing::debug!(retry, failed = "UT", "retrying");
                        let base = Duration::from_millis(policy.map_or(0, |p| p.backoff_ms));
                        tokio::time::sleep(backoff(base, retry)).await;
                        continue;
                    }
                },
                None => send.await,
            };
            let failure_flag = match result {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let latency = sent.elapsed();
                    finish(
                        &self.proxy.metrics,
                        service,
                        pick,
                        Outcome::Response { status, latency },
                    );
                    let retryable = policy.is_some_and(|p| p.codes.contains(&status));
                    if !retryable || !can_retry {
                        let flag = if retryable && retry > 0 { "URX" } else { "-" };
                        return Final::Upstream(Box::new(resp), flag);
                    }
                    if !target.budget.try_withdraw() {
                        self.proxy.metrics.record_retry(service, true);
                        return Final::Upstream(Box::new(resp), "URX");
                    }
                    None
                }
                Err(e @ UpstreamError::Denied { .. }) if body.replayable() => {
                    tracing::debug!(pod = %self.source.netns.name, error = %e, "endpoint denied by policy; trying another");
                    denied.push(addr);
                    continue;
                }
                Err(e) if e.resets_client() => {
                    tracing::info!(pod = %self.source.netns.name, dst = %self.dst, error = %e, "connection refused by the datapath");
                    return Final::Reset(e.to_string());
                }
                Err(e @ UpstreamError::Overflow { .. }) => {
                    tracing::debug!(error = %e, "circuit breaker open");
                    self.proxy.metrics.record_overflow(service);
                    return Final::Local(StatusCode::SERVICE_UNAVAILABLE, "UO");
                }
                Err(e) => {
                    let flag = match e {
                        UpstreamError::Reset { .. } => {
                            finish(&self.proxy.metrics, service, pick, Outcome::Reset);
                            "UC"
                        }
                        _ => {
                            finish(&self.proxy.metrics, service, pick, Outcome::ConnectFailure);
                            "UF"
                        }
                    };
                    tracing::debug!(error = %e, "backend attempt failed");
                    if !can_retry || policy.is_none() {
                        let flag = if retry > 0 { "URX" } else { flag };
                        return Final::Local(StatusCode::SERVICE_UNAVAILABLE, flag);
                    }
                    if !target.budget.try_withdraw() {
                        self.proxy.metrics.record_retry(service, true);
                        return Final::Local(StatusCode::SERVICE_UNAVAILABLE, "URX");
                    }
                    Some(flag)
                }
            };
            retry += 1;
            self.proxy.metrics.record_retry(service, false);
            tracing::debug!(retry, failed = failure_flag.unwrap_or("status"), "retrying");
            let base = Duration::from_millis(policy.map_or(0, |p| p.backoff_ms));
            tokio::time::sleep(backoff(base, retry)).await;
        }
    }

    /// Sends a copy of the request to the mirror's target, on its own task, when the
    /// body could be kept and a mirror slot is free; the answer is discarded.
    fn mirror(
        &self,
        snapshot: &Snapshot,
        m: &Mirror,
        parts: &Parts,
        body: &RequestBody,
        wire: Wire,
    ) {
        if rand::random_range(0..1_000_000u32) >= m.fraction_ppm {
            return;
        }
        let BackendTarget::Service(port_ref) = &m.target else {
            return;
        };
        let (Some(target), Some(b)) = (snapshot.targets.get(port_ref), body.copy()) else {
            return;
        };
        let Ok(permit) = Arc::clone(&self.proxy.mirrors).try_acquire_owned() else {
            tracing::debug!("mirror skipped: too many in flight");
            return;
        };
        let Some(pick) = target.balancer.pick() else {
            return;
        };
        let wire = match target.service.protocol {
            AppProtocol::Http => wire,
            _ => Wire::Http2,
        };
        let req = to_wire(parts, b, wire);
        let pool = Arc::clone(&target.pool);
        let ns = Arc::clone(&self.source.netns);
        let metrics = Arc::clone(&self.proxy.metrics);
        let service = target.service.host.clone();
        let via = self.via(pick.endpoint.addr);
        tokio::spawn(async move {
            let addr = SocketAddr::new(pick.endpoint.addr, pick.endpoint.port);
            let sent = Instant::now();
            // The mirror's target judges its endpoints by the copies too, as by any
            // request: failures count toward their ejection.
            let outcome = match pool.send(&ns, addr, wire, req, via.as_ref()).await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let _ = resp.into_body().collect().await;
                    Some(Outcome::Response {
                        status,
                        latency: sent.elapsed(),
                    })
                }
                Err(e @ UpstreamError::Reset { .. }) => {
                    tracing::debug!(error = %e, "mirror failed");
                    Some(Outcome::Reset)
                }
                // As for the request itself: the breaker and the datapath (a denied
                // or dropped connect) say nothing about the endpoint.
                Err(e) if e.resets_client() || matches!(e, UpstreamError::Overflow { .. }) => {
                    tracing::debug!(error = %e, "mirror failed");
                    None
                }
                Err(e) => {
                    tracing::debug!(error = %e, "mirror failed");
                    Some(Outcome::ConnectFailure)
                }
            };
            if let Some(outcome) = outcome {
                finish(&metrics, &service, pick, outcome);
            }
            drop(permit);
        });
    }
}

/// Reports how an attempt ended to the balancer, and counts the ejection it caused.
fn finish(metrics: &ProxyMetrics, service: &str, pick: Pick, outcome: Outcome) {
    if let Some(e) = pick.finish_report(outcome) {
        let endpoint = SocketAddr::new(e.endpoint.addr, e.endpoint.port);
        metrics.record_ejection(service, &endpoint.to_string());
    }
}

/// The rule a frontend without routes uses: everything to its own Service port.
fn service_rule_for(port: ServicePortRef) -> Rule {
    Rule {
        route: Default::default(),
        index: 0,
        filters: Vec::new(),
        backends: vec![WeightedBackend {
            weight: 1,
            target: BackendTarget::Service(port),
            filters: Vec::new(),
        }],
        timeouts: Timeouts::default(),
        retry: None,
    }
}

fn nonzero_ms(ms: Option<u64>) -> Option<Duration> {
    ms.filter(|ms| *ms > 0).map(Duration::from_millis)
}

/// The backend whose weight range holds `r % total`; `None` when every weight is 0.
/// A backend of weight 0 is never chosen.
pub fn choose(backends: &[WeightedBackend], r: u64) -> Option<&WeightedBackend> {
    let total: u64 = backends.iter().map(|b| u64::from(b.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut x = r % total;
    for b in backends {
        let w = u64::from(b.weight);
        if x < w {
            return Some(b);
        }
        x -= w;
    }
    None
}

/// Filter effects collected while a request passes its rule's and backend's filters.
#[derive(Default)]
struct Edits {
    response: Vec<HeaderModifier>,
    mirrors: Vec<Mirror>,
}

impl Edits {
    /// Applies `filters` in order; a redirect ends it with the answer to give.
    fn apply(
        &mut self,
        filters: &[Filter],
        parts: &mut Parts,
        prefix: Option<&str>,
        port: u16,
    ) -> Option<Response<Body>> {
        for f in filters {
            match f {
                Filter::RequestHeaderModifier(m) => filters::modify_headers(&mut parts.headers, m),
                Filter::ResponseHeaderModifier(m) => self.response.push(m.clone()),
                Filter::UrlRewrite(rw) => filters::apply_rewrite(parts, rw, prefix),
                Filter::RequestMirror(m) => self.mirrors.push(m.clone()),
                Filter::RequestRedirect(r) => {
                    let location = filters::redirect_location(parts, r, prefix, port);
                    let status = StatusCode::from_u16(r.status)
                        .ok()
                        .filter(StatusCode::is_redirection)
                        .unwrap_or(StatusCode::FOUND);
                    let mut resp = empty(status);
                    if let Ok(v) = HeaderValue::from_str(&location) {
                        resp.headers_mut().insert(header::LOCATION, v);
                    }
                    return Some(resp);
                }
            }
        }
        None
    }
}

fn empty(status: StatusCode) -> Response<Body> {
    let mut resp = Response::new(Empty::new().map_err(|e| match e {}).boxed_unsync());
    *resp.status_mut() = status;
    resp
}

/// The request for the backend: a copy of the head in the form the wire needs
/// (origin-form with `Host` for HTTP/1.1; scheme and authority for HTTP/2).
fn to_wire(parts: &Parts, body: Body, wire: Wire) -> Request<Body> {
    let mut req = Request::new(body);
    *req.method_mut() = parts.method.clone();
    *req.headers_mut() = parts.headers.clone();
    let authority = parts
        .uri
        .authority()
        .map(|a| a.as_str().to_owned())
        .or_else(|| {
            parts
                .headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned)
        });
    let pq = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    match wire {
        Wire::Http1 => {
            *req.version_mut() = Version::HTTP_11;
            if let Ok(uri) = pq.parse() {
                *req.uri_mut() = uri;
            }
            if let Some(a) = authority.and_then(|a| HeaderValue::from_str(&a).ok()) {
                req.headers_mut().insert(header::HOST, a);
            }
        }
        Wire::Http2 => {
            *req.version_mut() = Version::HTTP_2;
            let a = authority.unwrap_or_else(|| "localhost".to_owned());
            if let Ok(uri) = format!("http://{a}{pq}").parse() {
                *req.uri_mut() = uri;
            }
            // `:authority` carries it; HTTP/2 forbids connection-specific headers.
            req.headers_mut().remove(header::HOST);
        }
    }
    req
}

/// Copies bytes both ways between an upgraded client and backend connection.
async fn tunnel(client: hyper::upgrade::OnUpgrade, backend: hyper::upgrade::OnUpgrade) {
    match tokio::try_join!(client, backend) {
        Ok((c, b)) => {
            let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
            if let Err(e) = tokio::io::copy_bidirectional(&mut c, &mut b).await {
                tracing::debug!(error = %e, "upgraded connection ended");
            }
        }
        Err(e) => tracing::debug!(error = %e, "upgrade failed"),
    }
}

/// A request body: kept (for retries and mirrors) or streamed once.
enum RequestBody {
    Kept {
        data: Bytes,
        trailers: Option<HeaderMap>,
    },
    Stream(Option<Body>),
}

impl RequestBody {
    /// Keeps the body when `keep` and it is known to fit [`MAX_REPLAY`], and always an
    /// empty one (free to keep, and then a request denied by policy at one endpoint can
    /// go to another); else streams.
    async fn new(body: Incoming, keep: bool, counter: Arc<AtomicU64>) -> Result<Self, BoxError> {
        let empty = body.is_end_stream();
        let fits = empty
            || body
                .size_hint()
                .upper()
                .is_some_and(|n| n <= MAX_REPLAY as u64);
        if (keep && fits) || empty {
            let collected = Limited::new(body, MAX_REPLAY).collect().await?;
            let trailers = collected.trailers().cloned();
            let data = collected.to_bytes();
            counter.fetch_add(data.len() as u64, Ordering::Relaxed);
            return Ok(Self::Kept { data, trailers });
        }
        Ok(Self::Stream(Some(
            Counted {
                inner: body,
                counter,
            }
            .boxed_unsync(),
        )))
    }

    fn replayable(&self) -> bool {
        matches!(self, Self::Kept { .. })
    }

    fn copy(&self) -> Option<Body> {
        match self {
            Self::Kept { data, trailers } => Some(
                Replay {
                    data: (!data.is_empty()).then(|| data.clone()),
                    trailers: trailers.clone(),
                }
                .boxed_unsync(),
            ),
            Self::Stream(_) => None,
        }
    }

    /// The body for the next attempt (`None`: a streamed body was already sent).
    fn take(&mut self) -> Option<Body> {
        match self {
            Self::Kept { .. } => self.copy(),
            Self::Stream(b) => b.take(),
        }
    }
}

/// A kept body, sent again.
struct Replay {
    data: Option<Bytes>,
    trailers: Option<HeaderMap>,
}

impl HttpBody for Replay {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        if let Some(d) = self.data.take() {
            return Poll::Ready(Some(Ok(Frame::data(d))));
        }
        Poll::Ready(self.trailers.take().map(|t| Ok(Frame::trailers(t))))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.data.as_ref().map_or(0, |d| d.len() as u64))
    }
}

/// A streamed body whose bytes are counted (for the request size metric).
struct Counted<B> {
    inner: B,
    counter: Arc<AtomicU64>,
}

impl<B> HttpBody for Counted<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled
            && let Some(d) = f.data_ref()
        {
            self.counter.fetch_add(d.len() as u64, Ordering::Relaxed);
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Builds one request's metric labels as the request proceeds, and records it when
/// its response ends.
struct Recorder {
    metrics: Arc<ProxyMetrics>,
    labels: RequestLabels,
    request_bytes: Arc<AtomicU64>,
    start: Instant,
}

impl Recorder {
    fn new(conn: &Conn, parts: &Parts) -> Self {
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/grpc"));
        let pod = &conn.source.pod;
        Self {
            metrics: Arc::clone(&conn.proxy.metrics),
            labels: RequestLabels {
                reporter: "source",
                source_workload: pod.workload.clone(),
                source_workload_namespace: pod.pod.namespace.clone(),
                request_protocol: if grpc { "grpc" } else { "http" },
                connection_security_policy: "none",
                ..Default::default()
            },
            request_bytes: Arc::default(),
            start: Instant::now(),
        }
    }

    fn service(&mut self, host: &str, name: &str, namespace: &str) {
        self.labels.destination_service = host.to_owned();
        self.labels.destination_service_name = name.to_owned();
        self.labels.destination_service_namespace = namespace.to_owned();
    }

    fn target(&mut self, t: &Target) {
        let s = &t.service.target.service;
        self.labels.destination_service = t.service.host.clone();
        self.labels.destination_service_name = s.name.clone();
        self.labels.destination_service_namespace = s.namespace.clone();
    }

    /// Whether this attempt goes through the mesh tunnel, and between which
    /// identities.
    fn security(&mut self, via: Option<&Via>) {
        let l = &mut self.labels;
        match via {
            Some(v) => {
                l.source_principal = v.source_principal().to_owned();
                l.destination_principal = v.peer.identity.clone();
                l.connection_security_policy = "mutual_tls";
            }
            None if l.connection_security_policy != "none" => {
                l.source_principal.clear();
                l.destination_principal.clear();
                l.connection_security_policy = "none";
            }
            None => {}
        }
    }

    fn endpoint(&mut self, e: &mesh_common::l7::Endpoint) {
        self.labels.destination_workload = e.workload.clone();
        self.labels.destination_workload_namespace = e
            .pod
            .as_ref()
            .map(|p| p.namespace.clone())
            .unwrap_or_default();
    }

    fn local(
        self,
        status: StatusCode,
        flag: &'static str,
        mods: &[HeaderModifier],
    ) -> Response<Body> {
        self.local_with(empty(status), flag, mods)
    }

    fn local_with(
        mut self,
        mut resp: Response<Body>,
        flag: &'static str,
        mods: &[HeaderModifier],
    ) -> Response<Body> {
        for m in mods {
            filters::modify_headers(resp.headers_mut(), m);
        }
        self.labels.response_code = resp.status().as_u16();
        self.labels.response_flags = flag.to_owned();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.metrics
            .record_request(&self.labels, self.start.elapsed(), request_bytes, 0);
        resp
    }

    fn reset(mut self) {
        self.labels.response_code = 0;
        self.labels.response_flags = "UF".to_owned();
        let request_bytes = self.request_bytes.load(Ordering::Relaxed);
        self.metrics
            .record_request(&self.labels, self.start.elapsed(), request_bytes, 0);
    }

    fn upstream(
        mut self,
        resp: UpstreamResponse,
        flag: &'static str,
        mods: &[HeaderModifier],
    ) -> Response<Body> {
        let (mut head, body) = resp.into_parts();
        for m in mods {
            filters::modify_headers(&mut head.headers, m);
        }
        self.labels.response_code = head.status.as_u16();
        self.labels.response_flags = flag.to_owned();
        if let Some(s) = head
            .headers
            .get("grpc-status")
            .and_then(|v| v.to_str().ok())
        {
            self.labels.grpc_response_status = s.to_owned();
        }
        let body = Recorded {
            inner: body,
            rec: Some(self),
            response_bytes: 0,
        };
        Response::from_parts(head, body.boxed_unsync())
    }
}

/// A response body that records its request's metrics when it ends (or is dropped:
/// the client went away).
struct Recorded<B> {
    inner: B,
    rec: Option<Recorder>,
    response_bytes: u64,
}

impl<B> HttpBody for Recorded<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &polled {
            if let Some(d) = f.data_ref() {
                self.response_bytes += d.len() as u64;
            } else if let (Some(t), Some(rec)) = (f.trailers_ref(), self.rec.as_mut()) {
                // gRPC's status arrives in the trailers.
                if let Some(s) = t.get("grpc-status").and_then(|v| v.to_str().ok()) {
                    rec.labels.grpc_response_status = s.to_owned();
                }
            }
        }
        polled.map(|o| o.map(|r| r.map_err(Into::into)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl<B> Drop for Recorded<B> {
    fn drop(&mut self) {
        if let Some(rec) = self.rec.take() {
            let request_bytes = rec.request_bytes.load(Ordering::Relaxed);
            rec.metrics.record_request(
                &rec.labels,
                rec.start.elapsed(),
                request_bytes,
                self.response_bytes,
            );
        }
    }
}

#[cfg(test)]
mod tests;
