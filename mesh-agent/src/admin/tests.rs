use std::collections::BTreeMap;

use super::*;
use crate::report::{Direction, Peer, PolicyReport, Reason};

#[test]
fn flow_queries_parse_and_round_trip() {
    let q = FlowQuery::parse("follow=true&verdict=DROPPED&pod=prod%2Fweb-1").expect("parse");
    assert!(q.follow);
    assert_eq!(q.filter.verdict, Some(Verdict::Dropped));
    assert_eq!(q.filter.pod.as_deref(), Some("prod/web-1"));
    assert_eq!(FlowQuery::parse(&q.to_query()), Ok(q));
    assert_eq!(FlowQuery::parse(""), Ok(FlowQuery::default()));
    for bad in ["verdict=forwarded", "pod=web", "follow=maybe", "colour=red"] {
        assert!(FlowQuery::parse(bad).is_err(), "{bad} accepted");
    }
}

/// Found by `cargo xtask fuzz admin`: `pod=x%2F+` read back as the pod "x/ ", which
/// `to_query` wrote raw into the request line `mesh-agent observe` sends ("x/ " broke
/// it; a `+` came back as a space, a `#` cut the query off).
#[test]
fn written_queries_are_request_targets_that_read_back_the_same() {
    let q = FlowQuery::parse("follow=true&pod=x%2F+").expect("parse");
    assert_eq!(q.filter.pod.as_deref(), Some("x/ "));
    for pod in ["x/ ", "a+b/c d", "ns/#frag", "ns/100%", "a&b=c/\u{1}é\r\n"] {
        let q = FlowQuery {
            follow: false,
            filter: FlowFilter {
                verdict: None,
                pod: Some(pod.to_owned()),
            },
        };
        let target = format!("/v1/flows?{}", q.to_query());
        let uri: hyper::Uri = target.parse().expect("a valid request target");
        assert_eq!(uri.query().map(FlowQuery::parse), Some(Ok(q)), "{target}");
    }
    assert_eq!(
        FlowQuery::parse("pod=prod/web-1")
            .expect("parse")
            .to_query(),
        "pod=prod/web-1",
        "plain names stay readable"
    );
    // Only two hex digits make an escape ("%+1" was read as byte 1).
    let q = FlowQuery::parse("pod=a/%+1%4").expect("parse");
    assert_eq!(q.filter.pod.as_deref(), Some("a/% 1%4"));
}

