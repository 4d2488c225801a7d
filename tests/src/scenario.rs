//! Policy scenarios: pods with namespaces, labels and ports, the state that describes
//! them, and probes whose outcomes ("ok", "EPERM", [`DROPPED`]) form reachability
//! matrices.
//!
//! A [`Bed`] is a [`Cluster`] whose pods serve their ports (`mesh-testpod serve`,
//! announcing the pod's name), optionally idle "anchor" processes in the pods that
//! serve nothing (the agent only knows a pod's netns while a process lives in it), and
//! a [`StateDir`]. [`Bed::pods_yaml`] writes the Namespaces of [`NAMESPACES`] and every
//! [`PodDef`] that is in the state.
//!
//! ```no_run
//! use mesh_tests::scenario::{Bed, Mode, PodDef, pod};
//!
//! # fn main() -> anyhow::Result<()> {
//! const PODS: &[PodDef] = &[
//!     pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
//!     pod("n1", "prod", "web", "10.244.1.11", "app: web", &[("http", 8080, "TCP")]),
//! ];
//! let mut bed = Bed::new("doc", &["n1"], PODS)?;
//! bed.anchor_idle_pods()?;
//! bed.state.write("pods.yaml", &bed.pods_yaml())?;
//! let agent = bed.start_agent("n1", &[])?;
//! bed.wait_for(&[&agent], "client", ("web", 8080, Mode::Tcp), 1, "ok");
//! # Ok(())
//! # }
//! ```

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    sync::atomic::{AtomicUsize, Ordering},
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

use crate::{
    Agent, ChildGuard, Cluster, Node, Pod, Proxy, StateDir, agent, assert_eventually, eventually,
    testpod::{self, ConnectSummary},
};

/// Bound on every convergence wait (state applied, pod discovered, policy in force).
/// Generous: the targets (about a second) are measured by benchmarks, not asserted.
pub const CONVERGE: Duration = Duration::from_secs(10);
/// Exchanges per matrix probe ([`Bed::probe`], [`Bed::outcomes`], [`Bed::matrix`]).
pub const PROBE_COUNT: u32 = 2;
/// Outcome of a probe whose every exchange timed out where a dropped first packet
/// shows (see [`outcome`]).
pub const DROPPED: &str = "dropped";

/// Namespaces of every scenario's state. `kubernetes.io/metadata.name` is not written:
/// the agent adds it, as the API server does.
pub const NAMESPACES: &str = "---
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

/// Container ports `(name, port, protocol)`.
pub type Ports = &'static [(&'static str, u16, &'static str)];

/// A pod of the test bed.
#[derive(Clone, Copy, Debug)]
pub struct PodDef {
    /// Test bed node.
    pub node: &'static str,
    /// Pod name, in the test bed and in the state (`metadata.name`).
    pub name: &'static str,
    /// Pod IPv4 address.
    pub ip: &'static str,
    /// Namespace in the state; `None`: a pod of the test bed that is NOT in the state,
    /// i.e. an address that is no pod (a "host" outside the cluster, for ipBlocks).
    pub namespace: Option<&'static str>,
    /// Labels as the body of a YAML flow mapping, e.g. `app: web, tier: front`.
    pub labels: &'static str,
    /// Container ports; every distinct port is served over TCP and UDP by a
    /// `mesh-testpod serve` announcing the pod's name. A pod without ports is what
    /// [`Bed::anchor_idle_pods`] anchors.
    pub ports: Ports,
}

/// A pod of the state: `namespace/name` on `node` at `ip`.
pub const fn pod(
    node: &'static str,
    namespace: &'static str,
    name: &'static str,
    ip: &'static str,
    labels: &'static str,
    ports: Ports,
) -> PodDef {
    PodDef {
        namespace: Some(namespace),
        labels,
        ..host(node, name, ip, ports)
    }
}

/// A test bed pod that is not in the state (an address outside the cluster), serving
/// `ports`.
pub const fn host(
    node: &'static str,
    name: &'static str,
    ip: &'static str,
    ports: Ports,
) -> PodDef {
    PodDef {
        node,
        name,
        ip,
        namespace: None,
        labels: "",
        ports,
    }
}

