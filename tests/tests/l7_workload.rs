//! The L7 workload on its own (root only, no agent, no proxy): `mesh-testpod
//! http-server`, `grpc-server` and `grpc-client`, and curl, between pods of the bed.
//! The baseline the L7 tests compare the proxied behaviour against. Also the placement
//! of the node proxy (node netns and node cgroup), with a stand-in process.

use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::time::Duration;

use mesh_tests::l7::{self, Curl, GrpcResult, HttpEcho, HttpStats};
use mesh_tests::proxy::METRICS_ADDR;
use mesh_tests::{Cluster, Proxy, cgroup2_mount, require_root, testpod_bin};

const HTTP_PORT: u16 = 8080;
const FLAKY_PORT: u16 = 8081;
const GRPC_PORT: u16 = 9090;
const FLAPPING_PORT: u16 = 9091;

/// A client on n1 and a server pod on n2: traffic crosses the fabric.
fn cluster(prefix: &str) -> Cluster {
    Cluster::builder(prefix)
        .node("n1")
        .node("n2")
        .pod("n1", "client", "10.244.1.10")
        .pod("n2", "web-1", "10.244.2.11")
        .build()
        .expect("build the cluster")
}

#[test]
fn http_server_answers_http1_and_h2c_with_what_it_saw() {
    if !require_root() {
        return;
    }
    let cluster = cluster("l7http");
    let (client, web) = (cluster.pod("client"), cluster.pod("web-1"));
    let _server = l7::start_http_server(web, HTTP_PORT, "web-1", &[]).unwrap();
    let _flaky = l7::start_http_server(web, FLAKY_PORT, "web-1", &["--fail-every", "2"]).unwrap();
    let base = format!("http://{}:{HTTP_PORT}", web.ip());

    let h1 = Curl::new(format!("{base}/hello?x=1"))
        .args(&["-H", "x-user: alice"])
        .run(client)
        .unwrap();
    assert_eq!((h1.exit_code, h1.http_code), (0, 200), "{h1:?}");
    assert_eq!(h1.header("x-pod"), Some("web-1"));
    let echo: HttpEcho = h1.json().unwrap();
    assert_eq!(echo.pod, "web-1");
    assert_eq!(
        (
            echo.method.as_str(),
            echo.path.as_str(),
            echo.query.as_str()
        ),
        ("GET", "/hello", "x=1")
    );
    assert_eq!(echo.version, "HTTP/1.1");
    assert_eq!(echo.header("x-user"), Some("alice"));
    assert!(
        echo.peer.starts_with(&format!("{}:", client.ip())),
        "the server sees the client pod's address: {}",
        echo.peer
    );

    let h2 = Curl::new(format!("{base}/hello"))
        .h2c()
        .run(client)
        .unwrap();
    assert_eq!(h2.http_code, 200, "{h2:?}");
    let echo: HttpEcho = h2.json().unwrap();
    assert_eq!(
        (echo.pod.as_str(), echo.version.as_str()),
        ("web-1", "HTTP/2.0")
    );

    let status = l7::curl(client, &format!("{base}/status/503"), &[]).unwrap();
    assert_eq!(status.http_code, 503);
    assert_eq!(status.json::<HttpEcho>().unwrap().pod, "web-1");

    let posted = l7::curl(client, &format!("{base}/echo"), &["--data-binary", "ping"]).unwrap();
    assert_eq!((posted.http_code, posted.body.as_str()), (200, "ping"));

    let trailers = Curl::new(format!("{base}/trailers"))
        .h2c()
        .run(client)
        .unwrap();
    assert_eq!(trailers.header("x-trailer"), Some("yes"), "{trailers:?}");

    let stream = Curl::new(format!("{base}/stream/3"))
        .h2c()
        .run(client)
        .unwrap();
    assert_eq!(stream.body.lines().count(), 3, "{stream:?}");

    let delayed = l7::curl(client, &format!("{base}/delay/300"), &[]).unwrap();
    assert_eq!(delayed.http_code, 200);
    let too_slow = Curl::new(format!("{base}/delay/5000"))
        .max_time(Duration::from_millis(300))
        .run(client)
        .unwrap();
    assert_eq!(
        (too_slow.exit_code, too_slow.http_code),
        (28, 0),
        "curl timed out"
    );

    // Every second request of the flaky server fails: 200, 503, 200, 503…
    let flaky = format!("http://{}:{FLAKY_PORT}/", web.ip());
    let outcomes = l7::request_loop(client, &flaky, 6, Duration::from_secs(30)).unwrap();
    let codes: Vec<u16> = outcomes.iter().map(|o| o.http_code).collect();
    assert_eq!(codes, [200, 503, 200, 503, 200, 503]);
    assert!(outcomes.iter().all(|o| o.pod.as_deref() == Some("web-1")));
    let stats: HttpStats = l7::curl(client, &format!("{flaky}stats"), &[])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(stats.requests, 6, "failed requests count, /stats does not");
}

