//! Kubernetes NetworkPolicy, egress side, end to end (root only): the agent on the
//! client's node decides in the connect/sendmsg hooks, after Service load balancing,
//! whether the calling pod (found by its netns cookie) may reach the chosen peer; a
//! denied connect()/sendto() fails at once with EPERM.
//!
//! Pods in the state carry `metadata.namespace` and `spec.nodeName` (the agent's node
//! name, [`agent::node_name`]), and their IPs are those of the test bed. The agent only
//! knows a pod's network namespace while a process lives in it (it scans the processes
//! of its cgroup every ~1 s and on state changes), and `mesh-testpod connect` runs are
//! short-lived processes: so every client pod first gets an idle "anchor" process, and
//! each test waits until one known-denied probe is refused before asserting anything
//! else. Only `a_new_pod_process_is_covered_within_the_discovery_window` measures that
//! discovery itself.
//!
//! Ingress enforcement is not implemented yet, so nothing here tests it.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr, SocketAddrV4},
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use mesh_tests::{
    ChildGuard, require_root,
    scenario::{
        self, Bed, CONVERGE, Matrix,
        Mode::{Tcp, Udp},
        PROBE_COUNT, PodDef, Probe, host, key, outcome, pod,
    },
    testpod::{self, ConnectSummary},
    testpod_bin,
};

/// The expected matrix from `(probe, outcome)` pairs.
fn expect(rows: &[(Probe, &str)]) -> Matrix {
    rows.iter()
        .map(|&(probe, outcome)| (key(probe), outcome.to_owned()))
        .collect()
}

/// Every probe of `probes` "ok" to the pods of `allowed`, "EPERM" to the others.
fn allowed_to(probes: &[Probe], allowed: &[&str]) -> Matrix {
    scenario::expect_allowed(probes, |p| allowed.contains(&p.0), "EPERM")
}

/// A NetworkPolicy in namespace prod isolating `app: client` for egress, with the
/// given `egress:` list items (each line indented by two spaces; empty = deny all).
fn client_egress_policy(name: &str, egress: &str) -> String {
    let egress = if egress.is_empty() {
        "  egress: []\n".to_owned()
    } else {
        format!("  egress:\n{egress}")
    };
    format!(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: client}}}}
  policyTypes: [Egress]
{egress}"
    )
}

/// prod/client (anchored), prod/web and prod/db serving 8080, and a policy that lets
/// the client reach app=web only; the Pods and the policy written.
fn web_allowed_db_denied(prefix: &str) -> Result<Bed> {
    const PORT: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", PORT),
        pod("n1", "prod", "prod-db", "10.244.1.12", "app: db", PORT),
    ];
    let mut bed = Bed::new(prefix, &["n1"], PODS)?;
    bed.anchor_idle_pods()?;
    let policy = client_egress_policy(
        "client-web",
        "  - to: [{podSelector: {matchLabels: {app: web}}}]
",
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", &policy)?;
    Ok(bed)
}

