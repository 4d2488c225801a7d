//! The node proxy keeps the client's identity and lives its own life (root only; issue
//! 10 items 3 and 8). Two nodes, an agent and a `mesh-proxy` on each, client pods on
//! n1, `mesh-testpod http-server` backends on both nodes.
//!
//! What a client sees when policy denies it, by path:
//! - plain Service port (kernel L4): an egress deny fails connect() at once with
//!   `EPERM`; an ingress deny at the backend drops the SYN, so the connect times out;
//! - L7 Service port (through the proxy): connect() succeeds (it reaches the proxy's
//!   listener on the pod's own loopback, which policy never polices); the proxy's connect
//!   to the backend, made inside the client's netns, meets the same verdict (refused
//!   with `EPERM`, or timing out after `--connect-timeout`), and the proxy then closes
//!   the client's connection without an answer: curl gets no HTTP status at all
//!   ([`L7_DENIED`]), and the backend never sees the request.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::Ipv4Addr,
    process::Command,
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use mesh_tests::{
    Agent, ChildGuard, Cluster, Proxy, StateDir,
    agent::node_name,
    assert_eventually,
    l7::{self, Curl, CurlResult, HttpEcho, HttpStats},
    require_root,
    testpod::{self, ConnectSummary},
};

/// `web`: `appProtocol: http` on [`L7_PORT`] (the proxy), nothing on [`L4_PORT`].
const VIP_WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// `secure`: like `web`, in front of a pod that admits no ingress.
const VIP_SECURE: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 11);
/// `plain`: no appProtocol, no route: never the proxy's business.
const VIP_PLAIN: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 12);
/// `web-a` and `web-b`: one backend each, plain port [`POD_PORT`] (route targets).
const VIP_WEB_A: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 13);
const VIP_WEB_B: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 14);
const L7_PORT: u16 = 80;
const L4_PORT: u16 = 81;
const POD_PORT: u16 = 8080;
/// Backends `(node, name, ip, labels)`.
const BACKENDS: [(&str, &str, &str, &str); 3] = [
    ("n1", "web-a", "10.244.1.20", "app: web, tier: a"),
    ("n2", "web-b", "10.244.2.20", "app: web, tier: b"),
    ("n2", "secure", "10.244.2.21", "app: secure"),
];
/// Clients `(name, ip, labels)`, all on n1: `blocked` may send nothing, `picky` only
/// to tier `a`.
const CLIENTS: [(&str, &str, &str); 3] = [
    ("client", "10.244.1.10", "app: client"),
    ("blocked", "10.244.1.11", "app: blocked"),
    ("picky", "10.244.1.12", "app: picky"),
];
/// The proxies' `--connect-timeout`: what an ingress deny costs an L7 request.
const CONNECT_TIMEOUT: &str = "2s";
/// Bound on convergence waits (state applied, pods found, listeners open).
const CONVERGE: Duration = Duration::from_secs(20);
/// What curl reports for a request the proxy closed without an answer: no status, exit
/// 52 ("Empty reply from server": the proxy dropped the connection after reading the
/// request).
const L7_DENIED: (u16, i32) = (0, 52);

const POLICIES: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: blocked-egress, namespace: default}
spec: {podSelector: {matchLabels: {app: blocked}}, policyTypes: [Egress]}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: picky-egress, namespace: default}
spec:
  podSelector: {matchLabels: {app: picky}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {tier: a}}}]}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: secure-ingress, namespace: default}
spec: {podSelector: {matchLabels: {app: secure}}, policyTypes: [Ingress]}
";

/// An HTTPRoute on `web`'s L7 port: header `x-pin: a` (or `b`) goes to `web-a` (or
/// `web-b`) alone, anything else to `web` itself (both backends).
const PIN_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: pin, namespace: default}
spec:
  parentRefs: [{group: '', kind: Service, name: web, port: 80}]
  rules:
    - matches: [{headers: [{name: x-pin, value: a}]}]
      backendRefs: [{name: web-a, port: 8080}]
    - matches: [{headers: [{name: x-pin, value: b}]}]
      backendRefs: [{name: web-b, port: 8080}]
    - backendRefs: [{name: web, port: 80}]
";

