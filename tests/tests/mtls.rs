//! Zero-trust mTLS between pods of the mesh (root only; issue 11). Two nodes, an agent
//! and a `mesh-proxy --ca-dir` on each, the node CAs made by `mesh-agent ca`.
//!
//! Namespaces `mesh` and `team` are enrolled (`istio.io/dataplane-mode: ambient`),
//! `default` is not. `client` (mesh, service account `client`) and `teamer` (team) run
//! on n1, `outsider` (default) too; `server` (mesh, service account `web`) on n2 serves
//! HTTP behind the Service `web`.

use std::{
    io::{Read as _, Write as _},
    net::Ipv4Addr,
    sync::Arc,
    time::Duration,
};

use mesh_identity::{NodeCa, RootCa, SpiffeId, Svid, tls};
use rustls::pki_types::CertificateDer;

use mesh_tests::{
    Agent, ChildGuard, Cluster, Proxy, StateDir,
    agent::{BPFFS, node_name},
    assert_eventually,
    capture::{self, Capture},
    l7::{self, Curl, CurlResult, HttpEcho},
    require_root,
    testpod::{self, HoldReport, HoldStarted},
};

const VIP_WEB: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 30);
/// `web-http`: the same pod behind an `appProtocol: http` port (routed by the client's
/// node proxy, then tunnelled; its target port is an HTTP port of the server).
const VIP_WEB_HTTP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 31);
const WEB_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// The server's second HTTP server, behind `web-http` only: an HTTP port.
const HTTP_POD_PORT: u16 = 8081;
const SERVER_IP: &str = "10.244.2.30";
/// Clients `(name, namespace, service account, ip, node)`: `neighbor` shares the
/// server's node.
const CLIENTS: [(&str, &str, &str, &str, &str); 4] = [
    ("client", "mesh", "client", "10.244.1.30", "n1"),
    ("teamer", "team", "default", "10.244.1.31", "n1"),
    ("outsider", "default", "default", "10.244.1.32", "n1"),
    ("neighbor", "mesh", "neighbor", "10.244.2.31", "n2"),
];
const CLIENT_ID: &str = "spiffe://cluster.local/ns/mesh/sa/client";
const SERVER_ID: &str = "spiffe://cluster.local/ns/mesh/sa/web";
/// Bound on convergence waits (state applied, SVIDs issued, listeners open).
const CONVERGE: Duration = Duration::from_secs(20);
/// A header value that must never cross the node link in the clear.
const MARKER: &str = "x-marker: PLAINTEXT-MARKER-7f3a9c";

fn cluster_state(cluster: &Cluster) -> String {
    let mut yaml = String::from(
        "---
apiVersion: v1
kind: Namespace
metadata: {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: team, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: default}
",
    );
    yaml += &format!(
        "---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: mesh}}
spec:
  clusterIP: {VIP_WEB}
  selector: {{app: web}}
  ports: [{{name: tcp, port: {WEB_PORT}, targetPort: {POD_PORT}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: web-http, namespace: mesh}}
spec:
  clusterIP: {VIP_WEB_HTTP}
  selector: {{app: web}}
  ports: [{{name: http, port: {WEB_PORT}, targetPort: {HTTP_POD_PORT}, appProtocol: http}}]
---
apiVersion: v1
kind: Pod
metadata: {{name: server, namespace: mesh, labels: {{app: web}}}}
spec: {{nodeName: {n2}, serviceAccountName: web, containers: [{{name: main, image: mesh-testpod}}]}}
status: {{podIP: {SERVER_IP}}}
",
        n2 = node_name(cluster.node("n2")),
    );
    for (name, ns, sa, ip, node) in CLIENTS {
        yaml += &format!(
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: {ns}, labels: {{app: {name}}}}}
spec: {{nodeName: {node}, serviceAccountName: {sa}, containers: [{{name: main, image: mesh-testpod}}]}}
status: {{podIP: {ip}}}
",
            node = node_name(cluster.node(node)),
        );
    }
    yaml
}

