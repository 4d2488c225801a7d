//! The test workload `mesh-testpod`: its JSON output (shared by the binary and its
//! readers, so the schema cannot drift) and helpers to run it in a pod.

use std::collections::BTreeMap;
use std::io;
use std::net::SocketAddr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::{ChildGuard, Pod, testpod_bin};

/// Line `serve` prints on stdout once its sockets are bound.
pub const READY_LINE: &str = "ready";
/// Default per-step timeout of `connect` (connect, read, write each).
pub const DEFAULT_TIMEOUT_MS: u64 = 2000;
/// How long [`start_server`] waits for the server to bind.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Output of `mesh-testpod connect --json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnectSummary {
    /// Connections tried (less than `--count` only if `--max-secs` ran out).
    pub attempts: u64,
    /// Connections that completed the whole exchange.
    pub ok: u64,
    /// Failed connections by error key (see [`error_key`]).
    pub errors: BTreeMap<String, u64>,
    /// Successful connections by the backend name the server announced.
    pub by_backend: BTreeMap<String, u64>,
    /// Error key of the first failure that happened in connect() itself (TCP, or the
    /// connect of a UDP socket), e.g. "EPERM" for a policy deny; `None` if none did.
    pub connect_errno_first: Option<String>,
    /// Human-readable description of the first failure, for test messages.
    pub first_error: Option<String>,
}

impl ConnectSummary {
    /// Counts one successful exchange with `backend`.
    pub fn record_ok(&mut self, backend: &str) {
        self.attempts += 1;
        self.ok += 1;
        *self.by_backend.entry(backend.to_owned()).or_default() += 1;
    }

    /// Counts one failure; `step` says where it happened ("connect", "read", ...).
    pub fn record_error(&mut self, step: &str, err: &io::Error) {
        self.attempts += 1;
        let key = error_key(err);
        if step == "connect" && self.connect_errno_first.is_none() {
            self.connect_errno_first = Some(key.clone());
        }
        if self.first_error.is_none() {
            self.first_error = Some(format!("attempt {}: {step}: {err}", self.attempts));
        }
        *self.errors.entry(key).or_default() += 1;
    }
}

/// Output of `mesh-testpod bench`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BenchSummary {
    /// Measured (successful, non-warmup) iterations.
    pub count: u64,
    /// Median latency of one iteration (connect + write + read echo + close).
    pub p50_ns: u64,
    /// 99th percentile latency.
    pub p99_ns: u64,
    /// Mean latency.
    pub mean_ns: u64,
    /// Wall time of the measured phase, failures included.
    pub elapsed_ns: u64,
    /// `count` per second of `elapsed_ns`.
    pub conn_per_sec: f64,
    /// Failed iterations by error key.
    pub errors: BTreeMap<String, u64>,
}

impl BenchSummary {
    /// Summarises per-iteration latencies (nearest-rank percentiles).
    pub fn from_latencies(
        mut latencies_ns: Vec<u64>,
        elapsed: Duration,
        errors: BTreeMap<String, u64>,
    ) -> Self {
        latencies_ns.sort_unstable();
        let count = latencies_ns.len() as u64;
        let percentile = |p: u64| match count {
            0 => 0,
            n => latencies_ns[(n * p).div_ceil(100).clamp(1, n) as usize - 1],
        };
        let elapsed_ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        Self {
            count,
            p50_ns: percentile(50),
            p99_ns: percentile(99),
            mean_ns: latencies_ns
                .iter()
                .sum::<u64>()
                .checked_div(count)
                .unwrap_or(0),
            elapsed_ns,
            conn_per_sec: if elapsed_ns == 0 {
                0.0
            } else {
                count as f64 * 1e9 / elapsed_ns as f64
            },
            errors,
        }
    }
}

/// Name of an errno value as used in summaries ("ECONNREFUSED", or "errno N").
pub fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EPIPE => "EPIPE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EINVAL => "EINVAL",
        other => return format!("errno {other}"),
    };
    name.to_owned()
}

/// The summary key of an I/O error: the errno name, "ETIMEDOUT" for our own timeouts
/// (socket timeouts surface as EAGAIN), "EOF" for a peer that closed too early,
/// "BAD_ECHO" for a wrong reply.
pub fn error_key(err: &io::Error) -> String {
    match (err.kind(), err.raw_os_error()) {
        (io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut, _) => "ETIMEDOUT".to_owned(),
        (_, Some(errno)) => errno_name(errno),
        (io::ErrorKind::UnexpectedEof, None) => "EOF".to_owned(),
        (io::ErrorKind::InvalidData, None) => "BAD_ECHO".to_owned(),
        (kind, None) => format!("{kind:?}"),
    }
}

