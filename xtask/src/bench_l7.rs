//! `cargo xtask bench l7`: HTTP requests from a pod on n1 to a pod on n2, four ways in
//! one run: direct (pod IP, the kernel alone: the baseline), mesh (the Service VIP of
//! an `appProtocol: http` port, redirected by connect4 to the node proxy on n1), and
//! through HAProxy and nginx configured as the same L7 hop inside the client pod.
//! Each with `wrk` (HTTP/1.1 keep-alive) and `h2load` (h2c). Every round runs the
//! variants back to back in rotating order, so per-round ratios against direct cancel
//! the drift of this shared machine. For the three proxies: CPU time per request
//! (utime+stime of the process tree) and resident memory under load.
//!
//! Every run also proves its path: the server's `/stats` grew by the requests the
//! client completed, and the node proxy's `istio_requests_total` grew by as many in
//! the mesh variant and not at all in the others.

mod hop;
mod load;
mod procstat;

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr},
    path::PathBuf,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    Agent, Cluster, Pod, Proxy, StateDir, agent,
    l7::{self, HttpStats},
    testpod::BenchSummary,
};

use self::{
    hop::{Hop, Kind},
    load::Load,
    procstat::{Memory, ProcTree},
};
use crate::{
    bench::{PathStats, median},
    build, setup,
};

const CLIENT: (&str, &str) = ("client", "10.244.1.10");
const SERVER: (&str, &str) = ("web-1", "10.244.2.11");
const SERVER_PORT: u16 = 8080;
/// The Service's VIP and its `appProtocol: http` port.
const VIP: (Ipv4Addr, u16) = (Ipv4Addr::new(10, 96, 0, 20), 80);
/// Fronts of HAProxy and nginx on the client pod's loopback: (HTTP/1.1, h2c).
const HAPROXY_PORTS: (u16, u16) = (15101, 15102);
const NGINX_PORTS: (u16, u16) = (15111, 15112);
/// The node proxy's request counter.
const PROXY_REQUESTS: &str = "istio_requests_total";
/// Seconds of the unmeasured warm-up run of each variant and protocol.
const WARMUP_SECS: u32 = 1;
/// How often resident memory is sampled during a run.
const RSS_PERIOD: Duration = Duration::from_millis(250);

/// Options of `bench l7`.
#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds of load per run.
    pub secs: u32,
    /// Rounds; each runs every variant and protocol once.
    pub rounds: u32,
    /// Concurrent connections of wrk and h2load.
    pub connections: u32,
    /// Concurrent streams per h2c connection.
    pub streams: u32,
    /// Variants to run (direct always is: it is the baseline).
    pub variants: Vec<String>,
}

/// How the client reaches the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Variant {
    Direct,
    Mesh,
    Hop(Kind),
}

