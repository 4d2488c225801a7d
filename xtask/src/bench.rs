//! `cargo xtask bench lb`: connection setup from a pod to one backend pod, three ways in
//! one run: directly to the pod IP (the baseline), through a Service VIP translated by
//! the mesh at connect(), and through the same VIP DNATed by iptables rules shaped like
//! kube-proxy's iptables mode. Each at 1, 1,000 and 10,000 Services. Rounds alternate
//! the paths (and their order) so the ratios hold on a noisy shared machine.

use std::{
    fmt::Write as _,
    io::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{Agent, Cluster, Node, Pod, StateDir, testpod};

use crate::{build, setup};

/// The median of `values` (the upper one of an even count), NaN for none: per-round
/// results are summarised by it, so one slow round (another tenant's burst) does not
/// move them.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// One bulk transfer of `bytes` in writes of `write` bytes from `client` to the
/// `mesh-testpod sink` at `addr` (whose output is `sink`): bytes per second from
/// connect to the sink's account, which must show every byte arrived.
pub fn bulk(
    client: &Pod,
    addr: SocketAddr,
    sink: &mut mesh_tests::ChildGuard,
    bytes: u64,
    write: usize,
) -> Result<f64> {
    let timeout = std::time::Duration::from_secs(20);
    let opts = testpod::StreamOptions {
        chunk: Some(write),
        unchecked: true,
        timeout,
        ..testpod::StreamOptions::new(bytes, testpod::StreamMode::Write)
    };
    let s = testpod::stream(client, addr, &opts)?;
    let conn: testpod::SinkConn = testpod::next_json_line(sink, timeout)?;
    anyhow::ensure!(
        s.error.is_none() && s.received_by_server == Some(bytes) && conn.bytes == bytes,
        "bulk transfer incomplete: {s:?} / {conn:?}"
    );
    Ok(bytes as f64 * 1e9 / s.elapsed_ns as f64)
}

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark: `lb`, `policy`, `sockmap`, `plan`, `l7`, `mtls` or `sources`.
    which: String,
    /// Measured connections per round and path.
    #[arg(long, default_value_t = 600)]
    count: u32,
    /// Rounds per path; each round runs every path of a phase, rotating the order
    /// (default 15; l7: 3).
    #[arg(long)]
    rounds: Option<u32>,
    /// Numbers of Services in force (lb), comma separated.
    #[arg(long, default_value = "1,1000,10000", value_delimiter = ',')]
    sizes: Vec<u32>,
    /// Numbers of Services to plan (plan), comma separated.
    #[arg(long, default_value = "1000,10000,50000", value_delimiter = ',')]
    services: Vec<u32>,
    /// Numbers of Services written through each state source (sources), comma
    /// separated.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    sources: Vec<u32>,
    /// Numbers of NetworkPolicies to plan (plan), comma separated.
    #[arg(long, default_value = "1000,10000", value_delimiter = ',')]
    policies: Vec<u32>,
    /// Seconds of load per run (l7).
    #[arg(long, default_value_t = 5)]
    secs: u32,
    /// Concurrent connections of wrk and h2load (l7).
    #[arg(long, default_value_t = 16)]
    connections: u32,
    /// Concurrent streams per h2c connection of h2load (l7).
    #[arg(long, default_value_t = 1)]
    streams: u32,
    /// Variants to run (l7), comma separated; direct (the baseline) always runs.
    #[arg(
        long,
        default_value = "direct,mesh,haproxy,nginx",
        value_delimiter = ','
    )]
    variants: Vec<String>,
}

impl BenchArgs {
    /// `--rounds`, or `default` when not given.
    fn rounds_or(&self, default: u32) -> u32 {
        self.rounds.unwrap_or(default)
    }
}

/// The measured Service and its one backend.
const VIP: &str = "10.96.0.10:80";
const BACKEND: &str = "10.244.1.11:8080";
/// Backends per filler Service (as the scale target: 10 each).
const FILLER_BACKENDS: u32 = 10;

/// Runs the chosen benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    match args.which.as_str() {
        "lb" => lb(args),
        "policy" => crate::bench_policy::run(args.count, args.rounds_or(15)),
        "sockmap" => crate::bench_sockmap::run(args.count * 5, args.rounds_or(15)),
        "plan" => crate::bench_plan::run(&args.services, &args.policies),
        "mtls" => crate::bench_mtls::run(args.count, args.rounds_or(3)),
        "sources" => crate::bench_sources::run(&args.sources, args.rounds_or(5)),
        "l7" => crate::bench_l7::run(&crate::bench_l7::Options {
            secs: args.secs,
            rounds: args.rounds_or(3),
            connections: args.connections,
            streams: args.streams,
            variants: args.variants.clone(),
        }),
        other => {
            bail!(
                "unknown benchmark {other:?}; available: lb, policy, sockmap, plan, l7, mtls, sources"
            )
        }
    }
}