/// Makes a root CA and one intermediate per node with `mesh-agent ca`.
fn make_cas(agent: &Agent, ca: &StateDir, nodes: &[String]) {
    let root = ca.path().join("root");
    let out = agent
        .cli(&["ca", "init", "--dir", root.to_str().unwrap()])
        .unwrap();
    assert!(out.status.success(), "ca init: {out:?}");
    for node in nodes {
        let dir = ca.path().join(node);
        let out = agent
            .cli(&[
                "ca",
                "node",
                "--dir",
                root.to_str().unwrap(),
                "--node",
                node,
                "--out",
                dir.to_str().unwrap(),
            ])
            .unwrap();
        assert!(out.status.success(), "ca node {node}: {out:?}");
    }
}

struct Bed {
    // Field order is drop order: proxies and agents, processes, state, cluster.
    proxies: Vec<Proxy>,
    agents: Vec<Agent>,
    _processes: Vec<ChildGuard>,
    state: StateDir,
    ca: StateDir,
    cluster: Cluster,
}

impl Bed {
    fn new(prefix: &str, extra_state: &[(&str, &str)], proxy_args: &[&str]) -> Self {
        let mut builder = Cluster::builder(prefix)
            .node("n1")
            .node("n2")
            .pod("n2", "server", SERVER_IP);
        for (name, _, _, ip, node) in CLIENTS {
            builder = builder.pod(node, name, ip);
        }
        let cluster = builder.build().unwrap();
        let mut processes = vec![
            l7::start_http_server(cluster.pod("server"), POD_PORT, "server", &[]).unwrap(),
            l7::start_http_server(cluster.pod("server"), HTTP_POD_PORT, "server", &[]).unwrap(),
        ];
        // The agent finds a pod through its processes; curl runs are too short-lived.
        for (name, ..) in CLIENTS {
            processes.push(cluster.pod(name).spawn_anchor().unwrap());
        }
        let state = StateDir::new(prefix).unwrap();
        state
            .write("cluster.yaml", &cluster_state(&cluster))
            .unwrap();
        for (file, yaml) in extra_state {
            state.write(file, yaml).unwrap();
        }
        let agents: Vec<Agent> = ["n1", "n2"]
            .iter()
            .map(|n| Agent::start(cluster.node(n), state.path()).unwrap())
            .collect();
        let ca = StateDir::new(&format!("{prefix}-ca")).unwrap();
        let nodes: Vec<String> = ["n1", "n2"]
            .iter()
            .map(|n| node_name(cluster.node(n)))
            .collect();
        make_cas(&agents[0], &ca, &nodes);
        let proxies = ["n1", "n2"]
            .iter()
            .zip(&nodes)
            .map(|(n, name)| {
                let dir = ca.path().join(name);
                let mut args = vec!["--ca-dir", dir.to_str().unwrap(), "--bpffs", BPFFS];
                args.extend_from_slice(proxy_args);
                Proxy::start(cluster.node(n), &args).unwrap()
            })
            .collect();
        let bed = Self {
            proxies,
            agents,
            _processes: processes,
            state,
            ca,
            cluster,
        };
        assert_eventually!(
            bed.curl("client").http_code == 200,
            CONVERGE,
            "client -> web never answered through the tunnel; n1 proxy log:\n{}\nn2 proxy log:\n{}",
            bed.proxies[0].log(),
            bed.proxies[1].log()
        );
        bed
    }

    /// `curl -H <marker> http://web:80/who` from pod `from`.
    fn curl(&self, from: &str) -> CurlResult {
        Curl::new(format!("http://{VIP_WEB}:{WEB_PORT}/who"))
            .max_time(Duration::from_secs(8))
            .args(&["-H", MARKER])
            .run(self.cluster.pod(from))
            .unwrap()
    }

