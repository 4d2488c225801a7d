//! Kubernetes NetworkPolicy, ingress side, end to end (root only): the agent on the
//! DESTINATION pod's node judges new inbound flows (TCP SYN without ACK, and UDP
//! datagrams from a peer the receiving socket has not sent to) in a cgroup_skb/ingress
//! program, by the identity of the destination pod (found by IP) and of the source
//! address; a denied flow is DROPPED, so the client sees a connect timeout (TCP) or no
//! reply (UDP), never an error code. Replies to a pod's own connections always pass.
//!
//! Every cluster here has two nodes with an agent on each, so clients dial both from
//! the destination's node and from the other one. Denied probes are expected to time
//! out, so clients run with a short per-step timeout ([`TIMEOUT_MS`]) and the clients of
//! a matrix probe in parallel; an "ok" exchange takes well under a millisecond here.
//!
//! As in `policy_egress.rs`, every pod without a server gets an idle "anchor" process
//! (the agent only knows a pod's netns while a process lives in it; ingress finds its
//! subject by IP and does not need that, but egress, also in force here, does), and
//! each test waits until one known-denied probe is dropped before asserting anything.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Pod, StateDir, agent, eventually, require_root,
    testpod::{self, ConnectSummary, HoldReport, HoldStarted},
    testpod_bin,
};

/// Bound on every convergence wait (state applied, policy in force). Generous: the
/// targets (about a second) are measured by benchmarks, not asserted here.
const CONVERGE: Duration = Duration::from_secs(10);
/// Exchanges per matrix probe.
const PROBE_COUNT: u32 = 2;
/// Per-step timeout of the probing clients (connect, send, receive): what a dropped
/// SYN or datagram costs.
const TIMEOUT_MS: u64 = 300;
/// Outcome of a probe whose every exchange timed out where a dropped first packet shows.
const DROPPED: &str = "dropped";

/// Namespaces of every test's state. `kubernetes.io/metadata.name` is not written: the
/// agent adds it, as the API server does.
const NAMESPACES: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: prod, labels: {team: a}}
---
apiVersion: v1
kind: Namespace
metadata: {name: dev, labels: {team: b}}
---
apiVersion: v1
kind: Namespace
metadata: {name: kube-system}
";

/// Default deny ingress for every pod of prod: isolated, no rule.
const DENY_PROD_INGRESS: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

/// Container ports `(name, port, protocol)`.
type Ports = &'static [(&'static str, u16, &'static str)];

/// prod/web's ports: 8080 named "http" over both protocols (in two containers, since
/// port names are unique per container), and 9090.
const WEB_PORTS: Ports = &[
    ("http", 8080, "TCP"),
    ("http", 8080, "UDP"),
    ("metrics", 9090, "TCP"),
];
const HTTP_PORTS: Ports = &[("http", 8080, "TCP"), ("http", 8080, "UDP")];

/// A pod of the test bed.
#[derive(Clone, Copy, Debug)]
struct PodDef {
    node: &'static str,
    /// Pod name, in the test bed and in the state (`metadata.name`).
    name: &'static str,
    ip: &'static str,
    /// Namespace in the state; `None`: a pod of the test bed that is NOT in the state,
    /// i.e. an address that is no pod (a "host" outside the cluster, for ipBlocks).
    namespace: Option<&'static str>,
    /// Labels as the body of a YAML flow mapping, e.g. `app: web, tier: front`.
    labels: &'static str,
    /// Container ports; every distinct port is served over TCP and UDP by a
    /// `mesh-testpod serve` announcing the pod's name. A pod without ports gets an
    /// idle anchor process instead.
    ports: Ports,
}

const fn pod(
    node: &'static str,
    namespace: &'static str,
    name: &'static str,
    ip: &'static str,
    labels: &'static str,
    ports: Ports,
) -> PodDef {
    PodDef {
        node,
        name,
        ip,
        namespace: Some(namespace),
        labels,
        ports,
    }
}

/// A test bed pod that is not in the state: an address outside the cluster.
const fn host(node: &'static str, name: &'static str, ip: &'static str) -> PodDef {
    PodDef {
        node,
        name,
        ip,
        namespace: None,
        labels: "",
        ports: &[],
    }
}

