//! Self-test of the test bed (root only): real namespaces, veths, routes and cgroups,
//! traffic between pods with `mesh-testpod`, and complete cleanup, also after a panic.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Result;
use mesh_tests::{Cluster, require_root, testpod};

const PORT: u16 = 8080;

/// What a cluster leaves behind if cleanup is broken.
struct Footprint {
    netns: Vec<String>,
    cgroup_root: PathBuf,
    host_ifnames: Vec<String>,
}

impl Footprint {
    fn of(cluster: &Cluster) -> Self {
        Self {
            netns: cluster.netns_names(),
            cgroup_root: cluster.cgroup_root().to_owned(),
            host_ifnames: cluster
                .pods()
                .iter()
                .map(|p| p.host_ifname().to_owned())
                .collect(),
        }
    }

    fn assert_removed(&self) {
        let listed = String::from_utf8(
            Command::new("ip")
                .args(["netns", "list"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        for name in &self.netns {
            assert!(
                !Path::new("/run/netns").join(name).exists(),
                "netns {name} still mounted"
            );
            assert!(
                !listed
                    .lines()
                    .any(|l| l.split_whitespace().next() == Some(name)),
                "`ip netns list` shows {name}"
            );
        }
        assert!(
            !self.cgroup_root.exists(),
            "cgroup {} still exists",
            self.cgroup_root.display()
        );
        // Links are only ever created inside our namespaces; none may surface in the
        // root namespace.
        let links = String::from_utf8(
            Command::new("ip")
                .args(["-o", "link", "show"])
                .output()
                .unwrap()
                .stdout,
        )
        .unwrap();
        for ifname in self.host_ifnames.iter().map(String::as_str).chain(["fab0"]) {
            assert!(
                !links.contains(&format!(": {ifname}@"))
                    && !links.contains(&format!(": {ifname}:")),
                "{ifname} in root netns"
            );
        }
    }
}

fn addr(ip: Ipv4Addr, port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

fn only(backend: &str, n: u64) -> BTreeMap<String, u64> {
    BTreeMap::from([(backend.to_owned(), n)])
}

/// The cgroup a process is in, from /proc/self/cgroup as seen by a process we start.
fn cgroup_line(output: &std::process::Output) -> String {
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines()
        .find(|l| l.starts_with("0::"))
        .unwrap_or_default()
        .trim_start_matches("0::")
        .to_owned()
}

#[test]
fn pods_talk_across_and_within_nodes_and_everything_is_removed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::builder("topo")
        .node("n1")
        .node("n2")
        .pod("n1", "client", "10.244.1.10")
        .pod("n1", "peer", "10.244.1.11")
        .pod("n2", "web-1", "10.244.2.11")
        .build()?;
    let footprint = Footprint::of(&cluster);
    let (client, peer, web) = (
        cluster.pod("client"),
        cluster.pod("peer"),
        cluster.pod("web-1"),
    );
    let web_server = testpod::start_server(web, PORT, "web-1")?;
    let _peer_server = testpod::start_server(peer, PORT, "peer")?;

    // Cross-node: client (n1) -> web-1 (n2) through both nodes and the fabric link.
    let cross = testpod::connect(client, addr(web.ip(), PORT), 25)?;
    assert_eq!((cross.attempts, cross.ok), (25, 25), "{cross:?}");
    assert_eq!(cross.by_backend, only("web-1", 25));
    assert!(cross.errors.is_empty(), "{cross:?}");

    // Same node: client -> peer, routed through n1 only.
    let local = testpod::connect(client, addr(peer.ip(), PORT), 10)?;
    assert_eq!(
        (local.ok, local.by_backend.clone()),
        (10, only("peer", 10)),
        "{local:?}"
    );

    // UDP answers too.
    let udp = testpod::connect_udp(client, addr(web.ip(), PORT), 5)?;
    assert_eq!(
        (udp.ok, udp.by_backend.clone()),
        (5, only("web-1", 5)),
        "{udp:?}"
    );

    // Errors are reported by errno name: a closed port is refused...
    let refused = testpod::connect(client, addr(web.ip(), 9), 3)?;
    assert_eq!(refused.errors, only("ECONNREFUSED", 3), "{refused:?}");
    assert_eq!(refused.connect_errno_first.as_deref(), Some("ECONNREFUSED"));
    // ...and a service VIP without a mesh has no route: the node rejects it, nothing
    // leaves the namespaces.
    let unrouted = testpod::connect(client, addr(Ipv4Addr::new(10, 96, 0, 1), 80), 1)?;
    let key = unrouted.connect_errno_first.clone().unwrap_or_default();
    assert!(
        key == "ENETUNREACH" || key == "EHOSTUNREACH",
        "{unrouted:?}"
    );

    // The bench workload measures the same path.
    let bench = testpod::bench(client, addr(web.ip(), PORT), 20, 2)?;
    assert_eq!(bench.count, 20, "{bench:?}");
    assert!(
        bench.errors.is_empty() && 0 < bench.p50_ns && bench.p50_ns <= bench.p99_ns,
        "{bench:?}"
    );

    // Pod processes run in their node's cgroup; the agent-style spawn does not.
    let n2 = cluster.node("n2");
    let procs = std::fs::read_to_string(n2.cgroup_dir().join("cgroup.procs"))?;
    assert!(
        procs.lines().any(|p| p == web_server.pid().to_string()),
        "server not in {}",
        n2.cgroup_dir().display()
    );
    let in_pod = cgroup_line(&web.run(Command::new("cat").arg("/proc/self/cgroup"))?);
    assert!(
        n2.cgroup_dir().ends_with(in_pod.trim_start_matches('/')),
        "pod process in cgroup {in_pod}"
    );
    let outside =
        cgroup_line(&n2.run_outside_cgroup(Command::new("cat").arg("/proc/self/cgroup"))?);
    assert!(
        !outside.contains("mesh-test-"),
        "agent-style process in cgroup {outside}"
    );

    // Node processes see the node netns: its route to the other node's pod CIDR.
    let routes = cluster
        .node("n1")
        .run_outside_cgroup(Command::new("ip").args(["-4", "route", "show"]))?;
    let routes = String::from_utf8_lossy(&routes.stdout);
    assert!(
        routes.contains("10.244.2.0/24 via 192.168.250.2 dev fab0"),
        "{routes}"
    );
    assert!(
        !routes.contains("default"),
        "node must not route out: {routes}"
    );

    // Each pod has its own netns cookie.
    let cookies = [
        client.netns_cookie()?,
        peer.netns_cookie()?,
        web.netns_cookie()?,
    ];
    assert!(
        cookies.iter().all(|&c| c != 0) && cookies[0] != cookies[1] && cookies[1] != cookies[2],
        "{cookies:?}"
    );

    drop(web_server);
    drop(cluster);
    footprint.assert_removed();
    Ok(())
}

#[test]
fn three_nodes_are_joined_by_a_bridge() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::builder("fabric")
        .node("n1")
        .node("n2")
        .node("n3")
        .pod("n1", "client", "10.244.1.10")
        .pod("n3", "web-3", "10.244.3.10")
        .build()?;
    let footprint = Footprint::of(&cluster);
    assert_eq!(
        footprint.netns.len(),
        6,
        "3 nodes + 2 pods + fabric: {:?}",
        footprint.netns
    );
    let web = cluster.pod("web-3");
    let _server = testpod::start_server(web, PORT, "web-3")?;
    let summary = testpod::connect(cluster.pod("client"), addr(web.ip(), PORT), 5)?;
    assert_eq!(
        (summary.ok, summary.by_backend.clone()),
        (5, only("web-3", 5)),
        "{summary:?}"
    );
    drop(cluster);
    footprint.assert_removed();
    Ok(())
}

#[test]
fn a_panicking_test_still_cleans_up() {
    if !require_root() {
        return;
    }
    let mut footprint = None;
    let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let cluster = Cluster::builder("panic")
            .node("n1")
            .node("n2")
            .pod("n1", "client", "10.244.1.10")
            .pod("n2", "web-1", "10.244.2.11")
            .build()
            .expect("build cluster");
        footprint = Some(Footprint::of(&cluster));
        // A live server in a pod: its process must not keep anything alive.
        let server =
            testpod::start_server(cluster.pod("web-1"), PORT, "web-1").expect("start server");
        // Leak the guard so that only the cluster's own cleanup can stop the server.
        std::mem::forget(server);
        panic!("deliberate panic inside a test");
    }));
    assert!(outcome.is_err(), "the closure must have panicked");
    footprint.expect("cluster was built").assert_removed();
}

