//! `cargo xtask fuzz <target> --secs N`: runs one libFuzzer target of `fuzz/` (a
//! cargo-fuzz crate outside the workspace, built with nightly) for N seconds, installing
//! cargo-fuzz first when it is missing. Not part of `cargo xtask test`: crashes found
//! become regression tests there instead.
//!
//! The corpus is `fuzz/corpus/<target>/`: the committed seeds (`seed-*`) plus what
//! libFuzzer adds (ignored by git). Crashes land in `fuzz/artifacts/<target>/`; replay
//! one with `cargo xtask fuzz <target> --replay fuzz/artifacts/<target>/crash-...`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::build;

/// The cargo-fuzz release known to build with the stable toolchain here.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// Options of `cargo xtask fuzz`.
#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// The target: a file name of `fuzz/fuzz_targets/` without `.rs`.
    target: String,
    /// How long to fuzz, in seconds.
    #[arg(long, default_value_t = 60)]
    secs: u64,
    /// Run these inputs once each instead of fuzzing (crashes, to check a fix).
    #[arg(long, num_args = 1..)]
    replay: Vec<PathBuf>,
    /// More libFuzzer arguments, after `--` (flags such as -max_len=8192, or inputs to
    /// replay).
    #[arg(last = true)]
    libfuzzer: Vec<String>,
}

/// Runs the target; fails when libFuzzer found a crash, leak or timeout.
pub fn run(args: &FuzzArgs) -> Result<()> {
    let fuzz_dir = build::workspace_root().join("fuzz");
    let targets = targets(&fuzz_dir)?;
    if !targets.contains(&args.target) {
        bail!(
            "unknown fuzz target {:?}; available: {}",
            args.target,
            targets.join(", ")
        );
    }
    install_cargo_fuzz()?;
    let mut cmd = Command::new("cargo");
    cmd.current_dir(build::workspace_root())
        .args(["+nightly", "fuzz", "run", &args.target, "--fuzz-dir"])
        .arg(&fuzz_dir)
        // Given inputs replace the corpus: libFuzzer then runs each once.
        .args(&args.replay)
        // Overflow checks and debug assertions on: they turn silent wrong answers into
        // findings.
        .arg("--debug-assertions")
        // The fuzz targets link the agent as a library and need no eBPF object.
        .env("AYA_BUILD_SKIP", "1")
        .arg("--")
        .arg(format!("-max_total_time={}", args.secs))
        // Executions, coverage and corpus size at the end of the run.
        .arg("-print_final_stats=1")
        // One input taking this long is a finding (a hang, or work that grows too fast).
        .arg("-timeout=30")
        .args(&args.libfuzzer);
    let st = cmd.status().context("running cargo fuzz")?;
    if !st.success() {
        bail!(
            "fuzz target {} failed ({st}); the input is in {}",
            args.target,
            fuzz_dir.join("artifacts").join(&args.target).display()
        );
    }
    Ok(())
}

/// The targets, from the file names of `fuzz/fuzz_targets/`, sorted.
fn targets(fuzz_dir: &Path) -> Result<Vec<String>> {
    let dir = fuzz_dir.join("fuzz_targets");
    let mut names = Vec::new();
    for entry in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "rs")
            && let Some(stem) = path.file_stem().and_then(|s| s.to_str())
        {
            names.push(stem.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Installs cargo-fuzz unless some version of it is there already.
fn install_cargo_fuzz() -> Result<()> {
    let installed = Command::new("cargo")
        .args(["fuzz", "--version"])
        .output()
        .is_ok_and(|out| out.status.success());
    if installed {
        return Ok(());
    }
    eprintln!("fuzz: installing cargo-fuzz {CARGO_FUZZ_VERSION}");
    let st = Command::new("cargo")
        .args([
            "install",
            "cargo-fuzz",
            "--locked",
            "--version",
            CARGO_FUZZ_VERSION,
        ])
        .status()
        .context("running cargo install cargo-fuzz")?;
    if !st.success() {
        bail!("cargo install cargo-fuzz failed with {st}");
    }
    Ok(())
}
