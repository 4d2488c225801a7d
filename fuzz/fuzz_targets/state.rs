//! Arbitrary bytes as a state file, through the path every state update takes: parse
//! and validate (`mesh-agent validate`, each reconcile), then both planners.
//!
//! Whatever validates must plan: with maps large enough, planning never fails; with the
//! default map sizes (what `validate` uses) it fails only with a capacity error that is
//! true (the full plan does need more entries in that map than it holds). Planning is
//! also checked to be deterministic and id-stable (replanning with the ids it returned
//! gives the same plan, and so does an agent adopting the maps it wrote, and so does the
//! agent's planner kept from an empty state), and every frontend to have a map entry of
//! its own. Policy is planned as the agent of each node
//! the state names would plan it, and the flow names and policy report the agent then
//! publishes are built from it.

#![no_main]

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use mesh_agent::flows::View;
use mesh_agent::plan::policy::{
    IdentityIds, PolicyCapacities, PolicyContext, PolicyPlan, plan_policy,
};
use mesh_agent::plan::proxy::proxy_config;
use mesh_agent::plan::{
    BackendAddr, Capacities, Ids, Plan, PlanContext, PlanError, Planner, plan,
};
use mesh_agent::state::{State, parse_str, pod_ips};
use mesh_common::maps;

/// Nodes planned for besides "" (no node: what `validate` does); more only repeat work.
const MAX_NODES: usize = 3;

/// The node's own addresses (host identity in IPCACHE); data only, never dialled.
const NODE_ADDRS: [IpAddr; 2] = [
    IpAddr::V4(std::net::Ipv4Addr::new(192, 168, 250, 1)),
    IpAddr::V6(std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)),
];

fuzz_target!(|data: &[u8]| {
    // `state::load` reads files as UTF-8: other bytes never reach the parser.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(state) = parse_str("fuzz.yaml", text) else {
        return;
    };
    let full = check_services(&state, "", &BTreeSet::new());
    // Every other backend unhealthy: health selection and its fail-open path.
    let unhealthy: BTreeSet<BackendAddr> = full.backend_addrs().into_iter().step_by(2).collect();
    for node in nodes(&state) {
        check_services(&state, node, &unhealthy);
        check_policy(&state, node);
        check_proxy(&state, node);
    }
});

/// Compiles the routes and the node proxy's configuration: deterministic, every match
/// names a rule of its table, and the snapshot survives its JSON wire format intact.
fn check_proxy(state: &State, node: &str) {
    let routes = mesh_agent::plan::routes::compile(state);
    assert_eq!(routes, mesh_agent::plan::routes::compile(state), "route compilation is not deterministic");
    for (port, table) in &routes.tables {
        for m in &table.matches {
            assert!(
                (m.rule as usize) < table.rules.len(),
                "{port:?}: a match names rule {} of {}",
                m.rule,
                table.rules.len()
            );
        }
    }
    let config = proxy_config(state, node, &routes, &[], 1, None);
    assert_eq!(config, proxy_config(state, node, &routes, &[], 1, None), "proxy config is not deterministic");
    let line = serde_json::to_string(&config).expect("the proxy config serialises");
    let back: mesh_common::l7::ProxyConfig = serde_json::from_str(&line).expect("and parses back");
    assert_eq!(back, config, "the proxy config changed on the wire");
}

/// "" and the first few nodes pods are scheduled on.
fn nodes(state: &State) -> Vec<&str> {
    let named: BTreeSet<&str> = state
        .pods()
        .filter_map(|(_, pod)| pod.spec.as_ref()?.node_name.as_deref())
        .collect();
    std::iter::once("")
        .chain(named.into_iter().take(MAX_NODES))
        .collect()
}

