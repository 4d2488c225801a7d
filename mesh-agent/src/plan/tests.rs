use std::net::Ipv4Addr;

use super::*;
use crate::state::parse_str;

fn state(yaml: &str) -> State {
    parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("fixture rejected:\n{e}"))
}

fn plan_of(yaml: &str) -> Plan {
    plan(&state(yaml), &Ids::default()).expect("plan").0
}

/// The frontends of a plan as operators read them.
fn lines(plan: &Plan) -> Vec<String> {
    plan.frontends.iter().map(ToString::to_string).collect()
}

fn service(name: &str, ip: &str, selector: &str, ports: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: {ip}, selector: {selector}, ports: {ports}}}\n"
    )
}

/// A Pod with named container ports `http` (8080/TCP) and `dns` (5353/UDP); `status`
/// adds fields to its status.
fn pod(name: &str, ip: &str, labels: &str, status: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {labels}}}\n\
         spec:\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]\n\
         status: {{podIP: {ip}{sep}{status}}}\n",
        sep = if status.is_empty() { "" } else { ", " },
    )
}

fn slice(name: &str, service: &str, address_type: &str, ports: &str, endpoints: &str) -> String {
    format!(
        "---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: {name}, labels: {{kubernetes.io/service-name: {service}}}}}\n\
         addressType: {address_type}\nports: {ports}\nendpoints: {endpoints}\n"
    )
}