impl Variant {
    const ALL: [Self; 4] = [
        Self::Direct,
        Self::Mesh,
        Self::Hop(Kind::Haproxy),
        Self::Hop(Kind::Nginx),
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Direct => "direct",
            Self::Mesh => "mesh",
            Self::Hop(kind) => kind.name(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proto {
    H1,
    H2c,
}

impl Proto {
    const ALL: [Self; 2] = [Self::H1, Self::H2c];

    fn name(self) -> &'static str {
        match self {
            Self::H1 => "HTTP/1.1",
            Self::H2c => "h2c",
        }
    }
}

/// One variant and protocol over all rounds.
#[derive(Default)]
struct ProtoStats {
    lat: PathStats,
    /// Per round: requests per second, p50 in µs, CPU time of the proxy per request.
    rps: Vec<f64>,
    p50_us: Vec<f64>,
    cpu_per_request: Vec<Duration>,
    requests: u64,
    errors: u64,
}

/// One variant over all rounds.
#[derive(Default)]
struct VariantStats {
    h1: ProtoStats,
    h2c: ProtoStats,
    /// Highest resident set sampled during its runs, and the peak the kernel recorded.
    memory: Memory,
}

impl VariantStats {
    fn of(&self, proto: Proto) -> &ProtoStats {
        match proto {
            Proto::H1 => &self.h1,
            Proto::H2c => &self.h2c,
        }
    }

    fn of_mut(&mut self, proto: Proto) -> &mut ProtoStats {
        match proto {
            Proto::H1 => &mut self.h1,
            Proto::H2c => &mut self.h2c,
        }
    }
}

/// Runs the benchmark.
pub fn run(opts: &Options) -> Result<()> {
    let variants = chosen(&opts.variants)?;
    ensure!(
        opts.secs > 0 && opts.rounds > 0 && opts.connections > 0 && opts.streams > 0,
        "--secs, --rounds, --connections and --streams must be at least 1"
    );
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    // Declaration order is the reverse of teardown: hops and proxy stop before the
    // agents, the agents before the cluster goes.
    let cluster = Cluster::builder("bl7")
        .node("n1")
        .node("n2")
        .pod("n1", CLIENT.0, CLIENT.1)
        .pod("n2", SERVER.0, SERVER.1)
        .build()?;
    let (client, server) = (cluster.pod(CLIENT.0), cluster.pod(SERVER.0));
    let _server = l7::start_http_server(server, SERVER_PORT, SERVER.0, &[])?;
    // The agent finds a pod's netns through its processes, and the node proxy listens
    // only in pods the agent found: the client pod holds one for the whole run.
    let _anchor = client.spawn_anchor()?;
    let state = StateDir::new("bl7")?;
    let node = |n: &str| agent::node_name(cluster.node(n));
    state.write("web.yaml", &state_yaml(&node("n1"), &node("n2")))?;
    let _agents = ["n1", "n2"]
        .iter()
        .map(|n| Agent::start(cluster.node(n), state.path()))
        .collect::<Result<Vec<_>>>()?;
    // One worker thread, as HAProxy (`nbthread 1`) and nginx (`worker_processes 1`)
    // get: requests per core compare like with like.
    let proxy = if variants.contains(&Variant::Mesh) {
        Some(Proxy::start(
            cluster.node("n1"),
            &["--worker-threads", "1"],
        )?)
    } else {
        None
    };
    let scratch = Scratch::new()?;
    let backend = SocketAddr::from((server.ip(), SERVER_PORT));
    let mut hops = Vec::new();
    for v in &variants {
        if let Variant::Hop(kind) = *v {
            let ports = match kind {
                Kind::Haproxy => HAPROXY_PORTS,
                Kind::Nginx => NGINX_PORTS,
            };
            hops.push(Hop::start(kind, client, backend, ports, &scratch.0)?);
        }
    }
    let bed = Bed {
        client,
        backend,
        proxy: proxy.as_ref(),
        hops: &hops,
        scratch: scratch.0.clone(),
    };
    // The mesh variant must really be redirected before anything is measured.
    if let Some(proxy) = bed.proxy {
        wait_for_redirect(client, proxy)?;
    }

    let load = Load {
        secs: opts.secs,
        connections: opts.connections,
        streams: opts.streams,
    };
    println!(
        "l7: {} -> {} across two nodes; variants {}; {} rounds of {} s per variant and \
         protocol (wrk HTTP/1.1, h2load h2c), {} connections{}",
        CLIENT.0,
        SERVER.0,
        variants
            .iter()
            .map(|v| v.name())
            .collect::<Vec<_>>()
            .join(", "),
        opts.rounds,
        opts.secs,
        opts.connections,
        if opts.streams > 1 {
            format!(", {} h2c streams each", opts.streams)
        } else {
            String::new()
        }
    );
    // Unmeasured: fills connection pools, faults in the proxies' memory.
    let warmup = Load {
        secs: WARMUP_SECS,
        ..load
    };
    for &v in &variants {
        for proto in Proto::ALL {
            bed.measure(v, proto, &warmup)
                .with_context(|| format!("warm-up of {} {}", v.name(), proto.name()))?;
        }
    }
    let mut stats: Vec<VariantStats> = variants.iter().map(|_| VariantStats::default()).collect();
    for round in 0..opts.rounds as usize {
        for i in 0..variants.len() {
            let k = (round + i) % variants.len();
            let v = variants[k];
            for proto in Proto::ALL {
                let m = bed.measure(v, proto, &load).with_context(|| {
                    format!("{} {} round {}", v.name(), proto.name(), round + 1)
                })?;
                let s = &mut stats[k];
                s.memory.rss_kib = s.memory.rss_kib.max(m.memory.rss_kib);
                s.memory.hwm_kib = s.memory.hwm_kib.max(m.memory.hwm_kib);
                let p = s.of_mut(proto);
                p.lat.add(&m.summary);
                p.rps.push(m.summary.conn_per_sec);
                p.p50_us.push(m.summary.p50_ns as f64 / 1e3);
                p.requests += m.summary.count;
                p.errors += m.summary.errors.values().sum::<u64>();
                if let Some(cpu) = m.cpu {
                    p.cpu_per_request
                        .push(cpu / u32::try_from(m.summary.count.max(1)).unwrap_or(u32::MAX));
                }
            }
        }
    }
    let report = Report {
        variants: &variants,
        stats: &stats,
    };
    print!("{}", report.table());
    report.write_json()
}

/// The variants of `--variants`, in [`Variant::ALL`] order, direct always first.
fn chosen(names: &[String]) -> Result<Vec<Variant>> {
    for name in names {
        ensure!(
            Variant::ALL.iter().any(|v| v.name() == name),
            "unknown variant {name:?}; available: direct, mesh, haproxy, nginx"
        );
    }
    Ok(Variant::ALL
        .into_iter()
        .filter(|v| *v == Variant::Direct || names.iter().any(|n| n == v.name()))
        .collect())
}

/// What one measured run gave.
struct Measured {
    summary: BenchSummary,
    /// CPU time the proxy of the variant spent during the run (none for direct).
    cpu: Option<Duration>,
    memory: Memory,
}

/// The running pieces every measurement uses.
struct Bed<'a> {
    client: &'a Pod,
    backend: SocketAddr,
    proxy: Option<&'a Proxy>,
    hops: &'a [Hop],
    scratch: PathBuf,
}

impl Bed<'_> {
    /// The URL the client dials for `v` and `proto`, and the process tree doing the
    /// variant's L7 hop.
    fn target(&self, v: Variant, proto: Proto) -> Result<(String, Option<ProcTree>)> {
        let (addr, pid) = match v {
            Variant::Direct => (self.backend, None),
            Variant::Mesh => {
                let proxy = self.proxy.context("the node proxy is not running")?;
                (
                    SocketAddr::from(VIP),
                    Some(proxy.pid().context("proxy exited")?),
                )
            }
            Variant::Hop(kind) => {
                let hop = self
                    .hops
                    .iter()
                    .find(|h| h.kind() == kind)
                    .with_context(|| format!("{} is not running", kind.name()))?;
                let addr = match proto {
                    Proto::H1 => hop.h1,
                    Proto::H2c => hop.h2,
                };
                (addr, Some(hop.pid().context("exited")?))
            }
        };
        let tree = pid.map(ProcTree::new).transpose()?;
        Ok((format!("http://{addr}/"), tree))
    }

