//! L7 traffic management end to end (root only): client pods curl Service VIPs, connect4
//! redirects them to the real `mesh-proxy` listening in the client pod, which routes by
//! the agent's compiled HTTPRoutes and forwards to `mesh-testpod http-server` /
//! `grpc-server` backends on both nodes. Every assertion is what a client or a backend
//! observes (answers, echoed requests, `/stats`), or the proxy's own metrics.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use mesh_tests::l7::{self, Curl, CurlResult, GrpcResult, HttpEcho, HttpStats};
use mesh_tests::scenario::{Bed, CONVERGE, PodDef, host, pod};
use mesh_tests::{Agent, ChildGuard, Pod, Proxy, eventually, require_root};

const HTTP_PORT: u16 = 8080;
const GRPC_PORT: u16 = 9090;
/// `grpc-server --flap-ms` on v3-a: its service (`v3-a`) changes status all the time.
const FLAP_PORT: u16 = 9091;
/// `http-server --fail-every 2` on v3-a: every second request answers 503.
const FLAKY_PORT: u16 = 8081;
/// Backend pods: `(name, app label)`; each runs http-server on [`HTTP_PORT`].
const BACKENDS: &[(&str, &str)] = &[
    ("v1-a", "v1"),
    ("v1-b", "v1"),
    ("v2-a", "v2"),
    ("v2-b", "v2"),
    ("v3-a", "v3"),
    ("mirror-a", "mirror"),
];
/// No container ports: the bed must not start its own `serve` in them; the pods run
/// http-server (and grpc-server) instead, started by [`Mesh::new`].
const PODS: &[PodDef] = &[
    pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
    pod("n1", "prod", "v1-a", "10.244.1.11", "app: v1", &[]),
    pod("n1", "prod", "v2-a", "10.244.1.12", "app: v2", &[]),
    pod("n1", "prod", "v3-a", "10.244.1.13", "app: v3", &[]),
    pod("n1", "prod", "mirror-a", "10.244.1.14", "app: mirror", &[]),
    pod("n2", "prod", "client2", "10.244.2.10", "app: client2", &[]),
    pod("n2", "prod", "v1-b", "10.244.2.11", "app: v1", &[]),
    pod("n2", "prod", "v2-b", "10.244.2.12", "app: v2", &[]),
    // Not in the state until a test adds it (see [`LATE_POD`]).
    host("n1", "late", "10.244.1.20", &[]),
];
/// Pod `late` as the state describes it, once it is added.
const LATE_POD: &str = "apiVersion: v1
kind: Pod
metadata: {name: late, namespace: prod, labels: {app: late}}
spec: {nodeName: NODE, containers: [{name: main, image: mesh-testpod}]}
status: {podIP: 10.244.1.20}
";

const WEB: &str = "10.96.0.10";
const ROUTED: &str = "10.96.0.20";
const CANARY: &str = "10.96.0.21";
const FILTERS: &str = "10.96.0.22";
const V3: &str = "10.96.0.13";
/// How long the first request may take to work (agents and proxies converging).
const READY: Duration = Duration::from_secs(30);

/// Services: `web` (appProtocol http and grpc, no route) and the route parents
/// `routed`, `canary`, `filters` (L7 because a route is attached) over `v1`; and the
/// backend Services `v1`, `v2`, `v3`, `mirror`.
fn services() -> String {
    let mut yaml = format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: prod}}
spec:
  clusterIP: {WEB}
  selector: {{app: v1}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}, appProtocol: http}}
  - {{name: grpc, port: {GRPC_PORT}, targetPort: {GRPC_PORT}, appProtocol: grpc}}
"
    );
    for (name, ip, app) in [
        ("routed", ROUTED, "v1"),
        ("canary", CANARY, "v1"),
        ("filters", FILTERS, "v1"),
        ("v1", "10.96.0.11", "v1"),
        ("v2", "10.96.0.12", "v2"),
        ("mirror", "10.96.0.14", "mirror"),
        // Last: the gRPC port below is appended to it.
        ("v3", V3, "v3"),
    ] {
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: prod}}
spec:
  clusterIP: {ip}
  selector: {{app: {app}}}
  ports:
  - {{name: http, port: 80, targetPort: {HTTP_PORT}}}
"
        ));
    }
    // v3 also streams gRPC health changes, and has a flaky HTTP port.
    yaml.push_str(&format!(
        "  - {{name: grpc, port: {FLAP_PORT}, targetPort: {FLAP_PORT}, appProtocol: grpc}}
  - {{name: flaky, port: {FLAKY_PORT}, targetPort: {FLAKY_PORT}, appProtocol: http}}
"
    ));
    yaml
}

/// An HTTPRoute `name` on Service `parent` port 80, created at `created`, with `rules`
/// (a YAML block sequence indented by two spaces).
fn route(name: &str, parent: &str, created: &str, rules: &str) -> String {
    format!(
        "---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: prod, creationTimestamp: '{created}'}}
spec:
  parentRefs: [{{group: '', kind: Service, name: {parent}, port: 80}}]
  rules:
{rules}"
    )
}

/// `backendRefs` to Service `to` port 80.
fn to(service: &str) -> String {
    format!("backendRefs: [{{name: {service}, port: 80}}]")
}