#[tokio::test]
async fn serves_flows_policy_and_follows_over_the_socket() {
    let dir = std::env::temp_dir().join(format!("mesh-admin-test-{}", std::process::id()));
    let server = bind(&dir, "n1").expect("bind");
    let path = server.path().to_owned();
    assert_eq!(
        std::fs::metadata(dir.join("n1"))
            .expect("dir")
            .permissions()
            .mode()
            & 0o777,
        0o700
    );
    let log = Arc::new(FlowLog::default());
    let view = SharedView::default();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let telemetry = Arc::new(crate::telemetry::Telemetry::new(dir.join("no-datapath")));
    let feed = crate::proxyfeed::ProxyFeed::default();
    let task = tokio::spawn(server.run(
        view,
        log.clone(),
        telemetry.clone(),
        feed.subscribe(),
        async {
            let _ = stopped.await;
        },
    ));
    let sample = |time: &str| Flow {
        source_principal: None,
        destination_principal: None,
        time: time.into(),
        verdict: Verdict::Dropped,
        direction: Direction::Egress,
        reason: Some(Reason::PolicyDenied),
        proto: "TCP".into(),
        source: Peer {
            ip: None,
            port: 0,
            identity: 256,
            identity_name: "prod {app=client}".into(),
            pod: Some("prod/client".into()),
            labels: BTreeMap::new(),
        },
        destination: Peer {
            ip: Some("10.244.1.11".parse().expect("ip")),
            port: 8081,
            identity: 257,
            identity_name: "prod {app=db}".into(),
            pod: Some("prod/db".into()),
            labels: BTreeMap::new(),
        },
        policies: vec!["prod/client-egress".into()],
    };
    log.push(sample("1"));

    // The blocking client, as the CLI uses it, on a blocking thread.
    let p = path.clone();
    let report = tokio::task::spawn_blocking(move || client::policy_report(&p))
        .await
        .expect("join")
        .expect("report");
    assert_eq!(report, PolicyReport::default());

    // Readiness: not before the datapath is attached; every apply counted.
    let status = |p: PathBuf| async move {
        let body = tokio::task::spawn_blocking(move || get(&p, "/v1/status"))
            .await
            .expect("join");
        serde_json::from_str::<AgentStatus>(&body).expect("status JSON")
    };
    assert_eq!(status(path.clone()).await, AgentStatus::default());
    telemetry.applied(&[]);
    telemetry.attached();
    telemetry.failed();
    telemetry.applied(&[]);
    let want = AgentStatus {
        ready: true,
        applied: 2,
        reconcile_errors: 1,
        last_reconcile_ok: true,
        ..AgentStatus::default()
    };
    assert_eq!(status(path.clone()).await, want);

    let p = path.clone();
    let follower = tokio::task::spawn_blocking(move || {
        use std::io::BufRead as _;
        let query = FlowQuery {
            follow: true,
            filter: FlowFilter {
                verdict: Some(Verdict::Dropped),
                pod: Some("prod/db".into()),
            },
        };
        let mut s = std::os::unix::net::UnixStream::connect(&p).expect("connect");
        std::io::Write::write_all(
            &mut s,
            format!(
                "GET /v1/flows?{} HTTP/1.1\r\nHost: x\r\n\r\n",
                query.to_query()
            )
            .as_bytes(),
        )
        .expect("write");
        let reader = std::io::BufReader::new(s);
        // Headers, then chunk-size/data lines: collect the JSON lines until two came.
        reader
            .lines()
            .map_while(Result::ok)
            .filter(|l| l.starts_with('{'))
            .take(2)
            .collect::<Vec<_>>()
    });
    // Give the follower time to subscribe; a flow pushed before is in its backlog anyway.
    tokio::time::sleep(Duration::from_millis(200)).await;
    log.push(sample("2"));
    let lines = tokio::time::timeout(Duration::from_secs(5), follower)
        .await
        .expect("follow in time")
        .expect("join");
    let times: Vec<String> = lines
        .iter()
        .map(|l| serde_json::from_str::<Flow>(l).expect("flow").time)
        .collect();
    assert_eq!(times, ["1", "2"]);

    stop.send(()).expect("running");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean");
    assert!(!path.exists(), "socket removed on exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_the_proxy_configuration_as_it_changes() {
    use mesh_common::l7::ProxyConfig;
    use std::io::BufRead as _;

    let dir = std::env::temp_dir().join(format!("mesh-admin-proxy-{}", std::process::id()));
    let server = bind(&dir, "n1").expect("bind");
    let path = server.path().to_owned();
    let feed = crate::proxyfeed::ProxyFeed::default();
    let telemetry = Arc::new(crate::telemetry::Telemetry::new(dir.join("no-datapath")));
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(server.run(
        SharedView::default(),
        Arc::new(FlowLog::default()),
        telemetry,
        feed.subscribe(),
        async {
            let _ = stopped.await;
        },
    ));
    let config = |node: &str| ProxyConfig {
        node: node.into(),
        ..ProxyConfig::default()
    };
    feed.publish(config("first"));

    // The client as tests and `mesh-agent proxy-config` use it: the current snapshot.
    let p = path.clone();
    let current = tokio::task::spawn_blocking(move || client::proxy_config(&p))
        .await
        .expect("join")
        .expect("snapshot");
    assert_eq!((current.version, current.node.as_str()), (1, "first"));

    let p = path.clone();
    let (lines_tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    let reader = tokio::task::spawn_blocking(move || {
        let mut s = std::os::unix::net::UnixStream::connect(&p).expect("connect");
        std::io::Write::write_all(&mut s, b"GET /v1/proxy/config HTTP/1.1\r\nHost: x\r\n\r\n")
            .expect("write");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut head = String::new();
        let reader = std::io::BufReader::new(s);
        // Headers, then chunk-size/data lines: pass on the JSON lines as they come.
        for line in reader.lines().map_while(Result::ok) {
            if line.starts_with('{') {
                if lines_tx.send(line).is_err() {
                    break;
                }
            } else if line.starts_with("HTTP/")
                || line.to_ascii_lowercase().starts_with("content-type")
            {
                head.push_str(&line);
                head.push('\n');
            }
        }
        head
    });
    let next = async |lines: &mut tokio::sync::mpsc::UnboundedReceiver<String>| {
        let line = tokio::time::timeout(Duration::from_secs(5), lines.recv())
            .await
            .expect("a line in time")
            .expect("stream open");
        serde_json::from_str::<ProxyConfig>(&line).expect("a configuration per line")
    };
    // At once: the current snapshot.
    assert_eq!(next(&mut lines).await.node, "first");
    // An equal configuration is not a change; a different one is the next line.
    assert_eq!(feed.publish(config("first")), None);
    assert_eq!(feed.publish(config("second")), Some(2));
    let second = next(&mut lines).await;
    assert_eq!((second.version, second.node.as_str()), (2, "second"));

    // Other requests are served meanwhile.
    let p = path.clone();
    let status = tokio::task::spawn_blocking(move || get(&p, "/v1/status"))
        .await
        .expect("join");
    assert!(status.starts_with('{'), "{status}");

    // The agent stops: the stream ends.
    stop.send(()).expect("running");
    let head = tokio::time::timeout(Duration::from_secs(5), reader)
        .await
        .expect("stream ended")
        .expect("join");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/x-ndjson"), "{head}");
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .expect("stops")
        .expect("join")
        .expect("clean");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_live_socket_is_not_taken_over() {
    let dir = std::env::temp_dir().join(format!("mesh-admin-live-{}", std::process::id()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    rt.block_on(async {
        let first = bind(&dir, "n1").expect("bind");
        assert!(matches!(bind(&dir, "n1"), Err(AdminError::InUse(_))));
        drop(first);
        // A socket file nobody answers on (an agent that was killed) is replaced.
        std::fs::create_dir_all(dir.join("n1")).expect("dir");
        let stale = std::os::unix::net::UnixListener::bind(socket_path(&dir, "n1")).expect("stale");
        drop(stale);
        let again = bind(&dir, "n1").expect("rebind over a stale socket");
        drop(again);
    });
    let _ = std::fs::remove_dir_all(&dir);
}

/// The body of `GET <uri>` on the admin socket `socket` (the connection closed after it).
fn get(socket: &Path, uri: &str) -> String {
    use std::io::{Read as _, Write as _};
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("connect");
    write!(
        s,
        "GET {uri} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .expect("write");
    let mut response = String::new();
    s.read_to_string(&mut response).expect("read");
    let (head, body) = response.split_once("\r\n\r\n").expect("header end");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    body.to_owned()
}

#[tokio::test]
async fn routes_are_served_from_the_published_view() {
    use crate::plan::routes::{Condition, ParentStatus, RouteStatus};
    let condition = |reason: &str| Condition {
        status: true,
        reason: reason.into(),
        message: String::new(),
    };
    let routes = vec![RouteStatus {
        route: mesh_common::l7::ObjectRef {
            namespace: "shop".into(),
            name: "split".into(),
        },
        parents: vec![ParentStatus {
            service: mesh_common::l7::ObjectRef {
                namespace: "shop".into(),
                name: "web".into(),
            },
            kind: "Service".into(),
            port: Some(80),
            attached_ports: vec![80],
            accepted: condition("Accepted"),
            resolved_refs: condition("ResolvedRefs"),
        }],
    }];
    let view = SharedView::default();
    view.publish(crate::flows::View::default().with_routes(routes.clone()));
    let request = hyper::Request::get("/v1/routes").body(()).expect("request");
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let feed = crate::proxyfeed::ProxyFeed::default();
    let response = handle(
        request,
        view,
        Arc::new(FlowLog::default()),
        feed.subscribe(),
        AgentStatus::default(),
        stopping,
    )
    .await
    .expect("infallible");
    assert_eq!(response.status(), hyper::StatusCode::OK);
    let ApiBody::Full(Some(body)) = response.into_body() else {
        panic!("a whole body");
    };
    let served: Vec<RouteStatus> = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(served, routes);
}