/// An HTTPRoute on `web`'s L7 port splitting between `web-a` and `web-b` by weight.
fn route(weight_a: u32, weight_b: u32) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: web, namespace: default}}
spec:
  parentRefs: [{{group: '', kind: Service, name: web, port: {L7_PORT}}}]
  rules:
    - backendRefs:
        - {{name: web-a, port: {POD_PORT}, weight: {weight_a}}}
        - {{name: web-b, port: {POD_PORT}, weight: {weight_b}}}
"
    )
}

/// The Services and Pods.
fn cluster_state(cluster: &Cluster) -> String {
    let mut yaml = String::new();
    let service = |name: &str, vip: Ipv4Addr, selector: &str, ports: &str| {
        format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{{selector}}}
  ports: [{ports}]
"
        )
    };
    let l7_and_l4 = format!(
        "{{name: http, port: {L7_PORT}, targetPort: {POD_PORT}, appProtocol: http}}, \
         {{name: plain, port: {L4_PORT}, targetPort: {POD_PORT}}}"
    );
    let pod_port = format!("{{name: http, port: {POD_PORT}, targetPort: {POD_PORT}}}");
    yaml += &service("web", VIP_WEB, "app: web", &l7_and_l4);
    yaml += &service("secure", VIP_SECURE, "app: secure", &l7_and_l4);
    yaml += &service(
        "plain",
        VIP_PLAIN,
        "app: web",
        &format!("{{name: plain, port: {L7_PORT}, targetPort: {POD_PORT}}}"),
    );
    yaml += &service("web-a", VIP_WEB_A, "tier: a", &pod_port);
    yaml += &service("web-b", VIP_WEB_B, "tier: b", &pod_port);
    let pods = BACKENDS
        .iter()
        .map(|&(node, name, ip, labels)| (node, name, ip, labels))
        .chain(
            CLIENTS
                .iter()
                .map(|&(name, ip, labels)| ("n1", name, ip, labels)),
        );
    for (node, name, ip, labels) in pods {
        let _ = write!(
            yaml,
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{{labels}}}}}
spec: {{nodeName: {node}, containers: [{{name: main, image: mesh-testpod}}]}}
status: {{podIP: {ip}}}
",
            node = node_name(cluster.node(node)),
        );
    }
    yaml
}

/// The cluster, its backends and anchors, the agents and proxies of both nodes.
struct Bed {
    // Field order is drop order: proxies and agents, processes, state, cluster.
    proxies: [Proxy; 2],
    agents: [Option<Agent>; 2],
    _processes: Vec<ChildGuard>,
    state: StateDir,
    cluster: Cluster,
}

impl Bed {
    fn new(
        prefix: &str,
        extra_state: &[(&str, &str)],
        agent_args: &'static [&'static str],
    ) -> Self {
        let mut builder = Cluster::builder(prefix).node("n1").node("n2");
        for (node, name, ip, _) in BACKENDS {
            builder = builder.pod(node, name, ip);
        }
        for (name, ip, _) in CLIENTS {
            builder = builder.pod("n1", name, ip);
        }
        let cluster = builder.build().unwrap();
        let mut processes = Vec::new();
        for (_, name, _, _) in BACKENDS {
            processes.push(l7::start_http_server(cluster.pod(name), POD_PORT, name, &[]).unwrap());
        }
        // The agent finds a pod through its processes; curl runs are too short-lived.
        for (name, _, _) in CLIENTS {
            processes.push(cluster.pod(name).spawn_anchor().unwrap());
        }
        let state = StateDir::new(prefix).unwrap();
        state
            .write("cluster.yaml", &cluster_state(&cluster))
            .unwrap();
        for (file, yaml) in extra_state {
            state.write(file, yaml).unwrap();
        }
        let agents = ["n1", "n2"]
            .map(|n| Some(Agent::start_with(cluster.node(n), state.path(), agent_args).unwrap()));
        let proxies = ["n1", "n2"].map(|n| {
            Proxy::start(cluster.node(n), &["--connect-timeout", CONNECT_TIMEOUT]).unwrap()
        });
        let bed = Self {
            proxies,
            agents,
            _processes: processes,
            state,
            cluster,
        };
        // The proxy has the pods' listeners and the Service's backends.
        assert_eventually!(
            bed.curl("client", VIP_WEB, L7_PORT).http_code == 200,
            CONVERGE,
            "client -> web:{L7_PORT} never answered through the proxy; proxy log:\n{}",
            bed.proxies[0].log()
        );
        bed
    }

    fn curl(&self, from: &str, vip: Ipv4Addr, port: u16) -> CurlResult {
        self.curl_for(from, vip, port, Duration::from_secs(10), &[])
    }

    /// `curl <extra…> http://vip:port/who` from pod `from`.
    fn curl_for(
        &self,
        from: &str,
        vip: Ipv4Addr,
        port: u16,
        max_time: Duration,
        extra: &[&str],
    ) -> CurlResult {
        Curl::new(format!("http://{vip}:{port}/who"))
            .max_time(max_time)
            .args(extra)
            .run(self.cluster.pod(from))
            .unwrap()
    }

    /// Requests served so far by backend `name`, asked from `client` straight at the
    /// pod (no Service, no proxy).
    fn served(&self, name: &str) -> u64 {
        let ip = BACKENDS.iter().find(|b| b.1 == name).unwrap().2;
        let r = Curl::new(format!("http://{ip}:{POD_PORT}/stats"))
            .run(self.cluster.pod("client"))
            .unwrap();
        assert_eq!(r.http_code, 200, "stats of {name}: {r:?}");
        r.json::<HttpStats>().unwrap().requests
    }
}

