//! Arbitrary bytes as a request head on the admin socket: read with httparse, as
//! hyper's HTTP/1 server reads it, and answered by the agent's own handler
//! ([`mesh_agent::admin::handle`]) with stored flows and a policy view in place.
//!
//! The answer must follow the API: `GET /v1/flows` serves exactly the stored flows its
//! query selects (and, with `follow`, then every new one that matches, until the agent
//! stops) or a 400 naming the problem; `GET /v1/policy` serves the view's report;
//! `GET /v1/proxy/config` the published proxy configuration line until the agent stops;
//! anything else is a 404. A query that parses must survive the trip through
//! [`FlowQuery::to_query`] into the request line `mesh-agent observe` sends.

#![no_main]

#[path = "fixture.rs"]
mod fixture;

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use hyper::{Method, Request, StatusCode, Uri, header};
use libfuzzer_sys::fuzz_target;
use mesh_agent::admin::{ApiBody, FlowQuery, handle};
use mesh_agent::flows::{FlowLog, SharedView};
use mesh_agent::plan::routes::RouteStatus;
use mesh_agent::proxyfeed::ProxyFeed;
use mesh_agent::report::PolicyReport;
use mesh_agent::report::{Direction, Flow, Peer, Reason, Verdict};
use mesh_agent::source::{SourceKind, SourceStatus};
use mesh_agent::telemetry::AgentStatus;
use tokio::sync::watch;

/// Header slots, as many as a request may carry here (hyper's default is 100; more
/// only repeat work).
const MAX_HEADERS: usize = 32;

/// The view of a small cluster with policies, as the reconciler publishes it.
static VIEW: LazyLock<SharedView> = LazyLock::new(|| {
    let view = SharedView::default();
    view.publish(fixture::view(&BTreeMap::new()));
    view
});

fuzz_target!(|head: &[u8]| {
    let Some(request) = request(head) else {
        return;
    };
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(check(request));
});

/// The request hyper would hand the service for `head`, if it would hand over any.
fn request(head: &[u8]) -> Option<Request<()>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    if !parsed.parse(head).ok()?.is_complete() {
        return None;
    }
    let mut builder = Request::builder()
        .method(parsed.method?)
        .uri(parsed.path?)
        .version(match parsed.version? {
            0 => hyper::Version::HTTP_10,
            _ => hyper::Version::HTTP_11,
        });
    for h in parsed.headers.iter() {
        builder = builder.header(h.name, h.value);
    }
    builder.body(()).ok()
}

/// A flow from `source` to `destination` (pods, `namespace/name`).
fn flow(time: &str, verdict: Verdict, source: Option<&str>, destination: Option<&str>) -> Flow {
    let peer = |pod: Option<&str>, identity| Peer {
        ip: Some(std::net::IpAddr::from([10, 244, 1, identity as u8])),
        port: 8080,
        identity,
        identity_name: format!("identity {identity}"),
        pod: pod.map(str::to_owned),
        labels: BTreeMap::new(),
    };
    Flow {
        time: time.to_owned(),
        verdict,
        direction: Direction::Egress,
        reason: Some(Reason::PolicyDenied),
        proto: "TCP".to_owned(),
        source: peer(source, 256),
        destination: peer(destination, 257),
        policies: Vec::new(),
        source_principal: None,
        destination_principal: None,
    }
}

/// Flows already stored when the request comes.
fn stored() -> Vec<Flow> {
    vec![
        flow(
            "1",
            Verdict::Dropped,
            Some("prod/client"),
            Some("prod/db-1"),
        ),
        flow("2", Verdict::Audit, Some("prod/client"), None),
        flow("3", Verdict::Forwarded, None, Some("ops/probe")),
        flow("4", Verdict::Dropped, Some("a b/c+d"), Some("x/%")),
    ]
}

/// Flows that arrive while a follower is connected.
fn live() -> Vec<Flow> {
    vec![
        flow("5", Verdict::Audit, Some("prod/db-1"), Some("prod/client")),
        flow("6", Verdict::Dropped, None, Some("x/%")),
    ]
}

/// The agent's status as the handler is given it.
const STATUS: AgentStatus = AgentStatus {
    ready: true,
    applied: 3,
    reconcile_errors: 1,
    last_reconcile_ok: true,
    source: SourceStatus {
        kind: SourceKind::Etcd,
        stale: true,
        stale_since: Some(1_700_000_000),
        revision: 42,
        applied_revision: 41,
        rejected_objects: 1,
    },
    last_plan_us: 1_500,
    last_apply_us: 200,
};

