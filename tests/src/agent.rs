//! Running `mesh-agent` on a test node: in the node's netns, outside its cgroup (so the
//! agent's own sockets are not caught by its hooks), attached to the node's cgroup, with
//! its pins under a node name unique to the test run.

use std::{
    fs::File,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};

use crate::{ChildGuard, Node, agent_bin, eventually};

/// bpffs mount the agents use (the agent mounts it when missing).
pub const BPFFS: &str = "/sys/fs/bpf";

/// How long an agent gets to load, program and attach its datapath.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long an agent gets to detach and unpin after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A directory of state files, removed on drop.
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Creates an empty, uniquely named state directory.
    pub fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-state-{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }

    /// The directory to pass as `--state`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `file` atomically (write to a hidden temporary, then rename), as config
    /// management tools do, so the agent never reads half a file.
    pub fn write(&self, file: &str, yaml: &str) -> Result<()> {
        let tmp = self.path.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, yaml).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, self.path.join(file)).with_context(|| format!("rename to {file}"))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A running agent; stopped with SIGTERM (then SIGKILL) and its pins removed on drop.
pub struct Agent {
    child: Option<ChildGuard>,
    pin_name: String,
    log: PathBuf,
}

impl Agent {
    /// Starts `mesh-agent run` for `node` with `state` and waits until its datapath is
    /// attached ("datapath ready" in its log).
    pub fn start(node: &Node, state: &Path) -> Result<Self> {
        // Unique per test run; bpffs refuses '.' in names.
        let pin_name = node.netns_name().replace('.', "-");
        let log = std::env::temp_dir().join(format!("mesh-agent-{pin_name}.log"));
        let log_file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(agent_bin()?);
        cmd.args(["run", "--node", &pin_name, "--bpffs", BPFFS, "--state"])
            .arg(state)
            .arg("--cgroup")
            .arg(node.cgroup_dir())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        let child = node.spawn_outside_cgroup(cmd)?;
        let agent = Self { child: Some(child), pin_name, log };
        let ready = eventually(READY_TIMEOUT, || {
            agent.log().contains("datapath ready") || agent.exited()
        });
        if !ready || agent.exited() {
            bail!("agent for node {} did not become ready; log:\n{}", node.name(), agent.log());
        }
        Ok(agent)
    }

    /// The node name the agent pins under (`<bpffs>/mesh/<name>/`).
    pub fn pin_name(&self) -> &str {
        &self.pin_name
    }

    /// The agent's pin directory.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("mesh").join(&self.pin_name)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&self) -> bool {
        self.child.as_ref().is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }

    /// Runs `mesh-agent <args>` (a CLI command such as `services`) and returns its output.
    pub fn cli(&self, args: &[&str]) -> Result<Output> {
        let out = Command::new(agent_bin()?)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .context("run mesh-agent")?;
        Ok(out)
    }

    /// `mesh-agent services --node <this node>`: the table the kernel holds.
    pub fn services(&self) -> Result<String> {
        let out = self.cli(&["services", "--node", &self.pin_name, "--bpffs", BPFFS])?;
        if !out.status.success() {
            bail!("mesh-agent services failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Number of "state applied" lines in the log: grows by one per successful apply.
    pub fn applied_count(&self) -> usize {
        self.log().matches("state applied").count()
    }

    /// Stops the agent with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()?.context("agent did not exit after SIGTERM")
    }

    fn terminate(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.take() else { return Ok(None) };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        child.signal(libc::SIGTERM)?;
        child.wait_timeout(STOP_TIMEOUT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of agent {} ---\n{}", self.pin_name, self.log());
        }
        let _ = self.terminate();
        // Anything left (the agent was killed or crashed) must not outlive the test.
        let _ = std::fs::remove_dir_all(self.pin_dir());
        // Shared by all nodes' agents: removed only once empty.
        let _ = std::fs::remove_dir(Path::new(BPFFS).join("mesh"));
        let _ = std::fs::remove_file(&self.log);
    }
}
