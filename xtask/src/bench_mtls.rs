//! `cargo xtask bench mtls`: the cost of the mesh's mutual TLS between two nodes, in one
//! run, against its own baseline. Three ways from a pod on n1 to a pod on n2:
//! - direct: plaintext, pods outside the mesh (the kernel alone);
//! - mesh: pods of the mesh, through both node proxies' HBONE tunnel;
//! - stunnel: pods outside the mesh, through an stunnel pair (TLS 1.3, client
//!   certificates verified both ways), its client in the client pod, its server in the
//!   server pod, as the mesh's tunnel ends are.
//!
//! Measured: request/response on one connection (1 KiB each way) against a server that
//! answers at once (pure overhead) and one that takes 1 ms (a realistic service); new
//! connections (connect, a 64-byte exchange, close); bulk throughput (one connection).
//! Every round runs the three back to back in rotating order, so paired per-round
//! ratios cancel machine drift.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, TcpStream},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Pod, Proxy, StateDir,
    agent::{self, BPFFS},
    testpod::{self, SinkOptions},
};

use crate::{
    bench::{PathStats, bulk, median},
    build, setup,
};

/// Pods `(name, namespace, ip, node)`: the mesh's pair and the plain pair.
const PODS: [(&str, &str, &str, &str); 4] = [
    ("client", "mesh", "10.244.1.40", "n1"),
    ("server", "mesh", "10.244.2.40", "n2"),
    ("pclient", "plain", "10.244.1.41", "n1"),
    ("pserver", "plain", "10.244.2.41", "n2"),
];
/// The servers' ports: echo at once, echo after 1 ms, bulk sink.
const ECHO: u16 = 8080;
const ECHO_SLOW: u16 = 8081;
const SINK: u16 = 9000;
const SLOW: Duration = Duration::from_millis(1);
/// stunnel ports: the client end listens on `STUNNEL_LOCAL + port` in the client pod,
/// the server end on `STUNNEL_REMOTE + port` in the server pod.
const STUNNEL_LOCAL: u16 = 10000;
const STUNNEL_REMOTE: u16 = 20000;
const PAYLOAD: usize = 1024;
const BULK_BYTES: u64 = 128 << 20;
const BULK_WRITE: usize = 64 << 10;
const READY: Duration = Duration::from_secs(20);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Variant {
    Direct,
    Mesh,
    Stunnel,
}

impl Variant {
    const ALL: [Self; 3] = [Self::Direct, Self::Mesh, Self::Stunnel];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
            Self::Stunnel => "stunnel",
        }
    }

    /// Client pod, and where it dials for the server's `port`.
    fn route(self, port: u16) -> (&'static str, SocketAddr) {
        let ip = |s: &str| -> IpAddr { s.parse().expect("constant address") };
        match self {
            Self::Direct => ("pclient", SocketAddr::new(ip(PODS[3].2), port)),
            Self::Mesh => ("client", SocketAddr::new(ip(PODS[1].2), port)),
            Self::Stunnel => (
                "pclient",
                SocketAddr::new(ip("127.0.0.1"), STUNNEL_LOCAL + port),
            ),
        }
    }
}

/// One variant's results over all rounds.
#[derive(Default)]
struct Stats {
    rr: PathStats,
    rr_slow: PathStats,
    connect: PathStats,
    /// Bulk throughput per round, bytes per second.
    bulk: Vec<f64>,
}

