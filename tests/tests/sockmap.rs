//! Same-node socket redirection with sockmap, end to end (root only): the agent's
//! sock_ops program puts the established TCP sockets of its node's pods in a SOCKHASH
//! and its sk_msg program hands each sendmsg() straight to the peer socket when that
//! peer is on the same node. Every case streams a seeded pattern through a real
//! connection and checks that the receiver got exactly what was sent (byte count and
//! FNV-1a checksum), and that the bytes were really redirected
//! (`mesh_sockmap_redirected_bytes_total` grew by at least as much), or were not
//! (`--sockmap=false`, cross-node).

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Agent, ChildGuard, Cluster, StateDir, agent, eventually, require_root,
    testpod::{
        self, HoldReport, HoldStarted, Pattern, SinkConn, SinkOptions, StreamMode, StreamOptions,
        StreamSummary, next_json_line,
    },
};

const REDIRECTED_BYTES: &str = "mesh_sockmap_redirected_bytes_total";
const REDIRECTED_MESSAGES: &str = "mesh_sockmap_redirected_messages_total";
const SOCKETS: &str = "mesh_sockmap_sockets";

const MIB: u64 = 1 << 20;
/// Bound on waiting for a counter or a sink's report.
const SETTLE: Duration = Duration::from_secs(10);

/// Port of each kind of sink in the server pods.
const SINK: u16 = 9000;
const ECHO: u16 = 9001;
const SLOW: u16 = 9002;
const RESETTER: u16 = 9003;
/// `mesh-testpod serve` (name line + echo), for a held connection.
const SERVE: u16 = 8080;

/// Agent flags turning redirection on (it is off by default).
const ON: &[&str] = &["--sockmap=true"];

/// Pods: client and server on n1, far on n2 (n2 only when asked for).
const CLIENT: (&str, &str, &str) = ("n1", "client", "10.244.1.10");
const SERVER: (&str, &str, &str) = ("n1", "server", "10.244.1.11");
const FAR: (&str, &str, &str) = ("n2", "far", "10.244.2.11");

/// A dual-stack cluster, its state (the pods) and the agents.
struct Bed {
    // Field order is drop order: agents, processes, state, then the cluster.
    agents: Vec<Agent>,
    procs: Vec<ChildGuard>,
    state: StateDir,
    cluster: Cluster,
}

impl Bed {
    /// Pods of `pods` (the first node is n1; n2 exists when a pod is on it), the
    /// state describing them, and an agent started on each node with `args`.
    fn new(prefix: &str, pods: &[(&str, &str, &str)], args: &[&str]) -> Result<Self> {
        let mut nodes: Vec<&str> = pods.iter().map(|p| p.0).collect();
        nodes.dedup();
        let mut builder = Cluster::builder(prefix).dual_stack();
        for n in &nodes {
            builder = builder.node(n);
        }
        for (node, name, ip) in pods {
            builder = builder.pod(node, name, ip);
        }
        let cluster = builder.build()?;
        let state = StateDir::new(prefix)?;
        let mut yaml = String::new();
        for (node, name, _) in pods {
            let pod = cluster.pod(name);
            let ip6 = pod.ip6().context("dual-stack pod without IPv6")?;
            yaml.push_str(&format!(
                "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {name}}}}}
spec: {{nodeName: {node_name}, containers: [{{name: main, image: mesh-testpod}}]}}
status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}
",
                node_name = agent::node_name(cluster.node(node)),
                ip = pod.ip(),
            ));
        }
        state.write("pods.yaml", &yaml)?;
        let agents = nodes
            .iter()
            .map(|n| Agent::start_with(cluster.node(n), state.path(), args))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            agents,
            procs: Vec::new(),
            state,
            cluster,
        })
    }

    /// A slow reader in pod server on [`SLOW`] (4 KiB per millisecond); its index.
    fn slow_sink(&mut self) -> Result<usize> {
        let opts = SinkOptions {
            read_delay: Some(Duration::from_millis(1)),
            read_chunk: Some(4096),
            ..SinkOptions::default()
        };
        self.sink("server", SLOW, &opts)
    }

    /// Starts a sink in pod `pod` on `port`; returns its index in `procs`.
    fn sink(&mut self, pod: &str, port: u16, opts: &SinkOptions) -> Result<usize> {
        self.procs
            .push(testpod::start_sink(self.cluster.pod(pod), port, opts)?);
        Ok(self.procs.len() - 1)
    }

    fn addr(&self, pod: &str, port: u16) -> SocketAddr {
        SocketAddr::from((self.cluster.pod(pod).ip(), port))
    }

    fn addr6(&self, pod: &str, port: u16) -> SocketAddr {
        let ip = self.cluster.pod(pod).ip6().expect("dual-stack bed");
        SocketAddr::from((IpAddr::V6(ip), port))
    }

    fn stream(&self, to: SocketAddr, opts: &StreamOptions) -> Result<StreamSummary> {
        testpod::stream(self.cluster.pod("client"), to, opts)
    }

    /// The next per-connection report of the sink at `procs[sink]`.
    fn sink_report(&mut self, sink: usize) -> Result<SinkConn> {
        next_json_line(&mut self.procs[sink], SETTLE)
    }
}