    /// One run of `proto`'s load generator through `v`, with its proofs.
    fn measure(&self, v: Variant, proto: Proto, load: &Load) -> Result<Measured> {
        let (url, tree) = self.target(v, proto)?;
        let served_before = self.served()?;
        let proxied_before = self.proxied()?;
        let cpu_before = tree.as_ref().map(ProcTree::cpu).transpose()?;
        let done = AtomicBool::new(false);
        let (summary, memory) = std::thread::scope(|s| {
            let sampler = s.spawn(|| sample_memory(tree.as_ref(), &done));
            let summary = match proto {
                Proto::H1 => load::wrk(self.client, &url, load),
                Proto::H2c => load::h2load(self.client, &url, load, &self.scratch),
            };
            done.store(true, Ordering::Relaxed);
            let memory = sampler.join().expect("the memory sampler does not panic");
            (summary, memory)
        });
        let summary = summary?;
        let cpu = match (&tree, cpu_before) {
            (Some(tree), Some(before)) => Some(tree.cpu()?.saturating_sub(before)),
            _ => None,
        };
        self.prove(v, &summary, served_before, proxied_before, cpu, load)?;
        Ok(Measured {
            summary,
            cpu,
            memory: memory?,
        })
    }

    /// The requests each run completed went where the variant says: the server saw
    /// them all; the node proxy relayed them in the mesh variant and none otherwise; a
    /// third-party hop spent CPU on them.
    fn prove(
        &self,
        v: Variant,
        summary: &BenchSummary,
        served_before: u64,
        proxied_before: Option<f64>,
        cpu: Option<Duration>,
        load: &Load,
    ) -> Result<()> {
        let completed = summary.count;
        let errors: u64 = summary.errors.values().sum();
        ensure!(completed > 0, "no request completed");
        ensure!(
            errors * 100 <= completed,
            "{errors} errors for {completed} requests: {:?}",
            summary.errors
        );
        // Requests still in flight when the generator stopped reached the server (and
        // the proxy) without being counted by the client; proxies hold some of their own.
        let slack = 2 * u64::from(load.connections * load.streams) + errors;
        let served = self.served()? - served_before;
        ensure!(
            (completed..=completed + slack).contains(&served),
            "the server answered {served} requests, the client completed {completed}"
        );
        if let (Some(before), Some(after)) = (proxied_before, self.proxied()?) {
            let proxied = (after - before).round() as u64;
            match v {
                Variant::Mesh => ensure!(
                    proxied + slack >= completed && proxied <= completed + slack,
                    "the node proxy counted {proxied} requests, the client completed {completed}"
                ),
                _ => ensure!(
                    proxied == 0,
                    "the node proxy counted {proxied} requests of the {} variant",
                    v.name()
                ),
            }
        }
        if let Some(cpu) = cpu {
            ensure!(
                !cpu.is_zero(),
                "the {} variant's proxy used no CPU for {completed} requests",
                v.name()
            );
        }
        Ok(())
    }

