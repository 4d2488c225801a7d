//! The load generators of `bench l7`, run as processes of the client pod: `wrk`
//! (HTTP/1.1, keep-alive) and `h2load` (h2c with prior knowledge), and the parsing of
//! what they report into a [`testpod::BenchSummary`].

use std::{collections::BTreeMap, path::Path, process::Command, time::Duration};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{Pod, testpod::BenchSummary};

/// Slack between a generator's own duration and the kill that backs it up.
const RUN_SLACK: Duration = Duration::from_secs(20);

/// What one load run asks for.
#[derive(Debug, Clone, Copy)]
pub struct Load {
    /// Seconds of load.
    pub secs: u32,
    /// Concurrent connections.
    pub connections: u32,
    /// Concurrent streams per connection (h2load only; wrk has one request in flight
    /// per connection).
    pub streams: u32,
}

/// `wrk -t1 -c<connections> -d<secs>s --latency <url>` from `pod`: requests/s and the
/// latency distribution wrk prints (its p50 and p99).
pub fn wrk(pod: &Pod, url: &str, load: &Load) -> Result<BenchSummary> {
    let mut cmd = Command::new("wrk");
    cmd.args([
        "-t1",
        &format!("-c{}", load.connections),
        &format!("-d{}s", load.secs),
        "--timeout",
        "5s",
        "--latency",
        url,
    ]);
    let out = pod
        .run_timeout(cmd, Duration::from_secs(load.secs.into()) + RUN_SLACK)
        .with_context(|| format!("wrk {url} from pod {}", pod.name()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk {url} failed ({}): {}{}",
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    parse_wrk(&stdout).with_context(|| format!("wrk {url} output:\n{stdout}"))
}

/// `h2load -c<connections> -m<streams> -D <secs> --log-file <dir>/… <url>` from `pod`
/// (h2c by prior knowledge for http:// URLs). h2load prints only min/max/mean/sd of
/// the request time, so p50 and p99 come from its per-request log.
pub fn h2load(pod: &Pod, url: &str, load: &Load, scratch: &Path) -> Result<BenchSummary> {
    let log = scratch.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("h2load");
    cmd.args([
        &format!("-c{}", load.connections),
        &format!("-m{}", load.streams),
        "-D",
        &load.secs.to_string(),
        "-T",
        "5",
    ])
    .arg(format!("--log-file={}", log.display()))
    .arg(url);
    let out = pod
        .run_timeout(cmd, Duration::from_secs(load.secs.into()) + RUN_SLACK)
        .with_context(|| format!("h2load {url} from pod {}", pod.name()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "h2load {url} failed ({}): {}{}",
        out.status,
        stdout.trim(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let log = std::fs::read_to_string(&log)
        .with_context(|| format!("read h2load's request log {}", log.display()))?;
    parse_h2load(&stdout, &log).with_context(|| format!("h2load {url} output:\n{stdout}"))
}

/// wrk's summary: `N requests in 3.00s`, `Requests/sec: R`, the `50%` and `99%` lines
/// of `Latency Distribution`, `Socket errors: …` and `Non-2xx or 3xx responses: N`.
fn parse_wrk(out: &str) -> Result<BenchSummary> {
    let mut percentile = BTreeMap::new();
    let (mut count, mut elapsed, mut rps) = (None, None, None);
    let mut errors = BTreeMap::new();
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("Requests/sec:") {
            rps = Some(rest.trim().parse::<f64>().context("Requests/sec")?);
        } else if let Some((n, rest)) = line.split_once(" requests in ") {
            count = Some(n.trim().parse::<u64>().context("requests")?);
            let secs = rest.split(',').next().unwrap_or_default();
            elapsed = Some(parse_duration(secs).context("requests in")?);
        } else if let Some(rest) = line.strip_prefix("Socket errors:") {
            for item in rest.split(',') {
                let (what, n) = item.trim().split_once(' ').context("Socket errors")?;
                let n: u64 = n.trim().parse().context("Socket errors")?;
                if n > 0 {
                    errors.insert(format!("socket {what}"), n);
                }
            }
        } else if let Some(rest) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors.insert("non-2xx".to_owned(), rest.trim().parse()?);
        } else if let Some((p @ ("50%" | "99%"), value)) = line.split_once(char::is_whitespace) {
            percentile.insert(p, parse_duration(value.trim())?);
        }
    }
    let (Some(count), Some(elapsed), Some(rps)) = (count, elapsed, rps) else {
        bail!("no `requests in` or `Requests/sec` line");
    };
    let (Some(p50), Some(p99)) = (percentile.get("50%"), percentile.get("99%")) else {
        bail!("no latency distribution (50% and 99%)");
    };
    let ns = |d: &Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    Ok(BenchSummary {
        count,
        p50_ns: ns(p50),
        p99_ns: ns(p99),
        mean_ns: 0,
        elapsed_ns: ns(&elapsed),
        conn_per_sec: rps,
        errors,
    })
}

/// h2load's `finished in 3.00s, R req/s, …` and `requests: … N succeeded, F failed,
/// E errored, T timeout` lines, and its per-request log (tab-separated: start µs,
/// status, µs to the end of the response; status -1 for a failed stream).
fn parse_h2load(out: &str, log: &str) -> Result<BenchSummary> {
    let mut elapsed = None;
    let mut errors = BTreeMap::new();
    for line in out.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("finished in ") {
            let secs = rest.split(',').next().unwrap_or_default();
            elapsed = Some(parse_duration(secs).context("finished in")?);
        } else if let Some(rest) = line.strip_prefix("requests:") {
            for item in rest.split(',') {
                let mut words = item.split_whitespace();
                let (Some(n), Some(what)) = (words.next(), words.next()) else {
                    continue;
                };
                if matches!(what, "failed" | "errored" | "timeout") {
                    let n: u64 = n.parse().with_context(|| format!("requests: {what}"))?;
                    if n > 0 {
                        errors.insert(what.to_owned(), n);
                    }
                }
            }
        }
    }
    let elapsed = elapsed.context("no `finished in` line")?;
    let mut latencies = Vec::new();
    for row in log.lines().filter(|l| !l.trim().is_empty()) {
        let cols: Vec<&str> = row.split('\t').collect();
        let [_, status, micros, ..] = cols[..] else {
            bail!("h2load log row {row:?}: fewer than 3 columns");
        };
        let status: i32 = status.trim().parse().context("h2load log status")?;
        if (200..300).contains(&status) {
            let micros: u64 = micros.trim().parse().context("h2load log duration")?;
            latencies.push(micros * 1000);
        } else {
            *errors.entry(format!("status {status}")).or_default() += 1;
        }
    }
    ensure!(!latencies.is_empty(), "no successful request in the log");
    Ok(BenchSummary::from_latencies(latencies, elapsed, errors))
}

/// `1.23ms`, `456.00us`, `3.00s`, `2.5m` (as wrk and h2load print durations).
fn parse_duration(text: &str) -> Result<Duration> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .with_context(|| format!("duration {text:?} has no unit"))?;
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .with_context(|| format!("duration {text:?}"))?;
    let secs = match unit {
        "us" | "µs" => number / 1e6,
        "ms" => number / 1e3,
        "s" | "sec" => number,
        "m" | "min" => number * 60.0,
        _ => bail!("duration {text:?}: unknown unit {unit:?}"),
    };
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://10.244.2.11:8080/
  1 threads and 16 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   812.25us  301.11us   9.71ms   91.02%
    Req/Sec    19.72k     1.10k   21.01k    80.00%
  Latency Distribution
     50%  764.00us
     75%  850.00us
     90%    1.00ms
     99%    2.10ms
  58865 requests in 3.00s, 13.08MB read
  Socket errors: connect 0, read 2, write 0, timeout 0
  Non-2xx or 3xx responses: 3
Requests/sec:  19621.55
Transfer/sec:      4.36MB
";

    #[test]
    fn wrk_summary_is_parsed() {
        let s = parse_wrk(WRK).unwrap();
        assert_eq!(s.count, 58865);
        assert_eq!(s.p50_ns, 764_000);
        assert_eq!(s.p99_ns, 2_100_000);
        assert_eq!(s.elapsed_ns, 3_000_000_000);
        assert!((s.conn_per_sec - 19621.55).abs() < 1e-6);
        assert_eq!(s.errors["socket read"], 2);
        assert_eq!(s.errors["non-2xx"], 3);
        assert_eq!(s.errors.len(), 2);
    }

    #[test]
    fn wrk_without_distribution_is_an_error() {
        let cut: String = WRK
            .lines()
            .filter(|l| !l.contains('%') || l.contains("Stdev"))
            .collect::<Vec<_>>()
            .join("\n");
        assert!(parse_wrk(&cut).is_err());
    }

    const H2LOAD: &str = "starting benchmark...
spawning thread #0: 16 total client(s). Timing-based test with 0s of warm-up time and 3s of main duration for measurements.
Warm-up phase is over for thread #0.
Main benchmark duration is over for thread #0. Stopping all clients.
Stopped all clients for thread #0

finished in 3.00s, 15000.33 req/s, 3.10MB/s
requests: 45001 total, 45017 started, 45001 done, 44999 succeeded, 2 failed, 0 errored, 0 timeout
status codes: 44999 2xx, 0 3xx, 0 4xx, 0 5xx
";

    #[test]
    fn h2load_summary_and_log_are_parsed() {
        let log = "1700000000000000\t200\t900\n1700000000000001\t200\t100\n\
                   1700000000000002\t-1\t50\n1700000000000003\t200\t500\n";
        let s = parse_h2load(H2LOAD, log).unwrap();
        assert_eq!(s.count, 3);
        assert_eq!(s.p50_ns, 500_000);
        assert_eq!(s.p99_ns, 900_000);
        assert_eq!(s.elapsed_ns, 3_000_000_000);
        assert_eq!(s.errors["failed"], 2);
        assert_eq!(s.errors["status -1"], 1);
        assert!(parse_h2load(H2LOAD, "").is_err());
        assert!(parse_h2load(H2LOAD, "1\t200\n").is_err());
    }

    #[test]
    fn durations_in_every_unit() {
        assert_eq!(
            parse_duration("1.5ms").unwrap(),
            Duration::from_micros(1500)
        );
        assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
        assert_eq!(parse_duration("3.00s").unwrap(), Duration::from_secs(3));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_duration("12").is_err());
        assert!(parse_duration("1h").is_err());
    }
}