/// Runs the benchmark: `count` exchanges per measure and round, `rounds` rounds.
pub fn run(count: u32, rounds: u32) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let mut builder = Cluster::builder("bmtls").node("n1").node("n2");
    for (name, _, ip, node) in PODS {
        builder = builder.pod(node, name, ip);
    }
    let cluster = builder.build()?;
    let mut processes: Vec<ChildGuard> = Vec::new();
    let mut sinks = Vec::new();
    for server in ["server", "pserver"] {
        let pod = cluster.pod(server);
        processes.push(testpod::start_server(pod, ECHO, server)?);
        processes.push(testpod::start_slow_server(pod, ECHO_SLOW, server, SLOW)?);
        sinks.push(testpod::start_sink(
            pod,
            SINK,
            &SinkOptions {
                unchecked: true,
                ..SinkOptions::default()
            },
        )?);
    }
    // The agent finds a pod through a process in it; the clients' runs are too short.
    for client in ["client", "pclient"] {
        processes.push(cluster.pod(client).spawn_anchor()?);
    }
    let state = StateDir::new("bmtls")?;
    state.write("cluster.yaml", &cluster_yaml(&cluster))?;
    let agents = ["n1", "n2"]
        .map(|n| Agent::start(cluster.node(n), state.path()))
        .into_iter()
        .collect::<Result<Vec<_>>>()?;
    let ca = StateDir::new("bmtls-ca")?;
    let proxies = start_proxies(&cluster, &agents[0], &ca)?;
    let certs = StateDir::new("bmtls-stunnel")?;
    processes.extend(start_stunnel(&cluster, certs.path())?);
    // Every path answers before anything is measured.
    for v in Variant::ALL {
        let (client, to) = v.route(ECHO);
        wait_ready(cluster.pod(client), to, v.name())?;
    }

    println!(
        "mtls: pod on n1 -> pod on n2; direct (plaintext) vs mesh (HBONE tunnel) vs stunnel \
         pair (TLS 1.3, mutual); {rounds} rounds in rotating order: {count} request/response \
         exchanges of {PAYLOAD} B each way against a server answering at once and one taking \
         {} ms, {count} new connections, {} MiB bulk",
        SLOW.as_millis(),
        BULK_BYTES >> 20
    );
    let mut stats: Vec<Stats> = Variant::ALL.iter().map(|_| Stats::default()).collect();
    for round in 0..rounds as usize {
        for i in 0..Variant::ALL.len() {
            let k = (round + i) % Variant::ALL.len();
            let v = Variant::ALL[k];
            let s = &mut stats[k];
            let ctx = |what: &str| format!("{} round {round}: {what}", v.name());
            let before = tunnelled(&proxies[0])?;
            let (client, to) = v.route(ECHO);
            let pod = cluster.pod(client);
            s.rr.add(
                &testpod::bench_persistent(pod, to, count, 100, PAYLOAD, None)
                    .with_context(|| ctx("request/response"))?,
            );
            let (_, slow) = v.route(ECHO_SLOW);
            s.rr_slow.add(
                &testpod::bench_persistent(pod, slow, count / 4, 20, PAYLOAD, None)
                    .with_context(|| ctx("request/response, 1 ms server"))?,
            );
            s.connect
                .add(&testpod::bench(pod, to, count, 50).with_context(|| ctx("new connections"))?);
            let (_, sink_addr) = v.route(SINK);
            let sink = if v == Variant::Mesh {
                &mut sinks[0]
            } else {
                &mut sinks[1]
            };
            s.bulk.push(
                bulk(pod, sink_addr, sink, BULK_BYTES, BULK_WRITE).with_context(|| ctx("bulk"))?,
            );
            // Proof of what was measured: the mesh's connections all went through the
            // tunnel, the others none.
            let grew = tunnelled(&proxies[0])? - before;
            if v == Variant::Mesh {
                ensure!(
                    grew >= f64::from(count),
                    "mesh round {round}: only {grew} connections tunnelled"
                );
            } else {
                ensure!(
                    grew == 0.0,
                    "{} round {round}: {grew} connections tunnelled",
                    v.name()
                );
            }
        }
    }
    print_report(&stats);
    Ok(())
}