/// How a probe talks to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    /// TCP: connect, name line, echo.
    Tcp,
    /// One connected UDP socket per exchange (`connect --udp`).
    Udp,
    /// One unconnected UDP socket, `sendto` + `recvfrom` (`udp-query`).
    UdpQuery,
}

use Mode::{Tcp, Udp, UdpQuery};

/// One probe of a matrix: destination pod, port, mode.
type Probe = (&'static str, u16, Mode);

fn key((to, port, mode): Probe) -> String {
    let mode = match mode {
        Tcp => "TCP",
        Udp => "UDP",
        UdpQuery => "UDP-sendto",
    };
    format!("{to}:{port}/{mode}")
}

/// Runs `count` exchanges of `mode` from `from` to `addr`, each step bounded by
/// [`TIMEOUT_MS`].
fn dial(from: &Pod, addr: SocketAddr, mode: Mode, count: u32) -> Result<ConnectSummary> {
    let (command, extra): (&str, &[&str]) = match mode {
        Tcp => ("connect", &[]),
        Udp => ("connect", &["--udp"]),
        UdpQuery => ("udp-query", &[]),
    };
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        command,
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
        "--timeout-ms",
        &TIMEOUT_MS.to_string(),
        "--json",
    ])
    .args(extra);
    testpod::parse_json(&from.run(cmd)?)
        .with_context(|| format!("{command} {extra:?} from pod {} to {addr}", from.name()))
}

/// "ok" when all `count` exchanges reached `backend`; [`DROPPED`] when every exchange
/// timed out at the step where a dropped first packet shows (connect for TCP, the
/// receive of the reply for UDP); "EPERM" when every attempt was refused at once (an
/// egress deny); anything else described in full.
fn outcome(s: &ConnectSummary, mode: Mode, count: u32, backend: &str) -> String {
    let count = u64::from(count);
    let only = |key: &str| s.errors.len() == 1 && s.errors.get(key) == Some(&count);
    let first_step = |step: &str| {
        s.first_error
            .as_deref()
            .is_some_and(|e| e.contains(&format!(": {step}: ")))
    };
    let all_to = s.by_backend.get(backend) == Some(&count) && s.by_backend.len() == 1;
    if s.attempts == count && s.ok == count && all_to {
        return "ok".to_owned();
    }
    if s.attempts == count && s.ok == 0 && only("ETIMEDOUT") {
        let at_first_packet = match mode {
            Tcp => s.connect_errno_first.as_deref() == Some("ETIMEDOUT"),
            Udp => s.connect_errno_first.is_none() && first_step("recv"),
            UdpQuery => first_step("recvfrom"),
        };
        if at_first_packet {
            return DROPPED.to_owned();
        }
    }
    if s.attempts == count && s.ok == 0 && only("EPERM") {
        return "EPERM".to_owned();
    }
    format!(
        "attempts={} ok={} by_backend={:?} errors={:?} connect_errno_first={:?} first_error={:?}",
        s.attempts, s.ok, s.by_backend, s.errors, s.connect_errno_first, s.first_error
    )
}

/// The outcome of `count` exchanges from pod `from` to pod `to` of `cluster`.
fn probe_pod(cluster: &Cluster, from: &str, (to, port, mode): Probe, count: u32) -> String {
    let addr = SocketAddr::from((cluster.pod(to).ip(), port));
    match dial(cluster.pod(from), addr, mode, count) {
        Ok(s) => outcome(&s, mode, count, to),
        Err(e) => format!("probe failed: {e:#}"),
    }
}

/// `from -> to:port/MODE` → outcome.
type Matrix = BTreeMap<String, String>;

