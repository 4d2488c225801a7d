use std::fmt::Write as _;

use super::*;
use crate::plan::{Ids, plan};
use crate::state::parse_str;

/// A slice endpoint: (address number, node, ready).
type SliceEndpoint = (u32, u32, bool);

/// A small cluster that random edits change: Services selecting Pods by label or fed by
/// EndpointSlices, Pods that come, go, relabel, stop being ready or terminate.
#[derive(Clone, Debug, Default)]
struct Model {
    /// Service number → (port, selects Pods, ClientIP affinity, prefers close).
    services: BTreeMap<u32, (u16, bool, bool, bool)>,
    /// Pod number → (the Service number its `app` label names, node, ready,
    /// terminating).
    pods: BTreeMap<u32, (u32, u32, bool, bool)>,
    /// Slice number → (Service number, endpoints).
    slices: BTreeMap<u32, (u32, Vec<SliceEndpoint>)>,
}

/// Address `n` of the block `prefix` (`10.96`, `10.244`).
fn addr(prefix: &str, n: u32) -> String {
    format!("{prefix}.{}.{}", n / 250, n % 250 + 1)
}

impl Model {
    fn yaml(&self) -> String {
        let mut y = String::new();
        for (i, &(port, selects, affinity, close)) in &self.services {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: s{i}, namespace: default}}\n\
                 spec: {{clusterIP: {}, ports: [{{name: web, port: {port}, targetPort: 8080}}, \
                 {{name: dns, port: 53, protocol: UDP}}]{}{}{}}}\n",
                addr("10.96", *i),
                if selects {
                    format!(", selector: {{app: a{i}}}")
                } else {
                    String::new()
                },
                if affinity {
                    ", sessionAffinity: ClientIP"
                } else {
                    ""
                },
                if close {
                    ", trafficDistribution: PreferClose"
                } else {
                    ""
                },
            );
        }
        for (i, &(app, node, ready, terminating)) in &self.pods {
            let _ = write!(
                y,
                "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, namespace: default, labels: {{app: a{app}}}{}}}\n\
                 spec: {{nodeName: n{node}}}\n\
                 status: {{podIP: {}, conditions: [{{type: Ready, status: '{}'}}]}}\n",
                if terminating {
                    ", deletionTimestamp: '2026-01-01T00:00:00Z'"
                } else {
                    ""
                },
                addr("10.244", *i),
                if ready { "True" } else { "False" },
            );
        }
        for (i, (svc, endpoints)) in &self.slices {
            let endpoints: Vec<String> = endpoints
                .iter()
                .map(|(a, node, ready)| {
                    format!(
                        "{{addresses: ['{}'], nodeName: n{node}, conditions: {{ready: {ready}}}}}",
                        addr("10.245", *a)
                    )
                })
                .collect();
            let _ = write!(
                y,
                "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
                 metadata: {{name: slice{i}, namespace: default, labels: {{kubernetes.io/service-name: s{svc}}}}}\n\
                 addressType: IPv4\nports: [{{name: web, port: 9090}}, {{name: dns, port: 5353, protocol: UDP}}]\nendpoints: [{}]\n",
                endpoints.join(", ")
            );
        }
        y
    }
}

/// xorshift: reproducible without a dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u32) -> u32 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % u64::from(n)) as u32
    }

    fn coin(&mut self) -> bool {
        self.below(2) == 0
    }
}

fn edit(model: &mut Model, rng: &mut Rng) {
    let i = rng.below(12) + 1;
    match rng.below(8) {
        0 => {
            let value = (
                80 + rng.below(3) as u16,
                rng.coin(),
                rng.below(4) == 0,
                rng.below(4) == 0,
            );
            model.services.insert(i, value);
        }
        1 => {
            model.services.remove(&i);
        }
        2 | 3 => {
            let pod = (
                rng.below(12) + 1,
                rng.below(3) + 1,
                rng.below(5) != 0,
                rng.below(6) == 0,
            );
            model.pods.insert(i, pod);
        }
        4 => {
            model.pods.remove(&i);
        }
        5 | 6 => {
            let endpoints = (0..rng.below(4))
                .map(|_| (rng.below(20) + 1, rng.below(3) + 1, rng.below(5) != 0))
                .collect();
            model.slices.insert(i, (rng.below(12) + 1, endpoints));
        }
        _ => {
            model.slices.remove(&i);
        }
    }
}