/// Plans the service maps; returns the plan made with unbounded maps.
fn check_services(state: &State, node: &str, unhealthy: &BTreeSet<BackendAddr>) -> Plan {
    let routes = mesh_agent::plan::routes::compile(state);
    let ctx = |capacities| PlanContext {
        node,
        unhealthy,
        capacities,
        l7_ports: &routes.l7_ports,
    };
    let unbounded = Capacities {
        services: u32::MAX,
        slots: u32::MAX,
        backends: u32::MAX,
    };
    let (full, ids) = plan(state, &Ids::default(), &ctx(unbounded))
        .unwrap_or_else(|e| panic!("validated state does not plan with unbounded maps: {e}"));
    let frontends = full.services.keys().filter(|k| !k.is_vip_marker()).count();
    assert_eq!(
        frontends,
        full.frontends.len(),
        "two frontends share one SERVICES entry"
    );
    match plan(state, &Ids::default(), &ctx(Capacities::default())) {
        Ok((plan, _)) => assert_eq!(plan, full, "map sizes changed a plan that fits"),
        Err(PlanError::Capacity { map, capacity, .. }) => {
            let needed = match map {
                maps::SERVICES => full.services.len(),
                maps::SERVICE_BACKENDS => full.slots.len(),
                maps::BACKENDS => full.backends.len(),
                other => panic!("capacity error for {other}, not a service map"),
            };
            assert!(
                needed > capacity as usize,
                "{map} reported full ({capacity}) with {needed} entries"
            );
        }
        Err(e) => panic!("unexpected error with default map sizes: {e}"),
    }
    // The agent's planner, kept from an empty state, plans this one as from scratch.
    let mut kept = Planner::new(Ids::default());
    for step in [State::default(), state.clone()] {
        let pending = kept.prepare(&Arc::new(step), &ctx(unbounded)).expect("plan");
        kept.commit(pending);
    }
    let p = kept.plan();
    assert_eq!(
        (&p.services, &p.slots, &p.backends, &p.frontends),
        (&full.services, &full.slots, &full.backends, &full.frontends),
        "planning piecewise gave another plan"
    );
    assert_eq!(kept.ids(), ids, "planning piecewise gave other ids");
    let (again, next) = plan(state, &ids, &ctx(unbounded)).expect("replan");
    assert_eq!(again, full, "replanning with its own ids changed the plan");
    assert_eq!(next, ids, "replanning changed the ids");
    // An agent restarting over these maps adopts their ids and writes nothing.
    let adopted = Ids::from_datapath(&full.services, &full.backends);
    let (again, _) = plan(state, &adopted, &ctx(unbounded)).expect("replan over the maps");
    assert_eq!(again, full, "adopting the maps' ids changed the plan");
    for frontend in &full.frontends {
        // What `services` and the logs print.
        let _ = frontend.to_string();
    }
    full
}

/// Plans policy as the agent of `node` would, with a network namespace found for every
/// address of its pods; then builds the names and report it publishes.
fn check_policy(state: &State, node: &str) {
    let local_netns: BTreeMap<IpAddr, u64> = state
        .pods()
        .filter(|(_, pod)| {
            !node.is_empty() && pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)
        })
        .flat_map(|(_, pod)| pod_ips(pod))
        .zip(1..)
        .collect();
    let ctx = |capacities| PolicyContext {
        node,
        local_netns: &local_netns,
        node_addrs: &NODE_ADDRS,
        capacities,
    };
    let unbounded = PolicyCapacities {
        endpoints: u32::MAX,
        ipcache: u32::MAX,
        policy: u32::MAX,
    };
    let (full, ids) = plan_policy(state, &IdentityIds::default(), &ctx(unbounded))
        .unwrap_or_else(|e| panic!("validated state does not plan policy: {e}"));
    match plan_policy(
        state,
        &IdentityIds::default(),
        &ctx(PolicyCapacities::default()),
    ) {
        Ok((plan, _)) => assert_eq!(plan, full, "map sizes changed a policy plan that fits"),
        Err(PlanError::PolicyCapacity {
            map,
            capacity,
            needed,
        }) => {
            assert_eq!(
                needed,
                entries(&full, map),
                "{map}: needed entries miscounted"
            );
            assert!(
                needed > capacity as usize,
                "{map} reported full ({capacity}) with {needed} entries"
            );
        }
        Err(e) => panic!("unexpected error with default policy map sizes: {e}"),
    }
    let (again, next) = plan_policy(state, &ids, &ctx(unbounded)).expect("replan policy");
    assert_eq!(
        again, full,
        "replanning with its own identities changed the plan"
    );
    assert_eq!(next, ids, "replanning changed the identities");
    for identity in &full.identities {
        let _ = identity.to_string();
    }
    for policy in &full.policies {
        let _ = policy.to_string();
    }
    let view = View::new(state, &full, node, &local_netns);
    serde_json::to_string(view.report()).expect("a policy report serializes");
}

fn entries(plan: &PolicyPlan, map: &str) -> usize {
    match map {
        maps::ENDPOINTS => plan.endpoints.len(),
        maps::IPCACHE => plan.ipcache.len(),
        maps::POLICY => plan.policy.len(),
        other => panic!("capacity error for {other}, not a policy map"),
    }
}
