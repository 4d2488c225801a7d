//! The node proxy's resilience, end to end (root only): a client pod's requests to L7
//! Services go through the kernel redirect to the real `mesh-proxy` in the client's
//! netns, then to `mesh-testpod http-server` backends. Retries (HTTPRoute `retry`) and
//! their budget (`mesh.io/retry-budget-*`), the circuit breaker
//! (`mesh.io/max-connections`, `max-pending-requests`, `max-requests-per-connection`),
//! outlier ejection (`mesh.io/outlier-*`), and bad input from clients and backends, each
//! seen as the client and the backends see it, and in the proxy's metrics.

use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, ensure};
use mesh_tests::l7::{self, Curl, HttpEcho, HttpStats, Metrics};
use mesh_tests::scenario::{Bed, PodDef, pod};
use mesh_tests::{Agent, ChildGuard, Pod, Proxy, eventually, require_root};

const PODS: &[PodDef] = &[
    pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
    pod("n1", "prod", "flaky", "10.244.1.11", "app: flaky", &[]),
    pod("n1", "prod", "dead", "10.244.1.12", "app: dead", &[]),
    pod("n1", "prod", "slow", "10.244.1.13", "app: slow", &[]),
    pod("n1", "prod", "good", "10.244.1.14", "app: pair", &[]),
    pod("n1", "prod", "bad", "10.244.1.15", "app: pair", &[]),
    pod("n1", "prod", "stall", "10.244.1.16", "app: stall", &[]),
];
/// Where every backend's `http-server` listens (the Services' targetPort).
const POD_PORT: u16 = 8080;
/// `http-server` flags of each backend.
const SERVERS: &[(&str, &[&str])] = &[
    ("flaky", &["--fail-every", "2"]),
    ("dead", &["--fail-first", "100000"]),
    ("slow", &[]),
    ("good", &[]),
    ("bad", &["--fail-first", "100000"]),
    ("stall", &["--slow-first", "1", "--slow-ms", "10000"]),
];
/// Service name, cluster IP, selected `app`, annotations (YAML flow mapping body).
const SERVICES: &[(&str, &str, &str, &str)] = &[
    // The budget is not what this one tests: 100 % lets every request retry once.
    (
        "flaky",
        "10.96.0.20",
        "flaky",
        "mesh.io/retry-budget-percent: '100'",
    ),
    (
        "dead",
        "10.96.0.21",
        "dead",
        "mesh.io/retry-budget-percent: '20', mesh.io/retry-budget-min-per-second: '1'",
    ),
    (
        "slow",
        "10.96.0.22",
        "slow",
        "mesh.io/max-connections: '1', mesh.io/max-pending-requests: '1'",
    ),
    (
        "perconn",
        "10.96.0.23",
        "slow",
        "mesh.io/max-requests-per-connection: '1'",
    ),
    (
        "pair",
        "10.96.0.24",
        "pair",
        "mesh.io/outlier-consecutive-5xx: '3', mesh.io/outlier-base-ejection-time: 2s, \
         mesh.io/outlier-max-ejection-percent: '50'",
    ),
    ("web", "10.96.0.25", "slow", ""),
    // One connection: the retry needs the timed-out attempt's connection gone.
    (
        "stall",
        "10.96.0.26",
        "stall",
        "mesh.io/max-connections: '1'",
    ),
    ("mirrored", "10.96.0.27", "slow", ""),
];
/// HTTPRoutes: parent Service and the rule's `retry` and `timeouts`.
const ROUTES: &[(&str, &str, &str)] = &[
    ("flaky", "{attempts: 2, codes: [503], backoff: 1ms}", "{}"),
    ("dead", "{attempts: 3, codes: [503], backoff: 1ms}", "{}"),
    (
        "stall",
        "{attempts: 1, codes: [503], backoff: 1ms}",
        "{backendRequest: 500ms}",
    ),
];
/// Bound on the proxy's first configuration reaching the client's netns.
const READY: Duration = Duration::from_secs(30);

fn services_yaml() -> String {
    let mut yaml = String::new();
    for (name, ip, app, annotations) in SERVICES {
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: prod, annotations: {{{annotations}}}}}
spec:
  clusterIP: {ip}
  selector: {{app: {app}}}
  ports: [{{name: http, port: 80, targetPort: {POD_PORT}, appProtocol: http}}]
