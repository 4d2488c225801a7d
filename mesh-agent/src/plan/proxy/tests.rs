use mesh_common::l7::{
    Mirror, Resilience, RouteMatch, RouteTable, Rule, Timeouts, WeightedBackend,
};

use super::*;
use crate::plan::routes::compile;
use crate::state::parse_str;

/// `web` (dual-stack, selector, named target port, appProtocol http, annotations),
/// `api` (grpc, EndpointSlices of both families), `mirror` and `other` (plain TCP, not
/// L7), `headless` (L7 but without a cluster IP), their pods on nodes n1 and n2.
const FIXTURE: &str = "
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  annotations: {mesh.io/max-connections: '7', mesh.io/outlier-base-ejection-time: 1s}
spec:
  clusterIPs: [10.96.0.10, 'fd00:96::10']
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http, appProtocol: http}]
---
apiVersion: v1
kind: Service
metadata: {name: api, namespace: shop}
spec: {clusterIP: 10.96.0.20, ports: [{name: grpc, port: 9000, targetPort: 9090, appProtocol: grpc}]}
---
apiVersion: v1
kind: Service
metadata: {name: mirror, namespace: shop}
spec: {clusterIP: 10.96.0.30, ports: [{port: 8080}]}
---
apiVersion: v1
kind: Service
metadata: {name: other, namespace: shop}
spec: {clusterIP: 10.96.0.40, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless, namespace: shop}
spec: {clusterIP: None, ports: [{port: 80, appProtocol: http}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web, app.kubernetes.io/name: storefront}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: 'fd00:244:1::5'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-2, namespace: shop, labels: {app: web}}
spec:
  nodeName: n2
  containers: [{name: c, ports: [{name: http, containerPort: 8081}]}]
status: {podIP: 10.244.2.5}
---
apiVersion: v1
kind: Pod
metadata: {name: web-3, namespace: shop, labels: {app: web}}
spec:
  nodeName: n1
  containers: [{name: c, ports: [{name: http, containerPort: 8080}]}]
status: {podIP: 10.244.1.6, conditions: [{type: Ready, status: 'False'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: api-1, namespace: shop}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.7, podIPs: [{ip: 10.244.1.7}, {ip: 'fd00:244:1::7'}]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-v4, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv4
ports: [{name: grpc, port: 9090}]
endpoints:
- {addresses: [10.244.1.7], targetRef: {kind: Pod, name: api-1}}
- {addresses: [10.244.2.9], conditions: {ready: false}}
- {addresses: [10.244.2.10], conditions: {terminating: true, serving: true}}
- {addresses: [10.244.3.3]}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: api-v6, namespace: shop, labels: {kubernetes.io/service-name: api}}
addressType: IPv6
ports: [{name: grpc, port: 9090}]
endpoints:
- {addresses: ['fd00:244:1::7'], targetRef: {kind: Pod, name: api-1}}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: mirror, namespace: shop, labels: {kubernetes.io/service-name: mirror}}
addressType: IPv4
ports: [{port: 8080}]
endpoints:
- {addresses: [10.244.2.11]}
";