#[test]
fn egress_reachability_matrix_follows_the_policies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // The agent runs on n1 only: egress is enforced on the client's node, and the
    // destinations on n2 are known to it only by their IPs in the state.
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", &[("http", 8080, "TCP"), ("metrics", 9090, "TCP")]),
        pod("n1", "dev", "dev-web", "10.244.1.12", "app: web", &[("http", 8080, "TCP")]),
        pod("n2", "prod", "prod-db", "10.244.2.11", "app: db", &[("sql", 8081, "TCP"), ("admin", 8200, "TCP")]),
        pod("n2", "kube-system", "ks-dns", "10.244.2.12", "k8s-app: kube-dns", &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP"), ("metrics", 9153, "TCP")]),
    ];
    let mut bed = Bed::new("pematrix", &["n1", "n2"], PODS)?;
    bed.anchor_idle_pods()?;
    // Two policies select the client; their rules add up.
    let web_and_dns = client_egress_policy(
        "client-web-dns",
        "  - to: [{podSelector: {matchLabels: {app: web}}}]
    ports: [{port: http}]
  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
    ports: [{protocol: UDP, port: 53}, {protocol: TCP, port: 53}]
",
    );
    let db = client_egress_policy(
        "client-db",
        "  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{protocol: TCP, port: 8000, endPort: 8100}]
",
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state
        .write("policies.yaml", &format!("{web_and_dns}{db}"))?;
    let agent = bed.start_agent("n1", &[])?;
    bed.wait_for(
        &[&agent],
        "prod-client",
        ("dev-web", 8080, Tcp),
        PROBE_COUNT,
        "EPERM",
    );

    let expected = expect(&[
        // Named port "http": 8080/TCP of the prod app=web pods; a port rule without a
        // protocol means TCP.
        (("prod-web", 8080, Tcp), "ok"),
        (("prod-web", 8080, Udp), "EPERM"),
        (("prod-web", 9090, Tcp), "EPERM"),
        (("prod-web", 9090, Udp), "EPERM"),
        // A podSelector alone picks pods of the policy's namespace only.
        (("dev-web", 8080, Tcp), "EPERM"),
        (("dev-web", 8080, Udp), "EPERM"),
        // 8000-8100/TCP.
        (("prod-db", 8081, Tcp), "ok"),
        (("prod-db", 8081, Udp), "EPERM"),
        (("prod-db", 8200, Tcp), "EPERM"),
        (("prod-db", 8200, Udp), "EPERM"),
        // kube-system AND k8s-app=kube-dns, on 53 over both protocols.
        (("ks-dns", 53, Tcp), "ok"),
        (("ks-dns", 53, Udp), "ok"),
        (("ks-dns", 9153, Tcp), "EPERM"),
        (("ks-dns", 9153, Udp), "EPERM"),
    ]);
    let probes: Vec<Probe> = [
        ("prod-web", 8080),
        ("prod-web", 9090),
        ("dev-web", 8080),
        ("prod-db", 8081),
        ("prod-db", 8200),
        ("ks-dns", 53),
        ("ks-dns", 9153),
    ]
    .into_iter()
    .flat_map(|(to, port)| [(to, port, Tcp), (to, port, Udp)])
    .collect();
    assert_eq!(
        bed.outcomes("prod-client", &probes),
        expected,
        "egress of prod/client"
    );

    // Pods no policy selects are not isolated: dev/web (no policy in dev) and prod/web
    // (the prod policies select app=client only) reach everything.
    let open = bed.outcomes("dev-web", &probes);
    let all_ok = scenario::expect_allowed(&probes, |_| true, "EPERM");
    assert_eq!(open, all_ok, "egress of dev/web (no policy)");
    let from_web = bed.outcomes(
        "prod-web",
        &[("dev-web", 8080, Tcp), ("prod-db", 8200, Udp)],
    );
    assert!(
        from_web.values().all(|o| o == "ok"),
        "egress of prod/web (not selected): {from_web:?}"
    );
    Ok(())
}

#[test]
fn namespace_and_pod_selector_in_one_peer_is_and_in_two_peers_or() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const DNS: &[(&str, u16, &str)] = &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "kube-system", "ks-dns", "10.244.1.11", "k8s-app: kube-dns", DNS),
        pod("n1", "kube-system", "ks-other", "10.244.1.12", "app: metrics", DNS),
        pod("n1", "prod", "prod-dns", "10.244.1.13", "k8s-app: kube-dns", DNS),
        pod("n1", "dev", "dev-dns", "10.244.1.14", "k8s-app: kube-dns", DNS),
    ];
    let mut bed = Bed::new("peandor", &["n1"], PODS)?;
    bed.anchor_idle_pods()?;
    let and = client_egress_policy(
        "client-dns",
        "  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
      podSelector: {matchLabels: {k8s-app: kube-dns}}
",
    );
    let or = client_egress_policy(
        "client-dns",
        "  - to:
    - namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}
    - podSelector: {matchLabels: {k8s-app: kube-dns}}
",
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", &and)?;
    let agent = bed.start_agent("n1", &[])?;
    bed.wait_for(
        &[&agent],
        "prod-client",
        ("ks-other", 53, Tcp),
        PROBE_COUNT,
        "EPERM",
    );

    let probes: Vec<Probe> = ["ks-dns", "ks-other", "prod-dns", "dev-dns"]
        .into_iter()
        .flat_map(|to| [(to, 53, Tcp), (to, 53, Udp)])
        .collect();
    // One peer with both selectors: the kube-dns pods OF kube-system.
    assert_eq!(
        bed.outcomes("prod-client", &probes),
        allowed_to(&probes, &["ks-dns"]),
        "namespaceSelector AND podSelector"
    );

    // Two peers: every pod of kube-system, OR the kube-dns pods of the policy's own
    // namespace (a podSelector alone never reaches into other namespaces, so dev/dns
    // stays denied).
    bed.apply(&agent, "policy.yaml", &or)?;
    assert_eq!(
        bed.outcomes("prod-client", &probes),
        allowed_to(&probes, &["ks-dns", "ks-other", "prod-dns"]),
        "namespaceSelector OR podSelector"
    );

    // And back: the update narrows again.
    bed.apply(&agent, "policy.yaml", &and)?;
    assert_eq!(
        bed.outcomes("prod-client", &probes),
        allowed_to(&probes, &["ks-dns"]),
        "back to namespaceSelector AND podSelector"
    );
    Ok(())
}

