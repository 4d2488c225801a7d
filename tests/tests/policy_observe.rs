//! Observing policy end to end (root only): the verdicts the kernel reports on its ring
//! buffer reach `mesh-agent observe` through the agent's admin socket, named by pod and
//! identity; `mesh-agent policy` shows what selects a pod and what the kernel holds for
//! it; the verdict counters reach /metrics; audit mode lets denied flows pass and
//! reports them.
//!
//! As in `policy_egress.rs`, client pods get an idle "anchor" process (the agent only
//! knows a pod's netns while a process lives in it), and each test waits until a
//! known-denied probe is refused or dropped before asserting anything. Flow events are
//! asynchronous, so flows are awaited with a bound, never assumed.

use std::time::Duration;

use anyhow::Result;
use mesh_tests::{
    Agent, eventually, require_root,
    scenario::{Bed, CONVERGE, DROPPED, Mode::Tcp, PodDef, pod},
};
use serde_json::Value;

/// Per-step timeout of probing clients: what a dropped SYN costs.
const TIMEOUT: Duration = Duration::from_millis(300);

/// A bed on `nodes` with `pods` (servers and anchors), the Pods and `policies` written.
fn bed(prefix: &str, nodes: &[&str], pods: &[PodDef], policies: &str) -> Result<Bed> {
    let mut bed = Bed::new(prefix, nodes, pods)?.with_client_timeout(TIMEOUT);
    bed.anchor_idle_pods()?;
    bed.state.write("pods.yaml", &bed.pods_yaml())?;
    bed.state.write("policies.yaml", policies)?;
    Ok(bed)
}

/// The first flow of `agent` (with observe `args`) that `matches`, waiting for it.
fn wait_flow(agent: &Agent, args: &[&str], matches: impl Fn(&Value) -> bool) -> Value {
    let mut seen = Vec::new();
    let mut found = None;
    eventually(CONVERGE, || {
        seen = agent
            .flows(args)
            .unwrap_or_else(|e| panic!("observe {args:?}: {e:#}"));
        found = seen.iter().find(|f| matches(f)).cloned();
        found.is_some()
    });
    found.unwrap_or_else(|| {
        panic!(
            "no matching flow from observe {args:?}; flows: {seen:#?}\nlog:\n{}",
            agent.log()
        )
    })
}

fn is(flow: &Value, direction: &str, verdict: &str, src: &str, dst: &str, port: u16) -> bool {
    flow["direction"] == direction
        && flow["verdict"] == verdict
        && flow["source"]["pod"] == src
        && flow["destination"]["pod"] == dst
        && flow["destination"]["port"] == port
}

/// The value of the exposition line `series` (exact labels), or 0 when absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

const POLICIES: &str = "---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: client-egress, namespace: prod}
spec:
  podSelector: {matchLabels: {app: client}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{protocol: TCP, port: 8081}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-ingress, namespace: prod}
spec:
  podSelector: {matchLabels: {app: db}}
  policyTypes: [Ingress]
  ingress:
  - from: [{podSelector: {matchLabels: {app: client}}}]
    ports: [{protocol: TCP, port: 8081}]
";

