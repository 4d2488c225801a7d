//! The L7 scene of `cargo xtask demo` (deploy/local/demo-l7.yaml): the node proxy
//! (`mesh-proxy`, one per node) serves the Service ports that have an HTTPRoute. A
//! canary split (90/10 between two versions, chosen per request), a flaky backend whose
//! 503s the proxy retries so that the client sees none, and the proxy's own account of
//! both: Istio's request metrics and its retry counter, beside `mesh-agent routes`.

use std::{collections::BTreeMap, time::Duration, time::Instant};

use anyhow::{Context as _, Result, bail, ensure};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Pod, Proxy, eventually,
    l7::{self, Curl, HttpEcho, HttpStats, Metrics},
};

/// Pods of deploy/local/demo-l7.yaml: (node, name, IP).
pub const PODS: [(&str, &str, &str); 3] = [
    ("n1", "reviews-v1", "10.244.1.40"),
    ("n2", "reviews-v2", "10.244.2.40"),
    ("n2", "ratings", "10.244.2.41"),
];
/// The port every backend serves HTTP on (the Services' targetPort).
const BACKEND_PORT: u16 = 8080;
/// `ratings` answers every third request with 503.
const FAIL_EVERY: &str = "3";
/// The Services the routes of deploy/local/demo-l7.yaml send to (their metrics).
const SERVICES: [&str; 3] = ["reviews-v1", "reviews-v2", "ratings"];
const REVIEWS_URL: &str = "http://10.96.0.30/reviews";
const RATINGS_URL: &str = "http://10.96.0.40/ratings";
const CANARY_REQUESTS: u32 = 200;
const RETRY_REQUESTS: u32 = 100;
/// Bound on each request loop (each request is a new curl process, ~10-50 ms), so that
/// the scene stays under a minute even when requests hang.
const LOOP_DEADLINE: Duration = Duration::from_secs(20);
/// Bound on one request.
const MAX_TIME: Duration = Duration::from_secs(5);
/// How long the proxy gets to open its listener in the client pod once it runs.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(15);
/// The proxy's outbound listener inside each pod (`127.0.0.1:15001`) as
/// `/proc/net/tcp` prints it: address in host byte order, port, both in hex.
const LISTENER_V4: &str = "0100007F:3A99";
/// The labels of `istio_requests_total` printed (of Istio's 25).
const LABELS: [&str; 5] = [
    "source_workload",
    "destination_service",
    "destination_workload",
    "response_code",
    "response_flags",
];

/// Starts the HTTP servers of [`PODS`] (`mesh-testpod http-server`, `ratings` flaky).
pub fn start_backends(cluster: &Cluster) -> Result<Vec<ChildGuard>> {
    PODS.iter()
        .map(|(_, name, _)| {
            let extra: &[&str] = match *name {
                "ratings" => &["--fail-every", FAIL_EVERY],
                _ => &[],
            };
            l7::start_http_server(cluster.pod(name), BACKEND_PORT, name, extra)
        })
        .collect()
}