"
        ));
    }
    for (service, retry, timeouts) in ROUTES {
        yaml.push_str(&format!(
            "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {service}-retry, namespace: prod}}
spec:
  parentRefs: [{{group: '', kind: Service, name: {service}, port: 80}}]
  rules:
  - backendRefs: [{{name: {service}, port: 80}}]
    retry: {retry}
    timeouts: {timeouts}
"
        ));
    }
    // Every request to `mirrored` is copied to `pair`.
    yaml.push_str(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: mirrored, namespace: prod}
spec:
  parentRefs: [{group: '', kind: Service, name: mirrored, port: 80}]
  rules:
  - backendRefs: [{name: mirrored, port: 80}]
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: pair, port: 80}}
",
    );
    yaml
}

/// The whole chain on one node: backends, the agent, and the proxy (with extra flags).
struct Chain {
    // Field order is drop order: proxy and agent before the servers and the bed.
    proxy: Proxy,
    _agent: Agent,
    _servers: Vec<ChildGuard>,
    bed: Bed,
}

impl Chain {
    fn new(prefix: &str, proxy_args: &[&str]) -> Result<Self> {
        let mut bed = Bed::new(prefix, &["n1"], PODS)?;
        bed.anchor_idle_pods()?;
        let servers = SERVERS
            .iter()
            .map(|(name, flags)| l7::start_http_server(bed.pod(name), POD_PORT, name, flags))
            .collect::<Result<Vec<_>>>()?;
        bed.state.write("pods.yaml", &bed.pods_yaml())?;
        bed.state.write("services.yaml", &services_yaml())?;
        let agent = bed.start_agent("n1", &[])?;
        let proxy = bed.start_proxy("n1", proxy_args)?;
        let chain = Self {
            proxy,
            _agent: agent,
            _servers: servers,
            bed,
        };
        let mut last = None;
        let ready = eventually(READY, || {
            let r = Curl::new(chain.url("web", "/"))
                .max_time(Duration::from_secs(2))
                .run(chain.client());
            let ok = r.as_ref().is_ok_and(|r| r.http_code == 200);
            last = Some(r);
            ok
        });
        ensure!(
            ready,
            "the proxy did not serve web from the client pod: {last:?}\nproxy log:\n{}",
            chain.proxy.log()
        );
        Ok(chain)
    }

    fn client(&self) -> &Pod {
        self.bed.pod("client")
    }

    /// `http://<cluster IP of service><path>`.
    fn url(&self, service: &str, path: &str) -> String {
        let (_, ip, _, _) = SERVICES
            .iter()
            .find(|s| s.0 == service)
            .unwrap_or_else(|| panic!("no service {service}"));
        format!("http://{ip}{path}")
    }

    /// Requests served by backend `pod` so far (its `/stats`, asked directly).
    fn served(&self, pod: &str) -> u64 {
        let url = format!("http://{}:{POD_PORT}/stats", self.bed.pod(pod).ip());
        let stats: HttpStats = l7::curl(self.client(), &url, &[])
            .and_then(|r| r.json())
            .unwrap_or_else(|e| panic!("stats of {pod}: {e:#}"));
        stats.requests
    }

    fn metrics(&self) -> Metrics {
        self.proxy
            .metrics_parsed()
            .unwrap_or_else(|e| panic!("{e:#}\nproxy log:\n{}", self.proxy.log()))
    }

    /// Asserts that the proxy still runs and answers a normal request.
    fn assert_serving(&self, after: &str) {
        assert!(
            self.proxy.pid().is_some(),
            "the proxy died after {after}; log:\n{}",
            self.proxy.log()
        );
        let r = l7::curl(self.client(), &self.url("web", "/after"), &[]).expect("curl");
        assert_eq!(
            (r.exit_code, r.http_code),
            (0, 200),
            "a normal request after {after}: {r:?}"
        );
    }
}

/// `destination_service` of Service `name`.
fn host(name: &str) -> String {
    format!("{name}.prod.svc.cluster.local")
}

/// One answer of [`batch`].
#[derive(Debug, Clone, PartialEq, Eq)]
struct Answer {
    code: u16,
    /// `x-pod` of the answer ("" for the proxy's own answers).
    pod: String,
}

