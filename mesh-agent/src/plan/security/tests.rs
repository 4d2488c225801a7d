use mesh_common::security::{AuthzAction, Condition, IpNet, Matches, Pattern};

use super::*;
use crate::plan::proxy::proxy_config;
use crate::plan::routes::compile;
use crate::state::parse_str;

/// Namespaces `shop` (ambient) and `plain` (not), pods in both, a Service `web`.
const FIXTURE: &str = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: v1
kind: Namespace
metadata: {name: plain}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80, targetPort: 8080}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: shop, labels: {app: web}}
spec: {nodeName: n1, serviceAccountName: web-sa, containers: [{name: c}]}
status: {podIP: 10.244.1.5, podIPs: [{ip: 10.244.1.5}, {ip: 'fd00::5'}]}
---
apiVersion: v1
kind: Pod
metadata: {name: db-1, namespace: shop, labels: {app: db}}
spec: {nodeName: n2, containers: [{name: c}]}
status: {podIP: 10.244.2.6}
---
apiVersion: v1
kind: Pod
metadata: {name: out-1, namespace: shop, labels: {app: web, istio.io/dataplane-mode: none}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.7}
---
apiVersion: v1
kind: Pod
metadata: {name: done-1, namespace: shop}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.9, phase: Succeeded}
---
apiVersion: v1
kind: Pod
metadata: {name: app-1, namespace: plain, labels: {app: web}}
spec: {nodeName: n1, containers: [{name: c}]}
status: {podIP: 10.244.1.8}
---
apiVersion: v1
kind: Pod
metadata: {name: opt-in, namespace: plain, labels: {istio.io/dataplane-mode: ambient}}
spec: {nodeName: n2, serviceAccount: legacy, containers: [{name: c}]}
status: {podIP: 10.244.2.8}
";

fn state(extra: &str) -> State {
    let text = format!("{FIXTURE}---\n{extra}");
    parse_str("t.yaml", &text).unwrap_or_else(|e| panic!("{e}"))
}

fn key(namespace: &str, name: &str) -> ObjectKey {
    ObjectKey {
        namespace: namespace.into(),
        name: name.into(),
    }
}

/// The security settings of pod `namespace/name` (which must be enrolled).
fn workload(
    state: &State,
    trust_domain: Option<&str>,
    ns: &str,
    name: &str,
) -> (String, WorkloadSecurity) {
    let k = key(ns, name);
    let pod = state.pods().find(|(pk, _)| **pk == k).expect("pod").1;
    MeshSecurity::new(state, trust_domain)
        .workload(&k, pod)
        .unwrap_or_else(|| panic!("{k} is not enrolled"))
}

fn policies(state: &State, ns: &str, name: &str) -> Vec<String> {
    let (_, security) = workload(state, None, ns, name);
    security
        .policies
        .iter()
        .map(|p| format!("{}/{}", p.policy.namespace, p.policy.name))
        .collect()
}

#[test]
fn enrollment_follows_namespace_and_pod_labels() {
    let state = state("");
    let security = MeshSecurity::new(&state, None);
    let enrolled: Vec<String> = state
        .pods()
        .filter(|(k, p)| state.enrolled(k, p))
        .map(|(k, _)| k.to_string())
        .collect();
    // out-1 opted out, app-1's namespace is not ambient, opt-in opted in;
    // done-1 is enrolled but finished (not a mesh endpoint, below).
    assert_eq!(
        enrolled,
        ["plain/opt-in", "shop/db-1", "shop/done-1", "shop/web-1"]
    );
    let mesh = security.mesh_endpoints();
    let row = |i: usize| {
        (
            mesh[i].addr.to_string(),
            mesh[i].node.as_str(),
            mesh[i].identity.as_str(),
        )
    };
    assert_eq!(
        row(0),
        (
            "10.244.1.5".into(),
            "n1",
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        )
    );
    assert_eq!(
        row(1),
        (
            "10.244.2.6".into(),
            "n2",
            "spiffe://cluster.local/ns/shop/sa/default"
        )
    );
    assert_eq!(
        row(2),
        (
            "10.244.2.8".into(),
            "n2",
            "spiffe://cluster.local/ns/plain/sa/legacy"
        )
    );
    assert_eq!(
        row(3),
        (
            "fd00::5".into(),
            "n1",
            "spiffe://cluster.local/ns/shop/sa/web-sa"
        )
    );
    assert_eq!(mesh.len(), 4);
}