    /// `curl http://web-http:80<path>` from pod `from` (the L7 path).
    fn curl_http(&self, from: &str, path: &str) -> CurlResult {
        Curl::new(format!("http://{VIP_WEB_HTTP}:{WEB_PORT}{path}"))
            .max_time(Duration::from_secs(8))
            .run(self.cluster.pod(from))
            .unwrap()
    }

    /// Writes (or replaces) a state file; the agents pick it up.
    fn apply(&self, file: &str, yaml: &str) {
        self.state.write(file, yaml).unwrap();
    }
}

/// The tunnel carries mesh traffic encrypted: the marker header never crosses the node
/// link in the clear (while plaintext from outside the mesh shows it: the capture
/// works), the server answers, and both proxies' metrics carry both identities.
#[test]
fn mesh_traffic_crosses_nodes_encrypted_with_both_identities() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-wire", &[], &[]);
    let capture = Capture::start(bed.cluster.node("n2")).unwrap();
    for _ in 0..5 {
        let r = bed.curl("client");
        assert_eq!(r.http_code, 200, "{r:?}");
        let echo: HttpEcho = r.json().unwrap();
        assert_eq!(echo.pod, "server");
    }
    let seen = capture.finish();
    assert!(
        !capture::contains(&seen, MARKER.as_bytes()),
        "the marker crossed the link in the clear ({} bytes captured)",
        seen.len()
    );
    // Control: the outsider is not in the mesh, its request crosses in the clear.
    let capture = Capture::start(bed.cluster.node("n2")).unwrap();
    let r = bed.curl("outsider");
    assert_eq!(r.http_code, 200, "{r:?}");
    let seen = capture.finish();
    assert!(
        capture::contains(&seen, MARKER.as_bytes()),
        "the capture must see plaintext ({} bytes captured)",
        seen.len()
    );

    let source = bed.proxies[0].metrics_parsed().unwrap();
    let opened = source.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "source"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
            ("connection_security_policy", "mutual_tls"),
        ],
    );
    assert!(
        opened >= 5.0,
        "opened {opened}:\n{}",
        bed.proxies[0].metrics().unwrap()
    );
    // The destination side counts the same connections, and the bytes of the requests.
    let destination = bed.proxies[1].metrics_parsed().unwrap();
    let labels = [
        ("reporter", "destination"),
        ("source_principal", CLIENT_ID),
        ("destination_principal", SERVER_ID),
        ("destination_workload", "web"),
    ];
    let opened = destination.sum("istio_tcp_connections_opened_total", &labels);
    assert!(opened >= 5.0, "destination opened {opened}");
    let received = destination.sum("istio_tcp_received_bytes_total", &labels);
    assert!(
        received >= 5.0 * MARKER.len() as f64,
        "destination received {received} bytes"
    );
    let n2 = node_name(bed.cluster.node("n2"));
    let out = bed.agents[1].cli(&["certs", "--node", &n2]).unwrap();
    assert!(out.status.success(), "mesh-agent certs: {out:?}");
    let certs = String::from_utf8_lossy(&out.stdout);
    assert!(
        certs.contains(SERVER_ID),
        "n2 holds the server's SVID: {certs}"
    );
    assert!(
        certs.contains("serial") && certs.contains("not after"),
        "{certs}"
    );
    assert!(
        !certs.contains(CLIENT_ID),
        "n2 issues for its own pods only: {certs}"
    );
}

/// AuthorizationPolicy on the server: DENY by principal resets that client only; ALLOW
/// by namespace admits only that namespace, also to a client on the server's own node.
#[test]
fn authorization_policy_denies_by_principal_and_allows_by_namespace() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-authz", &[], &[]);
    assert_eq!(bed.curl("teamer").http_code, 200);
    assert_eq!(
        bed.curl("neighbor").http_code,
        200,
        "same node, before any policy"
    );
    bed.apply(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-client, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]}]