/// `n` sequential `GET url` on one curl (one keep-alive client connection).
fn batch(pod: &Pod, url: &str, n: usize) -> Vec<Answer> {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "60",
        "--write-out",
        "%{http_code} %header{x-pod}\\n",
    ]);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = pod
        .run_timeout(cmd, Duration::from_secs(70))
        .expect("run curl");
    let answers: Vec<Answer> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let (code, pod) = l.split_once(' ').unwrap_or((l, ""));
            Answer {
                code: code.parse().unwrap_or(0),
                pod: pod.trim().to_owned(),
            }
        })
        .collect();
    assert_eq!(
        answers.len(),
        n,
        "one answer per request: {answers:?}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    answers
}

#[test]
fn retries_recover_a_flaky_backend_within_the_retry_budget() {
    if !require_root() {
        return;
    }
    let chain = Chain::new("l7rtry", &[]).expect("chain");
    let client = chain.client();

    // Every second attempt at `flaky` fails; one retry always gets the next, good one.
    const N: usize = 200;
    let answers = batch(client, &chain.url("flaky", "/"), N);
    let ok = answers.iter().filter(|a| a.code == 200).count();
    assert_eq!(
        ok, N,
        "every request succeeds thanks to the retry: {answers:?}"
    );
    let served = chain.served("flaky");
    assert!(
        (N as u64..=2 * N as u64).contains(&served),
        "at most one retry per request reached the backend: {served} attempts for {N}"
    );
    let m = chain.metrics();
    let flaky = host("flaky");
    let retries = m.sum(
        "mesh_proxy_retries_total",
        &[("destination_service", &flaky), ("outcome", "allowed")],
    );
    assert_eq!(
        retries as u64,
        served - N as u64,
        "every extra attempt is a counted retry"
    );

    // `dead` fails everything: 3 retries each would be 4 attempts per request, the
    // budget allows 20 % more plus 1 per second (over the 10 s window).
    const M: usize = 100;
    let start = Instant::now();
    let answers = batch(client, &chain.url("dead", "/"), M);
    let secs = start.elapsed().as_secs() + 1;
    assert!(
        answers.iter().all(|a| a.code == 503),
        "the failure is passed on: {answers:?}"
    );
    let served = chain.served("dead");
    // The floor: 1 retry per second over the window, and over the run's seconds.
    let bound = M as u64 * 120 / 100 + 10 + secs;
    assert!(
        served >= M as u64 && served <= bound,
        "the budget capped the retries: {served} attempts for {M} requests (bound {bound}, \
         without a budget {})",
        M * 4
    );
    let m = chain.metrics();
    let dead = host("dead");
    let allowed = m.sum(
        "mesh_proxy_retries_total",
        &[("destination_service", &dead), ("outcome", "allowed")],
    );
    let exhausted = m.sum(
        "mesh_proxy_retries_total",
        &[
            ("destination_service", &dead),
            ("outcome", "budget_exhausted"),
        ],
    );
    assert_eq!(allowed as u64, served - M as u64);
    assert!(
        exhausted >= (M / 2) as f64,
        "most requests ran out of budget: {exhausted}"
    );
    let urx = m.sum(
        "istio_requests_total",
        &[("destination_service", &dead), ("response_flags", "URX")],
    );
    assert_eq!(urx as usize, M, "each answer says retries ran out (URX)");

    // `stall` sits on its first request: the attempt times out (backendRequest) and
    // the retry gets an answer, on a new connection (the only one allowed).
    let r = l7::curl(client, &chain.url("stall", "/"), &[]).expect("curl");
    assert_eq!(
        (r.http_code, r.header("x-pod")),
        (200, Some("stall")),
        "the timed-out attempt was retried: {r:?}"
    );
    assert_eq!(chain.served("stall"), 2, "two attempts");
    let m = chain.metrics();
    let retried = m.sum(
        "mesh_proxy_retries_total",
        &[
            ("destination_service", &host("stall")),
            ("outcome", "allowed"),
        ],
    );
    assert_eq!(retried, 1.0, "the timeout was retried once");
}

