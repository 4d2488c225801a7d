//! `cargo xtask bench sources`: the cluster state sources at scale, with three agents
//! on three nodes. For each size (N Services with 3 endpoints each, one EndpointSlice
//! per Service; 1,000 NetworkPolicies over 1,000 Pods once N reaches 10,000): the
//! time from the write to every node having applied it, the agents' RSS, and the cost
//! of one Service changing (write to all applied, and the planner's and the map
//! writes' share), via files (the baseline: each agent reads the same directory) and
//! via etcd (`mesh-agent apply --wait` into a three-member cluster, one member in each
//! node's namespace), with etcd's database size.

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use mesh_tests::{Agent, Cluster, StateDir, etcd::EtcdCluster};

use crate::{bench::median, build, setup};

const NODES: [&str; 3] = ["n1", "n2", "n3"];
/// Endpoints per Service.
const ENDPOINTS: u32 = 3;
/// NetworkPolicies (and the Pods they select) from this many Services on.
const POLICIES_FROM: u32 = 10_000;
const POLICIES: u32 = 1_000;
/// How long one convergence may take.
const CONVERGE: Duration = Duration::from_secs(600);

/// One source's results at one size.
#[derive(Default)]
struct SourceResult {
    /// Write → every node applied, seconds.
    converge_s: f64,
    /// Of which the writer's own part (etcd: `apply` reading, validating and writing).
    write_s: f64,
    /// Largest agent RSS after converging, bytes.
    rss_bytes: u64,
    /// One Service changed: write → every node applied, seconds, per update.
    update_s: Vec<f64>,
    /// Of which the writer's own part, per update.
    update_write_s: Vec<f64>,
    /// The planner's time for that change (median over agents), seconds, per update.
    plan_s: Vec<f64>,
    /// The map writes' time for that change, seconds, per update.
    maps_s: Vec<f64>,
    /// Services the planner planned for that change (largest over agents), per update.
    planned: Vec<f64>,
    /// Map entries written or removed for that change (largest over agents), per update.
    writes: Vec<f64>,
    /// etcd's database size (largest member), bytes.
    db_bytes: u64,
}

