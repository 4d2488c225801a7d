//! Running the node proxy (`mesh-proxy`) on a test node: in the node's netns AND in
//! the node's cgroup (unlike the agent), so its sockets are hooked as the pods' are; it
//! opens its listeners and outbound sockets inside each pod's netns itself. It talks to
//! the agent of the same node through `<run-dir>/<node>/agent.sock`.

use std::ffi::OsString;
use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use anyhow::{Context as _, Result, bail};

use crate::agent::{RUN_DIR, http_get, node_name};
use crate::l7::Metrics;
use crate::{ChildGuard, Node, eventually, proxy_bin, sys};

/// Where every test proxy serves /metrics: the loopback of its node netns (so proxies
/// of one cluster never collide; the agent's is [`crate::agent::METRICS_ADDR`]).
pub const METRICS_ADDR: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 15020);
/// `--drain-timeout` the test proxies run with.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a proxy gets to serve /metrics after it starts.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a proxy gets to exit after SIGTERM: its drain, plus slack.
const STOP_TIMEOUT: Duration = Duration::from_secs(DRAIN_TIMEOUT.as_secs() + 5);

/// A running node proxy, by pid; stopped with SIGTERM (then SIGKILL) on drop.
pub struct Proxy {
    child: Option<ChildGuard>,
    program: PathBuf,
    args: Vec<OsString>,
    node: String,
    /// The node's name as the agent and proxy know it (its run directory's name).
    node_name: String,
    netns: PathBuf,
    log: PathBuf,
    /// Logs of the processes before a restart, removed on drop.
    old_logs: Vec<PathBuf>,
}

impl Proxy {
    /// Starts `mesh-proxy --node <node name> --run-dir /run/mesh --metrics-addr
    /// 127.0.0.1:15020 --drain-timeout 10s <args…>` on `node` and waits until it
    /// serves /metrics.
    pub fn start(node: &Node, args: &[&str]) -> Result<Self> {
        let mut all: Vec<OsString> = [
            "--node",
            &node_name(node),
            "--run-dir",
            RUN_DIR,
            "--metrics-addr",
            &METRICS_ADDR.to_string(),
            "--drain-timeout",
            &format!("{}s", DRAIN_TIMEOUT.as_secs()),
        ]
        .iter()
        .map(OsString::from)
        .collect();
        all.extend(args.iter().map(OsString::from));
        Self::start_program(node, &proxy_bin()?, &all)
    }

    /// Starts `program args` where a proxy runs (the node's netns and cgroup) and waits
    /// until something answers `GET /metrics` on [`METRICS_ADDR`] there: the real
    /// proxy through [`Proxy::start`], or a stand-in for tests of the placement.
    pub fn start_program(node: &Node, program: &Path, args: &[OsString]) -> Result<Self> {
        let mut proxy = Self {
            child: None,
            program: program.to_owned(),
            args: args.to_vec(),
            node: node.name().to_owned(),
            node_name: node_name(node),
            netns: node.netns_path(),
            log: PathBuf::new(),
            old_logs: Vec::new(),
        };
        proxy.spawn(node)?;
        Ok(proxy)
    }

    fn spawn(&mut self, node: &Node) -> Result<()> {
        self.launch(node)?;
        let ready = eventually(READY_TIMEOUT, || self.exited() || self.metrics().is_ok());
        if !ready || self.exited() {
            bail!(
                "proxy on node {} did not serve /metrics on {METRICS_ADDR}; log:\n{}",
                self.node,
                self.log()
            );
        }
        Ok(())
    }

    /// Starts the process (with a fresh log), without waiting for it.
    fn launch(&mut self, node: &Node) -> Result<()> {
        // One log per process: a restarted proxy must not truncate its predecessor's.
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        if !self.log.as_os_str().is_empty() {
            self.old_logs.push(self.log.clone());
        }
        self.log = std::env::temp_dir().join(format!(
            "mesh-proxy-{}-{}-{}.log",
            node_name(node),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let log =
            File::create(&self.log).with_context(|| format!("create {}", self.log.display()))?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.child = Some(node.spawn_in_cgroup(cmd)?);
        Ok(())
    }

    /// The proxy's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child
            .as_ref()
            .filter(|c| matches!(c.try_wait(), Ok(None)))
            .map(ChildGuard::pid)
    }

    /// Whether the process has exited (or was stopped).
    pub fn exited(&self) -> bool {
        self.child
            .as_ref()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    /// Everything the current process logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET /metrics` on [`METRICS_ADDR`], from a thread inside the node's netns (the
    /// thread stays outside the node cgroup, so the scrape is not hooked).
    pub fn metrics(&self) -> Result<String> {
        sys::in_netns(&self.netns, || http_get(METRICS_ADDR, "/metrics"))
            .context("enter the node netns")?
            .with_context(|| format!("scrape the metrics of the proxy on {}", self.node))
    }

    /// The proxy's workload certificates as it lists them for `mesh-agent certs`
    /// (`<run-dir>/<node>/certs.json`: identities, serials, validity; no keys).
    pub fn certs(&self) -> Result<String> {
        let path = Path::new(RUN_DIR).join(&self.node_name).join("certs.json");
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))
    }

