//! Forwarding scenarios through the real client-facing server and backend pools, on
//! loopback in the test's own namespace: a hyper client → [`server::serve`] with a
//! [`Conn`] → pooled connections → tokio/hyper test backends.

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use mesh_common::l7::{
    AppProtocol, BackendTarget, Endpoint, Filter, Frontend, LocalPod, NetnsRef, ObjectRef,
    PathMatch, ProxyConfig, Redirect, Resilience, RetryPolicy, RouteMatch, RouteTable, Rule,
    ServicePortRef, ServiceTarget, Timeouts, WeightedBackend,
};
use tokio::{net::TcpListener, sync::watch};

use super::*;
use crate::server::{Drain, Limits};

const VIP: &str = "10.96.0.10:80";

/// What a test backend does with request number `n` (from 0).
type Script = Arc<dyn Fn(usize) -> (StatusCode, Duration) + Send + Sync>;

/// A backend on loopback: counts requests and accepted connections.
struct Backend {
    addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
}

async fn backend(script: Script) -> Backend {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let requests = Arc::new(AtomicUsize::new(0));
    let connections = Arc::new(AtomicUsize::new(0));
    let (r, c) = (Arc::clone(&requests), Arc::clone(&connections));
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            c.fetch_add(1, Ordering::SeqCst);
            let (r, script) = (Arc::clone(&r), Arc::clone(&script));
            tokio::spawn(async move {
                let svc = service_fn(move |req: Request<hyper::body::Incoming>| {
                    let n = r.fetch_add(1, Ordering::SeqCst);
                    let (status, delay) = script(n);
                    async move {
                        let path = req.uri().to_string();
                        let host = req
                            .headers()
                            .get("host")
                            .map(|h| h.to_str().unwrap().to_owned());
                        let _ = req.into_body().collect().await;
                        tokio::time::sleep(delay).await;
                        let mut resp = Response::new(Full::new(Bytes::from(path)));
                        *resp.status_mut() = status;
                        if let Some(h) = host {
                            resp.headers_mut().insert("x-seen-host", h.parse().unwrap());
                        }
                        Ok::<_, Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Backend {
        addr,
        requests,
        connections,
    }
}

fn obj(name: &str) -> ObjectRef {
    ObjectRef {
        namespace: "default".into(),
        name: name.into(),
    }
}

fn port_ref() -> ServicePortRef {
    ServicePortRef {
        service: obj("web"),
        port: 80,
    }
}

fn rule(backends: Vec<WeightedBackend>) -> Rule {
    Rule {
        route: obj("r"),
        index: 0,
        filters: vec![],
        backends,
        timeouts: Timeouts::default(),
        retry: None,
    }
}

fn to_web(weight: u32) -> WeightedBackend {
    WeightedBackend {
        weight,
        target: BackendTarget::Service(port_ref()),
        filters: vec![],
    }
}

fn config(endpoints: &[SocketAddr], routes: Option<Rule>, resilience: Resilience) -> ProxyConfig {
    let vip: SocketAddr = VIP.parse().unwrap();
    ProxyConfig {
        version: 1,
        node: "n1".into(),
        pods: vec![],
        frontends: vec![Frontend {
            addr: vip.ip(),
            port: vip.port(),
            service: obj("web"),
            protocol: AppProtocol::Http,
            routes: routes.map(|r| RouteTable {
                matches: vec![RouteMatch {
                    path: PathMatch::PathPrefix("/".into()),
                    headers: vec![],
                    query_params: vec![],
                    method: None,
                    rule: 0,
                }],
                rules: vec![r],
            }),
        }],
        services: vec![ServiceTarget {
            target: port_ref(),
            protocol: AppProtocol::Http,
            host: "web.default.svc.cluster.local".into(),
            endpoints: endpoints
                .iter()
                .map(|a| Endpoint {
                    addr: a.ip(),
                    port: a.port(),
                    pod: Some(obj("web-1")),
                    workload: "web".into(),
                })
                .collect(),
            resilience,
        }],
        policy_epoch: 0,
        ..ProxyConfig::default()
    }
}

/// The client pod, in the test's own namespace.
fn client_source() -> Arc<Source> {
    Arc::new(Source {
        pod: LocalPod {
            pod: obj("client"),
            workload: "client".into(),
            addrs: vec![],
            netns: NetnsRef {
                pid: 0,
                inode: 0,
                cookie: 0,
            },
            identity: None,
            security: None,
        },
        netns: Arc::new(Netns::current("default/client")),
    })
}

/// The proxy serving `config` on a loopback listener, as if every accepted connection
/// had been redirected from the VIP.
struct Harness {
    addr: SocketAddr,
    proxy: Arc<Proxy>,
}

async fn harness(config: ProxyConfig) -> Harness {
    harness_with(config, AppProtocol::Http).await
}

async fn harness_with(config: ProxyConfig, protocol: AppProtocol) -> Harness {
    let settings = Settings {
        connect_timeout: Duration::from_secs(2),
        idle_timeout: Duration::from_secs(30),
    };
    harness_settings(config, protocol, settings).await
}

async fn harness_settings(
    config: ProxyConfig,
    protocol: AppProtocol,
    settings: Settings,
) -> Harness {
    let snapshot = Snapshot::build(Arc::new(config), None, settings);
    let (tx, rx) = watch::channel(Arc::new(snapshot));
    std::mem::forget(tx);
    let proxy = Arc::new(Proxy {
        snapshot: rx,
        metrics: Arc::new(ProxyMetrics::new()),
        mirrors: Arc::new(Semaphore::new(MAX_MIRRORS)),
        mesh: None,
    });
    let source = client_source();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let limits = Limits {
        max_header_bytes: 16384,
        header_read_timeout: Duration::from_secs(2),
        max_concurrent_streams: 16,
        idle_timeout: Duration::from_secs(30),
    };
    let p = Arc::clone(&proxy);
    tokio::spawn(async move {
        let drain = Drain::new();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let conn = Arc::new(Conn {
                proxy: Arc::clone(&p),
                source: Arc::clone(&source),
                dst: VIP.parse().unwrap(),
            });
            tokio::spawn(server::serve(
                stream,
                conn,
                protocol,
                limits,
                drain.watcher(),
            ));
        }
    });
    Harness { addr, proxy }
}

impl Harness {
    /// One request on a new client connection: the status and headers, or `None`
    /// when the proxy closed the connection without an answer.
    async fn get(&self, path: &str) -> Option<Response<Bytes>> {
        let stream = tokio::net::TcpStream::connect(self.addr).await.unwrap();
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get(path)
            .header("host", "web.default:80")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .expect("proxy answers in time")
            .ok()?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await.ok()?.to_bytes();
        Some(Response::from_parts(parts, body))
    }

    fn metrics(&self) -> String {
        self.proxy.metrics.encode()
    }
}

fn script(f: impl Fn(usize) -> (StatusCode, Duration) + Send + Sync + 'static) -> Script {
    Arc::new(f)
}

#[tokio::test]
async fn service_without_routes_is_forwarded_with_host_kept() {
    let b = backend(script(|_| (StatusCode::OK, Duration::ZERO))).await;
    let h = harness(config(&[b.addr], None, Resilience::default())).await;
    let resp = h.get("/hello?x=1").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.body().as_ref(), b"/hello?x=1");
    assert_eq!(resp.headers()["x-seen-host"], "web.default:80");
    // Two requests on separate client connections reuse one pooled backend connection.
    h.get("/again").await.unwrap();
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    let m = h.metrics();
    assert!(m.contains("response_code=\"200\""), "{m}");
    assert!(m.contains("source_workload=\"client\""), "{m}");
}

#[tokio::test]
async fn retries_a_listed_code_until_success() {
    let b = backend(script(|n| {
        let s = if n == 0 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (s, Duration::ZERO)
    }))
    .await;
    let mut r = rule(vec![to_web(1)]);
    r.retry = Some(RetryPolicy {
        attempts: 2,
        codes: vec![503],
        backoff_ms: 1,
    });
    let h = harness(config(&[b.addr], Some(r), Resilience::default())).await;
    let resp = h.get("/").await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(b.requests.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn retries_exhausted_flag_urx() {
    let b = backend(script(|_| {
        (StatusCode::SERVICE_UNAVAILABLE, Duration::ZERO)
    }))
    .await;
    let mut r = rule(vec![to_web(1)]);
    r.retry = Some(RetryPolicy {
        attempts: 2,
        codes: vec![503],
        backoff_ms: 1,
    });
    let h = harness(config(&[b.addr], Some(r), Resilience::default())).await;
    let resp = h.get("/").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(b.requests.load(Ordering::SeqCst), 3);
    let m = h.metrics();
    assert!(m.contains("response_flags=\"URX\""), "{m}");
}

#[tokio::test]
async fn request_and_backend_timeouts_answer_504() {
    let b = backend(script(|_| (StatusCode::OK, Duration::from_secs(3)))).await;
    for timeouts in [
        Timeouts {
            request_ms: Some(100),
            backend_request_ms: None,
        },
        Timeouts {
            request_ms: None,
            backend_request_ms: Some(100),
        },
    ] {
        let mut r = rule(vec![to_web(1)]);
        r.timeouts = timeouts;
        let h = harness(config(&[b.addr], Some(r), Resilience::default())).await;
        let started = std::time::Instant::now();
        let resp = h.get("/").await.unwrap();
        assert_eq!(resp.status(), StatusCode::GATEWAY_TIMEOUT, "{timeouts:?}");
        assert!(started.elapsed() < Duration::from_secs(2));
        assert!(h.metrics().contains("response_flags=\"UT\""));
    }
}

#[tokio::test]
async fn connect_failure_is_503_uf() {
    // A port nothing listens on (bound, then closed).
    let closed = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let h = harness(config(&[closed], None, Resilience::default())).await;
    let resp = h.get("/").await.unwrap();
    assert_eq!(resp.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(h.metrics().contains("response_flags=\"UF\""));
}

#[tokio::test]
async fn no_endpoint_is_503_uh() {
    let h = harness(config(&[], None, Resilience::default())).await;
    assert_eq!(
        h.get("/").await.unwrap().status(),
        StatusCode::SERVICE_UNAVAILABLE
    );
    assert!(h.metrics().contains("response_flags=\"UH\""));
}

#[tokio::test]
async fn circuit_breaker_overflow_is_503_uo() {
    let b = backend(script(|_| (StatusCode::OK, Duration::from_millis(1500)))).await;
    let limits = Resilience {
        max_connections: 1,
        max_pending_requests: 0,
        ..Resilience::default()
    };
    let h = Arc::new(harness(config(&[b.addr], None, limits)).await);
    let slow = {
        let h = Arc::clone(&h);
        tokio::spawn(async move { h.get("/slow").await.unwrap().status() })
    };
    // The first request holds the only connection once the backend has it.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while b.requests.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let rejected = h.get("/second").await.unwrap();
    assert_eq!(rejected.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(slow.await.unwrap(), StatusCode::OK);
    assert!(h.metrics().contains("response_flags=\"UO\""));
    // Once the first request is done its connection serves the next one.
    assert_eq!(h.get("/third").await.unwrap().status(), StatusCode::OK);
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
    let open = h.proxy.snapshot.borrow().targets[&port_ref()]
        .pool
        .open_connections();
    assert_eq!(open, 1);
}

#[tokio::test]
async fn pending_requests_wait_for_a_connection() {
    let b = backend(script(|_| (StatusCode::OK, Duration::from_millis(200)))).await;
    let limits = Resilience {
        max_connections: 1,
        max_pending_requests: 4,
        ..Resilience::default()
    };
    let h = Arc::new(harness(config(&[b.addr], None, limits)).await);
    let all: Vec<_> = (0..3)
        .map(|i| {
            let h = Arc::clone(&h);
            tokio::spawn(async move { h.get(&format!("/{i}")).await.unwrap().status() })
        })
        .collect();
    for t in all {
        assert_eq!(t.await.unwrap(), StatusCode::OK);
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn connection_retired_after_max_requests() {
    let b = backend(script(|_| (StatusCode::OK, Duration::ZERO))).await;
    let limits = Resilience {
        max_requests_per_connection: 1,
        ..Resilience::default()
    };
    let h = harness(config(&[b.addr], None, limits)).await;
    for _ in 0..3 {
        assert_eq!(h.get("/").await.unwrap().status(), StatusCode::OK);
    }
    assert_eq!(b.connections.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn redirect_invalid_backend_and_no_backend() {
    let mut r = rule(vec![]);
    r.filters = vec![Filter::RequestRedirect(Redirect {
        scheme: Some("https".into()),
        hostname: None,
        port: None,
        path: None,
        status: 301,
    })];
    let h = harness(config(&[], Some(r), Resilience::default())).await;
    let resp = h.get("/a?b=c").await.unwrap();
    assert_eq!(resp.status(), StatusCode::MOVED_PERMANENTLY);
    assert_eq!(resp.headers()["location"], "https://web.default/a?b=c");

    let r = rule(vec![WeightedBackend {
        weight: 1,
        target: BackendTarget::Invalid {
            reason: "BackendNotFound".into(),
        },
        filters: vec![],
    }]);
    let h = harness(config(&[], Some(r), Resilience::default())).await;
    assert_eq!(
        h.get("/").await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );

    let h = harness(config(
        &[],
        Some(rule(vec![to_web(0)])),
        Resilience::default(),
    ))
    .await;
    assert_eq!(
        h.get("/").await.unwrap().status(),
        StatusCode::INTERNAL_SERVER_ERROR
    );
}

#[tokio::test]
async fn no_matching_route_is_404_nr() {
    let b = backend(script(|_| (StatusCode::OK, Duration::ZERO))).await;
    let mut c = config(
        &[b.addr],
        Some(rule(vec![to_web(1)])),
        Resilience::default(),
    );
    if let Some(t) = c.frontends[0].routes.as_mut() {
        t.matches[0].path = PathMatch::Exact("/only".into());
    }
    let h = harness(c).await;
    assert_eq!(
        h.get("/other").await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(h.get("/only").await.unwrap().status(), StatusCode::OK);
    assert!(h.metrics().contains("response_flags=\"NR\""));
}

#[test]
fn weighted_choice_never_picks_weight_zero() {
    let backends = vec![
        WeightedBackend {
            weight: 0,
            target: BackendTarget::Invalid {
                reason: "zero".into(),
            },
            filters: vec![],
        },
        to_web(3),
        WeightedBackend {
            weight: 1,
            target: BackendTarget::Invalid {
                reason: "one".into(),
            },
            filters: vec![],
        },
    ];
    let mut counts = [0; 3];
    for r in 0..400u64 {
        let b = choose(&backends, r).unwrap();
        let i = backends.iter().position(|x| std::ptr::eq(x, b)).unwrap();
        counts[i] += 1;
    }
    assert_eq!(counts, [0, 300, 100]);
    assert!(choose(&[to_web(0)], 7).is_none());
    assert!(choose(&[], 7).is_none());
}

/// An HTTP/2 backend answering every request with `grpc-status: 0` in the trailers.
async fn grpc_backend() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = service_fn(|req: Request<hyper::body::Incoming>| async move {
                    let te = req.headers().get("te").cloned();
                    let got = req.into_body().collect().await.unwrap();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().unwrap());
                    let body = Replay {
                        data: Some(got.to_bytes()),
                        trailers: Some(trailers),
                    };
                    let mut resp = Response::new(body);
                    resp.headers_mut()
                        .insert("content-type", "application/grpc".parse().unwrap());
                    if let Some(te) = te {
                        resp.headers_mut().insert("x-seen-te", te);
                    }
                    Ok::<_, Infallible>(resp)
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn grpc_over_h2c_passes_trailers_both_ways() {
    let b = grpc_backend().await;
    let mut c = config(&[b], None, Resilience::default());
    c.frontends[0].protocol = AppProtocol::Grpc;
    c.services[0].protocol = AppProtocol::Grpc;
    let h = harness_with(c, AppProtocol::Grpc).await;
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::post("http://web.default:80/pkg.Echo/Say")
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from_static(b"\0\0\0\0\x02hi")))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["x-seen-te"], "trailers");
    let collected = resp.into_body().collect().await.unwrap();
    assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
    assert_eq!(collected.to_bytes().as_ref(), b"\0\0\0\0\x02hi");
    // Metrics are recorded when the response body ends.
    let m = h.metrics();
    assert!(m.contains("grpc_response_status=\"0\""), "{m}");
    assert!(m.contains("request_protocol=\"grpc\""), "{m}");
}

#[tokio::test]
async fn upgrade_is_tunnelled() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // A backend that switches protocols and then echoes.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let b = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let svc = service_fn(|mut req: Request<hyper::body::Incoming>| async move {
            assert_eq!(req.headers()["upgrade"], "echo");
            let on = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let mut io = TokioIo::new(on.await.unwrap());
                let mut buf = [0u8; 5];
                io.read_exact(&mut buf).await.unwrap();
                io.write_all(&buf).await.unwrap();
            });
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            resp.headers_mut()
                .insert("upgrade", "echo".parse().unwrap());
            resp.headers_mut()
                .insert("connection", "upgrade".parse().unwrap());
            Ok::<_, Infallible>(resp)
        });
        let _ = hyper::server::conn::http1::Builder::new()
            .serve_connection(TokioIo::new(stream), svc)
            .with_upgrades()
            .await;
    });
    let h = harness(config(&[b], None, Resilience::default())).await;
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn.with_upgrades());
    let req = Request::get("/ws")
        .header("host", "web")
        .header("connection", "Upgrade")
        .header("upgrade", "echo")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let mut resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut io = TokioIo::new(hyper::upgrade::on(&mut resp).await.unwrap());
    io.write_all(b"hello").await.unwrap();
    let mut buf = [0u8; 5];
    tokio::time::timeout(Duration::from_secs(5), io.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"hello");
}

#[tokio::test]
async fn oversized_head_gets_431() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness(config(&[], None, Resilience::default())).await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let big = "a".repeat(40_000);
    let req = format!("GET / HTTP/1.1\r\nhost: web\r\nx-big: {big}\r\n\r\n");
    let _ = s.write_all(req.as_bytes()).await;
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 431"),
        "{:?}",
        String::from_utf8_lossy(&buf[..n])
    );
}

