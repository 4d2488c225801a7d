//! `cargo xtask demo`: the cluster of deploy/local/demo.yaml and demo-l7.yaml built from
//! network namespaces (2 nodes, 11 dual-stack pods), one agent and one node proxy per
//! node, real connections from a client pod on each node to the Service VIPs (TCP over
//! IPv4 and IPv6, DNS-style UDP), and a report of which backend answered and which peer
//! the application saw; then network policy at work (an egress EPERM, an ingress drop)
//! and the agents' flow log; then same-node socket redirection: a bulk transfer to a pod
//! on the same node is handed socket to socket, one to the other node is not; then L7
//! through the node proxy (`mesh-proxy` on each node, deploy/local/demo-l7.yaml): a
//! canary split and a retried flaky backend, with the proxy's metrics.
//! Everything is removed at the end; `--keep` holds it up until Ctrl-C.

mod l7;
mod mtls;

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{Agent, ChildGuard, Cluster, StateDir, agent::node_name, testpod};

use crate::{build, setup};

/// Options of `cargo xtask demo`.
#[derive(Debug, clap::Args)]
pub struct DemoArgs {
    /// Keep the cluster and agents running until Ctrl-C, to explore it by hand.
    #[arg(long)]
    keep: bool,
    /// Connections per client and Service.
    #[arg(long, default_value_t = 30)]
    connections: u32,
}

/// Pods of deploy/local/demo.yaml: (node, name, IP, port it serves or 0 for clients).
const PODS: [(&str, &str, &str, u16); 8] = [
    ("n1", "client", "10.244.1.10", 0),
    ("n2", "client-2", "10.244.2.10", 0),
    ("n1", "web-1", "10.244.1.11", 8080),
    ("n2", "web-2", "10.244.2.11", 8080),
    ("n2", "web-3", "10.244.2.12", 8080),
    ("n1", "api-1", "10.244.1.21", 9090),
    ("n2", "api-2", "10.244.2.21", 9090),
    ("n1", "batch", "10.244.1.30", 0),
];

/// Frontends of deploy/local/demo.yaml: (Service, VIP:port, protocol).
const FRONTENDS: [(&str, &str, &str); 4] = [
    ("web", "10.96.0.10:80", "TCP"),
    ("web", "[fd00:96::10]:80", "TCP"),
    ("api", "10.96.0.20:9000", "TCP"),
    ("api", "10.96.0.20:53", "UDP"),
];

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