",
    );
    assert_eventually!(
        bed.curl("client").http_code == 0,
        CONVERGE,
        "client still admitted after DENY"
    );
    assert_eq!(bed.curl("teamer").http_code, 200, "teamer is not denied");
    // The refusal is a flow of the server's agent, with both identities.
    assert_eventually!(
        bed.agents[1].flows(&[]).unwrap().iter().any(|f| {
            f["reason"] == "authorization-denied"
                && f["source_principal"] == CLIENT_ID
                && f["destination_principal"] == SERVER_ID
                && f["policies"][0] == "mesh/no-client"
                && f["destination"]["pod"] == "mesh/server"
        }),
        CONVERGE,
        "no authorization-denied flow on n2: {:?}",
        bed.agents[1].flows(&[])
    );
    bed.apply(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: team-only, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [team]}}]}]
",
    );
    // The neighbor (namespace mesh, on the server's own node) tells this policy from
    // the previous one: same-node traffic takes the tunnel too, so identity decides.
    assert_eventually!(
        bed.curl("neighbor").http_code == 0,
        CONVERGE,
        "ALLOW team: neighbor must be refused"
    );
    assert_eq!(bed.curl("client").http_code, 0, "client is not in team");
    assert_eq!(bed.curl("teamer").http_code, 200, "teamer is");
    let refused = bed.proxies[1].metrics_parsed().unwrap().sum(
        "mesh_proxy_hbone_refusals_total",
        &[("reason", "authorization")],
    );
    assert!(refused >= 3.0, "refusals counted: {refused}");
}

/// Plaintext from outside the mesh reaches an enrolled pod directly while nothing asks
/// to judge it; with a PeerAuthentication or AuthorizationPolicy on the pod, the pod's
/// sk_lookup program hands it to the node proxy: STRICT resets it, PERMISSIVE admits
/// it, and AuthorizationPolicy judges it as a client without principal or namespace.
#[test]
fn peer_authentication_strict_refuses_plaintext_and_permissive_admits_it() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-peer", &[], &[]);
    assert_eq!(bed.curl("outsider").http_code, 200, "PERMISSIVE by default");
    bed.apply(
        "peer.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: mesh}
spec: {mtls: {mode: STRICT}}
",
    );
    assert_eventually!(
        bed.curl("outsider").http_code == 0,
        CONVERGE,
        "STRICT must refuse plaintext; n2 proxy log:\n{}",
        bed.proxies[1].log()
    );
    assert_eq!(bed.curl("client").http_code, 200, "mTLS clients go on");
    let m = bed.proxies[1].metrics_parsed().unwrap();
    assert!(
        m.sum(
            "mesh_proxy_plaintext_refusals_total",
            &[("reason", "mtls_strict")]
        ) >= 1.0
    );
    assert_eventually!(
        bed.agents[1].flows(&[]).unwrap().iter().any(|f| {
            f["reason"] == "authorization-denied"
                && f["source"]["pod"] == "default/outsider"
                && f["destination"]["pod"] == "mesh/server"
        }),
        CONVERGE,
        "no flow for the STRICT refusal on n2: {:?}",
        bed.agents[1].flows(&[])
    );

    // PERMISSIVE, and an AuthorizationPolicy: the proxy now sees the plaintext, and
    // admits it by its address (a plaintext client has no principal to match).
    bed.apply(
        "peer.yaml",
        "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive, namespace: mesh}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-clients, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]
    - from: [{source: {ipBlocks: [10.244.1.32/32]}}]
",
    );
    assert_eventually!(
        bed.curl("outsider").http_code == 200 && bed.curl("teamer").http_code == 0,
        CONVERGE,
        "PERMISSIVE with ALLOW: outsider admitted by address, teamer refused"
    );
    let echo: HttpEcho = bed.curl("outsider").json().unwrap();
    assert_eq!(echo.pod, "server");
    assert_eq!(bed.curl("client").http_code, 200);
    let m = bed.proxies[1].metrics_parsed().unwrap();
    let judged = m.sum(
        "istio_tcp_connections_opened_total",
        &[
            ("reporter", "destination"),
            ("connection_security_policy", "none"),
            ("destination_principal", SERVER_ID),
        ],
    );
    assert!(judged >= 1.0, "plaintext went through the proxy: {judged}");

    // An ALLOW by namespace: plaintext has no namespace, so it is refused.
    bed.apply(
        "peer.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-clients, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules: [{from: [{source: {namespaces: [mesh, default]}}]}]
",
    );
    assert_eventually!(
        bed.curl("outsider").http_code == 0,
        CONVERGE,
        "plaintext has no namespace to match"
    );
    assert_eq!(bed.curl("client").http_code, 200);
    assert!(
        bed.proxies[1].metrics_parsed().unwrap().sum(
            "mesh_proxy_plaintext_refusals_total",
            &[("reason", "authorization")]
        ) >= 1.0
    );
}