/// The sum of every series of metric `name` (whatever its labels); `None` if absent.
fn metric(text: &str, name: &str) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        if !(rest.starts_with(' ') || rest.starts_with('{')) {
            continue;
        }
        if let Some(v) = rest
            .rsplit(' ')
            .next()
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// The sockmap counters of `agent` (each 0 when absent).
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    bytes: f64,
    messages: f64,
    sockets: f64,
}

fn counters(agent: &Agent) -> Result<Counters> {
    let text = agent.metrics()?;
    Ok(Counters {
        bytes: metric(&text, REDIRECTED_BYTES).unwrap_or(0.0),
        messages: metric(&text, REDIRECTED_MESSAGES).unwrap_or(0.0),
        sockets: metric(&text, SOCKETS).unwrap_or(0.0),
    })
}

/// Fails unless `agent` exposes all three sockmap metrics.
fn require_metrics(agent: &Agent) -> Result<()> {
    let text = agent.metrics()?;
    for name in [REDIRECTED_BYTES, REDIRECTED_MESSAGES, SOCKETS] {
        ensure!(
            metric(&text, name).is_some(),
            "the agent does not expose {name}; /metrics:\n{text}"
        );
    }
    Ok(())
}

/// Waits until the redirected bytes of `agent` reach `before + at_least`; panics with
/// the case and the counters otherwise.
fn assert_redirected(agent: &Agent, before: Counters, at_least: u64, case: &str) {
    let mut now = before;
    let reached = eventually(SETTLE, || {
        now = counters(agent).expect("scrape /metrics");
        now.bytes - before.bytes >= at_least as f64
    });
    assert!(
        reached,
        "{case}: {REDIRECTED_BYTES} grew by {} (messages by {}), want at least {at_least}: \
         the stream was not redirected (before {before:?}, after {now:?})",
        now.bytes - before.bytes,
        now.messages - before.messages,
    );
    eprintln!(
        "{case}: redirected {} bytes in {} messages",
        now.bytes - before.bytes,
        now.messages - before.messages
    );
}

/// Panics unless `s` arrived whole (count and checksum) and matches the pattern.
fn assert_intact(s: &StreamSummary, opts: &StreamOptions, case: &str) {
    assert!(s.intact(), "{case}: data lost or altered: {s:?}");
    assert_eq!(s.sent, opts.bytes, "{case}: not everything was sent: {s:?}");
    assert_eq!(
        s.sent_checksum,
        Pattern::new(opts.seed).checksum(opts.bytes),
        "{case}: the client's checksum is not the pattern's"
    );
    eprintln!(
        "{case}: {} bytes in {} sends, intact, {:?}",
        s.sent,
        s.writes,
        Duration::from_nanos(s.elapsed_ns)
    );
}

