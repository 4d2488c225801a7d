//! `http-server`: HTTP/1.1 and h2c (prior knowledge) on one port, answering every
//! request with what it saw ([`HttpEcho`]), plus behaviours chosen by path for the L7
//! tests (status codes, delays, streams, trailers, upgrades, an aborted response, a
//! flaky and a slow mode).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::{Context, Result};
use bytes::Bytes;
use clap::Args;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use mesh_tests::l7::{HttpEcho, HttpStats, MAX_DELAY_MS, MAX_STREAM_CHUNKS};
use mesh_tests::testpod::READY_LINE;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::l7_runtime::{listen, runtime};

/// Largest request body read (a bigger one is answered 413).
const MAX_BODY: usize = 16 << 20;
/// How long an upgraded (`mesh-echo`) connection may stay idle.
const UPGRADE_IDLE: Duration = Duration::from_secs(30);
/// The protocol `/upgrade` switches to: raw echo.
const UPGRADE_PROTOCOL: &str = "mesh-echo";
/// Default pause between two chunks of `/stream/{n}`.
const STREAM_INTERVAL: Duration = Duration::from_millis(10);

/// The body length `/reset` announces (and does not send).
const RESET_LENGTH: u64 = 1 << 20;
/// How long `/reset` waits between its first bytes and the abort.
const RESET_PAUSE: Duration = Duration::from_millis(200);

type Body = BoxBody<Bytes, Infallible>;

/// Arguments of `http-server`.
#[derive(Args)]
pub struct HttpServerArgs {
    /// Address to listen on; `[::]:PORT` accepts IPv4 too.
    #[arg(long)]
    listen: SocketAddr,
    /// Pod name reported in every answer and in the `x-pod` header.
    #[arg(long)]
    name: String,
    /// Every N-th request (the N-th, 2N-th, … counted from the first) answers
    /// `--fail-status` instead.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
    fail_every: Option<u64>,
    /// The first N requests answer `--fail-status`.
    #[arg(long, default_value_t = 0)]
    fail_first: u64,
    /// Bind with SO_REUSEPORT, so that a successor can listen before this one exits.
    #[arg(long)]
    reuse_port: bool,
    /// Status of the failed requests.
    #[arg(long, default_value_t = 503, value_parser = clap::value_parser!(u16).range(200..=599))]
    fail_status: u16,
    /// The first N requests wait `--slow-ms` before they are handled (a stalled
    /// backend, for per-attempt timeouts).
    #[arg(long, default_value_t = 0)]
    slow_first: u64,
    /// How long the `--slow-first` requests wait (bounded by the longest `/delay`).
    #[arg(long, default_value_t = 5000)]
    slow_ms: u64,
}

/// What every connection shares.
struct Server {
    name: String,
    pod_header: HeaderValue,
    fail_every: Option<u64>,
    fail_first: u64,
    fail_status: StatusCode,
    slow_first: u64,
    slow: Duration,
    /// Requests served, /stats excepted.
    served: AtomicU64,
}

/// What becomes of one request, by its number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Fate {
    /// Answer `--fail-status`.
    fail: bool,
    /// Wait `--slow-ms` first.
    slow: bool,
}

impl Server {
    /// Counts one request and says what becomes of it.
    fn count_and_judge(&self) -> Fate {
        let n = self.served.fetch_add(1, Ordering::Relaxed) + 1;
        Fate {
            fail: n <= self.fail_first
                || self.fail_every.is_some_and(|every| n.is_multiple_of(every)),
            slow: n <= self.slow_first,
        }
    }
}

