//! Running `mesh-agent` on a test node: in the node's netns, outside its cgroup (so the
//! agent's own sockets are not caught by its hooks), attached to the node's cgroup, with
//! its pins under a node name unique to the test run.
//!
//! The pinned datapath can outlive its agent (SIGKILL, or `--keep-datapath`): it is then
//! a [`PinnedDatapath`] of its own, which a later agent adopts or whose drop removes it.

use std::{
    ffi::OsString,
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::net::UnixStream,
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};
use serde::Deserialize;

use crate::{ChildGuard, Node, agent_bin, eventually, sys};

/// bpffs mount the agents use (the agent mounts it when missing).
pub const BPFFS: &str = "/sys/fs/bpf";
/// Where the agents' admin sockets live (`<dir>/<node>/agent.sock`, the agent's default
/// `--run-dir`).
pub const RUN_DIR: &str = "/run/mesh";

/// Where every test agent serves /metrics: the loopback of its own node netns, so the
/// agents of one cluster (and of parallel tests) never collide.
pub const METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 9464);

/// How long an agent gets to load, program and attach its datapath. Generous: a debug
/// build takes ~10 s to parse and program 10,000 Services on a busy two-core machine.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long an agent gets to detach and unpin after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// Bound on each step of a /metrics scrape (connect, write, read).
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(5);

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

/// The node name an agent on `node` runs with (`--node`): unique per test run, so pins
/// of parallel tests never meet. Pods scheduled on that node carry it as
/// `spec.nodeName` (e.g. for `trafficDistribution: PreferClose`).
pub fn node_name(node: &Node) -> String {
    // bpffs refuses '.' in names.
    node.netns_name().replace('.', "-")
}

/// A node's datapath pinned under `<bpffs>/mesh/<node>/` (maps, programs, links: the
/// links keep the programs attached). Removed on drop, so nothing outlives the test even
/// when an agent was killed or told to keep its datapath.
#[derive(Debug)]
pub struct PinnedDatapath {
    node_name: String,
}

impl PinnedDatapath {
    /// The node name the datapath is pinned under.
    pub fn node_name(&self) -> &str {
        &self.node_name
    }

    /// `<bpffs>/mesh/<node>/`.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("mesh").join(&self.node_name)
    }

    /// Starts a new agent on `node` under the same node name, which adopts this
    /// datapath (see [`Agent::start_with`] for `args`).
    pub fn adopt(self, node: &Node, state: &Path, args: &[&str]) -> Result<Agent> {
        Agent::spawn(node, &state_source(state), self, args)
    }

    /// Removes the datapath with `mesh-agent uninstall --node <name>` (what an operator
    /// runs) and fails if that command does.
    pub fn uninstall(self) -> Result<()> {
        let out = Command::new(agent_bin()?)
            .args(["uninstall", "--node", &self.node_name, "--bpffs", BPFFS])
            .stdin(Stdio::null())
            .output()
            .context("run mesh-agent uninstall")?;
        ensure!(
            out.status.success(),
            "mesh-agent uninstall --node {} failed ({}): {}",
            self.node_name,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }
}

impl Drop for PinnedDatapath {
    fn drop(&mut self) {
        // Unpinning the links detaches the programs; a no-op after `uninstall`.
        let _ = std::fs::remove_dir_all(self.pin_dir());
        // Shared by all nodes' agents: removed only once empty.
        let _ = std::fs::remove_dir(Path::new(BPFFS).join("mesh"));
    }
}

/// A running agent; stopped with SIGTERM (then SIGKILL) and its pins removed on drop.
pub struct Agent {
    child: Option<ChildGuard>,
    // Taken out by `kill`/`stop_leaving_datapath`, which hand the datapath to the caller.
    datapath: Option<PinnedDatapath>,
    node_name: String,
    netns: PathBuf,
    log: PathBuf,
}

impl Agent {
    /// Starts `mesh-agent run` for `node` with `state` and waits until its datapath is
    /// attached (`ready` in its admin API's `GET /v1/status`).
    pub fn start(node: &Node, state: &Path) -> Result<Self> {
        Self::start_with(node, state, &[])
    }

