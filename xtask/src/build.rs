//! Building the agent (whose build script builds and embeds the eBPF object), the node
//! proxy and the test workload binary.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, bail};

use crate::setup;

/// Cargo profile to build with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// `dev`: what `cargo test` also uses, so tests share its build.
    Debug,
    /// `release`: demo and benchmarks.
    Release,
}

impl Profile {
    /// Release when `release`, else debug.
    pub fn from_release(release: bool) -> Self {
        if release { Self::Release } else { Self::Debug }
    }

    fn dir(self) -> &'static str {
        match self {
            Self::Debug => "debug",
            Self::Release => "release",
        }
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is inside the workspace")
        .to_path_buf()
}

/// Paths of the built binaries.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The node agent.
    pub agent: PathBuf,
    /// The node proxy (`mesh-proxy`).
    pub proxy: PathBuf,
    /// The test workload (`mesh-testpod`).
    pub testpod: PathBuf,
}

/// A cargo command in the workspace with the tools on PATH.
pub fn cargo() -> anyhow::Result<Command> {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root())
        .env("PATH", setup::path_with_tools()?);
    Ok(cmd)
}

/// Builds mesh-agent, mesh-proxy and mesh-testpod.
pub fn run(profile: Profile) -> anyhow::Result<Binaries> {
    let mut cmd = cargo()?;
    cmd.args([
        "build",
        "-p",
        "mesh-agent",
        "-p",
        "mesh-proxy",
        "-p",
        "mesh-tests",
        "--bins",
    ]);
    if profile == Profile::Release {
        cmd.arg("--release");
    }
    let st = cmd.status().context("running cargo build")?;
    if !st.success() {
        bail!("cargo build failed with {st}");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join(profile.dir());
    Ok(Binaries {
        agent: target.join("mesh-agent"),
        proxy: target.join("mesh-proxy"),
        testpod: target.join("mesh-testpod"),
    })
}