#[tokio::test]
async fn mirror_gets_a_copy_and_retry_replays_the_body() {
    let primary = backend(script(|n| {
        let s = if n == 0 {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::OK
        };
        (s, Duration::ZERO)
    }))
    .await;
    let mirror = backend(script(|_| (StatusCode::IM_A_TEAPOT, Duration::ZERO))).await;
    let mirror_ref = ServicePortRef {
        service: obj("shadow"),
        port: 80,
    };
    let mut r = rule(vec![to_web(1)]);
    r.retry = Some(RetryPolicy {
        attempts: 1,
        codes: vec![503],
        backoff_ms: 1,
    });
    r.filters = vec![Filter::RequestMirror(mesh_common::l7::Mirror {
        target: BackendTarget::Service(mirror_ref.clone()),
        fraction_ppm: 1_000_000,
    })];
    let mut c = config(&[primary.addr], Some(r), Resilience::default());
    let mut shadow = c.services[0].clone();
    shadow.target = mirror_ref;
    shadow.host = "shadow.default.svc.cluster.local".into();
    shadow.endpoints[0].port = mirror.addr.port();
    c.services.push(shadow);
    let h = harness(c).await;

    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::post("/submit")
        .header("host", "web")
        .body(Full::new(Bytes::from_static(b"payload")))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(primary.requests.load(Ordering::SeqCst), 2);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while mirror.requests.load(Ordering::SeqCst) == 0 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(mirror.requests.load(Ordering::SeqCst), 1);
}