async fn check(request: Request<()>) {
    let (method, path) = (request.method().clone(), request.uri().path().to_owned());
    let query = request.uri().query().unwrap_or_default().to_owned();
    let log = Arc::new(FlowLog::default());
    for f in stored() {
        log.push(f);
    }
    let (stop, stopping) = watch::channel(false);
    let feed = ProxyFeed::default();
    feed.publish(mesh_common::l7::ProxyConfig::default());
    let proxy = feed.subscribe();
    let Ok(response) = handle(request, VIEW.clone(), log.clone(), proxy, STATUS, stopping).await;
    let (parts, mut body) = response.into_parts();
    let content_type = parts
        .headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.as_bytes());
    match (method == Method::GET, path.as_str()) {
        (true, "/v1/flows") => match FlowQuery::parse(&query) {
            Err(problem) => {
                assert_eq!(parts.status, StatusCode::BAD_REQUEST);
                assert_eq!(text(&mut body).await, format!("{problem}\n"));
            }
            Ok(q) => {
                assert_eq!(parts.status, StatusCode::OK, "query {query:?}");
                assert_eq!(content_type, Some(&b"application/x-ndjson"[..]));
                check_round_trip(&q);
                let mut expected: Vec<Flow> = stored()
                    .into_iter()
                    .filter(|f| q.filter.matches(f))
                    .collect();
                if q.follow {
                    for f in live() {
                        if q.filter.matches(&f) {
                            expected.push(f.clone());
                        }
                        log.push(f);
                    }
                }
                let served = flows(&mut body, expected.len()).await;
                assert_eq!(served, expected, "query {query:?}");
                if q.follow {
                    // The agent stops: the stream ends, with nothing more.
                    stop.send(true).expect("the follower is listening");
                    assert_eq!(text(&mut body).await, "", "query {query:?}");
                }
            }
        },
        (true, "/v1/policy") => {
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(content_type, Some(&b"application/json"[..]));
            let report: PolicyReport =
                serde_json::from_str(&text(&mut body).await).expect("report JSON");
            assert_eq!(&report, VIEW.get().report());
        }
        (true, "/v1/status") => {
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(content_type, Some(&b"application/json"[..]));
            let status: AgentStatus =
                serde_json::from_str(&text(&mut body).await).expect("status JSON");
            assert_eq!(status, STATUS);
        }
        (true, "/v1/routes") => {
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(content_type, Some(&b"application/json"[..]));
            let routes: Vec<RouteStatus> =
                serde_json::from_str(&text(&mut body).await).expect("routes JSON");
            assert_eq!(routes.as_slice(), VIEW.get().routes());
        }
        (true, "/v1/proxy/config") => {
            assert_eq!(parts.status, StatusCode::OK);
            assert_eq!(content_type, Some(&b"application/x-ndjson"[..]));
            let ApiBody::Stream(rx) = &mut body else {
                panic!("the proxy configuration is streamed");
            };
            let first = rx.recv().await.expect("the current snapshot at once");
            let snapshot = feed.subscribe().borrow().clone().expect("published");
            assert_eq!(first, snapshot.line);
            stop.send(true).expect("the follower is listening");
            assert_eq!(text(&mut body).await, "");
        }
        _ => {
            assert_eq!(parts.status, StatusCode::NOT_FOUND, "{method} {path}");
        }
    }
}

/// A parsed query, written back the way the client writes it, is a valid request
/// target that reads back the same.
fn check_round_trip(q: &FlowQuery) {
    let written = q.to_query();
    let target = format!("/v1/flows?{written}");
    let uri: Uri = target
        .parse()
        .unwrap_or_else(|e| panic!("{target:?} is not a request target: {e}"));
    assert_eq!(uri.query().unwrap_or_default(), written, "{target:?}");
    assert_eq!(FlowQuery::parse(&written).as_ref(), Ok(q), "{target:?}");
}

/// The whole body: a full one, or a stream read to its end.
async fn text(body: &mut ApiBody) -> String {
    let mut out = Vec::new();
    match body {
        ApiBody::Full(bytes) => out.extend(bytes.take().into_iter().flatten()),
        ApiBody::Stream(rx) => {
            while let Some(chunk) = rx.recv().await {
                out.extend(chunk);
            }
        }
    }
    String::from_utf8(out).expect("UTF-8 body")
}

/// NDJSON flows: all of a full body, or the first `count` lines of a stream.
async fn flows(body: &mut ApiBody, count: usize) -> Vec<Flow> {
    let mut out = String::new();
    match body {
        ApiBody::Full(_) => out = text(body).await,
        ApiBody::Stream(rx) => {
            while out.lines().count() < count {
                let chunk = rx.recv().await.expect("the stream ended early");
                out.push_str(std::str::from_utf8(&chunk).expect("UTF-8 chunk"));
            }
        }
    }
    out.lines()
        .map(|line| serde_json::from_str(line).expect("a flow per line"))
        .collect()
}
