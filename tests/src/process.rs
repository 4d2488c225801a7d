//! Processes started inside a namespace (and optionally a cgroup), wrapped in guards
//! that kill and reap them on drop.

use std::borrow::BorrowMut;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::sys;

/// Timeout of [`crate::Pod::run`] and [`crate::Node::run_outside_cgroup`].
pub const DEFAULT_RUN_TIMEOUT: Duration = Duration::from_secs(30);

type SharedChild = Arc<Mutex<Child>>;

/// Locks a child, ignoring poisoning: a panic elsewhere must not stop cleanup.
fn lock(child: &Mutex<Child>) -> MutexGuard<'_, Child> {
    child.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Kills (SIGKILL) and reaps a child unless it was reaped already.
///
/// `Child::kill` is a no-op once the child has been waited for, so this never signals
/// a recycled pid.
fn kill_and_reap(child: &mut Child) {
    // Errors mean "already exited", which is the state we want.
    let _ = child.kill();
    let _ = child.wait();
}

/// Every process a cluster started, so that dropping the cluster stops them even when
/// their guards are still alive (e.g. leaked into a struct that outlives the cluster).
#[derive(Debug, Default)]
pub(crate) struct Registry {
    children: Mutex<Vec<Weak<Mutex<Child>>>>,
}

impl Registry {
    fn add(&self, child: &SharedChild) {
        let mut children = self.children.lock().unwrap_or_else(PoisonError::into_inner);
        children.retain(|c| c.strong_count() > 0);
        children.push(Arc::downgrade(child));
    }

    /// Kills and reaps every registered process that still has a guard.
    pub(crate) fn kill_all(&self) {
        let children =
            std::mem::take(&mut *self.children.lock().unwrap_or_else(PoisonError::into_inner));
        for child in children.iter().filter_map(Weak::upgrade) {
            kill_and_reap(&mut lock(&child));
        }
    }
}

/// Where a process is placed before it executes.
pub(crate) struct Placement<'a> {
    /// A netns file, e.g. `/run/netns/NAME`.
    pub(crate) netns: PathBuf,
    /// `None` keeps the process in the test runner's cgroup (used for the agent, whose
    /// own sockets must not be caught by the hooks it attaches to the node cgroup).
    pub(crate) cgroup: Option<&'a Path>,
}

impl Placement<'_> {
    /// Adds a pre-exec hook to `cmd` that enters the cgroup and the netns.
    fn apply(&self, cmd: &mut Command) -> Result<()> {
        // Opened before fork: the child may only make raw syscalls between fork and
        // exec. The files are owned by the hook, so they stay open as long as `cmd`
        // lives and a reused Command still enters the right namespace.
        let netns = File::open(&self.netns)
            .with_context(|| format!("open netns {}", self.netns.display()))?;
        let procs = match self.cgroup {
            Some(dir) => {
                let path = dir.join("cgroup.procs");
                Some(
                    OpenOptions::new()
                        .write(true)
                        .open(&path)
                        .with_context(|| format!("open {}", path.display()))?,
                )
            }
            None => None,
        };
        // SAFETY: the hook only makes raw syscalls (write, setns) on fds opened above and
        // allocates nothing, as required between fork and exec.
        unsafe {
            cmd.pre_exec(move || sys::enter_cgroup_and_netns(procs.as_ref(), &netns));
        }
        Ok(())
    }
}

/// Spawns `cmd` at `placement` and registers it for cleanup.
pub(crate) fn spawn(
    mut cmd: impl BorrowMut<Command>,
    placement: &Placement<'_>,
    registry: &Arc<Registry>,
) -> Result<ChildGuard> {
    let cmd = cmd.borrow_mut();
    placement.apply(cmd)?;
    let child = cmd
        .spawn()
        .with_context(|| format!("spawn {}", describe(cmd)))?;
    let pid = child.id();
    let child = Arc::new(Mutex::new(child));
    registry.add(&child);
    Ok(ChildGuard {
        child,
        pid,
        label: describe(cmd),
        stdout_lines: None,
    })
}