/// How a probe talks to its destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// TCP: connect, name line, echo.
    Tcp,
    /// One connected UDP socket per exchange (`connect --udp`).
    Udp,
    /// One unconnected UDP socket, `sendto` + `recvfrom` (`udp-query`).
    UdpQuery,
}

/// One probe: destination pod, port, mode.
pub type Probe = (&'static str, u16, Mode);

/// Probe key (`pod:port/TCP`, `/UDP` or `/UDP-sendto`) → outcome; or, for several
/// clients ([`Bed::matrix`], [`expect_matrix`]), `from -> pod:port/MODE` → outcome.
pub type Matrix = BTreeMap<String, String>;

/// The key of `probe` in a [`Matrix`]: `pod:port/MODE`.
pub fn key((to, port, mode): Probe) -> String {
    let mode = match mode {
        Mode::Tcp => "TCP",
        Mode::Udp => "UDP",
        Mode::UdpQuery => "UDP-sendto",
    };
    format!("{to}:{port}/{mode}")
}

/// "ok" when all `count` exchanges reached `backend`; [`DROPPED`] when every exchange
/// timed out at the step where a dropped first packet shows (connect for TCP, the
/// receive of the reply for UDP); "EPERM" when every attempt was refused at once (an
/// egress deny: at connect() for TCP and connected UDP); anything else described in
/// full.
pub fn outcome(s: &ConnectSummary, mode: Mode, count: u32, backend: &str) -> String {
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
            Mode::Tcp => s.connect_errno_first.as_deref() == Some("ETIMEDOUT"),
            Mode::Udp => s.connect_errno_first.is_none() && first_step("recv"),
            Mode::UdpQuery => first_step("recvfrom"),
        };
        if at_first_packet {
            return DROPPED.to_owned();
        }
    }
    let refused_at_connect =
        mode == Mode::UdpQuery || s.connect_errno_first.as_deref() == Some("EPERM");
    if s.attempts == count && s.ok == 0 && only("EPERM") && refused_at_connect {
        return "EPERM".to_owned();
    }
    format!(
        "attempts={} ok={} by_backend={:?} errors={:?} connect_errno_first={:?} first_error={:?}",
        s.attempts, s.ok, s.by_backend, s.errors, s.connect_errno_first, s.first_error
    )
}

/// The expected outcomes of `probes` (keyed by [`key`]): "ok" where `allowed`, else
/// `denied`.
pub fn expect_allowed(probes: &[Probe], allowed: impl Fn(Probe) -> bool, denied: &str) -> Matrix {
    probes
        .iter()
        .map(|&p| {
            let outcome = if allowed(p) { "ok" } else { denied };
            (key(p), outcome.to_owned())
        })
        .collect()
}

/// The expected matrix of several clients: for each client, the probes that are "ok";
/// every other probe of `probes` is `denied`. Keyed as [`Bed::matrix`] keys.
pub fn expect_matrix(rows: &[(&str, &[Probe])], probes: &[Probe], denied: &str) -> Matrix {
    rows.iter()
        .flat_map(|&(from, allowed)| {
            expect_allowed(probes, |p| allowed.contains(&p), denied)
                .into_iter()
                .map(move |(k, o)| (format!("{from} -> {k}"), o))
        })
        .collect()
}