/// Runs the scene from pod `client` (n1), whose node proxy is `proxies[0]`.
pub fn scene(cluster: &Cluster, agents: &[Agent], proxies: &[Proxy]) -> Result<()> {
    println!(
        "\n== L7: the node proxy (deploy/local/demo-l7.yaml: HTTPRoutes reviews-canary, ratings-retry)"
    );
    let client = cluster.pod("client");
    let proxy = &proxies[0];
    wait_for_listener(client, proxy)?;
    println!(
        "mesh-proxy runs on both nodes; on n1 it listens on 127.0.0.1:15001 inside pod \
         client, where connect() to a routed Service port lands"
    );

    // Each request is its own curl process and connection, yet the split is made per
    // request by the proxy, not per connection by the kernel.
    let started = Instant::now();
    let outcomes =
        l7::request_loop_with(client, &curl(REVIEWS_URL), CANARY_REQUESTS, LOOP_DEADLINE)?;
    let tally = l7::tally(&outcomes);
    println!(
        "\nclient -> reviews {REVIEWS_URL} (canary 90/10): {} requests in {:.1} s",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    print_split(&tally, outcomes.len());

    let before = backend_stats(client, "ratings")?;
    let started = Instant::now();
    let outcomes =
        l7::request_loop_with(client, &curl(RATINGS_URL), RETRY_REQUESTS, LOOP_DEADLINE)?;
    let served = backend_stats(client, "ratings")?.requests - before.requests;
    let ok = outcomes.iter().filter(|o| o.http_code == 200).count();
    println!(
        "\nclient -> ratings {RATINGS_URL} (the pod answers every {FAIL_EVERY}rd request with \
         503;\n  the route retries 503 twice): {ok} of {} requests answered 200 in {:.1} s",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    print_split(&l7::tally(&outcomes), outcomes.len());
    println!(
        "  the ratings pod served {served} requests for them (its /stats): {} were retries",
        served.saturating_sub(outcomes.len() as u64)
    );

    let metrics = proxy.metrics_parsed()?;
    println!("\n$ curl 127.0.0.1:15020/metrics   # mesh-proxy on n1, a few series");
    for sample in metrics.find("istio_requests_total", &[]).filter(|s| {
        s.labels
            .get("destination_service_name")
            .is_some_and(|name| SERVICES.contains(&name.as_str()))
    }) {
        let labels: Vec<String> = LABELS
            .iter()
            .filter_map(|l| Some(format!("{l}=\"{}\"", sample.labels.get(*l)?)))
            .collect();
        println!("{}{{{}}} {}", sample.name, labels.join(","), sample.value);
    }
    print_samples(&metrics, "mesh_proxy_retries_total");
    print_samples(&metrics, "mesh_proxy_config_version");

    // The backend's view: the proxy dialled from inside the client pod, so the peer is
    // the pod's own address (what NetworkPolicy judged), and it joined a trace.
    let res = curl(REVIEWS_URL).run(client)?;
    let echo: HttpEcho = res.json()?;
    println!(
        "\nclient -> reviews once more, as the backend saw it: answered by {}, peer {} \
         (pod client's own address),\n  traceparent {}",
        echo.pod,
        echo.peer,
        echo.header("traceparent").unwrap_or("-")
    );

    println!("\n$ mesh-agent routes --node {}", agents[0].pin_name());
    let out = agents[0].cli(&["routes", "--node", agents[0].pin_name()])?;
    ensure!(
        out.status.success(),
        "mesh-agent routes failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}

/// Waits until the proxy listens on [`LISTENER_V4`] in `pod`: it opens its listeners
/// when the agent's configuration names the pod (found through the pod's processes).
fn wait_for_listener(pod: &Pod, proxy: &Proxy) -> Result<()> {
    let listening = || {
        // /proc/thread-self/net is the table of the calling thread's netns.
        pod.in_netns(|| std::fs::read_to_string("/proc/thread-self/net/tcp"))
            .ok()
            .and_then(Result::ok)
            .is_some_and(|table| {
                table.lines().skip(1).any(|line| {
                    let fields: Vec<&str> = line.split_whitespace().collect();
                    fields.get(1) == Some(&LISTENER_V4) && fields.get(3) == Some(&"0A")
                })
            })
    };
    if !eventually(LISTENER_TIMEOUT, listening) {
        bail!(
            "mesh-proxy did not listen on 127.0.0.1:15001 in pod {} within {LISTENER_TIMEOUT:?}; log:\n{}",
            pod.name(),
            proxy.log()
        );
    }
    Ok(())
}

/// `GET /stats` of backend `name`, dialled at its pod address (so not through the
/// proxy, and not counted by the server).
fn backend_stats(client: &Pod, name: &str) -> Result<HttpStats> {
    let (_, _, ip) = PODS
        .iter()
        .find(|(_, pod, _)| *pod == name)
        .with_context(|| format!("no L7 pod {name}"))?;
    let url = format!("http://{ip}:{BACKEND_PORT}/stats");
    let res = curl(&url).run(client)?;
    ensure!(
        res.http_code == 200,
        "{url}: HTTP {} (curl exit {}): {}",
        res.http_code,
        res.exit_code,
        res.stderr
    );
    res.json()
}

fn curl(url: &str) -> Curl {
    Curl::new(url).max_time(MAX_TIME)
}

/// One line per answering pod (or failure), with its share and a bar of 2 % steps.
fn print_split(tally: &BTreeMap<String, u32>, total: usize) {
    for (who, n) in tally {
        let share = f64::from(*n) * 100.0 / total.max(1) as f64;
        println!(
            "  {who:<12} {n:>4}  {share:>5.1} %  {}",
            "#".repeat((share / 2.0).round() as usize)
        );
    }
}

fn print_samples(metrics: &Metrics, name: &str) {
    for sample in metrics.find(name, &[]) {
        let labels: Vec<String> = sample
            .labels
            .iter()
            .map(|(k, v)| format!("{k}=\"{v}\""))
            .collect();
        if labels.is_empty() {
            println!("{name} {}", sample.value);
        } else {
            println!("{name}{{{}}} {}", labels.join(","), sample.value);
        }
    }
}