fn cluster_yaml(cluster: &Cluster) -> String {
    let mut yaml = String::from(
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: \
         {istio.io/dataplane-mode: ambient}}\n---\napiVersion: v1\nkind: Namespace\n\
         metadata: {name: plain}\n",
    );
    for (name, ns, ip, node) in PODS {
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}}}\n\
             spec: {{nodeName: {}, containers: [{{name: main}}]}}\nstatus: {{podIP: {ip}}}\n",
            agent::node_name(cluster.node(node))
        );
    }
    yaml
}

/// A root CA, one node CA per node (`mesh-agent ca`), a proxy with it on each node.
fn start_proxies(cluster: &Cluster, agent: &Agent, ca: &StateDir) -> Result<Vec<Proxy>> {
    let root = ca.path().join("root");
    let run = |args: &[&str]| -> Result<()> {
        let out = agent.cli(args)?;
        ensure!(out.status.success(), "mesh-agent {args:?}: {out:?}");
        Ok(())
    };
    run(&["ca", "init", "--dir", path_str(&root)?])?;
    let mut proxies = Vec::new();
    for n in ["n1", "n2"] {
        let name = agent::node_name(cluster.node(n));
        let dir = ca.path().join(&name);
        run(&[
            "ca",
            "node",
            "--dir",
            path_str(&root)?,
            "--node",
            &name,
            "--out",
            path_str(&dir)?,
        ])?;
        // One worker, as stunnel has one process per side (and as `bench l7` runs the
        // proxy): both nodes share this machine's cores.
        proxies.push(Proxy::start(
            cluster.node(n),
            &[
                "--ca-dir",
                path_str(&dir)?,
                "--bpffs",
                BPFFS,
                "--worker-threads",
                "1",
            ],
        )?);
    }
    Ok(proxies)
}

/// Connections n1's proxy has carried through the tunnel.
fn tunnelled(proxy: &Proxy) -> Result<f64> {
    Ok(proxy.metrics_parsed()?.sum(
        "istio_tcp_connections_opened_total",
        &[("reporter", "source")],
    ))
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// The stunnel pair: certificates from a throwaway CA (openssl), the client end in
/// `pclient`, the server end in `pserver`, one service per server port.
fn start_stunnel(cluster: &Cluster, dir: &Path) -> Result<Vec<ChildGuard>> {
    let openssl = |args: &[&str]| -> Result<()> {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()?;
        ensure!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat()
        .iter()
        .copied()
        .chain(["-days", "2", "-subj", "/CN=bench-ca"])
        .collect::<Vec<_>>(),
    )?;
    for who in ["client", "server"] {
        let (key, csr, pem) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
        );
        let subj = format!("/CN={who}");
        openssl(
            &[
                &["req"][..],
                &ec,
                &["-keyout", &key, "-out", &csr, "-subj", &subj],
            ]
            .concat(),
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "2",
        ])?;
    }
    let server_ip = PODS[3].2;
    let tls = |who: &str| {
        format!(
            "cert = {d}/{who}.pem\nkey = {d}/{who}.key\nCAfile = {d}/ca.pem\nverifyChain = yes\n\
             sslVersionMin = TLSv1.3\n",
            d = dir.display()
        )
    };
    let mut client_conf = String::from("foreground = yes\npid =\ndebug = err\n");
    let mut server_conf = client_conf.clone();
    for port in [ECHO, ECHO_SLOW, SINK] {
        let _ = write!(
            client_conf,
            "[p{port}]\nclient = yes\naccept = 127.0.0.1:{}\nconnect = {server_ip}:{}\n{}",
            STUNNEL_LOCAL + port,
            STUNNEL_REMOTE + port,
            tls("client")
        );
        let _ = write!(
            server_conf,
            "[p{port}]\naccept = {server_ip}:{}\nconnect = 127.0.0.1:{port}\n{}",
            STUNNEL_REMOTE + port,
            tls("server")
        );
    }
    std::fs::write(dir.join("client.conf"), client_conf)?;
    std::fs::write(dir.join("server.conf"), server_conf)?;
    let mut started = Vec::new();
    for (pod, conf) in [("pserver", "server.conf"), ("pclient", "client.conf")] {
        let mut cmd = Command::new("stunnel");
        cmd.arg(dir.join(conf));
        started.push(cluster.pod(pod).spawn(cmd)?);
    }
    let server: SocketAddr = format!("{server_ip}:{}", STUNNEL_REMOTE + ECHO).parse()?;
    wait_listening(cluster.pod("pserver"), server)?;
    wait_listening(
        cluster.pod("pclient"),
        SocketAddr::from(([127, 0, 0, 1], STUNNEL_LOCAL + ECHO)),
    )?;
    Ok(started)
}

