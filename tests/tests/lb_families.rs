//! Socket-level load balancing across address families and for UDP (root only): the
//! real agent on a dual-stack test cluster, with IPv6 and dual-stack Services, IPv4-mapped
//! dials from IPv6 sockets, the peer address applications see, unconnected UDP replies,
//! and connected UDP sockets whose backend goes away.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Pod, StateDir, assert_eventually, require_root,
    testpod::{self, ConnectSummary, HoldReport, HoldStarted, UdpRound},
};

const WEB_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const WEB_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x10);
const WEB_PORT: u16 = 80;
const WEB_POD_PORT: u16 = 8080;
const DNS_V4: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 53);
const DNS_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x96, 0, 0, 0, 0, 0, 0x53);
const DNS_PORT: u16 = 53;
const DNS_POD_PORT: u16 = 5353;
const CONVERGE: Duration = Duration::from_secs(10);

/// Client on n1 with one backend beside it and two on n2, all dual-stack.
const BACKENDS: [(&str, &str, &str); 3] = [
    ("n1", "web-1", "10.244.1.11"),
    ("n2", "web-2", "10.244.2.11"),
    ("n2", "web-3", "10.244.2.12"),
];
const ALL: [&str; 3] = ["web-1", "web-2", "web-3"];

/// The state: the `web` Service (TCP 80 → 8080) on `web_ips`, the dual-stack `dns`
/// Service (UDP 53 → 5353), and a Pod with both addresses for each of `backends`.
fn cluster_state(cluster: &Cluster, web_ips: &[IpAddr], backends: &[&str]) -> String {
    let mut yaml = service("web", web_ips, WEB_PORT, WEB_POD_PORT, "TCP");
    yaml += &service(
        "dns",
        &[DNS_V4.into(), DNS_V6.into()],
        DNS_PORT,
        DNS_POD_PORT,
        "UDP",
    );
    for name in backends {
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

/// A Service selecting app=web on `ips` (one per family, as Kubernetes allows).
fn service(name: &str, ips: &[IpAddr], port: u16, target: u16, proto: &str) -> String {
    let quoted = |ip: &IpAddr| format!("'{ip}'");
    let families: Vec<&str> = ips
        .iter()
        .map(|ip| if ip.is_ipv4() { "IPv4" } else { "IPv6" })
        .collect();
    let policy = if ips.len() > 1 {
        "PreferDualStack"
    } else {
        "SingleStack"
    };
    format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {first}
  clusterIPs: [{ips}]
  ipFamilies: [{families}]
  ipFamilyPolicy: {policy}
  selector: {{app: web}}
  ports:
    - {{name: {name}, port: {port}, targetPort: {target}, protocol: {proto}}}
",
        first = quoted(&ips[0]),
        ips = ips.iter().map(quoted).collect::<Vec<_>>().join(", "),
        families = families.join(", "),
    )
}

/// The dual-stack cluster of [`BACKENDS`] with its servers, state and agent.
struct Bed {
    // Field order is drop order: agent, servers, then the cluster.
    agent: Agent,
    _servers: Vec<ChildGuard>,
    state: StateDir,
    web_ips: Vec<IpAddr>,
    cluster: Cluster,
}

impl Bed {
    /// A dual-stack cluster with servers on every backend (TCP+UDP on 8080 and 5353)
    /// and the agent on n1, serving `web` on `web_ips`.
    fn new(prefix: &str, web_ips: &[IpAddr]) -> Result<Self> {
        let mut builder = Cluster::builder(prefix)
            .dual_stack()
            .node("n1")
            .node("n2")
            .pod("n1", "client", "10.244.1.10");
        for (node, name, ip) in BACKENDS {
            builder = builder.pod(node, name, ip);
        }
        let cluster = builder.build()?;
        let mut servers = Vec::new();
        for name in ALL {
            for port in [WEB_POD_PORT, DNS_POD_PORT] {
                servers.push(testpod::start_server(cluster.pod(name), port, name)?);
            }
        }
        let state = StateDir::new(prefix)?;
        state.write("state.yaml", &cluster_state(&cluster, web_ips, &ALL))?;
        let agent = Agent::start(cluster.node("n1"), state.path())?;
        Ok(Self {
            agent,
            _servers: servers,
            state,
            web_ips: web_ips.to_vec(),
            cluster,
        })
    }

    fn client(&self) -> &Pod {
        self.cluster.pod("client")
    }

    /// Rewrites the state with only `backends` and waits until the agent applied it.
    fn set_backends(&self, backends: &[&str]) -> Result<()> {
        let applied = self.agent.applied_count();
        self.state.write(
            "state.yaml",
            &cluster_state(&self.cluster, &self.web_ips, backends),
        )?;
        assert_eventually!(
            self.agent.applied_count() > applied,
            CONVERGE,
            "agent did not re-apply:\n{}",
            self.agent.log()
        );
        Ok(())
    }
}

fn sa(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// Every exchange succeeded and each backend answered `within` of them.
fn assert_spread(
    what: &str,
    summary: &ConnectSummary,
    count: u64,
    within: std::ops::RangeInclusive<u64>,
) {
    assert_eq!(
        summary.ok, count,
        "{what}: every exchange must succeed: {summary:?}"
    );
    for name in ALL {
        let n = summary.by_backend.get(name).copied().unwrap_or(0);
        assert!(
            within.contains(&n),
            "{what}: {name} answered {n} of {count} (want {within:?}): {summary:?}"
        );
    }
}

/// The dual-stack test bed itself, without an agent: IPv6 between pods on one node and
/// across the bridged fabric of three nodes, TCP and UDP, with IPv4 unchanged beside it.
#[test]
fn dual_stack_pods_reach_each_other_without_the_mesh() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let cluster = Cluster::builder("lfbed")
        .dual_stack()
        .node("n1")
        .node("n2")
        .node("n3")
        .pod("n1", "client", "10.244.1.10")
        .pod("n1", "near", "10.244.1.11")
        .pod("n3", "far", "10.244.3.11")
        .build()?;
    let far = cluster.pod("far");
    assert_eq!(far.ip6(), Some("fd00:244:3::11".parse()?));
    assert_eq!(cluster.node("n3").ip6(), Some("fd00:250::3".parse()?));
    let _servers = ["near", "far"]
        .into_iter()
        .map(|name| testpod::start_server(cluster.pod(name), WEB_POD_PORT, name))
        .collect::<Result<Vec<_>>>()?;
    let client = cluster.pod("client");
    for name in ["near", "far"] {
        let pod = cluster.pod(name);
        let ip6 = pod.ip6().context("dual-stack pod without IPv6")?;
        for (what, summary) in [
            (
                "TCP/IPv6",
                testpod::connect(client, sa(ip6, WEB_POD_PORT), 5)?,
            ),
            (
                "UDP/IPv6",
                testpod::connect_udp(client, sa(ip6, WEB_POD_PORT), 5)?,
            ),
            (
                "TCP/IPv4",
                testpod::connect(client, sa(pod.ip(), WEB_POD_PORT), 5)?,
            ),
        ] {
            assert_eq!(
                summary.by_backend.get(name),
                Some(&5),
                "{what} to {name}: {summary:?}"
            );
        }
        // Without the mesh, replies come from the address that was asked.
        let query = testpod::udp_query(client, sa(ip6, WEB_POD_PORT), 3)?;
        let source = sa(ip6, WEB_POD_PORT).to_string();
        assert_eq!(query.peers, BTreeMap::from([(source, 3)]), "{query:?}");
    }
    let far6 = sa(far.ip6().context("far has IPv6")?, WEB_POD_PORT);
    let interval = Duration::from_millis(100);
    let mut hold = testpod::spawn_hold(client, far6, Duration::from_secs(1), interval)?;
    let started: HoldStarted = testpod::next_json_line(&mut hold, CONVERGE)?;
    assert_eq!(started.backend, "far");
    let report: HoldReport = testpod::next_json_line(&mut hold, CONVERGE)?;
    // 1 s of 100 ms pauses, each followed by an echo: 10, less any scheduling delay.
    assert!(report.errors == 0 && report.echoes_ok >= 5, "{report:?}");
    Ok(())
}

#[test]
fn ipv6_connections_spread_uniformly_over_three_backends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lf6spread", &[WEB_V6.into()])?;
    // As in lb.rs: 1,200 connections put ±15% of 400 at 3.7 standard deviations (16.3),
    // so the three bounds together fail by chance less than once in 1,000 runs.
    let summary = testpod::connect(bed.client(), sa(WEB_V6, WEB_PORT), 1200)?;
    assert_spread("IPv6", &summary, 1200, 340..=460);
    Ok(())
}