    /// [`Proxy::metrics`], parsed.
    pub fn metrics_parsed(&self) -> Result<Metrics> {
        Metrics::parse(&self.metrics()?)
    }

    /// Sends SIGTERM and waits for the exit (the drain timeout plus slack); SIGKILL
    /// if it does not come, and an error then.
    pub fn stop(&mut self) -> Result<ExitStatus> {
        let Some(child) = self.child.take() else {
            bail!("proxy on {} is not running", self.node);
        };
        child.signal(libc::SIGTERM)?;
        match child.wait_timeout(STOP_TIMEOUT)? {
            Some(status) => Ok(status),
            None => bail!(
                "proxy on {} did not exit {STOP_TIMEOUT:?} after SIGTERM (killed); log:\n{}",
                self.node,
                self.log()
            ),
        }
    }

    /// Kills the proxy with SIGKILL (no drain) and reaps it.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            child.kill();
        }
    }

    /// Stops the proxy gracefully ([`Proxy::stop`], if it runs) and starts it again on
    /// `node` with the same arguments.
    pub fn restart(&mut self, node: &Node) -> Result<()> {
        if self.child.is_some() {
            self.stop()?;
        }
        self.spawn(node)
    }

    /// Restarts without a gap, as an upgrade does: starts a successor with the same
    /// arguments while this process still runs, waits until the successor itself
    /// listens on [`METRICS_ADDR`] (so both must bind it with `SO_REUSEPORT`), then
    /// stops the predecessor with SIGTERM and waits for its drain. Returns the
    /// predecessor's exit status; the proxy is the successor afterwards.
    pub fn hot_restart(&mut self, node: &Node) -> Result<ExitStatus> {
        let old = self
            .child
            .take()
            .with_context(|| format!("proxy on {} is not running", self.node))?;
        if let Err(e) = self.launch(node) {
            self.child = Some(old);
            return Err(e);
        }
        let pid = self.child.as_ref().map(ChildGuard::pid);
        let ready = eventually(READY_TIMEOUT, || {
            self.exited() || pid.is_some_and(|pid| listens_on(pid, METRICS_ADDR))
        });
        if !ready || self.exited() {
            // The predecessor keeps serving; the failed successor is dropped.
            let log = self.log();
            self.child = Some(old);
            bail!(
                "successor proxy on node {} did not listen on {METRICS_ADDR}; log:\n{log}",
                self.node
            );
        }
        old.signal(libc::SIGTERM)?;
        old.wait_timeout(STOP_TIMEOUT)?.with_context(|| {
            format!(
                "predecessor proxy on {} did not exit {STOP_TIMEOUT:?} after SIGTERM",
                self.node
            )
        })
    }
}

/// Whether process `pid` holds a TCP socket listening on `addr` (IPv4), read from
/// `/proc/<pid>/net/tcp` (its netns's table) and `/proc/<pid>/fd` (its sockets).
fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let SocketAddr::V4(addr) = addr else {
        return false;
    };
    // /proc/net/tcp prints the address as the u32 in host order, in hex.
    let local = format!(
        "{:08X}:{:04X}",
        u32::from_ne_bytes(addr.ip().octets()),
        addr.port()
    );
    let Ok(table) = std::fs::read_to_string(format!("/proc/{pid}/net/tcp")) else {
        return false;
    };
    // Fields: sl local_address rem_address st … inode (the 10th).
    let listening: Vec<&str> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.get(1) == Some(&local.as_str()) && fields.get(3) == Some(&"0A"))
                .then(|| fields.get(9).copied())
                .flatten()
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
        .filter_map(|target| {
            let target = target.to_string_lossy().into_owned();
            Some(
                target
                    .strip_prefix("socket:[")?
                    .strip_suffix(']')?
                    .to_owned(),
            )
        })
        .any(|inode| listening.contains(&inode.as_str()))
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- log of the proxy on {} ---\n{}", self.node, self.log());
        }
        if let Some(child) = self.child.take() {
            let _ = child.signal(libc::SIGTERM);
            if !matches!(child.wait_timeout(STOP_TIMEOUT), Ok(Some(_))) {
                child.kill();
            }
        }
        for log in self.old_logs.iter().chain([&self.log]) {
            let _ = std::fs::remove_file(log);
        }
    }
}
