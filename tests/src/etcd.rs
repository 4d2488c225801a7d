//! etcd clusters for the etcd state source: one member per chosen node, running in that
//! node's network namespace (outside its cgroup, like the agent) and listening on the
//! node's fabric address only, so agents on every node reach every member and nothing
//! listens outside the test's namespaces. Members are killed by pid and their data
//! removed on drop; a member can be killed and started again on its data.

use std::{
    ffi::OsString,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result, bail, ensure};

use crate::{ChildGuard, Cluster, agent_bin, eventually};

/// Client port of every member (on its node's fabric address).
pub const CLIENT_PORT: u16 = 2379;
/// Peer port of every member.
const PEER_PORT: u16 = 2380;
/// How long a cluster gets to elect a leader and answer.
const HEALTHY_TIMEOUT: Duration = Duration::from_secs(30);

/// TLS for the members' client URLs, with client certificate authentication: the
/// members' certificate and key, the CA that signed them and the clients' certificates,
/// and a client certificate for the test bed's own requests.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    /// CA certificate (PEM).
    pub ca: PathBuf,
    /// The members' certificate (PEM), valid for every node's fabric address.
    pub server_cert: PathBuf,
    /// Its key.
    pub server_key: PathBuf,
    /// A client certificate (PEM) signed by the CA.
    pub client_cert: PathBuf,
    /// Its key.
    pub client_key: PathBuf,
}

struct Member {
    name: String,
    node: String,
    ip: Ipv4Addr,
    child: Option<ChildGuard>,
}

/// A running etcd cluster; its processes are killed and its data removed on drop.
pub struct EtcdCluster {
    dir: PathBuf,
    token: String,
    members: Vec<Member>,
    tls: Option<EtcdTls>,
}

impl EtcdCluster {
    /// Starts one member on each of `nodes` of `cluster` and waits until the cluster
    /// answers.
    pub fn start(cluster: &Cluster, nodes: &[&str], tls: Option<EtcdTls>) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let token = format!(
            "mesh-etcd-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let dir = std::env::temp_dir().join(&token);
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut etcd = Self {
            dir,
            token,
            members: nodes
                .iter()
                .enumerate()
                .map(|(i, node)| Member {
                    name: format!("m{}", i + 1),
                    node: (*node).to_owned(),
                    ip: cluster.node(node).ip(),
                    child: None,
                })
                .collect(),
            tls,
        };
        for i in 0..etcd.members.len() {
            etcd.spawn(cluster, i)?;
        }
        etcd.wait_healthy(cluster)?;
        Ok(etcd)
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// The client URLs of all members, comma-separated (for `--etcd`).
    pub fn endpoints(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `mesh-agent` flags that reach this cluster: `--etcd` and, with TLS, the CA and
    /// the client certificate.
    pub fn agent_flags(&self) -> Vec<OsString> {
        let mut flags: Vec<OsString> = vec!["--etcd".into(), self.endpoints().into()];
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--etcd-ca", &tls.ca),
                ("--etcd-cert", &tls.client_cert),
                ("--etcd-key", &tls.client_key),
            ] {
                flags.push(flag.into());
                flags.push(path.into());
            }
        }
        flags
    }