#[test]
fn dual_stack_service_serves_both_families_and_ipv4_mapped_dials() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lfdual", &[WEB_V4.into(), WEB_V6.into()])?;
    // 300 per family: 100 ± 50 per backend is 6 standard deviations (8.2); this checks
    // that each family reaches every backend, the uniformity is lb.rs's and the test above.
    let v4 = testpod::connect(bed.client(), sa(WEB_V4, WEB_PORT), 300)?;
    assert_spread("IPv4", &v4, 300, 50..=150);
    let v6 = testpod::connect(bed.client(), sa(WEB_V6, WEB_PORT), 300)?;
    assert_spread("IPv6", &v6, 300, 50..=150);
    let mapped =
        testpod::connect_ipv4_mapped(bed.client(), SocketAddrV4::new(WEB_V4, WEB_PORT), 300)?;
    assert_spread("IPv4-mapped", &mapped, 300, 50..=150);

    // The client closes first, so its sockets linger in TIME-WAIT and show where each
    // connection really went: the IPv6 sockets of the mapped dials must have reached the
    // backends' IPv4 addresses (in mapped form), the IPv6 dials their IPv6 addresses.
    let out = bed.client().run({
        let mut ss = Command::new("ss");
        ss.args(["-Htan", "state", "time-wait"]);
        ss
    })?;
    anyhow::ensure!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let listing = String::from_utf8_lossy(&out.stdout);
    let mut kinds: BTreeMap<&str, u64> = BTreeMap::new();
    for line in listing.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [.., local, peer] = fields[..] else {
            bail!("unexpected ss line {line:?}");
        };
        let kind = match (local.starts_with("[::ffff:"), peer) {
            (true, p) if p.starts_with("[::ffff:10.244.") && p.ends_with(":8080") => {
                "IPv4-mapped → IPv4 backend"
            }
            (false, p) if p.starts_with("10.244.") && p.ends_with(":8080") => "IPv4 → IPv4 backend",
            (false, p) if p.starts_with("[fd00:244:") && p.ends_with("]:8080") => {
                "IPv6 → IPv6 backend"
            }
            _ => line,
        };
        *kinds.entry(kind).or_default() += 1;
    }
    let expected = BTreeMap::from([
        ("IPv4 → IPv4 backend", 300),
        ("IPv4-mapped → IPv4 backend", 300),
        ("IPv6 → IPv6 backend", 300),
    ]);
    assert_eq!(kinds, expected, "client sockets in TIME-WAIT:\n{listing}");
    Ok(())
}