    /// Requests the server has answered (its `/stats`, fetched from the client pod
    /// straight to the pod IP: never through a proxy, and not counted itself).
    fn served(&self) -> Result<u64> {
        let r = l7::curl(self.client, &format!("http://{}/stats", self.backend), &[])?;
        ensure!(
            r.exit_code == 0 && r.http_code == 200,
            "GET /stats of {}: {r:?}",
            self.backend
        );
        Ok(r.json::<HttpStats>()?.requests)
    }

    /// The node proxy's request count (summed over its labels), if it runs.
    fn proxied(&self) -> Result<Option<f64>> {
        self.proxy
            .map(|p| Ok(p.metrics_parsed()?.sum(PROXY_REQUESTS, &[])))
            .transpose()
    }
}

/// The highest resident memory of `tree` sampled until `done`, and its kernel peak.
fn sample_memory(tree: Option<&ProcTree>, done: &AtomicBool) -> Result<Memory> {
    let Some(tree) = tree else {
        return Ok(Memory::default());
    };
    let mut highest = Memory::default();
    // Bounded by the load generator, which is bounded by its own timeout.
    while !done.load(Ordering::Relaxed) {
        let m = tree.memory()?;
        highest.rss_kib = highest.rss_kib.max(m.rss_kib);
        highest.hwm_kib = highest.hwm_kib.max(m.hwm_kib);
        std::thread::sleep(RSS_PERIOD);
    }
    Ok(highest)
}