#[test]
fn trust_domain_flag_beats_mesh_config_beats_default() {
    let mesh_config = "apiVersion: v1
kind: ConfigMap
metadata: {name: istio, namespace: istio-system}
data: {mesh: 'trustDomain: corp.example'}
";
    assert_eq!(
        workload(&state(""), None, "shop", "web-1").0,
        "spiffe://cluster.local/ns/shop/sa/web-sa"
    );
    let with_config = state(mesh_config);
    assert_eq!(
        workload(&with_config, None, "shop", "web-1").0,
        "spiffe://corp.example/ns/shop/sa/web-sa"
    );
    assert_eq!(
        workload(&with_config, Some("flag.example"), "shop", "web-1").0,
        "spiffe://flag.example/ns/shop/sa/web-sa"
    );
    let config = proxy_config(
        &with_config,
        "n1",
        &compile(&with_config),
        &[],
        1,
        Some("flag.example"),
    );
    assert_eq!(config.trust_domain, "flag.example");
    assert!(
        config
            .mesh
            .iter()
            .all(|e| e.identity.starts_with("spiffe://flag.example/"))
    );
}

fn pa(namespace: &str, name: &str, created: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {namespace}, creationTimestamp: '{created}'}}\nspec: {spec}\n---\n"
    )
}

fn modes(state: &State, ns: &str, name: &str) -> (MtlsMode, Vec<(u16, MtlsMode)>) {
    let (_, s) = workload(state, None, ns, name);
    (
        s.mtls,
        s.port_mtls.iter().map(|p| (p.port, p.mode)).collect(),
    )
}

#[test]
fn peer_authentication_precedence() {
    use MtlsMode::{Disable, Permissive, Strict};
    const T1: &str = "2024-01-01T00:00:00Z";
    const T2: &str = "2024-02-01T00:00:00Z";
    // Nothing: permissive.
    assert_eq!(modes(&state(""), "shop", "web-1"), (Permissive, vec![]));
    // Mesh-wide (root namespace, no selector) applies everywhere.
    let mesh = pa("istio-system", "mesh", T1, "{mtls: {mode: STRICT}}");
    assert_eq!(modes(&state(&mesh), "plain", "opt-in"), (Strict, vec![]));
    // A namespace policy beats the mesh's; UNSET inherits from the mesh.
    let ns = pa("shop", "ns", T1, "{mtls: {mode: DISABLE}}");
    assert_eq!(
        modes(&state(&format!("{mesh}{ns}")), "shop", "web-1"),
        (Disable, vec![])
    );
    let ns_unset = pa("shop", "ns", T1, "{mtls: {mode: UNSET}}");
    assert_eq!(
        modes(&state(&format!("{mesh}{ns_unset}")), "shop", "web-1"),
        (Strict, vec![])
    );
    // The workload's beats both; its UNSET inherits the namespace's; port-level
    // overrides per port, UNSET there inheriting the workload's mode.
    let wl = pa(
        "shop",
        "wl",
        T1,
        "{selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {mode: STRICT}, 9090: {mode: UNSET}}}",
    );
    assert_eq!(
        modes(&state(&format!("{mesh}{ns}{wl}")), "shop", "web-1"),
        (Permissive, vec![(8080, Strict), (9090, Permissive)])
    );
    // Only pods the selector matches: db-1 keeps the namespace's mode.
    assert_eq!(
        modes(&state(&format!("{mesh}{ns}{wl}")), "shop", "db-1"),
        (Disable, vec![])
    );
    let wl_unset = pa(
        "shop",
        "wl",
        T1,
        "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: STRICT}}}",
    );
    assert_eq!(
        modes(&state(&format!("{ns}{wl_unset}")), "shop", "web-1"),
        (Disable, vec![(8080, Strict)])
    );
    // Several at one level: the oldest wins, then the first by name.
    let newer = pa("shop", "a-newer", T2, "{mtls: {mode: STRICT}}");
    assert_eq!(
        modes(&state(&format!("{ns}{newer}")), "shop", "web-1"),
        (Disable, vec![])
    );
    let same_time = pa("shop", "a-same", T1, "{mtls: {mode: STRICT}}");
    assert_eq!(
        modes(&state(&format!("{ns}{same_time}")), "shop", "web-1"),
        (Strict, vec![])
    );
    // A selector policy in the root namespace is not mesh-wide.
    let root_selector = pa(
        "istio-system",
        "sel",
        T1,
        "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}}",
    );
    assert_eq!(
        modes(&state(&root_selector), "shop", "web-1"),
        (Permissive, vec![])
    );
    // The root namespace comes from MeshConfig.
    let root = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: istio, namespace: istio-system}\ndata: {mesh: 'rootNamespace: mesh-root'}\n---\n";
    let moved = pa("mesh-root", "mesh", T1, "{mtls: {mode: STRICT}}");
    assert_eq!(
        modes(&state(&format!("{root}{moved}{mesh}")), "shop", "web-1"),
        (Strict, vec![])
    );
    assert_eq!(
        modes(&state(&format!("{root}{mesh}")), "shop", "web-1"),
        (Permissive, vec![])
    );
}

