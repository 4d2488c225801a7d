//! `cargo xtask bench policy`: what network policy adds to pod-to-pod traffic, with 0,
//! 100 and 1,000 NetworkPolicies in force. Two client/server pairs run side by side on
//! one node: pair A is selected by the policies (egress on the client, ingress on the
//! server, each with N rules plus the one that allows the measured port), pair B by
//! none. Rounds alternate A and B, so each ratio compares paths measured back to back.
//! Two measures: connection setup (connect + echo + close: egress check at connect,
//! ingress check on the SYN) and request/response on an established connection.

use std::fmt::Write as _;

use anyhow::{Context as _, Result};
use mesh_tests::{Agent, Cluster, Pod, StateDir, testpod};

use crate::{bench::PathStats, build, setup};

/// Policies in force per measured size.
const SIZES: [u32; 3] = [0, 100, 1000];

/// The pods: (name, IP, labels app=…).
const PODS: [(&str, &str); 4] = [
    ("client-a", "10.244.1.10"),
    ("web-a", "10.244.1.11"),
    ("client-b", "10.244.1.20"),
    ("web-b", "10.244.1.21"),
];

/// Runs the benchmark: `count` iterations per round and path, `rounds` rounds.
pub fn run(count: u32, rounds: u32) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);

    let mut builder = Cluster::builder("bpol").node("n1");
    for (name, ip) in PODS {
        builder = builder.pod("n1", name, ip);
    }
    let cluster = builder.build()?;
    let _servers = [
        testpod::start_server(cluster.pod("web-a"), 8080, "web-a")?,
        testpod::start_server(cluster.pod("web-b"), 8080, "web-b")?,
    ];
    // The agent learns a pod's network namespace from a live process in it; the
    // measuring processes come and go, so each client pod keeps an idle one.
    let _idle = [
        cluster.pod("client-a").spawn_anchor()?,
        cluster.pod("client-b").spawn_anchor()?,
    ];
    for client in ["client-a", "client-b"] {
        cluster.pod(client).in_netns(|| -> Result<()> {
            // See bench lb: keep TIME_WAIT port exhaustion out of the measurement.
            std::fs::write("/proc/sys/net/ipv4/ip_local_port_range", "1024 65535")?;
            std::fs::write("/proc/sys/net/ipv4/tcp_tw_reuse", "1")?;
            Ok(())
        })??;
    }

    println!(
        "policy: pod to pod on one node; pair A selected by N policies, pair B by none;\n    \
         {rounds} rounds x {count} iterations per path, pairs alternating"
    );
    let node_name = mesh_tests::agent::node_name(cluster.node("n1"));
    let mut rows = Vec::new();
    for n in SIZES {
        let state = StateDir::new("bpol")?;
        state.write("state.yaml", &state_yaml(&node_name, n))?;
        let agent = Agent::start(cluster.node("n1"), state.path())?;
        // Proof that the rules are really in the kernel for pair A, not just in the file.
        let log = agent.log();
        let entries = log
            .rsplit("policy_entries=")
            .next()
            .and_then(|rest| rest.split_whitespace().next())
            .unwrap_or("?");
        println!("  {n:>4} policies: agent holds {entries} POLICY entries for this node's pods");
        let a = (cluster.pod("client-a"), "10.244.1.11:8080");
        let b = (cluster.pod("client-b"), "10.244.1.21:8080");
        let setup = measure(count, rounds, a, b, false)?;
        // One exchange costs a fraction of a connection setup and is dominated by thread
        // wake-ups; more of them per round keep its per-round p50 steady.
        let rr = measure(count * 5, rounds, a, b, true)?;
        println!(
            "  {n:>4} policies: setup A/B {:.3}x, request/response A/B {:.3}x",
            setup.0.paired_p50_ratio(&setup.1),
            rr.0.paired_p50_ratio(&rr.1)
        );
        drop(agent);
        rows.push((n, setup, rr));
    }

    println!(
        "\n{:>8}  {:<22} {:>9} {:>9} {:>9}",
        "policies", "measure", "B p50 us", "A p50 us", "A/B p50"
    );
    let mut table = String::new();
    for (n, setup, rr) in &rows {
        for (what, (a, b)) in [("connection setup", setup), ("request/response", rr)] {
            let _ = writeln!(
                table,
                "{n:>8}  {what:<22} {:>9.1} {:>9.1} {:>8.3}x   (p99 B {:.1} A {:.1})",
                b.p50_us(),
                a.p50_us(),
                a.paired_p50_ratio(b),
                b.p99_us(),
                a.p99_us()
            );
        }
    }
    print!("{table}");
    // With 0 policies A and B are the same setup: their ratio is the measurement's own
    // bias and noise on this machine, and the other rows are read against it.
    let control = rows
        .first()
        .map(|(_, s, r)| (s.0.paired_p50_ratio(&s.1), r.0.paired_p50_ratio(&r.1)));
    println!("target: under 3% added at p50; A/B divided by the 0-policy control must be <= 1.03");
    for (n, setup, rr) in &rows {
        let (s, r) = (
            setup.0.paired_p50_ratio(&setup.1),
            rr.0.paired_p50_ratio(&rr.1),
        );
        let (cs, cr) = control.unwrap_or((1.0, 1.0));
        let worst = (s / cs).max(r / cr);
        println!(
            "  {n:>4} policies: setup {:.3}x, request/response {:.3}x against the control: {}",
            s / cs,
            r / cr,
            if worst <= 1.03 { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// Alternating rounds of pair A and pair B.
fn measure(
    count: u32,
    rounds: u32,
    (client_a, addr_a): (&Pod, &str),
    (client_b, addr_b): (&Pod, &str),
    persistent: bool,
) -> Result<(PathStats, PathStats)> {
    let (mut a, mut b) = (PathStats::default(), PathStats::default());
    let run = |pod: &Pod, addr: &str| {
        let addr = addr.parse()?;
        if persistent {
            testpod::bench_persistent(pod, addr, count, 100, 64, None)
        } else {
            testpod::bench(pod, addr, count, 100)
        }
        .with_context(|| format!("bench from {}", pod.name()))
    };
    for round in 0..rounds {
        if round % 2 == 0 {
            a.add(&run(client_a, addr_a)?);
            b.add(&run(client_b, addr_b)?);
        } else {
            b.add(&run(client_b, addr_b)?);
            a.add(&run(client_a, addr_a)?);
        }
    }
    Ok((a, b))
}

/// The four pods in namespace `bench`, and `n` egress policies on client-a plus `n`
/// ingress policies on web-a (each allowing another port), and, when `n > 0`, the pair
/// of policies that allow the measured port 8080.
fn state_yaml(node: &str, n: u32) -> String {
    let mut y = String::from("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for (name, ip) in PODS {
        let _ = write!(
            y,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: bench, labels: {{app: {name}}}}}\n\
             spec: {{nodeName: {node}, containers: [{{name: c}}]}}\nstatus: {{podIP: {ip}}}\n"
        );
    }
    if n == 0 {
        return y;
    }
    let policy = |y: &mut String, name: String, subject: &str, dir: &str, peer: &str, port: u32| {
        let (types, rule, peer_key) = match dir {
            "egress" => ("[Egress]", "egress", "to"),
            _ => ("[Ingress]", "ingress", "from"),
        };
        let _ = write!(
            y,
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: bench}}\n\
             spec:\n  podSelector: {{matchLabels: {{app: {subject}}}}}\n  policyTypes: {types}\n  {rule}:\n\
             \x20 - {peer_key}: [{{podSelector: {{matchLabels: {{app: {peer}}}}}}}]\n    ports: [{{port: {port}, protocol: TCP}}]\n"
        );
    };
    policy(
        &mut y,
        "allow-egress".into(),
        "client-a",
        "egress",
        "web-a",
        8080,
    );
    policy(
        &mut y,
        "allow-ingress".into(),
        "web-a",
        "ingress",
        "client-a",
        8080,
    );
    for i in 0..n.saturating_sub(1) {
        policy(
            &mut y,
            format!("e{i}"),
            "client-a",
            "egress",
            "web-a",
            10_000 + i,
        );
        policy(
            &mut y,
            format!("i{i}"),
            "web-a",
            "ingress",
            "client-a",
            10_000 + i,
        );
    }
    y
}
