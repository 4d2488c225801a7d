//! `cargo xtask bench sockmap`: same-node pod-to-pod TCP three ways in one run: plain
//! (no agent, the kernel alone), off (the agent with `--sockmap=false`) and on
//! (`--sockmap=true`, bytes handed socket to socket). Measures request/response on one
//! connection (64 B and 4 KiB each way) and bulk throughput (one connection, 64 KiB
//! writes). Every round runs the three configurations back to back in rotating order
//! (the agent restarted for each), so paired per-round ratios cancel machine drift.
//!
//! Request/response runs twice: with client and server placed by the scheduler, and
//! with both on CPU 0. On a virtual machine an idle vCPU sleeps in the hypervisor, and
//! waking it for every message costs more than the whole network path; on one CPU the
//! wakee simply runs when the waker blocks, so that variant shows the path's own cost.

use std::fmt::Write as _;

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Agent, Cluster, StateDir, agent,
    testpod::{self, SinkOptions},
};

use crate::{
    bench::{PathStats, bulk, median},
    build, setup,
};

const CLIENT: (&str, &str) = ("client", "10.244.1.10");
const SERVER: (&str, &str) = ("server", "10.244.1.11");
const ECHO: &str = "10.244.1.11:8080";
/// The same echo server, its threads on CPU 0.
const ECHO_CPU0: &str = "10.244.1.11:8081";
const SINK: &str = "10.244.1.11:9000";
/// Bytes per bulk transfer, sent in writes of [`BULK_WRITE`].
const BULK_BYTES: u64 = 256 << 20;
const BULK_WRITE: usize = 64 << 10;
const REDIRECTED_BYTES: &str = "mesh_sockmap_redirected_bytes_total";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Plain,
    Off,
    On,
}

impl Mode {
    const ALL: [Self; 3] = [Self::Plain, Self::Off, Self::On];

    fn name(self) -> &'static str {
        match self {
            Self::Plain => "plain",
            Self::Off => "off",
            Self::On => "on",
        }
    }
}

/// Request/response cases: (label, payload bytes, CPU of client and server or none).
const RR: [(&str, usize, Option<usize>); 4] = [
    ("request/response 64 B", 64, None),
    ("request/response 4 KiB", 4096, None),
    ("  same CPU, 64 B", 64, Some(0)),
    ("  same CPU, 4 KiB", 4096, Some(0)),
];

/// One configuration's results over all rounds.
#[derive(Default)]
struct ModeStats {
    /// Per [`RR`] case.
    rr: [PathStats; RR.len()],
    /// Bulk throughput per round, bytes per second.
    bulk: Vec<f64>,
}

/// Runs the benchmark: `count` request/response exchanges per round, size and mode;
/// `rounds` rounds.
pub fn run(count: u32, rounds: u32) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let cluster = Cluster::builder("bskm")
        .node("n1")
        .pod("n1", CLIENT.0, CLIENT.1)
        .pod("n1", SERVER.0, SERVER.1)
        .build()?;
    let server = cluster.pod(SERVER.0);
    let _echo = testpod::start_server(server, 8080, SERVER.0)?;
    let _echo_cpu0 = testpod::start_server_on_cpu(server, 8081, SERVER.0, Some(0))?;
    let mut sink = testpod::start_sink(
        server,
        9000,
        &SinkOptions {
            unchecked: true,
            ..SinkOptions::default()
        },
    )?;
    let state = StateDir::new("bskm")?;
    state.write(
        "pods.yaml",
        &pods_yaml(&agent::node_name(cluster.node("n1"))),
    )?;
    let client = cluster.pod(CLIENT.0);

    println!(
        "sockmap: pod to pod on one node; plain (no agent) vs off (--sockmap=false) vs on;\n    \
         {rounds} rounds, each running the three in rotating order: {count} request/response \
         exchanges of 64 B and of 4 KiB on one connection, and {} MiB in {} KiB writes",
        BULK_BYTES >> 20,
        BULK_WRITE >> 10
    );
    let mut stats: Vec<ModeStats> = Mode::ALL.iter().map(|_| ModeStats::default()).collect();
    for round in 0..rounds as usize {
        for i in 0..Mode::ALL.len() {
            let k = (round + i) % Mode::ALL.len();
            let mode = Mode::ALL[k];
            let agent = match mode {
                Mode::Plain => None,
                Mode::Off => Some(Agent::start_with(
                    cluster.node("n1"),
                    state.path(),
                    &["--sockmap=false"],
                )?),
                Mode::On => Some(Agent::start_with(
                    cluster.node("n1"),
                    state.path(),
                    &["--sockmap=true"],
                )?),
            };
            let before = agent.as_ref().map(redirected).transpose()?;
            let s = &mut stats[k];
            for (stats, (what, payload, cpu)) in s.rr.iter_mut().zip(RR) {
                let to = if cpu.is_some() { ECHO_CPU0 } else { ECHO };
                let summary =
                    testpod::bench_persistent(client, to.parse()?, count, 200, payload, cpu)
                        .with_context(|| format!("{} round {round}: {what}", mode.name()))?;
                stats.add(&summary);
            }
            s.bulk.push(
                bulk(client, SINK.parse()?, &mut sink, BULK_BYTES, BULK_WRITE)
                    .with_context(|| format!("{} round {round}: bulk", mode.name()))?,
            );
            // Proof of what was measured: on redirected the bulk bytes, off none.
            if let (Some(agent), Some(before)) = (&agent, before) {
                let grew = redirected(agent)? - before;
                match mode {
                    Mode::On => ensure!(
                        grew >= BULK_BYTES as f64,
                        "on: only {grew} bytes redirected in round {round}"
                    ),
                    _ => ensure!(grew == 0.0, "off: {grew} bytes redirected in round {round}"),
                }
            }
        }
    }
    print_report(&stats);
    Ok(())
}

