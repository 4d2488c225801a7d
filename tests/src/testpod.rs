//! The test workload `mesh-testpod`: its JSON output (shared by the binary and its
//! readers, so the schema cannot drift) and helpers to run it in a pod.

use std::collections::BTreeMap;
use std::io;
use std::net::{SocketAddr, SocketAddrV4};
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
    /// Successful exchanges by the peer address the application saw: `getpeername()`
    /// of the connected socket for `connect`, the source address `recvfrom()` returned
    /// for `udp-query`. Through the mesh this is the Service VIP, never a pod IP.
    #[serde(default)]
    pub peers: BTreeMap<String, u64>,
}

impl ConnectSummary {
    /// Counts one successful exchange with `backend`.
    pub fn record_ok(&mut self, backend: &str) {
        self.attempts += 1;
        self.ok += 1;
        *self.by_backend.entry(backend.to_owned()).or_default() += 1;
    }

    /// Counts the peer address of one successful exchange (see [`ConnectSummary::peers`]).
    pub fn record_peer(&mut self, peer: SocketAddr) {
        *self.peers.entry(peer.to_string()).or_default() += 1;
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

/// The line `mesh-testpod hold` prints as soon as its connection is established.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldStarted {
    /// The backend that answered (its name line).
    pub backend: String,
}

/// The last line of `mesh-testpod hold`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// Echo round trips that succeeded on the held connection.
    pub echoes_ok: u64,
    /// 1 if the connection failed (to connect or in an echo), else 0: `hold` gives the
    /// connection up at its first failure, since a late echo would be misread as the
    /// next one.
    pub errors: u64,
    /// Description of the first failure, if any.
    pub first_error: Option<String>,
}

/// One line of `mesh-testpod udp-hold`: the outcome of one round.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpRound {
    /// Round number, from 0.
    pub round: u32,
    /// Whether the datagram was answered with the expected echo.
    pub ok: bool,
    /// The backend that answered (`None` when the round failed).
    pub backend: Option<String>,
    /// Error key of a failed round (see [`error_key`]), e.g. "ECONNABORTED": the error
    /// the kernel recorded on the socket (SO_ERROR) if there is one, as it names the
    /// cause, else the error of the failing call.
    pub error: Option<String>,
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
        libc::EDESTADDRREQ => "EDESTADDRREQ",
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
    start_server_on_cpu(pod, port, name, None)
}

/// [`start_server`], its threads restricted to `cpu` when given.
pub fn start_server_on_cpu(
    pod: &Pod,
    port: u16,
    name: &str,
    cpu: Option<usize>,
) -> Result<ChildGuard> {
    start_server_with(pod, port, name, cpu, Duration::ZERO)
}

/// [`start_server`] answering each read only after `delay` (a service that takes time).
pub fn start_slow_server(pod: &Pod, port: u16, name: &str, delay: Duration) -> Result<ChildGuard> {
    start_server_with(pod, port, name, None, delay)
}

fn start_server_with(
    pod: &Pod,
    port: u16,
    name: &str,
    cpu: Option<usize>,
    delay: Duration,
) -> Result<ChildGuard> {
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
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
    if !delay.is_zero() {
        cmd.args(["--delay-us", &delay.as_micros().to_string()]);
    }
    let mut server = pod.spawn(cmd)?;
    server
        .wait_for_stdout_line(START_TIMEOUT, |line| line == READY_LINE)
        .with_context(|| format!("start server {name} in pod {} on port {port}", pod.name()))?;
    Ok(server)
}

/// Runs `mesh-testpod connect --count <count>` (TCP) from `pod` to `addr`.
pub fn connect(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_client(pod, "connect", addr, count, &[])
}

/// Like [`connect`], over UDP: each attempt is one connected UDP socket, one datagram
/// out and the reply `NAME\n<payload>` back.
pub fn connect_udp(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_client(pod, "connect", addr, count, &["--udp"])
}

