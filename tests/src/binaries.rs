//! Finding the binaries the test bed runs: the test workload, the agent and the proxy.

use std::env;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::{Result, bail};

/// Env override for the `mesh-testpod` binary.
pub const TESTPOD_BIN_ENV: &str = "MESH_TESTPOD_BIN";
/// Env override for the `mesh-agent` binary.
pub const AGENT_BIN_ENV: &str = "MESH_AGENT_BIN";
/// Env override for the `mesh-proxy` binary.
pub const PROXY_BIN_ENV: &str = "MESH_PROXY_BIN";

/// Path of the `mesh-testpod` binary.
///
/// Order: `$MESH_TESTPOD_BIN`; next to the current executable (xtask in
/// `target/<profile>/`); one level up (test binaries live in `target/<profile>/deps/`);
/// the newest of `<target>/{debug,release}/mesh-testpod`. Integration tests of this
/// crate can use `env!("CARGO_BIN_EXE_mesh-testpod")` instead.
pub fn testpod_bin() -> Result<PathBuf> {
    find_binary("mesh-testpod", TESTPOD_BIN_ENV, true)
}

/// Path of the `mesh-agent` binary (built by `cargo xtask`, not by this crate).
///
/// Order: `$MESH_AGENT_BIN`; the newest of `<target>/{debug,release}/mesh-agent`, where
/// `<target>` is `$CARGO_TARGET_DIR` or the workspace's `target/`.
pub fn agent_bin() -> Result<PathBuf> {
    find_binary("mesh-agent", AGENT_BIN_ENV, false)
}

/// Path of the `mesh-proxy` binary (built by `cargo xtask`, not by this crate); found
/// as [`agent_bin`] is, through `$MESH_PROXY_BIN`.
pub fn proxy_bin() -> Result<PathBuf> {
    find_binary("mesh-proxy", PROXY_BIN_ENV, false)
}

fn find_binary(name: &str, env_var: &str, near_current_exe: bool) -> Result<PathBuf> {
    if let Some(path) = env::var_os(env_var) {
        let path = PathBuf::from(path);
        if !path.is_file() {
            bail!(
                "${env_var} points to {}, which is not a file",
                path.display()
            );
        }
        return Ok(path);
    }
    let mut candidates = Vec::new();
    if near_current_exe && let Ok(exe) = env::current_exe() {
        // Prefer the binary built alongside whatever is running now (same profile).
        let dirs = exe
            .parent()
            .into_iter()
            .chain(exe.parent().and_then(Path::parent));
        if let Some(found) = dirs.map(|d| d.join(name)).find(|p| p.is_file()) {
            return Ok(found);
        }
    }
    for target in target_dirs() {
        candidates.extend(["debug", "release"].map(|profile| target.join(profile).join(name)));
    }
    let newest = candidates
        .iter()
        .filter_map(|p| {
            Some((
                p.metadata()
                    .ok()?
                    .modified()
                    .unwrap_or(SystemTime::UNIX_EPOCH),
                p,
            ))
        })
        .max_by_key(|(mtime, _)| *mtime);
    match newest {
        Some((_, path)) => Ok(path.clone()),
        None => bail!(
            "{name} not found (looked in {}); build it first or set ${env_var}",
            candidates
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// `$CARGO_TARGET_DIR` if set, else `<workspace>/target` (this crate sits one level
/// below the workspace root).
fn target_dirs() -> Vec<PathBuf> {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("."));
    let mut dirs: Vec<PathBuf> = env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .into_iter()
        .collect();
    dirs.push(workspace.join("target"));
    dirs
}
