//! L7 workload and clients: the JSON `mesh-testpod http-server`/`grpc-client` print
//! (shared by the binary and its readers, so the schema cannot drift), and helpers that
//! run them, `curl` and request loops inside pods, and read Prometheus metrics.
//!
//! Every client runs as a pod process (the pod's netns and the node's cgroup), so its
//! sockets pass through the mesh exactly as an application's would.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::testpod::READY_LINE;
use crate::{ChildGuard, Pod, testpod_bin};

/// Longest `/delay/{ms}` (and whole `/stream/{n}`) the http-server honours.
pub const MAX_DELAY_MS: u64 = 60_000;
/// Most chunks `/stream/{n}` sends.
pub const MAX_STREAM_CHUNKS: u32 = 10_000;
/// Default `--max-time` of [`Curl`].
pub const DEFAULT_MAX_TIME: Duration = Duration::from_secs(10);
/// How long [`start_http_server`] and [`start_grpc_server`] wait for the bind.
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Slack between a client's own time bound and the kill that backs it up.
const RUN_SLACK: Duration = Duration::from_secs(5);

/// What `http-server` answers (as JSON) to every request but `/echo` and `/stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpEcho {
    /// `--name` of the server.
    pub pod: String,
    /// Request method.
    pub method: String,
    /// Request path.
    pub path: String,
    /// Query string without `?` ("" if none).
    pub query: String,
    /// `HTTP/1.1` or `HTTP/2.0` (as the server saw it).
    pub version: String,
    /// The request's authority (HTTP/2 `:authority`, else `Host`).
    #[serde(default)]
    pub authority: Option<String>,
    /// Request headers: lowercase name to values, in order.
    pub headers: BTreeMap<String, Vec<String>>,
    /// Bytes of request body received.
    pub body_len: u64,
    /// `ip:port` of the connection's peer.
    pub peer: String,
    /// Why the request was refused (a 4xx), if it was.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl HttpEcho {
    /// The first value of request header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)?.first().map(String::as_str)
    }
}

/// What `http-server` answers on `/stats`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpStats {
    /// Requests served so far (failed ones too), `/stats` itself excepted.
    pub requests: u64,
}

/// One line of `grpc-client`: a Check answer, a Watch message, or a failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrpcResult {
    /// Whether the call (or stream message) succeeded.
    pub ok: bool,
    /// On success: `SERVING`, `NOT_SERVING`, `UNKNOWN` or `SERVICE_UNKNOWN`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    /// On failure: the gRPC status code (5 NOT_FOUND, 14 UNAVAILABLE, 4 DEADLINE_EXCEEDED…).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// On failure: the status message.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The answering server's `x-pod` (its `--name`), when it sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pod: Option<String>,
}

/// Starts `mesh-testpod http-server --listen [::]:<port> --name <name> <extra…>` in
/// `pod` (e.g. `extra = &["--fail-every", "2"]`) and waits until it is bound.
pub fn start_http_server(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<ChildGuard> {
    start_l7_server(pod, "http-server", port, name, extra)
}

/// Starts `mesh-testpod grpc-server --listen [::]:<port> --name <name> <extra…>` in
/// `pod` (e.g. `extra = &["--flap-ms", "100"]`) and waits until it is bound.
pub fn start_grpc_server(pod: &Pod, port: u16, name: &str, extra: &[&str]) -> Result<ChildGuard> {
    start_l7_server(pod, "grpc-server", port, name, extra)
}

fn start_l7_server(
    pod: &Pod,
    command: &str,
    port: u16,
    name: &str,
    extra: &[&str],
) -> Result<ChildGuard> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args([command, "--listen", &format!("[::]:{port}"), "--name", name])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped());
    let mut server = pod.spawn(cmd)?;
    server
        .wait_for_stdout_line(START_TIMEOUT, |line| line == READY_LINE)
        .with_context(|| {
            format!(
                "start {command} {name} in pod {} on port {port}",
                pod.name()
            )
        })?;
    Ok(server)
}

/// A `curl` invocation: always silent but for errors (`-sS`), bounded by `--max-time`.
#[derive(Debug, Clone)]
pub struct Curl {
    url: String,
    h2c: bool,
    max_time: Duration,
    args: Vec<String>,
}