/// One path's results across rounds.
#[derive(Default)]
pub struct PathStats {
    p50: Vec<u64>,
    p99: Vec<u64>,
    count: u64,
    elapsed_ns: u64,
    errors: u64,
}

impl PathStats {
    /// Adds one round.
    pub fn add(&mut self, s: &testpod::BenchSummary) {
        self.p50.push(s.p50_ns);
        self.p99.push(s.p99_ns);
        self.count += s.count;
        self.elapsed_ns += s.elapsed_ns;
        self.errors += s.errors.values().sum::<u64>();
    }

    /// Median over rounds: one slow round (another tenant's burst) does not move it.
    fn median(values: &[u64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0) as f64
    }

    /// Median over rounds of the p50, in microseconds.
    pub fn p50_us(&self) -> f64 {
        Self::median(&self.p50) / 1e3
    }

    /// Median over rounds of the p99, in microseconds.
    pub fn p99_us(&self) -> f64 {
        Self::median(&self.p99) / 1e3
    }

    fn cps(&self) -> f64 {
        if self.elapsed_ns == 0 {
            0.0
        } else {
            self.count as f64 * 1e9 / self.elapsed_ns as f64
        }
    }

    /// Median over rounds of this path's p50 divided by `base`'s p50 in the same round:
    /// the two ran back to back, so machine-wide drift between rounds cancels out.
    pub fn paired_p50_ratio(&self, base: &Self) -> f64 {
        let mut ratios: Vec<f64> = self
            .p50
            .iter()
            .zip(&base.p50)
            .map(|(v, d)| *v as f64 / *d as f64)
            .collect();
        ratios.sort_by(f64::total_cmp);
        ratios.get(ratios.len() / 2).copied().unwrap_or(f64::NAN)
    }
}

/// Results at one size.
struct SizeResult {
    services: u32,
    mesh_load_s: f64,
    map_memory_bytes: u64,
    iptables_load_s: f64,
    direct_mesh: PathStats,
    mesh: PathStats,
    direct_ipt: PathStats,
    iptables: PathStats,
}

fn lb(args: &BenchArgs) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    setup::apt_tools(&[("iptables-legacy-restore", "iptables")])?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let cluster = Cluster::builder("bench")
        .node("n1")
        .pod("n1", "client", "10.244.1.10")
        .pod("n1", "web-1", "10.244.1.11")
        .build()?;
    let _server = testpod::start_server(cluster.pod("web-1"), 8080, "web-1")?;
    let client = cluster.pod("client");
    let node = cluster.node("n1");
    // Tens of thousands of short connections to one destination leave as many client
    // ports in TIME_WAIT; once the ephemeral range runs low, connect() spends
    // milliseconds hunting for a port and measures that instead of the datapath. Both
    // knobs are per network namespace, so only the client pod changes.
    client.in_netns(|| -> Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        Ok(())
    })??;

    println!(
        "lb: connect + 64 B request/echo + close from a pod to one backend pod;\n    \
         {} rounds x {} connections per path and size, paths alternating",
        args.rounds_or(15),
        args.count
    );
    // Unmeasured warm-up: the first rounds after building the cluster run slower (cold
    // caches, CPU frequency ramp-up) and would otherwise land on the first size only.
    for _ in 0..3 {
        testpod::bench(client, BACKEND.parse()?, args.count, 100).context("warm-up")?;
    }
    let mut results = Vec::new();
    for &size in &args.sizes {
        results.push(measure_size(args, node, client, size)?);
    }
    print_table(&results);
    write_report(&results)
}

fn measure_size(args: &BenchArgs, node: &Node, client: &Pod, size: u32) -> Result<SizeResult> {
    let direct: SocketAddr = BACKEND.parse()?;
    let vip: SocketAddr = VIP.parse()?;
    println!("\n{size} services:");

    let state = StateDir::new("bench")?;
    state.write("state.yaml", &mesh_state(size))?;
    let start = Instant::now();
    let agent = Agent::start(node, state.path())?;
    let mesh_load_s = start.elapsed().as_secs_f64();
    let memory = map_memory(&agent.pin_dir())?;
    println!(
        "  mesh: {size} services loaded and attached in {mesh_load_s:.2} s; maps hold {:.1} MiB",
        memory as f64 / (1024.0 * 1024.0)
    );
    // The baseline runs interleaved with the mesh path, in the same phase.
    let (direct_mesh, mesh) = rounds(args, client, direct, vip, "mesh")?;
    // SIGTERM detaches the programs: the iptables phase sees the plain kernel.
    drop(agent);

    let start = Instant::now();
    iptables_restore(node, &iptables_rules(size))?;
    let iptables_load_s = start.elapsed().as_secs_f64();
    println!(
        "  iptables: {} rules loaded in {iptables_load_s:.2} s",
        1 + size * (2 + 2 * FILLER_BACKENDS)
    );
    let measured = rounds(args, client, direct, vip, "iptables");
    iptables_restore(node, "*nat\n-F\n-X\nCOMMIT\n")?;
    let (direct_ipt, iptables) = measured?;
    Ok(SizeResult {
        services: size,
        mesh_load_s,
        map_memory_bytes: memory,
        iptables_load_s,
        direct_mesh,
        mesh,
        direct_ipt,
        iptables,
    })
}