#[test]
fn frontends_and_backends_follow_kubernetes_semantics() {
    let web = |selector: &str| service("web", "10.96.0.10", selector, "[{port: 80}]");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "selector matches all its labels; extra pod labels are fine; namespaces and partial matches are not",
            web("{app: web, tier: fe}")
                + &pod("a", "10.244.0.1", "{app: web, tier: fe, extra: x}", "")
                + &pod("b", "10.244.0.2", "{app: web}", "")
                + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: c, namespace: other, labels: {app: web, tier: fe}}\nstatus: {podIP: 10.244.0.3}\n",
            vec!["default/web: 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a)"],
        ),
        (
            "no selector and empty selector select no pod",
            web("null")
                + &service("empty", "10.96.0.11", "{}", "[{port: 80}]")
                + &pod("a", "10.244.0.1", "{app: web}", ""),
            vec![
                "default/empty: 10.96.0.11:80/TCP -> (no ready backend)",
                "default/web: 10.96.0.10:80/TCP -> (no ready backend)",
            ],
        ),
        (
            "targetPort absent, by number, by name (protocol must match too)",
            service(
                "web",
                "10.96.0.10",
                "{app: web}",
                "[{name: same, port: 80}, {name: num, port: 81, targetPort: 9000}, {name: named, port: 82, targetPort: http}, \
                 {name: udp, port: 53, protocol: UDP, targetPort: dns}, {name: wrongproto, port: 54, targetPort: dns}]",
            ) + &pod("a", "10.244.0.1", "{app: web}", ""),
            vec![
                "default/web:same 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a)",
                "default/web:num 10.96.0.10:81/TCP -> 10.244.0.1:9000 (default/a)",
                "default/web:named 10.96.0.10:82/TCP -> 10.244.0.1:8080 (default/a)",
                "default/web:udp 10.96.0.10:53/UDP -> 10.244.0.1:5353 (default/a)",
                "default/web:wrongproto 10.96.0.10:54/TCP -> (no ready backend)",
            ],
        ),
        (
            "a pod without the named port is no backend for that port",
            service(
                "web",
                "10.96.0.10",
                "{app: web}",
                "[{port: 80, targetPort: grpc}]",
            ) + &pod("a", "10.244.0.1", "{app: web}", ""),
            vec!["default/web: 10.96.0.10:80/TCP -> (no ready backend)"],
        ),
        (
            "only ready, running, non-terminating pods with an IPv4 address serve",
            web("{app: web}")
                + &pod("no-conditions", "10.244.0.1", "{app: web}", "")
                + &pod(
                    "ready",
                    "10.244.0.2",
                    "{app: web}",
                    "conditions: [{type: Ready, status: 'True'}], phase: Running",
                )
                + &pod(
                    "not-ready",
                    "10.244.0.3",
                    "{app: web}",
                    "conditions: [{type: Ready, status: 'False'}]",
                )
                + &pod(
                    "unknown",
                    "10.244.0.4",
                    "{app: web}",
                    "conditions: [{type: Ready, status: Unknown}]",
                )
                + &pod(
                    "other-condition",
                    "10.244.0.5",
                    "{app: web}",
                    "conditions: [{type: PodScheduled, status: 'True'}]",
                )
                + &pod("done", "10.244.0.6", "{app: web}", "phase: Succeeded")
                + &pod("failed", "10.244.0.7", "{app: web}", "phase: Failed")
                + &pod("terminating", "10.244.0.8", "{app: web}", "").replace(
                    "name: terminating",
                    "name: terminating, deletionTimestamp: '2024-05-01T10:00:00Z'",
                )
                + &pod("v6", "fd00::9", "{app: web}", "")
                + &pod(
                    "dual",
                    "fd00::10",
                    "{app: web}",
                    "podIPs: [{ip: 'fd00::10'}, {ip: 10.244.0.10}]",
                )
                + "---\napiVersion: v1\nkind: Pod\nmetadata: {name: no-ip, labels: {app: web}}\n",
            vec![
                "default/web: 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/no-conditions), 10.244.0.2:80 (default/ready), \
                 10.244.0.5:80 (default/other-condition), 10.244.0.10:80 (default/dual)",
            ],
        ),
        (
            "slice endpoints: ready true or unset serve, false does not; ports match by name and protocol",
            service(
                "web",
                "10.96.0.10",
                "null",
                "[{name: http, port: 80}, {name: dns, port: 53, protocol: UDP}]",
            ) + &slice(
                "web-1",
                "web",
                "IPv4",
                "[{name: http, port: 8080}, {name: dns, port: 5353, protocol: UDP}, {name: other, port: 1}]",
                "[{addresses: [10.0.0.1], conditions: {ready: true}}, {addresses: [10.0.0.2], conditions: {ready: false}}, \
                     {addresses: [10.0.0.3]}, {addresses: [10.0.0.4], conditions: {}, targetRef: {kind: Pod, name: p4}}]",
            ) + &slice(
                "web-2",
                "web",
                "IPv4",
                "[{name: http, port: 8080, protocol: UDP}]",
                "[{addresses: [10.0.0.5]}]",
            ) + &slice(
                "web-3",
                "web",
                "IPv6",
                "[{name: http, port: 8080}]",
                "[{addresses: ['fd00::1']}]",
            ) + &slice(
                "api-1",
                "api",
                "IPv4",
                "[{name: http, port: 8080}]",
                "[{addresses: [10.0.0.6]}]",
            ),
            vec![
                "default/web:http 10.96.0.10:80/TCP -> 10.0.0.1:8080, 10.0.0.3:8080, 10.0.0.4:8080 (default/p4)",
                "default/web:dns 10.96.0.10:53/UDP -> 10.0.0.1:5353, 10.0.0.3:5353, 10.0.0.4:5353 (default/p4)",
            ],
        ),
        (
            "an unnamed service port matches an unnamed slice port",
            service("web", "10.96.0.10", "null", "[{port: 80}]")
                + &slice(
                    "web-1",
                    "web",
                    "IPv4",
                    "[{port: 8080, name: ''}]",
                    "[{addresses: [10.0.0.1]}]",
                ),
            vec!["default/web: 10.96.0.10:80/TCP -> 10.0.0.1:8080"],
        ),
        (
            "selector and slice backends are united and deduplicated, sorted by address",
            service(
                "web",
                "10.96.0.10",
                "{app: web}",
                "[{name: http, port: 80, targetPort: http}]",
            ) + &pod("z", "10.244.0.2", "{app: web}", "")
                + &pod("a", "10.244.0.9", "{app: web}", "")
                + &slice(
                    "web-1",
                    "web",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    "[{addresses: [10.244.0.2, 10.244.0.1]}]",
                ),
            vec![
                "default/web:http 10.96.0.10:80/TCP -> 10.244.0.1:8080, 10.244.0.2:8080 (default/z), 10.244.0.9:8080 (default/a)",
            ],
        ),
        (
            "headless, IPv6-only and SCTP are not programmed; dual-stack programs its IPv4 address",
            service("headless", "None", "{app: web}", "[{port: 80}]")
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: v6}\nspec: {clusterIPs: ['fd00::1'], ports: [{port: 80}]}\n"
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual}\nspec: {clusterIPs: ['fd00::2', 10.96.0.2], ports: [{name: a, port: 80}, {name: b, port: 80, protocol: SCTP}]}\n",
            vec!["default/dual:a 10.96.0.2:80/TCP -> (no ready backend)"],
        ),
    ];
    for (name, yaml, expected) in cases {
        assert_eq!(lines(&plan_of(&yaml)), expected, "{name}");
    }
}