impl Curl {
    /// `curl <url>`, HTTP/1.1, [`DEFAULT_MAX_TIME`].
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            h2c: false,
            max_time: DEFAULT_MAX_TIME,
            args: Vec::new(),
        }
    }

    /// HTTP/2 over cleartext with prior knowledge (`--http2-prior-knowledge`).
    pub fn h2c(mut self) -> Self {
        self.h2c = true;
        self
    }

    /// The bound on the whole transfer (`--max-time`, at millisecond precision).
    pub fn max_time(mut self, max_time: Duration) -> Self {
        self.max_time = max_time;
        self
    }

    /// One more curl argument, e.g. `-H`, `x-user: a`, `-X`, `POST`, `--data`, `…`.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// More curl arguments.
    pub fn args<S: AsRef<str>>(mut self, args: &[S]) -> Self {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Runs it as a process of `pod`. A failed transfer is a result (its
    /// [`CurlResult::exit_code`]), not an error.
    pub fn run(&self, pod: &Pod) -> Result<CurlResult> {
        let dir = ScratchDir::new("curl")?;
        let (headers, body) = (dir.path.join("headers"), dir.path.join("body"));
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            &format!("{:.3}", self.max_time.as_secs_f64()),
        ])
        .args(["--write-out", "%{http_code}"])
        .arg("--dump-header")
        .arg(&headers)
        .arg("--output")
        .arg(&body);
        if self.h2c {
            cmd.arg("--http2-prior-knowledge");
        }
        cmd.args(&self.args).arg(&self.url);
        let out = pod
            .run_timeout(cmd, self.max_time + RUN_SLACK)
            .with_context(|| format!("curl {} from pod {}", self.url, pod.name()))?;
        let http_code = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .unwrap_or(0);
        Ok(CurlResult {
            exit_code: out.status.code().unwrap_or(-1),
            http_code,
            headers: parse_header_dump(&std::fs::read_to_string(&headers).unwrap_or_default()),
            body: String::from_utf8_lossy(&std::fs::read(&body).unwrap_or_default()).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        })
    }
}

/// What a [`Curl`] run gave.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CurlResult {
    /// curl's exit code (0 ok, 7 connection refused, 28 timeout, 52 empty reply, 56
    /// receive failure…; -1 when killed by a signal).
    pub exit_code: i32,
    /// The final response's status; 0 when there was none.
    pub http_code: u16,
    /// The final response's headers (lowercase names, in order), then its trailers.
    pub headers: Vec<(String, String)>,
    /// The response body (lossy UTF-8).
    pub body: String,
    /// curl's error message, if any.
    pub stderr: String,
}

impl CurlResult {
    /// The first value of header (or trailer) `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// The body parsed as JSON (an [`HttpEcho`], [`HttpStats`]…).
    pub fn json<T: DeserializeOwned>(&self) -> Result<T> {
        serde_json::from_str(&self.body).with_context(|| {
            format!(
                "parse the body of a {} answer as JSON: {:?}",
                self.http_code, self.body
            )
        })
    }
}

/// Parses `--dump-header` output: a new status line (`HTTP/…`) starts over, so 1xx
/// interim responses are dropped; trailers (after the body) are appended.
fn parse_header_dump(dump: &str) -> Vec<(String, String)> {
    let mut headers = Vec::new();
    for line in dump.lines() {
        if line.starts_with("HTTP/") {
            headers.clear();
        } else if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
        }
    }
    headers
}

/// `curl <args…> <url>` from `pod` (see [`Curl`] for h2c and the time bound).
pub fn curl(pod: &Pod, url: &str, args: &[&str]) -> Result<CurlResult> {
    Curl::new(url).args(args).run(pod)
}

/// Runs `mesh-testpod grpc-client --target <target> <args…>` from `pod` (e.g.
/// `&["--call", "check", "--service", "web"]`) and returns its result lines.
pub fn grpc(pod: &Pod, target: &str, args: &[&str]) -> Result<Vec<GrpcResult>> {
    let mut cmd = Command::new(testpod_bin()?);
    cmd.args(["grpc-client", "--target", target]).args(args);
    // Each call and message is bounded by the client's --timeout-ms; this bounds the
    // process in case of many of them.
    let out = pod
        .run_timeout(cmd, Duration::from_secs(60))
        .with_context(|| format!("grpc-client from pod {} to {target}", pod.name()))?;
    ensure!(
        out.status.success(),
        "grpc-client from pod {} to {target} failed ({}): {}",
        pod.name(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("grpc-client line {l:?}")))
        .collect()
}

/// One request of a [`request_loop`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// The response status; 0 when there was none (see `exit_code`).
    pub http_code: u16,
    /// The answering server's `x-pod`, if any.
    pub pod: Option<String>,
    /// curl's exit code.
    pub exit_code: i32,
    /// How long the request took.
    pub elapsed: Duration,
}

/// Sends up to `count` sequential `GET url` (each a new curl, so a new connection)
/// from `pod`, stopping early once `deadline` has passed since the start.
pub fn request_loop(pod: &Pod, url: &str, count: u32, deadline: Duration) -> Result<Vec<Outcome>> {
    request_loop_with(pod, &Curl::new(url), count, deadline)
}

/// [`request_loop`] of a prepared [`Curl`] (h2c, headers…); each request's
/// `--max-time` is cut to what is left of `deadline`.
pub fn request_loop_with(
    pod: &Pod,
    curl: &Curl,
    count: u32,
    deadline: Duration,
) -> Result<Vec<Outcome>> {
    let start = Instant::now();
    let mut outcomes = Vec::new();
    for _ in 0..count {
        let left = deadline.saturating_sub(start.elapsed());
        if left.is_zero() {
            break;
        }
        let begun = Instant::now();
        let result = curl.clone().max_time(curl.max_time.min(left)).run(pod)?;
        outcomes.push(Outcome {
            http_code: result.http_code,
            pod: result.header("x-pod").map(str::to_owned),
            exit_code: result.exit_code,
            elapsed: begun.elapsed(),
        });
    }
    Ok(outcomes)
}

