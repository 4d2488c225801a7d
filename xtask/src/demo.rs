//! `cargo xtask demo`: the cluster of deploy/local/demo.yaml built from network
//! namespaces (2 nodes, 7 dual-stack pods), one agent per node, real connections from a
//! client pod on each node to the Service VIPs (TCP over IPv4 and IPv6, DNS-style UDP),
//! and a report of which backend answered and which peer the application saw.
//! Everything is removed at the end; `--keep` holds it up until Ctrl-C.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::{Context as _, Result};
use mesh_tests::{Agent, ChildGuard, Cluster, testpod};

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
const PODS: [(&str, &str, &str, u16); 7] = [
    ("n1", "client", "10.244.1.10", 0),
    ("n2", "client-2", "10.244.2.10", 0),
    ("n1", "web-1", "10.244.1.11", 8080),
    ("n2", "web-2", "10.244.2.11", 8080),
    ("n2", "web-3", "10.244.2.12", 8080),
    ("n1", "api-1", "10.244.1.21", 9090),
    ("n2", "api-2", "10.244.2.21", 9090),
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
    let state = build::workspace_root().join("deploy/local/demo.yaml");

    let mut builder = Cluster::builder("demo").dual_stack().node("n1").node("n2");
    for (node, name, ip, _) in PODS {
        builder = builder.pod(node, name, ip);
    }
    let cluster = builder.build().context("building the demo cluster")?;
    let servers: Vec<ChildGuard> = PODS
        .iter()
        .filter(|(_, _, _, port)| *port != 0)
        .map(|(_, name, _, port)| testpod::start_server(cluster.pod(name), *port, name))
        .collect::<Result<_>>()?;
    let agents = ["n1", "n2"]
        .iter()
        .map(|node| Agent::start(cluster.node(node), &state))
        .collect::<Result<Vec<_>>>()?;
    println!(
        "\n== cluster {}: 2 nodes, {} pods, agents attached",
        cluster.id(),
        PODS.len()
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

    if args.keep {
        keep_running(&cluster, &agents, &state)?;
    }
    println!("\ntearing down");
    drop(agents);
    drop(servers);
    drop(cluster);
    Ok(())
}

fn print_counts(by_backend: &BTreeMap<String, u64>, errors: &BTreeMap<String, u64>) {
    for (backend, n) in by_backend {
        println!("  {backend:<8} {n:>4}  {}", "#".repeat(*n as usize));
    }
    for (error, n) in errors {
        println!("  {error:<8} {n:>4}  (refused by the connect hook)");
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
    println!("state (edit it, the agents re-apply): {}", state.display());
    println!(
        "a shell in pod client:   nsenter --net={} bash",
        client.netns_path().display()
    );
    println!(
        "  then e.g.:             {} connect --addr 10.96.0.10:80 --count 10",
        mesh_tests::testpod_bin()?.display()
    );
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
            "                         bpftool map dump pinned {}/SERVICES_V1",
            agent.pin_dir().display()
        );
    }
    while !STOP.load(Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(())
}