/// Set for the child process of [`leftovers_of_a_crashed_run_are_removed`].
const CRASH_CHILD_ENV: &str = "MESH_TESTS_CRASH_CHILD";

#[test]
#[ignore = "helper: run in a child process by leftovers_of_a_crashed_run_are_removed"]
fn crash_while_holding_a_cluster() {
    if std::env::var_os(CRASH_CHILD_ENV).is_none() {
        return;
    }
    let cluster = Cluster::builder("crash")
        .node("n1")
        .pod("n1", "web-1", "10.244.1.11")
        .build()
        .expect("build");
    println!("netns={}", cluster.netns_names().join(","));
    println!("cgroup={}", cluster.cgroup_root().display());
    // Like a SIGKILLed run or a panic under panic=abort: no destructor runs.
    std::process::abort();
}

#[test]
fn leftovers_of_a_crashed_run_are_removed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let output = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "crash_while_holding_a_cluster",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CRASH_CHILD_ENV, "1")
        .output()?;
    assert!(!output.status.success(), "the child must have aborted");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // The harness may print "test name ... " on the same line before our output.
    let field = |key: &str| {
        stdout
            .lines()
            .find_map(|l| l.split_once(key))
            .map(|(_, value)| value.to_owned())
    };
    let netns: Vec<String> = field("netns=")
        .expect("child printed its netns")
        .split(',')
        .map(str::to_owned)
        .collect();
    let footprint = Footprint {
        netns,
        cgroup_root: field("cgroup=").expect("child printed its cgroup").into(),
        host_ifnames: vec![],
    };
    assert!(
        footprint.cgroup_root.exists()
            && Path::new("/run/netns").join(&footprint.netns[0]).exists(),
        "the crash left resources behind"
    );
    mesh_tests::cleanup_stale()?;
    footprint.assert_removed();
    Ok(())
}
