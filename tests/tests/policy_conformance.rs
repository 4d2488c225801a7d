//! Kubernetes NetworkPolicy conformance, truth-table style (root only): the cases of the
//! upstream e2e suite (kubernetes/kubernetes `test/e2e/network/netpol/network_policy.go`,
//! "Netpol NetworkPolicy between server and client", its UDP variants, and the ipBlock
//! cases) replayed on one test bed, each checked as a full reachability matrix.
//!
//! The layout is upstream's: namespaces x, y, z labelled `ns: <name>` (the agent adds
//! `kubernetes.io/metadata.name`, as the API server does), pods a, b, c in each,
//! labelled `pod: <name>`, serving 80 and 81 over TCP and UDP with the container ports
//! named `serve-<port>-<tcp|udp>`, and a Service per pod (`s-<ns>-<pod>`, selector
//! `pod: <name>`) as upstream creates. The nine pods are spread over two nodes, each
//! with its agent, so every matrix mixes same-node and cross-node pairs. Two hosts that
//! are no pods (`ext-in`, `ext-ex`, addresses of the test bed that the state does not
//! know) stand in for the world in the ipBlock cases on non-pod addresses.
//!
//! The expected matrices are written by hand from the upstream cases, with upstream's
//! rules (`ExpectPeer`, `ExpectAllIngress`, ...) applied to all nine pods (upstream now
//! creates only the pods a case needs; the rules are the same). A pod probing itself is
//! not judged, as upstream ignores loopback. A probe is reachable when the exchange
//! completes with the right pod; denied when refused at once (EPERM: egress policy) or
//! dropped (no answer: ingress policy); anything else is a failure of its own. As
//! upstream does, a probe that differs is probed again (here for up to
//! [`CONVERGE`]) before it counts as a failure: the agents apply within about a second.
//!
//! All cases run, and the test fails at the end with every failing case's matrices.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::Result;
use mesh_tests::{
    Agent,
    reachability::{Peer, Reachability},
    require_root,
    scenario::{Bed, CONVERGE, DROPPED, Dial, Mode, PodDef, Ports, host, pod},
};

use Mode::{Tcp, Udp};

/// Per-step timeout of the probing clients: what a dropped SYN or datagram costs.
const TIMEOUT: Duration = Duration::from_millis(300);
/// Probes in flight at a time (each is a short-lived client process).
const WORKERS: usize = 12;

/// Upstream's container ports: 80 and 81 over TCP and UDP.
const PORTS: Ports = &[
    ("serve-80-tcp", 80, "TCP"),
    ("serve-81-tcp", 81, "TCP"),
    ("serve-80-udp", 80, "UDP"),
    ("serve-81-udp", 81, "UDP"),
];

/// x/a is bed pod `x-a`; a, c of x and z and b of y on n1, the others on n2.
#[rustfmt::skip]
const PODS: &[PodDef] = &[
    pod("n1", "x", "x-a", "10.244.1.11", "pod: a", PORTS),
    pod("n2", "x", "x-b", "10.244.2.12", "pod: b", PORTS),
    pod("n1", "x", "x-c", "10.244.1.13", "pod: c", PORTS),
    pod("n2", "y", "y-a", "10.244.2.21", "pod: a", PORTS),
    pod("n1", "y", "y-b", "10.244.1.22", "pod: b", PORTS),
    pod("n2", "y", "y-c", "10.244.2.23", "pod: c", PORTS),
    pod("n1", "z", "z-a", "10.244.1.31", "pod: a", PORTS),
    pod("n2", "z", "z-b", "10.244.2.32", "pod: b", PORTS),
    pod("n1", "z", "z-c", "10.244.1.33", "pod: c", PORTS),
    // No pods: inside EXT_CIDR, and the address EXT_CIDR excepts.
    host("n2", "ext-in", "10.244.2.200", PORTS),
    host("n2", "ext-ex", "10.244.2.201", PORTS),
];

/// The nine pods as truth-table peers.
const PEERS: &[&str] = &[
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c",
];
/// The pods and the two hosts that are no pods.
const PEERS_AND_HOSTS: &[&str] = &[
    "x/a", "x/b", "x/c", "y/a", "y/b", "y/c", "z/a", "z/b", "z/c", "ext-in", "ext-ex",
];
/// An ipBlock holding the hosts and no pod, with `ext-ex` excepted.
const EXT_CIDR: &str = "{cidr: 10.244.2.192/28, except: [10.244.2.201/32]}";
/// Upstream's `makeLargeCIDRForIP`: the /4 holding a pod's address.
const LARGE_CIDR: &str = "0.0.0.0/4";