fn state() -> State {
    parse_str("test.yaml", FIXTURE).unwrap_or_else(|e| panic!("fixture rejected:\n{e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().expect("ip")
}

fn port_ref(name: &str, port: u16) -> ServicePortRef {
    ServicePortRef {
        service: ObjectRef {
            namespace: "shop".into(),
            name: name.into(),
        },
        port,
    }
}

fn pod_ref(name: &str) -> Option<ObjectRef> {
    Some(ObjectRef {
        namespace: "shop".into(),
        name: name.into(),
    })
}

/// One rule to `api:9000` that mirrors to `mirror:8080`, with an unresolved second
/// backend.
fn table() -> RouteTable {
    RouteTable {
        matches: vec![RouteMatch {
            path: mesh_common::l7::PathMatch::PathPrefix("/".into()),
            headers: Vec::new(),
            query_params: Vec::new(),
            method: None,
            rule: 0,
        }],
        rules: vec![Rule {
            route: ObjectRef {
                namespace: "shop".into(),
                name: "web-route".into(),
            },
            index: 0,
            filters: vec![Filter::RequestMirror(Mirror {
                target: BackendTarget::Service(port_ref("mirror", 8080)),
                fraction_ppm: 1_000_000,
            })],
            backends: vec![
                WeightedBackend {
                    weight: 1,
                    target: BackendTarget::Service(port_ref("api", 9000)),
                    filters: Vec::new(),
                },
                WeightedBackend {
                    weight: 1,
                    target: BackendTarget::Invalid {
                        reason: "BackendNotFound".into(),
                    },
                    filters: Vec::new(),
                },
            ],
            timeouts: Timeouts::default(),
            retry: None,
        }],
    }
}

fn netns(pid: u32, cookie: u64, addrs: &[&str]) -> LocalNetns {
    LocalNetns {
        pid,
        inode: 4_026_532_000 + cookie,
        cookie,
        addrs: addrs.iter().map(|a| ip(a)).collect(),
    }
}

#[test]
fn frontends_cover_every_cluster_ip_of_every_l7_port() {
    let state = state();
    let routes = compile(&state);
    let config = proxy_config(&state, "n1", &routes, &[], 3, None);
    assert_eq!(config.version, 3);
    assert_eq!(config.node, "n1");
    let frontends: Vec<(IpAddr, u16, &str, AppProtocol, bool)> = config
        .frontends
        .iter()
        .map(|f| {
            let svc = f.service.name.as_str();
            (f.addr, f.port, svc, f.protocol, f.routes.is_some())
        })
        .collect();
    assert_eq!(
        frontends,
        [
            (ip("10.96.0.20"), 9000, "api", AppProtocol::Grpc, false),
            (ip("10.96.0.10"), 80, "web", AppProtocol::Http, false),
            (ip("fd00:96::10"), 80, "web", AppProtocol::Http, false),
        ]
    );
    // Without routes, each frontend's own Service port is a target; `mirror` and
    // `other` are referenced by nothing, `headless` has no frontend.
    let targets: Vec<&ServicePortRef> = config.services.iter().map(|s| &s.target).collect();
    assert_eq!(targets, [&port_ref("api", 9000), &port_ref("web", 80)]);
}

#[test]
fn services_are_those_routes_and_mirrors_send_to() {
    let state = state();
    let mut routes = compile(&state);
    routes.tables.insert(port_ref("web", 80), table());
    let config = proxy_config(&state, "n1", &routes, &[], 1, None);
    let web: Vec<&Frontend> = config
        .frontends
        .iter()
        .filter(|f| f.service.name == "web")
        .collect();
    assert_eq!(web.len(), 2);
    assert!(web.iter().all(|f| f.routes == Some(table())));
    // `web` itself is only reached through its routes now.
    let targets: Vec<&ServicePortRef> = config.services.iter().map(|s| &s.target).collect();
    assert_eq!(targets, [&port_ref("api", 9000), &port_ref("mirror", 8080)]);
    let mirror = &config.services[1];
    assert_eq!(mirror.protocol, AppProtocol::Http);
    assert_eq!(mirror.host, "mirror.shop.svc.cluster.local");
    assert_eq!(
        mirror.endpoints,
        [Endpoint {
            addr: ip("10.244.2.11"),
            port: 8080,
            pod: None,
            workload: UNKNOWN_WORKLOAD.into(),
        }]
    );
}

#[test]
fn endpoints_are_the_ready_ones_of_both_families_with_their_workloads() {
    let state = state();
    let config = proxy_config(&state, "n1", &compile(&state), &[], 1, None);
    let endpoints = |name: &str| -> Vec<(IpAddr, u16, Option<ObjectRef>, String)> {
        let target = config
            .services
            .iter()
            .find(|s| s.target.service.name == name)
            .expect("service target");
        target
            .endpoints
            .iter()
            .map(|e| (e.addr, e.port, e.pod.clone(), e.workload.clone()))
            .collect()
    };
    // EndpointSlices: not ready and terminating endpoints are left out; a pod without
    // labels is its own workload; an endpoint without targetRef is `unknown`.
    assert_eq!(
        endpoints("api"),
        [
            (ip("10.244.1.7"), 9090, pod_ref("api-1"), "api-1".into()),
            (ip("10.244.3.3"), 9090, None, "unknown".into()),
            (ip("fd00:244:1::7"), 9090, pod_ref("api-1"), "api-1".into()),
        ]
    );
    // Selected pods: the named target port is looked up per pod; the not-ready web-3
    // is left out; app.kubernetes.io/name wins over app.
    assert_eq!(
        endpoints("web"),
        [
            (
                ip("10.244.1.5"),
                8080,
                pod_ref("web-1"),
                "storefront".into()
            ),
            (ip("10.244.2.5"), 8081, pod_ref("web-2"), "web".into()),
            (
                ip("fd00:244:1::5"),
                8080,
                pod_ref("web-1"),
                "storefront".into()
            ),
        ]
    );
}

#[test]
fn resilience_comes_from_annotations_or_defaults() {
    let state = state();
    let config = proxy_config(&state, "n1", &compile(&state), &[], 1, None);
    let of = |name: &str| {
        let target = config
            .services
            .iter()
            .find(|s| s.target.service.name == name);
        target.expect("service target").resilience
    };
    assert_eq!(of("api"), Resilience::default());
    assert_eq!(
        of("web"),
        Resilience {
            max_connections: 7,
            base_ejection_ms: 1_000,
            ..Resilience::default()
        }
    );
    let api = config
        .services
        .iter()
        .find(|s| s.target.service.name == "api");
    assert_eq!(api.expect("api").protocol, AppProtocol::Grpc);
}

#[test]
fn local_pods_are_matched_by_address_on_this_node() {
    let state = state();
    let local = [
        // web-1 by its IPv6 address alone.
        netns(40, 9, &["fd00:244:1::5"]),
        netns(30, 8, &["10.244.1.7", "fd00:244:1::7"]),
        // web-2 runs on n2: not this node's pod.
        netns(50, 10, &["10.244.2.5"]),
        // No pod has this address.
        netns(60, 11, &["10.244.1.99"]),
    ];
    let config = proxy_config(&state, "n1", &compile(&state), &local, 1, None);
    assert_eq!(
        config.pods,
        [
            LocalPod {
                pod: pod_ref("api-1").expect("ref"),
                workload: "api-1".into(),
                addrs: vec![ip("10.244.1.7"), ip("fd00:244:1::7")],
                netns: NetnsRef {
                    pid: 30,
                    inode: 4_026_532_008,
                    cookie: 8,
                },
                identity: None,
                security: None,
            },
            LocalPod {
                pod: pod_ref("web-1").expect("ref"),
                workload: "storefront".into(),
                addrs: vec![ip("10.244.1.5"), ip("fd00:244:1::5")],
                netns: NetnsRef {
                    pid: 40,
                    inode: 4_026_532_009,
                    cookie: 9,
                },
                identity: None,
                security: None,
            },
        ]
    );
    // On n2, only web-2 is local.
    let config = proxy_config(&state, "n2", &compile(&state), &local, 1, None);
    let pods: Vec<&str> = config.pods.iter().map(|p| p.pod.name.as_str()).collect();
    assert_eq!(pods, ["web-2"]);
}

#[test]
fn ambiguous_namespaces_are_left_out() {
    let state = state();
    let local = [
        // One namespace with the addresses of two pods.
        netns(30, 8, &["10.244.1.7", "10.244.1.5"]),
        // Two namespaces claiming web-3.
        netns(40, 9, &["10.244.1.6"]),
        netns(41, 12, &["10.244.1.6"]),
    ];
    let config = proxy_config(&state, "n1", &compile(&state), &local, 1, None);
    assert_eq!(config.pods, []);
}

#[test]
fn equal_inputs_give_equal_snapshots_whatever_the_discovery_order() {
    let state = state();
    let mut routes = compile(&state);
    routes.tables.insert(port_ref("web", 80), table());
    let mut local = vec![
        netns(40, 9, &["fd00:244:1::5"]),
        netns(30, 8, &["10.244.1.7"]),
    ];
    let first = proxy_config(&state, "n1", &routes, &local, 1, None);
    local.reverse();
    let second = proxy_config(&state, "n1", &routes, &local, 1, None);
    assert_eq!(first, second);
    assert_eq!(
        serde_json::to_string(&first).expect("json"),
        serde_json::to_string(&second).expect("json")
    );
}

#[test]
fn enrolled_pods_know_the_container_ports_l7_services_send_to() {
    let yaml = format!(
        "{FIXTURE}---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: shop, labels: \
         {{istio.io/dataplane-mode: ambient}}}}\n"
    );
    let state = parse_str("fixture.yaml", &yaml).expect("fixture");
    let local = [netns(40, 9, &["10.244.1.5"]), netns(30, 8, &["10.244.1.7"])];
    let config = proxy_config(&state, "n1", &compile(&state), &local, 1, None);
    let http_ports = |name: &str| {
        let pod = config.pods.iter().find(|p| p.pod.name == name).expect(name);
        pod.security.as_ref().expect("enrolled").http_ports.clone()
    };
    // web's appProtocol http port targets web-1's named port (8080), api's grpc port
    // api-1's 9090.
    assert_eq!(http_ports("web-1"), [8080]);
    assert_eq!(http_ports("api-1"), [9090]);
}
