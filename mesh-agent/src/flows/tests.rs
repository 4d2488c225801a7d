use std::net::IpAddr;

use mesh_common::{Addr, service::Protocol};

use super::*;
use crate::{
    plan::policy::{PolicyCapacities, PolicyContext, plan_policy},
    report::FlowFilter,
    state::parse_str,
};

/// Two pods of prod on n1 (client, two replicas of db share one identity) and a
/// policy isolating db for ingress.
const STATE: &str = "---
apiVersion: v1
kind: Namespace
metadata: {name: prod}
---
apiVersion: v1
kind: Pod
metadata: {name: client, namespace: prod, labels: {app: client}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.10}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: prod, labels: {app: db}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.11}
---
apiVersion: v1
kind: Pod
metadata: {name: db-2, namespace: prod, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.2.11}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-in, namespace: prod}
spec: {podSelector: {matchLabels: {app: db}}, policyTypes: [Ingress]}
";

fn view() -> View {
    let state = parse_str("s.yaml", STATE).expect("state");
    let local: BTreeMap<IpAddr, u64> = [("10.244.1.10".parse().expect("ip"), 1)].into();
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &local,
        node_addrs: &[],
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state, &IdentityIds::default(), &ctx).expect("plan");
    View::new(&state, &plan, "n1", &local)
}

use crate::plan::policy::IdentityIds;

fn id_of(view: &View, pod: &str) -> u32 {
    view.report()
        .identities
        .iter()
        .find(|i| i.pods.iter().any(|p| p == pod))
        .expect("identity")
        .id
}

fn event(
    direction: Direction,
    verdict: Verdict,
    src: &str,
    dst: &str,
    src_id: u32,
    dst_id: u32,
) -> FlowEvent {
    let addr = |s: &str| {
        if s.is_empty() {
            Addr([0; 4])
        } else {
            Addr::from(s.parse::<IpAddr>().expect("ip"))
        }
    };
    FlowEvent {
        timestamp_ns: 0,
        src: addr(src),
        dst: addr(dst),
        src_identity: src_id,
        dst_identity: dst_id,
        src_port: if src.is_empty() { 0 } else { 40000u16.to_be() },
        dst_port: 8081u16.to_be(),
        proto: Protocol::Tcp as u8,
        direction: direction as u8,
        verdict: verdict as u8,
        reason: Reason::PolicyDenied as u8,
        _pad: 0,
    }
}

#[test]
fn egress_source_pod_comes_from_an_identity_with_one_pod() {
    let v = view();
    let (client, db) = (id_of(&v, "prod/client"), id_of(&v, "prod/db-1"));
    let flow = v.flow(
        &event(
            Direction::Egress,
            Verdict::Dropped,
            "",
            "10.244.2.11",
            client,
            db,
        ),
        "T".into(),
    );
    assert_eq!(flow.source.pod.as_deref(), Some("prod/client"));
    assert_eq!(flow.source.ip, Some("10.244.1.10".parse().expect("ip")));
    assert_eq!(flow.source.port, 0);
    assert_eq!(
        flow.source.labels,
        [("app".to_owned(), "client".to_owned())].into()
    );
    assert_eq!(flow.destination.pod.as_deref(), Some("prod/db-2"));
    assert_eq!(flow.destination.identity_name, "prod {app=db}");
    assert_eq!(
        (flow.direction, flow.verdict, flow.reason),
        (
            Direction::Egress,
            Verdict::Dropped,
            Some(Reason::PolicyDenied)
        )
    );
    assert_eq!(
        flow.line(),
        format!(
            "T prod/client (ID:{client}) -> prod/db-2:8081 (ID:{db}) EGRESS DROPPED TCP policy-denied"
        )
    );
}

#[test]
fn egress_source_of_a_shared_identity_stays_unknown() {
    let v = view();
    let db = id_of(&v, "prod/db-1");
    let flow = v.flow(
        &event(Direction::Egress, Verdict::Audit, "", "10.244.1.10", db, 2),
        "T".into(),
    );
    assert_eq!((flow.source.pod, flow.source.ip), (None, None));
    assert_eq!(flow.verdict, Verdict::Audit);
}

