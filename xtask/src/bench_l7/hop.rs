//! HAProxy and nginx as the L7 hop `bench l7` compares the node proxy with: each runs
//! as a process of the client pod (its netns, the node's cgroup), listening on the
//! pod's loopback, one thread or worker, keep-alive to the one backend. Their
//! configuration and logs live in a directory the bench owns and removes.

use std::{
    fmt::Write as _,
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{ChildGuard, Pod, eventually};

/// How long a hop gets to listen after it starts, and to exit after SIGTERM.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// Which third-party proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// HAProxy, `mode http`, `nbthread 1`.
    Haproxy,
    /// nginx, `worker_processes 1`.
    Nginx,
}

impl Kind {
    /// Lowercase name (the variant's name in the report).
    pub fn name(self) -> &'static str {
        match self {
            Self::Haproxy => "haproxy",
            Self::Nginx => "nginx",
        }
    }
}

/// A running hop: its HTTP/1.1 and h2c listeners on the client pod's loopback.
pub struct Hop {
    /// Front for HTTP/1.1 clients.
    pub h1: SocketAddr,
    /// Front for h2c (prior knowledge) clients.
    pub h2: SocketAddr,
    kind: Kind,
    child: Option<ChildGuard>,
    log: PathBuf,
}

impl Hop {
    /// Writes `kind`'s configuration into `dir` and starts it in `pod`, forwarding to
    /// `backend` (HTTP/1.1 and h2c on the same port); waits until both fronts accept.
    /// `ports` are the h1 and h2c front ports.
    pub fn start(
        kind: Kind,
        pod: &Pod,
        backend: SocketAddr,
        ports: (u16, u16),
        dir: &Path,
    ) -> Result<Self> {
        let h1 = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.0));
        let h2 = SocketAddr::from((Ipv4Addr::LOCALHOST, ports.1));
        let dir = dir.join(kind.name());
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let conf = dir.join(format!("{}.conf", kind.name()));
        let log = dir.join("error.log");
        let mut cmd = match kind {
            Kind::Haproxy => {
                std::fs::write(&conf, haproxy_conf(h1, h2, backend))?;
                let mut cmd = Command::new("haproxy");
                // -db: foreground, no daemon; -W would add a master process.
                cmd.arg("-db").arg("-f").arg(&conf);
                cmd
            }
            Kind::Nginx => {
                std::fs::write(&conf, nginx_conf(h1, h2, backend, &dir))?;
                let mut cmd = Command::new("nginx");
                // -e: the log of the start itself, before the configuration is read.
                cmd.arg("-p").arg(&dir).arg("-e").arg(&log);
                cmd.arg("-c").arg(&conf);
                cmd
            }
        };
        let stderr = std::fs::File::create(dir.join("stderr.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr);
        let child = pod
            .spawn(cmd)
            .with_context(|| format!("start {} in pod {}", kind.name(), pod.name()))?;
        let mut hop = Self {
            h1,
            h2,
            kind,
            child: Some(child),
            log: dir.join("stderr.log"),
        };
        let accepts = |addr| {
            pod.in_netns(|| TcpStream::connect_timeout(&addr, Duration::from_millis(200)))
                .is_ok_and(|r| r.is_ok())
        };
        let ready = eventually(START_TIMEOUT, || {
            hop.exited() || (accepts(h1) && accepts(h2))
        });
        if !ready || hop.exited() {
            let logs = hop.logs(&log);
            hop.stop();
            bail!(
                "{} in pod {} did not listen on {h1} and {h2}:\n{logs}",
                kind.name(),
                pod.name()
            );
        }
        Ok(hop)
    }

    /// Its pid (the root of its process tree: nginx forks its worker from it).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(ChildGuard::pid)
    }

    /// Which proxy this is.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    fn exited(&self) -> bool {
        self.child
            .as_ref()
            .is_none_or(|c| !matches!(c.try_wait(), Ok(None)))
    }

    fn logs(&self, error_log: &Path) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!("{}{}", read(&self.log), read(error_log))
    }

    /// SIGTERM (nginx's master then stops its worker), SIGKILL if it lingers.
    fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            let _ = child.signal(libc::SIGTERM);
            if !matches!(child.wait_timeout(STOP_TIMEOUT), Ok(Some(_))) {
                child.kill();
            }
        }
    }
}