/// `count` requests from `from` to `vip:port`, by answering pod (failures keyed
/// `<http_code>/<exit_code>`); every answer's peer must be the client pod's own IP.
fn answers(
    bed: &Bed,
    from: &str,
    (vip, port): (Ipv4Addr, u16),
    count: u32,
    extra: &[&str],
) -> BTreeMap<String, u32> {
    let client_ip = bed.cluster.pod(from).ip().to_string();
    let mut by = BTreeMap::new();
    for _ in 0..count {
        let r = bed.curl_for(from, vip, port, Duration::from_secs(8), extra);
        let key = if r.http_code == 200 {
            let echo: HttpEcho = r.json().unwrap();
            let peer_ip = echo.peer.rsplit_once(':').map(|(ip, _)| ip.to_owned());
            assert_eq!(
                peer_ip.as_deref(),
                Some(client_ip.as_str()),
                "{from} -> {vip}:{port}: the backend must see the client pod's own IP: {echo:?}"
            );
            echo.pod
        } else {
            format!("{}/{}", r.http_code, r.exit_code)
        };
        *by.entry(key).or_default() += 1;
    }
    by
}

/// An L4 probe through the kernel (`mesh-testpod connect`): its errors tell EPERM apart.
fn l4_connect(bed: &Bed, from: &str, vip: Ipv4Addr, count: u32) -> ConnectSummary {
    testpod::connect(bed.cluster.pod(from), (vip, L4_PORT).into(), count).unwrap()
}

fn sysctl_migrate_req(cmd_in: impl FnOnce(Command) -> std::process::Output) -> String {
    let mut cmd = Command::new("cat");
    cmd.arg("/proc/sys/net/ipv4/tcp_migrate_req");
    String::from_utf8_lossy(&cmd_in(cmd).stdout)
        .trim()
        .to_owned()
}

fn istio_requests(proxy: &Proxy, service: &str) -> f64 {
    proxy.metrics_parsed().unwrap().sum(
        "istio_requests_total",
        &[("destination_service_name", service)],
    )
}

