use std::net::IpAddr;

use super::*;
use crate::state::parse_str;
use mesh_common::service::{SVC_FLAG_AFFINITY, SVC_FLAG_L7};

fn state(yaml: &str) -> State {
    parse_str("test.yaml", yaml).unwrap_or_else(|e| panic!("fixture rejected:\n{e}"))
}

/// No backend is unhealthy.
static HEALTHY: BTreeSet<BackendAddr> = BTreeSet::new();
/// No Service port is served by the node proxy.
static NO_L7: BTreeMap<ServicePortRef, AppProtocol> = BTreeMap::new();

/// The context of an agent on node `n1` with every backend healthy.
fn ctx() -> PlanContext<'static> {
    PlanContext {
        node: "n1",
        unhealthy: &HEALTHY,
        capacities: Capacities::default(),
        l7_ports: &NO_L7,
    }
}

fn plan_of(yaml: &str) -> Plan {
    plan(&state(yaml), &Ids::default(), &ctx()).expect("plan").0
}

/// The plan on node `node` with the TCP backends `unhealthy` (`"ip:port"`) failing.
fn plan_on(yaml: &str, node: &str, unhealthy: &[&str]) -> Plan {
    let unhealthy = unhealthy.iter().map(|a| tcp(a)).collect();
    let ctx = PlanContext {
        node,
        unhealthy: &unhealthy,
        capacities: Capacities::default(),
        l7_ports: &NO_L7,
    };
    plan(&state(yaml), &Ids::default(), &ctx).expect("plan").0
}

fn tcp(addr: &str) -> BackendAddr {
    BackendAddr::new(addr.parse().expect("socket address"), PROTO_TCP)
}