/// Streams `opts` to the sink `procs[sink]` at `to` and checks that it arrived intact,
/// by the client's summary and the sink's own report.
fn checked_stream(
    bed: &mut Bed,
    sink: usize,
    to: SocketAddr,
    opts: &StreamOptions,
    case: &str,
) -> Result<StreamSummary> {
    let s = bed.stream(to, opts)?;
    let server = bed.sink_report(sink);
    if !s.intact() {
        panic!("{case}: data lost or altered.\nclient: {s:?}\nserver: {server:?}");
    }
    let server = server?;
    assert!(
        server.error.is_none() && server.bytes == opts.bytes,
        "{case}: the sink reports {server:?}"
    );
    assert_intact(&s, opts, case);
    if s.spurious_eagain + server.spurious_eagain > 0 {
        // The kernel limitation `--sockmap` documents: a blocking read woken without
        // data returns EAGAIN. The readers retry it, so the data is still checked.
        eprintln!(
            "{case}: EAGAIN on a blocking read, retried: client {}, server {}",
            s.spurious_eagain, server.spurious_eagain
        );
    }
    Ok(s)
}

/// [`checked_stream`], and the node's redirected bytes grow by ≥ `factor` × sent.
fn redirected_case(
    bed: &mut Bed,
    sink: usize,
    to: SocketAddr,
    opts: &StreamOptions,
    factor: u64,
    case: &str,
) -> Result<StreamSummary> {
    let before = counters(&bed.agents[0])?;
    let s = checked_stream(bed, sink, to, opts, case)?;
    assert_redirected(&bed.agents[0], before, factor * opts.bytes, case);
    Ok(s)
}

#[test]
fn same_node_streams_arrive_intact_and_redirected() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmdata", &[CLIENT, SERVER], ON)?;
    require_metrics(&bed.agents[0])?;
    let sink = bed.sink("server", SINK, &SinkOptions::default())?;
    let echo = bed.sink(
        "server",
        ECHO,
        &SinkOptions {
            echo: true,
            ..SinkOptions::default()
        },
    )?;
    let to = bed.addr("server", SINK);

    // Large writes (1 MiB each).
    redirected_case(
        &mut bed,
        sink,
        to,
        &StreamOptions::new(8 * MIB, StreamMode::Write),
        1,
        "8 MiB in large writes",
    )?;

    // Many small writes of 1..=64 bytes.
    let small = StreamOptions {
        seed: 2,
        ..StreamOptions::new(650_000, StreamMode::Small)
    };
    let s = redirected_case(&mut bed, sink, to, &small, 1, "small writes")?;
    assert!(s.writes >= 19_000, "only {} small writes: {s:?}", s.writes);

    // writev with 8 iovecs of varying sizes.
    let writev = StreamOptions {
        seed: 3,
        ..StreamOptions::new(4 * MIB + 12_345, StreamMode::Writev)
    };
    redirected_case(&mut bed, sink, to, &writev, 1, "writev")?;

    // sendfile from a file.
    let sendfile = StreamOptions {
        seed: 4,
        ..StreamOptions::new(4 * MIB + 777, StreamMode::Sendfile)
    };
    redirected_case(&mut bed, sink, to, &sendfile, 1, "sendfile")?;

    // Half-close with almost nothing sent: the reply still comes back.
    let tiny = StreamOptions {
        seed: 5,
        ..StreamOptions::new(1, StreamMode::Write)
    };
    redirected_case(&mut bed, sink, to, &tiny, 1, "1 byte, half-close, reply")?;

    // IPv6.
    let v6 = StreamOptions {
        seed: 6,
        ..StreamOptions::new(2 * MIB, StreamMode::Write)
    };
    let to6 = bed.addr6("server", SINK);
    redirected_case(&mut bed, sink, to6, &v6, 1, "IPv6 2 MiB")?;

    // Plain blocking sockets, no SO_RCVTIMEO/SO_SNDTIMEO (the run is still bounded).
    let blocking = StreamOptions {
        seed: 8,
        timeout: Duration::ZERO,
        ..StreamOptions::new(2 * MIB, StreamMode::Write)
    };
    redirected_case(
        &mut bed,
        sink,
        to,
        &blocking,
        1,
        "2 MiB, blocking without timeouts",
    )?;

    // Both directions at once: the echo comes back while the client still sends.
    let bidir = StreamOptions {
        seed: 7,
        bidir: true,
        chunk: Some(256 * 1024),
        ..StreamOptions::new(4 * MIB, StreamMode::Write)
    };
    let to = bed.addr("server", ECHO);
    redirected_case(&mut bed, echo, to, &bidir, 2, "bidir echo 4 MiB")?;

    // `mesh-agent status` reports the same counters the metrics do.
    let status = bed.agents[0].status()?;
    let c = counters(&bed.agents[0])?;
    let redirected = status
        .lines()
        .find_map(|l| l.trim().strip_prefix("redirected"))
        .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok());
    assert!(
        status.lines().any(|l| l == "sockmap: on") && redirected == Some(c.messages),
        "status does not show sockmap on with {} redirected messages:\n{status}",
        c.messages
    );
    Ok(())
}