/// Like [`connect`], but from an IPv6 (`AF_INET6`) socket that dials the IPv4-mapped
/// form `[::ffff:a.b.c.d]:port` of `addr`, as dual-stack applications do.
pub fn connect_ipv4_mapped(pod: &Pod, addr: SocketAddrV4, count: u32) -> Result<ConnectSummary> {
    run_client(pod, "connect", addr.into(), count, &["--ipv6-socket"])
}

/// Runs `mesh-testpod udp-query` from `pod`: `count` times `sendto(addr)` and
/// `recvfrom()` on ONE unconnected UDP socket. [`ConnectSummary::peers`] holds the
/// source addresses of the replies.
pub fn udp_query(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_client(pod, "udp-query", addr, count, &[])
}

/// Runs `mesh-testpod <command> --addr <addr> --count <count> --json <extra…>` from
/// `pod` and parses its summary.
pub(crate) fn run_client(
    pod: &Pod,
    command: &str,
    addr: SocketAddr,
    count: u32,
    extra: &[&str],
) -> Result<ConnectSummary> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        command,
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
        "--json",
    ])
    .args(extra);
    parse_json(&pod.run(cmd)?)
        .with_context(|| format!("{command} from pod {} to {addr}", pod.name()))
}

/// Starts `mesh-testpod hold` in `pod`: one TCP connection to `addr`, an echo every
/// `interval` for `duration` (whole seconds). Read its [`HoldStarted`] line, then its [`HoldReport`],
/// with [`next_json_line`].
pub fn spawn_hold(
    pod: &Pod,
    addr: SocketAddr,
    duration: Duration,
    interval: Duration,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "hold",
        "--addr",
        &addr.to_string(),
        "--secs",
        &duration.as_secs().to_string(),
        "--interval-ms",
        &interval.as_millis().to_string(),
    ]);
    spawn_piped(pod, cmd)
}

/// Starts `mesh-testpod udp-hold` in `pod`: `rounds` datagram exchanges `interval`
/// apart on a connected UDP socket to `addr`, reconnecting after a failed round. Read
/// its [`UdpRound`] lines with [`next_json_line`].
pub fn spawn_udp_hold(
    pod: &Pod,
    addr: SocketAddr,
    rounds: u32,
    interval: Duration,
) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "udp-hold",
        "--addr",
        &addr.to_string(),
        "--rounds",
        &rounds.to_string(),
        "--interval-ms",
        &interval.as_millis().to_string(),
    ]);
    spawn_piped(pod, cmd)
}

fn spawn_piped(pod: &Pod, mut cmd: Command) -> Result<ChildGuard> {
    // stderr stays inherited: the test output then shows why a client failed.
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    pod.spawn(cmd)
}

/// Waits up to `timeout` for the next stdout line of `child` that parses as `T` and
/// returns it; lines of another shape are skipped. `child` must have piped stdout (as
/// from [`spawn_hold`] and [`spawn_udp_hold`]).
pub fn next_json_line<T: DeserializeOwned>(child: &mut ChildGuard, timeout: Duration) -> Result<T> {
    let line =
        child.wait_for_stdout_line(timeout, |line| serde_json::from_str::<T>(line).is_ok())?;
    serde_json::from_str(&line).with_context(|| format!("parse {line:?}"))
}

/// Runs `mesh-testpod bench` from `pod` to `addr`: `warmup` unmeasured iterations, then
/// `count` measured ones.
pub fn bench(pod: &Pod, addr: SocketAddr, count: u32, warmup: u32) -> Result<BenchSummary> {
    run_bench(pod, addr, count, warmup, None, None)
}

/// Like [`bench`], but `count` request/response exchanges of `payload` bytes each way
/// on one connection: the established path rather than connection setup. The client
/// runs on `cpu` only, when given.
pub fn bench_persistent(
    pod: &Pod,
    addr: SocketAddr,
    count: u32,
    warmup: u32,
    payload: usize,
    cpu: Option<usize>,
) -> Result<BenchSummary> {
    run_bench(pod, addr, count, warmup, Some(payload), cpu)
}