fn ip(s: &str) -> Addr {
    Addr::from(s.parse::<IpAddr>().expect("ip"))
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

/// `pod` with a deletionTimestamp: terminating.
fn terminating(pod: &str) -> String {
    pod.replacen(
        "metadata: {name: ",
        "metadata: {deletionTimestamp: '2024-05-01T10:00:00Z', name: ",
        1,
    )
}

/// `pod` scheduled on `node`.
fn on_node(pod: &str, node: &str) -> String {
    pod.replacen("spec:\n", &format!("spec:\n  nodeName: {node}\n"), 1)
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
            "only ready, running pods with an IPv4 address serve; terminating ones are listed without a slot",
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
                 10.244.0.5:80 (default/other-condition), 10.244.0.10:80 (default/dual), \
                 10.244.0.8:80 (default/terminating) [terminating]",
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
            "headless and SCTP are not programmed; IPv6 and both families of dual-stack are, primary first",
            service("headless", "None", "{app: web}", "[{port: 80}]")
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: v6}\nspec: {clusterIPs: ['fd00::1'], ports: [{port: 80}]}\n"
                + "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual}\nspec: {clusterIPs: ['fd00::2', 10.96.0.2], ports: [{name: a, port: 80}, {name: b, port: 80, protocol: SCTP}]}\n",
            vec![
                "default/dual:a [fd00::2]:80/TCP -> (no ready backend)",
                "default/dual:a 10.96.0.2:80/TCP -> (no ready backend)",
                "default/v6: [fd00::1]:80/TCP -> (no ready backend)",
            ],
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
    let marker = ServiceValue::MARKER;
    let value = |id, count| ServiceValue {
        id,
        count,
        flags: 0,
        affinity_timeout_s: 0,
    };

    // Services are planned in name order (api, empty, web); ids follow frontend key order.
    let expected_services = BTreeMap::from([
        (ServiceKey::vip_marker(ip("10.96.0.10")), marker),
        (ServiceKey::vip_marker(ip("10.96.0.20")), marker),
        (ServiceKey::vip_marker(ip("10.96.0.30")), marker),
        (
            ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP),
            value(1, 2),
        ),
        (
            ServiceKey::new(ip("10.96.0.10"), 8080, PROTO_TCP),
            value(2, 2),
        ),
        (
            ServiceKey::new(ip("10.96.0.20"), 80, PROTO_TCP),
            value(3, 2),
        ),
        (
            ServiceKey::new(ip("10.96.0.30"), 80, PROTO_TCP),
            value(4, 0),
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
        plan.services[&ServiceKey::new(f.addr.ip().into(), f.addr.port(), f.proto)].id == f.id
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
            .map(|b| match b.addr.ip() {
                IpAddr::V4(v4) => (v4.octets()[3], b.id),
                IpAddr::V6(_) => unreachable!("IPv4 fixture"),
            })
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
        &ctx(),
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
        &ctx(),
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
        &ctx(),
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
        &ctx(),
    )
    .expect("plan");
    assert_eq!((p4, ids4), (p3, ids3));
}

#[test]
fn ids_adopted_from_a_datapath_replan_to_the_same_maps() {
    // An agent planned with its own counter history (ids 3.. here, not 1..); a new agent
    // adopting those maps must keep every id, or live entries would be renumbered.
    let yaml = service(
        "web",
        "10.96.0.10",
        "{app: web}",
        "[{port: 80}, {port: 81, name: b}]",
    )
    .replace("[{port: 80}", "[{port: 80, name: a}")
        + &pod("a", "10.244.0.1", "{app: web}", "")
        + &pod("b", "10.244.0.2", "{app: web}", "");
    let other = service("dns", "10.96.0.53", "{app: web}", "[{port: 53}]");
    let (_, ids) = plan(&state(&(yaml.clone() + &other)), &Ids::default(), &ctx()).expect("plan");
    let (first, _) = plan(&state(&yaml), &ids, &ctx()).expect("plan");
    let adopted = Ids::from_datapath(&first.services, &first.backends);
    let (second, _) = plan(&state(&yaml), &adopted, &ctx()).expect("plan");
    assert_eq!(second.services, first.services);
    assert_eq!(second.slots, first.slots);
    assert_eq!(second.backends, first.backends);
}

#[test]
fn capacities_come_from_the_context_and_overflow_names_the_service_and_map() {
    let state = state(
        &(service("a", "10.96.0.1", "{app: web}", "[{port: 80}]")
            + &service("b", "10.96.0.2", "{app: web}", "[{port: 80}]")
            + &pod("p1", "10.244.0.1", "{app: web}", "")
            + &pod("p2", "10.244.0.2", "{app: web}", "")
            + &terminating(&pod("p3", "10.244.0.3", "{app: web}", ""))),
    );
    let with = |services, slots, backends| {
        plan(
            &state,
            &Ids::default(),
            &PlanContext {
                capacities: Capacities {
                    services,
                    slots,
                    backends,
                },
                ..ctx()
            },
        )
    };
    // a: marker + frontend, 2 slots, 3 backends (the terminating one has no slot but an
    // entry); b adds as much again except backends.
    assert!(with(4, 4, 3).is_ok());
    for ((services, slots, backends), service, map) in [
        ((3, 4, 3), "b", maps::SERVICES),
        ((4, 3, 3), "b", maps::SERVICE_BACKENDS),
        ((4, 4, 2), "a", maps::BACKENDS),
    ] {
        let err = with(services, slots, backends).expect_err("overflow");
        let PlanError::Capacity {
            service: s, map: m, ..
        } = &err
        else {
            panic!("{err}")
        };
        assert_eq!(
            (s.to_string(), *m),
            (format!("default/{service}"), map),
            "{err}"
        );
    }
    assert!(
        plan(&state, &Ids::default(), &ctx()).is_ok(),
        "the default maps are far larger"
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

#[test]
fn every_cluster_ip_is_a_frontend_with_backends_of_its_family() {
    let yaml = "---\napiVersion: v1\nkind: Service\nmetadata: {name: v6}\n\
                spec: {clusterIPs: ['fd00:96::6'], ipFamilies: [IPv6], selector: {app: web}, ports: [{port: 80, targetPort: http}]}\n"
        .to_owned()
        + "---\napiVersion: v1\nkind: Service\nmetadata: {name: dual}\n\
           spec: {clusterIP: 10.96.0.2, clusterIPs: [10.96.0.2, 'fd00:96::2'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack, \
           ports: [{name: http, port: 80}]}\n"
        + &pod("both", "10.244.0.1", "{app: web}", "podIPs: [{ip: 10.244.0.1}, {ip: 'fd00:244::1'}]")
        + &pod("v4", "10.244.0.2", "{app: web}", "")
        + &slice("dual-4", "dual", "IPv4", "[{name: http, port: 8080}]", "[{addresses: [10.0.0.1]}]")
        + &slice("dual-6", "dual", "IPv6", "[{name: http, port: 8080}]", "[{addresses: ['fd00::1', 'fd00::2']}]");
    let plan = plan_of(&yaml);
    assert_eq!(
        lines(&plan),
        [
            "default/dual:http 10.96.0.2:80/TCP -> 10.0.0.1:8080",
            "default/dual:http [fd00:96::2]:80/TCP -> [fd00::1]:8080, [fd00::2]:8080",
            "default/v6: [fd00:96::6]:80/TCP -> [fd00:244::1]:8080 (default/both)",
        ]
    );
    // One VIP marker per cluster IP, in both families.
    let markers: BTreeSet<IpAddr> = plan
        .services
        .iter()
        .filter(|(k, _)| k.is_vip_marker())
        .map(|(k, v)| {
            assert_eq!(*v, ServiceValue::MARKER);
            k.addr.into()
        })
        .collect();
    let want: BTreeSet<IpAddr> = ["10.96.0.2", "fd00:96::2", "fd00:96::6"]
        .iter()
        .map(|s| s.parse().expect("ip"))
        .collect();
    assert_eq!(markers, want);
    let v6 = ServiceKey::new(ip("fd00:96::2"), 80, PROTO_TCP);
    assert_eq!(plan.services[&v6].count, 2);
    assert_eq!(
        plan.backends[&plan.slots[&BackendSlotKey {
            service_id: plan.services[&v6].id,
            slot: 1
        }]],
        Backend::new(ip("fd00::1"), 8080, PROTO_TCP)
    );
    // IPv4 backends are stored IPv4-mapped and read back as IPv4.
    assert!(plan.backend_addrs().contains(&tcp("10.0.0.1:8080")));
    assert!(plan.backend_addrs().contains(&tcp("[fd00:244::1]:8080")));
}

#[test]
fn session_affinity_sets_the_flag_and_timeout() {
    let cases = [
        ("", None),
        ("sessionAffinity: None, ", None),
        ("sessionAffinity: ClientIP, ", Some(10_800)),
        (
            "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {}}, ",
            Some(10_800),
        ),
        (
            "sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}, ",
            Some(60),
        ),
    ];
    for (affinity, timeout) in cases {
        let yaml = format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{{affinity}clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n"
        );
        let plan = plan_of(&yaml);
        let value = plan.services[&ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP)];
        let flags = if timeout.is_some() {
            SVC_FLAG_AFFINITY
        } else {
            0
        };
        assert_eq!(
            (value.flags, value.affinity_timeout_s),
            (flags, timeout.unwrap_or(0)),
            "{affinity}"
        );
        assert_eq!(plan.frontends[0].affinity_timeout_s, timeout, "{affinity}");
    }
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
                spec: {sessionAffinity: ClientIP, trafficDistribution: PreferClose, clusterIP: 10.96.0.10, ports: [{port: 80}]}\n";
    assert_eq!(
        lines(&plan_of(yaml)),
        ["default/web: 10.96.0.10:80/TCP [affinity 10800s] [prefer-close] -> (no ready backend)"]
    );
}

#[test]
fn endpoint_conditions_decide_backend_states() {
    let web = service(
        "web",
        "10.96.0.10",
        "{app: web}",
        "[{name: http, port: 80}]",
    );
    let slice_svc = service("web", "10.96.0.10", "null", "[{name: http, port: 80}]");
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "a terminating pod keeps a backend entry but no slot",
            web.clone()
                + &pod("a", "10.244.0.1", "{app: web}", "")
                + &terminating(&pod("t", "10.244.0.2", "{app: web}", ""))
                + &terminating(&pod(
                    "t-unready",
                    "10.244.0.3",
                    "{app: web}",
                    "conditions: [{type: Ready, status: 'False'}]",
                )),
            vec![
                "default/web:http 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/t) [terminating]",
            ],
        ),
        (
            "slice endpoints: ready unless not ready or terminating; terminating ones only while serving",
            slice_svc.clone()
                + &slice(
                    "web-1",
                    "web",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    "[{addresses: [10.0.0.1], conditions: {ready: true, serving: true, terminating: false}}, \
                      {addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}, \
                      {addresses: [10.0.0.3], conditions: {ready: false, serving: false, terminating: true}}, \
                      {addresses: [10.0.0.4], conditions: {terminating: true}}, \
                      {addresses: [10.0.0.5], conditions: {ready: false, serving: false}}]",
                ),
            vec![
                "default/web:http 10.96.0.10:80/TCP -> 10.0.0.1:8080, 10.0.0.2:8080 [terminating], 10.0.0.4:8080 [terminating]",
            ],
        ),
        (
            "without a ready backend there is no slot, even with terminating ones",
            slice_svc
                + &slice(
                    "web-1",
                    "web",
                    "IPv4",
                    "[{name: http, port: 8080}]",
                    "[{addresses: [10.0.0.2], conditions: {ready: false, serving: true, terminating: true}}]",
                ),
            vec![
                "default/web:http 10.96.0.10:80/TCP -> (no ready backend), 10.0.0.2:8080 [terminating]",
            ],
        ),
        (
            "the same address ready in one source and terminating in another is ready",
            web + &pod("a", "10.244.0.1", "{app: web}", "")
                + &slice(
                    "web-1",
                    "web",
                    "IPv4",
                    "[{name: http, port: 80}]",
                    "[{addresses: [10.244.0.1], conditions: {terminating: true}}]",
                ),
            vec!["default/web:http 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a)"],
        ),
    ];
    for (name, yaml, expected) in cases {
        assert_eq!(lines(&plan_of(&yaml)), expected, "{name}");
    }

    // In the maps: count 0, the terminating backend stored with its state.
    let yaml = service("web", "10.96.0.10", "{app: web}", "[{port: 80}]")
        + &terminating(&pod("t", "10.244.0.2", "{app: web}", ""));
    let plan = plan_of(&yaml);
    assert_eq!(
        plan.services[&ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP)].count,
        0
    );
    assert!(plan.slots.is_empty());
    let backend = Backend {
        state: BACKEND_TERMINATING,
        ..Backend::new(ip("10.244.0.2"), 80, PROTO_TCP)
    };
    assert_eq!(plan.backends.values().collect::<Vec<_>>(), [&backend]);
    assert!(
        plan.probe_targets().is_empty(),
        "terminating backends are not probed"
    );
}