#[test]
fn circuit_breaker_sheds_overflow_and_recovers() {
    if !require_root() {
        return;
    }
    let chain = Chain::new("l7cb", &[]).expect("chain");
    let client = chain.client();

    // One connection and one waiting request: of six concurrent 3 s requests, the
    // first is served, one waits for it, the others overflow at once.
    const CONCURRENT: usize = 6;
    let url = chain.url("slow", "/delay/3000");
    let results: Vec<l7::CurlResult> = thread::scope(|s| {
        let handles: Vec<_> = (0..CONCURRENT)
            .map(|_| s.spawn(|| Curl::new(url.as_str()).run(client).expect("curl")))
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("curl thread"))
            .collect()
    });
    let codes: Vec<u16> = results.iter().map(|r| r.http_code).collect();
    let shed: Vec<&l7::CurlResult> = results.iter().filter(|r| r.http_code == 503).collect();
    let served = results.iter().filter(|r| r.http_code == 200).count();
    assert_eq!(
        shed.len() + served,
        CONCURRENT,
        "each is served or shed: {codes:?}"
    );
    assert!(
        !shed.is_empty() && served >= 1,
        "some overflow, some are served: {codes:?}"
    );
    assert!(
        shed.iter().all(|r| r.header("x-pod").is_none()),
        "the proxy itself sheds: {shed:?}"
    );
    let m = chain.metrics();
    let slow = host("slow");
    let overflows = m.sum(
        "mesh_proxy_overflows_total",
        &[("destination_service", &slow)],
    );
    let uo = m.sum(
        "istio_requests_total",
        &[("destination_service", &slow), ("response_flags", "UO")],
    );
    assert_eq!(
        (overflows as usize, uo as usize),
        (shed.len(), shed.len()),
        "each shed request is an overflow, flagged UO"
    );
    // The load gone, the breaker lets everything through again.
    let after = batch(client, &chain.url("slow", "/delay/10"), 5);
    assert!(
        after.iter().all(|a| a.code == 200 && a.pod == "slow"),
        "recovered: {after:?}"
    );

    // One request per backend connection, while the client keeps its one connection.
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        "30",
        "--write-out",
        "\\n@@ %{num_connects}\\n",
    ]);
    for _ in 0..4 {
        cmd.arg(chain.url("perconn", "/"));
    }
    let out = client
        .run_timeout(cmd, Duration::from_secs(40))
        .expect("curl");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let echoes: Vec<HttpEcho> = stdout
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).expect("echo JSON"))
        .collect();
    let connects: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("@@ "))
        .collect();
    assert_eq!(echoes.len(), 4, "{stdout}");
    assert_eq!(
        connects,
        ["1", "0", "0", "0"],
        "the client reuses its connection: {stdout}"
    );
    let mut peers: Vec<&str> = echoes.iter().map(|e| e.peer.as_str()).collect();
    peers.sort_unstable();
    peers.dedup();
    assert_eq!(
        peers.len(),
        4,
        "the backend sees a new connection per request: {peers:?}"
    );
    assert!(
        peers
            .iter()
            .all(|p| p.starts_with(&format!("{}:", client.ip()))),
        "from the client pod's address: {peers:?}"
    );

    // Mirrored copies are requests to their target too: `bad` fails the copies sent
    // to `pair` and is ejected by them alone (no request went to `pair` itself here).
    // P2C sends copies to `bad` only while it looks no slower than `good`: if `good`
    // answered first, `bad` waits until its untried estimate decays (about 35 s), so
    // copies keep coming, in batches, until then (bounded).
    let pair = host("pair");
    let bad_endpoint = format!("{}:{POD_PORT}", chain.bed.pod("bad").ip());
    let deadline = Instant::now() + Duration::from_secs(75);
    let ejected = loop {
        let answers = batch(client, &chain.url("mirrored", "/"), 30);
        assert!(
            answers.iter().all(|a| a.code == 200 && a.pod == "slow"),
            "the mirror's answers are not the client's: {answers:?}"
        );
        let ejected = eventually(Duration::from_secs(2), || {
            chain.metrics().sum(
                "mesh_proxy_ejections_total",
                &[("destination_service", &pair), ("endpoint", &bad_endpoint)],
            ) >= 1.0
        });
        if ejected || Instant::now() >= deadline {
            break ejected;
        }
    };
    assert!(
        ejected,
        "bad was ejected through mirrored copies ({} of them reached it)",
        chain.served("bad")
    );
}