/// Alternating rounds of the direct path and the VIP path.
fn rounds(
    args: &BenchArgs,
    client: &Pod,
    direct: SocketAddr,
    vip: SocketAddr,
    via: &str,
) -> Result<(PathStats, PathStats)> {
    let (mut d, mut v) = (PathStats::default(), PathStats::default());
    for round in 1..=args.rounds_or(15) {
        let run = |addr, what: &str| {
            testpod::bench(client, addr, args.count, 100)
                .with_context(|| format!("{what} round {round}"))
        };
        let (sd, sv) = if round % 2 == 1 {
            let sd = run(direct, "direct")?;
            (sd, run(vip, via)?)
        } else {
            let sv = run(vip, via)?;
            (run(direct, "direct")?, sv)
        };
        d.add(&sd);
        v.add(&sv);
    }
    println!(
        "  {via}: direct p50 {:.1} us, VIP p50 {:.1} us ({} errors)",
        d.p50_us(),
        v.p50_us(),
        d.errors + v.errors
    );
    Ok((d, v))
}

/// The filler Service i: its VIP and its backends (never dialled).
fn filler(i: u32) -> (String, Vec<String>) {
    let vip = format!("10.96.{}.{}", 1 + i / 256, i % 256);
    let backends = (0..FILLER_BACKENDS)
        .map(|j| format!("10.{}.{}.{}", 246 + j, i / 256, i % 256))
        .collect();
    (vip, backends)
}

/// The measured Service (selector) and `size - 1` selector-less filler Services with
/// EndpointSlices of 10 endpoints each.
fn mesh_state(size: u32) -> String {
    let mut y = String::from(
        "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web}]}
status: {podIP: 10.244.1.11}
",
    );
    for i in 0..size.saturating_sub(1) {
        let (vip, backends) = filler(i);
        let endpoints: Vec<String> = backends
            .iter()
            .map(|b| format!("{{addresses: [{b}]}}"))
            .collect();
        let _ = write!(
            y,
            "---
apiVersion: v1
kind: Service
metadata: {{name: s{i}, namespace: default}}
spec: {{clusterIP: {vip}, ports: [{{port: 80, targetPort: 8080}}]}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: s{i}-1, namespace: default, labels: {{kubernetes.io/service-name: s{i}}}}}
addressType: IPv4
ports: [{{port: 8080, protocol: TCP}}]
endpoints: [{}]
",
            endpoints.join(", ")
        );
    }
    y
}

/// The same Services as kube-proxy's iptables mode writes them (nat table, in the node
/// netns where pod traffic arrives): KUBE-SERVICES matches each VIP:port and jumps to a
/// per-Service chain that picks an endpoint with `statistic --mode random`, then DNAT.
/// The measured Service sits in the middle of KUBE-SERVICES: an average-length scan.
fn iptables_rules(size: u32) -> String {
    let mut chains = String::from("*nat\n:KUBE-SERVICES - [0:0]\n");
    let mut rules = String::from("-A PREROUTING -j KUBE-SERVICES\n");
    let fillers = size.saturating_sub(1);
    let mut add_service = |name: &str, vip: &str, backends: &[String]| {
        let _ = writeln!(chains, ":KUBE-SVC-{name} - [0:0]");
        let _ = writeln!(
            rules,
            "-A KUBE-SERVICES -d {vip}/32 -p tcp -m tcp --dport 80 -j KUBE-SVC-{name}"
        );
        let n = backends.len();
        for (j, b) in backends.iter().enumerate() {
            let _ = writeln!(chains, ":KUBE-SEP-{name}-{j} - [0:0]");
            // kube-proxy: endpoint j of n is taken with probability 1/(n-j); the last always.
            if j + 1 < n {
                let p = 1.0 / (n - j) as f64;
                let _ = writeln!(
                    rules,
                    "-A KUBE-SVC-{name} -m statistic --mode random --probability {p:.10} -j KUBE-SEP-{name}-{j}"
                );
            } else {
                let _ = writeln!(rules, "-A KUBE-SVC-{name} -j KUBE-SEP-{name}-{j}");
            }
            let _ = writeln!(
                rules,
                "-A KUBE-SEP-{name}-{j} -p tcp -m tcp -j DNAT --to-destination {b}:8080"
            );
        }
    };
    for i in 0..fillers {
        if i == fillers / 2 {
            add_service("WEB", "10.96.0.10", &["10.244.1.11".to_owned()]);
        }
        let (vip, backends) = filler(i);
        add_service(&format!("S{i}"), &vip, &backends);
    }
    if fillers == 0 {
        add_service("WEB", "10.96.0.10", &["10.244.1.11".to_owned()]);
    }
    chains + &rules + "COMMIT\n"
}