#[test]
fn same_node_resets_slow_readers_and_churn() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmedge", &[CLIENT, SERVER], ON)?;
    let agent_sockets = |bed: &Bed| counters(&bed.agents[0]).map(|c| c.sockets);
    require_metrics(&bed.agents[0])?;
    let sink = bed.sink("server", SINK, &SinkOptions::default())?;
    bed.sink(
        "server",
        ECHO,
        &SinkOptions {
            echo: true,
            ..SinkOptions::default()
        },
    )?;
    let slow_sink = bed.slow_sink()?;
    let resetter = bed.sink(
        "server",
        RESETTER,
        &SinkOptions {
            reset_after: Some(256 * 1024),
            ..SinkOptions::default()
        },
    )?;
    bed.procs.push(testpod::start_server(
        bed.cluster.pod("server"),
        SERVE,
        "server",
    )?);

    // A held connection: both of its ends are in the map while it lives.
    let mut hold = testpod::spawn_hold(
        bed.cluster.pod("client"),
        bed.addr("server", SERVE),
        Duration::from_secs(2),
        Duration::from_millis(50),
    )?;
    next_json_line::<HoldStarted>(&mut hold, SETTLE)?;
    let mut sockets = 0.0;
    assert!(
        eventually(SETTLE, || {
            sockets = agent_sockets(&bed).expect("scrape");
            sockets >= 2.0
        }),
        "{SOCKETS} is {sockets} while a same-node connection is held (want ≥ 2)"
    );
    let report: HoldReport = next_json_line(&mut hold, SETTLE)?;
    assert_eq!(report.errors, 0, "held connection failed: {report:?}");

    // Slow reader: 4 KiB per ms for 2 MiB. Completes, loses nothing, and the blocked
    // client sleeps rather than spins.
    let slow = StreamOptions {
        seed: 11,
        ..StreamOptions::new(2 * MIB, StreamMode::Write)
    };
    let to = bed.addr("server", SLOW);
    let s = redirected_case(&mut bed, slow_sink, to, &slow, 1, "slow reader")?;
    let (cpu, elapsed) = (s.cpu_ns as f64, s.elapsed_ns as f64);
    assert!(
        elapsed >= 0.4e9,
        "slow reader: done in {elapsed} ns, faster than 512 reads 1 ms apart allow: {s:?}"
    );
    assert!(
        cpu < 0.5 * elapsed,
        "slow reader: the client burned {:.0}% CPU while blocked ({cpu} of {elapsed} ns): \
         the sender spins instead of sleeping on backpressure",
        100.0 * cpu / elapsed
    );
    eprintln!(
        "slow reader: client CPU {:.1}% of elapsed",
        100.0 * cpu / elapsed
    );

    // The client resets halfway: the sink sees a short stream or an error (never a
    // clean, complete one), a prefix of the pattern, and nothing hangs.
    let reset = StreamOptions {
        seed: 12,
        reset: true,
        ..StreamOptions::new(4 * MIB, StreamMode::Write)
    };
    let started = Instant::now();
    let s = bed.stream(bed.addr("server", SINK), &reset)?;
    assert!(s.reset && s.error.is_none(), "client reset: {s:?}");
    assert_eq!(s.sent, 2 * MIB, "client reset: {s:?}");
    let conn = bed.sink_report(sink)?;
    eprintln!(
        "client reset: server saw {conn:?} after {:?}",
        started.elapsed()
    );
    assert!(
        conn.bytes <= s.sent,
        "client reset: server read more than sent: {conn:?}"
    );
    assert_eq!(
        conn.checksum,
        Pattern::new(12).checksum(conn.bytes),
        "client reset: what the server read is not a prefix of the stream: {conn:?}"
    );
    assert!(
        !(conn.replied && conn.error.is_none()),
        "client reset: the server saw a clean, complete stream and replied: {conn:?}"
    );

    // The server resets after 256 KiB: the client sees the error, within its timeouts.
    let server_reset = StreamOptions {
        seed: 13,
        ..StreamOptions::new(16 * MIB, StreamMode::Write)
    };
    let s = bed.stream(bed.addr("server", RESETTER), &server_reset)?;
    let conn = bed.sink_report(resetter)?;
    eprintln!("server reset: client saw {s:?}\nserver: {conn:?}");
    assert!(
        conn.reset && conn.bytes == 256 * 1024,
        "server reset: {conn:?}"
    );
    assert_eq!(
        conn.checksum,
        Pattern::new(13).checksum(conn.bytes),
        "{conn:?}"
    );
    assert!(
        s.error.is_some() && s.received_by_server.is_none(),
        "server reset: the client saw no error: {s:?}"
    );
    assert!(
        matches!(s.error_key.as_deref(), Some("ECONNRESET" | "EPIPE" | "EOF")),
        "server reset: the client saw {:?} (want ECONNRESET, EPIPE or EOF): {s:?}",
        s.error
    );

    // Thousands of short connections: all succeed, and their sockets leave the map.
    let before = counters(&bed.agents[0])?;
    let started = Instant::now();
    let churn = testpod::churn(bed.cluster.pod("client"), bed.addr("server", ECHO), 3000)?;
    eprintln!("churn: {churn:?} in {:?}", started.elapsed());
    assert_eq!(
        (churn.attempts, churn.ok),
        (3000, 3000),
        "churn: {:?}",
        churn.errors
    );
    let after = counters(&bed.agents[0])?;
    eprintln!(
        "churn: redirected {} bytes in {} messages; {SOCKETS} = {} right after",
        after.bytes - before.bytes,
        after.messages - before.messages,
        after.sockets
    );
    assert!(after.bytes > before.bytes, "churn: nothing was redirected");
    assert!(
        eventually(SETTLE, || {
            sockets = agent_sockets(&bed).expect("scrape");
            sockets <= 2.0
        }),
        "{SOCKETS} stays at {sockets} after every connection closed (want ≤ 2)"
    );
    Ok(())
}