#[test]
fn ip_block_with_except_matches_pod_and_other_addresses() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const WEB: &[(&str, u16, &str)] = &[("web", 9000, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        // Not in the state: addresses outside the cluster as far as policy knows.
        host("n1", "host-a", "10.244.1.50", WEB),
        host("n1", "host-b", "10.244.1.51", WEB),
        host("n1", "host-out", "10.244.1.70", WEB),
        // Pods of the state whose addresses lie inside the ipBlock; they share labels
        // (one identity) and the except cuts between them.
        pod("n1", "prod", "prod-inside", "10.244.1.52", "app: inside", WEB),
        pod("n1", "prod", "prod-excepted", "10.244.1.53", "app: inside", WEB),
    ];
    let mut bed = Bed::new("peipblock", &["n1"], PODS)?;
    bed.anchor_idle_pods()?;
    let policy = client_egress_policy(
        "client-hosts",
        "  - to: [{ipBlock: {cidr: 10.244.1.48/28, except: [10.244.1.51/32, 10.244.1.53/32]}}]
",
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", &policy)?;
    let agent = bed.start_agent("n1", &[])?;
    bed.wait_for(
        &[&agent],
        "prod-client",
        ("host-out", 9000, Tcp),
        PROBE_COUNT,
        "EPERM",
    );

    let probes: Vec<Probe> = [
        "host-a",
        "host-b",
        "host-out",
        "prod-inside",
        "prod-excepted",
    ]
    .into_iter()
    .flat_map(|to| [(to, 9000, Tcp), (to, 9000, Udp)])
    .collect();
    // host-a: in the CIDR, not excepted → allowed. host-b: excepted. host-out: outside
    // the CIDR (world). prod-inside: a pod whose address lies in the CIDR is matched by
    // it like any address (upstream e2e "should allow egress access to server in CIDR
    // block"); prod-excepted shares its labels but its /32 is excepted (upstream
    // "should enforce except clause while egress access to server in CIDR block").
    assert_eq!(
        bed.outcomes("prod-client", &probes),
        allowed_to(&probes, &["host-a", "prod-inside"]),
        "ipBlock 10.244.1.48/28 except 10.244.1.51/32, 10.244.1.53/32"
    );
    // The except cut prod {app: inside} in two: the excepted address got a peer
    // identity of its own, which `mesh-agent policy` reports.
    let report = agent.policy(&["--pod", "prod/prod-client"])?;
    assert!(
        report.contains("ipBlocks over pod or node addresses: 1 identities split off"),
        "{report}"
    );
    Ok(())
}

#[test]
fn service_traffic_is_checked_against_the_selected_backend() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const HTTP: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "web-1", "10.244.1.11", "app: web, access: granted", HTTP),
        pod("n1", "prod", "web-2", "10.244.1.12", "app: web", HTTP),
    ];
    let mut bed = Bed::new("pesvc", &["n1"], PODS)?;
    bed.anchor_idle_pods()?;
    let service = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: prod}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