/// Every probe from every client, the clients in parallel (each one's probes in
/// sequence), so that dropped probes cost their timeouts only once per client.
fn matrix(cluster: &Cluster, clients: &[&str], probes: &[Probe]) -> Matrix {
    std::thread::scope(|scope| {
        let handles: Vec<_> = clients
            .iter()
            .map(|&from| {
                scope.spawn(move || {
                    probes
                        .iter()
                        .map(|&p| {
                            (
                                format!("{from} -> {}", key(p)),
                                probe_pod(cluster, from, p, PROBE_COUNT),
                            )
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("probe thread panicked"))
            .collect()
    })
}

/// The expected matrix: for each client, the probes that are "ok"; every other probe
/// of `probes` is [`DROPPED`].
fn expect(rows: &[(&str, &[Probe])], probes: &[Probe]) -> Matrix {
    let mut m = Matrix::new();
    for &(from, allowed) in rows {
        for &p in probes {
            let outcome = if allowed.contains(&p) { "ok" } else { DROPPED };
            m.insert(format!("{from} -> {}", key(p)), outcome.to_owned());
        }
    }
    m
}

/// Panics with every difference between `got` and `want`, and both in full.
fn assert_matrix(got: &Matrix, want: &Matrix, what: &str) {
    if got == want {
        return;
    }
    let mut diff = String::new();
    for (k, w) in want {
        let g = got.get(k).map_or("(not probed)", String::as_str);
        if g != w {
            let _ = writeln!(diff, "  {k}: expected {w}, got {g}");
        }
    }
    for k in got.keys().filter(|k| !want.contains_key(*k)) {
        let _ = writeln!(diff, "  {k}: unexpected probe");
    }
    let mut full = String::new();
    for (k, g) in got {
        let _ = writeln!(full, "  {k}: {g}");
    }
    panic!("{what}: the observed matrix differs:\n{diff}observed:\n{full}");
}

/// A cluster whose pods serve their ports, and a state directory.
struct Bed {
    // Field order is drop order: processes and state before the cluster.
    _anchors: Vec<ChildGuard>,
    _servers: Vec<ChildGuard>,
    state: StateDir,
    pods: Vec<PodDef>,
    cluster: Cluster,
}

impl Bed {
    /// Nodes n1 and n2, `pods`, their servers, and an idle process in every pod
    /// without a server.
    fn new(prefix: &str, pods: &[PodDef]) -> Result<Self> {
        let mut builder = Cluster::builder(prefix).node("n1").node("n2");
        for p in pods {
            builder = builder.pod(p.node, p.name, p.ip);
        }
        let cluster = builder.build()?;
        let mut servers = Vec::new();
        let mut anchors = Vec::new();
        for p in pods {
            let mut ports: Vec<u16> = p.ports.iter().map(|&(_, port, _)| port).collect();
            ports.sort_unstable();
            ports.dedup();
            for &port in &ports {
                servers.push(testpod::start_server(cluster.pod(p.name), port, p.name)?);
            }
            if ports.is_empty() {
                let mut cmd = Command::new("sleep");
                cmd.arg("600").stdin(Stdio::null()).stdout(Stdio::null());
                anchors.push(cluster.pod(p.name).spawn(cmd)?);
            }
        }
        Ok(Self {
            _anchors: anchors,
            _servers: servers,
            state: StateDir::new(prefix)?,
            pods: pods.to_vec(),
            cluster,
        })
    }

    fn pod(&self, name: &str) -> &Pod {
        self.cluster.pod(name)
    }

    /// The Namespaces and every Pod of the bed that is in the state.
    fn pods_yaml(&self) -> String {
        let mut yaml = NAMESPACES.to_owned();
        for p in &self.pods {
            let Some(namespace) = p.namespace else {
                continue;
            };
            let node = agent::node_name(self.cluster.node(p.node));
            // One container per protocol: port names are unique per container.
            let mut containers = String::new();
            for (container, proto) in [("main", "TCP"), ("main-udp", "UDP")] {
                let ports: Vec<String> = p
                    .ports
                    .iter()
                    .filter(|&&(_, _, pr)| pr == proto)
                    .map(|(name, port, proto)| {
                        format!("{{name: {name}, containerPort: {port}, protocol: {proto}}}")
                    })
                    .collect();
                if !ports.is_empty() || (proto == "TCP" && p.ports.is_empty()) {
                    let _ = write!(
                        containers,
                        "
  - name: {container}
    image: mesh-testpod
    ports: [{}]",
                        ports.join(", ")
                    );
                }
            }
            let _ = write!(
                yaml,
                "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {namespace}, labels: {{{labels}}}}}
spec:
  nodeName: {node}
  containers:{containers}
status: {{podIP: {ip}}}
",
                name = p.name,
                labels = p.labels,
                ip = p.ip,
            );
        }
        yaml
    }

    /// Starts the agents of n1 and n2 over the state written so far.
    fn start_agents(&self) -> Result<[Agent; 2]> {
        let start = |node| Agent::start(self.cluster.node(node), self.state.path());
        Ok([start("n1")?, start("n2")?])
    }

    /// Probes `from` → `probe` (one exchange at a time) until the outcome is `want`,
    /// within [`CONVERGE`]; panics with the last outcome otherwise.
    fn wait_for(&self, from: &str, probe: Probe, want: &str) {
        let mut last = String::new();
        let reached = eventually(CONVERGE, || {
            last = probe_pod(&self.cluster, from, probe, 1);
            last == want
        });
        assert!(
            reached,
            "{from} -> {} never became {want} within {CONVERGE:?}; last outcome: {last}",
            key(probe)
        );
    }

    fn probe(&self, from: &str, probe: Probe) -> String {
        probe_pod(&self.cluster, from, probe, PROBE_COUNT)
    }
}

#[test]
fn ingress_reachability_matrix_follows_the_policies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // The destinations live on n1; clients on n1 (same node) and n2 (the other node).
    const PODS: &[PodDef] = &[
        pod(
            "n1",
            "prod",
            "prod-web",
            "10.244.1.11",
            "app: web",
            WEB_PORTS,
        ),
        pod(
            "n1",
            "prod",
            "prod-api",
            "10.244.1.12",
            "app: api",
            HTTP_PORTS,
        ),
        pod("n1", "dev", "dev-client", "10.244.1.20", "app: client", &[]),
        pod(
            "n1",
            "kube-system",
            "ks-monitor",
            "10.244.1.30",
            "app: monitor",
            &[],
        ),
        pod(
            "n2",
            "prod",
            "prod-client",
            "10.244.2.10",
            "app: client",
            &[],
        ),
        // kube-system but not app=monitor, and app=monitor but not in kube-system.
        pod(
            "n2",
            "kube-system",
            "ks-other",
            "10.244.2.31",
            "app: other",
            &[],
        ),
        pod(
            "n2",
            "dev",
            "dev-monitor",
            "10.244.2.32",
            "app: monitor",
            &[],
        ),
        // Addresses that are no pod: inside the ipBlock, excepted, outside it.
        host("n2", "host-in", "10.244.2.50"),
        host("n2", "host-except", "10.244.2.51"),
        host("n2", "host-out", "10.244.2.70"),
        // A Pod whose address lies inside the ipBlock: it is its pod identity.
        pod("n2", "dev", "dev-inside", "10.244.2.52", "app: inside", &[]),
    ];
    let bed = Bed::new("pimatrix", PODS)?;
    // (b) same-namespace pods on the named port "http": `{port: http}` means TCP, the
    // UDP one is asked for explicitly; named ports resolve per protocol.
    // (c) without policyTypes: defaults to [Ingress].
    // (d) `{port: 8080}` without protocol: TCP.
    let policies = format!(
        "{DENY_PROD_INGRESS}---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-prod, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{}}}}]
    ports: [{{port: http}}, {{protocol: UDP, port: http}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-monitor, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  ingress:
  - from:
    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: kube-system}}}}
      podSelector: {{matchLabels: {{app: monitor}}}}
    ports: [{{port: 9090, endPort: 9095}}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-from-hosts, namespace: prod}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: 10.244.2.48/28, except: [10.244.2.51/32]}}}}]
    ports: [{{port: 8080}}]
