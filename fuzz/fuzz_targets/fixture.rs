//! The cluster the flow_event and admin targets name flows against: two namespaces on
//! two nodes, dual-stack pods, identities of one and of two pods, and ipBlock prefixes
//! (every way a peer gets its name), planned as node n1's agent plans it.

use std::collections::BTreeMap;
use std::net::IpAddr;

use mesh_agent::flows::View;
use mesh_agent::plan::policy::{IdentityIds, PolicyCapacities, PolicyContext, plan_policy};
use mesh_agent::state::parse_str;

/// The state. Identities are numbered from 256 in (namespace, labels) order, then the
/// prefixes.
pub const STATE: &str = include_str!("../corpus/state/seed-flows.yaml");

/// The names node n1's agent gives flows, with `local_netns` the local pods it found.
pub fn view(local_netns: &BTreeMap<IpAddr, u64>) -> View {
    let state = parse_str("flows.yaml", STATE).expect("fixture state");
    let ctx = PolicyContext {
        node: "n1",
        local_netns,
        node_addrs: &[],
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state, &IdentityIds::default(), &ctx).expect("fixture plan");
    View::new(&state, &plan, "n1", local_netns)
}
