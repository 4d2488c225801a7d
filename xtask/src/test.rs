//! `cargo xtask test`: setup, build, then every unit and integration test. Integration
//! tests need root; under CI (`CI=true`) a missing privilege fails instead of skipping.

use anyhow::{Context as _, bail};

use crate::{build, setup};

/// Runs the whole suite; `args` go to `cargo test` after `--` would (filters, flags).
pub fn run(args: &[String]) -> anyhow::Result<()> {
    setup::run()?;
    let bins = build::run(build::Profile::Debug)?;
    let mut cmd = build::cargo()?;
    cmd.arg("test")
        .env("MESH_AGENT_BIN", &bins.agent)
        .env("MESH_PROXY_BIN", &bins.proxy)
        .env("MESH_TESTPOD_BIN", &bins.testpod);
    if !args.is_empty() {
        cmd.arg("--").args(args);
    }
    let st = cmd.status().context("running cargo test")?;
    if !st.success() {
        bail!("tests failed ({st})");
    }
    Ok(())
}