/// `persistent`: the payload of request/response on one connection; `None`: a new
/// connection (with a 64-byte exchange) per iteration.
fn run_bench(
    pod: &Pod,
    addr: SocketAddr,
    count: u32,
    warmup: u32,
    persistent: Option<usize>,
    cpu: Option<usize>,
) -> Result<BenchSummary> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "bench",
        "--addr",
        &addr.to_string(),
        "--count",
        &count.to_string(),
    ]);
    cmd.args(["--warmup", &warmup.to_string()]);
    if let Some(payload) = persistent {
        cmd.args(["--persistent", "--payload", &payload.to_string()]);
    }
    if let Some(cpu) = cpu {
        cmd.args(["--cpu", &cpu.to_string()]);
    }
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

// ---------------------------------------------------------------------------------
// Streams: `sink`, `stream` and `churn` (bulk data through one connection, checked
// end to end by byte count and checksum).
// ---------------------------------------------------------------------------------

/// FNV-1a, 64 bits: the stream checksum of `stream` and `sink` (std-only, stable,
/// order-sensitive, so a reordered, duplicated or lost byte shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fnv64(u64);

impl Default for Fnv64 {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv64 {
    /// Feeds `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        let mut h = self.0;
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }

    /// The checksum of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }
}

/// Length of the repeating block of a [`Pattern`]: odd, so that no power-of-two chunk
/// size lines up with it.
const PATTERN_BLOCK: usize = (1 << 20) + 13;

/// The deterministic byte stream `stream` sends: byte `i` is `block[i % len]`, the block
/// drawn from a xorshift64 generator seeded with `seed`.
pub struct Pattern {
    block: Vec<u8>,
}

impl Pattern {
    /// The pattern of `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed | 1;
        let block = (0..PATTERN_BLOCK)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 32) as u8
            })
            .collect();
        Self { block }
    }

    /// Up to `len` (at least 1 when `len` > 0) contiguous bytes of the stream from
    /// `offset`: shorter where the block wraps.
    pub fn at(&self, offset: u64, len: usize) -> &[u8] {
        let start = (offset % PATTERN_BLOCK as u64) as usize;
        let end = start + len.min(PATTERN_BLOCK - start);
        &self.block[start..end]
    }

    /// The checksum of the first `len` bytes of the stream.
    pub fn checksum(&self, len: u64) -> u64 {
        let mut hash = Fnv64::default();
        let mut offset = 0;
        while offset < len {
            let chunk = self.at(offset, usize::try_from(len - offset).unwrap_or(usize::MAX));
            hash.update(chunk);
            offset += chunk.len() as u64;
        }
        hash.finish()
    }
}

/// How `stream` hands its bytes to the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum StreamMode {
    /// `write()` of large chunks (`--chunk`, default 1 MiB).
    Write,
    /// Many small `write()`s (1..=64 bytes, varying; `--chunk` fixes the size), with
    /// TCP_NODELAY.
    Small,
    /// `writev()` with 8 iovecs of varying sizes per call.
    Writev,
    /// `sendfile()` from a temporary file holding the pattern.
    Sendfile,
}

impl StreamMode {
    /// The name on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Small => "small",
            Self::Writev => "writev",
            Self::Sendfile => "sendfile",
        }
    }
}

/// Output of `mesh-testpod stream`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSummary {
    /// The send mode (`write`, `small`, `writev`, `sendfile`).
    pub mode: String,
    /// Bytes the kernel accepted from the client.
    pub sent: u64,
    /// [`Fnv64`] of those bytes.
    pub sent_checksum: u64,
    /// Send calls that accepted data (write/writev/sendfile syscalls).
    pub writes: u64,
    /// Bytes the sink says it received (its reply line); `None` without a reply.
    pub received_by_server: Option<u64>,
    /// The sink's checksum of what it received; `None` without a reply.
    pub server_checksum: Option<u64>,
    /// `--bidir`: bytes echoed back and read by the client.
    pub echoed: Option<u64>,
    /// `--bidir`: checksum of the echoed bytes.
    pub echo_checksum: Option<u64>,
    /// `--reset`: the client closed with SO_LINGER 0 (an RST) after half the data.
    pub reset: bool,
    /// The first failure, `step: error`.
    pub error: Option<String>,
    /// Its key (see [`error_key`]), e.g. "ECONNRESET", "EPIPE", "EOF".
    pub error_key: Option<String>,
    /// Wall time from before connect to the end (reply read, or reset sent).
    pub elapsed_ns: u64,
    /// CPU time (user + system) the client process used meanwhile.
    pub cpu_ns: u64,
    /// Blocking reads that failed with EAGAIN although their timeout had not run out
    /// (or there was none): not allowed for a blocking socket, counted and retried so
    /// that the data can still be checked.
    #[serde(default)]
    pub spurious_eagain: u64,
}