/// Runs the server until killed.
pub fn run(args: &HttpServerArgs) -> Result<()> {
    let server = Arc::new(Server {
        name: args.name.clone(),
        pod_header: HeaderValue::from_str(&args.name)
            .with_context(|| format!("--name {:?} is not a valid header value", args.name))?,
        fail_every: args.fail_every,
        fail_first: args.fail_first,
        fail_status: StatusCode::from_u16(args.fail_status).context("--fail-status")?,
        slow_first: args.slow_first,
        slow: Duration::from_millis(args.slow_ms.min(MAX_DELAY_MS)),
        served: AtomicU64::new(0),
    });
    runtime()?.block_on(async move {
        let listener = listen(args.listen, args.reuse_port)?;
        println!("{READY_LINE}");
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(conn) => conn,
                Err(e) => {
                    eprintln!("http-server: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            // An IPv4 client of a dual-stack listener is reported as itself, not as
            // `::ffff:a.b.c.d`.
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            let server = Arc::clone(&server);
            tokio::spawn(serve_connection(server, stream, peer));
        }
    })
}

async fn serve_connection(server: Arc<Server>, stream: TcpStream, peer: SocketAddr) {
    let _ = stream.set_nodelay(true);
    let service = service_fn(move |req| {
        let server = Arc::clone(&server);
        async move { Ok::<_, Infallible>(handle(&server, req, peer).await) }
    });
    let builder = auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder
        .serve_connection_with_upgrades(TokioIo::new(stream), service)
        .await
    {
        eprintln!("http-server: connection from {peer}: {e}");
    }
}

/// Answers one request; never fails (a bad request gets a 4xx JSON answer).
async fn handle(server: &Server, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if path == "/stats" {
        let stats = HttpStats {
            requests: server.served.load(Ordering::Relaxed),
        };
        return json_response(server, StatusCode::OK, &stats);
    }
    let fate = server.count_and_judge();
    if fate.slow {
        tokio::time::sleep(server.slow).await;
    }
    let fail = fate.fail;
    if path == "/upgrade" && !fail && is_upgrade(req.headers()) {
        return upgrade(server, req);
    }
    let mut echo = HttpEcho {
        pod: server.name.clone(),
        method: req.method().to_string(),
        path: path.clone(),
        query: req.uri().query().unwrap_or_default().to_owned(),
        version: format!("{:?}", req.version()),
        authority: req
            .uri()
            .authority()
            .map(ToString::to_string)
            .or_else(|| header_str(req.headers(), header::HOST.as_str())),
        headers: headers_map(req.headers()),
        body_len: 0,
        peer: peer.to_string(),
        error: None,
    };
    let query = echo.query.clone();
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            echo.error = Some(format!("request body: {e}"));
            return json_response(server, StatusCode::PAYLOAD_TOO_LARGE, &echo);
        }
    };
    echo.body_len = body.len() as u64;
    if fail {
        return json_response(server, server.fail_status, &echo);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    match segments.as_slice() {
        ["status", code] => match code.parse().ok().and_then(final_status) {
            Some(status) => json_response(server, status, &echo),
            None => bad_request(server, echo, format!("bad status code {code:?}")),
        },
        ["delay", ms] => match ms.parse::<u64>() {
            Ok(ms) => {
                tokio::time::sleep(Duration::from_millis(ms.min(MAX_DELAY_MS))).await;
                json_response(server, StatusCode::OK, &echo)
            }
            Err(_) => bad_request(server, echo, format!("bad delay {ms:?}")),
        },
        ["stream", n] => match n.parse::<u32>() {
            Ok(n) if n <= MAX_STREAM_CHUNKS => stream(server, &echo, n, &query),
            _ => bad_request(
                server,
                echo,
                format!("bad chunk count {n:?} (0..={MAX_STREAM_CHUNKS})"),
            ),
        },
        ["echo"] => with_pod(
            server,
            Response::builder()
                .status(StatusCode::OK)
                .header(header::CONTENT_TYPE, "application/octet-stream"),
            Full::new(body).boxed(),
        ),
        ["trailers"] => trailers(server, &echo),
        ["reset"] => reset(server, &echo),
        ["upgrade"] => bad_request(
            server,
            echo,
            format!("/upgrade needs HTTP/1.1 with `Upgrade: {UPGRADE_PROTOCOL}`"),
        ),
        _ => json_response(server, StatusCode::OK, &echo),
    }
}

/// A status a handler may answer with: 200..=599 (1xx are not final answers).
fn final_status(code: u16) -> Option<StatusCode> {
    (200..=599)
        .contains(&code)
        .then(|| StatusCode::from_u16(code).ok())
        .flatten()
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.get_all(header::UPGRADE).iter().any(|v| {
        v.as_bytes()
            .eq_ignore_ascii_case(UPGRADE_PROTOCOL.as_bytes())
    })
}

/// Answers 101 and echoes the raw bytes of the upgraded connection until EOF or idle.
fn upgrade(server: &Server, req: Request<Incoming>) -> Response<Body> {
    let on_upgrade = hyper::upgrade::on(req);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                if let Err(e) = echo_raw(TokioIo::new(upgraded)).await {
                    eprintln!("http-server: upgraded echo: {e}");
                }
            }
            Err(e) => eprintln!("http-server: upgrade: {e}"),
        }
    });
    with_pod(
        server,
        Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, UPGRADE_PROTOCOL),
        Full::new(Bytes::new()).boxed(),
    )
}

async fn echo_raw<T>(mut io: T) -> std::io::Result<()>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0; 16 * 1024];
    loop {
        let n = match tokio::time::timeout(UPGRADE_IDLE, io.read(&mut buf)).await {
            Ok(read) => read?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return io.shutdown().await;
        }
        io.write_all(&buf[..n]).await?;
    }
}

/// `/stream/{n}`: n NDJSON chunks (`{"pod":…,"chunk":i}`), `interval_ms` apart
/// (query parameter, default 10 ms, the whole stream bounded by [`MAX_DELAY_MS`]).
fn stream(server: &Server, echo: &HttpEcho, n: u32, query: &str) -> Response<Body> {
    let interval = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("interval_ms="))
        .and_then(|ms| ms.parse().ok())
        .map_or(STREAM_INTERVAL, Duration::from_millis)
        .min(Duration::from_millis(MAX_DELAY_MS) / n.max(1));
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(4);
    let pod = echo.pod.clone();
    tokio::spawn(async move {
        for i in 0..n {
            if i > 0 {
                tokio::time::sleep(interval).await;
            }
            let line = serde_json::json!({"pod": pod, "chunk": i}).to_string() + "\n";
            if tx.send(Ok(Frame::data(Bytes::from(line)))).await.is_err() {
                return; // The client went away.
            }
        }
    });
    with_pod(
        server,
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/x-ndjson"),
        StreamBody::new(ReceiverStream::new(rx)).boxed(),
    )
}