#[test]
fn outlier_ejection_takes_a_failing_backend_out_and_back() {
    if !require_root() {
        return;
    }
    let chain = Chain::new("l7ej", &[]).expect("chain");
    let client = chain.client();
    let pair = host("pair");
    let bad_endpoint = format!("{}:{POD_PORT}", chain.bed.pod("bad").ip());
    let ejections = |m: &Metrics| {
        m.sum(
            "mesh_proxy_ejections_total",
            &[("destination_service", &pair), ("endpoint", &bad_endpoint)],
        ) as usize
    };

    // No retries: the client sees each 503 of `bad`, until its 3rd in a row ejects it.
    // How often P2C tries `bad` depends on how the two latency estimates started, so
    // requests come in batches until it is ejected (bounded).
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut answers = Vec::new();
    let ejected = loop {
        answers.extend(batch(client, &chain.url("pair", "/"), 20));
        let ejected = ejections(&chain.metrics());
        if ejected >= 1 || Instant::now() >= deadline {
            break ejected;
        }
    };
    let failed = answers
        .iter()
        .filter(|a| a.code == 503 && a.pod == "bad")
        .count();
    let good = answers
        .iter()
        .filter(|a| a.code == 200 && a.pod == "good")
        .count();
    assert_eq!(failed + good, answers.len(), "{answers:?}");
    assert!(ejected >= 1, "bad was ejected: {answers:?}");
    // Each ejection takes 3 failures; once ejected, bad gets nothing until it returns
    // (2 s, then 4 s…), so failures come only in runs of 3 (plus an unfinished run).
    assert!(
        failed <= 3 * ejected + 2,
        "{failed} failures for {ejected} ejections: {answers:?}"
    );
    let good_ip = chain.bed.pod("good").ip().to_string();
    assert!(
        chain
            .metrics()
            .find(
                "mesh_proxy_ejections_total",
                &[("destination_service", &pair)]
            )
            .all(|s| !s.labels["endpoint"].starts_with(&good_ip)),
        "the healthy one is never ejected"
    );

    // After the ejection time, bad is tried again.
    let mut tried = Vec::new();
    let returned = eventually(Duration::from_secs(30), || {
        let a = batch(client, &chain.url("pair", "/"), 1).remove(0);
        let back = a.pod == "bad";
        tried.push(a);
        back
    });
    assert!(
        returned,
        "bad got traffic again after its ejection: {tried:?}"
    );
    let answers = batch(client, &chain.url("pair", "/"), 10);
    assert!(
        ejections(&chain.metrics()) > ejected
            || answers.iter().filter(|a| a.pod == "bad").count() <= 2,
        "still failing, it is ejected again: {answers:?}"
    );
}

/// Runs `script` with bash in `pod` (bounded by `timeout`); returns its stdout.
fn bash(pod: &Pod, script: &str, timeout: Duration) -> Result<String> {
    let mut cmd = Command::new("bash");
    cmd.args(["-c", script]);
    let out = pod.run_timeout(cmd, timeout).context("bash in the pod")?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// VmRSS of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or_else(|| panic!("VmRSS of {pid}"))
}