#[test]
fn denied_flows_are_observed_filtered_explained_and_counted() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
        pod("n1", "prod", "other", "10.244.1.12", "app: other", &[]),
        pod(
            "n2",
            "prod",
            "db",
            "10.244.2.11",
            "app: db",
            &[("sql", 8081, "TCP"), ("admin", 8200, "TCP")],
        ),
    ];
    let bed = bed("pobs", &["n1", "n2"], PODS, POLICIES)?;
    let a1 = bed.start_agent("n1", &[])?;
    let a2 = bed.start_agent("n2", &[])?;

    // (a) Egress: client may reach db:8081 only; 8200 is refused at connect().
    bed.wait_for(&[&a1], "client", ("db", 8200, Tcp), 1, "EPERM");
    assert_eq!(
        bed.probe_count("client", ("db", 8081, Tcp), 2),
        "ok",
        "client -> db:8081 allowed both ways"
    );
    let egress = wait_flow(&a1, &[], |f| {
        is(f, "EGRESS", "DROPPED", "prod/client", "prod/db", 8200)
    });
    assert_eq!(egress["reason"], "policy-denied", "{egress}");
    assert_eq!(egress["proto"], "TCP", "{egress}");
    assert_eq!(
        egress["destination"]["ip"],
        bed.ip("db").to_string(),
        "{egress}"
    );
    assert_eq!(
        egress["source"]["ip"],
        bed.ip("client").to_string(),
        "{egress}"
    );
    assert_eq!(egress["source"]["labels"]["app"], "client", "{egress}");

    // (b) Ingress: other is not isolated for egress, but db only admits app=client: the
    // SYN is dropped at db's node, the client times out.
    bed.wait_for(&[&a1, &a2], "other", ("db", 8081, Tcp), 1, DROPPED);
    let ingress = wait_flow(&a2, &[], |f| {
        is(f, "INGRESS", "DROPPED", "prod/other", "prod/db", 8081)
    });
    assert_eq!(
        ingress["source"]["ip"],
        bed.ip("other").to_string(),
        "{ingress}"
    );
    assert_eq!(ingress["reason"], "policy-denied", "{ingress}");
    assert!(
        ingress["source"]["port"].as_u64().is_some_and(|p| p != 0),
        "ingress knows the source port: {ingress}"
    );

    // (c) Filters.
    let other = a2.flows(&["--verdict", "dropped", "--pod", "prod/other"])?;
    assert!(!other.is_empty());
    assert!(
        other.iter().all(|f| f["verdict"] == "DROPPED"
            && (f["source"]["pod"] == "prod/other" || f["destination"]["pod"] == "prod/other")),
        "{other:#?}"
    );
    assert_eq!(
        a2.flows(&["--pod", "prod/client"])?,
        Vec::<Value>::new(),
        "client's allowed flows are not reported"
    );
    assert_eq!(
        a1.flows(&["--verdict", "audit"])?,
        Vec::<Value>::new(),
        "no audit without --policy-audit"
    );
    assert_eq!(
        a1.flows(&["--pod", "prod/other"])?,
        Vec::<Value>::new(),
        "other's egress is not denied"
    );

    // Text output, Hubble-like.
    let out = a1.cli(&["observe", "--node", a1.pin_name(), "--pod", "prod/client"])?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.lines().any(|l| l.contains(" prod/client (ID:")
            && l.contains("-> prod/db:8200 (ID:")
            && l.contains("EGRESS DROPPED TCP policy-denied (isolated by prod/")),
        "{text}"
    );

    // --follow: the stored flows, then new ones as they happen.
    let stored = a1.flows(&["--verdict", "dropped"])?.len();
    let mut follower = a1.follow_flows(bed.cluster.node("n1"), &["--verdict", "dropped"])?;
    for _ in 0..stored {
        follower.wait_for_stdout_line(CONVERGE, |_| true)?;
    }
    assert_eq!(bed.probe_count("client", ("db", 8200, Tcp), 1), "EPERM");
    let line = follower.wait_for_stdout_line(CONVERGE, |_| true)?;
    let live: Value = serde_json::from_str(&line)?;
    assert!(
        is(&live, "EGRESS", "DROPPED", "prod/client", "prod/db", 8200),
        "{live}"
    );
    drop(follower);

    // (e) What selects db, and the entries its node's kernel holds for it.
    let db = a2.policy(&["--pod", "prod/db"])?;
    assert!(db.contains("prod/db-ingress (isolates: ingress)"), "{db}");
    assert!(
        db.lines().any(|l| l.contains("INGRESS allow")
            && l.contains("prod {app=client}")
            && l.contains("TCP port 8081")
            && l.contains("prod/db-ingress")),
        "{db}"
    );
    assert!(db.lines().any(|l| l.contains("INGRESS isolated")), "{db}");
    let client = a1.policy(&["--pod", "prod/client"])?;
    assert!(
        client.contains("prod/client-egress (isolates: egress)"),
        "{client}"
    );
    assert!(
        client.lines().any(|l| l.contains("EGRESS  allow")
            && l.contains("prod {app=db}")
            && l.contains("TCP port 8081")),
        "{client}"
    );
    let unknown = a1.cli(&["policy", "--node", a1.pin_name(), "--pod", "prod/db"])?;
    assert!(!unknown.status.success(), "db is not a pod of n1");
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("not a pod of node"),
        "{unknown:?}"
    );

    // (f) Counters.
    let m1 = a1.metrics()?;
    assert!(
        metric(
            &m1,
            r#"mesh_policy_verdicts_total{direction="egress",verdict="dropped"}"#
        ) >= 2.0,
        "{m1}"
    );
    assert!(
        metric(
            &m1,
            r#"mesh_drops_total{direction="egress",reason="policy-denied"}"#
        ) >= 2.0,
        "{m1}"
    );
    let m2 = a2.metrics()?;
    assert!(
        metric(
            &m2,
            r#"mesh_policy_verdicts_total{direction="ingress",verdict="dropped"}"#
        ) >= 1.0,
        "{m2}"
    );
    assert!(
        metric(
            &m2,
            r#"mesh_drops_total{direction="ingress",reason="policy-denied"}"#
        ) >= 1.0,
        "{m2}"
    );
    assert_eq!(
        metric(
            &m2,
            r#"mesh_policy_verdicts_total{direction="egress",verdict="dropped"}"#
        ),
        0.0,
        "{m2}"
    );
    Ok(())
}