impl StreamSummary {
    /// Whether the sink received exactly what was sent (count and checksum), and with
    /// `--bidir` the echo came back whole too.
    pub fn intact(&self) -> bool {
        let to_server = self.received_by_server == Some(self.sent)
            && self.server_checksum == Some(self.sent_checksum);
        let echo = self.echoed.is_none()
            || (self.echoed == Some(self.sent) && self.echo_checksum == Some(self.sent_checksum));
        self.error.is_none() && to_server && echo
    }
}

/// One line `mesh-testpod sink` prints per connection once it is done with it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SinkConn {
    /// The client's address.
    pub peer: String,
    /// Bytes read from the client.
    pub bytes: u64,
    /// [`Fnv64`] of them.
    pub checksum: u64,
    /// Bytes echoed back (`--echo`).
    pub echoed: u64,
    /// Whether the reply line `<bytes> <checksum>` was written (after the client's EOF).
    pub replied: bool,
    /// Whether the sink reset the connection itself (`--reset-after`).
    pub reset: bool,
    /// The failure that ended the connection, `step: error`.
    pub error: Option<String>,
    /// Its key (see [`error_key`]).
    pub error_key: Option<String>,
    /// Time from accept to done.
    pub elapsed_ns: u64,
    /// Reads that failed with EAGAIN before their timeout (retried).
    #[serde(default)]
    pub spurious_eagain: u64,
}

/// Options of `mesh-testpod sink` (see [`start_sink`]).
#[derive(Debug, Clone, Default)]
pub struct SinkOptions {
    /// Echo everything back as it is read (no reply line then).
    pub echo: bool,
    /// Slow reader: pause this long after each read.
    pub read_delay: Option<Duration>,
    /// Bytes per read (default 64 KiB).
    pub read_chunk: Option<usize>,
    /// Reset the connection (SO_LINGER 0 + close) after reading this many bytes.
    pub reset_after: Option<u64>,
    /// Count bytes only, no checksum (for throughput benchmarks).
    pub unchecked: bool,
}

/// Starts `mesh-testpod sink` on `port` in `pod` and waits until it is bound. Its
/// [`SinkConn`] lines are read with [`next_json_line`].
pub fn start_sink(pod: &Pod, port: u16, opts: &SinkOptions) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args(["sink", "--port", &port.to_string()]);
    if opts.echo {
        cmd.arg("--echo");
    }
    if let Some(delay) = opts.read_delay {
        cmd.args(["--read-delay-ms", &delay.as_millis().to_string()]);
    }
    if let Some(chunk) = opts.read_chunk {
        cmd.args(["--read-chunk", &chunk.to_string()]);
    }
    if let Some(limit) = opts.reset_after {
        cmd.args(["--reset-after", &limit.to_string()]);
    }
    if opts.unchecked {
        cmd.arg("--unchecked");
    }
    cmd.stdin(Stdio::null()).stdout(Stdio::piped());
    let mut sink = pod.spawn(cmd)?;
    sink.wait_for_stdout_line(START_TIMEOUT, |line| line == READY_LINE)
        .with_context(|| format!("start sink in pod {} on port {port}", pod.name()))?;
    Ok(sink)
}

