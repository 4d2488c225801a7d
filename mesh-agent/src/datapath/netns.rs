//! The network namespaces of the local pods, and running work inside one of them.
//!
//! The agent knows the cgroup its programs are attached to, not the pods' network
//! namespaces, so those are found through the processes of that cgroup subtree. Work that
//! must see a pod's namespace (`sock_diag`, the namespace cookie, its addresses) runs on a
//! dedicated, short-lived thread that enters it: `setns` changes the calling thread's
//! namespace, which must never happen to a thread of the agent's async runtime.

use std::collections::HashSet;
use std::fs::File;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::thread;

use nix::errno::Errno;
use nix::sched::CloneFlags;
use tracing::{debug, warn};

/// Why finding the namespaces, or entering one of them, failed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The cgroup's process list could not be read, so no namespace can be found.
    #[error("reading processes of cgroup {}: {source}", path.display())]
    Cgroup {
        /// The cgroup2 directory whose `cgroup.procs` failed.
        path: PathBuf,
        /// The underlying error.
        source: io::Error,
    },
    /// The agent's own network namespace could not be identified, so it could not be told
    /// apart from the pods' ones.
    #[error("identifying the agent's own netns (/proc/self/ns/net): {source}")]
    OwnNetns {
        /// The underlying error.
        source: io::Error,
    },
    /// No thread could be started to enter the namespace.
    #[error("spawning a thread for netns net:[{netns}] (via pid {pid}): {source}")]
    Spawn {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// The underlying error.
        source: io::Error,
    },
    /// The thread working in the namespace panicked.
    #[error("thread for netns net:[{netns}] (via pid {pid}) panicked")]
    Panicked {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
    },
    /// `setns(CLONE_NEWNET)` into the namespace failed.
    #[error("entering netns net:[{netns}] (via pid {pid}): {source}")]
    Setns {
        /// The process through which the namespace was found.
        pid: u32,
        /// The namespace's inode number.
        netns: u64,
        /// The underlying error.
        source: Errno,
    },
}

/// A network namespace, held open so it cannot be confused with a later one even if the
/// process that led to it exits (or its pid is reused) before the namespace is entered.
#[derive(Debug)]
pub struct Netns {
    /// The process through which the namespace was found.
    pub pid: u32,
    /// The namespace's inode number (`net:[inode]`).
    pub inode: u64,
    file: File,
}

/// A namespace's identity: the `(dev, inode)` of its `nsfs` file. The inode alone is not
/// guaranteed unique across `nsfs` instances.
type NsId = (u64, u64);

/// Runs `work` inside each network namespace of the processes in `cgroup` and its
/// descendant cgroups, once per namespace, and returns the results of those where it
/// succeeded.
///
/// The agent's own namespace is left out even when its processes (or others sharing the
/// host's namespace) are in the cgroup: the agent and the node are not pods, and work
/// meant for pods must not touch them. A namespace that fails (its process exited, it
/// could not be entered, `work` failed) is logged with `tracing::warn!` and skipped, so
/// one terminating pod cannot hold up the others; only an unreadable `cgroup` or
/// `/proc/self/ns/net` is an error. `task` names the work in that log.
///
/// This blocks (filesystem I/O, one thread per namespace, one after the other).
pub fn for_each_pod_netns<T, E>(
    cgroup: &Path,
    task: &str,
    work: impl Fn(&Netns) -> Result<T, E> + Sync,
) -> Result<Vec<T>, NetnsError>
where
    T: Send,
    E: From<NetnsError> + std::fmt::Display + Send,
{
    let mut done = Vec::new();
    for ns in pod_namespaces(cgroup)? {
        match in_netns(&ns, || work(&ns))
            .map_err(E::from)
            .and_then(|result| result)
        {
            Ok(out) => done.push(out),
            Err(error) => warn!(
                cgroup = %cgroup.display(),
                pid = ns.pid,
                netns = ns.inode,
                task,
                %error,
                "skipping network namespace"
            ),
        }
    }
    Ok(done)
}

/// One open handle per distinct network namespace of the processes in `cgroup` and its
/// descendant cgroups, except the agent's own (see [`for_each_pod_netns`]).
fn pod_namespaces(cgroup: &Path) -> Result<Vec<Netns>, NetnsError> {
    let own =
        std::fs::metadata("/proc/self/ns/net").map_err(|source| NetnsError::OwnNetns { source })?;
    let pids = cgroup_pids(cgroup)?;
    Ok(distinct_netns(&pids, (own.dev(), own.ino())))
}