/// Waits until a request to the VIP is counted by the node proxy: the agents have
/// planned the Service, the kernel redirects it and the proxy has its configuration.
fn wait_for_redirect(client: &Pod, proxy: &Proxy) -> Result<()> {
    let url = format!("http://{}:{}/", VIP.0, VIP.1);
    let count = || -> Result<f64> { Ok(proxy.metrics_parsed()?.sum(PROXY_REQUESTS, &[])) };
    let mut last = String::new();
    for _ in 0..60 {
        let before = count()?;
        let r = l7::Curl::new(url.as_str())
            .max_time(Duration::from_secs(2))
            .run(client)?;
        if r.http_code == 200 && count()? > before {
            return Ok(());
        }
        last = format!("{r:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    bail!(
        "requests to {url} from the client never went through the node proxy; last: {last}\n\
         proxy log:\n{}",
        proxy.log()
    )
}

/// The `web` Service (one `appProtocol: http` port), its pod on the server's node and
/// the client pod on the client's node (agent node names).
fn state_yaml(client_node: &str, server_node: &str) -> String {
    let (vip, port) = VIP;
    let mut y = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: web}}
  ports:
    - {{name: http, port: {port}, targetPort: {SERVER_PORT}, protocol: TCP, appProtocol: http}}
"
    );
    for (name, ip, labels, n) in [
        (SERVER.0, SERVER.1, "{app: web}", server_node),
        (CLIENT.0, CLIENT.1, "{app: client}", client_node),
    ] {
        let _ = write!(
            y,
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {labels}}}
spec: {{nodeName: {n}, containers: [{{name: c}}]}}
status: {{podIP: {ip}}}
"
        );
    }
    y
}

/// The bench's own directory for configurations and logs, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("mesh-bench-l7-{}", std::process::id()));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Median over rounds of `f(a[i], b[i])`.
fn paired(a: &[f64], b: &[f64], f: impl Fn(f64, f64) -> f64) -> f64 {
    median(&a.iter().zip(b).map(|(x, y)| f(*x, *y)).collect::<Vec<_>>())
}

/// The results, as a table and as JSON.
struct Report<'a> {
    variants: &'a [Variant],
    stats: &'a [VariantStats],
}

