//! Finding the cgroup2 and bpffs mounts (never hard-coded: hybrid cgroup layouts put
//! cgroup2 at /sys/fs/cgroup/unified), and mounting bpffs when it is missing.

use std::path::{Path, PathBuf};

use super::DatapathError;

/// Mount points of filesystems of type `fstype`, from the text of /proc/self/mounts.
fn mount_points<'a>(mounts: &'a str, fstype: &'a str) -> impl Iterator<Item = PathBuf> + 'a {
    mounts.lines().filter_map(move |line| {
        let mut fields = line.split_whitespace();
        let (_src, target, ty) = (fields.next()?, fields.next()?, fields.next()?);
        // /proc/mounts escapes spaces and friends as octal (\040).
        (ty == fstype).then(|| PathBuf::from(unescape(target)))
    })
}

fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(pos) = rest.find('\\') {
        out.push_str(&rest[..pos]);
        let code = rest
            .get(pos + 1..pos + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(byte) => {
                out.push(char::from(byte));
                rest = &rest[pos + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[pos + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn read_mounts() -> Result<String, DatapathError> {
    std::fs::read_to_string("/proc/self/mounts").map_err(|source| DatapathError::Io {
        op: "read",
        path: "/proc/self/mounts".into(),
        source,
    })
}

/// The cgroup2 root of this machine.
pub fn cgroup2_root() -> Result<PathBuf, DatapathError> {
    mount_points(&read_mounts()?, "cgroup2")
        .next()
        .ok_or(DatapathError::NoCgroup2)
}

/// Makes sure `bpffs` is a mounted bpf filesystem, mounting it when it is not.
pub fn ensure_bpffs(bpffs: &Path) -> Result<(), DatapathError> {
    if mount_points(&read_mounts()?, "bpf").any(|p| p == bpffs) {
        return Ok(());
    }
    std::fs::create_dir_all(bpffs).map_err(|source| DatapathError::Io {
        op: "create",
        path: bpffs.into(),
        source,
    })?;
    tracing::info!(path = %bpffs.display(), "mounting bpffs");
    nix::mount::mount(
        Some("bpf"),
        bpffs,
        Some("bpf"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|source| DatapathError::MountBpffs {
        path: bpffs.into(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
bpf /sys/fs/bpf bpf rw,relatime 0 0
bpf /tmp/my\\040bpf bpf rw 0 0
";

    #[test]
    fn finds_cgroup2_in_hybrid_layout() {
        let found: Vec<_> = mount_points(MOUNTS, "cgroup2").collect();
        assert_eq!(found, vec![PathBuf::from("/sys/fs/cgroup/unified")]);
    }

    #[test]
    fn unescapes_octal_in_mount_points() {
        let found: Vec<_> = mount_points(MOUNTS, "bpf").collect();
        assert_eq!(
            found,
            vec![PathBuf::from("/sys/fs/bpf"), PathBuf::from("/tmp/my bpf")]
        );
    }

    #[test]
    fn ignores_short_lines() {
        assert_eq!(mount_points("garbage\n", "bpf").count(), 0);
    }
}