/// The matching routes on `routed`: `routed-a` (older) and `routed-b` (newer), merged.
fn matching_routes() -> String {
    let a = route(
        "routed-a",
        "routed",
        "2024-01-01T00:00:00Z",
        &format!(
            "  - matches: [{{path: {{type: Exact, value: /exact}}}}]
    {v2}
  - matches: [{{path: {{type: PathPrefix, value: /prefix}}}}]
    {v3}
  - matches: [{{path: {{type: RegularExpression, value: '/re/[0-9]+'}}}}]
    {v2}
  - matches: [{{headers: [{{name: x-variant, value: two}}]}}]
    {v2}
  - matches: [{{headers: [{{type: RegularExpression, name: x-user, value: 'admin-[a-z]+'}}]}}]
    {v3}
  - matches: [{{queryParams: [{{name: canary, value: 'yes'}}]}}]
    {v2}
  - matches: [{{method: DELETE}}]
    {v3}
  - matches: [{{path: {{type: PathPrefix, value: /v1}}}}]
    {v1}
  - matches: [{{path: {{type: Exact, value: /tie}}}}]
    {v1}
",
            v1 = to("v1"),
            v2 = to("v2"),
            v3 = to("v3")
        ),
    );
    let b = route(
        "routed-b",
        "routed",
        "2024-06-01T00:00:00Z",
        &format!(
            "  - matches: [{{path: {{type: Exact, value: /tie}}}}]
    {v2}
  - matches: [{{path: {{type: PathPrefix, value: /b}}}}]
    {v3}
",
            v2 = to("v2"),
            v3 = to("v3")
        ),
    );
    a + &b
}