#[test]
fn health_and_topology_choose_the_slots() {
    let web = |extra: &str| {
        format!(
            "---\napiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {{{extra}clusterIP: 10.96.0.10, selector: {{app: web}}, ports: [{{port: 80}}]}}\n"
        )
    };
    let pods = |a: &str, b: &str, c: &str| {
        on_node(&pod("a", "10.244.0.1", "{app: web}", ""), a)
            + &on_node(&pod("b", "10.244.0.2", "{app: web}", ""), b)
            + &on_node(&pod("c", "10.244.0.3", "{app: web}", ""), c)
    };
    let close = "trafficDistribution: PreferClose, ";
    let hinted = |hints: [&str; 2]| {
        service("web", "10.96.0.10", "null", "[{port: 80}]")
            + &slice(
                "web-1",
                "web",
                "IPv4",
                "[{port: 8080}]",
                &format!(
                    "[{{addresses: [10.0.0.1], nodeName: n1{}}}, {{addresses: [10.0.0.2], nodeName: n2{}}}]",
                    hints[0], hints[1]
                ),
            )
    };
    let cases: Vec<(&str, String, &str, Vec<&str>, &str)> = vec![
        (
            "unhealthy backends lose their slot",
            web("") + &pods("n1", "n2", "n3"),
            "n1",
            vec!["10.244.0.2:80"],
            "default/web: 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a), 10.244.0.3:80 (default/c), 10.244.0.2:80 (default/b) [unhealthy]",
        ),
        (
            "all unhealthy: all keep their slots (fail open)",
            web("") + &pods("n1", "n2", "n3"),
            "n1",
            vec!["10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80"],
            "default/web: 10.96.0.10:80/TCP [all unhealthy: failing open] -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/b), 10.244.0.3:80 (default/c)",
        ),
        (
            "unhealthy UDP-less probe keys do not match other protocols or ports",
            web("") + &pods("n1", "n2", "n3"),
            "n1",
            vec!["10.244.0.2:81"],
            "default/web: 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/b), 10.244.0.3:80 (default/c)",
        ),
        (
            "PreferClose with local backends: only those get slots; the others stay active",
            web(close) + &pods("n1", "n2", "n1"),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP [prefer-close] -> 10.244.0.1:80 (default/a), 10.244.0.3:80 (default/c), 10.244.0.2:80 (default/b) [not preferred]",
        ),
        (
            "PreferSameNode and PreferSameZone are PreferClose too",
            web("trafficDistribution: PreferSameNode, ") + &pods("n1", "n2", "n2"),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP [prefer-close] -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/b) [not preferred], 10.244.0.3:80 (default/c) [not preferred]",
        ),
        (
            "PreferClose without a local backend: all of them",
            web("trafficDistribution: PreferSameZone, ") + &pods("n2", "n2", "n3"),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP [prefer-close] -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/b), 10.244.0.3:80 (default/c)",
        ),
        (
            "PreferClose whose local backend is unhealthy: the healthy remote ones",
            web(close) + &pods("n1", "n2", "n3"),
            "n1",
            vec!["10.244.0.1:80"],
            "default/web: 10.96.0.10:80/TCP [prefer-close] -> 10.244.0.2:80 (default/b), 10.244.0.3:80 (default/c), 10.244.0.1:80 (default/a) [unhealthy]",
        ),
        (
            "without trafficDistribution, locality does not matter",
            web("") + &pods("n1", "n2", "n3"),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP -> 10.244.0.1:80 (default/a), 10.244.0.2:80 (default/b), 10.244.0.3:80 (default/c)",
        ),
        (
            "hints.forNodes on every endpoint: those hinted for this node",
            hinted([
                ", hints: {forNodes: [{name: n2}]}",
                ", hints: {forNodes: [{name: n1}]}",
            ]),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP -> 10.0.0.2:8080, 10.0.0.1:8080 [not preferred]",
        ),
        (
            "hints.forNodes on some endpoints only are ignored",
            hinted(["", ", hints: {forNodes: [{name: n1}]}"]),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP -> 10.0.0.1:8080, 10.0.0.2:8080",
        ),
        (
            "hints.forNodes naming other nodes only: all endpoints",
            hinted([
                ", hints: {forNodes: [{name: n2}]}",
                ", hints: {forNodes: [{name: n3}]}",
            ]),
            "n1",
            vec![],
            "default/web: 10.96.0.10:80/TCP -> 10.0.0.1:8080, 10.0.0.2:8080",
        ),
    ];
    for (name, yaml, node, unhealthy, expected) in cases {
        assert_eq!(
            lines(&plan_on(&yaml, node, &unhealthy)),
            [expected],
            "{name}"
        );
    }

    // In the maps: unhealthy is stored as such, slots hold the healthy ones only.
    let plan = plan_on(
        &(web("") + &pods("n1", "n2", "n3")),
        "n1",
        &["10.244.0.2:80"],
    );
    let states: Vec<(BackendAddr, u8)> = plan
        .backends
        .values()
        .map(|b| (BackendAddr::from(b), b.state))
        .collect();
    assert_eq!(
        states,
        [
            (tcp("10.244.0.1:80"), BACKEND_ACTIVE),
            (tcp("10.244.0.2:80"), BACKEND_UNHEALTHY),
            (tcp("10.244.0.3:80"), BACKEND_ACTIVE),
        ]
    );
    assert_eq!(
        plan.services[&ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP)].count,
        2
    );
    // In panic mode they stay active in the maps.
    let plan = plan_on(
        &(web("") + &pods("n1", "n2", "n3")),
        "n1",
        &["10.244.0.1:80", "10.244.0.2:80", "10.244.0.3:80"],
    );
    assert!(plan.frontends[0].health_panic);
    assert!(plan.backends.values().all(|b| b.state == BACKEND_ACTIVE));
    assert_eq!(
        plan.services[&ServiceKey::new(ip("10.96.0.10"), 80, PROTO_TCP)].count,
        3
    );
}