/// Panics with every difference between `got` and `want`, and both in full.
pub fn assert_matrix(got: &Matrix, want: &Matrix, what: &str) {
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

/// Kills `agent` (leaving its datapath pinned) while `client` runs, starts a new agent
/// with `args` on `node` that adopts the datapath, and checks that `client` is still
/// running (the restart happened under load) and that the new agent adopted.
pub fn restart_under_load(
    agent: Agent,
    node: &Node,
    state: &StateDir,
    args: &[&str],
    client: &mut ChildGuard,
) -> Result<Agent> {
    let pinned = agent.kill();
    let restart = Instant::now();
    let second = pinned.adopt(node, state.path(), args)?;
    eprintln!("restarted agent ready after {:?}", restart.elapsed());
    ensure!(
        client.try_wait()?.is_none(),
        "the client finished before the new agent was ready: the restart was not under load"
    );
    assert!(
        second.log().contains("adopting the datapath"),
        "{}",
        second.log()
    );
    Ok(second)
}

/// What probes need: shareable across the threads of [`Bed::matrix`] (a [`Bed`]
/// itself holds processes, which are not).
#[derive(Clone, Copy)]
struct Prober<'a> {
    cluster: &'a Cluster,
    timeout: Option<Duration>,
}

impl Prober<'_> {
    fn dial(self, from: &str, addr: SocketAddr, mode: Mode, count: u32) -> Result<ConnectSummary> {
        let (command, mut extra) = match mode {
            Mode::Tcp => ("connect", vec![]),
            Mode::Udp => ("connect", vec!["--udp".to_owned()]),
            Mode::UdpQuery => ("udp-query", vec![]),
        };
        if let Some(timeout) = self.timeout {
            extra.extend(["--timeout-ms".to_owned(), timeout.as_millis().to_string()]);
        }
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        testpod::run_client(self.cluster.pod(from), command, addr, count, &extra)
    }

    fn probe(self, from: &str, (to, port, mode): Probe, count: u32) -> String {
        let addr = SocketAddr::from((self.cluster.pod(to).ip(), port));
        match self.dial(from, addr, mode, count) {
            Ok(s) => outcome(&s, mode, count, to),
            Err(e) => format!("probe failed: {e:#}"),
        }
    }

    fn outcomes(self, from: &str, probes: &[Probe]) -> Matrix {
        probes
            .iter()
            .map(|&p| (key(p), self.probe(from, p, PROBE_COUNT)))
            .collect()
    }
}

/// One probe to an explicit address (a pod IP or a Service VIP), judged on the pod that
/// must answer: see [`Bed::dial_all`].
#[derive(Clone, Debug)]
pub struct Dial {
    /// Client pod.
    pub from: String,
    /// Destination address.
    pub addr: SocketAddr,
    /// How to talk to it.
    pub mode: Mode,
    /// The pod whose name the answer must carry (the backend behind a VIP).
    pub backend: String,
}

/// A cluster whose pods serve their ports, their anchors, and a state directory.
pub struct Bed {
    // Field order is drop order: processes and state before the cluster.
    anchors: Vec<ChildGuard>,
    _servers: Vec<ChildGuard>,
    /// The agents' state directory.
    pub state: StateDir,
    pods: Vec<PodDef>,
    namespaces: String,
    client_timeout: Option<Duration>,
    /// The test bed.
    pub cluster: Cluster,
}

impl Bed {
    /// Builds `nodes` and `pods` (cluster prefix and state prefix `prefix`) and starts
    /// the servers of every pod's ports.
    pub fn new(prefix: &str, nodes: &[&str], pods: &[PodDef]) -> Result<Self> {
        let mut builder = Cluster::builder(prefix);
        for node in nodes {
            builder = builder.node(node);
        }
        for p in pods {
            builder = builder.pod(p.node, p.name, p.ip);
        }
        let cluster = builder.build()?;
        let mut servers = Vec::new();
        for p in pods {
            for port in distinct_ports(p) {
                servers.push(testpod::start_server(cluster.pod(p.name), port, p.name)?);
            }
        }
        Ok(Self {
            anchors: Vec::new(),
            _servers: servers,
            state: StateDir::new(prefix)?,
            pods: pods.to_vec(),
            namespaces: NAMESPACES.to_owned(),
            client_timeout: None,
            cluster,
        })
    }

    /// Replaces the Namespaces [`Bed::pods_yaml`] writes ([`NAMESPACES`] by default),
    /// e.g. to change a namespace's labels between two applies.
    pub fn set_namespaces(&mut self, yaml: &str) {
        yaml.clone_into(&mut self.namespaces);
    }

