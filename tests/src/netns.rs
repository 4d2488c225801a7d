//! Named network namespaces (`ip netns add`) as RAII guards, and the `ip` runner.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::sys;

/// Where `ip netns add` bind-mounts named namespaces.
pub(crate) const NETNS_RUN_DIR: &str = "/run/netns";

/// Runs `ip <args>` and fails with its stderr when it exits non-zero.
pub(crate) fn ip(args: &[&str]) -> Result<()> {
    let output = Command::new("ip")
        .args(args)
        .output()
        .context("run `ip` (is iproute2 installed?)")?;
    if !output.status.success() {
        bail!(
            "`ip {}` failed ({}): {}",
            args.join(" "),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    Ok(())
}

/// Runs `ip -n <netns> <args>`: the command applies inside the namespace.
pub(crate) fn ip_in(netns: &str, args: &[&str]) -> Result<()> {
    let mut all = vec!["-n", netns];
    all.extend_from_slice(args);
    ip(&all)
}

/// A named network namespace this test bed created; deleted on drop.
///
/// Deleting only unmounts the name: the kernel destroys the namespace (and the veths in
/// it) once no process and no open fd refers to it, which is why the cluster kills its
/// processes before dropping namespaces.
#[derive(Debug)]
pub(crate) struct Netns {
    name: String,
    deleted: bool,
}

impl Netns {
    /// Creates the namespace and brings its loopback up (a new netns starts with `lo`
    /// down, and servers that bind 127.0.0.1 would fail confusingly).
    pub(crate) fn create(name: String) -> Result<Self> {
        ip(&["netns", "add", &name])?;
        let ns = Self {
            name,
            deleted: false,
        };
        ip_in(&ns.name, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub(crate) fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn path(&self) -> PathBuf {
        Path::new(NETNS_RUN_DIR).join(&self.name)
    }

    /// Writes a sysctl under /proc/sys/net from inside this namespace (those files show
    /// the values of the reading thread's netns).
    pub(crate) fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        let file = Path::new("/proc/sys").join(key.replace('.', "/"));
        sys::in_netns(&self.path(), || std::fs::write(&file, value))
            .and_then(|written| written)
            .with_context(|| format!("sysctl {key}={value} in netns {}", self.name))
    }

    /// Deletes the namespace name. Idempotent.
    pub(crate) fn delete(&mut self) -> Result<()> {
        if !self.deleted {
            delete_netns(&self.name)?;
            self.deleted = true;
        }
        Ok(())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = self.delete() {
            eprintln!("mesh-tests: cleanup: {e:#}");
        }
    }
}

/// `ip netns del NAME`, treating an already missing namespace as deleted.
pub(crate) fn delete_netns(name: &str) -> Result<()> {
    if !Path::new(NETNS_RUN_DIR).join(name).exists() {
        return Ok(());
    }
    ip(&["netns", "del", name])
}