/// Runs the demo.
pub fn run(args: &DemoArgs) -> Result<()> {
    crate::require_root("demo")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let mut builder = Cluster::builder("demo").dual_stack().node("n1").node("n2");
    for (node, name, ip, _) in PODS {
        builder = builder.pod(node, name, ip);
    }
    for (node, name, ip) in l7::PODS.iter().chain(&mtls::PODS) {
        builder = builder.pod(node, name, ip);
    }
    let cluster = builder.build().context("building the demo cluster")?;
    let servers: Vec<ChildGuard> = PODS
        .iter()
        .filter(|(_, _, _, port)| *port != 0)
        .map(|(_, name, _, port)| testpod::start_server(cluster.pod(name), *port, name))
        .collect::<Result<_>>()?;
    let l7_servers = l7::start_backends(&cluster)?;
    let mtls_server = mtls::start_backend(&cluster)?;
    // Policy applies to the pods of an agent's own node (spec.nodeName), and the agents
    // run under names unique to this run: write the state with those names.
    let state_dir = StateDir::new("demo")?;
    for file in ["demo.yaml", "demo-l7.yaml", "demo-mtls.yaml"] {
        let template = build::workspace_root().join("deploy/local").join(file);
        let mut yaml = std::fs::read_to_string(&template)
            .with_context(|| format!("reading {}", template.display()))?;
        for node in ["n1", "n2"] {
            let name = node_name(cluster.node(node));
            yaml = yaml.replace(
                &format!("nodeName: {node}\n"),
                &format!("nodeName: {name}\n"),
            );
        }
        state_dir.write(file, &yaml)?;
    }
    let state = state_dir.path();
    // The node proxy listens only in pods the agent found: the pods that run only
    // short-lived clients each keep an idle process.
    let _idle = ["client", "batch", "frontend", "intruder"]
        .iter()
        .map(|pod| cluster.pod(pod).spawn_anchor())
        .collect::<Result<Vec<_>>>()?;
    let agents = ["n1", "n2"]
        .iter()
        .map(|node| Agent::start_with(cluster.node(node), state, &["--sockmap=true"]))
        .collect::<Result<Vec<_>>>()?;
    let ca_dir = StateDir::new("demo-ca")?;
    let proxies = mtls::start_proxies(&cluster, &agents[0], &ca_dir)?;
    println!(
        "\n== cluster {}: 2 nodes, {} pods, agents attached, mesh-proxy running",
        cluster.id(),
        PODS.len() + l7::PODS.len() + mtls::PODS.len()
    );
    for agent in &agents {
        println!("\n$ mesh-agent services --node {}", agent.pin_name());
        print!("{}", agent.services()?);
    }

    for client in ["client", "client-2"] {
        let pod = cluster.pod(client);
        for (service, vip, proto) in FRONTENDS {
            let addr: SocketAddr = vip.parse()?;
            // UDP the DNS way: one unconnected socket, sendto/recvfrom per query.
            let (summary, what) = match proto {
                "UDP" => (testpod::udp_query(pod, addr, args.connections)?, "queries"),
                _ => (
                    testpod::connect(pod, addr, args.connections)?,
                    "connections",
                ),
            };
            println!(
                "\n{client} (node {}) -> {service} {vip}/{proto}: {} of {} {what} answered",
                pod.node(),
                summary.ok,
                summary.attempts
            );
            print_counts(&summary.by_backend, &summary.errors);
            let seen: Vec<&str> = summary.peers.keys().map(String::as_str).collect();
            println!("  the application saw its peer as: {}", seen.join(", "));
        }
    }
    let refused = testpod::connect(cluster.pod("client"), "10.96.0.10:81".parse()?, 3)?;
    println!("\nclient -> 10.96.0.10:81 (a port web does not expose):");
    print_counts(&refused.by_backend, &refused.errors);

    policy_scene(&cluster, &agents)?;
    sockmap_scene(&cluster, &agents)?;
    l7::scene(&cluster, &agents, &proxies)?;
    mtls::scene(&cluster, &agents, &proxies)?;

    if args.keep {
        keep_running(&cluster, &agents, state)?;
    }
    println!("\ntearing down");
    drop(proxies);
    drop(agents);
    drop(l7_servers);
    drop(mtls_server);
    drop(servers);
    drop(cluster);
    Ok(())
}

/// Network policy at work: batch may reach web but not api (egress, EPERM at once);
/// web-1 is not a client, so api drops its connection (ingress); then the flow log.
fn policy_scene(cluster: &Cluster, agents: &[Agent]) -> Result<()> {
    println!("\n== network policy (deploy/local/demo.yaml: batch-egress, api-ingress)");
    let batch = cluster.pod("batch");
    for (target, addr) in [("web", "10.96.0.10:80"), ("api", "10.96.0.20:9000")] {
        let summary = testpod::connect(batch, addr.parse()?, 3)?;
        println!(
            "batch -> {target} {addr}: {} of {} answered",
            summary.ok, summary.attempts
        );
        print_counts(&summary.by_backend, &summary.errors);
    }
    let summary = testpod::connect(cluster.pod("web-1"), "10.96.0.20:9000".parse()?, 2)?;
    println!(
        "web-1 -> api 10.96.0.20:9000: {} of {} answered",
        summary.ok, summary.attempts
    );
    print_counts(&summary.by_backend, &summary.errors);
    for agent in agents {
        println!("\n$ mesh-agent observe --node {}", agent.pin_name());
        let out = agent.cli(&["observe", "--node", agent.pin_name()])?;
        print!("{}", String::from_utf8_lossy(&out.stdout));
    }
    Ok(())
}