#[test]
fn snapshot_keeps_service_state_across_versions() {
    let settings = Settings {
        connect_timeout: Duration::from_secs(1),
        idle_timeout: Duration::from_secs(1),
    };
    let a: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let first = Snapshot::build(
        Arc::new(config(&[a], None, Resilience::default())),
        None,
        settings,
    );
    let mut next = config(&[a], None, Resilience::default());
    next.version = 2;
    let second = Snapshot::build(Arc::new(next.clone()), Some(&first), settings);
    let (t1, t2) = (&first.targets[&port_ref()], &second.targets[&port_ref()]);
    assert!(Arc::ptr_eq(&t1.pool, &t2.pool));
    assert!(Arc::ptr_eq(&t1.balancer, &t2.balancer));
    assert!(Arc::ptr_eq(&t1.budget, &t2.budget));
    // A Service port that goes away and comes back starts fresh.
    next.services.clear();
    let third = Snapshot::build(Arc::new(next.clone()), Some(&second), settings);
    assert!(third.targets.is_empty());
    let fourth = Snapshot::build(
        Arc::new(config(&[a], None, Resilience::default())),
        Some(&third),
        settings,
    );
    assert!(!Arc::ptr_eq(&fourth.targets[&port_ref()].pool, &t1.pool));
}