fn ctx<'a>(
    unhealthy: &'a BTreeSet<BackendAddr>,
    l7: &'a BTreeMap<ServicePortRef, AppProtocol>,
) -> PlanContext<'a> {
    PlanContext {
        node: "n1",
        unhealthy,
        capacities: Capacities::default(),
        l7_ports: l7,
    }
}

/// Applies `delta` to `maps` (the previous plan's).
fn apply(maps: &mut Plan, delta: &Delta) {
    for (k, v) in &delta.services.upserts {
        maps.services.insert(*k, *v);
    }
    for k in &delta.services.removals {
        maps.services.remove(k);
    }
    for (k, v) in &delta.slots.upserts {
        maps.slots.insert(*k, *v);
    }
    for k in &delta.slots.removals {
        maps.slots.remove(k);
    }
    for (k, v) in &delta.backends.upserts {
        maps.backends.insert(*k, *v);
    }
    for k in &delta.backends.removals {
        maps.backends.remove(k);
    }
}

#[test]
fn piecewise_plans_equal_plans_from_scratch_through_random_changes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut model = Model::default();
    let mut planner = Planner::default();
    let mut maps = Plan::default();
    let mut replanned = 0;
    for step in 0..400 {
        for _ in 0..=rng.below(3) {
            edit(&mut model, &mut rng);
        }
        // Health and the node proxy's ports change now and then too.
        let unhealthy: BTreeSet<BackendAddr> = (1..=20)
            .filter(|_| rng.below(8) == 0)
            .map(|i| {
                BackendAddr::new(
                    format!("{}:9090", addr("10.245", i)).parse().unwrap(),
                    PROTO_TCP,
                )
            })
            .collect();
        let l7: BTreeMap<ServicePortRef, AppProtocol> = (1..=12)
            .filter(|_| rng.below(6) == 0)
            .map(|i| {
                let service = routes::object_ref(&ObjectKey {
                    namespace: "default".into(),
                    name: format!("s{i}"),
                });
                (ServicePortRef { service, port: 80 }, AppProtocol::Http)
            })
            .collect();
        let ctx = ctx(&unhealthy, &l7);
        let state = parse_str("model.yaml", &model.yaml())
            .unwrap_or_else(|e| panic!("step {step}: model rejected:\n{e}"));

        let prev_ids = planner.ids();
        let pending = planner
            .prepare(&Arc::new(state.clone()), &ctx)
            .expect("plan");
        replanned += pending.cost.services;
        let delta = planner.commit(pending);
        let (fresh, fresh_ids) = plan(&state, &prev_ids, &ctx).expect("plan");

        let kept = planner.plan();
        assert_eq!(kept.services, fresh.services, "step {step}: SERVICES");
        assert_eq!(kept.slots, fresh.slots, "step {step}: SERVICE_BACKENDS");
        assert_eq!(kept.backends, fresh.backends, "step {step}: BACKENDS");
        assert_eq!(kept.frontends, fresh.frontends, "step {step}: frontends");
        assert_eq!(planner.ids(), fresh_ids, "step {step}: ids");
        if delta.whole {
            maps = kept.clone();
        } else {
            apply(&mut maps, &delta);
        }
        assert_eq!(
            (&maps.services, &maps.slots, &maps.backends),
            (&kept.services, &kept.slots, &kept.backends),
            "step {step}: the delta takes the maps to the plan"
        );
        let gone: BTreeSet<BackendAddr> = delta.gone.iter().copied().collect();
        assert!(
            gone.iter().all(|b| !kept.backend_addrs().contains(b)),
            "step {step}: gone backends are gone"
        );
    }
    assert!(
        replanned < 400 * 12 / 2,
        "changes re-plan a few Services each, not all: {replanned} in 400 steps"
    );
}