/// NetworkPolicy still applies to tunnelled streams, for the stream's own port, and
/// both it and AuthorizationPolicy must allow.
#[test]
fn network_policy_and_authorization_policy_must_both_allow() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-np", &[], &[]);
    // Ingress to the server only from `client` pods, only on its port.
    bed.apply(
        "np.yaml",
        &format!(
            "apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {{name: web-ingress, namespace: mesh}}
spec:
  podSelector: {{matchLabels: {{app: web}}}}
  policyTypes: [Ingress]
  ingress:
    - from: [{{namespaceSelector: {{}}, podSelector: {{matchLabels: {{app: client}}}}}}]
      ports: [{{port: {POD_PORT}}}]
"
        ),
    );
    assert_eventually!(
        bed.curl("teamer").http_code == 0,
        CONVERGE,
        "teamer must be refused by NetworkPolicy"
    );
    assert_eq!(
        bed.curl("client").http_code,
        200,
        "NetworkPolicy admits client"
    );
    // AuthorizationPolicy denies what NetworkPolicy admits.
    bed.apply(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-all, namespace: mesh}
spec: {selector: {matchLabels: {app: web}}, action: DENY, rules: [{}]}
",
    );
    assert_eventually!(
        bed.curl("client").http_code == 0,
        CONVERGE,
        "client must be refused by AuthorizationPolicy"
    );
    let m = bed.proxies[1].metrics_parsed().unwrap();
    assert!(
        m.sum(
            "mesh_proxy_hbone_refusals_total",
            &[("reason", "network_policy")]
        ) >= 1.0
    );
    assert!(
        m.sum(
            "mesh_proxy_hbone_refusals_total",
            &[("reason", "authorization")]
        ) >= 1.0
    );
}

/// Plain TCP and garbage on the HBONE port are refused and counted; the mesh goes on.
#[test]
fn garbage_on_the_hbone_port_is_refused() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-bad", &[], &[]);
    let target: std::net::SocketAddr = (SERVER_IP.parse::<Ipv4Addr>().unwrap(), 15008).into();
    bed.cluster
        .pod("outsider")
        .in_netns(|| {
            for junk in [
                &b"GET / HTTP/1.1\r\n\r\n"[..],
                b"\x16\x03\x01\xff\xffgarbage",
                b"\0\0\0",
            ] {
                let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
                    .expect("the HBONE port accepts TCP");
                let _ = s.write_all(junk);
                let _ = s.shutdown(std::net::Shutdown::Write);
                let mut rest = Vec::new();
                let _ = s.read_to_end(&mut rest);
            }
        })
        .unwrap();
    assert_eventually!(
        bed.proxies[1].metrics_parsed().unwrap().sum(
            "mesh_proxy_hbone_refusals_total",
            &[("reason", "handshake")]
        ) >= 3.0,
        CONVERGE,
        "garbage handshakes counted:\n{}",
        bed.proxies[1].log()
    );
    assert_eq!(bed.curl("client").http_code, 200, "the mesh still works");
}