#[tokio::test]
async fn connect_timeout_resets_the_client_without_an_answer() {
    // A listener that never accepts, its queue filled: further SYNs are dropped, as a
    // policy drop would, so connects hang.
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    full.listen(0).unwrap();
    let addr = full.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..16 {
        match tokio::time::timeout(
            Duration::from_millis(200),
            tokio::net::TcpStream::connect(addr),
        )
        .await
        {
            Ok(Ok(s)) => fillers.push(s),
            _ => break,
        }
    }
    let settings = Settings {
        connect_timeout: Duration::from_millis(300),
        idle_timeout: Duration::from_secs(30),
    };
    let h = harness_settings(
        config(&[addr], None, Resilience::default()),
        AppProtocol::Http,
        settings,
    )
    .await;
    let got = h.get("/").await.map(|r| r.status());
    assert!(got.is_none(), "the client gets no HTTP answer: {got:?}");
}

#[test]
fn denied_and_timed_out_connects_reset_the_client() {
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let denied = std::io::Error::from_raw_os_error(libc::EPERM);
    assert!(crate::sys::is_denied(&denied));
    let e = UpstreamError::Denied {
        addr,
        pod: "p".into(),
        source: denied,
    };
    assert!(e.resets_client());
    let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
    assert!(!crate::sys::is_denied(&refused));
    assert!(
        !UpstreamError::Connect {
            addr,
            pod: "p".into(),
            source: refused
        }
        .resets_client()
    );
    assert!(
        UpstreamError::ConnectTimeout {
            addr,
            pod: "p".into(),
            after: Duration::ZERO
        }
        .resets_client()
    );
}

