//! The etcd state source end to end (root only): a real etcd cluster (one member in
//! each node's namespace, on its fabric address), one agent per node reading it with
//! `--etcd`, objects written with `mesh-agent apply` from one node, and pods on every
//! node dialing the Service VIP.

use std::{
    collections::BTreeSet,
    net::{Ipv4Addr, SocketAddr},
    path::Path,
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Agent, ChildGuard, Cluster, StateDir, agent_bin, assert_eventually,
    etcd::{CLIENT_PORT, EtcdCluster, EtcdTls},
    require_root, testpod,
};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
/// How long agents get to notice a change of etcd's reachability.
const NOTICE: Duration = Duration::from_secs(20);
const NODES: [&str; 3] = ["n1", "n2", "n3"];
const CLIENTS: [&str; 3] = ["c1", "c2", "c3"];

/// The `web` Service (10.96.0.10:80 → 8080, selector app=web) and one Pod per backend.
fn web_state(cluster: &Cluster, backends: &[&str]) -> String {
    let backends: Vec<(&str, Ipv4Addr)> = backends
        .iter()
        .map(|&name| (name, cluster.pod(name).ip()))
        .collect();
    mesh_tests::manifests::web_state(VIP, SERVICE_PORT, POD_PORT, &backends)
}

/// Which backends answer `count` connections to the VIP from pod `client`.
fn answering(cluster: &Cluster, client: &str, count: u32) -> Result<BTreeSet<String>> {
    let summary = testpod::connect(
        cluster.pod(client),
        SocketAddr::from((VIP, SERVICE_PORT)),
        count,
    )?;
    ensure!(
        summary.ok == u64::from(count),
        "{client}: {} of {count} connections failed: {summary:?}",
        u64::from(count) - summary.ok
    );
    Ok(summary.by_backend.into_keys().collect())
}

/// Asserts that from every client pod the VIP is answered by exactly `backends`.
fn assert_served_by(cluster: &Cluster, backends: &[&str]) -> Result<()> {
    let want: BTreeSet<String> = backends.iter().map(|b| (*b).to_owned()).collect();
    // 20 connections over two backends all land on one with probability 2^-19.
    let count = if backends.len() > 1 { 20 } else { 5 };
    for client in CLIENTS
        .iter()
        .filter(|c| cluster.pods().iter().any(|p| p.name() == **c))
    {
        let got = answering(cluster, client, count)?;
        ensure!(got == want, "{client} reached {got:?}, want {want:?}");
    }
    Ok(())
}

/// Services next to web, in namespace `other`.
const OTHERS: u32 = 50;

/// `n` Services (10.96.1.x:80) with an EndpointSlice each, that no test dials.
fn other_services(n: u32) -> String {
    (1..=n)
        .map(|i| {
            format!(
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: other}}\n\
                 spec: {{clusterIP: 10.96.1.{i}, ports: [{{port: 80, targetPort: 8080}}]}}\n\
                 ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: s{i}-1, namespace: other, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
                 addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{{addresses: ['10.244.9.{i}']}}]\n"
            )
        })
        .collect()
}

/// `mesh-agent apply -f <dir> --wait` from node n1.
fn apply_wait(etcd: &EtcdCluster, cluster: &Cluster, dir: &Path) -> Result<String> {
    let dir = dir.to_str().context("state dir path")?;
    etcd.mesh_agent(
        cluster,
        "n1",
        &["apply", "-f", dir, "--wait", "--timeout", "30s"],
    )
}

/// Three nodes, three members, three agents.
struct Bed {
    // Field order is drop order: agents, servers, etcd, then the cluster.
    agents: Vec<Agent>,
    _servers: Vec<ChildGuard>,
    state: StateDir,
    etcd: EtcdCluster,
    cluster: Cluster,
}