    /// Replaces the labels of pod `name` in what [`Bed::pods_yaml`] writes.
    ///
    /// # Panics
    /// If the bed has no pod `name`.
    pub fn relabel(&mut self, name: &str, labels: &'static str) {
        let pod = self
            .pods
            .iter_mut()
            .find(|p| p.name == name)
            .unwrap_or_else(|| panic!("no pod {name} in the bed"));
        pod.labels = labels;
    }

    /// Bounds every step (connect, send, receive) of the probing clients by `timeout`,
    /// which is then what a dropped probe costs; without it clients use their default.
    pub fn with_client_timeout(mut self, timeout: Duration) -> Self {
        self.client_timeout = Some(timeout);
        self
    }

    /// Starts an idle process in every pod without ports, so that the agent finds its
    /// netns (a pod whose only processes are short `connect` runs would be found by
    /// chance).
    pub fn anchor_idle_pods(&mut self) -> Result<()> {
        for p in self.pods.iter().filter(|p| p.ports.is_empty()) {
            self.anchors.push(self.cluster.pod(p.name).spawn_anchor()?);
        }
        Ok(())
    }

    /// Pod `name` of the bed.
    pub fn pod(&self, name: &str) -> &Pod {
        self.cluster.pod(name)
    }

    /// The address of pod `name`.
    pub fn ip(&self, name: &str) -> Ipv4Addr {
        self.cluster.pod(name).ip()
    }

    /// The Namespaces ([`NAMESPACES`] unless [set](Bed::set_namespaces)) and every Pod
    /// of the bed that is in the state, with one container per protocol of its ports
    /// (port names are unique per container).
    pub fn pods_yaml(&self) -> String {
        let mut yaml = self.namespaces.clone();
        for p in &self.pods {
            let Some(namespace) = p.namespace else {
                continue;
            };
            let node = agent::node_name(self.cluster.node(p.node));
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

    /// Starts the agent on `node` with `args` over the state written so far.
    pub fn start_agent(&self, node: &str, args: &[&str]) -> Result<Agent> {
        Agent::start_with(self.cluster.node(node), self.state.path(), args)
    }

    /// Starts the node proxy on `node` (its netns and cgroup) with extra `mesh-proxy`
    /// flags `args`; it connects to the agent of that node.
    pub fn start_proxy(&self, node: &str, args: &[&str]) -> Result<Proxy> {
        Proxy::start(self.cluster.node(node), args)
    }

    /// Starts an agent on each of `nodes` over the state written so far.
    pub fn start_agents<const N: usize>(&self, nodes: [&str; N]) -> Result<[Agent; N]> {
        let agents = nodes
            .iter()
            .map(|node| Agent::start(self.cluster.node(node), self.state.path()))
            .collect::<Result<Vec<_>>>()?;
        Ok(agents
            .try_into()
            .unwrap_or_else(|_| unreachable!("one agent per node")))
    }

    /// Writes `yaml` as `file` and waits until `agent` has applied a new state.
    pub fn apply(&self, agent: &Agent, file: &str, yaml: &str) -> Result<()> {
        let applied = agent.applied_count();
        self.state.write(file, yaml)?;
        assert_eventually!(
            agent.applied_count() > applied,
            CONVERGE,
            "agent did not re-apply after {file} changed:\n{}",
            agent.log()
        );
        Ok(())
    }

    /// Writes `yaml` as `file` and waits until every one of `agents` has applied a new
    /// state.
    pub fn apply_all(&self, agents: &[&Agent], file: &str, yaml: &str) -> Result<()> {
        let applied: Vec<usize> = agents.iter().map(|a| a.applied_count()).collect();
        self.state.write(file, yaml)?;
        for (agent, applied) in agents.iter().zip(applied) {
            assert_eventually!(
                agent.applied_count() > applied,
                CONVERGE,
                "agent {} did not re-apply after {file} changed:\n{}",
                agent.pin_name(),
                agent.log()
            );
        }
        Ok(())
    }

    fn prober(&self) -> Prober<'_> {
        Prober {
            cluster: &self.cluster,
            timeout: self.client_timeout,
        }
    }

    /// Runs `count` exchanges of `mode` from pod `from` to `addr`.
    pub fn dial(
        &self,
        from: &str,
        addr: SocketAddr,
        mode: Mode,
        count: u32,
    ) -> Result<ConnectSummary> {
        self.prober().dial(from, addr, mode, count)
    }

    /// The [`outcome`] of `count` exchanges from pod `from` to `probe`'s pod; a client
    /// that could not run gives "probe failed: …".
    pub fn probe_count(&self, from: &str, probe: Probe, count: u32) -> String {
        self.prober().probe(from, probe, count)
    }

    /// The outcome of [`PROBE_COUNT`] exchanges from pod `from` to `probe`'s pod.
    pub fn probe(&self, from: &str, probe: Probe) -> String {
        self.probe_count(from, probe, PROBE_COUNT)
    }

    /// The outcome of every probe from `from`, in sequence, keyed by [`key`].
    pub fn outcomes(&self, from: &str, probes: &[Probe]) -> Matrix {
        self.prober().outcomes(from, probes)
    }

    /// Every probe from every client, keyed `from -> pod:port/MODE`: the clients in
    /// parallel (each one's probes in sequence), so that dropped probes cost their
    /// timeouts only once per client.
    pub fn matrix(&self, clients: &[&str], probes: &[Probe]) -> Matrix {
        let prober = self.prober();
        std::thread::scope(|scope| {
            let handles: Vec<_> = clients
                .iter()
                .map(|&from| scope.spawn(move || (from, prober.outcomes(from, probes))))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| {
                    let (from, outcomes) = h.join().expect("probe thread panicked");
                    outcomes
                        .into_iter()
                        .map(move |(k, o)| (format!("{from} -> {k}"), o))
                })
                .collect()
        })
    }