#[test]
fn grpc_health_check_and_watch() {
    if !require_root() {
        return;
    }
    let cluster = cluster("l7grpc");
    let (client, web) = (cluster.pod("client"), cluster.pod("web-1"));
    let _server = l7::start_grpc_server(web, GRPC_PORT, "web-1", &[]).unwrap();
    let _flapping =
        l7::start_grpc_server(web, FLAPPING_PORT, "web-1", &["--flap-ms", "200"]).unwrap();
    let target = format!("{}:{GRPC_PORT}", web.ip());
    let serving = GrpcResult {
        ok: true,
        status: Some("SERVING".into()),
        pod: Some("web-1".into()),
        ..GrpcResult::default()
    };

    let server = l7::grpc(client, &target, &["--call", "check"]).unwrap();
    assert_eq!(server.as_slice(), std::slice::from_ref(&serving));
    let named = l7::grpc(
        client,
        &target,
        &["--call", "check", "--service", "web-1", "--count", "3"],
    )
    .unwrap();
    assert_eq!(named, vec![serving.clone(); 3]);

    let unknown = l7::grpc(client, &target, &["--call", "check", "--service", "nope"]).unwrap();
    assert_eq!(unknown.len(), 1);
    assert!(!unknown[0].ok);
    assert_eq!(unknown[0].code, Some(5), "NOT_FOUND: {unknown:?}");

    let watched = l7::grpc(client, &target, &["--call", "watch", "--count", "1"]).unwrap();
    assert_eq!(watched, [serving]);

    // The flapping server streams every change of service web-1.
    let flapping = format!("{}:{FLAPPING_PORT}", web.ip());
    let stream = l7::grpc(
        client,
        &flapping,
        &["--call", "watch", "--service", "web-1", "--count", "4"],
    )
    .unwrap();
    assert_eq!(stream.len(), 4, "{stream:?}");
    assert!(stream.iter().all(|r| r.ok), "{stream:?}");
    let statuses: Vec<&str> = stream.iter().filter_map(|r| r.status.as_deref()).collect();
    assert!(
        statuses.windows(2).all(|w| w[0] != w[1]),
        "each message is a change: {statuses:?}"
    );

    let refused = l7::grpc(client, &format!("{}:9999", web.ip()), &["--call", "check"]).unwrap();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].code, Some(14), "UNAVAILABLE: {refused:?}");
}

/// The proxy's placement, with `http-server` standing in for `mesh-proxy` on the
/// proxy's metrics address: in the node's netns and cgroup, scraped, stopped,
/// restarted (also without a gap) and killed by pid.
#[test]
fn proxy_runs_in_the_node_netns_and_cgroup() {
    if !require_root() {
        return;
    }
    let cluster = cluster("l7place");
    let node = cluster.node("n1");
    let args: Vec<OsString> = [
        "http-server",
        "--listen",
        &METRICS_ADDR.to_string(),
        "--name",
        "stand-in",
        "--reuse-port",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    let mut proxy = Proxy::start_program(node, &testpod_bin().unwrap(), &args).unwrap();
    let pid = proxy.pid().expect("running");

    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let want = node
        .cgroup_dir()
        .strip_prefix(cgroup2_mount().unwrap())
        .unwrap();
    assert!(
        cgroup
            .lines()
            .any(|l| l.strip_prefix("0::") == Some(&format!("/{}", want.display()))),
        "in the node cgroup /{}: {cgroup}",
        want.display()
    );
    let netns_inode = |path: String| std::fs::metadata(path).unwrap().ino();
    assert_eq!(
        netns_inode(format!("/proc/{pid}/ns/net")),
        netns_inode(node.netns_path().display().to_string()),
        "in the node netns"
    );

    let scraped: HttpEcho = serde_json::from_str(&proxy.metrics().unwrap()).unwrap();
    assert_eq!(
        (scraped.pod.as_str(), scraped.path.as_str()),
        ("stand-in", "/metrics")
    );

    proxy.stop().unwrap();
    assert!(proxy.exited() && proxy.pid().is_none());
    proxy.restart(node).unwrap();
    let restarted = proxy.pid().expect("running again");
    assert_ne!(restarted, pid);
    let predecessor = proxy.hot_restart(node).unwrap();
    assert!(
        !predecessor.success(),
        "the stand-in dies of SIGTERM: {predecessor}"
    );
    let new_pid = proxy.pid().expect("the successor runs");
    assert_ne!(new_pid, restarted);
    proxy.metrics().unwrap();
    proxy.kill();
    assert!(proxy.exited());
    assert!(
        !std::path::Path::new(&format!("/proc/{new_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{new_pid}/cmdline"))
                .is_ok_and(|c| !c.contains("stand-in")),
        "killed and reaped"
    );
}