impl Bed {
    fn new(prefix: &str) -> Result<Self> {
        let cluster = Cluster::builder(prefix)
            .node("n1")
            .node("n2")
            .node("n3")
            .pod("n1", "c1", "10.244.1.10")
            .pod("n2", "c2", "10.244.2.10")
            .pod("n3", "c3", "10.244.3.10")
            .pod("n2", "web-a", "10.244.2.11")
            .pod("n3", "web-b", "10.244.3.11")
            .build()?;
        let servers = ["web-a", "web-b"]
            .iter()
            .map(|name| testpod::start_server(cluster.pod(name), POD_PORT, name))
            .collect::<Result<Vec<_>>>()?;
        let etcd = EtcdCluster::start(&cluster, &NODES, None)?;
        let agents = NODES
            .iter()
            .map(|n| Agent::start_with_source(cluster.node(n), &etcd.agent_flags(), &[]))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            agents,
            _servers: servers,
            state: StateDir::new(prefix)?,
            etcd,
            cluster,
        })
    }

    /// Writes the web state with `backends` and applies it from n1, waiting for all.
    fn apply_web(&self, backends: &[&str]) -> Result<String> {
        self.state
            .write("web.yaml", &web_state(&self.cluster, backends))?;
        apply_wait(&self.etcd, &self.cluster, self.state.path())
    }

    fn all_agents(&self, what: &str, check: impl Fn(&Agent) -> bool) {
        for agent in &self.agents {
            assert_eventually!(
                check(agent),
                NOTICE,
                "agent {}: {what}; status {:?}\nlog:\n{}",
                agent.pin_name(),
                agent.admin_status(),
                agent.log()
            );
        }
    }
}