/// (a) and (b): a Service without routes or appProtocol never touches the proxy, and
/// NetworkPolicy gives the same verdicts through the proxy as through the kernel's L4
/// path, with the client pod's own IP reaching the backend.
#[test]
fn policy_verdicts_and_client_identity_survive_the_proxy() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::new(
        "l7pol",
        &[("policies.yaml", POLICIES), ("route.yaml", PIN_ROUTE)],
        &[],
    );
    let n1 = bed.cluster.node("n1");

    // The proxy turned on accept-queue migration in the pods it listens in, and only
    // there (the node's own namespace keeps the default).
    let pod_value = sysctl_migrate_req(|cmd| bed.cluster.pod("client").run(cmd).unwrap());
    assert_eq!(pod_value, "1", "net.ipv4.tcp_migrate_req in pod client");
    let node_value = sysctl_migrate_req(|cmd| n1.run_outside_cgroup(cmd).unwrap());
    assert_eq!(
        node_value, "0",
        "net.ipv4.tcp_migrate_req in node n1's netns"
    );

    // (a) The plain Service is served by the kernel: the proxy never counts it, and it
    // works the same with every proxy stopped (while the L7 port is then refused).
    let plain = answers(&bed, "client", (VIP_PLAIN, L7_PORT), 4, &[]);
    assert_eq!(plain.values().sum::<u32>(), 4, "{plain:?}");
    assert!(plain.keys().all(|k| k.starts_with("web-")), "{plain:?}");
    assert_eq!(istio_requests(&bed.proxies[0], "plain"), 0.0);
    assert!(
        istio_requests(&bed.proxies[0], "web") >= 1.0,
        "the counter works: the L7 Service was counted"
    );
    for p in &mut bed.proxies {
        p.stop().unwrap();
    }
    let plain = answers(&bed, "client", (VIP_PLAIN, L7_PORT), 4, &[]);
    assert!(plain.keys().all(|k| k.starts_with("web-")), "{plain:?}");
    let refused = bed.curl("client", VIP_WEB, L7_PORT);
    assert_eq!(
        (refused.http_code, refused.exit_code),
        (0, 7),
        "no proxy: the L7 port is refused: {refused:?}"
    );
    for (p, n) in bed.proxies.iter_mut().zip(["n1", "n2"]) {
        p.restart(bed.cluster.node(n)).unwrap();
    }
    assert_eventually!(
        bed.curl("client", VIP_WEB, L7_PORT).http_code == 200,
        CONVERGE,
        "restarted proxy serves"
    );
    assert_eq!(istio_requests(&bed.proxies[0], "plain"), 0.0);

    // An allowed pair: both paths answer, from both nodes, with the client's IP.
    for port in [L4_PORT, L7_PORT] {
        let got = answers(&bed, "client", (VIP_WEB, port), 8, &[]);
        assert_eq!(
            got.iter()
                .filter(|(k, _)| k.starts_with("web-"))
                .map(|(_, n)| n)
                .sum::<u32>(),
            8,
            "client -> web:{port}: {got:?}"
        );
    }

    // Egress deny of the client: EPERM at connect() on L4; on L7 no answer, and the
    // backends never see the request.
    let l4 = l4_connect(&bed, "blocked", VIP_WEB, 2);
    assert_eq!(
        (
            l4.ok,
            l4.connect_errno_first.as_deref(),
            l4.errors.get("EPERM")
        ),
        (0, Some("EPERM"), Some(&2)),
        "blocked -> web:{L4_PORT}: {l4:?}"
    );
    let before = bed.served("web-a") + bed.served("web-b");
    for _ in 0..3 {
        let r = bed.curl("blocked", VIP_WEB, L7_PORT);
        assert_eq!(
            (r.http_code, r.exit_code),
            L7_DENIED,
            "blocked -> web:{L7_PORT}: {r:?}"
        );
    }
    assert_eq!(
        bed.served("web-a") + bed.served("web-b"),
        before,
        "no request of the blocked pod reached a backend"
    );

    // Ingress deny at a backend on the other node: both paths fail (the SYN is dropped:
    // L4 times out, L7 the proxy's connect times out and the client gets no answer).
    let l4 = bed.curl_for("client", VIP_SECURE, L4_PORT, Duration::from_secs(3), &[]);
    assert_eq!(
        (l4.http_code, l4.exit_code),
        (0, 28),
        "client -> secure:{L4_PORT} times out: {l4:?}"
    );
    let l7 = bed.curl_for("client", VIP_SECURE, L7_PORT, Duration::from_secs(8), &[]);
    assert_eq!(
        (l7.http_code, l7.exit_code),
        L7_DENIED,
        "client -> secure:{L7_PORT}: {l7:?}"
    );

    // Allowed to backend A, not B, behind one Service. Pinned by a header to one
    // backend through the L7 Service (route `pin`), and through each backend's own
    // Service on L4: A answers, B never does (L4: EPERM; L7: no answer).
    for (pin, vip, want) in [("a", VIP_WEB_A, "web-a"), ("b", VIP_WEB_B, "0/52")] {
        let l7 = answers(
            &bed,
            "picky",
            (VIP_WEB, L7_PORT),
            3,
            &["-H", &format!("x-pin: {pin}")],
        );
        assert_eq!(
            l7,
            BTreeMap::from([(want.to_owned(), 3)]),
            "picky -> web:{L7_PORT} pinned to {pin}"
        );
        let l4 = answers(&bed, "picky", (vip, POD_PORT), 3, &[]);
        let l4_want = if pin == "a" { "web-a" } else { "0/7" };
        assert_eq!(
            l4,
            BTreeMap::from([(l4_want.to_owned(), 3)]),
            "picky -> web-{pin} on L4"
        );
    }
    let l4 = testpod::connect(bed.cluster.pod("picky"), (VIP_WEB_B, POD_PORT).into(), 1).unwrap();
    assert_eq!(l4.connect_errno_first.as_deref(), Some("EPERM"), "{l4:?}");
    // Unpinned, the backend is the balancer's choice. On L4 a random pick of web-b
    // fails (EPERM); the proxy instead tries another endpoint when policy refuses one,
    // so every L7 request of the allowed client is answered by web-a.
    let got = answers(&bed, "picky", (VIP_WEB, L4_PORT), 8, &[]);
    assert!(
        got.keys().all(|k| k == "web-a" || k == "0/7"),
        "picky -> web:{L4_PORT}: only web-a answers, other picks fail with EPERM: {got:?}"
    );
    let got = answers(&bed, "picky", (VIP_WEB, L7_PORT), 8, &[]);
    assert_eq!(
        got,
        BTreeMap::from([("web-a".to_owned(), 8)]),
        "picky -> web:{L7_PORT}: the proxy skips the endpoint policy denies"
    );
    let l4 = l4_connect(&bed, "picky", VIP_SECURE, 2);
    assert_eq!(l4.connect_errno_first.as_deref(), Some("EPERM"), "{l4:?}");
}