#[test]
fn maps_hold_markers_frontends_slots_and_shared_backends() {
    let yaml = service(
        "web",
        "10.96.0.10",
        "{app: web}",
        "[{name: http, port: 80, targetPort: 8080}, {name: alt, port: 8080}]",
    ) + &service(
        "api",
        "10.96.0.20",
        "{app: web}",
        "[{port: 80, targetPort: 8080}]",
    ) + &service("empty", "10.96.0.30", "{app: none}", "[{port: 80}]")
        + &pod("a", "10.244.0.1", "{app: web}", "")
        + &pod("b", "10.244.0.2", "{app: web}", "");
    let plan = plan_of(&yaml);
    let ip = |s: &str| u32::from(s.parse::<Ipv4Addr>().expect("ip"));
    let marker = ServiceValue { id: 0, count: 0 };

    // Services are planned in name order (api, empty, web); ids follow frontend key order.
    let expected_services = BTreeMap::from([
        (ServiceKey::vip_marker(ip("10.96.0.10")), marker),
        (ServiceKey::vip_marker(ip("10.96.0.20")), marker),
        (ServiceKey::vip_marker(ip("10.96.0.30")), marker),
        (
            ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP),
            ServiceValue { id: 1, count: 2 },
        ),
        (
            ServiceKey::new(ip("10.96.0.10"), 8080, PROTO_TCP),
            ServiceValue { id: 2, count: 2 },
        ),
        (
            ServiceKey::new(ip("10.96.0.20"), 80, PROTO_TCP),
            ServiceValue { id: 3, count: 2 },
        ),
        (
            ServiceKey::new(ip("10.96.0.30"), 80, PROTO_TCP),
            ServiceValue { id: 4, count: 0 },
        ),
    ]);
    assert_eq!(plan.services, expected_services);
    // 10.244.0.x:8080 is shared by three frontends but stored once.
    assert_eq!(
        plan.backends,
        BTreeMap::from([
            (1, Backend::new(ip("10.244.0.1"), 8080, PROTO_TCP)),
            (2, Backend::new(ip("10.244.0.2"), 8080, PROTO_TCP))
        ])
    );
    let slot = |service_id, slot| BackendSlotKey { service_id, slot };
    assert_eq!(
        plan.slots,
        BTreeMap::from([
            (slot(1, 1), 1),
            (slot(1, 2), 2),
            (slot(2, 1), 1),
            (slot(2, 2), 2),
            (slot(3, 1), 1),
            (slot(3, 2), 2)
        ])
    );
    assert!(plan.frontends.iter().all(|f| {
        plan.services[&ServiceKey::new((*f.addr.ip()).into(), f.addr.port(), f.proto)].id == f.id
    }));
}

#[test]
fn ids_are_stable_and_freed_ids_are_reused_by_later_plans() {
    let svc = service("web", "10.96.0.10", "{app: web}", "[{port: 80}]");
    let pods = |names: &[(&str, &str)]| {
        names
            .iter()
            .map(|(n, ip)| pod(n, ip, "{app: web}", ""))
            .collect::<String>()
    };
    let backend_ids = |plan: &Plan| {
        plan.frontends[0]
            .backends
            .iter()
            .map(|b| (b.addr.ip().octets()[3], b.id))
            .collect::<Vec<_>>()
    };

    let (p1, ids1) = plan(
        &state(
            &(svc.clone()
                + &pods(&[
                    ("a", "10.244.0.1"),
                    ("b", "10.244.0.2"),
                    ("c", "10.244.0.3"),
                ])),
        ),
        &Ids::default(),
    )
    .expect("plan");
    assert_eq!(backend_ids(&p1), [(1, 1), (2, 2), (3, 3)]);

    // b goes away and d arrives in the same update: a and c keep their ids, and d does
    // not take b's id, which stale slots may still name until this plan is applied.
    let (p2, ids2) = plan(
        &state(
            &(svc.clone()
                + &pods(&[
                    ("a", "10.244.0.1"),
                    ("c", "10.244.0.3"),
                    ("d", "10.244.0.4"),
                ])),
        ),
        &ids1,
    )
    .expect("plan");
    assert_eq!(backend_ids(&p2), [(1, 1), (3, 3), (4, 4)]);
    assert_eq!(p2.frontends[0].id, p1.frontends[0].id);

    // The next new backend gets the lowest free id: b's old one.
    let (p3, ids3) = plan(
        &state(
            &(svc.clone()
                + &pods(&[
                    ("a", "10.244.0.1"),
                    ("c", "10.244.0.3"),
                    ("d", "10.244.0.4"),
                    ("e", "10.244.0.5"),
                ])),
        ),
        &ids2,
    )
    .expect("plan");
    assert_eq!(backend_ids(&p3), [(1, 1), (3, 3), (4, 4), (5, 2)]);

    // Same state, same ids, same plan: nothing to write.
    let (p4, ids4) = plan(
        &state(
            &(svc
                + &pods(&[
                    ("a", "10.244.0.1"),
                    ("c", "10.244.0.3"),
                    ("d", "10.244.0.4"),
                    ("e", "10.244.0.5"),
                ])),
        ),
        &ids3,
    )
    .expect("plan");
    assert_eq!((p4, ids4), (p3, ids3));
}