#[test]
fn a_shared_backend_stores_the_best_state_any_frontend_gives_it() {
    // 10.244.0.1 is ready for `a`, terminating in `b`'s slice: active.
    // 10.244.0.2 is unhealthy for `a` (which has a healthy backend), terminating in `b`: terminating.
    // 10.244.0.3 is unhealthy everywhere, but `c` fails open on it: active.
    // 10.244.0.4 is unhealthy for `a` only: unhealthy.
    let yaml = service("a", "10.96.0.1", "{app: a}", "[{port: 80}]")
        + &service("b", "10.96.0.2", "null", "[{port: 80}]")
        + &service("c", "10.96.0.3", "{app: c}", "[{port: 80}]")
        + &pod("p1", "10.244.0.1", "{app: a}", "")
        + &pod("p2", "10.244.0.2", "{app: a}", "")
        + &pod("p3", "10.244.0.3", "{app: c}", "")
        + &pod("p4", "10.244.0.4", "{app: a}", "")
        + &slice(
            "b-1",
            "b",
            "IPv4",
            "[{port: 80}]",
            "[{addresses: [10.244.0.1, 10.244.0.2], conditions: {terminating: true}}]",
        );
    let plan = plan_on(
        &yaml,
        "n1",
        &["10.244.0.2:80", "10.244.0.3:80", "10.244.0.4:80"],
    );
    let states: BTreeMap<BackendAddr, u8> = plan
        .backends
        .values()
        .map(|b| (BackendAddr::from(b), b.state))
        .collect();
    assert_eq!(
        states,
        BTreeMap::from([
            (tcp("10.244.0.1:80"), BACKEND_ACTIVE),
            (tcp("10.244.0.2:80"), BACKEND_TERMINATING),
            (tcp("10.244.0.3:80"), BACKEND_ACTIVE),
            (tcp("10.244.0.4:80"), BACKEND_UNHEALTHY),
        ])
    );
    // Each frontend shows its own view.
    assert_eq!(
        lines(&plan),
        [
            "default/a: 10.96.0.1:80/TCP -> 10.244.0.1:80 (default/p1), 10.244.0.2:80 (default/p2) [unhealthy], 10.244.0.4:80 (default/p4) [unhealthy]",
            "default/b: 10.96.0.2:80/TCP -> (no ready backend), 10.244.0.1:80 [terminating], 10.244.0.2:80 [terminating]",
            "default/c: 10.96.0.3:80/TCP [all unhealthy: failing open] -> 10.244.0.3:80 (default/p3)",
        ]
    );
    // Probed: everything not terminating, TCP only.
    assert_eq!(
        plan.probe_targets(),
        BTreeSet::from([
            tcp("10.244.0.1:80"),
            tcp("10.244.0.3:80"),
            tcp("10.244.0.4:80")
        ])
    );
    assert_eq!(plan.backend_addrs().len(), 4);
}

