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
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{
    eventually, require_root,
    scenario::{
        Bed, CONVERGE, DROPPED, Matrix, Mode, PROBE_COUNT, PodDef, Ports, Probe, assert_matrix,
        expect_matrix, host, outcome, pod,
    },
    testpod::{self, HoldReport, HoldStarted},
};

use Mode::{Tcp, Udp, UdpQuery};

/// Per-step timeout of the probing clients (connect, send, receive): what a dropped
/// SYN or datagram costs.
const TIMEOUT: Duration = Duration::from_millis(300);

/// Default deny ingress for every pod of prod: isolated, no rule.
const DENY_PROD_INGRESS: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: default-deny-ingress, namespace: prod}
spec:
  podSelector: {}
  policyTypes: [Ingress]
";

/// prod/web's ports: 8080 named "http" over both protocols (in two containers, since
/// port names are unique per container), and 9090.
const WEB_PORTS: Ports = &[
    ("http", 8080, "TCP"),
    ("http", 8080, "UDP"),
    ("metrics", 9090, "TCP"),
];
const HTTP_PORTS: Ports = &[("http", 8080, "TCP"), ("http", 8080, "UDP")];

/// Nodes n1 and n2, `pods`, their servers, and an idle process in every pod
/// without a server; clients time out after [`TIMEOUT`].
fn bed(prefix: &str, pods: &[PodDef]) -> Result<Bed> {
    let mut bed = Bed::new(prefix, &["n1", "n2"], pods)?.with_client_timeout(TIMEOUT);
    bed.anchor_idle_pods()?;
    Ok(bed)
}

/// The expected matrix: for each client, the probes that are "ok"; every other probe
/// of `probes` is [`DROPPED`].
fn expect(rows: &[(&str, &[Probe])], probes: &[Probe]) -> Matrix {
    expect_matrix(rows, probes, DROPPED)
}

#[test]
fn ingress_reachability_matrix_follows_the_policies() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // The destinations live on n1; clients on n1 (same node) and n2 (the other node).
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", WEB_PORTS),
        pod("n1", "prod", "prod-api", "10.244.1.12", "app: api", HTTP_PORTS),
        pod("n1", "dev", "dev-client", "10.244.1.20", "app: client", &[]),
        pod("n1", "kube-system", "ks-monitor", "10.244.1.30", "app: monitor", &[]),
        pod("n2", "prod", "prod-client", "10.244.2.10", "app: client", &[]),
        // kube-system but not app=monitor, and app=monitor but not in kube-system.
        pod("n2", "kube-system", "ks-other", "10.244.2.31", "app: other", &[]),
        pod("n2", "dev", "dev-monitor", "10.244.2.32", "app: monitor", &[]),
        // Addresses that are no pod: inside the ipBlock, excepted, outside it.
        host("n2", "host-in", "10.244.2.50", &[]),
        host("n2", "host-except", "10.244.2.51", &[]),
        host("n2", "host-out", "10.244.2.70", &[]),
        // Pods whose addresses lie inside the ipBlock, sharing labels; the second one's
        // address is excepted.
        pod("n2", "dev", "dev-inside", "10.244.2.52", "app: inside", &[]),
        pod("n2", "dev", "dev-excepted", "10.244.2.53", "app: inside", &[]),
    ];
    let bed = bed("pimatrix", PODS)?;
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
  - from: [{{ipBlock: {{cidr: 10.244.2.48/28, except: [10.244.2.51/32, 10.244.2.53/32]}}}}]
    ports: [{{port: 8080}}]