#[tokio::test]
async fn slow_head_is_cut_off_after_the_header_read_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness(config(&[], None, Resilience::default())).await;
    let mut s = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nhost: web\r\n")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let mut buf = vec![0u8; 256];
    // The harness allows 2 s for a head; the connection ends (maybe after a 408).
    let closed = tokio::time::timeout(Duration::from_secs(6), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection still open after 6 s");
    assert!(started.elapsed() >= Duration::from_millis(1500));
}

#[tokio::test]
async fn http_frontend_speaks_h2_to_the_backend_when_the_client_does() {
    // `http` ports: HTTP/2 prior knowledge from the client is passed on as HTTP/2.
    let b = grpc_backend().await;
    let h = harness(config(&[b], None, Resilience::default())).await;
    let stream = tokio::net::TcpStream::connect(h.addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = Request::get("http://web.default/x")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.version(), http::Version::HTTP_2);
}

/// A request the client sent on a connection accepted just before shutdown is served
/// (with `Connection: close`), not dropped unread.
#[tokio::test]
async fn shutdown_serves_a_request_already_sent() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let b = backend(script(|_| (StatusCode::OK, Duration::ZERO))).await;
    let h = harness(config(&[b.addr], None, Resilience::default())).await;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut client = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    client
        .write_all(b"GET /late HTTP/1.1\r\nhost: web.default:80\r\n\r\n")
        .await
        .unwrap();
    let (stream, _) = listener.accept().await.unwrap();
    let drain = Drain::new();
    let watcher = drain.watcher();
    let shutdown = tokio::spawn(drain.shutdown());
    tokio::task::yield_now().await;
    let conn = Arc::new(Conn {
        proxy: Arc::clone(&h.proxy),
        source: client_source(),
        dst: VIP.parse().unwrap(),
    });
    let limits = Limits {
        max_header_bytes: 16384,
        header_read_timeout: Duration::from_secs(2),
        max_concurrent_streams: 16,
        idle_timeout: Duration::from_secs(30),
    };
    tokio::spawn(server::serve(
        stream,
        conn,
        AppProtocol::Http,
        limits,
        watcher,
    ));
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), client.read_to_end(&mut answer))
        .await
        .expect("the proxy answers and closes in time")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).to_ascii_lowercase();
    assert!(answer.starts_with("http/1.1 200"), "{answer}");
    assert!(answer.contains("connection: close"), "{answer}");
    tokio::time::timeout(Duration::from_secs(5), shutdown)
        .await
        .expect("the drain ends with the connection")
        .unwrap();
}