/// What the HBONE port at the server does with a client presenting `svid` from the
/// `client` pod (expecting the server to prove `expected`): `true` when it speaks
/// HTTP/2 after the handshake (its SETTINGS frame arrives), `false` when the handshake
/// or the first read fails (refused).
fn hbone_accepts(
    bed: &Bed,
    svid: &Svid,
    roots: &[CertificateDer<'static>],
    expected: &SpiffeId,
) -> bool {
    let config = tls::client_config(
        Arc::new(tls::ClientSvid::new(svid).unwrap()),
        roots,
        "cluster.local",
        Some(expected.clone()),
    )
    .unwrap();
    let server = tls::server_name(&server_id());
    let target: std::net::SocketAddr = (SERVER_IP.parse::<Ipv4Addr>().unwrap(), 15008).into();
    bed.cluster
        .pod("client")
        .in_netns(move || {
            let mut tcp = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5))
                .expect("the HBONE port accepts TCP");
            tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut conn = rustls::ClientConnection::new(config, server).unwrap();
            let mut stream = rustls::Stream::new(&mut conn, &mut tcp);
            // The client preface and an empty SETTINGS frame.
            let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
            hello.extend_from_slice(&[0, 0, 0, 4, 0, 0, 0, 0, 0]);
            if stream.write_all(&hello).is_err() {
                return false;
            }
            let mut frame = [0u8; 9];
            stream.read_exact(&mut frame).is_ok() && frame[3] == 4
        })
        .unwrap()
}

fn server_id() -> SpiffeId {
    SpiffeId::new("cluster.local", "mesh", "web").unwrap()
}

/// Certificates the destination must refuse: from a foreign CA, expired, and of another
/// trust domain, each signed for the client's own SPIFFE ID; and a server that does not
/// prove the expected SPIFFE ID is refused by the client. The real node CA's fresh
/// SVID is accepted (the control).
#[test]
fn untrusted_expired_and_wrong_identity_certificates_are_refused() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-certs", &[], &[]);
    let node_ca = NodeCa::load(&bed.ca.path().join(node_name(bed.cluster.node("n1")))).unwrap();
    let roots = node_ca.roots().to_vec();
    let client = SpiffeId::new("cluster.local", "mesh", "client").unwrap();
    let hour = Duration::from_secs(3600);
    let good = node_ca.issue_svid(&client, hour).unwrap();
    assert!(
        hbone_accepts(&bed, &good, &roots, &server_id()),
        "control: a good SVID"
    );

    let foreign = RootCa::generate("cluster.local")
        .unwrap()
        .issue_node("n1", hour)
        .unwrap()
        .issue_svid(&client, hour)
        .unwrap();
    let two_hours_ago = time::OffsetDateTime::now_utc() - 2 * hour;
    let expired = node_ca.issue_svid_at(&client, two_hours_ago, hour).unwrap();
    let evil = SpiffeId::new("evil.local", "mesh", "client").unwrap();
    let other_domain = node_ca.issue_svid(&evil, hour).unwrap();
    let before = bed.proxies[1].metrics_parsed().unwrap().sum(
        "mesh_proxy_hbone_refusals_total",
        &[("reason", "handshake")],
    );
    for (what, svid) in [
        ("foreign CA", &foreign),
        ("expired", &expired),
        ("other trust domain", &other_domain),
    ] {
        assert!(
            !hbone_accepts(&bed, svid, &roots, &server_id()),
            "{what} accepted"
        );
    }
    assert_eventually!(
        bed.proxies[1].metrics_parsed().unwrap().sum(
            "mesh_proxy_hbone_refusals_total",
            &[("reason", "handshake")]
        ) >= before + 3.0,
        CONVERGE,
        "three refused handshakes counted:\n{}",
        bed.proxies[1].log()
    );
    // The client side: the server proves `web`, not the identity the client expects.
    let wrong = SpiffeId::new("cluster.local", "mesh", "db").unwrap();
    assert!(
        !hbone_accepts(&bed, &good, &roots, &wrong),
        "wrong server identity accepted"
    );
    assert_eq!(bed.curl("client").http_code, 200, "the mesh goes on");
}