/// Namespaces x, y, z labelled `ns: <name>`; `y_extra` adds labels to y.
fn namespaces(y_extra: &str) -> String {
    ["x", "y", "z"]
        .iter()
        .map(|ns| {
            let extra = if *ns == "y" { y_extra } else { "" };
            format!(
                "---
apiVersion: v1
kind: Namespace
metadata: {{name: {ns}, labels: {{ns: {ns}{extra}}}}}
"
            )
        })
        .collect()
}

/// The bed pod of peer `x/a` (`x-a`); a host's peer name is its bed name.
fn bed_name(peer: &str) -> String {
    peer.replace('/', "-")
}

/// The `/32` of peer `peer`'s address.
fn host_cidr(peer: &str) -> String {
    let ip = PODS
        .iter()
        .find(|p| p.name == bed_name(peer))
        .map(|p| p.ip)
        .unwrap_or_else(|| panic!("no peer {peer}"));
    format!("{ip}/32")
}

/// A Service per pod, as upstream's model creates: `s-<ns>-<pod>` selecting
/// `pod: <name>` on every container port, at VIP `10.96.0.<10 + i>` for the `i`-th peer.
fn services() -> (String, BTreeMap<&'static str, Ipv4Addr>) {
    let mut yaml = String::new();
    let mut vips = BTreeMap::new();
    for (i, peer) in PEERS.iter().enumerate() {
        let (ns, name) = peer.split_once('/').expect("pod peers are ns/pod");
        let vip = Ipv4Addr::new(10, 96, 0, 10 + u8::try_from(i).expect("nine pods"));
        vips.insert(*peer, vip);
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: s-{ns}-{name}, namespace: {ns}}}
spec:
  clusterIP: {vip}
  selector: {{pod: {name}}}
  ports:
  - {{name: service-port-tcp-80, port: 80, protocol: TCP}}
  - {{name: service-port-tcp-81, port: 81, protocol: TCP}}
  - {{name: service-port-udp-80, port: 80, protocol: UDP}}
  - {{name: service-port-udp-81, port: 81, protocol: UDP}}
"
        ));
    }
    (yaml, vips)
}

/// A NetworkPolicy `namespace/name` with `spec` (lines indented by two spaces).
fn np(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{}
",
        spec.trim_matches('\n')
    )
}

/// The nine pods, every pair reachable.
fn all() -> Reachability {
    Reachability::new(PEERS, true)
}

/// How a check reaches its servers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Via {
    /// The pod's own address.
    Pod,
    /// The VIP of the pod's Service: the verdict must be that of the pod itself.
    Service,
}

/// The test bed, its agents, and the failures found so far.
struct Conformance {
    bed: Bed,
    agents: [Agent; 2],
    services: String,
    vips: BTreeMap<&'static str, Ipv4Addr>,
    case: &'static str,
    failures: Vec<String>,
    probes: usize,
}

impl Conformance {
    fn new() -> Result<Self> {
        let mut bed = Bed::new("netpol", &["n1", "n2"], PODS)?.with_client_timeout(TIMEOUT);
        bed.set_namespaces(&namespaces(""));
        let (services, vips) = services();
        bed.state
            .write("pods.yaml", &format!("{}{services}", bed.pods_yaml()))?;
        bed.state.write("policies.yaml", "")?;
        let agents = bed.start_agents(["n1", "n2"])?;
        Ok(Self {
            bed,
            agents,
            services,
            vips,
            case: "",
            failures: Vec::new(),
            probes: 0,
        })
    }

    /// Replaces every NetworkPolicy with `policies` and waits until both agents applied.
    fn policies(&self, policies: &[String]) {
        let [a, b] = &self.agents;
        self.bed
            .apply_all(&[a, b], "policies.yaml", &policies.concat())
            .expect("write the policies");
    }

    /// Rewrites the Namespaces and Pods (after a relabel) and waits until both agents
    /// applied.
    fn pods_changed(&self) {
        let [a, b] = &self.agents;
        let yaml = format!("{}{}", self.bed.pods_yaml(), self.services);
        self.bed
            .apply_all(&[a, b], "pods.yaml", &yaml)
            .expect("write the pods");
    }

    /// Probes every pair of `want` on `port` over `mode`, directly.
    fn check(&mut self, port: u16, mode: Mode, want: &Reachability) {
        self.check_via(port, mode, Via::Pod, want);
    }