#[test]
fn audit_mode_lets_denied_flows_pass_and_reports_them() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    const PODS: &[PodDef] = &[
        pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
        pod(
            "n1",
            "prod",
            "db",
            "10.244.1.11",
            "app: db",
            &[("admin", 8200, "TCP")],
        ),
    ];
    let bed = bed("paudit", &["n1"], PODS, POLICIES)?;
    let a1 = bed.start_agent("n1", &["--policy-audit"])?;
    // Denied twice over (client egress allows 8081 only, db ingress too), yet every
    // connection goes through; the agent reports both would-be denials.
    let mut outcomes = Vec::new();
    let egress = eventually(CONVERGE, || {
        outcomes.push(bed.probe_count("client", ("db", 8200, Tcp), 1));
        a1.flows(&["--verdict", "audit"]).is_ok_and(|flows| {
            flows
                .iter()
                .any(|f| is(f, "EGRESS", "AUDIT", "prod/client", "prod/db", 8200))
        })
    });
    assert!(
        egress,
        "no EGRESS AUDIT flow; flows: {:#?}\nlog:\n{}",
        a1.flows(&[]),
        a1.log()
    );
    assert!(
        outcomes.iter().all(|o| o == "ok"),
        "audit mode must not deny: {outcomes:?}"
    );
    let ingress = wait_flow(&a1, &["--verdict", "audit", "--pod", "prod/db"], |f| {
        is(f, "INGRESS", "AUDIT", "prod/client", "prod/db", 8200)
    });
    assert_eq!(ingress["reason"], "policy-denied", "{ingress}");
    assert_eq!(
        a1.flows(&["--verdict", "dropped"])?,
        Vec::<Value>::new(),
        "nothing dropped in audit mode"
    );

    let m = a1.metrics()?;
    assert!(
        metric(
            &m,
            r#"mesh_policy_verdicts_total{direction="egress",verdict="audit"}"#
        ) >= 1.0,
        "{m}"
    );
    assert!(
        metric(
            &m,
            r#"mesh_policy_verdicts_total{direction="ingress",verdict="audit"}"#
        ) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            r#"mesh_policy_verdicts_total{direction="egress",verdict="dropped"}"#
        ),
        0.0,
        "{m}"
    );

    // A restart without the flag switches audit off: the same connection is refused.
    drop(a1);
    let a1 = bed.start_agent("n1", &[])?;
    bed.wait_for(&[&a1], "client", ("db", 8200, Tcp), 1, "EPERM");
    Ok(())
}