#[test]
fn bad_input_is_refused_and_leaves_the_proxy_serving() {
    if !require_root() {
        return;
    }
    let chain = Chain::new(
        "l7bad",
        &["--max-header-bytes", "8192", "--header-read-timeout", "2s"],
    )
    .expect("chain");
    let client = chain.client();
    let web = chain.url("web", "/");
    let ip = SERVICES.iter().find(|s| s.0 == "web").expect("web").1;

    // Headers beyond --max-header-bytes.
    let big = format!("x-big: {}", "a".repeat(16 * 1024));
    let r = l7::curl(client, &web, &["-H", &big]).expect("curl");
    assert_eq!(r.http_code, 431, "oversized headers: {r:?}");
    let r = Curl::new(web.as_str())
        .h2c()
        .args(&["-H", &big])
        .run(client)
        .expect("curl");
    assert_eq!(r.http_code, 431, "oversized h2c headers: {r:?}");
    chain.assert_serving("oversized headers");

    // A slowloris client: a header line every 500 ms for 10 s; the proxy must cut it
    // off after --header-read-timeout (writes then fail), while serving others.
    let slowloris = format!(
        "trap '' PIPE
exec 3<>/dev/tcp/{ip}/80 || exit 1
printf 'GET / HTTP/1.1\\r\\nHost: web\\r\\n' >&3
for i in $(seq 1 20); do
  sleep 0.5
  printf 'x-slow-%d: 1\\r\\n' $i >&3 2>/dev/null || {{ echo cut; exit 0; }}
done
echo not-cut"
    );
    let (loris, others) = thread::scope(|s| {
        let loris = s.spawn(|| bash(client, &slowloris, Duration::from_secs(30)));
        let others = batch(client, &chain.url("web", "/meanwhile"), 5);
        (loris.join().expect("slowloris thread"), others)
    });
    assert_eq!(loris.expect("slowloris").trim(), "cut", "slowloris cut off");
    assert!(
        others.iter().all(|a| a.code == 200),
        "others are served meanwhile: {others:?}"
    );
    chain.assert_serving("a slowloris client");

    // Garbage: an HTTP 400 or a close, nothing else.
    let garbage = format!(
        "exec 3<>/dev/tcp/{ip}/80 || exit 1
printf '\\x16\\x03\\x01\\x00\\xffgarbage\\r\\n\\r\\n' >&3
timeout 5 head -c 12 <&3; echo \" rc=$?\""
    );
    let answer = bash(client, &garbage, Duration::from_secs(15)).expect("garbage");
    assert!(
        answer.starts_with("HTTP/1.1 400 rc=0") || answer.trim() == "rc=0",
        "garbage is answered 400 or closed: {answer:?}"
    );
    chain.assert_serving("garbage");

    // A backend aborting its response mid-body: the client's transfer fails too (it
    // must not look complete), and the next request is fine.
    let r = l7::curl(client, &chain.url("web", "/reset"), &[]).expect("curl");
    assert!(
        r.exit_code != 0 || r.http_code == 502,
        "an aborted response is not passed on as complete: {r:?}"
    );
    chain.assert_serving("an aborted backend response");

    // Rapid reset (CVE-2023-44487): streams opened and cancelled at once, on one
    // connection. The proxy may close the connection (GOAWAY); it must survive with
    // bounded memory and serve others.
    let pid = chain.proxy.pid().expect("proxy runs");
    let before = rss_kib(pid);
    let mut cmd = Command::new(mesh_tests::testpod_bin().expect("mesh-testpod"));
    cmd.args([
        "h2-rapid-reset",
        "--addr",
        &format!("{ip}:80"),
        "--streams",
        "20000",
    ]);
    let out = client
        .run_timeout(cmd, Duration::from_secs(60))
        .expect("h2-rapid-reset");
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "h2-rapid-reset ran: {report} {out:?}");
    let after = rss_kib(pid);
    eprintln!(
        "rapid reset: {}; proxy VmRSS {before} KiB before, {after} KiB after",
        report.trim()
    );
    assert!(
        after < 200 * 1024,
        "bounded memory: VmRSS {before} KiB before, {after} KiB after"
    );
    chain.assert_serving("a rapid reset");

    // An h2c flood on one connection: the proxy survives it with bounded memory.
    if Command::new("h2load").arg("--version").output().is_ok() {
        let pid = chain.proxy.pid().expect("proxy runs");
        let before = rss_kib(pid);
        let mut cmd = Command::new("h2load");
        cmd.args(["-n", "20000", "-c", "1", "-m", "1000", "-T", "20", &web]);
        let out = client
            .run_timeout(cmd, Duration::from_secs(120))
            .expect("h2load");
        let after = rss_kib(pid);
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(
            report.contains("requests: 20000 total") && report.contains(" 20000 succeeded"),
            "every flood request is served: {report}"
        );
        assert!(
            after < 200 * 1024,
            "bounded memory: VmRSS {before} KiB before, {after} KiB after\n{report}"
        );
        let summary = report.lines().find(|l| l.starts_with("finished in"));
        eprintln!("h2c flood: {summary:?}; proxy VmRSS {before} KiB before, {after} KiB after");
        chain.assert_serving("an h2c flood");
    } else {
        eprintln!("h2load not installed (cargo xtask setup): flood case skipped");
    }
}