#[test]
fn disabled_sockmap_leaves_streams_alone() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmoff", &[CLIENT, SERVER], &["--sockmap=false"])?;
    let sink = bed.sink("server", SINK, &SinkOptions::default())?;
    let opts = StreamOptions::new(8 * MIB, StreamMode::Write);
    let to = bed.addr("server", SINK);
    checked_stream(&mut bed, sink, to, &opts, "8 MiB, sockmap off")?;
    let c = counters(&bed.agents[0])?;
    assert!(
        c.bytes == 0.0 && c.messages == 0.0 && c.sockets == 0.0,
        "--sockmap=false, yet the counters moved: {c:?}"
    );
    Ok(())
}

#[test]
fn cross_node_streams_are_not_redirected() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmcross", &[CLIENT, SERVER, FAR], ON)?;
    for agent in &bed.agents {
        require_metrics(agent)?;
    }
    let near_sink = bed.sink("server", SINK, &SinkOptions::default())?;
    let far_sink = bed.sink("far", SINK, &SinkOptions::default())?;

    // n1's agent does redirect same-node streams...
    let near = StreamOptions {
        seed: 21,
        ..StreamOptions::new(MIB, StreamMode::Write)
    };
    let to = bed.addr("server", SINK);
    redirected_case(&mut bed, near_sink, to, &near, 1, "same-node control")?;

    // ...but not this one, whose peer is on n2; nor does n2's agent.
    let before: Vec<Counters> = bed.agents.iter().map(counters).collect::<Result<_>>()?;
    let far = StreamOptions {
        seed: 22,
        ..StreamOptions::new(4 * MIB, StreamMode::Write)
    };
    let to = bed.addr("far", SINK);
    checked_stream(&mut bed, far_sink, to, &far, "cross-node 4 MiB")?;
    let far6 = StreamOptions { seed: 23, ..far };
    let to6 = bed.addr6("far", SINK);
    checked_stream(&mut bed, far_sink, to6, &far6, "cross-node IPv6 4 MiB")?;
    for (agent, before) in bed.agents.iter().zip(before) {
        let after = counters(agent)?;
        assert!(
            after.bytes == before.bytes && after.messages == before.messages,
            "agent {}: cross-node streams were redirected (before {before:?}, after {after:?})",
            agent.pin_name()
        );
    }
    Ok(())
}