    /// [`Agent::start`] with extra `mesh-agent run` flags, e.g.
    /// `&["--health-checks", "--health-interval-ms", "100"]` or `&["--keep-datapath"]`.
    pub fn start_with(node: &Node, state: &Path, args: &[&str]) -> Result<Self> {
        Self::start_with_source(node, &state_source(state), args)
    }

    /// Starts `mesh-agent run` for `node` with the source flags `source` (e.g.
    /// `["--etcd", "http://192.168.250.1:2379"]`) instead of `--state`, plus `args`.
    pub fn start_with_source(node: &Node, source: &[OsString], args: &[&str]) -> Result<Self> {
        let datapath = PinnedDatapath {
            node_name: node_name(node),
        };
        Self::spawn(node, source, datapath, args)
    }

    fn spawn(
        node: &Node,
        source: &[OsString],
        datapath: PinnedDatapath,
        args: &[&str],
    ) -> Result<Self> {
        // One log per agent process: a restarted agent must not truncate (nor its drop
        // delete) the log of the one before it.
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let node_name = datapath.node_name.clone();
        let log = std::env::temp_dir().join(format!(
            "mesh-agent-{node_name}-{}.log",
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log_file = File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let mut cmd = Command::new(agent_bin()?);
        cmd.args(["run", "--node", &node_name, "--bpffs", BPFFS])
            .args(source)
            .arg("--cgroup")
            .arg(node.cgroup_dir())
            .args(["--metrics-addr", &METRICS_ADDR.to_string()])
            .args(args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        // The guard exists before the child does: a failed start still removes the pins.
        let mut agent = Self {
            child: None,
            datapath: Some(datapath),
            node_name,
            netns: node.netns_path(),
            log,
        };
        agent.child = Some(node.spawn_outside_cgroup(cmd)?);
        let ready = eventually(READY_TIMEOUT, || {
            agent.admin_status().is_ok_and(|s| s.ready) || agent.exited()
        });
        if !ready || agent.exited() {
            bail!(
                "agent for node {} did not become ready; log:\n{}",
                node.name(),
                agent.log()
            );
        }
        Ok(agent)
    }

    /// The agent's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// The node name the agent pins under (`<bpffs>/mesh/<name>/`).
    pub fn pin_name(&self) -> &str {
        &self.node_name
    }

    /// The agent's pin directory.
    pub fn pin_dir(&self) -> PathBuf {
        Path::new(BPFFS).join("mesh").join(&self.node_name)
    }

    /// Everything the agent logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn exited(&self) -> bool {
        self.child
            .as_ref()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
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
        let out = self.cli(&["services", "--node", &self.node_name, "--bpffs", BPFFS])?;
        if !out.status.success() {
            bail!(
                "mesh-agent services failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `mesh-agent status --node <this node>`: the datapath at a glance.
    pub fn status(&self) -> Result<String> {
        let out = self.cli(&["status", "--node", &self.node_name, "--bpffs", BPFFS])?;
        if !out.status.success() {
            bail!(
                "mesh-agent status failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `mesh-agent observe --json --node <this agent> <args>` (the CLI talks to the
    /// agent's admin socket, reachable from any netns): the flows, one JSON object each.
    pub fn flows(&self, args: &[&str]) -> Result<Vec<serde_json::Value>> {
        let out = self.cli(&[&["observe", "--json", "--node", &self.node_name], args].concat())?;
        ensure!(
            out.status.success(),
            "mesh-agent observe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).with_context(|| format!("flow line {l:?}")))
            .collect()
    }

    /// Starts `mesh-agent observe --follow --json --node <this agent> <args>` with its
    /// stdout piped (read it with [`ChildGuard::wait_for_stdout_line`]); placed in
    /// `node`'s netns, outside its cgroup, as the agent is.
    pub fn follow_flows(&self, node: &Node, args: &[&str]) -> Result<ChildGuard> {
        let mut cmd = Command::new(agent_bin()?);
        cmd.args(["observe", "--follow", "--json", "--node", &self.node_name])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped());
        node.spawn_outside_cgroup(cmd)
    }

    /// `mesh-agent policy --node <this agent> <args>`: its output.
    pub fn policy(&self, args: &[&str]) -> Result<String> {
        let out = self.cli(
            &[
                &["policy", "--node", &self.node_name, "--bpffs", BPFFS],
                args,
            ]
            .concat(),
        )?;
        ensure!(
            out.status.success(),
            "mesh-agent policy failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Number of states the agent applied: grows by one per successful apply (0 while
    /// its admin API does not answer).
    pub fn applied_count(&self) -> usize {
        self.admin_status()
            .map_or(0, |s| usize::try_from(s.applied).unwrap_or(usize::MAX))
    }

    /// `GET /v1/status` of the agent's admin API (its Unix socket, reachable from any
    /// netns): readiness and the reconcile record.
    pub fn admin_status(&self) -> Result<AgentStatus> {
        let socket = Path::new(RUN_DIR).join(&self.node_name).join("agent.sock");
        let body = admin_get(&socket, "/v1/status")?;
        serde_json::from_str(&body).with_context(|| format!("status JSON {body:?}"))
    }

    /// The agent's Prometheus exposition (`GET /metrics` on [`METRICS_ADDR`]), fetched
    /// from a thread inside the node's netns, where that loopback address lives.
    pub fn metrics(&self) -> Result<String> {
        sys::in_netns(&self.netns, || http_get(METRICS_ADDR, "/metrics"))
            .context("enter the node netns")?
            .with_context(|| format!("scrape the metrics of agent {}", self.node_name))
    }

    /// Stops the agent with SIGTERM and returns its exit status.
    pub fn stop(mut self) -> Result<ExitStatus> {
        self.terminate()?
            .context("agent did not exit after SIGTERM")
    }

    /// Stops the agent with SIGTERM, like [`Agent::stop`], but hands its pinned datapath
    /// to the caller instead of removing it: for agents run with `--keep-datapath`.
    pub fn stop_leaving_datapath(mut self) -> Result<(ExitStatus, PinnedDatapath)> {
        let status = self
            .terminate()?
            .context("agent did not exit after SIGTERM")?;
        Ok((
            status,
            self.datapath
                .take()
                .context("datapath already handed out")?,
        ))
    }

    /// Kills the agent with SIGKILL (no chance to clean up: its pins stay and its
    /// programs stay attached) and hands the pinned datapath to the caller.
    pub fn kill(mut self) -> PinnedDatapath {
        if let Some(child) = self.child.take() {
            child.kill();
        }
        self.datapath
            .take()
            .expect("an agent owns its datapath until kill/stop")
    }

    /// Freezes the agent (SIGSTOP) until the returned guard is dropped (SIGCONT): its
    /// datapath keeps serving, while it reads nothing and answers nothing.
    pub fn pause(&self) -> Result<Paused<'_>> {
        let child = self.child.as_ref().context("the agent is not running")?;
        child.signal(libc::SIGSTOP)?;
        Ok(Paused { child })
    }

    fn terminate(&mut self) -> Result<Option<ExitStatus>> {
        let Some(child) = self.child.take() else {
            return Ok(None);
        };
        if let Ok(Some(status)) = child.try_wait() {
            return Ok(Some(status));
        }
        // A paused agent must run to see its SIGTERM.
        child.signal(libc::SIGCONT)?;
        child.signal(libc::SIGTERM)?;
        child.wait_timeout(STOP_TIMEOUT)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of agent {} ---\n{}", self.node_name, self.log());
        }
        let _ = self.terminate();
        // Dropping the datapath guard removes whatever the agent left (it was killed,
        // crashed, or kept its datapath).
        self.datapath = None;
        let _ = std::fs::remove_file(&self.log);
        // A killed agent leaves its admin socket behind; a successor for the same node
        // may already listen there, so only a socket nobody answers on is removed.
        let dir = Path::new(RUN_DIR).join(&self.node_name);
        if UnixStream::connect(dir.join("agent.sock")).is_err() {
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

/// A frozen agent ([`Agent::pause`]); dropping it lets the agent run on.
pub struct Paused<'a> {
    child: &'a ChildGuard,
}

impl Drop for Paused<'_> {
    fn drop(&mut self) {
        let _ = self.child.signal(libc::SIGCONT);
    }
}

/// `--state <path>`.
fn state_source(state: &Path) -> Vec<OsString> {
    vec!["--state".into(), state.into()]
}

/// What `GET /v1/status` of the admin API answers (the agent's `AgentStatus`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct AgentStatus {
    /// The datapath is attached, with the first state programmed (or rejected).
    pub ready: bool,
    /// States applied since the agent started.
    pub applied: u64,
    /// Rejected states plus failed applies since the agent started.
    pub reconcile_errors: u64,
    /// Whether the most recent reconcile applied its state.
    pub last_reconcile_ok: bool,
    /// The cluster state source.
    #[serde(default)]
    pub source: SourceStatus,
    /// How long the last plan took, microseconds.
    #[serde(default)]
    pub last_plan_us: u64,
    /// How long writing the last plan to the maps took, microseconds.
    #[serde(default)]
    pub last_apply_us: u64,
    /// Services the last plan planned.
    #[serde(default)]
    pub last_plan_services: u64,
    /// Map entries the last plan wrote or removed.
    #[serde(default)]
    pub last_map_writes: u64,
}

/// The `source` of [`AgentStatus`]: which source, stale or not, revisions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
pub struct SourceStatus {
    /// `files`, `etcd` or `kubernetes`.
    pub kind: String,
    /// Cut off from its store.
    pub stale: bool,
    /// Since when (Unix seconds), while stale.
    pub stale_since: Option<u64>,
    /// Newest revision delivered.
    pub revision: u64,
    /// Newest revision applied.
    pub applied_revision: u64,
    /// Objects rejected and left out.
    pub rejected_objects: u64,
}

/// A plain HTTP/1.1 GET with `Connection: close`; returns the body of a 200 response.
pub(crate) fn http_get(addr: SocketAddr, path: &str) -> Result<String> {
    let stream = TcpStream::connect_timeout(&addr, SCRAPE_TIMEOUT)
        .with_context(|| format!("connect {addr}"))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    http_exchange(stream, &addr.to_string(), path)
}

/// [`http_get`] over the admin API's Unix socket `socket`.
fn admin_get(socket: &Path, path: &str) -> Result<String> {
    let stream =
        UnixStream::connect(socket).with_context(|| format!("connect {}", socket.display()))?;
    stream.set_read_timeout(Some(SCRAPE_TIMEOUT))?;
    stream.set_write_timeout(Some(SCRAPE_TIMEOUT))?;
    http_exchange(stream, "agent", path)
}

/// Sends `GET <path>` on `stream` and returns the body of a 200 response.
fn http_exchange(mut stream: impl Read + Write, host: &str, path: &str) -> Result<String> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .with_context(|| format!("read the response from {host}"))?;
    let (head, body) = response
        .split_once("\r\n\r\n")
        .context("response without a header end")?;
    let status = head.lines().next().unwrap_or_default();
    ensure!(
        status.split_whitespace().nth(1) == Some("200"),
        "GET {path}: {status}\n{body}"
    );
    // The body is read to EOF, so only a chunked encoding needs decoding.
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return dechunk(body).with_context(|| format!("GET {path}: chunked body"));
    }
    Ok(body.to_owned())
}

/// Decodes a chunked body read to its end (chunk extensions and trailers ignored).
fn dechunk(mut rest: &str) -> Result<String> {
    let mut body = String::new();
    loop {
        let (size_line, after) = rest.split_once("\r\n").context("chunk size line")?;
        let size_hex = size_line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_hex, 16)
            .with_context(|| format!("chunk size {size_hex:?}"))?;
        if size == 0 {
            return Ok(body);
        }
        let chunk = after.get(..size).context("chunk shorter than its size")?;
        body.push_str(chunk);
        rest = after
            .get(size..)
            .and_then(|r| r.strip_prefix("\r\n"))
            .context("chunk without its CRLF")?;
    }
}

#[cfg(test)]
mod tests {
    use super::dechunk;

    #[test]
    fn dechunks_bodies() {
        assert_eq!(
            dechunk("3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").unwrap(),
            "abcde"
        );
        assert!(dechunk("5\r\nab").is_err());
        assert!(dechunk("zz\r\n").is_err());
    }
}