fn ap(namespace: &str, name: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {namespace}}}\nspec: {spec}\n---\n"
    )
}

#[test]
fn authorization_policy_scoping() {
    let text = [
        ap("istio-system", "mesh-wide", "{action: DENY, rules: [{}]}"),
        ap(
            "istio-system",
            "root-selector",
            "{selector: {matchLabels: {app: web}}}",
        ),
        ap("shop", "namespace", "{}"),
        ap("shop", "selector", "{selector: {matchLabels: {app: db}}}"),
        ap("shop", "empty-selector", "{selector: {}}"),
        ap(
            "shop",
            "service",
            "{targetRefs: [{kind: Service, group: '', name: web}]}",
        ),
        ap(
            "shop",
            "old-target-ref",
            "{targetRef: {kind: Service, name: web}}",
        ),
        ap(
            "shop",
            "missing-service",
            "{targetRefs: [{kind: Service, name: nope}]}",
        ),
        ap(
            "shop",
            "gateway",
            "{targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}",
        ),
        ap("plain", "other-namespace", "{}"),
    ]
    .concat();
    let state = state(&text);
    assert_eq!(
        policies(&state, "shop", "web-1"),
        [
            "istio-system/mesh-wide",
            "istio-system/root-selector",
            "shop/empty-selector",
            "shop/namespace",
            "shop/old-target-ref",
            "shop/service",
        ]
    );
    assert_eq!(
        policies(&state, "shop", "db-1"),
        [
            "istio-system/mesh-wide",
            "shop/empty-selector",
            "shop/namespace",
            "shop/selector"
        ]
    );
    assert_eq!(
        policies(&state, "plain", "opt-in"),
        ["istio-system/mesh-wide", "plain/other-namespace"]
    );
    // Pods outside the mesh get no settings at all.
    let out = key("shop", "out-1");
    let pod = state.pods().find(|(k, _)| **k == out).expect("pod").1;
    assert_eq!(MeshSecurity::new(&state, None).workload(&out, pod), None);
}

#[test]
fn policies_compile_to_matchers() {
    let text = ap(
        "shop",
        "p",
        "{action: DENY, rules: [{from: [{source: {principals: ['cluster.local/ns/a/*'], notNamespaces: [kube-system], ipBlocks: [10.0.0.0/8, 10.1.2.3], remoteIpBlocks: ['fd00::/16']}}], to: [{operation: {hosts: ['*.shop'], ports: ['8080'], notPorts: ['9090'], methods: [GET], notPaths: ['/admin*']}}], when: [{key: 'request.headers[X-Token]', values: ['*']}, {key: destination.port, notValues: ['81']}, {key: source.ip, values: ['192.168.1.9/24']}]}, {}]}",
    );
    let state = state(&text);
    let (_, security) = workload(&state, None, "shop", "web-1");
    let policy = &security.policies[0];
    assert_eq!(policy.action, AuthzAction::Deny);
    assert_eq!(policy.rules.len(), 2);
    assert_eq!(policy.rules[1], AuthzRule::default());
    let rule = &policy.rules[0];
    let source = &rule.from[0];
    assert_eq!(
        source.principals.values,
        [Pattern::Prefix("cluster.local/ns/a/".into())]
    );
    assert_eq!(
        source.namespaces.not_values,
        [Pattern::Exact("kube-system".into())]
    );
    let net = |a: &str, prefix: u8| IpNet {
        addr: a.parse().unwrap(),
        prefix,
    };
    assert_eq!(
        source.ip_blocks.values,
        [net("10.0.0.0", 8), net("10.1.2.3", 32)]
    );
    assert_eq!(source.remote_ip_blocks.values, [net("fd00::", 16)]);
    let op = &rule.to[0];
    assert_eq!(op.hosts.values, [Pattern::Suffix(".shop".into())]);
    assert_eq!(
        op.ports,
        Matches {
            values: vec![8080],
            not_values: vec![9090]
        }
    );
    assert_eq!(op.methods.values, [Pattern::Exact("GET".into())]);
    assert_eq!(op.paths.not_values, [Pattern::Prefix("/admin".into())]);
    assert_eq!(
        rule.when,
        [
            Condition::RequestHeader {
                name: "x-token".into(),
                matches: Matches {
                    values: vec![Pattern::Any],
                    not_values: vec![]
                },
            },
            Condition::DestinationPort(Matches {
                values: vec![],
                not_values: vec![81]
            }),
            Condition::SourceIp(Matches {
                values: vec![net("192.168.1.0", 24)],
                not_values: vec![]
            }),
        ]
    );
}
