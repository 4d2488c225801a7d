//! The mTLS scene of `cargo xtask demo` (deploy/local/demo-mtls.yaml): pods of the
//! mesh talk across nodes through the node proxies' mutual-TLS tunnel (HBONE), each
//! with the SPIFFE identity its node issued, and an AuthorizationPolicy admits one
//! service account only. Shown: `mesh-agent certs`, both clients' outcomes, the
//! refusal as a flow of `mesh-agent observe`, and the proxies' own account (Istio's TCP
//! metrics with both principals, refusals).

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Agent, ChildGuard, Cluster, Proxy, StateDir,
    agent::{BPFFS, node_name},
    l7::{self, Curl},
};

/// Pods of deploy/local/demo-mtls.yaml: (node, name, IP).
pub const PODS: [(&str, &str, &str); 3] = [
    ("n1", "frontend", "10.244.1.50"),
    ("n1", "intruder", "10.244.1.51"),
    ("n2", "payments", "10.244.2.50"),
];
const PAYMENTS_URL: &str = "http://10.96.0.50/pay";
const REQUESTS: u32 = 10;
const MAX_TIME: Duration = Duration::from_secs(5);
/// How long the tunnel gets to come up (state applied, SVIDs issued, listeners open).
const READY: Duration = Duration::from_secs(20);

/// Starts the payments server.
pub fn start_backend(cluster: &Cluster) -> Result<ChildGuard> {
    l7::start_http_server(cluster.pod("payments"), 8080, "payments", &[])
}

/// Makes the mesh's root CA and one node CA per node with `mesh-agent ca` (in `dir`),
/// and starts `mesh-proxy --ca-dir` on each node (after its agent).
pub fn start_proxies(cluster: &Cluster, agent: &Agent, dir: &StateDir) -> Result<Vec<Proxy>> {
    let root = dir.path().join("root");
    let root = root.to_str().context("non-UTF-8 path")?;
    let ca = |args: &[&str]| -> Result<String> {
        let out = agent.cli(args)?;
        ensure!(
            out.status.success(),
            "mesh-agent {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    println!("\n$ mesh-agent ca init --dir {root}");
    print!("{}", ca(&["ca", "init", "--dir", root])?);
    let mut proxies = Vec::new();
    for node in ["n1", "n2"] {
        let name = node_name(cluster.node(node));
        let out = dir.path().join(&name);
        let out = out.to_str().context("non-UTF-8 path")?;
        println!("$ mesh-agent ca node --dir {root} --node {name} --out {out}");
        print!(
            "{}",
            ca(&["ca", "node", "--dir", root, "--node", &name, "--out", out])?
        );
        proxies.push(
            Proxy::start(cluster.node(node), &["--ca-dir", out, "--bpffs", BPFFS])
                .with_context(|| format!("starting mesh-proxy on {node}"))?,
        );
    }
    Ok(proxies)
}

/// Runs the scene; `proxies` are n1's and n2's.
pub fn scene(cluster: &Cluster, agents: &[Agent], proxies: &[Proxy]) -> Result<()> {
    println!(
        "\n== mTLS: the mesh's tunnel (deploy/local/demo-mtls.yaml: namespace shop in the \
         mesh, AuthorizationPolicy payments-from-frontend)"
    );
    let frontend = cluster.pod("frontend");
    let curl = || Curl::new(PAYMENTS_URL).max_time(MAX_TIME);
    ensure!(
        mesh_tests::eventually(READY, || curl()
            .run(frontend)
            .is_ok_and(|r| r.http_code == 200)),
        "frontend -> payments never answered through the tunnel; proxy logs:\n{}\n{}",
        proxies[0].log(),
        proxies[1].log()
    );
    let n2 = agents[1].pin_name();
    println!("\n$ mesh-agent certs --node {n2}");
    let out = agents[1].cli(&["certs", "--node", n2])?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    for client in ["frontend", "intruder"] {
        let pod = cluster.pod(client);
        let mut ok = 0;
        let mut refused = 0;
        for _ in 0..REQUESTS {
            match curl().run(pod)?.http_code {
                200 => ok += 1,
                _ => refused += 1,
            }
        }
        println!(
            "\n{client} (spiffe://cluster.local/ns/shop/sa/{client}) -> payments \
             {PAYMENTS_URL}: {ok} answered, {refused} refused (connection reset)"
        );
        // The policy admits the frontend's identity only: anything else means the
        // traffic did not go the way this scene shows.
        let expected = if client == "frontend" { ok } else { refused };
        ensure!(
            expected == REQUESTS,
            "{client}: {ok} answered, {refused} refused; proxy logs:\n{}\n{}",
            proxies[0].log(),
            proxies[1].log()
        );
    }

    // `client` (namespace default) is outside the mesh: its plaintext is captured at
    // payments and refused by PeerAuthentication STRICT.
    let mut refused = 0;
    for _ in 0..REQUESTS {
        if curl().run(cluster.pod("client"))?.http_code != 200 {
            refused += 1;
        }
    }
    println!(
        "\nclient (namespace default, outside the mesh: plaintext) -> payments \
         {PAYMENTS_URL}: {refused} of {REQUESTS} refused (PeerAuthentication shop-strict)"
    );
    ensure!(
        refused == REQUESTS,
        "plaintext admitted under STRICT; proxy log:\n{}",
        proxies[1].log()
    );

    // The refusals are flows of n2's agent, with both identities.
    println!("\n$ mesh-agent observe --node {n2}   # the last refusal");
    let out = agents[1].cli(&["observe", "--node", n2])?;
    let text = String::from_utf8_lossy(&out.stdout);
    if let Some(line) = text
        .lines()
        .rev()
        .find(|l| l.contains("authorization-denied"))
    {
        println!("{line}");
    }

    let m = proxies[0].metrics_parsed()?;
    println!("\n$ curl 127.0.0.1:15020/metrics   # mesh-proxy on n1 (source side)");
    for s in m.find("istio_tcp_connections_opened_total", &[]) {
        let get = |l: &str| s.labels.get(l).map_or("", String::as_str);
        println!(
            "{}{{source_principal=\"{}\",destination_principal=\"{}\",\
             connection_security_policy=\"{}\"}} {}",
            s.name,
            get("source_principal"),
            get("destination_principal"),
            get("connection_security_policy"),
            s.value
        );
    }
    let m = proxies[1].metrics_parsed()?;
    println!("$ curl 127.0.0.1:15020/metrics   # mesh-proxy on n2 (destination side)");
    let refusals = m
        .find("mesh_proxy_hbone_refusals_total", &[])
        .chain(m.find("mesh_proxy_plaintext_refusals_total", &[]));
    for s in refusals {
        let reason = s.labels.get("reason").map_or("", String::as_str);
        println!("{}{{reason=\"{reason}\"}} {}", s.name, s.value);
    }
    Ok(())
}