/// Runs `f` on a fresh thread that has entered `ns`, and returns what `f` returns.
///
/// The thread exits when `f` is done, taking the namespace switch with it. Sockets `f`
/// creates (including the netlink sockets of libraries it calls) belong to `ns`. This
/// blocks until `f` returns.
pub fn in_netns<T: Send>(ns: &Netns, f: impl FnOnce() -> T + Send) -> Result<T, NetnsError> {
    let (pid, netns) = (ns.pid, ns.inode);
    // Scoped, so `f` may borrow from the caller.
    thread::scope(|scope| {
        let worker = thread::Builder::new()
            .name(format!("netns-{netns}"))
            .spawn_scoped(scope, move || {
                nix::sched::setns(&ns.file, CloneFlags::CLONE_NEWNET)
                    .map_err(|source| NetnsError::Setns { pid, netns, source })?;
                Ok(f())
            })
            .map_err(|source| NetnsError::Spawn { pid, netns, source })?;
        worker
            .join()
            .map_err(|_| NetnsError::Panicked { pid, netns })?
    })
}

/// Pids of all processes in `root` and its descendant cgroups.
///
/// Descendants that disappear while walking (pods terminating) are skipped; only the root
/// itself must be readable.
fn cgroup_pids(root: &Path) -> Result<Vec<u32>, NetnsError> {
    let mut pids = Vec::new();
    read_procs(root, &mut pids).map_err(|source| NetnsError::Cgroup {
        path: root.to_path_buf(),
        source,
    })?;
    let mut stack = subdirs(root);
    while let Some(dir) = stack.pop() {
        match read_procs(&dir, &mut pids) {
            Ok(()) => stack.extend(subdirs(&dir)),
            Err(error) => debug!(cgroup = %dir.display(), %error, "skipping vanished cgroup"),
        }
    }
    Ok(pids)
}

fn read_procs(dir: &Path, pids: &mut Vec<u32>) -> io::Result<()> {
    let procs = std::fs::read_to_string(dir.join("cgroup.procs"))?;
    pids.extend(
        procs
            .lines()
            .filter_map(|line| line.trim().parse::<u32>().ok()),
    );
    Ok(())
}

/// Child cgroups of `dir`; an unreadable directory has none (it is being removed).
fn subdirs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        // `file_type` does not follow symlinks, so the walk stays inside the subtree.
        .filter(|entry| entry.file_type().is_ok_and(|t| t.is_dir()))
        .map(|entry| entry.path())
        .collect()
}

