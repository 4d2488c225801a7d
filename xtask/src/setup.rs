//! Idempotent installation of what building and testing need (../shared/TOOLCHAIN.md):
//! rust-src for nightly, bpf-linker linked against nightly's own libLLVM, and from apt
//! bpftool, iproute2, the L7 test and benchmark clients and reference proxies (curl,
//! wrk, h2load, haproxy, nginx), protoc (the etcd client's build) and etcd. Each step checks first and does nothing when already
//! satisfied.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, bail};

/// bpf-linker release known to work with nightly's LLVM here.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Where tools live: outside target/, because bpf-linker carries an rpath to the LLVM
/// symlinks and `cargo clean` must not break it. Kept in sync with mesh-agent/build.rs.
pub fn tools_dir() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("MESH_TOOLS_DIR") {
        return Ok(PathBuf::from(dir));
    }
    let home = std::env::var_os("HOME").context("HOME is not set; set MESH_TOOLS_DIR")?;
    Ok(PathBuf::from(home).join(".local/share/mesh"))
}

/// PATH with the tools directory first, for child cargo invocations.
pub fn path_with_tools() -> anyhow::Result<std::ffi::OsString> {
    let bin = tools_dir()?.join("bin");
    let path = std::env::var_os("PATH").unwrap_or_default();
    Ok(std::env::join_paths(
        std::iter::once(bin).chain(std::env::split_paths(&path)),
    )?)
}

/// Runs every setup step.
pub fn run() -> anyhow::Result<()> {
    rust_src()?;
    bpf_linker()?;
    apt_tools(APT_TOOLS)
}

/// Commands the tests, demo and benchmarks run, and the Debian packages that ship them.
const APT_TOOLS: &[(&str, &str)] = &[
    ("bpftool", "bpftool"),
    ("ip", "iproute2"),
    // L7: HTTP/1.1 and h2c clients, load generators, and reference proxies to compare
    // the node proxy against.
    ("curl", "curl"),
    ("wrk", "wrk"),
    ("h2load", "nghttp2-client"),
    ("haproxy", "haproxy"),
    ("nginx", "nginx-light"),
    // mTLS: the TLS tunnel pair the mesh's tunnel is compared against.
    ("stunnel", "stunnel4"),
    // The etcd client's build script generates its gRPC code with protoc.
    ("protoc", "protobuf-compiler"),
    // The etcd state source: members for the tests and benchmarks, and etcdctl, the
    // "other client" that writes keys behind the agents' back.
    ("etcd", "etcd-server"),
    ("etcdctl", "etcd-client"),
];

fn output(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn status(cmd: &mut Command) -> anyhow::Result<()> {
    let st = cmd.status().with_context(|| format!("running {cmd:?}"))?;
    if !st.success() {
        bail!("{cmd:?} failed with {st}");
    }
    Ok(())
}

fn rust_src() -> anyhow::Result<()> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--installed",
        "--toolchain",
        "nightly",
    ]))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("setup: adding rust-src to the nightly toolchain");
    status(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", "nightly"]))
}

/// nightly's libLLVM: (file name, major version), e.g. ("libLLVM.so.22.1-rust-1.97.0-nightly", 22).
fn nightly_llvm() -> anyhow::Result<(PathBuf, String, u32)> {
    let sysroot = output(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib = Path::new(sysroot.trim()).join("lib");
    for entry in std::fs::read_dir(&lib).with_context(|| format!("reading {}", lib.display()))? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        // The real file is `libLLVM.so.<major>.<minor>-rust-...` (its SONAME).
        if let Some(rest) = name.strip_prefix("libLLVM.so.") {
            let major = rest.split(['.', '-']).next().unwrap_or_default();
            if let Ok(major) = major.parse() {
                return Ok((lib.join(&name), name, major));
            }
        }
    }
    bail!(
        "no libLLVM.so.<version> in {}: is the nightly toolchain complete?",
        lib.display()
    )
}

fn bpf_linker() -> anyhow::Result<()> {
    let tools = tools_dir()?;
    let bin = tools.join("bin/bpf-linker");
    let (llvm_file, llvm_name, major) = nightly_llvm()?;
    let llvm_lib = tools.join("llvm/lib");
    let link_ok =
        |name: &str| std::fs::read_link(llvm_lib.join(name)).is_ok_and(|t| t == llvm_file);
    let installed = Command::new(&bin).arg("--version").output().is_ok_and(|o| {
        o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
    });
    if installed && link_ok("libLLVM.so") && link_ok(&llvm_name) {
        return Ok(());
    }
    eprintln!(
        "setup: building bpf-linker {BPF_LINKER_VERSION} against nightly's LLVM {major} (about 2 minutes)"
    );
    std::fs::create_dir_all(&llvm_lib)
        .with_context(|| format!("creating {}", llvm_lib.display()))?;
    for name in ["libLLVM.so", llvm_name.as_str()] {
        let link = llvm_lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&llvm_file, &link)
            .with_context(|| format!("linking {} to {}", link.display(), llvm_file.display()))?;
    }
    status(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--locked",
                "--force",
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{major}"),
            ])
            .arg("--root")
            .arg(&tools)
            .env("LLVM_PREFIX", tools.join("llvm")),
    )
}

/// Installs the Debian packages whose commands are missing: (command, package) pairs.
pub fn apt_tools(tools: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|(cmd, _)| !on_path(cmd))
        .map(|(_, pkg)| pkg)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("setup: apt-get install {}", missing.join(" "));
    status(Command::new("apt-get").args(["update", "-qq"]))?;
    status(
        Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

fn on_path(cmd: &str) -> bool {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .any(|dir| dir.join(cmd).is_file())
}