/// The filter and timeout rules on `filters`.
fn filter_routes() -> String {
    route(
        "filters",
        "filters",
        "2024-01-01T00:00:00Z",
        &format!(
            "  - matches: [{{path: {{type: PathPrefix, value: /headers}}}}]
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set: [{{name: x-set, value: set-by-route}}]
        add: [{{name: x-add, value: added}}]
        remove: [x-remove]
    - type: ResponseHeaderModifier
      responseHeaderModifier:
        set: [{{name: x-resp, value: from-route}}]
        remove: [x-pod]
    {v1}
  - matches: [{{path: {{type: PathPrefix, value: /redirect}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect:
        hostname: example.org
        statusCode: 301
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}
  - matches: [{{path: {{type: PathPrefix, value: /found}}}}]
    filters:
    - type: RequestRedirect
      requestRedirect: {{hostname: elsewhere.example}}
  - matches: [{{path: {{type: PathPrefix, value: /old}}}}]
    filters:
    - type: URLRewrite
      urlRewrite:
        hostname: rewritten.example
        path: {{type: ReplacePrefixMatch, replacePrefixMatch: /new}}
    {v1}
  - matches: [{{path: {{type: Exact, value: /full}}}}]
    filters:
    - type: URLRewrite
      urlRewrite: {{path: {{type: ReplaceFullPath, replaceFullPath: /replaced}}}}
    {v1}
  - matches: [{{path: {{type: PathPrefix, value: /mirrored}}}}]
    filters:
    - type: RequestMirror
      requestMirror: {{backendRef: {{name: mirror, port: 80}}}}
    {v1}
  - matches: [{{path: {{type: Exact, value: /delay/3000}}}}]
    timeouts: {{request: 500ms}}
    {v1}
  - matches: [{{path: {{type: PathPrefix, value: /retried}}}}]
    retry: {{codes: [503], attempts: 1}}
    backendRefs: [{{name: v3, port: {FLAKY_PORT}}}]
  - matches: [{{path: {{type: PathPrefix, value: /flaky}}}}]
    backendRefs: [{{name: v3, port: {FLAKY_PORT}}}]
  - matches: [{{path: {{type: Exact, value: /delay/3000}}, queryParams: [{{name: t, value: backend}}]}}]
    timeouts: {{backendRequest: 500ms}}
    {v1}
",
            v1 = to("v1")
        ),
    )
}

/// The canary route on `canary`: `/` split `v1`:`v2`:`v3` by `weights`, `/broken`
/// half to `v1`, half to a Service that does not exist.
fn canary_route(weights: [u32; 3]) -> String {
    let [w1, w2, w3] = weights;
    route(
        "canary",
        "canary",
        "2024-01-01T00:00:00Z",
        &format!(
            "  - backendRefs:
    - {{name: v1, port: 80, weight: {w1}}}
    - {{name: v2, port: 80, weight: {w2}}}
    - {{name: v3, port: 80, weight: {w3}}}
  - matches: [{{path: {{type: PathPrefix, value: /broken}}}}]
    backendRefs:
    - {{name: v1, port: 80, weight: 50}}
    - {{name: gone, port: 80, weight: 50}}
"
        ),
    )
}

/// Two nodes, an agent and a node proxy on each, the backends serving.
struct Mesh {
    // Field order is drop order: proxies, agents, servers, then the bed.
    proxies: Vec<Proxy>,
    agents: Vec<Agent>,
    _servers: Vec<ChildGuard>,
    bed: Bed,
}

impl Mesh {
    fn new(prefix: &str, agent_args: &[&str]) -> Result<Self> {
        let mut bed = Bed::new(prefix, &["n1", "n2"], PODS)?;
        let mut servers = Vec::new();
        for (name, _) in BACKENDS {
            servers.push(l7::start_http_server(bed.pod(name), HTTP_PORT, name, &[])?);
        }
        for name in ["v1-a", "v1-b"] {
            servers.push(l7::start_grpc_server(bed.pod(name), GRPC_PORT, name, &[])?);
        }
        servers.push(l7::start_http_server(
            bed.pod("v3-a"),
            FLAKY_PORT,
            "v3-a",
            &["--fail-every", "2"],
        )?);
        servers.push(l7::start_grpc_server(
            bed.pod("v3-a"),
            FLAP_PORT,
            "v3-a",
            &["--flap-ms", "200"],
        )?);
        // The clients have no server: anchor them so the agents find their netns.
        bed.anchor_idle_pods()?;
        bed.state.write("pods.yaml", &bed.pods_yaml())?;
        bed.state.write("services.yaml", &services())?;
        bed.state.write("routed.yaml", &matching_routes())?;
        bed.state.write("filters.yaml", &filter_routes())?;
        bed.state.write("canary.yaml", &canary_route([90, 10, 0]))?;
        let agents = vec![
            bed.start_agent("n1", agent_args)?,
            bed.start_agent("n2", agent_args)?,
        ];
        let proxies = vec![bed.start_proxy("n1", &[])?, bed.start_proxy("n2", &[])?];
        let mesh = Self {
            proxies,
            agents,
            _servers: servers,
            bed,
        };
        for client in ["client", "client2"] {
            mesh.wait_ok(client, &format!("http://{WEB}/ready"));
        }
        Ok(mesh)
    }

    fn pod(&self, name: &str) -> &Pod {
        self.bed.pod(name)
    }

    /// Waits until `GET url` from `client` answers 200 (the agent and proxy converged).
    fn wait_ok(&self, client: &str, url: &str) {
        let mut last = None;
        let ok = eventually(READY, || {
            let r = Curl::new(url)
                .max_time(Duration::from_secs(2))
                .run(self.pod(client));
            let ok = matches!(&r, Ok(r) if r.http_code == 200);
            last = Some(r);
            ok
        });
        assert!(ok, "{client} → {url}: last {last:?}\n{}", self.logs());
    }

    /// Every agent's and proxy's log, for failure messages.
    fn logs(&self) -> String {
        let mut out = String::new();
        for a in &self.agents {
            out.push_str(&format!("--- agent {} ---\n{}\n", a.pin_name(), a.log()));
        }
        for (i, p) in self.proxies.iter().enumerate() {
            out.push_str(&format!("--- proxy n{} ---\n{}\n", i + 1, p.log()));
        }
        out
    }

    /// `curl` from `client`, with the logs in the error.
    fn curl(&self, client: &str, curl: Curl) -> CurlResult {
        curl.run(self.pod(client))
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.logs()))
    }

    /// `GET http://<vip><path>` from `client` with extra curl `args`; must answer 200
    /// with an echo, which is returned.
    fn echo(&self, client: &str, vip: &str, path: &str, args: &[&str]) -> HttpEcho {
        let r = self.curl(client, Curl::new(format!("http://{vip}{path}")).args(args));
        assert_eq!(
            (r.exit_code, r.http_code),
            (0, 200),
            "{path} {args:?}: {r:?}"
        );
        let echo: HttpEcho = r.json().unwrap();
        assert_eq!(r.header("x-pod"), Some(echo.pod.as_str()), "{r:?}");
        echo
    }

    /// `/stats` of backend `name`, asked directly (pod IP: L4, not proxied).
    fn stats(&self, name: &str) -> u64 {
        let url = format!("http://{}:{HTTP_PORT}/stats", self.bed.ip(name));
        let r = self.curl("client", Curl::new(url));
        r.json::<HttpStats>().unwrap().requests
    }
}

fn app_of_pod(pod: &str) -> String {
    BACKENDS
        .iter()
        .find(|(name, _)| *name == pod)
        .map_or_else(|| format!("?{pod}"), |(_, app)| (*app).to_owned())
}

/// One keep-alive curl fetching `url` `n` times: each answer's status, `x-pod` and
/// whether it opened a new connection.
fn burst(pod: &Pod, url: &str, n: usize, args: &[&str]) -> Result<Vec<(u16, String, u32)>> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "60"])
        .args(["-w", "%{http_code} %{num_connects} %header{x-pod}\\n"])
        .args(args);
    for _ in 0..n {
        cmd.args(["-o", "/dev/null", url]);
    }
    let out = pod.run_timeout(cmd, Duration::from_secs(70))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<(u16, String, u32)> = text
        .lines()
        .map(|l| {
            let mut f = l.split(' ');
            let code = f.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            let connects = f.next().and_then(|c| c.parse().ok()).unwrap_or(0);
            (code, f.next().unwrap_or("").to_owned(), connects)
        })
        .collect();
    ensure!(
        lines.len() == n,
        "curl {url} ×{n}: {} answers ({}): {text}\n{}",
        lines.len(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(lines)
}

/// Counts of answers by the app of the answering pod (`5xx`-style keys for failures).
fn by_app(answers: &[(u16, String, u32)]) -> BTreeMap<String, u32> {
    let mut counts = BTreeMap::new();
    for (code, pod, _) in answers {
        let key = if *code == 200 {
            app_of_pod(pod)
        } else {
            code.to_string()
        };
        *counts.entry(key).or_default() += 1;
    }
    counts
}

/// Sends `GET /upgrade` with `Upgrade: mesh-echo` over a raw connection (bash's
/// /dev/tcp in the client pod), then `ping` on the upgraded connection; returns what
/// came back (the 101 head and the echo).
fn upgrade(pod: &Pod, vip: &str) -> Result<String> {
    let script = format!(
        "exec 3<>/dev/tcp/{vip}/80
printf 'GET /upgrade HTTP/1.1\\r\\nHost: web\\r\\nConnection: upgrade\\r\\nUpgrade: mesh-echo\\r\\n\\r\\n' >&3
sleep 0.5
printf 'ping-through-the-proxy' >&3
timeout 2 cat <&3
true"
    );
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]);
    let out = pod.run_timeout(cmd, Duration::from_secs(10))?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Basics through the proxy, gRPC, matching and precedence, filters, timeouts and the
/// proxy's request metrics, on one bed.
#[test]
fn proxied_http_grpc_matching_filters_timeouts_and_metrics() {
    if !require_root() {
        return;
    }
    let mesh = Mesh::new("l7rt", &[]).expect("bed");
    basics(&mesh);
    grpc(&mesh);
    matching(&mesh);
    filters(&mesh);
    timeouts(&mesh);
    retries(&mesh);
    metrics(&mesh);
}