"
    );
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policies.yaml", &policies)?;
    let _agents = bed.start_agents(["n1", "n2"])?;
    bed.wait_for(&[], "dev-client", ("prod-api", 8080, Tcp), 1, DROPPED);
    bed.wait_for(&[], "prod-client", ("prod-web", 8080, Tcp), 1, "ok");

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
        "dev-excepted",
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
            // Pod addresses are matched by ipBlocks like any other (upstream e2e
            // ingress ipBlock-with-except), across nodes: one in, its twin excepted.
            ("dev-inside", &[("prod-web", 8080, Tcp)]),
            ("dev-excepted", &[]),
        ],
        probes,
    );
    assert_matrix(
        &bed.matrix(&clients, probes),
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
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", HTTP_PORTS),
        pod("n1", "dev", "dev-near", "10.244.1.20", "app: client", HTTP_PORTS),
        pod("n2", "dev", "dev-far", "10.244.2.20", "app: client", HTTP_PORTS),
    ];
    let bed = bed("piegronly", PODS)?;
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
    let [n1, _n2] = bed.start_agents(["n1", "n2"])?;
    // The egress policy is in force: prod/web may not dial out.
    bed.wait_for(&[], "prod-web", ("dev-near", 8080, Tcp), 1, "EPERM");
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
    let open = bed.matrix(&clients, probes);

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
    bed.apply(&n1, "policy.yaml", defaulted)?;
    bed.wait_for(&[], "dev-far", ("prod-web", 8080, Tcp), 1, DROPPED);
    let isolated = bed.matrix(&clients, probes);
    // And prod/web may dial out again (egress to every pod).
    let out = bed.dial(
        "prod-web",
        SocketAddr::from((bed.ip("dev-far"), 8080)),
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
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        // Isolated for ingress with no rule; serves 7000 to show that it is.
        pod("n1", "prod", "prod-iso", "10.244.1.10", "app: client", &[("svc", 7000, "TCP"), ("svc-udp", 7000, "UDP")]),
        pod("n1", "dev", "dev-near", "10.244.1.20", "app: srv", HTTP_PORTS),
        pod("n2", "dev", "dev-far", "10.244.2.20", "app: srv", HTTP_PORTS),
    ];
    let bed = bed("pireplies", PODS)?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policy.yaml", DENY_PROD_INGRESS)?;
    let _agents = bed.start_agents(["n1", "n2"])?;
    bed.wait_for(&[], "dev-far", ("prod-iso", 7000, Tcp), 1, DROPPED);

    // Nobody reaches prod/iso...
    let inbound: &[Probe] = &[
        ("prod-iso", 7000, Tcp),
        ("prod-iso", 7000, Udp),
        ("prod-iso", 7000, UdpQuery),
    ];
    assert_matrix(
        &bed.matrix(&["dev-near", "dev-far"], inbound),
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
            let s = bed.dial("prod-iso", addr, mode, count)?;
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
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", HTTP_PORTS),
        pod("n2", "prod", "prod-client", "10.244.2.10", "app: client", &[]),
        pod("n1", "prod", "prod-other", "10.244.1.20", "app: other", &[]),
        pod("n2", "dev", "dev-client", "10.244.2.20", "app: client", &[]),
    ];
    let bed = bed("pisvc", PODS)?;
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
    let _agents = bed.start_agents(["n1", "n2"])?;
    let vip = |from: &str, mode: Mode, count: u32| -> Result<String> {
        let s = bed.dial(from, SocketAddr::from((VIP, 80)), mode, count)?;
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
    #[rustfmt::skip]
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "prod-web", "10.244.1.11", "app: web", HTTP_PORTS),
        pod("n1", "prod", "prod-api", "10.244.1.12", "app: api", HTTP_PORTS),
        pod("n2", "dev", "dev-client", "10.244.2.20", "app: client", &[]),
    ];
    let bed = bed("piupdate", PODS)?;
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
    let agents = bed.start_agents(["n1", "n2"])?;
    let api: Probe = ("prod-api", 8080, Tcp);
    let api_udp: Probe = ("prod-api", 8080, Udp);
    let web: Probe = ("prod-web", 8080, Tcp);
    bed.wait_for(&[], "dev-client", api, 1, DROPPED);
    assert_eq!(bed.probe("dev-client", api_udp), DROPPED);
    assert_eq!(bed.probe("dev-client", web), DROPPED);

    // Default deny off: prod/api is no longer isolated.
    std::fs::remove_file(bed.state.path().join("deny.yaml")).context("remove deny.yaml")?;
    bed.wait_for(&[], "dev-client", api, 1, "ok");
    assert_eq!(bed.probe("dev-client", api), "ok");
    assert_eq!(bed.probe("dev-client", api_udp), "ok");
    assert_eq!(bed.probe("dev-client", web), DROPPED, "web's own policy");

    // And on again.
    bed.state.write("deny.yaml", DENY_PROD_INGRESS)?;
    bed.wait_for(&[], "dev-client", api, 1, DROPPED);
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