#[test]
fn ids_adopted_from_a_datapath_replan_to_the_same_maps() {
    // An agent planned with its own counter history (ids 3.. here, not 1..); a new agent
    // adopting those maps must keep every id, or live entries would be renumbered.
    let yaml = service("web", "10.96.0.10", "{app: web}", "[{port: 80}, {port: 81, name: b}]")
        .replace("[{port: 80}", "[{port: 80, name: a}")
        + &pod("a", "10.244.0.1", "{app: web}", "")
        + &pod("b", "10.244.0.2", "{app: web}", "");
    let other = service("dns", "10.96.0.53", "{app: web}", "[{port: 53}]");
    let (_, ids) = plan(&state(&(yaml.clone() + &other)), &Ids::default()).expect("plan");
    let (first, _) = plan(&state(&yaml), &ids).expect("plan");
    let adopted = Ids::from_datapath(&first.services, &first.backends);
    let (second, _) = plan(&state(&yaml), &adopted).expect("plan");
    assert_eq!(second.services, first.services);
    assert_eq!(second.slots, first.slots);
    assert_eq!(second.backends, first.backends);
}

#[test]
fn capacity_overflow_names_the_service_and_map() {
    let state = state(
        &(service("a", "10.96.0.1", "{app: web}", "[{port: 80}]")
            + &service("b", "10.96.0.2", "{app: web}", "[{port: 80}]")
            + &pod("p1", "10.244.0.1", "{app: web}", "")
            + &pod("p2", "10.244.0.2", "{app: web}", "")),
    );
    let frontends = services::frontends(&state);
    let limits = |services, slots, backends| Limits {
        services: ("S", services),
        slots: ("B", slots),
        backends: ("K", backends),
    };
    // a: marker + frontend, 2 slots, 2 backends; b adds as much again except backends.
    assert!(check_capacity(&frontends, &limits(4, 4, 2)).is_ok());
    for (limits, service, map) in [
        (limits(3, 4, 2), "b", "S"),
        (limits(4, 3, 2), "b", "B"),
        (limits(4, 4, 1), "a", "K"),
    ] {
        let err = check_capacity(&frontends, &limits).expect_err("overflow");
        let PlanError::Capacity {
            service: s, map: m, ..
        } = &err;
        assert_eq!(
            (s.to_string(), *m),
            (format!("default/{service}"), map),
            "{err}"
        );
    }
    assert!(
        plan(&state, &Ids::default()).is_ok(),
        "the real maps are far larger"
    );
}

#[test]
fn diff_writes_new_and_changed_keys_and_removes_stale_ones() {
    let current = BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]);
    let cases = [
        (
            BTreeMap::from([(1, 'a'), (2, 'b'), (3, 'c')]),
            vec![],
            vec![],
        ),
        (
            BTreeMap::from([(1, 'a'), (2, 'x'), (4, 'd')]),
            vec![(2, 'x'), (4, 'd')],
            vec![3],
        ),
        (BTreeMap::new(), vec![], vec![1, 2, 3]),
    ];
    for (desired, upserts, removals) in cases {
        let d = diff(&current, &desired);
        assert_eq!(d, MapDiff { upserts, removals }, "{desired:?}");
    }
    assert_eq!(
        diff(&BTreeMap::new(), &current).upserts,
        vec![(1, 'a'), (2, 'b'), (3, 'c')]
    );
}