impl Report<'_> {
    fn get(&self, v: Variant) -> Option<&VariantStats> {
        self.variants
            .iter()
            .position(|x| *x == v)
            .map(|i| &self.stats[i])
    }

    fn direct(&self) -> &VariantStats {
        &self.stats[0]
    }

    fn table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "\n{:<8} {:>10} {:>16} {:>10} {:>10} {:>16} {:>10} {:>9}",
            "variant",
            "h1 req/s",
            "h1 p50/p99 us",
            "h1 us CPU",
            "h2c req/s",
            "h2c p50/p99 us",
            "h2c us CPU",
            "RSS MiB"
        );
        let cpu = |p: &ProtoStats| match p.cpu_per_request.is_empty() {
            true => "-".to_owned(),
            false => format!("{:.1}", median_cpu_us(p)),
        };
        for (v, s) in self.variants.iter().zip(self.stats) {
            let lat = |p: &ProtoStats| format!("{:.0}/{:.0}", p.lat.p50_us(), p.lat.p99_us());
            let rss = match s.memory.rss_kib {
                0 => "-".to_owned(),
                kib => format!("{:.1}", kib as f64 / 1024.0),
            };
            let _ = writeln!(
                out,
                "{:<8} {:>10.0} {:>16} {:>10} {:>10.0} {:>16} {:>10} {:>9}",
                v.name(),
                median(&s.h1.rps),
                lat(&s.h1),
                cpu(&s.h1),
                median(&s.h2c.rps),
                lat(&s.h2c),
                cpu(&s.h2c),
                rss,
            );
        }
        let _ = writeln!(
            out,
            "(us CPU: the proxy's user+system CPU per request; RSS: highest VmRSS sampled \
             under load, summed over its processes)\n\nagainst direct, paired per round:\n\
             {:<8} {:>11} {:>9} {:>11} {:>12} {:>9} {:>11} {:>11} {:>11}",
            "variant",
            "h1 req/s x",
            "h1 p50 x",
            "h1 +p50 us",
            "h2c req/s x",
            "h2c p50 x",
            "h2c +p50 us",
            "h1 req/CPUs",
            "h2c req/CPUs"
        );
        let d = self.direct();
        for (v, s) in self.variants.iter().zip(self.stats).skip(1) {
            let per_cpu = |p: &ProtoStats| format!("{:.0}", requests_per_cpu_second(p));
            let _ = writeln!(
                out,
                "{:<8} {:>10.3}x {:>8.3}x {:>11.0} {:>11.3}x {:>8.3}x {:>11.0} {:>11} {:>11}",
                v.name(),
                paired(&s.h1.rps, &d.h1.rps, |a, b| a / b),
                s.h1.lat.paired_p50_ratio(&d.h1.lat),
                added_p50(&s.h1, &d.h1),
                paired(&s.h2c.rps, &d.h2c.rps, |a, b| a / b),
                s.h2c.lat.paired_p50_ratio(&d.h2c.lat),
                added_p50(&s.h2c, &d.h2c),
                per_cpu(&s.h1),
                per_cpu(&s.h2c),
            );
        }
        let errors: u64 = self.stats.iter().map(|s| s.h1.errors + s.h2c.errors).sum();
        let requests: u64 = self
            .stats
            .iter()
            .map(|s| s.h1.requests + s.h2c.requests)
            .sum();
        let _ = writeln!(out, "({requests} requests measured, {errors} errors)");
        out.push_str(&self.targets());
        if self.get(Variant::Hop(Kind::Nginx)).is_some() {
            out.push_str(
                "note: nginx's h2c variant speaks HTTP/1.1 to the backend (nginx proxies \
                 only HTTP/1.x upstream); HAProxy and the node proxy speak h2c to it.\n",
            );
        }
        out
    }

    /// "Less added latency and more requests per core than both", per protocol.
    fn targets(&self) -> String {
        let Some(mesh) = self.get(Variant::Mesh) else {
            return "targets: not judged (the mesh variant did not run)\n".to_owned();
        };
        let others: Vec<(Variant, &VariantStats)> = [Kind::Haproxy, Kind::Nginx]
            .into_iter()
            .filter_map(|k| Some((Variant::Hop(k), self.get(Variant::Hop(k))?)))
            .collect();
        if others.is_empty() {
            return "targets: not judged (neither haproxy nor nginx ran)\n".to_owned();
        }
        let names = others
            .iter()
            .map(|(v, _)| format!("{}'s", v.name()))
            .collect::<Vec<_>>()
            .join(" and ");
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let d = self.direct();
        let mut out = String::new();
        for proto in Proto::ALL {
            let added = |s: &VariantStats| added_p50(s.of(proto), d.of(proto));
            let per_cpu = |s: &VariantStats| requests_per_cpu_second(s.of(proto));
            let list = |f: &dyn Fn(&VariantStats) -> f64, unit: &str| {
                others
                    .iter()
                    .map(|(v, s)| format!("{} {:.0}{unit}", v.name(), f(s)))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                out,
                "target ({}): mesh added p50 < {names}: {} (mesh {:.0} us; {})\n\
                 target ({}): mesh requests per CPU-second > {names}: {} (mesh {:.0}; {})",
                proto.name(),
                verdict(others.iter().all(|(_, s)| added(mesh) < added(s))),
                added(mesh),
                list(&added, " us"),
                proto.name(),
                verdict(others.iter().all(|(_, s)| per_cpu(mesh) > per_cpu(s))),
                per_cpu(mesh),
                list(&per_cpu, ""),
            );
        }
        out
    }

    fn write_json(&self) -> Result<()> {
        let d = self.direct();
        let proto = |p: &ProtoStats, base: &ProtoStats| {
            serde_json::json!({
                "requests_per_sec": median(&p.rps),
                "p50_us": p.lat.p50_us(),
                "p99_us": p.lat.p99_us(),
                "paired_rps_ratio": paired(&p.rps, &base.rps, |a, b| a / b),
                "paired_p50_ratio": p.lat.paired_p50_ratio(&base.lat),
                "added_p50_us": added_p50(p, base),
                "cpu_us_per_request": (!p.cpu_per_request.is_empty()).then(|| median_cpu_us(p)),
                "requests": p.requests,
                "errors": p.errors,
            })
        };
        let report: Vec<_> = self
            .variants
            .iter()
            .zip(self.stats)
            .map(|(v, s)| {
                serde_json::json!({
                    "variant": v.name(),
                    "http1": proto(&s.h1, &d.h1),
                    "h2c": proto(&s.h2c, &d.h2c),
                    "rss_kib": s.memory.rss_kib,
                    "hwm_kib": s.memory.hwm_kib,
                })
            })
            .collect();
        let path = build::workspace_root().join("target/bench/l7.json");
        std::fs::create_dir_all(path.parent().context("report path")?)?;
        std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
        println!("report: {}", path.display());
        Ok(())
    }
}