/// Kernel memory of the pinned maps (bpftool's `bytes_memlock`): the preallocated
/// per-connection maps, plus the hash maps' buckets and the entries the Services fill.
fn map_memory(pin_dir: &std::path::Path) -> Result<u64> {
    let mut total = 0;
    for spec in &mesh_common::maps::REGISTRY {
        let path = pin_dir.join(spec.name);
        let out = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()?;
        let info: serde_json::Value = serde_json::from_slice(&out.stdout)
            .with_context(|| format!("bpftool map show {}", path.display()))?;
        total += info["bytes_memlock"].as_u64().unwrap_or(0);
    }
    Ok(total)
}

/// Loads `rules` with iptables-restore inside the node's netns (never the host's).
/// The legacy (xtables) backend: it loads 200,000 rules in seconds where iptables-nft
/// needs many minutes, and evaluates them the way kube-proxy's iptables mode made
/// famous, one rule after another.
fn iptables_restore(node: &Node, rules: &str) -> Result<()> {
    let mut cmd = Command::new("nsenter");
    cmd.arg(format!("--net={}", node.netns_path().display()))
        .args(["iptables-legacy-restore", "--noflush"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("run iptables-legacy-restore")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(rules.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "iptables-restore failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Every row's ratios are against the baseline: direct to the pod with no iptables rules
/// (the mesh's programs are attached then, but a non-Service connect costs them one
/// missed hash lookup). iptables rules tax every new connection, direct ones included
/// (each first packet walks KUBE-SERVICES), which the "direct, iptables rules" row shows.
fn print_table(results: &[SizeResult]) {
    println!(
        "\n{:>8}  {:<24} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "services", "path", "p50 us", "p99 us", "conn/s", "p50 x", "conn/s x"
    );
    for r in results {
        let base = &r.direct_mesh;
        let rows = [
            ("direct (baseline)", &r.direct_mesh),
            ("VIP via mesh", &r.mesh),
            ("VIP via iptables", &r.iptables),
            ("direct, iptables rules", &r.direct_ipt),
        ];
        for (name, p) in rows {
            println!(
                "{:>8}  {name:<24} {:>9.1} {:>9.1} {:>9.0} {:>8.3}x {:>8.3}x",
                r.services,
                p.p50_us(),
                p.p99_us(),
                p.cps(),
                p.p50_us() / base.p50_us(),
                p.cps() / base.cps()
            );
        }
    }
    println!(
        "\ntargets: mesh p50 within 5% of direct at every size (median of per-round paired \
         ratios); mesh ahead of iptables at 10,000"
    );
    for r in results {
        let mesh = r.mesh.paired_p50_ratio(&r.direct_mesh);
        let ipt = r.iptables.p50_us() / r.direct_mesh.p50_us();
        println!(
            "{:>8} services: mesh {mesh:.3}x direct ({}); iptables {ipt:.3}x direct; mesh {} iptables (p50 {:.1} vs {:.1} us)",
            r.services,
            if mesh <= 1.05 { "met" } else { "NOT met" },
            if r.mesh.p50_us() < r.iptables.p50_us() {
                "ahead of"
            } else {
                "NOT ahead of"
            },
            r.mesh.p50_us(),
            r.iptables.p50_us(),
        );
    }
}

fn write_report(results: &[SizeResult]) -> Result<()> {
    let entry = |p: &PathStats| serde_json::json!({"p50_us": p.p50_us(), "p99_us": p.p99_us(), "conn_per_sec": p.cps(), "errors": p.errors});
    let report: Vec<_> = results
        .iter()
        .map(|r| {
            serde_json::json!({
                "services": r.services,
                "mesh_load_seconds": r.mesh_load_s,
                "mesh_map_memory_bytes": r.map_memory_bytes,
                "iptables_load_seconds": r.iptables_load_s,
                "direct_mesh_phase": entry(&r.direct_mesh),
                "mesh": entry(&r.mesh),
                "mesh_paired_p50_ratio": r.mesh.paired_p50_ratio(&r.direct_mesh),
                "direct_iptables_phase": entry(&r.direct_ipt),
                "iptables": entry(&r.iptables),
            })
        })
        .collect();
    let path = build::workspace_root().join("target/bench/lb.json");
    std::fs::create_dir_all(path.parent().context("report path")?)?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", path.display());
    Ok(())
}