/// One open handle per distinct network namespace of `pids`, except `skip` (the agent's
/// own namespace); processes that exit meanwhile are skipped.
fn distinct_netns(pids: &[u32], skip: NsId) -> Vec<Netns> {
    // Seeding the set with the skipped namespace makes it look already taken.
    let mut seen = HashSet::from([skip]);
    let mut namespaces = Vec::new();
    for &pid in pids {
        let opened = File::open(format!("/proc/{pid}/ns/net"))
            .and_then(|file| file.metadata().map(|meta| (file, meta)));
        match opened {
            Ok((file, meta)) => {
                if seen.insert((meta.dev(), meta.ino())) {
                    namespaces.push(Netns {
                        pid,
                        inode: meta.ino(),
                        file,
                    });
                }
            }
            Err(error) => debug!(pid, %error, "skipping process without a readable netns"),
        }
    }
    namespaces
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A scratch directory removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("netns-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// Whether the tests run as root; when not, `test` is reported as skipped, except
    /// under CI (`CI=true`), where a missing privilege must fail the run rather than
    /// silently skip it (as `mesh_tests::require_root` does for the integration tests).
    fn is_root(test: &str) -> bool {
        let root = crate::sys::is_root();
        if !root {
            let ci = std::env::var("CI").unwrap_or_default();
            assert!(
                !(ci.eq_ignore_ascii_case("true") || ci == "1"),
                "{test} needs root, and CI={ci} forbids skipping it"
            );
            eprintln!("skipping: {test} needs root");
        }
        root
    }

    /// Where cgroup2 is mounted, for the root tests' throwaway cgroups.
    pub(in crate::datapath) fn cgroup2_mount() -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap();
        mounts
            .lines()
            .map(|line| line.split_whitespace().collect::<Vec<_>>())
            .find(|fields| fields.get(2) == Some(&"cgroup2"))
            .map(|fields| PathBuf::from(fields[1]))
            .expect("no cgroup2 mount")
    }

    /// Runs `cmd`, failing the test unless it succeeds.
    pub(in crate::datapath) fn run(cmd: &mut Command) {
        let status = cmd.status().unwrap();
        assert!(status.success(), "{cmd:?}: {status}");
    }

    /// Network namespaces, cgroups and processes of a root test, removed on drop so that
    /// a failing test leaves nothing behind.
    #[derive(Default)]
    pub(in crate::datapath) struct Sandbox {
        netns: Vec<String>,
        /// Created cgroups, parents before children.
        cgroups: Vec<PathBuf>,
        children: Vec<Child>,
    }

    impl Drop for Sandbox {
        fn drop(&mut self) {
            for child in &mut self.children {
                let _ = child.kill();
                let _ = child.wait();
            }
            for cgroup in self.cgroups.iter().rev() {
                let _ = std::fs::remove_dir(cgroup);
            }
            for netns in &self.netns {
                let _ = Command::new("ip").args(["netns", "del", netns]).status();
            }
        }
    }

    /// Runs `test` with an empty sandbox, cleaned up afterwards, and a name for its objects
    /// unique to this test process (`<prefix>-<pid>`); when not root, reports `what` as
    /// skipped instead.
    pub(in crate::datapath) fn root_test(
        prefix: &str,
        what: &str,
        test: impl FnOnce(&mut Sandbox, &str),
    ) {
        if is_root(what) {
            test(
                &mut Sandbox::default(),
                &format!("{prefix}-{}", std::process::id()),
            );
        }
    }

    impl Sandbox {
        /// Creates the named netns `/run/netns/<name>`, with loopback up.
        pub(in crate::datapath) fn add_netns(&mut self, name: &str) {
            run(Command::new("ip").args(["netns", "add", name]));
            self.netns.push(name.to_owned());
            run(Command::new("ip").args(["-n", name, "link", "set", "lo", "up"]));
        }

        /// Creates the cgroup `path` (its parent must exist) and returns it.
        pub(in crate::datapath) fn add_cgroup(&mut self, path: PathBuf) -> PathBuf {
            std::fs::create_dir(&path).unwrap();
            self.cgroups.push(path.clone());
            path
        }

        /// Moves `child` into `cgroup` and returns its pid; it is killed on drop.
        pub(in crate::datapath) fn adopt(&mut self, child: Child, cgroup: &Path) -> u32 {
            let pid = child.id();
            self.children.push(child);
            std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).unwrap();
            pid
        }
    }

    #[test]
    fn cgroup_walk_collects_pids_of_all_descendants() {
        let root = TempDir::new("walk");
        std::fs::write(root.0.join("cgroup.procs"), "1\n2\n").unwrap();
        std::fs::create_dir_all(root.0.join("pod-a/ctr")).unwrap();
        std::fs::write(root.0.join("pod-a/cgroup.procs"), "").unwrap();
        std::fs::write(root.0.join("pod-a/ctr/cgroup.procs"), "30\n31\n").unwrap();
        // A pod cgroup vanishing mid-walk looks like a directory without cgroup.procs.
        std::fs::create_dir_all(root.0.join("pod-b")).unwrap();
        let mut pids = cgroup_pids(&root.0).unwrap();
        pids.sort_unstable();
        assert_eq!(pids, [1, 2, 30, 31]);
    }

    #[test]
    fn unreadable_cgroup_is_an_error_naming_it() {
        let err = pod_namespaces(Path::new("/nonexistent/netns-cgroup")).unwrap_err();
        assert!(matches!(err, NetnsError::Cgroup { .. }), "{err:?}");
        assert!(
            err.to_string().contains("/nonexistent/netns-cgroup"),
            "{err}"
        );
    }

    #[test]
    fn own_netns_and_exited_processes_are_skipped() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let gone = child.id();
        child.wait().unwrap();
        let me = std::process::id();

        let unrelated = (u64::MAX, u64::MAX);
        let pids: Vec<_> = distinct_netns(&[gone, me, me], unrelated)
            .iter()
            .map(|ns| ns.pid)
            .collect();
        assert_eq!(pids, [me], "reaped child skipped, duplicates merged");
        let own = std::fs::metadata("/proc/self/ns/net").unwrap();
        assert!(distinct_netns(&[gone, me], (own.dev(), own.ino())).is_empty());

        // The same through the public entry point, with a fake cgroup.
        let cgroup = TempDir::new("self");
        std::fs::write(cgroup.0.join("cgroup.procs"), format!("{gone}\n{me}\n")).unwrap();
        assert!(pod_namespaces(&cgroup.0).unwrap().is_empty());
    }

    #[test]
    fn in_netns_returns_the_result_and_reports_failures() {
        let me = std::process::id();
        let [ns] = <[Netns; 1]>::try_from(distinct_netns(&[me], (u64::MAX, u64::MAX))).unwrap();
        if !is_root("entering a netns") {
            // Without CAP_SYS_ADMIN even the own namespace cannot be entered.
            let err = in_netns(&ns, || ()).unwrap_err();
            assert!(
                matches!(err, NetnsError::Setns { pid, .. } if pid == me),
                "{err:?}"
            );
            return;
        }
        let outside = thread::current().id();
        let inside = in_netns(&ns, || thread::current().id()).unwrap();
        assert_ne!(inside, outside, "ran on a thread of its own");
        let err = in_netns(&ns, || -> u8 { panic!("deliberate") }).unwrap_err();
        assert!(
            matches!(err, NetnsError::Panicked { netns, .. } if netns == ns.inode),
            "{err:?}"
        );
    }
}