/// Median over rounds of the variant's p50 minus direct's p50 in the same round, µs.
fn added_p50(p: &ProtoStats, direct: &ProtoStats) -> f64 {
    paired(&p.p50_us, &direct.p50_us, |a, b| a - b)
}

fn median_cpu_us(p: &ProtoStats) -> f64 {
    let us: Vec<f64> = p
        .cpu_per_request
        .iter()
        .map(|d| d.as_secs_f64() * 1e6)
        .collect();
    median(&us)
}

/// Requests per second of the proxy's CPU time (NaN when not measured).
fn requests_per_cpu_second(p: &ProtoStats) -> f64 {
    1e6 / median_cpu_us(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn direct_is_always_chosen_and_first() {
        let names = |n: &[&str]| n.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        let v = chosen(&names(&["nginx", "mesh"])).unwrap();
        assert_eq!(
            v,
            [Variant::Direct, Variant::Mesh, Variant::Hop(Kind::Nginx)]
        );
        assert!(chosen(&names(&["envoy"])).is_err());
    }

    #[test]
    fn state_has_an_l7_port_and_both_pods() {
        let y = state_yaml("n1-node", "n2-node");
        assert!(y.contains("appProtocol: http"));
        assert!(y.contains("clusterIP: 10.96.0.20"));
        assert!(y.contains("nodeName: n2-node"));
        assert!(y.contains("podIP: 10.244.1.10"));
    }

    /// One round of a variant: both protocols at `p50_us`, `rps`, `cpu_us` per request.
    fn one_round(p50_us: u64, rps: f64, cpu_us: Option<u64>) -> VariantStats {
        let mut s = VariantStats::default();
        for proto in Proto::ALL {
            let p = s.of_mut(proto);
            p.lat.add(&BenchSummary {
                count: 1000,
                p50_ns: p50_us * 1000,
                p99_ns: p50_us * 3000,
                mean_ns: 0,
                elapsed_ns: 1_000_000_000,
                conn_per_sec: rps,
                errors: Default::default(),
            });
            p.rps.push(rps);
            p.p50_us.push(p50_us as f64);
            p.cpu_per_request.extend(cpu_us.map(Duration::from_micros));
        }
        s
    }

    #[test]
    fn targets_compare_the_mesh_with_both_hops() {
        let variants = Variant::ALL;
        let stats = [
            one_round(100, 10_000.0, None),
            one_round(150, 8_000.0, Some(10)),
            one_round(200, 7_000.0, Some(20)),
            one_round(140, 7_500.0, Some(25)),
        ];
        let report = Report {
            variants: &variants,
            stats: &stats,
        };
        let t = report.targets();
        assert!(
            t.contains("(h2c): mesh added p50 < haproxy's and nginx's: NOT met (mesh 50 us; haproxy 100 us, nginx 40 us)"),
            "{t}"
        );
        assert!(
            t.contains("(HTTP/1.1): mesh requests per CPU-second > haproxy's and nginx's: met (mesh 100000; haproxy 50000, nginx 40000)"),
            "{t}"
        );
        let table = report.table();
        assert!(table.contains("0.800x"), "{table}");
        let without_mesh = Report {
            variants: &[Variant::Direct, Variant::Hop(Kind::Nginx)],
            stats: &stats[..2],
        };
        assert!(without_mesh.targets().contains("not judged"));
    }

    #[test]
    fn paired_values_take_the_median_of_rounds() {
        assert_eq!(
            paired(&[2.0, 9.0, 4.0], &[1.0, 3.0, 1.0], |a, b| a - b),
            3.0
        );
        assert!(median(&[]).is_nan());
    }
}
