//! Builds the eBPF object (mesh-ebpf, nightly + bpf-linker) so the agent embeds it and
//! ships as one self-contained binary. `cargo xtask setup` installs what this needs.
use std::{env, path::PathBuf};

use anyhow::{Context as _, anyhow};
use aya_build::{Package, Toolchain};

/// Where `cargo xtask setup` installs bpf-linker (outside target/, so `cargo clean`
/// keeps it): `$MESH_TOOLS_DIR`, else `~/.local/share/mesh`.
fn tools_bin_dir() -> Option<PathBuf> {
    println!("cargo:rerun-if-env-changed=MESH_TOOLS_DIR");
    let base = match env::var_os("MESH_TOOLS_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env::var_os("HOME")?).join(".local/share/mesh"),
    };
    Some(base.join("bin"))
}

fn main() -> anyhow::Result<()> {
    let out_dir = PathBuf::from(env::var_os("OUT_DIR").context("OUT_DIR not set")?);
    println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
    if env::var_os("AYA_BUILD_SKIP").is_some_and(|v| v == "1" || v == "true") {
        // Host-only builds (unit tests without the eBPF toolchain): embed an empty
        // object; the loader reports it clearly instead of failing to compile.
        std::fs::write(out_dir.join("mesh"), b"")?;
        return Ok(());
    }
    if let Some(bin) = tools_bin_dir().filter(|b| b.join("bpf-linker").exists()) {
        let path = env::var_os("PATH").unwrap_or_default();
        let joined = env::join_paths(std::iter::once(bin).chain(env::split_paths(&path)))?;
        // SAFETY: build scripts are single-threaded at this point.
        unsafe { env::set_var("PATH", joined) };
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or_else(|| anyhow!("mesh-agent has no parent directory"))?
        .join("mesh-ebpf");
    let root_dir = root.to_str().context("non-UTF-8 path to mesh-ebpf")?;
    // mesh-common is a path dependency of mesh-ebpf: rebuild when the map layouts change.
    println!("cargo:rerun-if-changed={root_dir}/../mesh-common/src");
    aya_build::build_ebpf(
        [Package {
            name: "mesh-ebpf",
            root_dir,
            ..Default::default()
        }],
        Toolchain::Custom("nightly"),
    )
    .context(
        "building the eBPF programs failed: run `cargo xtask setup` \
         (needs nightly rust-src and bpf-linker)",
    )
}