    fn spawn(&mut self, cluster: &Cluster, index: usize) -> Result<()> {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:{PEER_PORT}", m.name, m.ip))
            .collect();
        let scheme = self.scheme();
        let member = &self.members[index];
        let client_url = format!("{scheme}://{}:{CLIENT_PORT}", member.ip);
        let peer_url = format!("http://{}:{PEER_PORT}", member.ip);
        let data = self.dir.join(&member.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join(format!("{}.log", member.name)))
            .context("open the member's log")?;
        let mut cmd = Command::new("etcd");
        cmd.arg("--name")
            .arg(&member.name)
            .arg("--data-dir")
            .arg(&data)
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &initial.join(",")])
            .args(["--initial-cluster-token", &self.token])
            .args(["--initial-cluster-state", "new"])
            // Metrics and pprof stay off; nothing else listens.
            .args(["--logger", "zap", "--log-outputs", "stderr"])
            // Room for the benchmarks' one-transaction applies of 20,000 objects.
            .args(["--max-txn-ops", "100000", "--max-request-bytes", "67108864"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cluster.node(&member.node).spawn_outside_cgroup(cmd)?;
        self.members[index].child = Some(child);
        Ok(())
    }

    /// Kills member `index` (SIGKILL); its data stays for [`EtcdCluster::restart`].
    pub fn kill(&mut self, index: usize) {
        if let Some(child) = self.members[index].child.take() {
            child.kill();
        }
    }

    /// Kills every member.
    pub fn kill_all(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }

    /// Starts every member that is not running again, on its data, and waits until the
    /// cluster answers.
    pub fn restart(&mut self, cluster: &Cluster) -> Result<()> {
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                self.spawn(cluster, i)?;
            }
        }
        self.wait_healthy(cluster)
    }

    /// Runs `mesh-agent <args>` against this cluster from `node`'s netns (`--etcd` and
    /// TLS flags appended) and fails if it does; returns its stdout.
    pub fn mesh_agent(&self, cluster: &Cluster, node: &str, args: &[&str]) -> Result<String> {
        let out = self.mesh_agent_output(cluster, node, args)?;
        ensure!(
            out.status.success(),
            "mesh-agent {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// [`EtcdCluster::mesh_agent`] without the success check.
    pub fn mesh_agent_output(
        &self,
        cluster: &Cluster,
        node: &str,
        args: &[&str],
    ) -> Result<Output> {
        let mut cmd = Command::new(agent_bin()?);
        cmd.args(args).args(self.agent_flags()).stdin(Stdio::null());
        cluster.node(node).run_outside_cgroup(cmd)
    }

    /// Runs `etcdctl <args>` (the "other client") from `node`'s netns against the
    /// running members, and fails if it does; returns its stdout.
    pub fn etcdctl(&self, cluster: &Cluster, node: &str, args: &[&str]) -> Result<String> {
        let endpoints: Vec<String> = self
            .members
            .iter()
            .filter(|m| m.child.is_some())
            .map(|m| format!("{}://{}:{CLIENT_PORT}", self.scheme(), m.ip))
            .collect();
        let mut cmd = Command::new("etcdctl");
        cmd.env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", endpoints.join(",")))
            .args(args)
            .stdin(Stdio::null());
        if let Some(tls) = &self.tls {
            cmd.arg("--cacert")
                .arg(&tls.ca)
                .arg("--cert")
                .arg(&tls.client_cert)
                .arg("--key")
                .arg(&tls.client_key);
        }
        let out = cluster.node(node).run_outside_cgroup(cmd)?;
        ensure!(
            out.status.success(),
            "etcdctl {} failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until every running member is healthy (a quorum read through each).
    fn wait_healthy(&self, cluster: &Cluster) -> Result<()> {
        let node = &self.members[0].node;
        let exited = || {
            self.members.iter().any(|m| {
                m.child
                    .as_ref()
                    .is_some_and(|c| matches!(c.try_wait(), Ok(Some(_))))
            })
        };
        let healthy = eventually(HEALTHY_TIMEOUT, || {
            exited() || self.etcdctl(cluster, node, &["endpoint", "health"]).is_ok()
        }) && !exited();
        if !healthy {
            bail!(
                "etcd did not become healthy within {HEALTHY_TIMEOUT:?}; logs:\n{}",
                self.logs()
            );
        }
        Ok(())
    }

    /// The members' logs.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let path = self.dir.join(format!("{}.log", m.name));
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                format!(
                    "--- {} (last lines) ---\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The data directory (for measuring what etcd stores).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        self.kill_all();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