/// client (n1) sends 64 MiB to web-1 (n1) and to web-2 (n2); only the first is
/// redirected socket to socket, as n1's `mesh-agent status` shows.
fn sockmap_scene(cluster: &Cluster, agents: &[Agent]) -> Result<()> {
    println!("\n== same-node socket redirection (agents run with --sockmap=true)");
    let client = cluster.pod("client");
    for target in ["web-1", "web-2"] {
        let pod = cluster.pod(target);
        let mut sink = testpod::start_sink(pod, 7000, &testpod::SinkOptions::default())?;
        let before = agents[0].status()?;
        let opts = testpod::StreamOptions::new(64 << 20, testpod::StreamMode::Write);
        let s = testpod::stream(client, SocketAddr::from((pod.ip(), 7000)), &opts)?;
        let _ = testpod::next_json_line::<testpod::SinkConn>(&mut sink, Duration::from_secs(10));
        println!(
            "\nclient (n1) -> {target} (node {}): {} MiB sent, arrived intact: {}, {:.0} ms",
            pod.node(),
            s.sent >> 20,
            s.intact(),
            s.elapsed_ns as f64 / 1e6
        );
        let redirected = |status: &str| -> Option<String> {
            status
                .lines()
                .find(|l| l.trim_start().starts_with("redirected"))
                .map(|l| l.trim().to_owned())
        };
        println!(
            "  n1 status before: {}",
            redirected(&before).unwrap_or_default()
        );
        println!(
            "  n1 status after:  {}",
            redirected(&agents[0].status()?).unwrap_or_default()
        );
    }
    println!("\n$ mesh-agent status --node {}", agents[0].pin_name());
    print!("{}", agents[0].status()?);
    Ok(())
}

fn print_counts(by_backend: &BTreeMap<String, u64>, errors: &BTreeMap<String, u64>) {
    for (backend, n) in by_backend {
        println!("  {backend:<8} {n:>4}  {}", "#".repeat(*n as usize));
    }
    for (error, n) in errors {
        let why = match error.as_str() {
            "ECONNREFUSED" => "refused by the connect hook: no such Service port",
            "EPERM" => "denied by egress policy in the connect hook",
            "ETIMEDOUT" => "dropped by ingress policy at the destination",
            _ => "",
        };
        println!("  {error:<8} {n:>4}  {why}");
    }
}

fn keep_running(cluster: &Cluster, agents: &[Agent], state: &std::path::Path) -> Result<()> {
    // SAFETY: the handler only stores to an atomic; handlers reset to default on exec, so
    // the processes we start are unaffected.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    let client = cluster.pod("client");
    let node = cluster.node("n1");
    println!("\n== running; press Ctrl-C to tear down");
    println!("state (edit it, the agents re-apply): {}/", state.display());
    println!("flows:                   mesh-agent observe --follow --node <node>");
    println!(
        "a shell in pod client:   nsenter --net={} bash",
        client.netns_path().display()
    );
    println!(
        "  then e.g.:             {} connect --addr 10.96.0.10:80 --count 10",
        mesh_tests::testpod_bin()?.display()
    );
    println!("                         curl -s http://10.96.0.30/   # reviews, via mesh-proxy");
    println!(
        "  (join its node's cgroup first so the mesh sees it: echo $$ > {}/cgroup.procs)",
        node.cgroup_dir().display()
    );
    for agent in agents {
        println!(
            "kernel table:            mesh-agent services --node {}",
            agent.pin_name()
        );
        println!(
            "                         bpftool map dump pinned {}/SERVICES_V2",
            agent.pin_dir().display()
        );
        println!(
            "routes, proxy config:    mesh-agent routes --node {0}; mesh-agent proxy-config --node {0}",
            agent.pin_name()
        );
    }
    println!(
        "proxy metrics (n1):      nsenter --net={} curl -s 127.0.0.1:{}/metrics",
        node.netns_path().display(),
        mesh_tests::proxy::METRICS_ADDR.port()
    );
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