    /// The [`outcome`] of `count` exchanges of every one of `dials`, in order. `workers`
    /// dials run at a time, so that dropped probes cost their timeouts in parallel.
    pub fn dial_all(&self, dials: &[Dial], count: u32, workers: usize) -> Vec<String> {
        let prober = self.prober();
        let next = AtomicUsize::new(0);
        let mut outcomes = vec![String::new(); dials.len()];
        let done: Vec<(usize, String)> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..workers.clamp(1, dials.len().max(1)))
                .map(|_| {
                    scope.spawn(|| {
                        let mut done = Vec::new();
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(d) = dials.get(i) else {
                                return done;
                            };
                            let o = match prober.dial(&d.from, d.addr, d.mode, count) {
                                Ok(s) => outcome(&s, d.mode, count, &d.backend),
                                Err(e) => format!("probe failed: {e:#}"),
                            };
                            done.push((i, o));
                        }
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().expect("probe thread panicked"))
                .collect()
        });
        for (i, o) in done {
            outcomes[i] = o;
        }
        outcomes
    }

    /// Probes `from` → `probe` (`count` exchanges at a time) until the outcome is
    /// `want`, within [`CONVERGE`]; panics with the last outcome and the logs of
    /// `agents` otherwise. Run before asserting anything else, this makes what follows
    /// deterministic (the agents found the pods and applied their policies).
    pub fn wait_for(&self, agents: &[&Agent], from: &str, probe: Probe, count: u32, want: &str) {
        let mut last = String::new();
        let reached = eventually(CONVERGE, || {
            last = self.probe_count(from, probe, count);
            last == want
        });
        if !reached {
            let logs: Vec<String> = agents.iter().map(|a| a.log()).collect();
            panic!(
                "{from} -> {} never became {want} within {CONVERGE:?}; last outcome: {last}\nagent logs:\n{}",
                key(probe),
                logs.join("\n---\n")
            );
        }
    }
}

/// The distinct ports of `p`, ascending.
fn distinct_ports(p: &PodDef) -> Vec<u16> {
    let mut ports: Vec<u16> = p.ports.iter().map(|&(_, port, _)| port).collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}
