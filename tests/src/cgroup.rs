//! cgroup v2 directories owned by a test: created on demand, emptied and removed on drop.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use crate::eventually;

/// How long cleanup waits for killed processes to leave a cgroup before giving up.
const EMPTY_TIMEOUT: Duration = Duration::from_secs(5);

/// The mount point of the cgroup v2 hierarchy, read from `/proc/self/mounts`.
///
/// Never hard-coded: these machines mount it at `/sys/fs/cgroup/unified` (hybrid
/// layout), others at `/sys/fs/cgroup`.
pub fn cgroup2_mount() -> Result<&'static Path> {
    static MOUNT: OnceLock<Option<PathBuf>> = OnceLock::new();
    MOUNT
        .get_or_init(|| {
            let mounts = fs::read_to_string("/proc/self/mounts").ok()?;
            mounts.lines().find_map(|line| {
                let mut fields = line.split_whitespace();
                let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
                (fstype == "cgroup2").then(|| PathBuf::from(unescape_mount_field(target)))
            })
        })
        .as_deref()
        .ok_or_else(|| anyhow!("no cgroup2 mount in /proc/self/mounts"))
}

/// Undoes the octal escaping of /proc/self/mounts (`\040` for a space and so on).
fn unescape_mount_field(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .and_then(|d| u8::from_str_radix(std::str::from_utf8(d).ok()?, 8).ok());
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A cgroup directory this test bed created; dropping it kills whatever still runs
/// inside and removes it (rmdir fails while processes are inside).
#[derive(Debug)]
pub(crate) struct CgroupDir {
    path: PathBuf,
    removed: bool,
}

impl CgroupDir {
    /// Creates the directory (its parent must exist).
    pub(crate) fn create(path: PathBuf) -> Result<Self> {
        fs::create_dir(&path).with_context(|| format!("create cgroup {}", path.display()))?;
        Ok(Self {
            path,
            removed: false,
        })
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// Kills every process inside (sub-cgroups included) and waits until it is empty.
    pub(crate) fn kill_all(&self) -> Result<()> {
        kill_cgroup(&self.path)
    }

    /// Kills what is left inside and removes the directory. Idempotent.
    pub(crate) fn remove(&mut self) -> Result<()> {
        if self.removed {
            return Ok(());
        }
        remove_cgroup_tree(&self.path)?;
        self.removed = true;
        Ok(())
    }
}

impl Drop for CgroupDir {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("mesh-tests: cleanup: {e:#}");
        }
    }
}

/// Kills every process in the cgroup at `path` (and below) and waits until it is empty.
fn kill_cgroup(path: &Path) -> Result<()> {
    // cgroup.kill (Linux 5.14+) SIGKILLs the whole subtree atomically, so processes
    // that fork while we are killing cannot escape.
    match fs::write(path.join("cgroup.kill"), "1") {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("kill cgroup {}", path.display())),
    }
    let populated = || {
        fs::read_to_string(path.join("cgroup.events"))
            .is_ok_and(|events| events.lines().any(|l| l == "populated 1"))
    };
    if !eventually(EMPTY_TIMEOUT, || !populated()) {
        return Err(anyhow!(
            "cgroup {} still populated {EMPTY_TIMEOUT:?} after cgroup.kill",
            path.display()
        ));
    }
    Ok(())
}

/// Kills everything in the cgroup at `path`, then removes it and its sub-cgroups
/// (deepest first). A missing directory counts as removed.
pub(crate) fn remove_cgroup_tree(path: &Path) -> Result<()> {
    if !path.exists() {
        return Ok(());
    }
    kill_cgroup(path)?;
    let children = fs::read_dir(path).with_context(|| format!("list cgroup {}", path.display()))?;
    for entry in children {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            remove_cgroup_tree(&entry.path())?;
        }
    }
    match fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e).with_context(|| format!("remove cgroup {}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::unescape_mount_field;

    #[test]
    fn unescapes_octal_sequences() {
        assert_eq!(
            unescape_mount_field(r"/sys/fs/cgroup/unified"),
            "/sys/fs/cgroup/unified"
        );
        assert_eq!(unescape_mount_field(r"/mnt/a\040b"), "/mnt/a b");
        assert_eq!(unescape_mount_field(r"/mnt/trailing\"), r"/mnt/trailing\");
    }
}
