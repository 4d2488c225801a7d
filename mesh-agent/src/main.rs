//! `mesh-agent`: the node agent of a sidecar-less, kernel-native service mesh.
//!
//! Layout: `cli` (commands), `app` (the `run` loop), `admin` (the Unix-socket API for
//! flows and policy, and its client), `flows` (policy verdict events, named), `state` (cluster objects and their
//! files), `plan` (state → desired map contents, pure), `reconcile` (state → plan →
//! maps), `datapath` (load, attach, pin, diff-apply maps, read them back, destroy stale
//! sockets), `health` (active backend probes), `metrics` + `telemetry` (Prometheus), `status`
//! (the datapath at a glance),
//! `watch` (file change notification).

mod admin;
mod app;
mod cli;
mod datapath;
mod flows;
mod health;
mod metrics;
mod plan;
mod reconcile;
mod state;
mod status;
mod telemetry;
mod watch;

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.run() {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