    /// Probes every pair of `want` on `port` over `mode` through the servers' Service
    /// VIPs.
    fn check_services(&mut self, port: u16, mode: Mode, want: &Reachability) {
        self.check_via(port, mode, Via::Service, want);
    }

    fn check_via(&mut self, port: u16, mode: Mode, via: Via, want: &Reachability) {
        let what = format!("{} | {port}/{mode:?} via {via:?}", self.case);
        let start = Instant::now();
        let pairs: Vec<(&str, &str, bool)> = want.pairs().collect();
        let dials: Vec<Dial> = pairs
            .iter()
            .map(|&(from, to, _)| {
                let ip = match via {
                    Via::Pod => self.bed.ip(&bed_name(to)),
                    Via::Service => self.vips[to],
                };
                Dial {
                    from: bed_name(from),
                    addr: SocketAddr::from((ip, port)),
                    mode,
                    backend: bed_name(to),
                }
            })
            .collect();
        let mut observed = self.bed.dial_all(&dials, 1, WORKERS);
        self.probes += dials.len();
        let differs = |observed: &[String]| -> Vec<usize> {
            (0..pairs.len())
                .filter(|&i| verdict(&observed[i]) != Some(pairs[i].2))
                .collect()
        };
        let deadline = Instant::now() + CONVERGE;
        let mut again = differs(&observed);
        while !again.is_empty() && Instant::now() < deadline {
            let retry: Vec<Dial> = again.iter().map(|&i| dials[i].clone()).collect();
            self.probes += retry.len();
            for (i, o) in again.iter().zip(self.bed.dial_all(&retry, 1, WORKERS)) {
                observed[*i] = o;
            }
            again = differs(&observed);
        }
        if again.is_empty() {
            eprintln!("ok   {what} ({:?})", start.elapsed());
            return;
        }
        let by_pair: BTreeMap<(&str, &str), &str> = pairs
            .iter()
            .zip(&observed)
            .map(|(&(f, t, _), o)| ((f, t), o.as_str()))
            .collect();
        let report = want.report(&|from, to| {
            let raw = by_pair[&(from, to)];
            (verdict(raw), raw.to_owned())
        });
        eprintln!("FAIL {what} ({:?})", start.elapsed());
        self.failures.push(format!("{what}\n{report}"));
    }
}

/// A probe's outcome as a verdict: reachable, denied, or neither (`None`).
fn verdict(outcome: &str) -> Option<bool> {
    match outcome {
        "ok" => Some(true),
        "EPERM" => Some(false),
        o if o == DROPPED => Some(false),
        _ => None,
    }
}