/// Runs the benchmark at `sizes` Services, with `updates` single-Service changes each.
pub fn run(sizes: &[u32], updates: u32) -> Result<()> {
    crate::require_root("bench")?;
    setup::run()?;
    let bins = build::run(build::Profile::Release)?;
    crate::use_binaries(&bins);
    let cluster = NODES
        .iter()
        .fold(Cluster::builder("bsrc"), |b, n| b.node(n))
        .build()?;
    println!(
        "sources: {} agents; N Services x {ENDPOINTS} endpoints (+{POLICIES} NetworkPolicies from \
         {POLICIES_FROM}); write -> all nodes applied; {updates} single-Service updates per size",
        NODES.len()
    );
    let mut rows = Vec::new();
    for &n in sizes {
        let files = measure_files(&cluster, n, updates)?;
        print_source(n, "files", &files);
        let etcd = measure_etcd(&cluster, n, updates)?;
        print_source(n, "etcd", &etcd);
        rows.push((n, files, etcd));
    }
    let mut report =
        String::from("\nsources (etcd / files ratios, medians; p99 of the updates):\n");
    for (n, files, etcd) in &rows {
        let ratio = |a: f64, b: f64| a / b.max(1e-9);
        let _ = writeln!(
            report,
            "  {n:>6} Services: converge files {:.2} s, etcd {:.2} s (x{:.2}; etcd apply itself {:.2} s)\n\
             \x20                 agent RSS files {:.1} MiB, etcd {:.1} MiB (x{:.2}); etcd db {:.1} MiB\n\
             \x20                 1 Service changed: files p50 {:.0} ms p99 {:.0} ms, etcd p50 {:.0} ms p99 {:.0} ms (x{:.2}; etcd apply itself {:.0} ms)\n\
             \x20                 planner per change p50 files {:.1} ms, etcd {:.1} ms; map writes {:.2} / {:.2} ms\n\
             \x20                 per change: Services planned {:.0} / {:.0}, map entries written {:.0} / {:.0}",
            files.converge_s,
            etcd.converge_s,
            ratio(etcd.converge_s, files.converge_s),
            etcd.write_s,
            mib(files.rss_bytes),
            mib(etcd.rss_bytes),
            ratio(etcd.rss_bytes as f64, files.rss_bytes as f64),
            mib(etcd.db_bytes),
            median(&files.update_s) * 1e3,
            p99(&files.update_s) * 1e3,
            median(&etcd.update_s) * 1e3,
            p99(&etcd.update_s) * 1e3,
            ratio(median(&etcd.update_s), median(&files.update_s)),
            median(&etcd.update_write_s) * 1e3,
            median(&files.plan_s) * 1e3,
            median(&etcd.plan_s) * 1e3,
            median(&files.maps_s) * 1e3,
            median(&etcd.maps_s) * 1e3,
            median(&files.planned),
            median(&etcd.planned),
            median(&files.writes),
            median(&etcd.writes),
        );
    }
    println!("{report}");
    write_report(&rows)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The largest of a few samples stands for the 99th percentile.
fn p99(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let i = ((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1);
    v.get(i).copied().unwrap_or(f64::NAN)
}

fn print_source(n: u32, name: &str, r: &SourceResult) {
    println!(
        "  {n:>6} {name:<5}: converge {:.2} s, RSS {:.1} MiB, update p50 {:.0} ms, plan p50 {:.1} ms",
        r.converge_s,
        mib(r.rss_bytes),
        median(&r.update_s) * 1e3,
        median(&r.plan_s) * 1e3
    );
}

/// The address `base.X.Y` of the `i`th object (250 per /24, from .1).
fn addr(base: &str, i: u32) -> String {
    format!("{base}.{}.{}", i / 250, i % 250 + 1)
}

/// Service `i` (port `port`) and its EndpointSlice of [`ENDPOINTS`] endpoints, as YAML
/// documents.
fn service(i: u32, port: u32) -> String {
    let endpoints: Vec<String> = (0..ENDPOINTS)
        .map(|k| {
            format!(
                "{{addresses: ['{}'], nodeName: n{}}}",
                addr("10.244", i * ENDPOINTS + k),
                k % 3 + 1
            )
        })
        .collect();
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: bench}}\n\
         spec: {{clusterIP: {}, ports: [{{port: {port}, targetPort: 8080}}]}}\n\
         ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
         metadata: {{name: s{i}-1, namespace: bench, labels: {{kubernetes.io/service-name: s{i}}}}}\n\
         addressType: IPv4\nports: [{{port: 8080}}]\nendpoints: [{}]\n",
        addr("10.96", i),
        endpoints.join(", ")
    )
}

/// The whole state at `n` Services; Service 0 has port `port0`.
fn state(n: u32, port0: u32) -> String {
    let mut yaml = String::with_capacity(n as usize * 700);
    yaml.push_str("apiVersion: v1\nkind: Namespace\nmetadata: {name: bench}\n");
    for i in 0..n {
        yaml.push_str(&service(i, if i == 0 { port0 } else { 80 }));
    }
    if n >= POLICIES_FROM {
        for j in 0..POLICIES {
            let _ = write!(
                yaml,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{j}, namespace: bench, labels: {{app: a{j}}}}}\n\
                 spec: {{nodeName: n{}, containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: {}}}\n\
                 ---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{j}, namespace: bench}}\n\
                 spec: {{podSelector: {{matchLabels: {{app: a{j}}}}}, policyTypes: [Ingress],\n\
                 ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}], ports: [{{port: http}}]}}]}}\n",
                j % 3 + 1,
                addr("10.244", j * ENDPOINTS),
                (j + 1) % POLICIES
            );
        }
    }
    yaml
}

/// Map sizes with room for the largest state.
const MAP_FLAGS: [&str; 4] = [
    "--map-size-services",
    "65536",
    "--map-size-backend-slots",
    "262144",
];