/// Starts `mesh-testpod serve` (TCP and UDP on `port`, announcing `name`) in `pod` and
/// waits until it is bound.
pub fn start_server(pod: &Pod, port: u16, name: &str) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "serve",
        "--port",
        &port.to_string(),
        "--name",
        name,
        "--udp",
    ])
    .stdout(Stdio::piped());
    let mut server = pod.spawn(cmd)?;
    server
        .wait_for_stdout_line(START_TIMEOUT, |line| line == READY_LINE)
        .with_context(|| format!("start server {name} in pod {} on port {port}", pod.name()))?;
    Ok(server)
}

/// Runs `mesh-testpod connect --count <count>` (TCP) from `pod` to `addr`.
pub fn connect(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_connect(pod, addr, count, false)
}

/// Like [`connect`], over UDP: each attempt is one connected UDP socket, one datagram
/// out and the reply `NAME\n<payload>` back.
pub fn connect_udp(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_connect(pod, addr, count, true)
}

fn run_connect(pod: &Pod, addr: SocketAddr, count: u32, udp: bool) -> Result<ConnectSummary> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "connect",
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
        "--json",
    ]);
    if udp {
        cmd.arg("--udp");
    }
    parse_json(&pod.run(cmd)?).with_context(|| format!("connect from pod {} to {addr}", pod.name()))
}

/// Runs `mesh-testpod bench` from `pod` to `addr`: `warmup` unmeasured iterations, then
/// `count` measured ones.
pub fn bench(pod: &Pod, addr: SocketAddr, count: u32, warmup: u32) -> Result<BenchSummary> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "bench",
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
    ]);
    cmd.args(["--warmup", &warmup.to_string()]);
    // The bench bounds itself at 60 s by default; leave it room to report.
    parse_json(&pod.run_timeout(cmd, Duration::from_secs(90))?)
        .with_context(|| format!("bench from pod {} to {addr}", pod.name()))
}

/// Parses the JSON a successful `mesh-testpod` run printed on stdout.
pub fn parse_json<T: DeserializeOwned>(output: &Output) -> Result<T> {
    if !output.status.success() {
        bail!(
            "mesh-testpod failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    serde_json::from_slice(&output.stdout).with_context(|| {
        format!(
            "parse mesh-testpod output {:?}",
            String::from_utf8_lossy(&output.stdout)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let s = BenchSummary::from_latencies(
            (1..=100).rev().collect(),
            Duration::from_secs(1),
            BTreeMap::new(),
        );
        assert_eq!((s.count, s.p50_ns, s.p99_ns, s.mean_ns), (100, 50, 99, 50));
        assert!((s.conn_per_sec - 100.0).abs() < 1e-9);
        let one = BenchSummary::from_latencies(vec![7], Duration::from_nanos(7), BTreeMap::new());
        assert_eq!((one.p50_ns, one.p99_ns), (7, 7));
        let none = BenchSummary::from_latencies(vec![], Duration::ZERO, BTreeMap::new());
        assert_eq!(
            (none.count, none.p50_ns, none.mean_ns, none.conn_per_sec),
            (0, 0, 0, 0.0)
        );
    }

    #[test]
    fn error_keys() {
        assert_eq!(
            error_key(&io::Error::from_raw_os_error(libc::ECONNREFUSED)),
            "ECONNREFUSED"
        );
        assert_eq!(
            error_key(&io::Error::from_raw_os_error(libc::EAGAIN)),
            "ETIMEDOUT"
        );
        assert_eq!(
            error_key(&io::Error::from_raw_os_error(libc::ENOENT)),
            format!("errno {}", libc::ENOENT)
        );
        assert_eq!(
            error_key(&io::Error::new(io::ErrorKind::TimedOut, "x")),
            "ETIMEDOUT"
        );
        assert_eq!(error_key(&io::ErrorKind::UnexpectedEof.into()), "EOF");
    }

    #[test]
    fn summary_json_round_trips_and_records_first_errors() {
        let mut s = ConnectSummary::default();
        s.record_ok("web-1");
        s.record_error("read", &io::Error::from_raw_os_error(libc::ECONNRESET));
        s.record_error("connect", &io::Error::from_raw_os_error(libc::EPERM));
        assert_eq!((s.attempts, s.ok), (3, 1));
        assert_eq!(s.connect_errno_first.as_deref(), Some("EPERM"));
        assert!(s.first_error.as_deref().unwrap().contains("read"));
        let json = serde_json::to_string(&s).unwrap();
        assert!(json.contains(r#""by_backend":{"web-1":1}"#), "{json}");
        assert_eq!(serde_json::from_str::<ConnectSummary>(&json).unwrap(), s);
    }
}