/// SVIDs with a 20 s TTL (re-issued at half life) during a 60 s connection that echoes
/// ten times a second through the tunnel, while new requests keep coming: the held
/// connection loses no echo, no request fails, and the server's serial changes.
#[test]
fn rotation_loses_nothing() {
    if !require_root() {
        return;
    }
    const ECHO_PORT: u16 = 9090;
    const HOLD: Duration = Duration::from_secs(60);
    let bed = Bed::new("mtls-rot", &[], &["--svid-ttl", "20s"]);
    let _echo = testpod::start_server(bed.cluster.pod("server"), ECHO_PORT, "server").unwrap();
    let first = bed.proxies[1].certs().unwrap();
    let target = (SERVER_IP.parse::<Ipv4Addr>().unwrap(), ECHO_PORT).into();
    let interval = Duration::from_millis(100);
    let mut hold = testpod::spawn_hold(bed.cluster.pod("client"), target, HOLD, interval).unwrap();
    let started: HoldStarted = testpod::next_json_line(&mut hold, CONVERGE).unwrap();
    assert_eq!(started.backend, "server");
    let deadline = std::time::Instant::now() + HOLD;
    let mut sent = 0;
    while std::time::Instant::now() < deadline && sent < 3000 {
        let r = bed.curl("client");
        assert_eq!(r.http_code, 200, "request {sent} failed: {r:?}");
        sent += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let report: HoldReport = testpod::next_json_line(&mut hold, CONVERGE).unwrap();
    assert_eq!(report.errors, 0, "the held connection failed: {report:?}");
    assert!(report.echoes_ok >= 500, "echoes: {report:?}");
    let last = bed.proxies[1].certs().unwrap();
    assert_ne!(first, last, "the server's SVID was re-issued");
}

/// On an HTTP port, AuthorizationPolicy judges each request with its HTTP fields: an
/// ALLOW for one path admits that path and answers 403 `RBAC: access denied` for the
/// others; the requests were routed on the client's node and rode the tunnel.
#[test]
fn l7_rule_on_a_path_gives_403_for_other_paths_only() {
    if !require_root() {
        return;
    }
    let bed = Bed::new("mtls-l7", &[], &[]);
    assert_eq!(bed.curl_http("client", "/stats").http_code, 200);
    bed.apply(
        "authz.yaml",
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: who-only, namespace: mesh}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
    - from: [{source: {principals: [cluster.local/ns/mesh/sa/client]}}]
      to: [{operation: {methods: [GET], paths: [/who]}}]
",
    );
    assert_eventually!(
        bed.curl_http("client", "/stats").http_code == 403,
        CONVERGE,
        "/stats must be refused per request"
    );
    let denied = bed.curl_http("client", "/stats");
    assert_eq!(denied.body.trim(), "RBAC: access denied", "{denied:?}");
    let allowed = bed.curl_http("client", "/who");
    assert_eq!(allowed.http_code, 200, "{allowed:?}");
    let echo: HttpEcho = allowed.json().unwrap();
    assert_eq!(echo.pod, "server");
    // Another identity: the rule's principal does not match, every path is refused.
    assert_eq!(bed.curl_http("teamer", "/who").http_code, 403);
    let m = bed.proxies[0].metrics_parsed().unwrap();
    let tunnelled = m.sum(
        "istio_requests_total",
        &[
            ("destination_service_name", "web-http"),
            ("connection_security_policy", "mutual_tls"),
            ("source_principal", CLIENT_ID),
            ("destination_principal", SERVER_ID),
        ],
    );
    assert!(tunnelled >= 3.0, "requests through the tunnel: {tunnelled}");
}
