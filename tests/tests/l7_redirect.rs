//! L7 redirection, kernel side (root only): connect() to a Service port the node proxy
//! serves (here `appProtocol: http`) goes to the proxy's listener on the client pod's
//! own loopback (port 15001), and `getsockopt(SO_ORIGINAL_DST)` on the accepted socket
//! answers the VIP and port the client dialled. `mesh-testpod origdst-echo` stands in
//! for the proxy: it announces the original destination of each connection in place of
//! a backend name. A plain port of the same Service stays on the kernel's L4 path.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Pod, StateDir, eventually, require_root,
    testpod::{self, ConnectSummary, READY_LINE},
    testpod_bin,
};

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
/// `appProtocol: http`: served by the node proxy.
const L7_PORT: u16 = 80;
/// No appProtocol: the kernel picks a backend.
const L4_PORT: u16 = 81;
const POD_PORT: u16 = 8080;
const BACKENDS: [(&str, &str, &str); 2] = [
    ("n1", "web-1", "10.244.1.11"),
    ("n2", "web-2", "10.244.2.11"),
];
const CLIENTS: [&str; 2] = ["client", "client2"];
const SETTLE: Duration = Duration::from_secs(10);

/// The dual-stack `web` Service with one L7 and one plain port, and its two Pods.
fn web_state(cluster: &Cluster) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {VIP4}
  clusterIPs: ['{VIP4}', '{VIP6}']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {{app: web}}
  ports:
    - {{name: http, port: {L7_PORT}, targetPort: {POD_PORT}, protocol: TCP, appProtocol: http}}
    - {{name: plain, port: {L4_PORT}, targetPort: {POD_PORT}, protocol: TCP}}
"
    );
    for (_, name, _) in BACKENDS {
        let pod = cluster.pod(name);
        let ip6 = pod.ip6().expect("the bed is dual-stack");
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec: {{containers: [{{name: web, image: web}}]}}
status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}
",
            ip = pod.ip()
        ));
    }
    yaml
}

/// Two client pods on n1, a backend on each node, the agent on n1.
struct Bed {
    // Field order is drop order: agent, servers, then the cluster.
    agent: Agent,
    _servers: Vec<ChildGuard>,
    _state: StateDir,
    cluster: Cluster,
}

impl Bed {
    fn new(prefix: &str, agent_args: &[&str]) -> Result<Self> {
        let mut builder = Cluster::builder(prefix)
            .dual_stack()
            .node("n1")
            .node("n2")
            .pod("n1", "client", "10.244.1.10")
            .pod("n1", "client2", "10.244.1.12");
        for (node, name, ip) in BACKENDS {
            builder = builder.pod(node, name, ip);
        }
        let cluster = builder.build()?;
        let servers = BACKENDS
            .iter()
            .map(|(_, name, _)| testpod::start_server(cluster.pod(name), POD_PORT, name))
            .collect::<Result<Vec<_>>>()?;
        let state = StateDir::new(prefix)?;
        state.write("web.yaml", &web_state(&cluster))?;
        let agent = Agent::start_with(cluster.node("n1"), state.path(), agent_args)?;
        Ok(Self {
            agent,
            _servers: servers,
            _state: state,
            cluster,
        })
    }

    fn pod(&self, name: &str) -> &Pod {
        self.cluster.pod(name)
    }

    /// Entries of datapath map `map`, from the agent's metrics.
    fn map_entries(&self, map: &str) -> Result<u64> {
        let text = self.agent.metrics()?;
        let prefix = format!("mesh_datapath_map_entries{{map=\"{map}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
            .with_context(|| format!("no {prefix} in /metrics:\n{text}"))
    }
}

/// Starts `mesh-testpod origdst-echo` (the proxy's stand-in) in `pod` and waits until
/// it listens on 127.0.0.1:15001 and [::1]:15001.
fn start_echo(pod: &Pod) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.arg("origdst-echo").stdout(Stdio::piped());
    let mut echo = pod.spawn(cmd)?;
    echo.wait_for_stdout_line(SETTLE, |line| line == READY_LINE)
        .with_context(|| format!("start origdst-echo in pod {}", pod.name()))?;
    Ok(echo)
}