#[test]
fn apps_see_the_vip_as_their_peer() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lfpeer", &[WEB_V4.into(), WEB_V6.into()])?;
    let client = bed.client();
    let checks = [
        (
            "TCP over IPv4",
            testpod::connect(client, sa(WEB_V4, WEB_PORT), 20)?,
            "10.96.0.10:80",
        ),
        (
            "TCP over IPv6",
            testpod::connect(client, sa(WEB_V6, WEB_PORT), 20)?,
            "[fd00:96::10]:80",
        ),
        (
            "TCP IPv4-mapped",
            testpod::connect_ipv4_mapped(client, SocketAddrV4::new(WEB_V4, WEB_PORT), 20)?,
            "[::ffff:10.96.0.10]:80",
        ),
        (
            "connected UDP over IPv4",
            testpod::connect_udp(client, sa(DNS_V4, DNS_PORT), 20)?,
            "10.96.0.53:53",
        ),
        (
            "connected UDP over IPv6",
            testpod::connect_udp(client, sa(DNS_V6, DNS_PORT), 20)?,
            "[fd00:96::53]:53",
        ),
    ];
    for (what, summary, vip) in checks {
        assert_eq!(summary.ok, 20, "{what}: {summary:?}");
        assert_eq!(
            summary.peers,
            BTreeMap::from([(vip.to_owned(), 20)]),
            "{what}: getpeername must give the VIP"
        );
    }
    Ok(())
}