"
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policies.yaml", &policies)?;
    let _agents = bed.start_agents()?;
    bed.wait_for("dev-client", ("prod-api", 8080, Tcp), DROPPED);
    bed.wait_for("prod-client", ("prod-web", 8080, Tcp), "ok");

    let probes: &[Probe] = &[
        ("prod-web", 8080, Tcp),
        ("prod-web", 8080, Udp),
        ("prod-web", 8080, UdpQuery),
        ("prod-web", 9090, Tcp),
        ("prod-web", 9090, Udp),
        ("prod-api", 8080, Tcp),
    ];
    let clients = [
        "prod-client",
        "dev-client",
        "ks-monitor",
        "ks-other",
        "dev-monitor",
        "host-in",
        "host-except",
        "host-out",
        "dev-inside",
    ];
    let expected = expect(
        &[
            // (b): 8080 over TCP and UDP; prod/api is isolated by (a) and allows nobody.
            (
                "prod-client",
                &[
                    ("prod-web", 8080, Tcp),
                    ("prod-web", 8080, Udp),
                    ("prod-web", 8080, UdpQuery),
                ],
            ),
            // A podSelector alone picks pods of the policy's namespace only.
            ("dev-client", &[]),
            // (c): kube-system AND app=monitor, 9090-9095 over TCP only.
            ("ks-monitor", &[("prod-web", 9090, Tcp)]),
            ("ks-other", &[]),
            ("dev-monitor", &[]),
            // (d): in the block, not excepted, TCP 8080 only.
            ("host-in", &[("prod-web", 8080, Tcp)]),
            ("host-except", &[]),
            ("host-out", &[]),
            // A pod address is its pod's identity, never a CIDR identity.
            ("dev-inside", &[]),
        ],
        probes,
    );
    assert_matrix(
        &matrix(&bed.cluster, &clients, probes),
        &expected,
        "ingress of prod/web and prod/api",
    );
    Ok(())
}