fn basics(mesh: &Mesh) {
    let url = format!("http://{WEB}/hello?x=1");
    // Host as sent, x-pod, peer: the backend sees the client pod's own address.
    let echo = mesh.echo("client", WEB, "/hello?x=1", &["-H", "Host: shop.example"]);
    assert!(["v1-a", "v1-b"].contains(&echo.pod.as_str()), "{echo:?}");
    assert_eq!(echo.header("host"), Some("shop.example"), "{echo:?}");
    assert_eq!((echo.path.as_str(), echo.query.as_str()), ("/hello", "x=1"));
    assert_eq!(echo.version, "HTTP/1.1");
    assert!(
        echo.peer
            .starts_with(&format!("{}:", mesh.bed.ip("client"))),
        "outbound sockets are the client pod's: {echo:?}"
    );
    // The n2 client through the n2 proxy.
    let echo2 = mesh.echo("client2", WEB, "/hello", &[]);
    assert!(echo2.peer.starts_with("10.244.2.10:"), "{echo2:?}");

    // Keep-alive: several requests on one connection all succeed.
    let answers = burst(mesh.pod("client"), &url, 5, &[]).unwrap();
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    let connects: u32 = answers.iter().map(|a| a.2).sum();
    assert_eq!(connects, 1, "one connection for all five: {answers:?}");

    // Many concurrent HTTP/1.1 connections. (curl 7.88 cannot reuse an h2c prior
    // knowledge connection, not even straight to a backend: the gRPC section below
    // covers many streams on one HTTP/2 connection.)
    let args = ["--parallel", "--parallel-max", "20"];
    let answers = burst(
        mesh.pod("client"),
        &format!("http://{WEB}/stream/3"),
        200,
        &args,
    )
    .unwrap();
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");

    // h2c prior knowledge: spoken to the backend as the client spoke.
    let h2 = mesh.curl("client", Curl::new(&url).h2c());
    assert_eq!(h2.http_code, 200, "{h2:?}");
    let echo: HttpEcho = h2.json().unwrap();
    assert_eq!(echo.version, "HTTP/2.0", "{echo:?}");
    assert_eq!(echo.authority.as_deref(), Some(WEB), "{echo:?}");

    // A chunked stream arrives whole; a 100 KiB body arrives intact.
    let stream = mesh.curl("client", Curl::new(format!("http://{WEB}/stream/5")));
    assert_eq!(stream.body.lines().count(), 5, "{stream:?}");
    let payload: String = (0..100 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    let file = std::env::temp_dir().join(format!("l7rt-body-{}", std::process::id()));
    std::fs::write(&file, &payload).unwrap();
    let posted = mesh.curl(
        "client",
        Curl::new(format!("http://{WEB}/echo"))
            .args(&["--data-binary".to_owned(), format!("@{}", file.display())]),
    );
    let posted_h2 = mesh.curl(
        "client",
        Curl::new(format!("http://{WEB}/echo"))
            .h2c()
            .args(&["--data-binary".to_owned(), format!("@{}", file.display())]),
    );
    let _ = std::fs::remove_file(&file);
    for (posted, how) in [(posted, "HTTP/1.1"), (posted_h2, "h2c")] {
        assert_eq!(posted.http_code, 200, "{how}: {}", posted.stderr);
        assert!(
            posted.body == payload,
            "{how}: body of {} bytes",
            posted.body.len()
        );
    }

    // Trace context: created when absent, its trace id kept when valid.
    let echo = mesh.echo("client", WEB, "/trace", &[]);
    let created = echo.header("traceparent").expect("traceparent created");
    assert_eq!(created.split('-').count(), 4, "{created}");
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let incoming = format!("traceparent: 00-{trace_id}-00f067aa0ba902b7-01");
    let echo = mesh.echo("client", WEB, "/trace", &["-H", &incoming]);
    let kept = echo.header("traceparent").expect("traceparent kept");
    assert_eq!(kept.split('-').nth(1), Some(trace_id), "{kept}");

    // Hop-by-hop headers stop at the proxy.
    let echo = mesh.echo(
        "client",
        WEB,
        "/hop",
        &[
            "-H",
            "Connection: x-foo",
            "-H",
            "x-foo: 1",
            "-H",
            "Keep-Alive: timeout=5",
            "-H",
            "x-kept: 1",
        ],
    );
    for gone in ["x-foo", "keep-alive", "connection"] {
        assert_eq!(
            echo.header(gone),
            None,
            "{gone} reached the backend: {echo:?}"
        );
    }
    assert_eq!(echo.header("x-kept"), Some("1"));

    // Upgrade: 101 passes through and the connection then echoes raw bytes.
    let upgraded = upgrade(mesh.pod("client"), WEB).unwrap();
    assert!(upgraded.starts_with("HTTP/1.1 101"), "{upgraded:?}");
    assert!(upgraded.contains("ping-through-the-proxy"), "{upgraded:?}");
}

fn grpc(mesh: &Mesh) {
    let target = format!("{WEB}:{GRPC_PORT}");
    let client = mesh.pod("client");
    // 50 calls, one after the other on one HTTP/2 connection.
    let checked = l7::grpc(client, &target, &["--call", "check", "--count", "50"]).unwrap();
    assert_eq!(checked.len(), 50, "{checked:?}");
    assert!(
        checked
            .iter()
            .all(|r| r.ok && r.status.as_deref() == Some("SERVING")),
        "{checked:?}"
    );
    let unknown = l7::grpc(client, &target, &["--call", "check", "--service", "nope"]).unwrap();
    assert!(
        matches!(
            unknown.as_slice(),
            [GrpcResult {
                ok: false,
                code: Some(5),
                ..
            }]
        ),
        "NOT_FOUND passes through: {unknown:?}"
    );
    let watched = l7::grpc(client, &target, &["--call", "watch", "--count", "1"]).unwrap();
    assert!(
        matches!(watched.as_slice(), [GrpcResult { ok: true, .. }]),
        "{watched:?}"
    );
    // A stream of changes passes through message by message.
    let flapping = format!("{V3}:{FLAP_PORT}");
    let stream = l7::grpc(
        client,
        &flapping,
        &["--call", "watch", "--service", "v3-a", "--count", "4"],
    )
    .unwrap();
    assert_eq!(stream.len(), 4, "{stream:?}");
    assert!(stream.iter().all(|r| r.ok), "{stream:?}");
}

fn matching(mesh: &Mesh) {
    let cases: &[(&str, &[&str], &str)] = &[
        ("/exact", &[], "v2"),
        ("/exact/more", &[], "404"),
        ("/prefix", &[], "v3"),
        ("/prefix/deeper", &[], "v3"),
        ("/prefixes", &[], "404"),
        ("/re/42", &[], "v2"),
        ("/re/x", &[], "404"),
        ("/any", &["-H", "x-variant: two"], "v2"),
        ("/any", &["-H", "x-variant: three"], "404"),
        ("/any", &["-H", "x-user: admin-bob"], "v3"),
        ("/any", &["-H", "x-user: admin-42"], "404"),
        ("/any?canary=yes", &[], "v2"),
        ("/any?canary=no", &[], "404"),
        ("/any", &["-X", "DELETE"], "v3"),
        ("/v1/x", &[], "v1"),
        // The longer prefix beats a header match on `/`.
        ("/prefix/x", &["-H", "x-variant: two"], "v3"),
        // Two routes with the same match: the older (routed-a) wins.
        ("/tie", &[], "v1"),
        // The newer route's own rules are merged in.
        ("/b/c", &[], "v3"),
        ("/nothing", &[], "404"),
    ];
    let mut wrong = Vec::new();
    // Both protocols of an `http` port, and the other node's proxy.
    let clients = [("client", false), ("client", true), ("client2", false)];
    for (path, args, want) in cases {
        for (client, h2c) in clients {
            let mut curl = Curl::new(format!("http://{ROUTED}{path}")).args(args);
            if h2c {
                curl = curl.h2c();
            }
            let r = mesh.curl(client, curl);
            let got = match r.http_code {
                200 => app_of_pod(r.header("x-pod").unwrap_or("")),
                code => code.to_string(),
            };
            if got != *want {
                wrong.push(format!(
                    "{client} h2c={h2c} {path} {args:?}: want {want}, got {got} ({r:?})"
                ));
            }
        }
    }
    assert!(wrong.is_empty(), "{}\n{}", wrong.join("\n"), mesh.logs());
}

fn filters(mesh: &Mesh) {
    // Request and response header modifiers.
    let r = mesh.curl(
        "client",
        Curl::new(format!("http://{FILTERS}/headers")).args(&[
            "-H",
            "x-set: from-client",
            "-H",
            "x-add: mine",
            "-H",
            "x-remove: 1",
        ]),
    );
    assert_eq!(r.http_code, 200, "{r:?}");
    let echo: HttpEcho = r.json().unwrap();
    assert_eq!(
        echo.headers.get("x-set").cloned(),
        Some(vec!["set-by-route".into()])
    );
    assert_eq!(
        echo.headers.get("x-add").cloned(),
        Some(vec!["mine".into(), "added".into()])
    );
    assert_eq!(echo.header("x-remove"), None, "{echo:?}");
    assert_eq!(r.header("x-resp"), Some("from-route"), "{r:?}");
    assert_eq!(r.header("x-pod"), None, "removed from the response: {r:?}");

    // Redirects: 301 with a new host and prefix, 302 by default.
    let r = mesh.curl(
        "client",
        Curl::new(format!("http://{FILTERS}/redirect/x?q=1")),
    );
    assert_eq!(r.http_code, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("http://example.org/new/x?q=1"));
    let r = mesh.curl("client", Curl::new(format!("http://{FILTERS}/found")));
    assert_eq!(r.http_code, 302, "{r:?}");
    assert_eq!(r.header("location"), Some("http://elsewhere.example/found"));

    // Rewrites: host and prefix, full path (query kept).
    let echo = mesh.echo("client", FILTERS, "/old/page?q=1", &[]);
    assert_eq!(
        (echo.path.as_str(), echo.query.as_str(), echo.header("host")),
        ("/new/page", "q=1", Some("rewritten.example")),
        "{echo:?}"
    );
    let echo = mesh.echo("client", FILTERS, "/full?q=2", &[]);
    assert_eq!(
        (echo.path.as_str(), echo.query.as_str()),
        ("/replaced", "q=2")
    );
    // The same over h2c, where the host is the `:authority`.
    let r = mesh.curl(
        "client",
        Curl::new(format!("http://{FILTERS}/old/page?q=1")).h2c(),
    );
    let echo: HttpEcho = r.json().unwrap();
    assert_eq!(
        (
            echo.version.as_str(),
            echo.path.as_str(),
            echo.authority.as_deref()
        ),
        ("HTTP/2.0", "/new/page", Some("rewritten.example")),
        "{echo:?}"
    );
    let r = mesh.curl(
        "client",
        Curl::new(format!("http://{FILTERS}/redirect/x")).h2c(),
    );
    assert_eq!(r.http_code, 301, "{r:?}");
    assert_eq!(r.header("location"), Some("http://example.org/new/x"));
    let r = mesh.curl("client", Curl::new(format!("http://{FILTERS}/found")).h2c());
    assert_eq!(r.header("location"), Some("http://elsewhere.example/found"));
    let r = mesh.curl(
        "client",
        Curl::new(format!("http://{FILTERS}/headers")).h2c(),
    );
    assert_eq!(
        (r.http_code, r.header("x-resp"), r.header("x-pod")),
        (200, Some("from-route"), None),
        "{r:?}"
    );

    // Mirror: the mirror backend gets a copy of each request, the client the primary's.
    let before = mesh.stats("mirror-a");
    let answers = burst(
        mesh.pod("client"),
        &format!("http://{FILTERS}/mirrored"),
        5,
        &[],
    )
    .unwrap();
    assert!(
        answers
            .iter()
            .all(|(code, pod, _)| *code == 200 && app_of_pod(pod) == "v1"),
        "{answers:?}"
    );
    let mut after = before;
    // Mirrors are fire and forget: they may land just after the answers.
    eventually(Duration::from_secs(5), || {
        after = mesh.stats("mirror-a");
        after >= before + 5
    });
    assert_eq!(after - before, 5, "mirrored requests");
}

fn timeouts(mesh: &Mesh) {
    for (query, h2c) in [("", false), ("?t=backend", false), ("", true)] {
        let started = Instant::now();
        let mut curl = Curl::new(format!("http://{FILTERS}/delay/3000{query}"));
        if h2c {
            curl = curl.h2c();
        }
        let r = mesh.curl("client", curl);
        let took = started.elapsed();
        assert_eq!(r.http_code, 504, "{query}: {r:?}");
        assert!(took < Duration::from_millis(2500), "{query}: {took:?}");
    }
}

/// A 503 is retried once when the rule says so (the flaky backend fails every second
/// request), and passed through when it does not.
fn retries(mesh: &Mesh) {
    let client = mesh.pod("client");
    let plain = burst(client, &format!("http://{FILTERS}/flaky"), 10, &[]).unwrap();
    let failed = plain.iter().filter(|a| a.0 == 503).count();
    assert!((4..=6).contains(&failed), "every second fails: {plain:?}");
    let retried = burst(client, &format!("http://{FILTERS}/retried"), 10, &[]).unwrap();
    assert!(retried.iter().all(|a| a.0 == 200), "{retried:?}");
}

fn metrics(mesh: &Mesh) {
    const N: usize = 7;
    let proxy = &mesh.proxies[0];
    let web = [
        ("reporter", "source"),
        ("destination_service", "web.prod.svc.cluster.local"),
        ("source_workload", "client"),
        ("destination_workload", "v1"),
        ("response_code", "200"),
    ];
    let routed_404 = [
        ("reporter", "source"),
        ("destination_service", "routed.prod.svc.cluster.local"),
        ("source_workload", "client"),
        ("response_code", "404"),
        ("response_flags", "NR"),
    ];
    let before = proxy.metrics_parsed().unwrap();
    let answers = burst(mesh.pod("client"), &format!("http://{WEB}/counted"), N, &[]).unwrap();
    assert!(answers.iter().all(|a| a.0 == 200), "{answers:?}");
    let misses = burst(
        mesh.pod("client"),
        &format!("http://{ROUTED}/nothing"),
        3,
        &[],
    )
    .unwrap();
    assert!(misses.iter().all(|a| a.0 == 404), "{misses:?}");
    let after = proxy.metrics_parsed().unwrap();
    let delta =
        |name: &str, labels: &[(&str, &str)]| after.sum(name, labels) - before.sum(name, labels);
    assert_eq!(delta("istio_requests_total", &web), N as f64, "{after:?}");
    assert_eq!(
        delta("istio_request_duration_milliseconds_count", &web),
        N as f64
    );
    assert_eq!(delta("istio_requests_total", &routed_404), 3.0, "{after:?}");

    // gRPC: HTTP 200 with the grpc-status of the trailer.
    let grpc_not_found = [
        ("reporter", "source"),
        ("destination_service", "web.prod.svc.cluster.local"),
        ("request_protocol", "grpc"),
        ("response_code", "200"),
        ("grpc_response_status", "5"),
    ];
    let before = proxy.metrics_parsed().unwrap();
    let target = format!("{WEB}:{GRPC_PORT}");
    let args = ["--call", "check", "--service", "nope", "--count", "2"];
    let unknown = l7::grpc(mesh.pod("client"), &target, &args).unwrap();
    assert!(unknown.iter().all(|r| r.code == Some(5)), "{unknown:?}");
    let after = proxy.metrics_parsed().unwrap();
    let delta = after.sum("istio_requests_total", &grpc_not_found)
        - before.sum("istio_requests_total", &grpc_not_found);
    assert_eq!(delta, 2.0, "{after:?}");
}

/// Weighted splits, unresolvable backends, and route changes the agent streams to the
/// running proxy (and an invalid one it refuses).
#[test]
fn canary_weights_missing_backends_and_live_route_updates() {
    if !require_root() {
        return;
    }
    let mut mesh = Mesh::new("l7cn", &[]).expect("bed");
    let client = mesh.bed.cluster.pod("client");
    let url = format!("http://{CANARY}/");

    // 90/10 (and 0): 1000 requests over 4 keep-alive connections.
    let started = Instant::now();
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.extend(burst(client, &url, 250, &[]).unwrap());
        if started.elapsed() > Duration::from_secs(60) {
            break;
        }
    }
    let counts = by_app(&answers);
    eprintln!("canary split after {:?}: {counts:?}", started.elapsed());
    let total = answers.len() as f64;
    let v2 = f64::from(counts.get("v2").copied().unwrap_or(0));
    let v1 = f64::from(counts.get("v1").copied().unwrap_or(0));
    assert_eq!(v1 + v2, total, "only v1 and v2 answer: {counts:?}");
    // σ of a 10% share over 1000 is 0.95 points: ±4.5 points is almost 5σ.
    assert!(
        (v2 / total - 0.10).abs() < 0.045,
        "v2 share {:.3} over {total}: {counts:?}",
        v2 / total
    );

    // Half the weight on a missing Service: its share is answered 500.
    let broken = burst(client, &format!("http://{CANARY}/broken"), 200, &[]).unwrap();
    let counts = by_app(&broken);
    eprintln!("half to a missing Service: {counts:?}");
    let errors = f64::from(counts.get("500").copied().unwrap_or(0));
    let ok = f64::from(counts.get("v1").copied().unwrap_or(0));
    assert_eq!(ok + errors, 200.0, "{counts:?}");
    // σ of a 50% share over 200 is 3.5 points: ±17.5 points is 5σ.
    assert!((errors / 200.0 - 0.5).abs() < 0.175, "{counts:?}");
    let out = mesh.agents[0]
        .cli(&[
            "routes",
            "--node",
            mesh.agents[0].pin_name(),
            "--service",
            "prod/canary",
        ])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with("ResolvedRefs"))
        .unwrap_or_else(|| panic!("no ResolvedRefs in {text}"));
    assert!(
        line.contains("False") && line.contains("BackendNotFound"),
        "{text}"
    );

    // A new split in the state files: the proxy follows, nothing restarts.
    let version = |p: &Proxy| {
        p.metrics_parsed()
            .unwrap()
            .get("mesh_proxy_config_version", &[])
            .unwrap()
            .unwrap_or(0.0)
    };
    let pid = mesh.proxies[0].pid();
    let v_before = version(&mesh.proxies[0]);
    mesh.bed
        .apply(&mesh.agents[0], "canary.yaml", &canary_route([0, 0, 100]))
        .unwrap();
    let mut last = BTreeMap::new();
    let followed = eventually(CONVERGE, || {
        last = by_app(&burst(client, &url, 20, &[]).unwrap());
        last.keys().eq(["v3"])
    });
    assert!(
        followed,
        "all to v3 after the update: {last:?}\n{}",
        mesh.logs()
    );
    assert!(version(&mesh.proxies[0]) > v_before);
    assert_eq!(mesh.proxies[0].pid(), pid, "the proxy was not restarted");
    assert!(
        mesh.proxies[0].log().contains("configuration applied"),
        "{}",
        mesh.proxies[0].log()
    );

    // An invalid route file is refused, naming it; the last good routes stay.
    let invalid = canary_route([0, 0, 100]).replace("weight: 100", "weight: -3");
    mesh.bed.state.write("canary.yaml", &invalid).unwrap();
    let named = eventually(CONVERGE, || {
        let log = mesh.agents[0].log();
        log.lines().any(|l| {
            l.contains("state rejected")
                && l.contains("canary.yaml")
                && l.contains("document 1")
                && l.contains("backendRefs[2].weight")
        })
    });
    assert!(named, "{}", mesh.agents[0].log());
    let out = mesh.agents[0]
        .cli(&["validate", &mesh.bed.state.path().display().to_string()])
        .unwrap();
    let said =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains("canary.yaml") && said.contains("weight"),
        "validate names file and field: {said}"
    );
    let still = by_app(&burst(client, &url, 20, &[]).unwrap());
    assert_eq!(still.keys().collect::<Vec<_>>(), ["v3"], "{still:?}");

    // The agent dies: the proxy keeps serving its last configuration, and follows the
    // agent that takes over (its versions start again from 1).
    let pinned = mesh.agents.remove(0).kill();
    let still = by_app(&burst(client, &url, 20, &[]).unwrap());
    assert_eq!(still.keys().collect::<Vec<_>>(), ["v3"], "{still:?}");
    mesh.bed
        .state
        .write("canary.yaml", &canary_route([100, 0, 0]))
        .unwrap();
    let agent = pinned
        .adopt(mesh.bed.cluster.node("n1"), mesh.bed.state.path(), &[])
        .unwrap();
    mesh.agents.insert(0, agent);
    let followed = eventually(CONVERGE, || {
        last = by_app(&burst(client, &url, 20, &[]).unwrap());
        last.keys().eq(["v1"])
    });
    assert!(
        followed,
        "all to v1 from the new agent: {last:?}\n{}",
        mesh.logs()
    );

    // A pod the agent learns of later gets the proxy's listener then: until it is in
    // the state, its L7 connections are refused in its own netns.
    let late = mesh.bed.cluster.pod("late");
    let refused = Curl::new(format!("http://{WEB}/")).run(late).unwrap();
    assert_eq!(refused.exit_code, 7, "no listener yet: {refused:?}");
    let node = mesh_tests::agent::node_name(mesh.bed.cluster.node("n1"));
    mesh.bed
        .state
        .write("late.yaml", &LATE_POD.replace("NODE", &node))
        .unwrap();
    mesh.wait_ok("late", &format!("http://{WEB}/late"));

    // The proxy's outbound sockets are the client pod's: its egress policy judges
    // them (when they are made: `late` has no pooled backend connection to v2 yet).
    // Allowed to v1 only, it reaches v1 through a route and is reset (never answered
    // by v2) where the route leads to v2.
    let policy = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: late-to-v1, namespace: prod}