"
    );
    // The port is the backend's (8080), not the Service's (80): policy sees the peer
    // the load balancer chose.
    let policy = client_egress_policy(
        "client-web-1",
        "  - to: [{podSelector: {matchLabels: {access: granted}}}]
    ports: [{protocol: TCP, port: 8080}]
",
    );
    bed.state
        .write("pods.yaml", &format!("{}{service}", bed.pods_yaml()))?;
    bed.state.write("policy.yaml", &policy)?;
    let agent = bed.start_agent("n1", &[])?;
    bed.wait_for(
        &[&agent],
        "prod-client",
        ("web-2", 8080, Tcp),
        PROBE_COUNT,
        "EPERM",
    );
    assert_eq!(bed.probe("prod-client", ("web-1", 8080, Tcp)), "ok");

    let total = 100;
    let s = testpod::connect(bed.pod("prod-client"), SocketAddr::from((VIP, 80)), total)?;
    let to_web1 = s.by_backend.get("web-1").copied().unwrap_or(0);
    let eperm = s.errors.get("EPERM").copied().unwrap_or(0);
    assert_eq!(s.attempts, u64::from(total), "{s:?}");
    assert_eq!(
        s.by_backend.get("web-2"),
        None,
        "a connection reached the denied backend web-2: {s:?}"
    );
    assert_eq!(s.ok, to_web1, "{s:?}");
    assert_eq!(
        (s.errors.len(), s.ok + eperm),
        (usize::from(eperm > 0), u64::from(total)),
        "every connection either reaches web-1 or is refused with EPERM: {s:?}"
    );
    // Uniform choice between two backends: each gets 50 ± 30 of 100 but with
    // probability below 1e-9.
    assert!(
        (20..=80).contains(&to_web1),
        "the VIP should pick each backend about half the time: {s:?}"
    );
    // The client saw the VIP, as always through the mesh.
    assert_eq!(
        s.peers.keys().collect::<Vec<_>>(),
        ["10.96.0.10:80"],
        "{s:?}"
    );
    Ok(())
}

#[test]
fn denied_egress_fails_at_once_with_eperm() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = web_allowed_db_denied("peeperm")?;
    let agent = bed.start_agent("n1", &[])?;
    bed.wait_for(
        &[&agent],
        "prod-client",
        ("prod-db", 8080, Tcp),
        PROBE_COUNT,
        "EPERM",
    );

    let client = bed.pod("prod-client");
    let db = SocketAddr::from((bed.ip("prod-db"), 8080));
    let count = 20;
    // EPERM from the connect hook itself, on every attempt: a deny that dropped packets
    // instead would show as ETIMEDOUT after the client's 2 s connect timeout.
    for (what, s) in [
        ("TCP connect", testpod::connect(client, db, count)?),
        ("UDP connect", testpod::connect_udp(client, db, count)?),
        // connect6 with the IPv4-mapped address, as dual-stack applications dial.
        (
            "TCP connect from an IPv6 socket",
            testpod::connect_ipv4_mapped(client, v4(db), count)?,
        ),
    ] {
        assert_eq!(
            s.connect_errno_first.as_deref(),
            Some("EPERM"),
            "{what}: {s:?}"
        );
        assert_eq!(
            (s.attempts, s.ok, s.errors.clone()),
            (
                u64::from(count),
                0,
                BTreeMap::from([("EPERM".to_owned(), u64::from(count))])
            ),
            "{what}: {s:?}"
        );
    }
    // Unconnected UDP: each sendto() goes through the sendmsg hook and fails there.
    let s = testpod::udp_query(client, db, count)?;
    assert_eq!(
        (s.attempts, s.ok, s.errors.clone()),
        (
            u64::from(count),
            0,
            BTreeMap::from([("EPERM".to_owned(), u64::from(count))])
        ),
        "UDP sendto: {s:?}"
    );
    assert!(
        s.first_error
            .as_deref()
            .is_some_and(|e| e.contains("sendto")),
        "{s:?}"
    );
    // The allowed peer still answers, over the same calls.
    let web = SocketAddr::from((bed.ip("prod-web"), 8080));
    for (what, s) in [
        ("TCP", testpod::connect(client, web, count)?),
        ("UDP", testpod::connect_udp(client, web, count)?),
        ("UDP sendto", testpod::udp_query(client, web, count)?),
        (
            "TCP from an IPv6 socket",
            testpod::connect_ipv4_mapped(client, v4(web), count)?,
        ),
    ] {
        assert_eq!(s.ok, u64::from(count), "{what} to the allowed web: {s:?}");
    }
    Ok(())
}