#[test]
fn an_egress_only_policy_does_not_isolate_ingress() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PODS: &[PodDef] = &[
        pod(
            "n1",
            "prod",
            "prod-web",
            "10.244.1.11",
            "app: web",
            HTTP_PORTS,
        ),
        pod(
            "n1",
            "dev",
            "dev-near",
            "10.244.1.20",
            "app: client",
            HTTP_PORTS,
        ),
        pod(
            "n2",
            "dev",
            "dev-far",
            "10.244.2.20",
            "app: client",
            HTTP_PORTS,
        ),
    ];
    let bed = Bed::new("piegronly", PODS)?;
    // Default deny EGRESS for every pod of prod: isolated for egress only.
    let egress_only = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Egress]
";
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", egress_only)?;
    let [n1, _n2] = bed.start_agents()?;
    // The egress policy is in force: prod/web may not dial out.
    let web = bed.pod("prod-web");
    bed.wait_for("prod-web", ("dev-near", 8080, Tcp), "EPERM");
    assert_eq!(bed.probe("prod-web", ("dev-far", 8080, Udp)), "EPERM");

    let probes: &[Probe] = &[
        ("prod-web", 8080, Tcp),
        ("prod-web", 8080, Udp),
        ("prod-web", 8080, UdpQuery),
    ];
    let clients = ["dev-near", "dev-far"];
    // Ingress is not isolated: everything reaches prod/web. Its answers are replies
    // (over TCP, and over UDP the datagrams its server sends back to the peer that
    // asked), which NetworkPolicy never blocks, egress isolation or not.
    let open = matrix(&bed.cluster, &clients, probes);

    // Without policyTypes, a policy is for Ingress (always) and Egress (as it has egress
    // rules): the same pods become isolated for ingress, with no ingress rule.
    let defaulted = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-egress, namespace: prod}
spec:
  podSelector: {}
  egress:
  - to: [{namespaceSelector: {}}]
";
    let applied = n1.applied_count();
    bed.state.write("policy.yaml", defaulted)?;
    assert!(
        eventually(CONVERGE, || n1.applied_count() > applied),
        "the agent did not re-apply"
    );
    bed.wait_for("dev-far", ("prod-web", 8080, Tcp), DROPPED);
    let isolated = matrix(&bed.cluster, &clients, probes);
    // And prod/web may dial out again (egress to every pod).
    let out = dial(
        web,
        SocketAddr::from((bed.pod("dev-far").ip(), 8080)),
        Tcp,
        1,
    )?;

    // TCP first: the ingress verdict proper (a SYN-ACK is no new flow for egress).
    let tcp_only = |m: &Matrix| -> Matrix {
        m.iter()
            .filter(|(k, _)| k.ends_with("/TCP"))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let tcp: &[Probe] = &[("prod-web", 8080, Tcp)];
    assert_matrix(
        &tcp_only(&open),
        &expect(&[("dev-near", tcp), ("dev-far", tcp)], tcp),
        "policyTypes [Egress] only: ingress stays open",
    );
    assert_matrix(
        &isolated,
        &expect(&[("dev-near", &[]), ("dev-far", &[])], probes),
        "no policyTypes, egress rules only: defaults to [Ingress, Egress]",
    );
    assert_eq!(outcome(&out, Tcp, 1, "dev-far"), "ok", "egress of prod/web");
    // Then UDP: the datagrams reach prod/web's server (ingress open), and its answers
    // are replies, which egress isolation must not refuse either (a server's sendto()
    // back to the peer that just sent to that socket). A "dropped" here with "udp reply
    // to ...: Operation not permitted" from `mesh-testpod serve` on stderr means the
    // egress hook refused the reply with EPERM.
    assert_matrix(
        &open,
        &expect(&[("dev-near", probes), ("dev-far", probes)], probes),
        "policyTypes [Egress] only: UDP request/reply to prod/web (replies of an egress-isolated server)",
    );
    Ok(())
}