#[test]
fn three_agents_follow_etcd_through_bad_writes_member_loss_outage_and_compaction() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut bed = Bed::new("etcd3")?;

    // A Service and its pod, applied from one node: pods on every node reach it.
    let out = bed.apply_web(&["web-a"])?;
    assert!(out.contains("Service default/web created"), "{out}");
    assert!(out.contains("applied on 3 nodes"), "{out}");
    assert_served_by(&bed.cluster, &["web-a"])?;
    let nodes = bed.etcd.mesh_agent(&bed.cluster, "n2", &["nodes"])?;
    for agent in &bed.agents {
        assert!(nodes.contains(agent.pin_name()), "{nodes}");
    }
    let listed = bed.etcd.mesh_agent(&bed.cluster, "n3", &["get", "pods"])?;
    assert!(listed.contains("web-a"), "{listed}");

    // Other Services, written alongside: a change to web must not re-plan them.
    bed.state.write("others.yaml", &other_services(OTHERS))?;
    apply_wait(&bed.etcd, &bed.cluster, bed.state.path())?;

    // Changed: every node follows by the time `--wait` returns, having planned only
    // what the change touched.
    let out = bed.apply_web(&["web-b"])?;
    assert!(out.contains("Service default/web unchanged"), "{out}");
    assert!(out.contains("Pod default/web-b created"), "{out}");
    let out = bed.etcd.mesh_agent(
        &bed.cluster,
        "n1",
        &["delete", "pod", "default/web-a", "--wait"],
    )?;
    assert!(out.contains("applied on 3 nodes"), "{out}");
    assert_served_by(&bed.cluster, &["web-b"])?;
    for agent in &bed.agents {
        let status = agent.admin_status()?;
        assert_eq!(
            status.last_plan_services,
            1,
            "agent {}: a Pod of web deleted re-planned more than web: {status:?}",
            agent.pin_name()
        );
        // web's frontend, slots and backend, and web-a's identity entries (IPCACHE, and
        // ENDPOINTS on its node): a handful, not the others' hundreds.
        assert!(
            (1..=10).contains(&status.last_map_writes),
            "agent {}: {} map entries written for one Pod: {status:?}",
            agent.pin_name(),
            status.last_map_writes
        );
    }

    // Another client writes an invalid Service straight into etcd: every agent rejects
    // it naming the key, and keeps the last good version.
    let key = "/mesh/core/Service/default/web";
    let bad = format!(
        r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"web","namespace":"default"}},"spec":{{"clusterIP":"{VIP}","ports":[{{"port":70000}}]}}}}"#
    );
    bed.etcd.etcdctl(&bed.cluster, "n2", &["put", key, &bad])?;
    let named = format!("etcd key {key} (Service default/web): spec.ports[0].port");
    bed.all_agents("rejects the bad key, naming it", |a| {
        a.admin_status()
            .is_ok_and(|s| s.source.rejected_objects == 1)
            && a.log().contains(&named)
    });
    assert_served_by(&bed.cluster, &["web-b"])?;
    // The good version written again clears the rejection.
    let out = bed.apply_web(&["web-b"])?;
    assert!(out.contains("Service default/web configured"), "{out}");
    bed.all_agents("has no rejected object", |a| {
        a.admin_status()
            .is_ok_and(|s| s.source.rejected_objects == 0)
    });

    // One member killed: the others serve; nothing notices.
    bed.etcd.kill(2);
    let out = bed.apply_web(&["web-a", "web-b"])?;
    assert!(out.contains("Pod default/web-a created"), "{out}");
    assert_served_by(&bed.cluster, &["web-a", "web-b"])?;
    for agent in &bed.agents {
        let status = agent.admin_status()?;
        assert!(!status.source.stale, "{}: {status:?}", agent.pin_name());
    }

    // Every member gone: traffic flows on the last state, and the agents say they are
    // stale and since when.
    bed.etcd.kill_all();
    bed.all_agents("says it is stale, and since when", |a| {
        a.admin_status()
            .is_ok_and(|s| s.source.stale && s.source.stale_since.is_some())
    });
    assert_served_by(&bed.cluster, &["web-a", "web-b"])?;
    let metrics = bed.agents[0].metrics()?;
    assert!(
        metrics.lines().any(|l| l == "mesh_agent_source_stale 1"),
        "{metrics}"
    );
    let status = bed.agents[0].status()?;
    assert!(status.contains("source: etcd, STALE since"), "{status}");

    // While the agents are away, etcd comes back, takes writes, and compacts them
    // away: the agents cannot resume their watch where they left it, and relist.
    let written = {
        let _paused = bed
            .agents
            .iter()
            .map(Agent::pause)
            .collect::<Result<Vec<_>>>()?;
        bed.etcd.restart(&bed.cluster)?;
        bed.etcd
            .mesh_agent(&bed.cluster, "n1", &["delete", "pod", "default/web-b"])?;
        let revision = current_revision(&bed.etcd, &bed.cluster)?;
        bed.etcd
            .etcdctl(&bed.cluster, "n1", &["compact", &revision.to_string()])?;
        revision
    };
    bed.all_agents("catches up with the writes made while it was away", |a| {
        a.admin_status()
            .is_ok_and(|s| !s.source.stale && s.source.applied_revision >= written)
    });
    assert_served_by(&bed.cluster, &["web-a"])?;
    let nodes = bed.etcd.mesh_agent(&bed.cluster, "n2", &["nodes"])?;
    assert!(nodes.contains("3 live nodes"), "{nodes}");
    for agent in &bed.agents {
        assert!(
            agent.log().contains("relisting"),
            "{} did not relist after the compaction:\n{}",
            agent.pin_name(),
            agent.log()
        );
    }
    // Live again: a change reaches every node.
    let out = bed.apply_web(&["web-a", "web-b"])?;
    assert!(out.contains("applied on 3 nodes"), "{out}");
    assert_served_by(&bed.cluster, &["web-a", "web-b"])?;

    // An agent that stops leaves at once: `--wait` no longer waits for its node.
    let stopped = bed.agents.pop().context("three agents")?;
    let name = stopped.pin_name().to_owned();
    stopped.stop()?;
    let nodes = bed.etcd.mesh_agent(&bed.cluster, "n1", &["nodes"])?;
    assert!(
        nodes.contains("2 live nodes") && !nodes.contains(&name),
        "{nodes}"
    );
    Ok(())
}