#[test]
fn policy_denied_connections_are_never_redirected() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmpol", &[CLIENT, SERVER], ON)?;
    // Both pods run a process the whole time: the agent finds a pod's network namespace
    // (and so enforces its policy) through the processes in it.
    for pod in ["server", "client"] {
        bed.procs
            .push(testpod::start_server(bed.cluster.pod(pod), SERVE, pod)?);
    }
    let to = bed.addr("server", SERVE);
    let client = bed.cluster.pod("client");

    // Allowed: the exchanges are redirected (control).
    let before = counters(&bed.agents[0])?;
    let allowed = testpod::connect(client, to, 20)?;
    assert_eq!(allowed.ok, 20, "allowed connections failed: {allowed:?}");
    assert!(
        eventually(SETTLE, || counters(&bed.agents[0])
            .is_ok_and(|c| c.messages > before.messages)),
        "allowed same-node connections were not redirected"
    );

    // The client may send nowhere: every connect is refused with EPERM before any
    // socket is established, so nothing enters the map and nothing is redirected.
    bed.state.write(
        "deny.yaml",
        "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-deny-egress, namespace: default}
spec: {podSelector: {matchLabels: {app: client}}, policyTypes: [Egress]}
",
    )?;
    let mut denied = testpod::connect(client, to, 1)?;
    assert!(
        eventually(SETTLE, || {
            denied = testpod::connect(client, to, 1).expect("connect");
            denied.errors.contains_key("EPERM")
        }),
        "the egress deny never took effect: {denied:?}"
    );
    let before = counters(&bed.agents[0])?;
    let denied = testpod::connect(client, to, 50)?;
    assert_eq!(
        (denied.ok, denied.errors.get("EPERM").copied()),
        (0, Some(50)),
        "denied connections: {denied:?}"
    );
    let after = counters(&bed.agents[0])?;
    assert!(
        after.messages == before.messages && after.bytes == before.bytes,
        "denied connections were redirected (before {before:?}, after {after:?})"
    );
    assert!(
        eventually(SETTLE, || counters(&bed.agents[0])
            .is_ok_and(|c| c.sockets == 0.0)),
        "sockets stay in the map although every connection was denied or closed"
    );
    Ok(())
}