#[test]
fn probe_targets_skip_udp_and_every_slot_is_an_active_pair() {
    let yaml = service(
        "web",
        "10.96.0.10",
        "{app: web}",
        "[{name: http, port: 80, targetPort: http}, {name: dns, port: 53, protocol: UDP, targetPort: dns}]",
    ) + &pod("a", "10.244.0.1", "{app: web}", "")
        + &pod("b", "10.244.0.2", "{app: web}", "")
        + &terminating(&pod("t", "10.244.0.3", "{app: web}", ""));
    let plan = plan_of(&yaml);
    assert_eq!(
        plan.probe_targets(),
        BTreeSet::from([tcp("10.244.0.1:8080"), tcp("10.244.0.2:8080")])
    );
    assert_eq!(plan.backend_addrs().len(), 6);
    let id = |b: BackendAddr| {
        plan.backends
            .iter()
            .find(|(_, v)| BackendAddr::from(*v) == b)
            .map(|(id, _)| *id)
            .expect("backend")
    };
    let udp = |a: &str| BackendAddr::new(a.parse().expect("addr"), Protocol::Udp as u8);
    let http = plan.frontends[0].id;
    let dns = plan.frontends[1].id;
    let pairs = [
        (http, tcp("10.244.0.1:8080")),
        (http, tcp("10.244.0.2:8080")),
        (dns, udp("10.244.0.1:5353")),
        (dns, udp("10.244.0.2:5353")),
    ];
    for (service, backend) in pairs {
        assert!(plan.slotted(service, id(backend)), "{backend} in {service}");
    }
    assert!(
        !plan.slotted(http, id(tcp("10.244.0.3:8080"))),
        "terminating"
    );
    assert!(
        !plan.slotted(http, id(udp("10.244.0.1:5353"))),
        "another port's"
    );
}