/// `/reset`: announces [`RESET_LENGTH`] bytes, sends the JSON answer (fewer), then
/// ends the body after a pause (so the head and the start are on the wire): the
/// connection is aborted mid-response, as a crashing backend does.
fn reset(server: &Server, echo: &HttpEcho) -> Response<Body> {
    let (tx, rx) = mpsc::channel::<Result<Frame<Bytes>, Infallible>>(1);
    let first = json_bytes(echo);
    tokio::spawn(async move {
        if tx.send(Ok(Frame::data(first))).await.is_ok() {
            tokio::time::sleep(RESET_PAUSE).await;
        }
    });
    with_pod(
        server,
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::CONTENT_LENGTH, RESET_LENGTH),
        StreamBody::new(ReceiverStream::new(rx)).boxed(),
    )
}

/// `/trailers`: the JSON answer followed by the trailer `x-trailer: yes`.
fn trailers(server: &Server, echo: &HttpEcho) -> Response<Body> {
    let mut trailers = HeaderMap::new();
    trailers.insert("x-trailer", HeaderValue::from_static("yes"));
    let frames: [Result<Frame<Bytes>, Infallible>; 2] = [
        Ok(Frame::data(json_bytes(echo))),
        Ok(Frame::trailers(trailers)),
    ];
    with_pod(
        server,
        Response::builder()
            .status(StatusCode::OK)
            .header(header::CONTENT_TYPE, "application/json")
            .header(header::TRAILER, "x-trailer"),
        StreamBody::new(tokio_stream::iter(frames)).boxed(),
    )
}

fn bad_request(server: &Server, mut echo: HttpEcho, error: String) -> Response<Body> {
    echo.error = Some(error);
    json_response(server, StatusCode::BAD_REQUEST, &echo)
}

fn json_bytes(value: &impl serde::Serialize) -> Bytes {
    let mut body = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!("{{\"error\":\"serialize: {e}\"}}").into_bytes() // Not reachable for our types.
    });
    body.push(b'\n');
    Bytes::from(body)
}

fn json_response(
    server: &Server,
    status: StatusCode,
    value: &impl serde::Serialize,
) -> Response<Body> {
    with_pod(
        server,
        Response::builder()
            .status(status)
            .header(header::CONTENT_TYPE, "application/json"),
        Full::new(json_bytes(value)).boxed(),
    )
}

/// Adds `x-pod` and builds; a builder error (impossible with our fixed headers) turns
/// into a bare 500 rather than a panic.
fn with_pod(server: &Server, builder: http::response::Builder, body: Body) -> Response<Body> {
    builder
        .header("x-pod", server.pod_header.clone())
        .body(body)
        .unwrap_or_else(|_| {
            let mut resp = Response::new(Full::new(Bytes::new()).boxed());
            *resp.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
            resp
        })
}

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// Header names (lowercase, as `http` stores them) to their values, in order.
fn headers_map(headers: &HeaderMap) -> std::collections::BTreeMap<String, Vec<String>> {
    let mut map = std::collections::BTreeMap::<String, Vec<String>>::new();
    for (name, value) in headers {
        map.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn server(fail_every: Option<u64>, fail_first: u64) -> Server {
        Server {
            name: "p".into(),
            pod_header: HeaderValue::from_static("p"),
            fail_every,
            fail_first,
            fail_status: StatusCode::SERVICE_UNAVAILABLE,
            slow_first: 1,
            slow: Duration::from_secs(1),
            served: AtomicU64::new(0),
        }
    }

    #[test]
    fn fail_every_fails_each_nth_request() {
        let s = server(Some(2), 0);
        let got: Vec<bool> = (0..6).map(|_| s.count_and_judge().fail).collect();
        assert_eq!(got, [false, true, false, true, false, true]);
    }

    #[test]
    fn fail_first_fails_the_first_requests() {
        let s = server(None, 2);
        let got: Vec<bool> = (0..4).map(|_| s.count_and_judge().fail).collect();
        assert_eq!(got, [true, true, false, false]);
    }

    #[test]
    fn slow_first_slows_the_first_requests() {
        let s = server(None, 0);
        let got: Vec<bool> = (0..3).map(|_| s.count_and_judge().slow).collect();
        assert_eq!(got, [true, false, false]);
    }

    #[test]
    fn only_final_statuses_are_answered() {
        assert_eq!(final_status(503), Some(StatusCode::SERVICE_UNAVAILABLE));
        assert_eq!(final_status(101), None);
        assert_eq!(final_status(600), None);
    }
}