spec:
  podSelector: {matchLabels: {app: late}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: v1}}}]}]
";
    mesh.bed
        .apply(&mesh.agents[0], "policy.yaml", policy)
        .unwrap();
    let mut denied = None;
    let enforced = eventually(CONVERGE, || {
        let r = Curl::new(format!("http://{ROUTED}/exact"))
            .run(late)
            .unwrap();
        let held = r.http_code != 200;
        denied = Some(r);
        held
    });
    assert!(enforced, "v2 still answers: {denied:?}\n{}", mesh.logs());
    let denied = denied.unwrap();
    assert!(
        denied.http_code == 0 && denied.header("x-pod").is_none(),
        "the client is reset, not answered: {denied:?}"
    );
    let allowed = Curl::new(format!("http://{ROUTED}/v1/x"))
        .run(late)
        .unwrap();
    assert_eq!(allowed.http_code, 200, "{allowed:?}");
}

/// With sockmap, the client and the in-pod proxy listener talk socket to socket; the
/// proxy's own outbound connections are sockmap'd too. Requests still flow both ways.
#[test]
fn proxied_requests_work_with_sockmap() {
    if !require_root() {
        return;
    }
    let mesh = Mesh::new("l7sm", &["--sockmap=true"]).expect("bed");
    let echo = mesh.echo("client", WEB, "/hello", &[]);
    assert!(["v1-a", "v1-b"].contains(&echo.pod.as_str()), "{echo:?}");
    let answers = burst(
        mesh.pod("client"),
        &format!("http://{ROUTED}/exact"),
        20,
        &[],
    )
    .unwrap();
    assert!(
        answers
            .iter()
            .all(|(c, p, _)| *c == 200 && app_of_pod(p) == "v2"),
        "{answers:?}"
    );
    let h2 = mesh.curl("client", Curl::new(format!("http://{WEB}/stream/5")).h2c());
    assert_eq!(h2.body.lines().count(), 5, "{h2:?}");
    let checked = l7::grpc(
        mesh.pod("client"),
        &format!("{WEB}:{GRPC_PORT}"),
        &["--call", "check"],
    )
    .unwrap();
    assert!(
        matches!(checked.as_slice(), [GrpcResult { ok: true, .. }]),
        "{checked:?}"
    );
}

