//! Socket-level load balancing end to end (root only): the real agent loads the real
//! connect4 program into the kernel, attached to a test node's cgroup, and pods in real
//! network namespaces dial Service VIPs.

use std::{
    net::{Ipv4Addr, SocketAddr},
    process::Command,
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{Agent, ChildGuard, Cluster, StateDir, assert_eventually, require_root, testpod};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const SERVICE_PORT: u16 = 80;
const POD_PORT: u16 = 8080;
const CONVERGE: Duration = Duration::from_secs(10);

/// The `web` Service (10.96.0.10:80 → 8080, selector app=web) and one Pod per backend.
fn web_state(backends: &[(&str, Ipv4Addr)]) -> String {
    mesh_tests::manifests::web_state(VIP, SERVICE_PORT, POD_PORT, backends)
}

/// Client on n1 with one backend beside it and two on n2; the agent runs on n1.
struct Bed {
    // Field order is drop order: agent, servers, then the cluster.
    agent: Agent,
    _servers: Vec<ChildGuard>,
    state: StateDir,
    cluster: Cluster,
}

const BACKENDS: [(&str, &str, &str); 3] = [
    ("n1", "web-1", "10.244.1.11"),
    ("n2", "web-2", "10.244.2.11"),
    ("n2", "web-3", "10.244.2.12"),
];

impl Bed {
    fn new(prefix: &str) -> Result<Self> {
        let mut builder =
            Cluster::builder(prefix)
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
        let state = StateDir::new(prefix)?;
        state.write(
            "web.yaml",
            &web_state(&Self::backends(&cluster, &["web-1", "web-2", "web-3"])),
        )?;
        let agent = Agent::start(cluster.node("n1"), state.path())?;
        Ok(Self {
            agent,
            _servers: servers,
            state,
            cluster,
        })
    }

    fn backends(cluster: &Cluster, names: &[&'static str]) -> Vec<(&'static str, Ipv4Addr)> {
        names.iter().map(|n| (*n, cluster.pod(n).ip())).collect()
    }

    fn dial(&self, port: u16, count: u32) -> Result<testpod::ConnectSummary> {
        testpod::connect(
            self.cluster.pod("client"),
            SocketAddr::from((VIP, port)),
            count,
        )
    }
}

#[test]
fn connections_spread_uniformly_over_three_backends() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lbspread")?;
    // 300 connections (the number) give a standard deviation of 8 around 100 per
    // backend, so a ±15% bound would fail one run in five by chance alone; 1,200 keep the
    // same ±15% bound at 3.7 standard deviations.
    let summary = bed.dial(SERVICE_PORT, 1200)?;
    assert_eq!(
        summary.ok, 1200,
        "every connection must succeed: {summary:?}"
    );
    for (_, name, _) in BACKENDS {
        let n = summary.by_backend.get(name).copied().unwrap_or(0);
        assert!(
            (340..=460).contains(&n),
            "{name} answered {n} of 1200 (want 400 ± 15%): {summary:?}"
        );
    }
    Ok(())
}

#[test]
fn removing_a_backend_takes_effect_without_restart() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lbremove")?;
    let before = bed.agent.services()?;
    assert!(before.contains("10.244.2.12:8080"), "{before}");
    let applied = bed.agent.applied_count();

    bed.state.write(
        "web.yaml",
        &web_state(&Bed::backends(&bed.cluster, &["web-1", "web-2"])),
    )?;
    assert_eventually!(
        bed.agent.applied_count() > applied,
        CONVERGE,
        "agent did not re-apply:\n{}",
        bed.agent.log()
    );
    let after = bed.agent.services()?;
    assert!(
        !after.contains("10.244.2.12"),
        "web-3 still in the kernel table:\n{after}"
    );
    assert!(
        after.contains("10.244.1.11:8080") && after.contains("10.244.2.11:8080"),
        "{after}"
    );

    let summary = bed.dial(SERVICE_PORT, 200)?;
    assert_eq!(summary.ok, 200, "{summary:?}");
    assert_eq!(
        summary.by_backend.get("web-3"),
        None,
        "removed backend answered: {summary:?}"
    );
    assert!(
        summary.by_backend["web-1"] > 0 && summary.by_backend["web-2"] > 0,
        "{summary:?}"
    );
    assert_eq!(
        bed.agent.log().matches("datapath ready").count(),
        1,
        "the agent restarted"
    );
    Ok(())
}

