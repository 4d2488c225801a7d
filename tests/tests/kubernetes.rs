//! The Kubernetes source end to end (root only): the agent of node n1 runs with
//! `--kubeconfig` pointing at the in-process API server (`mesh_tests::kubeapi`), which
//! listens on n1's own loopback, and a pod on n1 dials the Service VIP. Each step
//! checks which backends answer: the first list, watch events, a reconnect resumed from
//! a bookmark, an outage during which objects are deleted and the history compacted
//! (traffic keeps the last state, the source says stale, then a relist after 410 Gone
//! drops what was deleted), and a bad object rejected by kind/namespace/name with
//! traffic unaffected.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use anyhow::Result;
use mesh_tests::kubeapi::KubeApi;
use mesh_tests::{Agent, ChildGuard, Cluster, StateDir, assert_eventually, require_root, testpod};
use serde_json::{Value, json};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// Bound on convergence; after an outage the source's reconnect backoff adds seconds.
const CONVERGE: Duration = Duration::from_secs(30);
/// Connections per check: with three backends, one is missed by chance with
/// probability 3 × (2/3)^30 ≈ 2e-5.
const DIALS: u32 = 30;

const BACKENDS: [(&str, &str, &str); 3] = [
    ("n1", "web-1", "10.244.1.11"),
    ("n2", "web-2", "10.244.2.11"),
    ("n2", "web-3", "10.244.2.12"),
];

fn service(name: &str, cluster_ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": cluster_ip, "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": port, "targetPort": POD_PORT, "protocol": "TCP"}]},
        "status": {"loadBalancer": {}},
    })
}

struct Bed {
    // Field order is drop order: agent, API server, servers, then the cluster.
    agent: Agent,
    api: KubeApi,
    _servers: Vec<ChildGuard>,
    _dir: StateDir,
    cluster: Cluster,
}

impl Bed {
    fn new() -> Result<Self> {
        let mut builder =
            Cluster::builder("kube")
                .node("n1")
                .node("n2")
                .pod("n1", "client", "10.244.1.10");
        for (node, name, ip) in BACKENDS {
            builder = builder.pod(node, name, ip);
        }
        let cluster = builder.build()?;
        let servers = BACKENDS
            .iter()
            .map(|(_, name, _)| testpod::start_server(cluster.pod(name), POD_PORT, name))
            .collect::<Result<Vec<_>>>()?;
        // The agent runs in n1's netns: its API server listens on n1's loopback.
        let api = KubeApi::start_on(cluster.node("n1"))?;
        api.apply(service("web", &VIP.to_string(), SERVICE_PORT))?;
        for name in ["web-1", "web-2"] {
            api.apply(Self::pod(&cluster, name))?;
        }
        let dir = StateDir::new("kube")?;
        let kubeconfig = api.write_kubeconfig(dir.path())?;
        let agent = Agent::start_with_source(
            cluster.node("n1"),
            &["--kubeconfig".into(), kubeconfig.into()],
            &[],
        )?;
        Ok(Self {
            agent,
            api,
            _servers: servers,
            _dir: dir,
            cluster,
        })
    }

    /// The Pod `name` as the API server holds it: running on its node, with its IP.
    fn pod(cluster: &Cluster, name: &str) -> Value {
        let (node, _, _) = BACKENDS
            .iter()
            .find(|(_, n, _)| *n == name)
            .expect("a backend");
        let ip = cluster.pod(name).ip().to_string();
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "web", "image": "web"}],
                     "nodeName": mesh_tests::agent::node_name(cluster.node(node))},
            "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
        })
    }

    /// The backends that answer connections to the VIP from the client pod; every
    /// connection must succeed.
    fn backends(&self) -> BTreeSet<String> {
        let target = SocketAddr::from((VIP, SERVICE_PORT));
        match testpod::connect(self.cluster.pod("client"), target, DIALS) {
            Ok(summary) if summary.ok == u64::from(DIALS) => {
                summary.by_backend.into_keys().collect()
            }
            Ok(summary) => panic!("failed connections: {summary:?}"),
            Err(err) => panic!("dial: {err:#}"),
        }
    }

    fn metric(&self, name: &str) -> Option<f64> {
        let text = self.agent.metrics().ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
    }
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|n| (*n).to_owned()).collect()
}

#[test]
fn the_kubernetes_api_drives_the_datapath() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new()?;

    // The first list: web-1 and web-2.
    assert_eventually!(bed.backends() == set(&["web-1", "web-2"]), CONVERGE);
    assert_eq!(bed.metric("mesh_agent_source_stale"), Some(0.0));

    // Watch events: a new pod joins, a deleted one leaves.
    bed.api.apply(Bed::pod(&bed.cluster, "web-3"))?;
    assert_eventually!(
        bed.backends() == set(&["web-1", "web-2", "web-3"]),
        CONVERGE
    );
    assert!(bed.api.delete("v1", "Pod", "default", "web-1")?);
    assert_eventually!(bed.backends() == set(&["web-2", "web-3"]), CONVERGE);

    // Watches that end after a bookmark resume from it, although the history before
    // it is compacted: no list, and the next event still arrives.
    bed.api.bookmark();
    bed.api.compact();
    bed.api.end_watches();
    assert_eventually!(bed.api.open_watches("pods") == 1, CONVERGE);
    bed.api.apply(Bed::pod(&bed.cluster, "web-1"))?;
    assert_eventually!(
        bed.backends() == set(&["web-1", "web-2", "web-3"]),
        CONVERGE
    );
    assert_eq!(bed.api.lists("pods"), 1, "{:?}", bed.api.requests());

    // An outage: traffic keeps the last state and the source says it is stale.
    bed.api.set_reachable(false);
    assert_eventually!(bed.metric("mesh_agent_source_stale") == Some(1.0), CONVERGE);
    assert_eq!(bed.backends(), set(&["web-1", "web-2", "web-3"]));
    // Meanwhile web-1 and web-3 go, and that history is compacted: the resumed watch
    // gets 410 Gone, the agent lists again and drops them.
    assert!(bed.api.delete("v1", "Pod", "default", "web-1")?);
    assert!(bed.api.delete("v1", "Pod", "default", "web-3")?);
    bed.api.compact();
    bed.api.set_reachable(true);
    assert_eventually!(bed.backends() == set(&["web-2"]), CONVERGE);
    assert_eventually!(bed.metric("mesh_agent_source_stale") == Some(0.0), CONVERGE);
    assert_eq!(bed.api.lists("pods"), 2, "{:?}", bed.api.requests());

    // A bad object is rejected by name; traffic is unaffected and later changes apply.
    bed.api.apply(service("bad", "10.96.0.11", 0))?;
    assert_eventually!(
        bed.metric("mesh_agent_source_rejected_objects") == Some(1.0),
        CONVERGE
    );
    assert!(
        bed.agent.log().contains("API Service default/bad"),
        "{}",
        bed.agent.log()
    );
    assert_eq!(bed.backends(), set(&["web-2"]));
    bed.api.apply(Bed::pod(&bed.cluster, "web-3"))?;
    assert_eventually!(bed.backends() == set(&["web-2", "web-3"]), CONVERGE);
    Ok(())
}
