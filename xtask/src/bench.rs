//! `cargo xtask bench lb`: connection setup through a Service VIP against a direct
//! connection to the same pod, measured in the same run with interleaved rounds so the
//! ratio stays meaningful on a noisy shared machine.

use std::{net::SocketAddr, path::Path};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{Agent, Cluster, StateDir, testpod};

use crate::{build, setup};

/// Options of `cargo xtask bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Which benchmark: `lb`.
    which: String,
    /// Measured connections per round and path.
    #[arg(long, default_value_t = 2000)]
    count: u32,
    /// Rounds; each runs both paths, alternating which goes first.
    #[arg(long, default_value_t = 15)]
    rounds: u32,
}

const STATE: &str = "apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
spec: {containers: [{name: web}]}
status: {podIP: 10.244.1.11}
";

/// Runs the chosen benchmark.
pub fn run(args: &BenchArgs) -> Result<()> {
    match args.which.as_str() {
        "lb" => lb(args),
        other => bail!("unknown benchmark {other:?}; available: lb"),
    }
}

/// Per-path results across rounds.
#[derive(Default)]
struct PathStats {
    p50: Vec<u64>,
    p99: Vec<u64>,
    count: u64,
    elapsed_ns: u64,
    errors: u64,
}

impl PathStats {
    fn add(&mut self, s: &testpod::BenchSummary) {
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

    fn p50_us(&self) -> f64 {
        Self::median(&self.p50) / 1e3
    }

    fn p99_us(&self) -> f64 {
        Self::median(&self.p99) / 1e3
    }

    fn cps(&self) -> f64 {
        if self.elapsed_ns == 0 { 0.0 } else { self.count as f64 * 1e9 / self.elapsed_ns as f64 }
    }
}

fn lb(args: &BenchArgs) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let cluster = Cluster::builder("bench")
        .node("n1")
        .pod("n1", "client", "10.244.1.10")
        .pod("n1", "web-1", "10.244.1.11")
        .build()?;
    let _server = testpod::start_server(cluster.pod("web-1"), 8080, "web-1")?;
    let state = StateDir::new("bench")?;
    state.write("state.yaml", STATE)?;
    let agent = Agent::start(cluster.node("n1"), state.path())?;

    let client = cluster.pod("client");
    // Tens of thousands of short connections to one destination leave as many client
    // ports in TIME_WAIT; once the ephemeral range runs low, connect() spends
    // milliseconds hunting for a port and measures that instead of the mesh. Both knobs
    // are per network namespace, so only the client pod changes.
    client.in_netns(|| -> Result<()> {
        std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
        std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
        Ok(())
    })??;
    let direct: SocketAddr = "10.244.1.11:8080".parse()?;
    let vip: SocketAddr = "10.96.0.10:80".parse()?;
    let (mut d, mut v) = (PathStats::default(), PathStats::default());
    println!(
        "lb: connect + 64 B request/echo + close from a pod, {} rounds x {} connections per path",
        args.rounds, args.count
    );
    for round in 1..=args.rounds {
        let run = |addr, what| testpod::bench(client, addr, args.count, 100).context(what);
        // Alternate the order so neither path always runs on a warmer machine.
        let (sd, sv) = if round % 2 == 1 {
            let sd = run(direct, "direct round")?;
            (sd, run(vip, "VIP round")?)
        } else {
            let sv = run(vip, "VIP round")?;
            (run(direct, "direct round")?, sv)
        };
        println!(
            "  round {round}: direct p50 {:.1} us, VIP p50 {:.1} us",
            sd.p50_ns as f64 / 1e3,
            sv.p50_ns as f64 / 1e3
        );
        d.add(&sd);
        v.add(&sv);
    }
    drop(agent);

    println!("\n{:<22} {:>10} {:>10} {:>12} {:>7}", "path", "p50 (us)", "p99 (us)", "conn/s", "errors");
    for (name, p) in [("direct to pod IP", &d), ("VIP via mesh", &v)] {
        println!("{name:<22} {:>10.1} {:>10.1} {:>12.0} {:>7}", p.p50_us(), p.p99_us(), p.cps(), p.errors);
    }
    let ratio = |a: f64, b: f64| if b == 0.0 { f64::NAN } else { a / b };
    let (r50, r99, rcps) =
        (ratio(v.p50_us(), d.p50_us()), ratio(v.p99_us(), d.p99_us()), ratio(v.cps(), d.cps()));
    println!("{:<22} {:>9.3}x {:>9.3}x {:>11.3}x", "ratio VIP / direct", r50, r99, rcps);
    let verdict = if r50 <= 1.05 { "met" } else { "NOT met" };
    println!("target: VIP p50 within 5% of direct: {verdict}");
    write_report(&build::workspace_root().join("target/bench/lb.json"), &d, &v, r50, r99, rcps)
}

fn write_report(path: &Path, d: &PathStats, v: &PathStats, r50: f64, r99: f64, rcps: f64) -> Result<()> {
    let entry = |p: &PathStats| {
        serde_json::json!({"p50_us": p.p50_us(), "p99_us": p.p99_us(), "conn_per_sec": p.cps(), "errors": p.errors})
    };
    let report = serde_json::json!({
        "direct": entry(d), "vip": entry(v),
        "ratio": {"p50": r50, "p99": r99, "conn_per_sec": rcps},
    });
    std::fs::create_dir_all(path.parent().context("report path")?)?;
    std::fs::write(path, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", path.display());
    Ok(())
}