#[test]
fn bad_state_is_reported_and_the_last_good_table_stays() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lbbad")?;
    let good_table = bed.agent.services()?;

    // A typo'd field and an invalid port in one update, next to the good file.
    let bad = web_state(&Bed::backends(&bed.cluster, &["web-1"]))
        .replace("targetPort: 8080", "targetPort: 8080, portz: 1")
        .replace("port: 80,", "port: 70000,");
    bed.state.write("zz-bad.yaml", &bad)?;
    assert_eventually!(
        bed.agent.log().contains("zz-bad.yaml"),
        CONVERGE,
        "no error logged:\n{}",
        bed.agent.log()
    );
    let log = bed.agent.log();
    assert!(
        log.contains("spec.ports[0].portz"),
        "unknown field not named:\n{log}"
    );
    assert!(
        log.contains("spec.ports[0].port"),
        "bad port not named:\n{log}"
    );
    assert!(log.contains("document 1"), "document not named:\n{log}");

    assert_eq!(
        bed.agent.services()?,
        good_table,
        "the table changed after a rejected update"
    );
    let summary = bed.dial(SERVICE_PORT, 150)?;
    assert_eq!(summary.ok, 150, "{summary:?}");
    assert_eq!(
        summary.by_backend.len(),
        3,
        "all three backends still serve: {summary:?}"
    );

    let out = bed
        .agent
        .cli(&["validate", bed.state.path().to_str().context("path")?])?;
    assert!(!out.status.success(), "validate accepted a bad state");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("zz-bad.yaml") && stderr.contains("spec.ports[0].portz"),
        "{stderr}"
    );
    Ok(())
}

#[test]
fn unexposed_port_and_backendless_service_are_refused_at_once() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lbrefuse")?;
    let empty = "---
apiVersion: v1
kind: Service
metadata: {name: empty, namespace: default}
spec:
  clusterIP: 10.96.0.11
  selector: {app: nothing}
  ports: [{port: 80}]
";
    let applied = bed.agent.applied_count();
    bed.state.write("empty.yaml", empty)?;
    assert_eventually!(
        bed.agent.applied_count() > applied,
        CONVERGE,
        "{}",
        bed.agent.log()
    );

    // ECONNREFUSED comes from the hook itself; a VIP the mesh forgot would instead give
    // EHOSTUNREACH/ENETUNREACH (no route) and never ETIMEDOUT's opposite, a success.
    let unexposed = bed.dial(81, 5)?;
    assert_eq!(
        unexposed.errors.get("ECONNREFUSED"),
        Some(&5),
        "{unexposed:?}"
    );
    assert_eq!(
        unexposed.connect_errno_first.as_deref(),
        Some("ECONNREFUSED")
    );
    let client = bed.cluster.pod("client");
    let no_backend = testpod::connect(client, SocketAddr::from(([10, 96, 0, 11], 80)), 5)?;
    assert_eq!(
        no_backend.errors.get("ECONNREFUSED"),
        Some(&5),
        "{no_backend:?}"
    );

    // Destinations that are not Services pass untouched.
    let web2 = bed.cluster.pod("web-2");
    let direct = testpod::connect(client, SocketAddr::from((web2.ip(), POD_PORT)), 20)?;
    assert_eq!(direct.by_backend.get("web-2"), Some(&20), "{direct:?}");
    Ok(())
}

#[test]
fn bpftool_shows_the_pinned_maps_and_attached_program() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let bed = Bed::new("lbbpftool")?;
    let pins = bed.agent.pin_dir();
    let bpftool = |args: &[&str]| -> Result<String> {
        let out = Command::new("bpftool")
            .args(args)
            .output()
            .context("run bpftool")?;
        anyhow::ensure!(
            out.status.success(),
            "bpftool {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let services = pins.join("SERVICES_V2");
    let dump = bpftool(&["map", "dump", "pinned", services.to_str().context("path")?])?;
    // Key of 10.96.0.10:80/TCP: the address IPv4-mapped (::ffff:10.96.0.10) and the port
    // in network byte order, then proto 6.
    assert!(
        dump.contains("00 00 ff ff 0a 60 00 0a\n00 50 06 00"),
        "{dump}"
    );
    assert!(
        dump.contains("Found 2 elements"),
        "frontend + VIP marker expected:\n{dump}"
    );
    let backends = pins.join("BACKENDS_V2");
    let dump = bpftool(&["map", "dump", "pinned", backends.to_str().context("path")?])?;
    assert!(dump.contains("Found 3 elements"), "{dump}");

    let cgroup = bed
        .cluster
        .node("n1")
        .cgroup_dir()
        .to_str()
        .context("path")?
        .to_owned();
    let attached = bpftool(&["cgroup", "show", &cgroup])?;
    assert!(
        attached.contains("connect4") && attached.contains("mesh_connect4"),
        "{attached}"
    );
    let link = pins.join("mesh_connect4_link");
    let link_info = bpftool(&["link", "show", "pinned", link.to_str().context("path")?])?;
    assert!(link_info.contains("cgroup_inet4_connect"), "{link_info}");

    // SIGTERM detaches and unpins.
    let Bed { agent, cluster, .. } = bed;
    let status = agent.stop()?;
    assert!(status.success(), "agent exited with {status}");
    assert!(!pins.exists(), "pins left behind in {}", pins.display());
    let attached = bpftool(&["cgroup", "show", &cgroup])?;
    assert!(
        !attached.contains("mesh_connect4"),
        "still attached after stop:\n{attached}"
    );
    drop(cluster);
    Ok(())
}