#[test]
fn ingress_peers_are_named_by_address_and_json_round_trips() {
    let v = view();
    let flow = v.flow(
        &event(
            Direction::Ingress,
            Verdict::Dropped,
            "10.0.0.9",
            "10.244.1.11",
            2,
            id_of(&v, "prod/db-1"),
        ),
        "T".into(),
    );
    assert_eq!(flow.source.pod, None);
    assert_eq!(flow.source.identity_name, "world");
    assert_eq!(flow.source.port, 40000);
    assert_eq!(flow.destination.pod.as_deref(), Some("prod/db-1"));
    let json = serde_json::to_value(&flow).expect("json");
    assert_eq!(json["direction"], "INGRESS");
    assert_eq!(json["verdict"], "DROPPED");
    assert_eq!(json["reason"], "policy-denied");
    assert_eq!(json["proto"], "TCP");
    assert_eq!(serde_json::from_value::<Flow>(json).expect("parse"), flow);
    assert!(
        flow.line()
            .starts_with("T 10.0.0.9:40000 (world) -> prod/db-1:8081"),
        "{}",
        flow.line()
    );
    // The judged pod is the destination (ingress): the policy isolating it is named.
    assert_eq!(flow.policies, vec!["prod/db-in".to_owned()]);
    assert!(
        flow.line().ends_with("(isolated by prod/db-in)"),
        "{}",
        flow.line()
    );
}

#[test]
fn report_lists_policies_identities_and_local_pods() {
    let v = view();
    let r = v.report();
    assert_eq!(r.policies.len(), 1);
    assert_eq!(r.policies[0].name, "prod/db-in");
    assert!(r.policies[0].ingress && !r.policies[0].egress);
    assert_eq!(r.policies[0].selects, ["prod/db-1", "prod/db-2"]);
    let local: Vec<(&str, bool)> = r
        .local_pods
        .iter()
        .map(|p| (p.pod.as_str(), p.discovered))
        .collect();
    assert_eq!(local, [("prod/client", true), ("prod/db-1", false)]);
}

#[test]
fn filters_match_verdict_and_either_pod() {
    let v = view();
    let (client, db) = (id_of(&v, "prod/client"), id_of(&v, "prod/db-1"));
    let flow = v.flow(
        &event(
            Direction::Egress,
            Verdict::Dropped,
            "",
            "10.244.1.11",
            client,
            db,
        ),
        "T".into(),
    );
    let f = |verdict, pod: Option<&str>| {
        FlowFilter {
            verdict,
            pod: pod.map(str::to_owned),
        }
        .matches(&flow)
    };
    assert!(f(None, None));
    assert!(f(Some(Verdict::Dropped), Some("prod/client")));
    assert!(f(None, Some("prod/db-1")));
    assert!(!f(Some(Verdict::Audit), None));
    assert!(!f(None, Some("prod/db-2")));
}

#[test]
fn log_keeps_the_newest_and_followers_see_each_flow_once() {
    let log = FlowLog::default();
    let v = view();
    let flow = |i: usize| {
        v.flow(
            &event(Direction::Egress, Verdict::Dropped, "", "10.244.1.11", 1, 2),
            i.to_string(),
        )
    };
    for i in 0..FLOW_CAPACITY + 5 {
        log.push(flow(i));
    }
    let stored = log.stored();
    assert_eq!(stored.len(), FLOW_CAPACITY);
    assert_eq!(stored[0].time, "5");
    let (backlog, mut rx) = log.follow();
    assert_eq!(backlog.len(), FLOW_CAPACITY);
    log.push(flow(99));
    assert_eq!(rx.try_recv().expect("new flow").time, "99");
    assert!(rx.try_recv().is_err());
}

#[test]
fn times_are_rfc3339_utc() {
    assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
    assert_eq!(
        rfc3339(1_700_000_000_123_456_789),
        "2023-11-14T22:13:20.123456789Z"
    );
    assert_eq!(
        rfc3339(951_782_400_000_000_000),
        "2000-02-29T00:00:00.000000000Z"
    );
    assert_eq!(
        rfc3339(1_795_681_201_123_000_000).get(..23),
        Some("2026-11-26T08:20:01.123")
    );
}

#[test]
fn events_of_the_wrong_size_are_rejected() {
    assert!(decode(&[0; 63]).is_none());
    let e = event(
        Direction::Ingress,
        Verdict::Dropped,
        "10.0.0.1",
        "10.244.1.11",
        2,
        3,
    );
    assert_eq!(decode(crate::sys::pod_bytes(&e)), Some(e));
}