#[test]
fn a_backend_keeps_its_id_when_its_state_changes() {
    let svc = service("web", "10.96.0.10", "{app: web}", "[{port: 80}]");
    let (p1, ids1) = plan(
        &state(&(svc.clone() + &pod("a", "10.244.0.1", "{app: web}", ""))),
        &Ids::default(),
        &ctx(),
    )
    .expect("plan");
    let (p2, _) = plan(
        &state(&(svc + &terminating(&pod("a", "10.244.0.1", "{app: web}", "")))),
        &ids1,
        &ctx(),
    )
    .expect("plan");
    assert_eq!(
        p1.backends.keys().collect::<Vec<_>>(),
        p2.backends.keys().collect::<Vec<_>>()
    );
    let d = diff(&p1.backends, &p2.backends);
    assert!(d.removals.is_empty());
    assert_eq!(d.upserts.len(), 1);
    assert_eq!(d.upserts[0].1.state, BACKEND_TERMINATING);
    // Adopting the maps keeps the id whatever state the entry is in.
    let adopted = Ids::from_datapath(&p2.services, &p2.backends);
    assert_eq!(adopted, ids1);
}

/// N Services in one namespace, each selecting one of N Pods by a label of its own,
/// and N NetworkPolicies, each selecting one of the Pods and allowing ingress from
/// another by label.
fn one_namespace(n: usize) -> State {
    let mut yaml = String::new();
    for i in 0..n {
        let (hi, lo) = (i / 250, i % 250 + 1);
        yaml += &format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: p{i}, labels: {{app: a{i}, tier: web}}}}\n\
             spec: {{nodeName: n1, containers: [{{name: c}}]}}\nstatus: {{podIP: 10.244.{hi}.{lo}}}\n"
        );
        yaml += &service(
            &format!("s{i}"),
            &format!("10.96.{hi}.{lo}"),
            &format!("{{app: a{i}}}"),
            "[{port: 80}]",
        );
        yaml += &format!(
            "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{i}}}\n\
             spec: {{podSelector: {{matchLabels: {{app: a{i}}}}}, ingress: [{{from: [{{podSelector: {{matchLabels: {{app: a{}}}}}}}]}}]}}\n",
            (i + 1) % n
        );
    }
    state(&yaml)
}