#[test]
fn replies_to_an_ingress_isolated_pod_pass() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PODS: &[PodDef] = &[
        // Isolated for ingress with no rule; serves 7000 to show that it is.
        pod(
            "n1",
            "prod",
            "prod-iso",
            "10.244.1.10",
            "app: client",
            &[("svc", 7000, "TCP"), ("svc-udp", 7000, "UDP")],
        ),
        pod(
            "n1",
            "dev",
            "dev-near",
            "10.244.1.20",
            "app: srv",
            HTTP_PORTS,
        ),
        pod(
            "n2",
            "dev",
            "dev-far",
            "10.244.2.20",
            "app: srv",
            HTTP_PORTS,
        ),
    ];
    let bed = Bed::new("pireplies", PODS)?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", DENY_PROD_INGRESS)?;
    let _agents = bed.start_agents()?;
    bed.wait_for("dev-far", ("prod-iso", 7000, Tcp), DROPPED);

    // Nobody reaches prod/iso...
    let inbound: &[Probe] = &[
        ("prod-iso", 7000, Tcp),
        ("prod-iso", 7000, Udp),
        ("prod-iso", 7000, UdpQuery),
    ];
    assert_matrix(
        &matrix(&bed.cluster, &["dev-near", "dev-far"], inbound),
        &expect(&[("dev-near", &[]), ("dev-far", &[])], inbound),
        "inbound to prod/iso",
    );
    // ...but everything prod/iso dials answers: TCP (SYN-ACK and the rest), connected
    // UDP (a fresh socket per exchange) and unconnected UDP (one socket, many replies).
    let count = 10;
    let iso = bed.pod("prod-iso");
    for to in ["dev-near", "dev-far"] {
        let addr = SocketAddr::from((bed.pod(to).ip(), 8080));
        for mode in [Tcp, Udp, UdpQuery] {
            let s = dial(iso, addr, mode, count)?;
            assert_eq!(
                outcome(&s, mode, count, to),
                "ok",
                "prod/iso -> {to}:8080 over {mode:?}: replies must pass"
            );
        }
    }
    // A long-lived connection: every segment after the handshake is a reply or carries
    // an ACK, none is judged.
    let addr = SocketAddr::from((bed.pod("dev-far").ip(), 8080));
    let mut hold =
        testpod::spawn_hold(iso, addr, Duration::from_secs(2), Duration::from_millis(50))?;
    let started: HoldStarted = testpod::next_json_line(&mut hold, Duration::from_secs(5))?;
    assert_eq!(started.backend, "dev-far");
    let report: HoldReport = testpod::next_json_line(&mut hold, Duration::from_secs(10))?;
    assert_eq!(report.errors, 0, "{report:?}");
    assert!(report.echoes_ok >= 10, "{report:?}");
    Ok(())
}

#[test]
fn ingress_through_a_service_is_judged_at_the_backend() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
    const PODS: &[PodDef] = &[
        pod(
            "n1",
            "prod",
            "prod-web",
            "10.244.1.11",
            "app: web",
            HTTP_PORTS,
        ),
        pod(
            "n2",
            "prod",
            "prod-client",
            "10.244.2.10",
            "app: client",
            &[],
        ),
        pod("n1", "prod", "prod-other", "10.244.1.20", "app: other", &[]),
        pod("n2", "dev", "dev-client", "10.244.2.20", "app: client", &[]),
    ];
    let bed = Bed::new("pisvc", PODS)?;
    let service = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: prod}}
spec:
  clusterIP: {VIP}
  selector: {{app: web}}
  ports:
  - {{name: http, port: 80, targetPort: 8080, protocol: TCP}}
  - {{name: http-udp, port: 80, targetPort: 8080, protocol: UDP}}