/// Counts outcomes by answering pod (`"-"` for answers without `x-pod`, and for
/// failures `"<http_code>/<exit_code>"` when not 2xx).
pub fn tally(outcomes: &[Outcome]) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for o in outcomes {
        let key = match (&o.pod, o.http_code) {
            (Some(pod), 200..=299) => pod.clone(),
            (None, 200..=299) => "-".to_owned(),
            (_, code) => format!("{code}/{}", o.exit_code),
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// One sample of a Prometheus text exposition.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// Metric name (with `_total`, `_bucket`… suffixes as exposed).
    pub name: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Value.
    pub value: f64,
}

/// A parsed Prometheus text exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// Every sample, in exposition order.
    pub samples: Vec<Sample>,
}

impl Metrics {
    /// Parses the text format (0.0.4 / OpenMetrics text); comments are skipped.
    pub fn parse(text: &str) -> Result<Self> {
        let samples = text
            .lines()
            .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
            .map(|l| parse_sample(l).with_context(|| format!("metrics line {l:?}")))
            .collect::<Result<_>>()?;
        Ok(Self { samples })
    }

    /// Samples named `name` whose labels include every `(label, value)` of `labels`.
    pub fn find<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).is_some_and(|x| x == v))
        })
    }

    /// The value of the one sample [`Metrics::find`] matches; `None` if none does.
    ///
    /// # Errors
    /// If several match (the labels are not specific enough).
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
        let mut found = self.find(name, labels);
        let first = found.next();
        ensure!(
            found.next().is_none(),
            "several samples of {name} match {labels:?}"
        );
        Ok(first.map(|s| s.value))
    }

    /// The sum of the samples [`Metrics::find`] matches (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).map(|s| s.value).sum()
    }
}

fn parse_sample(line: &str) -> Result<Sample> {
    let (name, rest) = match line.find(['{', ' ']) {
        Some(i) => line.split_at(i),
        None => bail!("no value"),
    };
    let (labels, rest) = if let Some(rest) = rest.strip_prefix('{') {
        parse_labels(rest)?
    } else {
        (BTreeMap::new(), rest)
    };
    let value = rest.split_whitespace().next().context("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().with_context(|| format!("value {v:?}"))?,
    };
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `a="x",b="y\"z"}` (after the `{`); returns the labels and what follows `}`.
fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str)> {
    let mut labels = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("unterminated label value"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.trim().to_owned(), value);
        rest = &after[end + 1..];
    }
}

/// A uniquely named directory under the temp dir, removed on drop (curl's header and
/// body files: pods share the test runner's mount namespace).
struct ScratchDir {
    path: PathBuf,
}

impl ScratchDir {
    fn new(prefix: &str) -> Result<Self> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "mesh-{prefix}-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&path).with_context(|| format!("create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_dump_keeps_the_final_response_and_its_trailers() {
        let dump = "HTTP/1.1 100 Continue\r\n\r\nHTTP/2 200\r\nx-pod: web-1\r\nContent-Type: a\r\n\r\nx-trailer: yes\r\n";
        assert_eq!(
            parse_header_dump(dump),
            [
                ("x-pod".to_owned(), "web-1".to_owned()),
                ("content-type".to_owned(), "a".to_owned()),
                ("x-trailer".to_owned(), "yes".to_owned()),
            ]
        );
    }

    #[test]
    fn metrics_parse_labels_and_values() {
        let text = "# HELP x y\n# TYPE req counter\nreq_total{route=\"a\",code=\"200\"} 3\nreq_total{route=\"b\\\"q\",code=\"503\"} 1.5\nup 1\nlat_bucket{le=\"+Inf\"} 7 1700000000\n";
        let m = Metrics::parse(text).expect("parses");
        assert_eq!(m.get("req_total", &[("route", "a")]).unwrap(), Some(3.0));
        assert_eq!(m.get("req_total", &[("route", "b\"q")]).unwrap(), Some(1.5));
        assert_eq!(m.sum("req_total", &[]), 4.5);
        assert!(m.get("req_total", &[]).is_err());
        assert_eq!(m.get("up", &[]).unwrap(), Some(1.0));
        assert_eq!(m.get("lat_bucket", &[("le", "+Inf")]).unwrap(), Some(7.0));
        assert_eq!(m.get("missing", &[]).unwrap(), None);
        assert!(Metrics::parse("broken{a=\"x\" 1").is_err());
    }

    #[test]
    fn tally_counts_by_pod_and_failure() {
        let o = |http_code, pod: Option<&str>, exit_code| Outcome {
            http_code,
            pod: pod.map(str::to_owned),
            exit_code,
            elapsed: Duration::ZERO,
        };
        let t = tally(&[
            o(200, Some("a"), 0),
            o(200, Some("a"), 0),
            o(503, Some("b"), 0),
            o(0, None, 7),
        ]);
        assert_eq!(t["a"], 2);
        assert_eq!(t["503/0"], 1);
        assert_eq!(t["0/7"], 1);
    }
}