#[test]
fn unconnected_udp_replies_come_from_the_vip() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lfudpq", &[WEB_V4.into()])?;
    for (vip, source) in [
        (sa(DNS_V4, DNS_PORT), "10.96.0.53:53"),
        (sa(DNS_V6, DNS_PORT), "[fd00:96::53]:53"),
    ] {
        let summary = testpod::udp_query(bed.client(), vip, 60)?;
        assert_eq!(
            summary.ok, 60,
            "{vip}: every query must be answered: {summary:?}"
        );
        // A resolver drops replies from any other address than the one it asked.
        assert_eq!(
            summary.peers,
            BTreeMap::from([(source.to_owned(), 60)]),
            "{vip}: reply sources"
        );
        // Each datagram is balanced on its own: all 60 on one backend has odds 3^-59.
        assert!(
            summary.by_backend.len() >= 2,
            "{vip}: one backend answered everything: {summary:?}"
        );
    }
    Ok(())
}

#[test]
fn connected_udp_socket_to_removed_backend_is_aborted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lfudpstale", &[WEB_V4.into()])?;
    // 50 ms rounds for at most 30 s: long enough for the update, bounded if it never lands.
    let mut hold = testpod::spawn_udp_hold(
        bed.client(),
        sa(DNS_V4, DNS_PORT),
        600,
        Duration::from_millis(50),
    )?;
    let first: UdpRound = testpod::next_json_line(&mut hold, CONVERGE)?;
    anyhow::ensure!(first.ok, "the first round failed: {first:?}");
    let gone = first.backend.clone().context("backend of an ok round")?;

    let rest: Vec<&str> = ALL.into_iter().filter(|n| *n != gone).collect();
    bed.set_backends(&rest)?;
    let rounds = rounds_until_recovered(&mut hold, &gone, Duration::from_secs(15))
        .with_context(|| format!("agent log:\n{}", bed.agent.log()))?;
    let failed = rounds
        .iter()
        .position(|r| !r.ok)
        .expect("rounds_until_recovered returns after a failure");
    assert!(
        rounds[..failed]
            .iter()
            .all(|r| r.backend.as_deref() == Some(gone.as_str())),
        "{rounds:?}"
    );
    assert_eq!(
        rounds[failed].error.as_deref(),
        Some("ECONNABORTED"),
        "{rounds:?}"
    );
    // The agent logs its sock_diag run once it returns, which may be just after the
    // client already saw the abort.
    const DESTROYED: &str = "destroyed UDP sockets connected to removed backends";
    assert_eventually!(
        bed.agent.log().contains(DESTROYED),
        CONVERGE,
        "agent log does not mention destroyed sockets:\n{}",
        bed.agent.log()
    );
    let log = bed.agent.log();
    let line = log
        .lines()
        .find(|l| l.contains(DESTROYED))
        .unwrap_or_default();
    assert!(!line.contains("destroyed=0"), "{line}");
    Ok(())
}

/// Reads `udp-hold` rounds until a failed round was followed by three ok rounds on a
/// backend other than `gone` (a new socket that stays good); fails on any other
/// sequence or after `timeout`.
fn rounds_until_recovered(
    hold: &mut ChildGuard,
    gone: &str,
    timeout: Duration,
) -> Result<Vec<UdpRound>> {
    let deadline = Instant::now() + timeout;
    let mut rounds: Vec<UdpRound> = Vec::new();
    let mut recovered = 0;
    while recovered < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let round: UdpRound = testpod::next_json_line(hold, left)
            .with_context(|| format!("rounds so far: {rounds:?}"))?;
        let failed_before = rounds.iter().any(|r| !r.ok);
        match (failed_before, round.ok, round.backend.as_deref()) {
            (false, _, _) => {}
            (true, true, Some(b)) if b != gone => recovered += 1,
            _ => bail!(
                "after the failure, expected ok rounds on a live backend, got {round:?}; before: {rounds:?}"
            ),
        }
        rounds.push(round);
    }
    Ok(rounds)
}