/// A dual-stack Service: the proxy serves its IPv6 cluster IP as its IPv4 one (the
/// in-pod `[::1]:15001` listener, `IP6T_SO_ORIGINAL_DST`).
#[test]
fn ipv6_cluster_ip_is_proxied() {
    if !require_root() {
        return;
    }
    let cluster = mesh_tests::Cluster::builder("l7v6")
        .dual_stack()
        .node("n1")
        .node("n2")
        .pod("n1", "client", "10.244.1.10")
        .pod("n1", "v1-a", "10.244.1.11")
        .pod("n2", "v1-b", "10.244.2.11")
        .build()
        .expect("cluster");
    let mut yaml = "---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  clusterIP: 10.96.0.10
  clusterIPs: ['10.96.0.10', 'fd00:96::10']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: v1}
  ports: [{name: http, port: 80, targetPort: 8080, appProtocol: http}]
"
    .to_owned();
    for (name, app) in [("client", "client"), ("v1-a", "v1"), ("v1-b", "v1")] {
        let pod = cluster.pod(name);
        yaml.push_str(&format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: {app}}}}}
spec: {{nodeName: {node}, containers: [{{name: main, image: mesh-testpod}}]}}
status: {{podIP: {ip}, podIPs: [{{ip: {ip}}}, {{ip: '{ip6}'}}]}}
",
            ip = pod.ip(),
            ip6 = pod.ip6().expect("dual-stack"),
            node = mesh_tests::agent::node_name(cluster.node(pod.node())),
        ));
    }
    let state = mesh_tests::StateDir::new("l7v6").expect("state");
    state.write("state.yaml", &yaml).expect("write");
    let _anchor = cluster.pod("client").spawn_anchor().expect("anchor");
    let _servers: Vec<ChildGuard> = ["v1-a", "v1-b"]
        .iter()
        .map(|n| l7::start_http_server(cluster.pod(n), HTTP_PORT, n, &[]).expect("server"))
        .collect();
    let _agents: Vec<Agent> = ["n1", "n2"]
        .iter()
        .map(|n| Agent::start(cluster.node(n), state.path()).expect("agent"))
        .collect();
    let proxy = Proxy::start(cluster.node("n1"), &[]).expect("proxy");
    let client = cluster.pod("client");
    for url in ["http://10.96.0.10/v4", "http://[fd00:96::10]/v6"] {
        let mut last = None;
        let ok = eventually(READY, || {
            let r = Curl::new(url)
                .max_time(Duration::from_secs(2))
                .run(client)
                .unwrap();
            let ok = r.http_code == 200;
            last = Some(r);
            ok
        });
        assert!(ok, "{url}: {last:?}\n{}", proxy.log());
        let echo: HttpEcho = last.unwrap().json().unwrap();
        assert!(["v1-a", "v1-b"].contains(&echo.pod.as_str()), "{echo:?}");
    }
}

/// A policy change holds for new client connections, as it does without the proxy
/// (policy is judged at connect), although the proxy had pooled backend connections to
/// v2 under the old policy: the agent bumps `policyEpoch` and the proxy stops reusing
/// them.
#[test]
fn policy_change_holds_for_pooled_backend_connections() {
    if !require_root() {
        return;
    }
    let mesh = Mesh::new("l7pp", &[]).expect("bed");
    let url = format!("http://{ROUTED}/exact");
    let before = burst(mesh.pod("client"), &url, 10, &[]).unwrap();
    assert!(before.iter().all(|a| a.0 == 200), "{before:?}");
    let policy = "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-to-v1, namespace: prod}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress: [{to: [{podSelector: {matchLabels: {app: v1}}}]}]
";
    mesh.bed
        .apply(&mesh.agents[0], "policy.yaml", policy)
        .unwrap();
    let mut last = None;
    let enforced = eventually(CONVERGE, || {
        let r = Curl::new(&url).run(mesh.pod("client")).unwrap();
        let held = r.http_code == 0;
        last = Some(r);
        held
    });
    assert!(enforced, "v2 still answers a new connection: {last:?}");
}