#[test]
fn policy_updates_apply_without_a_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", &[("http", 8080, "TCP")]),
    ];
    let mut bed = Bed::new("peupdate", &["n1"], PODS)?;
    bed.anchor_idle_pods()?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    let agent = bed.start_agent("n1", &[])?;
    let web: Probe = ("prod-web", 8080, Tcp);
    // No policy selects the client yet: allowed, whether or not the agent has found it.
    assert_eq!(bed.probe("prod-client", web), "ok");

    // Deny all egress: a policy selecting the client with Egress and no rules.
    let deny_all = client_egress_policy("client-deny-all", "");
    let start = Instant::now();
    bed.state.write("policy.yaml", &deny_all)?;
    bed.wait_for(&[&agent], "prod-client", web, PROBE_COUNT, "EPERM");
    eprintln!("deny-all in force {:?} after the write", start.elapsed());
    assert_eq!(bed.probe("prod-client", ("prod-web", 8080, Udp)), "EPERM");

    // Deleting the policy lifts the isolation.
    let start = Instant::now();
    std::fs::remove_file(bed.state.path().join("policy.yaml")).context("remove policy.yaml")?;
    bed.wait_for(&[&agent], "prod-client", web, PROBE_COUNT, "ok");
    eprintln!("allowed again {:?} after the delete", start.elapsed());
    assert_eq!(bed.probe("prod-client", ("prod-web", 8080, Udp)), "ok");

    let log = agent.log();
    assert_eq!(
        log.matches("datapath ready").count(),
        1,
        "the agent restarted:\n{log}"
    );
    Ok(())
}

fn v4(addr: SocketAddr) -> SocketAddrV4 {
    match addr {
        SocketAddr::V4(v4) => v4,
        SocketAddr::V6(v6) => panic!("not an IPv4 address: {v6}"),
    }
}

/// A file whose existence keeps a background shell loop going; removed on drop.
struct RunFlag(PathBuf);