/// Options of `mesh-testpod stream` (see [`stream`]).
#[derive(Debug, Clone)]
pub struct StreamOptions {
    /// Bytes to send.
    pub bytes: u64,
    /// How to send them.
    pub mode: StreamMode,
    /// Bytes per send call (mode-specific default when `None`).
    pub chunk: Option<usize>,
    /// Reset (SO_LINGER 0 + close) after half the bytes.
    pub reset: bool,
    /// Read the echo of a `sink --echo` concurrently.
    pub bidir: bool,
    /// Pattern seed.
    pub seed: u64,
    /// Timeout of each blocking step (connect, one send, one read); zero: plain
    /// blocking sockets without SO_RCVTIMEO/SO_SNDTIMEO (the run is still killed
    /// after 60 s).
    pub timeout: Duration,
    /// Count bytes only, no checksum (both checksums 0), against an unchecked sink.
    pub unchecked: bool,
}

impl StreamOptions {
    /// `bytes` in `mode`, seed 1, 5 s step timeout, no reset, one direction.
    pub fn new(bytes: u64, mode: StreamMode) -> Self {
        Self {
            bytes,
            mode,
            chunk: None,
            reset: false,
            bidir: false,
            seed: 1,
            timeout: Duration::from_secs(5),
            unchecked: false,
        }
    }
}

/// Runs `mesh-testpod stream` from `pod` to a sink at `addr` and parses its summary.
/// Killed (an error) after 60 s.
pub fn stream(pod: &Pod, addr: SocketAddr, opts: &StreamOptions) -> Result<StreamSummary> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([
        "stream",
        "--addr",
        &addr.to_string(),
        "--bytes",
        &opts.bytes.to_string(),
        "--mode",
        opts.mode.as_str(),
        "--seed",
        &opts.seed.to_string(),
        "--timeout-ms",
        &opts.timeout.as_millis().to_string(),
    ]);
    if let Some(chunk) = opts.chunk {
        cmd.args(["--chunk", &chunk.to_string()]);
    }
    if opts.reset {
        cmd.arg("--reset");
    }
    if opts.bidir {
        cmd.arg("--bidir");
    }
    if opts.unchecked {
        cmd.arg("--unchecked");
    }
    parse_json(&pod.run_timeout(cmd, Duration::from_secs(60))?)
        .with_context(|| format!("stream {opts:?} from pod {} to {addr}", pod.name()))
}

/// Runs `mesh-testpod churn` from `pod`: `count` sequential short connections to a
/// `sink --echo` at `addr` (connect, 16 bytes out, their echo back, close).
pub fn churn(pod: &Pod, addr: SocketAddr, count: u32) -> Result<ConnectSummary> {
    run_client(pod, "churn", addr, count, &[])
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
        s.record_peer("[fd00:96::10]:80".parse().unwrap());
        assert_eq!(s.peers["[fd00:96::10]:80"], 1);
    }

    #[test]
    fn json_line_shapes_are_distinct() {
        // next_json_line tells the lines of `hold` apart by shape alone.
        let started = r#"{"backend":"web-1"}"#;
        let report = r#"{"echoes_ok":3,"errors":0,"first_error":null}"#;
        assert!(serde_json::from_str::<HoldStarted>(started).is_ok());
        assert!(serde_json::from_str::<HoldStarted>(report).is_err());
        assert!(serde_json::from_str::<HoldReport>(started).is_err());
        let round: UdpRound =
            serde_json::from_str(r#"{"round":2,"ok":false,"backend":null,"error":"ECONNABORTED"}"#)
                .unwrap();
        assert_eq!(round.error.as_deref(), Some("ECONNABORTED"));
    }

    #[test]
    fn pattern_and_checksum_are_stable() {
        let p = Pattern::new(1);
        let mut h = Fnv64::default();
        let mut off = 0u64;
        while off < 3_000_000 {
            let c = p.at(off, 777_777.min((3_000_000 - off) as usize));
            h.update(c);
            off += c.len() as u64;
        }
        assert_eq!(off, 3_000_000);
        assert_eq!(h.finish(), p.checksum(3_000_000));
        assert_ne!(p.checksum(3_000_000), Pattern::new(2).checksum(3_000_000));
        assert_eq!(Fnv64::default().finish(), 0xcbf2_9ce4_8422_2325);
    }
}