impl Drop for Hop {
    fn drop(&mut self) {
        self.stop();
    }
}

/// HAProxy: one thread; an HTTP/1.1 front and backend with keep-alive and connection
/// reuse, and an h2c front (`proto h2`) with an h2c backend (`proto h2`).
fn haproxy_conf(h1: SocketAddr, h2: SocketAddr, backend: SocketAddr) -> String {
    format!(
        "global
    nbthread 1
    maxconn 4096

defaults
    mode http
    option http-keep-alive
    http-reuse always
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend h1
    bind {h1}
    default_backend web_h1

frontend h2c
    bind {h2} proto h2
    default_backend web_h2c

backend web_h1
    server web {backend}

backend web_h2c
    server web {backend} proto h2
"
    )
}

/// nginx: one worker; HTTP/1.1 to an upstream with a keep-alive pool. Its h2c front
/// (`listen … http2`, prior knowledge) also speaks HTTP/1.1 upstream: nginx's proxy
/// module has no HTTP/2 to backends.
fn nginx_conf(h1: SocketAddr, h2: SocketAddr, backend: SocketAddr, dir: &Path) -> String {
    let dir = dir.display();
    let mut temp = String::new();
    for what in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        let _ = writeln!(temp, "    {what}_temp_path {dir}/{what};");
    }
    let location = "location / {
            proxy_pass http://web;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
        }";
    format!(
        "daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;

events {{
    worker_connections 4096;
}}

http {{
    access_log off;
    # The default (1000) closes a client connection, HTTP/1.1 or h2, after that many
    # requests, and h2load does not reconnect.
    keepalive_requests 1000000;
{temp}
    upstream web {{
        server {backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {h1};
        {location}
    }}

    server {{
        listen {h2} http2;
        {location}
    }}
}}
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_name_fronts_and_backend() {
        let (h1, h2) = (
            "127.0.0.1:15101".parse().unwrap(),
            "127.0.0.1:15102".parse().unwrap(),
        );
        let backend = "10.244.2.11:8080".parse().unwrap();
        let h = haproxy_conf(h1, h2, backend);
        assert!(h.contains("bind 127.0.0.1:15102 proto h2"));
        assert!(h.contains("server web 10.244.2.11:8080 proto h2"));
        let n = nginx_conf(h1, h2, backend, Path::new("/tmp/x"));
        assert!(n.contains("listen 127.0.0.1:15102 http2;"));
        assert!(n.contains("server 10.244.2.11:8080;"));
        assert!(n.contains("proxy_temp_path /tmp/x/proxy;"));
    }

    /// Both configurations pass the programs' own syntax check (skipped where they
    /// are not installed: `cargo xtask setup` installs them).
    #[test]
    fn configs_pass_the_syntax_checks() {
        let dir = std::env::temp_dir().join(format!("mesh-bench-l7-conf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (h1, h2) = (
            "127.0.0.1:15101".parse().unwrap(),
            "127.0.0.1:15102".parse().unwrap(),
        );
        let backend = "10.244.2.11:8080".parse().unwrap();
        let haproxy = dir.join("haproxy.conf");
        std::fs::write(&haproxy, haproxy_conf(h1, h2, backend)).unwrap();
        let nginx = dir.join("nginx.conf");
        std::fs::write(&nginx, nginx_conf(h1, h2, backend, &dir)).unwrap();
        let check = |program: &str, args: &[&std::ffi::OsStr]| match Command::new(program)
            .args(args)
            .output()
        {
            Ok(out) => {
                let said = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
                // Warnings too: an obsolete directive is silently ignored.
                assert!(
                    out.status.success() && !said.to_lowercase().contains("[warn"),
                    "{program}: {said}"
                );
            }
            Err(e) => eprintln!("skipping {program}: {e}"),
        };
        check(
            "haproxy",
            &["-c".as_ref(), "-f".as_ref(), haproxy.as_os_str()],
        );
        // nginx -t opens its logs and pid file: only as root.
        let root = std::fs::read_to_string("/proc/self/status")
            .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t0\t")));
        if root {
            let log = dir.join("error.log");
            check(
                "nginx",
                &[
                    "-t".as_ref(),
                    "-p".as_ref(),
                    dir.as_os_str(),
                    "-e".as_ref(),
                    log.as_os_str(),
                    "-c".as_ref(),
                    nginx.as_os_str(),
                ],
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