/// The store's current revision, from `etcdctl endpoint status`.
fn current_revision(etcd: &EtcdCluster, cluster: &Cluster) -> Result<u64> {
    let out = etcd.etcdctl(cluster, "n1", &["endpoint", "status", "-w", "json"])?;
    let status: serde_json::Value = serde_json::from_str(&out).context("endpoint status JSON")?;
    status
        .pointer("/0/Status/header/revision")
        .and_then(serde_json::Value::as_u64)
        .with_context(|| format!("no revision in {out}"))
}

/// A test CA, a certificate for the member on `ip`, and a client certificate, written
/// into `dir`.
fn test_certificates(dir: &Path, ip: Ipv4Addr) -> Result<EtcdTls> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::default();
    ca.distinguished_name
        .push(DnType::CommonName, "mesh test etcd CA");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let ca_cert = ca.self_signed(&ca_key)?;
    let issuer = Issuer::new(ca, ca_key);
    let issue = |sans: Vec<String>, name: &str, usage| -> Result<(String, String)> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name.push(DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_cert, server_key) = issue(
        vec![ip.to_string()],
        "etcd member",
        ExtendedKeyUsagePurpose::ServerAuth,
    )?;
    let (client_cert, client_key) = issue(
        Vec::new(),
        "mesh-agent",
        ExtendedKeyUsagePurpose::ClientAuth,
    )?;
    let write = |name: &str, pem: &str| -> Result<std::path::PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, pem).with_context(|| format!("write {}", path.display()))?;
        Ok(path)
    };
    Ok(EtcdTls {
        ca: write("ca.pem", &ca_cert.pem())?,
        server_cert: write("server.pem", &server_cert)?,
        server_key: write("server-key.pem", &server_key)?,
        client_cert: write("client.pem", &client_cert)?,
        client_key: write("client-key.pem", &client_key)?,
    })
}

#[test]
fn tls_client_authentication_against_a_test_ca() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    // Two nodes: a lone node has no fabric address for the member to listen on.
    let cluster = Cluster::builder("etcdtls")
        .node("n1")
        .node("n2")
        .pod("n1", "c1", "10.244.1.10")
        .pod("n1", "web-a", "10.244.1.11")
        .build()?;
    let _server = testpod::start_server(cluster.pod("web-a"), POD_PORT, "web-a")?;
    let certs = StateDir::new("etcdtls-certs")?;
    let tls = test_certificates(certs.path(), cluster.node("n1").ip())?;
    let etcd = EtcdCluster::start(&cluster, &["n1"], Some(tls.clone()))?;
    let agent = Agent::start_with_source(cluster.node("n1"), &etcd.agent_flags(), &[])?;
    let state = StateDir::new("etcdtls")?;
    state.write("web.yaml", &web_state(&cluster, &["web-a"]))?;
    let out = apply_wait(&etcd, &cluster, state.path())?;
    assert!(out.contains("applied on 1 nodes"), "{out}");
    assert_served_by(&cluster, &["web-a"])?;
    assert_eq!(agent.admin_status()?.source.kind, "etcd");

    // Without a client certificate the member refuses the connection.
    let endpoint = format!("https://{}:{CLIENT_PORT}", cluster.node("n1").ip());
    let mut cmd = Command::new(agent_bin()?);
    cmd.args(["get", "svc", "--etcd", &endpoint, "--etcd-ca"])
        .arg(&tls.ca)
        .stdin(Stdio::null());
    let out = cluster.node("n1").run_outside_cgroup(cmd)?;
    assert!(
        !out.status.success(),
        "a client without a certificate was served: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    Ok(())
}