/// Asserts that all `count` exchanges of `summary` succeeded, each announcing `want`
/// (the original destination through the echo, or a backend name), and that the
/// application saw `peer` as its peer.
fn assert_all(summary: &ConnectSummary, count: u64, want: &[&str], peer: SocketAddr, what: &str) {
    assert_eq!(
        summary.ok, count,
        "{what}: every connection must succeed: {summary:?}"
    );
    assert!(
        summary
            .by_backend
            .keys()
            .all(|b| want.contains(&b.as_str())),
        "{what}: answered by {:?}, want only {want:?}",
        summary.by_backend
    );
    assert_eq!(
        summary.peers.keys().collect::<Vec<_>>(),
        [&peer.to_string()],
        "{what}: the application must see the VIP as its peer"
    );
}

fn redirects_l7_ports_to_the_pod_local_proxy(prefix: &str, agent_args: &[&str]) -> Result<()> {
    let bed = Bed::new(prefix, agent_args)?;
    let l7_v4 = SocketAddr::from((VIP4, L7_PORT));
    let l7_v6 = SocketAddr::from((VIP6, L7_PORT));
    let backends = BACKENDS.map(|(_, name, _)| name);

    // No proxy in either client pod: the L7 port is refused at once by the pod's own
    // loopback; the plain port reaches the backends on both nodes.
    for client in CLIENTS {
        let summary = testpod::connect(bed.pod(client), l7_v4, 3)?;
        assert_eq!(summary.ok, 0, "{client}: no proxy listens: {summary:?}");
        assert_eq!(
            summary.connect_errno_first.as_deref(),
            Some("ECONNREFUSED"),
            "{client}: {summary:?}"
        );
        for vip in [IpAddr::V4(VIP4), IpAddr::V6(VIP6)] {
            let l4 = SocketAddr::new(vip, L4_PORT);
            let summary = testpod::connect(bed.pod(client), l4, 20)?;
            assert_all(&summary, 20, &backends, l4, &format!("{client} → {l4}"));
        }
    }

    // The proxy's stand-in in `client` only: `client` reaches it and reads back exactly
    // what it dialled, per family; `client2` is still refused (the redirect stays in the
    // caller's own network namespace).
    let _echo = start_echo(bed.pod("client"))?;
    for addr in [l7_v4, l7_v6] {
        let summary = testpod::connect(bed.pod("client"), addr, 5)?;
        let want = addr.to_string();
        assert_all(&summary, 5, &[&want], addr, &format!("client → {addr}"));
    }
    // An IPv6 socket dialling the IPv4-mapped VIP reaches the IPv4 listener.
    let summary =
        testpod::connect_ipv4_mapped(bed.pod("client"), SocketAddrV4::new(VIP4, L7_PORT), 5)?;
    assert_eq!(
        summary.ok, 5,
        "client → [::ffff:{VIP4}]:{L7_PORT}: {summary:?}"
    );
    assert!(
        summary.by_backend.keys().all(|b| *b == l7_v4.to_string()),
        "client → [::ffff:{VIP4}]:{L7_PORT}: {summary:?}"
    );
    let summary = testpod::connect(bed.pod("client2"), l7_v4, 3)?;
    assert_eq!(
        summary.connect_errno_first.as_deref(),
        Some("ECONNREFUSED"),
        "client2 has no proxy: {summary:?}"
    );
    // The plain port is untouched by the proxy's presence.
    let l4 = SocketAddr::from((VIP4, L4_PORT));
    let summary = testpod::connect(bed.pod("client"), l4, 20)?;
    assert_all(
        &summary,
        20,
        &backends,
        l4,
        "client → plain port with a proxy",
    );

    // A proxy in `client2` too: it gets its own connections' original destinations.
    let _echo2 = start_echo(bed.pod("client2"))?;
    for addr in [l7_v6, l7_v4] {
        let summary = testpod::connect(bed.pod("client2"), addr, 5)?;
        let want = addr.to_string();
        assert_all(&summary, 5, &[&want], addr, &format!("client2 → {addr}"));
    }

    // Each entry of ORIG_DST goes when the proxy's end of its connection closes.
    let mut entries = None;
    let drained = eventually(SETTLE, || {
        entries = bed.map_entries("ORIG_DST_V1").ok();
        entries == Some(0)
    });
    assert!(
        drained,
        "ORIG_DST keeps {entries:?} entries of closed connections"
    );
    Ok(())
}

#[test]
fn l7_ports_go_to_the_pod_local_proxy_with_their_original_destination() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    redirects_l7_ports_to_the_pod_local_proxy("l7redir", &[])
}

/// With sockmap the client and the proxy's stand-in talk socket to socket (both on the
/// pod's loopback); the original destination is still there.
#[test]
fn l7_redirection_works_with_sockmap() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    redirects_l7_ports_to_the_pod_local_proxy("l7redirsm", &["--sockmap=true"])
}
