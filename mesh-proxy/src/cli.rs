//! Command line of `mesh-proxy`.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::Parser;

/// The node proxy: serves the L7 Service ports (HTTP/1.1, h2c, gRPC) of one node's pods
/// from listeners inside each pod's network namespace, configured by the node's agent.
#[derive(Clone, Debug, Parser)]
#[command(name = "mesh-proxy", version)]
pub struct Args {
    /// The node this proxy serves (its agent's socket is `<run-dir>/<node>/agent.sock`).
    #[arg(long)]
    pub node: String,
    /// Directory of the agents' run files.
    #[arg(long, default_value = "/run/mesh")]
    pub run_dir: PathBuf,
    /// Where to serve Prometheus metrics (`GET /metrics`) and `GET /healthz`.
    #[arg(long, default_value = "127.0.0.1:15020")]
    pub metrics_addr: SocketAddr,
    /// On SIGTERM/SIGINT: how long in-flight requests may finish before the proxy exits.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
    /// Largest request head (request line and headers, HTTP/1.1; header list, HTTP/2)
    /// accepted from a client, in bytes; larger heads get 431.
    #[arg(long, default_value_t = 65536)]
    pub max_header_bytes: u32,
    /// Time a client has to send a complete HTTP/1.1 request head (slowloris guard).
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub header_read_timeout: Duration,
    /// Most concurrent HTTP/2 streams per client connection.
    #[arg(long, default_value_t = 256)]
    pub max_concurrent_streams: u32,
    /// A pooled backend connection idle this long is closed; HTTP/2 client connections
    /// are pinged after this long without traffic and closed when the ping is not answered.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Bound on establishing a backend connection; a connect that does not complete in
    /// time (a NetworkPolicy drop) resets the client's connection.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// Threads serving traffic. 1 runs everything on one thread (tokio's current-thread
    /// runtime: no wake-ups across threads, the cheapest per request); more spread the
    /// connections over that many threads. Default: one per CPU, at most
    /// [`DEFAULT_MAX_WORKERS`].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=1024))]
    pub worker_threads: Option<u16>,
    /// The node's intermediate CA (Istio's `cacerts` layout: `ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem`, `cert-chain.pem`; made by `mesh-agent ca node`).
    /// Given: the proxy joins the mesh (SVIDs for the node's enrolled pods, HBONE
    /// tunnels on port 15008). Absent: L7 only, no mesh.
    #[arg(long)]
    pub ca_dir: Option<PathBuf>,
    /// Lifetime of the workload certificates (SVIDs) the proxy issues; each is
    /// re-issued at half its lifetime.
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    pub svid_ttl: Duration,
    /// Where bpffs is mounted: the agent's pinned policy maps (`<bpffs>/mesh/<node>/`)
    /// judge the streams of mesh tunnels.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Log filter (tracing `EnvFilter` syntax, e.g. `info,mesh_proxy=debug`).
    #[arg(long, env = "MESH_PROXY_LOG", default_value = "info")]
    pub log: String,
}

/// Most worker threads chosen by default: the proxy shares its node with the pods it
/// serves, so it does not take every core of a large node unasked.
pub const DEFAULT_MAX_WORKERS: usize = 4;

impl Args {
    /// The number of worker threads: `--worker-threads`, else one per CPU available to
    /// the process, at most [`DEFAULT_MAX_WORKERS`].
    pub fn workers(&self) -> usize {
        match self.worker_threads {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .min(DEFAULT_MAX_WORKERS),
        }
    }

    /// The agent's admin socket.
    pub fn agent_socket(&self) -> PathBuf {
        self.run_dir.join(&self.node).join("agent.sock")
    }

    /// Where the proxy lists its workload certificates for `mesh-agent certs`:
    /// `<run-dir>/<node>/certs.json` (identities, serials, validity; never keys).
    pub fn certs_file(&self) -> PathBuf {
        self.run_dir
            .join(&self.node)
            .join(mesh_common::l7::CERTS_FILE)
    }
}

/// `250ms`, `10s`, `2m`, or a bare number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a duration such as 250ms, 10s, 2m or 24h"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m or h)")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("24h"), Ok(Duration::from_secs(86_400)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn defaults() {
        let a = Args::try_parse_from(["mesh-proxy", "--node", "n1"]).unwrap();
        assert_eq!(a.agent_socket(), PathBuf::from("/run/mesh/n1/agent.sock"));
        assert_eq!(a.drain_timeout, Duration::from_secs(10));
        assert_eq!(a.max_header_bytes, 65536);
        assert!((1..=DEFAULT_MAX_WORKERS).contains(&a.workers()));
        let one = Args::try_parse_from(["mesh-proxy", "--node", "n1", "--worker-threads", "1"]);
        assert_eq!(one.unwrap().workers(), 1);
        assert!(
            Args::try_parse_from(["mesh-proxy", "--node", "n1", "--worker-threads", "0"]).is_err()
        );
        assert!(Args::try_parse_from(["mesh-proxy"]).is_err());
    }
}