#[test]
fn selection_cost_grows_linearly_with_services_and_policies() {
    // Counted, not timed: with a full scan per selector, 4x the objects would cost 16x.
    let cost = |n: usize| {
        let state = one_namespace(n);
        let services = plan(&state, &Ids::default(), &ctx()).expect("plan").0.cost;
        let local_netns = BTreeMap::new();
        let policy_ctx = policy::PolicyContext {
            node: "n1",
            local_netns: &local_netns,
            node_addrs: &[],
            capacities: policy::PolicyCapacities::default(),
        };
        let (policy_plan, _) =
            policy::plan_policy(&state, &policy::IdentityIds::default(), &policy_ctx)
                .expect("policy plan");
        assert_eq!(
            policy_plan.policy.len(),
            2 * n,
            "one allow and one marker each"
        );
        (
            services.selector_candidates,
            policy_plan.cost.selector_candidates,
        )
    };
    let (services_small, policies_small) = cost(200);
    let (services_large, policies_large) = cost(800);
    assert_eq!(services_small, 200, "one candidate per Service");
    assert_eq!(services_large, 800);
    // Each policy checks one subject and one peer candidate.
    assert_eq!(policies_small, 2 * 200);
    assert_eq!(policies_large, 2 * 800);
}

#[test]
fn l7_service_ports_get_the_l7_flag_on_every_cluster_ip_and_tcp_only() {
    let state = state(&(
        "---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\n\
         spec: {clusterIP: 10.96.0.2, clusterIPs: [10.96.0.2, 'fd00:96::2'], ipFamilies: [IPv4, IPv6], \
         ipFamilyPolicy: RequireDualStack, selector: {app: web}, ports: [\
         {name: http, port: 80, targetPort: 8080, appProtocol: http}, \
         {name: plain, port: 81, targetPort: 8080}, \
         {name: dns, port: 53, targetPort: 5353, protocol: UDP}]}\n"
            .to_owned()
            + &pod("p1", "10.244.0.1", "{app: web}", "")),
    );
    let routes = routes::compile(&state);
    let l7 = |l7_ports| {
        let ctx = PlanContext { l7_ports, ..ctx() };
        let (plan, _) = plan(&state, &Ids::default(), &ctx).expect("plan");
        let flagged: BTreeSet<String> = plan
            .frontends
            .iter()
            .filter(|f| {
                let key = ServiceKey::new(Addr::from(f.addr.ip()), f.addr.port(), f.proto);
                let flag = plan.services[&key].flags & SVC_FLAG_L7 != 0;
                assert_eq!(flag, f.l7, "{f}");
                flag
            })
            .map(|f| format!("{}/{}", f.addr, proto_name(f.proto)))
            .collect();
        // The flag changes nothing else: backends keep their slots (the pod is IPv4 only).
        assert_eq!(plan.slots.len(), 3, "{:?}", plan.slots);
        flagged
    };
    assert_eq!(
        l7(&routes.l7_ports),
        BTreeSet::from([
            "10.96.0.2:80/TCP".to_owned(),
            "[fd00:96::2]:80/TCP".to_owned()
        ])
    );
    // A UDP port named as L7 is still not sent to the proxy.
    let mut udp = routes.l7_ports.clone();
    udp.insert(
        ServicePortRef {
            service: routes::object_ref(&ObjectKey {
                namespace: "default".into(),
                name: "web".into(),
            }),
            port: 53,
        },
        AppProtocol::Http,
    );
    assert_eq!(l7(&udp).len(), 2);
    assert!(l7(&NO_L7).is_empty());
}
