//! `cargo xtask <task>`: everything needed to go from a fresh machine to a running demo
//! or a green test run. Each task installs what it needs first (idempotently).

mod bench;
mod bench_l7;
mod bench_mtls;
mod bench_plan;
mod bench_policy;
mod bench_sockmap;
mod bench_sources;
mod build;
mod demo;
mod fuzz;
mod setup;
mod test;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install the toolchain pieces: nightly rust-src, bpf-linker, bpftool, iproute2.
    Setup,
    /// Build the eBPF object and the agent that embeds it (plus the test workload).
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Run unit and integration tests (integration tests need root).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Start a local cluster in network namespaces, send real traffic, show who answered.
    Demo(demo::DemoArgs),
    /// Benchmarks against an in-run baseline.
    Bench(bench::BenchArgs),
    /// Run a libFuzzer target of fuzz/ for a while (cargo-fuzz, nightly).
    Fuzz(fuzz::FuzzArgs),
}

/// Demo and benchmarks build namespaces, cgroups and eBPF programs: they need root.
fn require_root(task: &str) -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        anyhow::bail!("`cargo xtask {task}` needs root (network namespaces, cgroups, eBPF)");
    }
    Ok(())
}

/// Points the test bed at the binaries just built.
fn use_binaries(bins: &build::Binaries) {
    // SAFETY: called before any thread is started, so nothing reads the environment
    // concurrently.
    unsafe {
        std::env::set_var(mesh_tests::AGENT_BIN_ENV, &bins.agent);
        std::env::set_var(mesh_tests::PROXY_BIN_ENV, &bins.proxy);
        std::env::set_var(mesh_tests::TESTPOD_BIN_ENV, &bins.testpod);
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().task {
        Task::Setup => setup::run(),
        Task::Build { release } => {
            setup::run()?;
            build::run(build::Profile::from_release(release)).map(drop)
        }
        Task::Test { args } => test::run(&args),
        Task::Demo(args) => demo::run(&args),
        Task::Bench(args) => bench::run(&args),
        Task::Fuzz(args) => fuzz::run(&args),
    }
}