fn redirected(agent: &Agent) -> Result<f64> {
    let text = agent.metrics()?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(REDIRECTED_BYTES)?.trim().parse().ok())
        .unwrap_or(0.0))
}

/// Median over rounds of `a[i] / b[i]`.
fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    median(&ratios)
}

fn print_report(stats: &[ModeStats]) {
    let [plain, off, on] = [&stats[0], &stats[1], &stats[2]];
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<22} {:>17} {:>17} {:>17} {:>9} {:>9}",
        "measure", "plain p50/p99", "off p50/p99", "on p50/p99", "on/off", "on/plain"
    );
    for (i, (what, _, _)) in RR.iter().enumerate() {
        let cell = |s: &ModeStats| format!("{:.1}/{:.1} us", s.rr[i].p50_us(), s.rr[i].p99_us());
        let _ = writeln!(
            out,
            "{what:<22} {:>17} {:>17} {:>17} {:>8.3}x {:>8.3}x",
            cell(plain),
            cell(off),
            cell(on),
            on.rr[i].paired_p50_ratio(&off.rr[i]),
            on.rr[i].paired_p50_ratio(&plain.rr[i]),
        );
    }
    let gbps = |s: &ModeStats| format!("{:.2} GB/s", median(&s.bulk) / 1e9);
    let _ = writeln!(
        out,
        "{:<22} {:>17} {:>17} {:>17} {:>8.3}x {:>8.3}x",
        "bulk throughput",
        gbps(plain),
        gbps(off),
        gbps(on),
        paired_ratio(&on.bulk, &off.bulk),
        paired_ratio(&on.bulk, &plain.bulk),
    );
    // Worst on/off p50 ratio, scheduler-placed and same-CPU.
    let worst = |cpu_pinned: bool| {
        RR.iter()
            .enumerate()
            .filter(|(_, (_, _, cpu))| cpu.is_some() == cpu_pinned)
            .map(|(i, _)| on.rr[i].paired_p50_ratio(&off.rr[i]))
            .fold(0.0, f64::max)
    };
    let throughput = paired_ratio(&on.bulk, &off.bulk);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let (placed, pinned) = (worst(false), worst(true));
    let _ = writeln!(
        out,
        "target: on/off throughput >= 1.30x: {throughput:.3}x {}\n\
         target: on/off p50 <= 0.80x: worst {placed:.3}x {} (scheduler-placed), \
         {pinned:.3}x {} (same CPU)",
        verdict(throughput >= 1.3),
        verdict(placed <= 0.8),
        verdict(pinned <= 0.8),
    );
    print!("{out}");
}

/// The two pods on this node (the agent marks their addresses local from this).
fn pods_yaml(node: &str) -> String {
    let mut y = String::new();
    for (name, ip) in [CLIENT, SERVER] {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: default}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        );
    }
    y
}