/// Waits until something accepts on `addr` inside `pod`.
fn wait_listening(pod: &Pod, addr: SocketAddr) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < READY {
        let up =
            pod.in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok())?;
        if up {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "nothing listens on {addr} in pod {} after {READY:?}",
        pod.name()
    )
}

/// Waits until a request/response from `pod` to `to` succeeds (state applied, SVIDs
/// issued, tunnels possible).
fn wait_ready(pod: &Pod, to: SocketAddr, what: &str) -> Result<()> {
    let start = Instant::now();
    loop {
        match testpod::bench_persistent(pod, to, 1, 0, 64, None) {
            Ok(s) if s.count == 1 => return Ok(()),
            r if start.elapsed() > READY => bail!("{what}: {to} not answering: {r:?}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// One latency measure of a variant's results.
type Measure = fn(&Stats) -> &PathStats;

fn print_report(stats: &[Stats]) {
    let [direct, mesh, stunnel] = [&stats[0], &stats[1], &stats[2]];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<30} {:>16} {:>16} {:>16} {:>11} {:>11} {:>9} {:>9}",
        "measure (us)",
        "direct p50/p99",
        "mesh p50/p99",
        "stunnel p50/p99",
        "mesh +p50",
        "stunnel +p50",
        "mesh x",
        "stunnel x"
    );
    let rows: [(&str, Measure); 3] = [
        ("request/response 1 KiB", |s| &s.rr),
        ("  server taking 1 ms", |s| &s.rr_slow),
        ("new connection", |s| &s.connect),
    ];
    for (name, get) in rows {
        let pair = |s: &Stats| format!("{:.0}/{:.0}", get(s).p50_us(), get(s).p99_us());
        let d = get(direct);
        let _ = writeln!(
            out,
            "{name:<30} {:>16} {:>16} {:>16} {:>11.0} {:>11.0} {:>8.3}x {:>8.3}x",
            pair(direct),
            pair(mesh),
            pair(stunnel),
            get(mesh).p50_us() - d.p50_us(),
            get(stunnel).p50_us() - d.p50_us(),
            get(mesh).paired_p50_ratio(d),
            get(stunnel).paired_p50_ratio(d),
        );
    }
    let mbs = |s: &Stats| median(&s.bulk) / 1e6;
    let _ = writeln!(
        out,
        "{:<30} {:>16.0} {:>16.0} {:>16.0}   (MB/s, median of rounds)",
        "bulk throughput",
        mbs(direct),
        mbs(mesh),
        mbs(stunnel)
    );
    let added = |s: &Stats| s.rr.p50_us() - direct.rr.p50_us();
    let slow_overhead = (mesh.rr_slow.paired_p50_ratio(&direct.rr_slow) - 1.0) * 100.0;
    let conn_ratio = mesh.connect.paired_p50_ratio(&direct.connect);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "\ntargets:\n  less added latency than stunnel: mesh +{:.0} us vs stunnel +{:.0} us: {}\n  \
         under 8% p50 overhead on the 1 ms service: {slow_overhead:+.1}%: {}\n  \
         new connection under 3x direct: {conn_ratio:.2}x: {}",
        added(mesh),
        added(stunnel),
        verdict(added(mesh) < added(stunnel)),
        verdict(slow_overhead < 8.0),
        verdict(conn_ratio < 3.0),
    );
    print!("{out}");
}