/// Runs `cmd` at `placement` to completion, capturing stdout and stderr; kills it and
/// fails if it takes longer than `timeout`. A non-zero exit is returned, not an error.
pub(crate) fn run(
    mut cmd: impl BorrowMut<Command>,
    placement: &Placement<'_>,
    registry: &Arc<Registry>,
    timeout: Duration,
) -> Result<Output> {
    let cmd = cmd.borrow_mut();
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let guard = spawn(&mut *cmd, placement, registry)?;
    // Drain both pipes on threads so a chatty child cannot block on a full pipe while
    // we wait for it.
    let (stdout, stderr) = {
        let mut child = lock(&guard.child);
        (
            child.stdout.take().map(drain),
            child.stderr.take().map(drain),
        )
    };
    let status = guard.wait_timeout(timeout)?;
    if status.is_none() {
        guard.kill();
    }
    // Bounded: a grandchild that inherited the pipe could keep it open indefinitely.
    let collect = |rx: Option<Receiver<Vec<u8>>>| {
        rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(2)).ok())
            .unwrap_or_default()
    };
    let (stdout, stderr) = (collect(stdout), collect(stderr));
    match status {
        Some(status) => Ok(Output {
            status,
            stdout,
            stderr,
        }),
        None => bail!(
            "{} timed out after {timeout:?} and was killed; stderr: {}",
            guard.label,
            String::from_utf8_lossy(&stderr).trim()
        ),
    }
}

/// Reads a pipe to its end on a thread; the bytes arrive on the returned channel.
fn drain(mut pipe: impl Read + Send + 'static) -> Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = pipe.read_to_end(&mut buf);
        let _ = tx.send(buf);
    });
    rx
}

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for arg in cmd.get_args() {
        s.push(' ');
        s.push_str(&arg.to_string_lossy());
    }
    s
}

/// A running process; dropping the guard kills it (SIGKILL) and reaps it.
///
/// The owning cluster also stops it when the cluster is dropped first.
#[derive(Debug)]
pub struct ChildGuard {
    child: SharedChild,
    pid: u32,
    label: String,
    stdout_lines: Option<Receiver<String>>,
}

impl ChildGuard {
    /// The process id (valid until the guard reaps the process).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The exit status if the process has exited, without blocking.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        lock(&self.child)
            .try_wait()
            .with_context(|| format!("wait for {}", self.label))
    }

    /// Waits up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let mut pause = Duration::from_millis(1);
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            std::thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (e.g. `libc::SIGTERM` to test a graceful shutdown) unless the
    /// process has already exited.
    pub fn signal(&self, signal: i32) -> Result<()> {
        let mut child = lock(&self.child);
        // Holding the lock while the child is unreaped pins the pid: it cannot be
        // recycled before we signal it.
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        // SAFETY: the pid is our unreaped child (checked above under the lock).
        unsafe { sys::kill(self.pid, signal) }
            .with_context(|| format!("signal {signal} to {}", self.label))
    }

    /// Kills (SIGKILL) and reaps the process now.
    pub fn kill(&self) {
        kill_and_reap(&mut lock(&self.child));
    }

    /// Waits until the process prints a stdout line for which `matches` is true, and
    /// returns that line. The command must have been given `Stdio::piped()` stdout.
    ///
    /// The first call starts a thread that keeps draining stdout for the rest of the
    /// process's life, so the child never blocks on a full pipe.
    pub fn wait_for_stdout_line(
        &mut self,
        timeout: Duration,
        matches: impl Fn(&str) -> bool,
    ) -> Result<String> {
        if self.stdout_lines.is_none() {
            let stdout = lock(&self.child)
                .stdout
                .take()
                .ok_or_else(|| anyhow!("{}: stdout is not piped", self.label))?;
            self.stdout_lines = Some(forward_lines(stdout));
        }
        let lines = self.stdout_lines.as_ref().expect("set above");
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match lines.recv_timeout(left) {
                Ok(line) if matches(&line) => return Ok(line),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    bail!("{}: no matching stdout line within {timeout:?}", self.label)
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.try_wait()?;
                    bail!(
                        "{}: stdout closed before a matching line (exit status {status:?})",
                        self.label
                    )
                }
            }
        }
    }
}

fn forward_lines(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            // The receiver may be gone (guard dropped); keep draining anyway.
            let _ = tx.send(line);
        }
    });
    rx
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