#[test]
fn agent_shutdown_mid_stream_loses_nothing() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmstop", &[CLIENT, SERVER], ON)?;
    let slow_sink = bed.slow_sink()?;
    let to = bed.addr("server", SLOW);
    let opts = StreamOptions {
        seed: 31,
        ..StreamOptions::new(4 * MIB, StreamMode::Write)
    };
    let agent = bed.agents.pop().context("the bed's agent")?;
    // The reader is slow, so redirected bytes wait in the server socket's queue when
    // the agent stops (SIGTERM: detach, unpin) mid-stream.
    let client = bed.cluster.pod("client");
    let s = std::thread::scope(|scope| -> Result<StreamSummary> {
        let streaming = scope.spawn(|| testpod::stream(client, to, &opts));
        // The stream is being redirected when the agent goes.
        ensure!(
            eventually(SETTLE, || counters(&agent).is_ok_and(|c| c.bytes > 0.0)),
            "nothing redirected before the stop"
        );
        let status = agent.stop()?;
        assert!(status.success(), "agent exit: {status}");
        streaming.join().expect("stream thread panicked")
    })?;
    let conn = bed.sink_report(slow_sink)?;
    eprintln!("agent stopped mid-stream: client {s:?}\nserver {conn:?}");
    assert!(
        s.intact() && conn.bytes == opts.bytes && conn.error.is_none(),
        "stopping the agent mid-stream lost or altered data:\nclient: {s:?}\nserver: {conn:?}"
    );
    Ok(())
}

#[test]
fn annotation_opts_pods_out_of_redirection() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("skmopt", &[CLIENT, SERVER], ON)?;
    let sink = bed.sink("server", SINK, &SinkOptions::default())?;
    // Both pods' network namespaces known to the agent (the sink in one, the idle
    // server in the other), so the opt-out below also covers loopback connections.
    bed.procs.push(testpod::start_server(
        bed.cluster.pod("client"),
        SERVE,
        "client",
    )?);
    let endpoints = |bed: &Bed| {
        let text = bed.agents[0].metrics().expect("scrape");
        metric(&text, r#"mesh_datapath_map_entries{map="ENDPOINTS_V1"}"#).unwrap_or(0.0)
    };
    assert!(
        eventually(SETTLE, || endpoints(&bed) >= 2.0),
        "the agent did not find both pods"
    );
    let to = bed.addr("server", SINK);
    let loopback = SocketAddr::from(([127, 0, 0, 1], SINK));
    // A stream from `from` to the sink, checked; returns the bytes redirected meanwhile.
    let stream = |bed: &mut Bed, from: &str, to: SocketAddr, seed: u64, case: &str| {
        let opts = StreamOptions {
            seed,
            ..StreamOptions::new(MIB, StreamMode::Write)
        };
        let before = counters(&bed.agents[0]).expect("scrape");
        let s = testpod::stream(bed.cluster.pod(from), to, &opts).expect("stream");
        let conn = bed.sink_report(sink).expect("sink report");
        assert!(
            s.intact() && conn.bytes == opts.bytes,
            "{case}: {s:?} / {conn:?}"
        );
        counters(&bed.agents[0]).expect("scrape").bytes - before.bytes
    };
    let apply = |bed: &Bed, yaml: &str| {
        let applied = bed.agents[0].applied_count();
        bed.state.write("ns.yaml", yaml).expect("write state");
        assert!(
            eventually(SETTLE, || bed.agents[0].applied_count() > applied),
            "the agent did not apply ns.yaml"
        );
    };

    assert!(stream(&mut bed, "client", to, 41, "pod to pod") >= MIB as f64);
    assert!(stream(&mut bed, "server", loopback, 42, "loopback in a pod") >= MIB as f64);

    // The namespace opts its pods out: both connections take the TCP/IP stack.
    apply(
        &bed,
        "apiVersion: v1
kind: Namespace
metadata: {name: default, annotations: {mesh.io/sockmap: 'false'}}
",
    );
    assert_eq!(
        stream(&mut bed, "client", to, 43, "opted out, pod to pod"),
        0.0
    );
    assert_eq!(
        stream(&mut bed, "server", loopback, 44, "opted out, loopback"),
        0.0
    );

    // Opting back in takes effect for new connections.
    apply(&bed, "");
    assert!(stream(&mut bed, "client", to, 45, "opted in again") >= MIB as f64);
    Ok(())
}
