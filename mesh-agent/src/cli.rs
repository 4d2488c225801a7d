//! Command line: `run`, `validate`, `services`.

use std::{path::PathBuf, process::ExitCode};

use anyhow::Context as _;
use clap::{Parser, Subcommand};

use crate::{app, datapath, state};

/// Default bpffs mount point (mounted by the agent when missing, as Cilium does).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Node agent of the kernel-native service mesh.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the datapath, program it from the state, follow state changes.
    Run(RunArgs),
    /// Check a state file or directory; print every problem and exit non-zero if any.
    Validate {
        /// State file (multi-document YAML) or directory of them.
        path: PathBuf,
    },
    /// Print the load-balancing table the kernel holds (read from the pinned maps).
    Services {
        /// Node whose datapath to read; may be omitted when exactly one is pinned.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// bpffs mount point.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

/// Arguments of `mesh-agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name (pins live under `<bpffs>/mesh/<node>/`).
    #[arg(long, value_parser = node_name)]
    pub node: String,
    /// State file (multi-document YAML) or directory of them; watched for changes.
    #[arg(long)]
    pub state: PathBuf,
    /// cgroup2 directory to attach to [default: the cgroup2 root from /proc/self/mounts].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs mount point; mounted when missing.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
}

/// A node name usable as a bpffs directory: bpffs refuses names containing '.', so
/// only letters, digits, '-' and '_' are allowed (at most 64).
fn node_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?}: use 1-64 letters, digits, '-' or '_' (bpffs refuses '.' in pin names)"
        ))
    }
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(args) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                rt.block_on(app::run(args))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Validate { path } => Ok(validate(&path)),
            Command::Services { node, bpffs } => {
                let node = match node {
                    Some(node) => node,
                    None => datapath::pins::only_node(&bpffs)?,
                };
                let table = datapath::inspect::read_services(&datapath::pins::node_dir(&bpffs, &node))
                    .with_context(|| format!("reading the datapath of node {node}"))?;
                print!("{table}");
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

fn validate(path: &std::path::Path) -> ExitCode {
    match state::load(path) {
        Ok(state) => match crate::plan::plan(&state, &crate::plan::Ids::default()) {
            Ok((plan, _)) => {
                println!(
                    "{}: valid ({} frontends, {} backends)",
                    path.display(),
                    plan.frontends.len(),
                    plan.backends.len()
                );
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("{}: {err}", path.display());
                ExitCode::FAILURE
            }
        },
        Err(err) => {
            eprintln!("{err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::node_name;

    #[test]
    fn node_names_must_be_valid_bpffs_names() {
        for ok in ["n1", "worker-2", "node_a", "ip-10-0-0-1"] {
            assert_eq!(node_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "node.example.com", "a/b", "x y", &"n".repeat(65)] {
            assert!(node_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