/// Waits until every agent applied a state newer than `before` (their `applied`
/// counts) and has nothing newer pending, or `revision` when given.
fn wait_applied(agents: &[Agent], before: &[u64], revision: Option<u64>) -> Result<()> {
    let deadline = Instant::now() + CONVERGE;
    for (agent, &prior) in agents.iter().zip(before) {
        loop {
            let s = agent.admin_status()?;
            let done = match revision {
                Some(r) => s.source.applied_revision >= r,
                None => s.applied > prior && s.source.applied_revision == s.source.revision,
            };
            if done && s.last_reconcile_ok {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "agent {} did not converge within {CONVERGE:?}: {s:?}\n{}",
                    agent.pin_name(),
                    agent.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    Ok(())
}

fn applied_counts(agents: &[Agent]) -> Result<Vec<u64>> {
    agents
        .iter()
        .map(|a| Ok(a.admin_status()?.applied))
        .collect()
}

/// Largest VmRSS of the agents, bytes.
fn max_rss(agents: &[Agent]) -> Result<u64> {
    let mut max = 0;
    for agent in agents {
        let pid = agent.pid().context("agent not running")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS")?;
        max = max.max(kib * 1024);
    }
    Ok(max)
}

/// Records the cost of the last apply: the planner's and the map writes' time (median
/// over agents), the Services planned and the map entries written (largest over agents).
fn record_plan_cost(agents: &[Agent], r: &mut SourceResult) -> Result<()> {
    let mut plan = Vec::new();
    let mut maps = Vec::new();
    let (mut planned, mut writes) = (0u64, 0u64);
    for agent in agents {
        let s = agent.admin_status()?;
        plan.push(s.last_plan_us as f64 / 1e6);
        maps.push(s.last_apply_us as f64 / 1e6);
        planned = planned.max(s.last_plan_services);
        writes = writes.max(s.last_map_writes);
    }
    r.plan_s.push(median(&plan));
    r.maps_s.push(median(&maps));
    r.planned.push(planned as f64);
    r.writes.push(writes as f64);
    Ok(())
}

/// Checks that every agent programmed `n` frontends (its last "state applied" line).
fn check_frontends(agents: &[Agent], n: u32) -> Result<()> {
    for agent in agents {
        let log = agent.log();
        let last = log
            .lines()
            .rev()
            .find(|l| l.contains("state applied"))
            .unwrap_or_default();
        if !last.contains(&format!("frontends={n} ")) {
            bail!(
                "agent {} did not program {n} frontends: {last}",
                agent.pin_name()
            );
        }
    }
    Ok(())
}

fn measure_files(cluster: &Cluster, n: u32, updates: u32) -> Result<SourceResult> {
    let dir = StateDir::new("bench-sources")?;
    let agents = NODES
        .iter()
        .map(|node| Agent::start_with(cluster.node(node), dir.path(), &MAP_FLAGS))
        .collect::<Result<Vec<_>>>()?;
    let mut r = SourceResult::default();
    let text = state(n, 80);
    let before = applied_counts(&agents)?;
    let start = Instant::now();
    dir.write("state.yaml", &text)?;
    r.write_s = start.elapsed().as_secs_f64();
    wait_applied(&agents, &before, None)?;
    r.converge_s = start.elapsed().as_secs_f64();
    check_frontends(&agents, n)?;
    r.rss_bytes = max_rss(&agents)?;
    for u in 0..updates {
        let text = state(n, 81 + u);
        let before = applied_counts(&agents)?;
        let start = Instant::now();
        dir.write("state.yaml", &text)?;
        r.update_write_s.push(start.elapsed().as_secs_f64());
        wait_applied(&agents, &before, None)?;
        r.update_s.push(start.elapsed().as_secs_f64());
        record_plan_cost(&agents, &mut r)?;
    }
    Ok(r)
}

fn measure_etcd(cluster: &Cluster, n: u32, updates: u32) -> Result<SourceResult> {
    let etcd = EtcdCluster::start(cluster, &NODES, None)?;
    let agents = NODES
        .iter()
        .map(|node| Agent::start_with_source(cluster.node(node), &etcd.agent_flags(), &MAP_FLAGS))
        .collect::<Result<Vec<_>>>()?;
    let dir = StateDir::new("bench-sources-etcd")?;
    let path = dir.path().to_str().context("path")?.to_owned();
    let mut r = SourceResult::default();
    dir.write("state.yaml", &state(n, 80))?;
    let start = Instant::now();
    let revision = apply(&etcd, cluster, &path)?;
    r.write_s = start.elapsed().as_secs_f64();
    wait_applied(&agents, &[0; 3], Some(revision))?;
    r.converge_s = start.elapsed().as_secs_f64();
    check_frontends(&agents, n)?;
    r.rss_bytes = max_rss(&agents)?;
    r.db_bytes = db_size(&etcd, cluster)?;
    // One Service changed: only it is written.
    let one = StateDir::new("bench-sources-one")?;
    let one_path = one.path().to_str().context("path")?.to_owned();
    for u in 0..updates {
        one.write("s0.yaml", &service(0, 81 + u))?;
        let start = Instant::now();
        let revision = apply(&etcd, cluster, &one_path)?;
        r.update_write_s.push(start.elapsed().as_secs_f64());
        wait_applied(&agents, &[0; 3], Some(revision))?;
        r.update_s.push(start.elapsed().as_secs_f64());
        record_plan_cost(&agents, &mut r)?;
    }
    Ok(r)
}

/// `mesh-agent apply -f path` from n1; the revision written.
fn apply(etcd: &EtcdCluster, cluster: &Cluster, path: &str) -> Result<u64> {
    let out = etcd.mesh_agent(cluster, "n1", &["apply", "-f", path])?;
    out.lines()
        .find_map(|l| l.strip_prefix("revision "))
        .and_then(|r| r.trim().parse().ok())
        .with_context(|| format!("no revision in the output of apply: {out}"))
}

/// The largest member database, bytes.
fn db_size(etcd: &EtcdCluster, cluster: &Cluster) -> Result<u64> {
    let out = etcd.etcdctl(cluster, "n1", &["endpoint", "status", "-w", "json"])?;
    let members: serde_json::Value = serde_json::from_str(&out).context("endpoint status")?;
    Ok(members
        .as_array()
        .map(|m| {
            m.iter()
                .filter_map(|m| {
                    m.pointer("/Status/dbSize")
                        .and_then(serde_json::Value::as_u64)
                })
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0))
}

fn write_report(rows: &[(u32, SourceResult, SourceResult)]) -> Result<()> {
    let entry = |r: &SourceResult| {
        serde_json::json!({
            "converge_seconds": r.converge_s,
            "write_seconds": r.write_s,
            "agent_rss_bytes": r.rss_bytes,
            "update_p50_seconds": median(&r.update_s),
            "update_p99_seconds": p99(&r.update_s),
            "update_write_p50_seconds": median(&r.update_write_s),
            "plan_per_change_p50_seconds": median(&r.plan_s),
            "map_writes_per_change_p50_seconds": median(&r.maps_s),
            "services_planned_per_change_p50": median(&r.planned),
            "map_entries_written_per_change_p50": median(&r.writes),
            "etcd_db_bytes": r.db_bytes,
        })
    };
    let report: Vec<_> = rows
        .iter()
        .map(|(n, files, etcd)| {
            serde_json::json!({
                "services": n,
                "files": entry(files),
                "etcd": entry(etcd),
                "etcd_over_files_converge": etcd.converge_s / files.converge_s.max(1e-9),
                "etcd_over_files_update_p50": median(&etcd.update_s) / median(&files.update_s).max(1e-9),
            })
        })
        .collect();
    let path = build::workspace_root().join("target/bench/sources.json");
    std::fs::create_dir_all(path.parent().context("report path")?)?;
    std::fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!("report: {}", path.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_states_have_the_promised_shape() {
        let small = state(2, 80);
        assert_eq!(small.matches("kind: Service\n").count(), 2);
        assert_eq!(small.matches("kind: EndpointSlice").count(), 2);
        assert_eq!(small.matches("addresses:").count(), 6);
        assert!(!small.contains("NetworkPolicy"));
        let large = state(POLICIES_FROM, 81);
        assert_eq!(
            large.matches("kind: NetworkPolicy").count(),
            POLICIES as usize
        );
        assert!(large.contains("ports: [{port: 81, targetPort: 8080}]"));
        assert_eq!(p99(&[1.0, 2.0, 3.0]), 3.0);
    }
}