impl RunFlag {
    fn new(name: &str) -> Result<Self> {
        let path = std::env::temp_dir().join(format!("mesh-{name}-{}.run", std::process::id()));
        std::fs::write(&path, b"").with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for RunFlag {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Reads stdout lines of `child` until one equals `end` (within `timeout` in all) and
/// returns those before it.
fn lines_until(child: &mut ChildGuard, end: &str, timeout: Duration) -> Result<Vec<String>> {
    let deadline = Instant::now() + timeout;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = child.wait_for_stdout_line(left, |_| true)?;
        if line == end {
            return Ok(lines);
        }
        lines.push(line);
    }
}

#[test]
fn agent_restart_never_lets_denied_traffic_through() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = web_allowed_db_denied("perestart")?;
    let keep = ["--keep-datapath"];
    let first = bed.start_agent("n1", &keep)?;
    bed.wait_for(
        &[&first],
        "prod-client",
        ("prod-db", 8080, Tcp),
        PROBE_COUNT,
        "EPERM",
    );

    // A client dialling the denied db throughout the restart: batches of 2000 connects
    // (a refused connect takes microseconds, so one batch is far too short to span a
    // restart), 50 ms apart, while the flag file exists; bounded at 400 batches.
    let flag = RunFlag::new("perestart")?;
    let db = SocketAddr::from((bed.ip("prod-db"), 8080));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            r#"i=0
while [ -e "$1" ] && [ "$i" -lt 400 ]; do
  "$0" connect --addr "$2" --count 2000 --json || exit 1
  sleep 0.05
  i=$((i+1))
done
echo done"#,
        )
        .arg(testpod_bin()?)
        .arg(&flag.0)
        .arg(db.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut client = bed.pod("prod-client").spawn(cmd)?;
    // The client is dialling (its first batch is done) before the restart begins.
    let batch = |l: &str| l.starts_with('{');
    let mut lines = vec![client.wait_for_stdout_line(CONVERGE, batch)?];
    let _second = scenario::restart_under_load(
        first,
        bed.cluster.node("n1"),
        &bed.state,
        &keep,
        &mut client,
    )?;
    // A few more batches against the new agent, then stop.
    for _ in 0..3 {
        lines.push(client.wait_for_stdout_line(CONVERGE, batch)?);
    }
    drop(flag);
    lines.extend(lines_until(&mut client, "done", Duration::from_secs(30))?);
    let mut total = ConnectSummary::default();
    for line in &lines {
        let s: ConnectSummary =
            serde_json::from_str(line).with_context(|| format!("parse {line:?}"))?;
        total.attempts += s.attempts;
        total.ok += s.ok;
        for (k, v) in s.errors {
            *total.errors.entry(k).or_default() += v;
        }
        total.by_backend.extend(s.by_backend);
    }
    eprintln!("{} batches, {} attempts", lines.len(), total.attempts);
    assert!(lines.len() >= 3, "too few batches: {lines:?}");
    assert_eq!(
        total.ok, 0,
        "denied connections got through across the restart: {total:?}"
    );
    assert_eq!(
        total.errors,
        BTreeMap::from([("EPERM".to_owned(), total.attempts)]),
        "{total:?}"
    );
    // The adopted datapath still tells allowed from denied.
    assert_eq!(bed.probe("prod-client", ("prod-web", 8080, Tcp)), "ok");
    assert_eq!(bed.probe("prod-client", ("prod-db", 8080, Tcp)), "EPERM");
    Ok(())
}

#[test]
fn a_new_pod_process_is_covered_within_the_discovery_window() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PORT: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "prod-db", "10.244.1.12", "app: db", PORT),
    ];
    // No anchor: the client pod has no process when the agent starts.
    let bed = Bed::new("pediscover", &["n1"], PODS)?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state
        .write("policy.yaml", &client_egress_policy("client-deny-all", ""))?;
    let agent = bed.start_agent("n1", &[])?;

    // The pod's first process: a shell dialling the denied db once every 100 ms. The
    // agent finds a pod's netns only through a process in it, by scanning its cgroup
    // every ~1 s (and on state changes): until that scan the pod is unknown and, like a
    // pod no policy selects, unrestricted. That is the discovery window; it must close
    // within the bound, and stay closed.
    let db = SocketAddr::from((bed.ip("prod-db"), 8080));
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(
            r#"i=0
while [ "$i" -lt 200 ]; do
  "$0" connect --addr "$1" --count 1 --json || exit 1
  sleep 0.1
  i=$((i+1))
done
echo done"#,
        )
        .arg(testpod_bin()?)
        .arg(db.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let start = Instant::now();
    let mut client = bed.pod("prod-client").spawn(cmd)?;
    let deadline = start + CONVERGE;
    let mut before = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = client.wait_for_stdout_line(left, |l| l.starts_with('{')).with_context(|| {
            format!(
                "no EPERM within {CONVERGE:?} of the pod's first process; outcomes so far: {before:?}\nagent log:\n{}",
                agent.log()
            )
        })?;
        let s: ConnectSummary =
            serde_json::from_str(&line).with_context(|| format!("parse {line:?}"))?;
        match outcome(&s, Tcp, 1, "prod-db").as_str() {
            "EPERM" => break,
            other => before.push(other.to_owned()),
        }
    }
    eprintln!(
        "covered {:?} after the pod's first process started ({} connections before)",
        start.elapsed(),
        before.len()
    );
    // Before coverage the pod is simply not yet known: its connections go through.
    assert!(before.iter().all(|o| o == "ok"), "{before:?}");
    // Once covered, it stays covered.
    for _ in 0..5 {
        let line = client.wait_for_stdout_line(Duration::from_secs(5), |l| l.starts_with('{'))?;
        let s: ConnectSummary =
            serde_json::from_str(&line).with_context(|| format!("parse {line:?}"))?;
        assert_eq!(outcome(&s, Tcp, 1, "prod-db"), "EPERM", "{s:?}");
    }
    Ok(())
}

#[test]
fn loopback_inside_an_isolated_pod_is_not_policed() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PORT: &[(&str, u16, &str)] = &[("http", 8080, "TCP")];
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", PORT),
        pod("n1", "prod", "prod-db", "10.244.1.12", "app: db", PORT),
    ];
    let bed = Bed::new("peloop", &["n1"], PODS)?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    // web may send nowhere and receive from nobody.
    bed.state.write(
        "policy.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-isolated, namespace: prod}
spec: {podSelector: {matchLabels: {app: web}}, policyTypes: [Ingress, Egress]}
",
    )?;
    let [agent] = bed.start_agents(["n1"])?;
    bed.wait_for(&[&agent], "prod-web", ("prod-db", 8080, Tcp), 1, "EPERM");
    // Its own loopback is still its own (Kubernetes policies never cover it): both the
    // connect (egress) and the SYN it receives (ingress) pass.
    for addr in ["127.0.0.1:8080", "[::1]:8080"] {
        let s = bed.dial("prod-web", addr.parse()?, Tcp, PROBE_COUNT)?;
        assert_eq!(
            outcome(&s, Tcp, PROBE_COUNT, "prod-web"),
            "ok",
            "prod-web -> {addr} over loopback"
        );
    }
    Ok(())
}