/// 1,000 Services, half selecting a Pod each, half fed by a slice each.
fn large() -> Model {
    let mut model = Model::default();
    for i in 1..=1000 {
        model.services.insert(i, (80, i % 2 == 0, false, false));
        if i % 2 == 0 {
            model.pods.insert(i, (i, 1, true, false));
        } else {
            model.slices.insert(i, (i, vec![(i % 250 + 1, 2, true)]));
        }
    }
    model
}

#[test]
fn one_service_changed_among_a_thousand_replans_and_rewrites_only_it() {
    let unhealthy = BTreeSet::new();
    let l7 = BTreeMap::new();
    let ctx = ctx(&unhealthy, &l7);
    let mut model = large();
    let mut planner = Planner::new(Ids::default());
    let state = parse_str("large.yaml", &model.yaml()).expect("state");
    let first = planner.prepare(&Arc::new(state), &ctx).expect("plan");
    assert_eq!(first.cost.services, 1000, "the first plan plans everything");
    planner.commit(first);
    assert_eq!(planner.plan().frontends.len(), 2000);

    // A Service fed by a slice changes its port.
    model.services.insert(7, (8080, false, false, false));
    let state = parse_str("large.yaml", &model.yaml()).expect("state");
    let pending = planner.prepare(&Arc::new(state), &ctx).expect("plan");
    assert_eq!(pending.cost.services, 1);
    assert_eq!(pending.cost.selector_candidates, 0, "no Pod is matched");
    let delta = planner.commit(pending);
    let port = |k: &ServiceKey| u16::from_be(k.port);
    let written: Vec<u16> = delta
        .services
        .upserts
        .iter()
        .map(|(k, _)| port(k))
        .collect();
    let removed: Vec<u16> = delta.services.removals.iter().map(port).collect();
    assert_eq!((written, removed), (vec![8080], vec![80]));
    assert!(delta.slots.upserts.len() == 1 && delta.slots.removals.len() == 1);
    assert!(delta.backends.upserts.is_empty() && delta.backends.removals.is_empty());

    // A Pod changes its labels: only the Services that select it, before or after.
    model.pods.insert(8, (10, 1, true, false));
    let state = parse_str("large.yaml", &model.yaml()).expect("state");
    let pending = planner.prepare(&Arc::new(state), &ctx).expect("plan");
    assert_eq!(pending.cost.services, 2, "s8 loses its Pod, s10 gains one");
    let delta = planner.commit(pending);
    // Backends are slotted in address order, so p8 takes s10's first slot of each
    // frontend (TCP and UDP) and p10 moves to the second.
    assert_eq!(delta.slots.upserts.len(), 4, "s10's slots");
    assert_eq!(delta.slots.removals.len(), 2, "s8's slots");

    // Nothing changed: nothing planned, nothing written.
    let state = parse_str("large.yaml", &model.yaml()).expect("state");
    let pending = planner.prepare(&Arc::new(state), &ctx).expect("plan");
    assert_eq!(pending.cost.services, 0);
    assert!(planner.commit(pending).is_empty());
}

#[test]
fn an_uncommitted_plan_changes_nothing_and_an_overflow_names_the_service() {
    let unhealthy = BTreeSet::new();
    let l7 = BTreeMap::new();
    let mut model = Model::default();
    model.services.insert(1, (80, false, false, false));
    model
        .slices
        .insert(1, (1, vec![(1, 1, true), (2, 1, true)]));
    let tight = PlanContext {
        capacities: Capacities {
            services: 3,
            slots: 4,
            backends: 4,
        },
        ..ctx(&unhealthy, &l7)
    };
    let mut planner = Planner::default();
    let state = parse_str("a.yaml", &model.yaml()).expect("state");
    let pending = planner.prepare(&Arc::new(state), &tight).expect("fits");
    planner.commit(pending);
    let before = planner.plan().clone();

    model.services.insert(2, (80, false, false, false));
    let state = parse_str("a.yaml", &model.yaml()).expect("state");
    let err = planner
        .prepare(&Arc::new(state), &tight)
        .expect_err("overflows");
    assert!(
        err.to_string()
            .starts_with("Service default/s2 does not fit in map"),
        "{err}"
    );
    assert_eq!(planner.plan(), &before);
}