"
    );
    let policy = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-clients, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
";
    bed.state
        .write("pods.yaml", &format!("{}{service}", bed.pods_yaml()))?;
    bed.state.write("policy.yaml", policy)?;
    let _agents = bed.start_agents()?;
    let vip = |from: &str, mode: Mode, count: u32| -> Result<String> {
        let s = dial(bed.pod(from), SocketAddr::from((VIP, 80)), mode, count)?;
        let o = outcome(&s, mode, count, "prod-web");
        // Through the mesh the application sees the VIP, never the backend.
        if o == "ok" && s.peers.keys().any(|p| p != "10.96.0.10:80") {
            return Ok(format!("ok, but seen from {:?}", s.peers));
        }
        Ok(o)
    };
    let mut last = String::new();
    assert!(
        eventually(CONVERGE, || {
            last = vip("prod-other", Tcp, 1).unwrap_or_else(|e| format!("{e:#}"));
            last == DROPPED
        }),
        "prod/other -> VIP never dropped; last outcome: {last}"
    );

    let mut got = Matrix::new();
    for from in ["prod-client", "prod-other", "dev-client"] {
        for mode in [Tcp, Udp, UdpQuery] {
            got.insert(
                format!("{from} -> VIP:80/{mode:?}"),
                vip(from, mode, PROBE_COUNT)?,
            );
        }
    }
    let mut want = Matrix::new();
    for (from, o) in [
        ("prod-client", "ok"),
        // app=other, and app=client of another namespace.
        ("prod-other", DROPPED),
        ("dev-client", DROPPED),
    ] {
        for mode in [Tcp, Udp, UdpQuery] {
            want.insert(format!("{from} -> VIP:80/{mode:?}"), o.to_owned());
        }
    }
    assert_matrix(&got, &want, "ingress of prod/web through its Service");
    Ok(())
}

#[test]
fn ingress_policy_updates_apply_without_a_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PODS: &[PodDef] = &[
        pod(
            "n1",
            "prod",
            "prod-web",
            "10.244.1.11",
            "app: web",
            HTTP_PORTS,
        ),
        pod(
            "n1",
            "prod",
            "prod-api",
            "10.244.1.12",
            "app: api",
            HTTP_PORTS,
        ),
        pod("n2", "dev", "dev-client", "10.244.2.20", "app: client", &[]),
    ];
    let bed = Bed::new("piupdate", PODS)?;
    // prod/web stays isolated by its own policy (same namespace only) throughout; the
    // default deny is what isolates prod/api.
    let web_policy = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-from-prod, namespace: prod}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {}}]
";
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("web.yaml", web_policy)?;
    bed.state.write("deny.yaml", DENY_PROD_INGRESS)?;
    let agents = bed.start_agents()?;
    let api: Probe = ("prod-api", 8080, Tcp);
    let api_udp: Probe = ("prod-api", 8080, Udp);
    let web: Probe = ("prod-web", 8080, Tcp);
    bed.wait_for("dev-client", api, DROPPED);
    assert_eq!(bed.probe("dev-client", api_udp), DROPPED);
    assert_eq!(bed.probe("dev-client", web), DROPPED);

    // Default deny off: prod/api is no longer isolated.
    std::fs::remove_file(bed.state.path().join("deny.yaml")).context("remove deny.yaml")?;
    bed.wait_for("dev-client", api, "ok");
    assert_eq!(bed.probe("dev-client", api), "ok");
    assert_eq!(bed.probe("dev-client", api_udp), "ok");
    assert_eq!(bed.probe("dev-client", web), DROPPED, "web's own policy");

    // And on again.
    bed.state.write("deny.yaml", DENY_PROD_INGRESS)?;
    bed.wait_for("dev-client", api, DROPPED);
    assert_eq!(bed.probe("dev-client", api), DROPPED);
    assert_eq!(bed.probe("dev-client", api_udp), DROPPED);
    assert_eq!(bed.probe("dev-client", web), DROPPED, "web's own policy");

    for agent in &agents {
        let log = agent.log();
        assert_eq!(
            log.matches("datapath ready").count(),
            1,
            "the agent {} restarted:\n{log}",
            agent.pin_name()
        );
    }
    Ok(())
}