/// A case: an upstream test name (or, for the few cases upstream lacks, what it
/// checks) and its steps.
type Case = (&'static str, fn(&mut Conformance));

/// Upstream's `GenNetworkPolicyWithNameAndPodMatchLabel(name, {pod: a}, ...)` spec
/// head.
const POD_A: &str = "  podSelector: {matchLabels: {pod: a}}";
/// Every pod of the namespace.
const ALL_PODS: &str = "  podSelector: {}";

#[rustfmt::skip]
const CASES: &[Case] = &[
    ("should support a 'default-deny-ingress' policy (TCP, UDP, via Services)", |c| {
        c.policies(&[np("x", "deny-ingress", &format!("{ALL_PODS}\n  policyTypes: [Ingress]"))]);
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(80, Tcp, &r);
        c.check(80, Udp, &r);
        c.check_services(80, Tcp, &r);
        c.check_services(80, Udp, &r);
    }),
    ("should support a 'default-deny-all' policy", |c| {
        c.policies(&[np("x", "deny-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress, Egress]"))]);
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        r.expect_peer(Peer::ns("x"), Peer::ANY, false);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy to allow traffic from pods within server namespace based on PodSelector", |c| {
        c.policies(&[np("x", "x-a-allows-x-b", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]"))]);
        let mut r = all();
        r.expect_all_ingress("x/a", false).expect("x/b", "x/a", true);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy to allow ingress traffic for a target", |c| {
        c.policies(&[
            np("x", "deny-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress]")),
            np("x", "allow-all-to-a", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{}}, namespaceSelector: {{}}}}]")),
        ]);
        let mut r = all();
        r.expect_all_ingress("x/b", false).expect_all_ingress("x/c", false);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy to allow ingress traffic from pods in all namespaces", |c| {
        c.policies(&[np("x", "allow-from-another-ns", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{}}}}}}]"))]);
        c.check(80, Tcp, &all());
    }),
    ("should enforce policy to allow traffic only from a different namespace, based on NamespaceSelector", |c| {
        c.policies(&[np("x", "allow-client-a-via-ns-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]"))]);
        c.check(80, Tcp, &only_y_to_xa());
    }),
    ("should enforce policy based on PodSelector with MatchExpressions", |c| {
        c.policies(&[np("x", "x-a-allows-x-b", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b]}}]}}}}]"))]);
        let mut r = all();
        r.expect_all_ingress("x/a", false).expect("x/b", "x/a", true);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy based on NamespaceSelector with MatchExpressions", |c| {
        c.policies(&[np("x", "allow-ns-y-match-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchExpressions: [{{key: ns, operator: In, values: [y]}}]}}}}]"))]);
        c.check(80, Tcp, &only_y_to_xa());
    }),
    ("should enforce policy based on PodSelector or NamespaceSelector", |c| {
        c.policies(&[np("x", "allow-ns-y-match-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: ns, operator: NotIn, values: [x]}}]}}
    - podSelector: {{matchLabels: {{pod: b}}}}"))]);
        let mut r = all();
        r.expect("x/c", "x/a", false);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy based on PodSelector and NamespaceSelector (via Services too)", |c| {
        c.policies(&[np("x", "allow-ns-y-podselector-and-nsselector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: ns, operator: NotIn, values: [x]}}]}}
      podSelector: {{matchLabels: {{pod: b}}}}"))]);
        let mut r = all();
        r.expect_all_ingress("x/a", false)
            .expect("y/b", "x/a", true)
            .expect("z/b", "x/a", true);
        c.check(80, Tcp, &r);
        c.check_services(80, Tcp, &r);
    }),
    ("should enforce policy based on Multiple PodSelectors and NamespaceSelectors", |c| {
        c.policies(&[np("x", "allow-ns-y-z-pod-b-c", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: ns, operator: NotIn, values: [x]}}]}}
      podSelector: {{matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]}}"))]);
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::pod("x", "a"), false)
            .expect("y/a", "x/a", false)
            .expect("z/a", "x/a", false);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy based on any PodSelectors", |c| {
        c.policies(&[np("x", "allow-ns-x-pod-b-c", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}, {{podSelector: {{matchLabels: {{pod: c}}}}}}]"))]);
        let mut r = all();
        r.expect_all_ingress("x/a", false)
            .expect("x/b", "x/a", true)
            .expect("x/c", "x/a", true);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policy to allow traffic only from a pod in a different namespace based on PodSelector and NamespaceSelector (TCP, UDP)", |c| {
        c.policies(&[np("x", "allow-ns-y-pod-a-via-namespace-pod-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]"))]);
        let mut r = all();
        r.expect_all_ingress("x/a", false).expect("y/a", "x/a", true);
        c.check(80, Tcp, &r);
        c.check(80, Udp, &r);
    }),
    ("should enforce policy based on Ports", |c| {
        c.policies(&[allow_y_to_xa_on("allow-client-a-via-ns-selector", 81, "TCP")]);
        c.check(81, Tcp, &only_y_to_xa());
        c.check(80, Tcp, &no_ingress_to_xa());
    }),
    ("should enforce policy based on Ports (UDP)", |c| {
        c.policies(&[allow_y_to_xa_on("allow-ingress-on-port-81-ns-x", 81, "UDP")]);
        c.check(81, Udp, &only_y_to_xa());
        c.check(81, Tcp, &no_ingress_to_xa());
    }),
    ("should enforce multiple, stacked policies with overlapping podSelectors (additive, deny then allow)", |c| {
        let port81 = allow_y_to_xa_on("allow-client-a-via-ns-selector", 81, "TCP");
        c.policies(std::slice::from_ref(&port81));
        c.check(81, Tcp, &only_y_to_xa());
        c.check(80, Tcp, &no_ingress_to_xa());
        c.policies(&[port81, allow_y_to_xa_on("allow-client-a-via-ns-selector-80", 80, "TCP")]);
        c.check(80, Tcp, &only_y_to_xa());
    }),
    ("should support allow-all policy", |c| {
        c.policies(&[np("x", "allow-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress]\n  ingress: [{{}}]"))]);
        c.check(80, Tcp, &all());
        c.check(81, Tcp, &all());
    }),
    ("should allow ingress access on one named port", |c| {
        c.policies(&[np("x", "allow-all", &format!("{ALL_PODS}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: serve-81-tcp}}]"))]);
        c.check(81, Tcp, &all());
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(80, Tcp, &r);
    }),
    ("should allow ingress access from namespace on one named port", |c| {
        c.policies(&[np("x", "allow-client-a-via-ns-selector-80", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]
    ports: [{{port: serve-80-tcp, protocol: TCP}}]"))]);
        c.check(80, Tcp, &only_y_to_xa());
        c.check(81, Tcp, &no_ingress_to_xa());
    }),
    ("should allow egress access on one named port", |c| {
        c.policies(&[np("x", "allow-egress", &format!("{ALL_PODS}
  policyTypes: [Egress]
  egress:
  - ports: [{{port: serve-80-tcp}}]"))]);
        c.check(80, Tcp, &all());
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::ANY, false);
        c.check(81, Tcp, &r);
    }),
    ("should enforce updated policy", |c| {
        c.policies(&[np("x", "allow-all-mutate-to-deny-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress]\n  ingress: [{{}}]"))]);
        c.check(81, Tcp, &all());
        c.policies(&[np("x", "allow-all-mutate-to-deny-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress]\n  ingress: []"))]);
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(81, Tcp, &r);
    }),
    ("should allow ingress access from updated namespace", |c| {
        c.policies(&[np("x", "allow-client-a-via-ns-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns2: updated}}}}}}]"))]);
        c.check(80, Tcp, &no_ingress_to_xa());
        c.bed.set_namespaces(&namespaces(", ns2: updated"));
        c.pods_changed();
        let mut r = no_ingress_to_xa();
        r.expect_peer(Peer::ns("y"), Peer::ANY, true);
        c.check(80, Tcp, &r);
        c.bed.set_namespaces(&namespaces(""));
        c.pods_changed();
    }),
    ("should allow ingress access from updated pod", |c| {
        c.policies(&[np("x", "allow-client-a-via-pod-selector", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: b, pod2: updated}}}}}}]"))]);
        c.check(80, Tcp, &no_ingress_to_xa());
        c.bed.relabel("x-b", "pod: b, pod2: updated");
        c.pods_changed();
        let mut r = no_ingress_to_xa();
        r.expect("x/b", "x/a", true);
        c.check(80, Tcp, &r);
        c.bed.relabel("x-b", "pod: b");
        c.pods_changed();
    }),
    ("should deny ingress from pods on other namespaces", |c| {
        c.policies(&[np("x", "deny-empty-policy", &format!("{ALL_PODS}
  policyTypes: [Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{}}}}}}]"))]);
        let mut r = all();
        r.expect_peer(Peer::ns("y"), Peer::ns("x"), false)
            .expect_peer(Peer::ns("z"), Peer::ns("x"), false);
        c.check(80, Tcp, &r);
    }),
    ("should deny ingress access to updated pod", |c| {
        c.policies(&[np("x", "deny-ingress-via-label-selector",
            "  podSelector: {matchLabels: {target: isolated}}\n  policyTypes: [Ingress]")]);
        c.check(80, Tcp, &all());
        c.bed.relabel("x-a", "pod: a, target: isolated");
        c.pods_changed();
        c.check(80, Tcp, &no_ingress_to_xa());
        c.bed.relabel("x-a", "pod: a");
        c.pods_changed();
    }),
    ("should deny egress from pods based on PodSelector (via Services too)", |c| {
        c.policies(&[np("x", "deny-egress-pod-a", &format!("{POD_A}\n  policyTypes: [Egress]"))]);
        let mut r = all();
        r.expect_all_egress("x/a", false);
        c.check(80, Tcp, &r);
        c.check_services(80, Tcp, &r);
        c.check_services(80, Udp, &r);
    }),
    ("should deny egress from all pods in a namespace", |c| {
        c.policies(&[np("x", "deny-egress-ns-x", &format!("{ALL_PODS}\n  policyTypes: [Egress]"))]);
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::ANY, false);
        c.check(80, Tcp, &r);
    }),
    ("should work with Ingress, Egress specified together", |c| {
        c.policies(&[np("x", "allow-client-a-via-pod-selector", &format!("{POD_A}
  policyTypes: [Egress, Ingress]
  ingress:
  - from: [{{podSelector: {{matchLabels: {{pod: b}}}}}}]
  egress:
  - ports: [{{port: 80}}]"))]);
        let mut r = no_ingress_to_xa();
        r.expect("x/b", "x/a", true);
        c.check(80, Tcp, &r);
        let mut r = no_ingress_to_xa();
        r.expect_all_egress("x/a", false).expect("x/b", "x/a", true);
        c.check(81, Tcp, &r);
    }),
    ("should support denying of egress traffic on the client side (even if the server explicitly allows this traffic)", |c| {
        let from_xa = "  policyTypes: [Ingress]
  ingress:
  - from: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: x}}, podSelector: {matchLabels: {pod: a}}}]";
        c.policies(&[
            np("x", "allow-to-ns-y-pod-a", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]")),
            np("y", "allow-from-xa-on-ya-match-selector", &format!("{POD_A}\n{from_xa}")),
            np("y", "allow-from-xa-on-yb-match-selector", &format!("  podSelector: {{matchLabels: {{pod: b}}}}\n{from_xa}")),
        ]);
        let mut r = all();
        r.expect_peer(Peer::pod("x", "a"), Peer::ANY, false)
            .expect_peer(Peer::ANY, Peer::pod("y", "a"), false)
            .expect_peer(Peer::pod("x", "a"), Peer::pod("y", "a"), true)
            .expect_peer(Peer::ANY, Peer::pod("y", "b"), false);
        c.check(80, Tcp, &r);
    }),
    ("should enforce egress policy allowing traffic to a server in a different namespace based on PodSelector and NamespaceSelector (via Services too)", |c| {
        c.policies(&[np("x", "allow-to-ns-y-pod-a", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}, podSelector: {{matchLabels: {{pod: a}}}}}}]"))]);
        let mut r = all();
        r.expect_all_egress("x/a", false).expect("x/a", "y/a", true);
        c.check(80, Tcp, &r);
        c.check_services(80, Tcp, &r);
    }),
    ("should enforce ingress policy allowing any port traffic to a server on a specific protocol", |c| {
        c.policies(&[np("x", "allow-ingress-by-proto", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{protocol: TCP}}]"))]);
        c.check(80, Tcp, &all());
        c.check(80, Udp, &no_ingress_to_xa());
    }),
    ("should enforce multiple ingress policies with ingress allow-all policy taking precedence", |c| {
        let port80 = np("x", "allow-ingress-port-80", &format!("{ALL_PODS}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: 80}}]"));
        c.policies(std::slice::from_ref(&port80));
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(81, Tcp, &r);
        c.policies(&[port80, np("x", "allow-ingress", &format!("{ALL_PODS}\n  policyTypes: [Ingress]\n  ingress: [{{}}]"))]);
        c.check(81, Tcp, &all());
    }),
    ("should enforce multiple egress policies with egress allow-all policy taking precedence", |c| {
        let port80 = np("x", "allow-egress-port-80", &format!("{ALL_PODS}
  policyTypes: [Egress]
  egress:
  - ports: [{{port: 80}}]"));
        c.policies(std::slice::from_ref(&port80));
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::ANY, false);
        c.check(81, Tcp, &r);
        c.policies(&[port80, np("x", "allow-egress", &format!("{ALL_PODS}\n  policyTypes: [Egress]\n  egress: [{{}}]"))]);
        c.check(81, Tcp, &all());
    }),
    ("should stop enforcing policies after they are deleted", |c| {
        c.policies(&[np("x", "deny-all", &format!("{ALL_PODS}\n  policyTypes: [Ingress, Egress]"))]);
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::ANY, false)
            .expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(80, Tcp, &r);
        c.policies(&[]);
        c.check(80, Tcp, &all());
    }),
    ("should allow egress access to server in CIDR block (a pod's /32; via Services too)", |c| {
        c.policies(&[np("x", "allow-client-a-via-cidr-egress-rule", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}}}}}]", host_cidr("y/b")))]);
        let mut r = all();
        r.expect_all_egress("x/a", false).expect("x/a", "y/b", true);
        c.check(80, Tcp, &r);
        c.check_services(80, Tcp, &r);
    }),
    ("should enforce except clause while egress access to server in CIDR block", |c| {
        c.policies(&[except_xb("allow-client-a-via-cidr-egress-rule")]);
        let mut r = all();
        r.expect("x/a", "x/b", false);
        c.check(80, Tcp, &r);
    }),
    ("should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed", |c| {
        c.policies(&[except_xb("allow-client-a-via-cidr-egress-rule")]);
        let mut r = all();
        r.expect("x/a", "x/b", false);
        c.check(80, Tcp, &r);
        // Upstream updates the policy in place to the /32 of x/b alone.
        c.policies(&[egress_xa_to_xb("allow-client-a-via-cidr-egress-rule")]);
        let mut r = all();
        r.expect_all_egress("x/a", false).expect("x/a", "x/b", true);
        c.check(80, Tcp, &r);
        // And both at once: peers of all policies add up, so the /32 allows what the
        // other's except left out.
        c.policies(&[
            except_xb("allow-client-a-via-cidr-egress-rule"),
            egress_xa_to_xb("allow-client-a-to-x-b"),
        ]);
        c.check(80, Tcp, &all());
    }),
    ("ingress ipBlock with except on pod addresses (via Services too)", |c| {
        c.policies(&[np("x", "allow-cidr-except-y-b", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: {LARGE_CIDR}, except: [{}]}}}}]", host_cidr("y/b")))]);
        let mut r = all();
        r.expect("y/b", "x/a", false);
        c.check(80, Tcp, &r);
        c.check_services(80, Tcp, &r);
    }),
    ("ingress ipBlock of a pod's /32", |c| {
        c.policies(&[np("x", "allow-from-y-b-cidr", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: {}}}}}]", host_cidr("y/b")))]);
        let mut r = no_ingress_to_xa();
        r.expect("y/b", "x/a", true);
        c.check(80, Tcp, &r);
    }),
    ("ipBlock with and without except on addresses that are no pods (egress, ingress)", |c| {
        c.policies(&[np("x", "egress-to-ext", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {EXT_CIDR}}}]"))]);
        let mut r = Reachability::new(PEERS_AND_HOSTS, true);
        r.expect_all_egress("x/a", false).expect("x/a", "ext-in", true);
        c.check(80, Tcp, &r);
        c.policies(&[np("x", "egress-to-ext-ex", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}}}}}]", host_cidr("ext-ex")))]);
        let mut r = Reachability::new(PEERS_AND_HOSTS, true);
        r.expect_all_egress("x/a", false).expect("x/a", "ext-ex", true);
        c.check(80, Tcp, &r);
        c.policies(&[np("x", "ingress-from-ext", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {EXT_CIDR}}}]"))]);
        let mut r = Reachability::new(PEERS_AND_HOSTS, true);
        r.expect_all_ingress("x/a", false).expect("ext-in", "x/a", true);
        c.check(80, Tcp, &r);
        c.check(80, Udp, &r);
        c.policies(&[np("x", "ingress-from-ext-ex", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{ipBlock: {{cidr: {}}}}}]", host_cidr("ext-ex")))]);
        let mut r = Reachability::new(PEERS_AND_HOSTS, true);
        r.expect_all_ingress("x/a", false).expect("ext-ex", "x/a", true);
        c.check(80, Tcp, &r);
    }),
    ("should enforce policies to check ingress and egress policies can be controlled independently based on PodSelector", |c| {
        let egress = np("x", "allow-egress-for-target", &format!("{POD_A}\n  policyTypes: [Egress]\n  egress: [{{}}]"));
        c.policies(std::slice::from_ref(&egress));
        c.check(80, Tcp, &all());
        c.policies(&[egress, np("x", "deny-ingress-via-label-selector", &format!("{POD_A}\n  policyTypes: [Ingress]"))]);
        c.check(80, Tcp, &no_ingress_to_xa());
    }),
    ("should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the plugin doesn't support SCTP", |c| {
        c.policies(&[
            np("x", "deny-ingress", &format!("{ALL_PODS}\n  policyTypes: [Ingress]")),
            np("x", "allow-only-sctp-ingress-on-port-81", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: 81, protocol: SCTP}}]")),
        ]);
        let mut r = all();
        r.expect_peer(Peer::ANY, Peer::ns("x"), false);
        c.check(81, Tcp, &r);
    }),
    ("should properly isolate pods that are selected by a policy allowing SCTP, even if the plugin doesn't support SCTP", |c| {
        c.policies(&[np("x", "allow-only-sctp-ingress-on-port-80", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: 80, protocol: SCTP}}]"))]);
        c.check(81, Tcp, &no_ingress_to_xa());
    }),
    ("should not allow access by TCP when a policy specifies only UDP", |c| {
        c.policies(&[np("x", "allow-only-udp-ingress-on-port-81", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - ports: [{{port: 81, protocol: UDP}}]"))]);
        c.check(81, Tcp, &no_ingress_to_xa());
        c.check(81, Udp, &all());
    }),
    ("should enforce policy to allow traffic based on NamespaceSelector with MatchLabels using default ns label", |c| {
        c.policies(&[np("x", "allow-client-a-via-ns-selector-for-immutable-ns-label", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}}}]"))]);
        c.check(80, Tcp, &only_y_to_xa());
    }),
    ("should enforce policy based on NamespaceSelector with MatchExpressions using default ns label", |c| {
        c.policies(&[np("x", "allow-ns-y-match-selector-for-immutable-ns-label", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchExpressions: [{{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}}]}}}}]"))]);
        let mut r = all();
        r.expect_peer(Peer::pod("x", "a"), Peer::ns("y"), false);
        c.check(80, Tcp, &r);
    }),
    ("endPort: an ingress port range", |c| {
        c.policies(&[np("x", "allow-y-80-81", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]
    ports: [{{port: 80, endPort: 81, protocol: TCP}}]"))]);
        c.check(80, Tcp, &only_y_to_xa());
        c.check(81, Tcp, &only_y_to_xa());
        c.policies(&[np("x", "allow-y-81-90", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]
    ports: [{{port: 81, endPort: 90}}]"))]);
        c.check(80, Tcp, &no_ingress_to_xa());
        c.check(81, Tcp, &only_y_to_xa());
    }),
    ("endPort: an egress port range", |c| {
        c.policies(&[np("x", "allow-egress-81-82", &format!("{ALL_PODS}
  policyTypes: [Egress]
  egress:
  - ports: [{{port: 81, endPort: 82}}]"))]);
        let mut r = all();
        r.expect_peer(Peer::ns("x"), Peer::ANY, false);
        c.check(80, Tcp, &r);
        c.check(81, Tcp, &all());
    }),
    ("matchExpressions Exists and NotIn, DoesNotExist", |c| {
        c.policies(&[np("x", "allow-b-c-of-labelled-ns", &format!("{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from:
    - namespaceSelector: {{matchExpressions: [{{key: ns, operator: Exists}}]}}
      podSelector: {{matchExpressions: [{{key: pod, operator: NotIn, values: [a]}}]}}"))]);
        let mut r = all();
        r.expect("y/a", "x/a", false).expect("z/a", "x/a", false);
        c.check(80, Tcp, &r);
        // No namespace lacks the label `ns`: the peer selects nothing.
        c.policies(&[np("x", "allow-to-unlabelled-ns", &format!("{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{namespaceSelector: {{matchExpressions: [{{key: ns, operator: DoesNotExist}}]}}}}]"))]);
        let mut r = all();
        r.expect_all_egress("x/a", false);
        c.check(80, Tcp, &r);
    }),
];

/// Ingress to x/a closed to all.
fn no_ingress_to_xa() -> Reachability {
    let mut r = all();
    r.expect_all_ingress("x/a", false);
    r
}

/// Ingress to x/a from namespace y only.
fn only_y_to_xa() -> Reachability {
    let mut r = all();
    r.expect_peer(Peer::ns("x"), Peer::pod("x", "a"), false)
        .expect_peer(Peer::ns("z"), Peer::pod("x", "a"), false);
    r
}

/// x/a admits namespace y on `port`/`protocol` (upstream's `allowPort81Policy`).
fn allow_y_to_xa_on(name: &str, port: u16, protocol: &str) -> String {
    np(
        "x",
        name,
        &format!(
            "{POD_A}
  policyTypes: [Ingress]
  ingress:
  - from: [{{namespaceSelector: {{matchLabels: {{ns: y}}}}}}]
    ports: [{{port: {port}, protocol: {protocol}}}]"
        ),
    )
}

/// x/a may reach the large CIDR around x/b except x/b itself.
fn except_xb(name: &str) -> String {
    np(
        "x",
        name,
        &format!(
            "{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {LARGE_CIDR}, except: [{}]}}}}]",
            host_cidr("x/b")
        ),
    )
}

/// x/a may reach x/b's /32 only.
fn egress_xa_to_xb(name: &str) -> String {
    np(
        "x",
        name,
        &format!(
            "{POD_A}
  policyTypes: [Egress]
  egress:
  - to: [{{ipBlock: {{cidr: {}}}}}]",
            host_cidr("x/b")
        ),
    )
}

#[test]
fn policy_conformance_truth_tables() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let start = Instant::now();
    let mut c = Conformance::new()?;
    for &(name, case) in CASES {
        c.case = name;
        case(&mut c);
    }
    eprintln!(
        "{} cases, {} probes in {:?}",
        CASES.len(),
        c.probes,
        start.elapsed()
    );
    assert!(
        c.failures.is_empty(),
        "{} of the checks failed:\n\n{}",
        c.failures.len(),
        c.failures.join("\n")
    );
    Ok(())
}