/// Sets its flag when dropped (also while unwinding).
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// (c): requests through an L7 Service never fail while the proxy is hot-restarted and
/// the agent restarted; the proxy serves on while the agent is SIGKILLed, follows the
/// next agent's route change; the agent stays healthy while the proxy is SIGKILLed.
#[test]
fn proxy_and_agent_restarts_fail_no_request() {
    if !require_root() {
        return;
    }
    // --keep-datapath: a stopped agent leaves its programs for the next one to adopt,
    // as an upgrade does.
    const AGENT_ARGS: &[&str] = &["--keep-datapath"];
    let mut bed = Bed::new("l7life", &[("route.yaml", &route(1, 1))], AGENT_ARGS);
    let Bed {
        proxies,
        agents,
        state,
        cluster,
        ..
    } = &mut bed;
    let cluster: &Cluster = cluster;
    let n1 = cluster.node("n1");
    let url = format!("http://{VIP_WEB}:{L7_PORT}/who");

    // Two clients loop (a new curl, so a new connection, per request) while the proxy
    // on n1 is replaced and then the agent on n1 is restarted. Bounded: at most
    // MAX_PER_WORKER requests each, and LOOP_DEADLINE.
    const WORKERS: usize = 2;
    const MAX_PER_WORKER: u32 = 400;
    const LOOP_DEADLINE: Duration = Duration::from_secs(180);
    const BETWEEN_EVENTS: u32 = 20;
    const MIN_REQUESTS: u32 = 300;
    let done = AtomicU32::new(0);
    let stop = AtomicBool::new(false);
    let failures = Mutex::new(Vec::<CurlResult>::new());
    let start = Instant::now();
    let wait_for_requests = |n: u32| {
        let target = done.load(Ordering::Relaxed) + n;
        assert_eventually!(
            done.load(Ordering::Relaxed) >= target,
            Duration::from_secs(60),
            "the request loop stalled"
        );
    };
    std::thread::scope(|scope| {
        // A failed step stops the workers too, instead of leaving them to their bound.
        let _stop = StopOnDrop(&stop);
        for _ in 0..WORKERS {
            scope.spawn(|| {
                let curl = Curl::new(url.as_str());
                for _ in 0..MAX_PER_WORKER {
                    if stop.load(Ordering::Relaxed) || start.elapsed() > LOOP_DEADLINE {
                        break;
                    }
                    let r = curl.run(cluster.pod("client")).unwrap();
                    if r.http_code != 200 {
                        failures.lock().unwrap().push(r);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        wait_for_requests(BETWEEN_EVENTS);
        let old = proxies[0].pid();
        let predecessor = proxies[0].hot_restart(n1).unwrap();
        assert!(
            predecessor.success(),
            "the old proxy drained and exited: {predecessor}"
        );
        assert_ne!(proxies[0].pid(), old);
        wait_for_requests(BETWEEN_EVENTS);
        let (status, datapath) = agents[0].take().unwrap().stop_leaving_datapath().unwrap();
        assert!(status.success(), "agent stopped: {status}");
        agents[0] = Some(datapath.adopt(n1, state.path(), AGENT_ARGS).unwrap());
        let left = MIN_REQUESTS.saturating_sub(done.load(Ordering::Relaxed));
        wait_for_requests(left.max(BETWEEN_EVENTS));
        stop.store(true, Ordering::Relaxed);
    });
    let total = done.load(Ordering::Relaxed);
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} requests failed across the proxy takeover and the agent restart: {failures:?}\nproxy log:\n{}",
        failures.len(),
        proxies[0].log()
    );
    assert!(total >= MIN_REQUESTS, "{total} requests");
    assert!(
        proxies[0]
            .metrics_parsed()
            .unwrap()
            .sum("istio_requests_total", &[])
            > 0.0,
        "the successor proxy served requests"
    );

    // SIGKILL the agent: the proxy keeps serving its last configuration.
    let datapath = agents[0].take().unwrap().kill();
    let outcomes =
        l7::request_loop(cluster.pod("client"), &url, 10, Duration::from_secs(60)).unwrap();
    assert!(
        outcomes.len() == 10 && outcomes.iter().all(|o| o.http_code == 200),
        "without an agent: {:?}",
        l7::tally(&outcomes)
    );
    // A new agent comes; the proxy follows its route change (all of web to web-b).
    agents[0] = Some(datapath.adopt(n1, state.path(), AGENT_ARGS).unwrap());
    state.write("route.yaml", &route(0, 1)).unwrap();
    let mut last = Vec::new();
    assert_eventually!(
        {
            last =
                l7::request_loop(cluster.pod("client"), &url, 6, Duration::from_secs(30)).unwrap();
            l7::tally(&last).get("web-b") == Some(&6)
        },
        CONVERGE,
        "the proxy never followed the new agent's route: last {:?}\nproxy log:\n{}",
        l7::tally(&last),
        proxies[0].log()
    );

    // SIGKILL the proxy: the agent stays healthy and keeps applying; L4 works, L7 is
    // refused until a new proxy comes.
    proxies[0].kill();
    let agent = agents[0].as_ref().unwrap();
    let applied = agent.applied_count();
    state.write("route.yaml", &route(1, 1)).unwrap();
    assert_eventually!(
        agent.applied_count() > applied,
        CONVERGE,
        "the agent applies state without a proxy:\n{}",
        agent.log()
    );
    let status = agent.admin_status().unwrap();
    assert!(status.ready && status.last_reconcile_ok, "{status:?}");
    let l4 = Curl::new(format!("http://{VIP_WEB}:{L4_PORT}/who"))
        .run(cluster.pod("client"))
        .unwrap();
    assert_eq!(l4.http_code, 200, "L4 without a proxy: {l4:?}");
    let l7 = Curl::new(url.as_str()).run(cluster.pod("client")).unwrap();
    assert_eq!(
        (l7.http_code, l7.exit_code),
        (0, 7),
        "L7 without a proxy: {l7:?}"
    );
    proxies[0].restart(n1).unwrap();
    let outcomes =
        l7::request_loop(cluster.pod("client"), &url, 10, Duration::from_secs(60)).unwrap();
    assert!(
        outcomes.iter().all(|o| o.http_code == 200) && outcomes.len() == 10,
        "with a new proxy: {:?}",
        l7::tally(&outcomes)
    );
}
