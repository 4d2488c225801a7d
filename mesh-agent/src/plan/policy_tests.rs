use super::*;
use crate::state::parse_str;
use mesh_common::policy::IDENTITY_HOST;

const TCP: u8 = 6;
const UDP: u8 = 17;

fn state(yaml: &str) -> State {
    parse_str("policy.yaml", yaml).unwrap_or_else(|e| panic!("fixture rejected:\n{e}"))
}

/// A Pod in `ns` on `node` with `labels`, address `ip`, and named container ports
/// `http` (8080/TCP) and `dns` (5353/UDP).
fn pod(ns: &str, name: &str, labels: &str, ip: &str, node: &str) -> String {
    format!(
        "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, labels: {labels}}}\n\
         spec:\n  nodeName: {node}\n  containers:\n  - name: c\n    ports: [{{name: http, containerPort: 8080}}, {{name: dns, containerPort: 5353, protocol: UDP}}]\n\
         status: {{podIP: '{ip}'}}\n"
    )
}

fn namespace(name: &str, labels: &str) -> String {
    format!("---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: {labels}}}\n")
}

fn policy(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

/// Plans on node `n1`, where every pod of `n1` has a netns cookie (1, 2, ... in pod
/// order).
fn plan_with(
    yaml: &str,
    prev: &IdentityIds,
    capacities: PolicyCapacities,
) -> Result<(PolicyPlan, IdentityIds), PlanError> {
    let state = state(yaml);
    let local_netns: BTreeMap<IpAddr, u64> = state
        .pods()
        .filter(|(_, p)| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some("n1"))
        .flat_map(|(_, p)| pod_ips(p))
        .zip(1..)
        .collect();
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &local_netns,
        node_addrs: &[],
        capacities,
    };
    plan_policy(&state, prev, &ctx)
}

fn plan_of(yaml: &str) -> PolicyPlan {
    plan_with(yaml, &IdentityIds::default(), PolicyCapacities::default())
        .expect("plan")
        .0
}

/// The 128 bits the IPCACHE trie sees: IPv4 as IPv4-mapped IPv6.
fn trie_bits(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(a.to_ipv6_mapped()),
        IpAddr::V6(a) => u128::from(a),
    }
}

/// What the datapath finds for `ip`: longest-prefix match in IPCACHE, world on a miss.
fn ipcache_of(plan: &PolicyPlan, ip: &str) -> IpcacheValue {
    let bits = trie_bits(ip.parse().expect("ip"));
    plan.ipcache
        .iter()
        .filter(|(k, _)| {
            let mask = u128::MAX.checked_shl(128 - k.prefixlen).unwrap_or(0);
            bits & mask == trie_bits(IpAddr::from(k.addr)) & mask
        })
        .max_by_key(|(k, _)| k.prefixlen)
        .map_or(
            IpcacheValue {
                identity: IDENTITY_WORLD,
                owner: IDENTITY_WORLD,
                flags: 0,
            },
            |(_, v)| *v,
        )
}

/// The peer identity the datapath finds for `ip`.
fn identity_of(plan: &PolicyPlan, ip: &str) -> u32 {
    ipcache_of(plan, ip).identity
}

/// The POLICY trie's longest-prefix lookup of a full key.
fn lookup(plan: &PolicyPlan, key: mesh_common::PolicyKeyData) -> Option<PolicyValue> {
    let port = u16::from_be(key.port_be);
    plan.policy
        .iter()
        .filter(|(k, _)| {
            let bits = k.prefixlen - POLICY_FIXED_PREFIX;
            let mask = u16::MAX.checked_shl(16 - bits).unwrap_or(0);
            (k.subject, k.direction, k.peer, k.proto)
                == (key.subject, key.direction, key.peer, key.proto)
                && port & mask == u16::from_be(k.port_be) & mask
        })
        .max_by_key(|(k, _)| k.prefixlen)
        .map(|(_, v)| *v)
}

/// The datapath's decision (`mesh_common::policy::policy_allows`) over the plan's entries.
fn decide(plan: &PolicyPlan, subject: u32, dir: u8, peer: u32, proto: u8, port: u16) -> bool {
    let lookup = |key| lookup(plan, key);
    mesh_common::policy::policy_allows(lookup, subject, dir, peer, proto, port.to_be())
}

/// Whether `src` may reach `dst:port/proto`: egress of the source and ingress of the
/// destination both allow it (for non-local pods the plan has no entries: allowed).
fn reach(plan: &PolicyPlan, src: &str, dst: &str, proto: u8, port: u16) -> bool {
    // Subjects by their pod's identity, peers by the address's (as the hooks look
    // them up: egress by netns cookie, ingress by the destination's owner).
    let (s, d) = (ipcache_of(plan, src), ipcache_of(plan, dst));
    decide(plan, s.owner, DIR_EGRESS, d.identity, proto, port)
        && decide(plan, d.owner, DIR_INGRESS, s.identity, proto, port)
}

/// Asserts a reachability matrix: rows are sources, columns destinations; `1` reachable.
fn assert_matrix(plan: &PolicyPlan, ips: &[&str], proto: u8, port: u16, expected: &[&str]) {
    let got: Vec<String> = ips
        .iter()
        .map(|src| {
            ips.iter()
                .map(|dst| {
                    if reach(plan, src, dst, proto, port) {
                        '1'
                    } else {
                        '0'
                    }
                })
                .collect()
        })
        .collect();
    assert_eq!(got, expected, "port {port}/{proto}");
}

const A1: &str = "10.244.1.1";
const A2: &str = "10.244.1.2";
const B1: &str = "10.244.2.1";
const C1: &str = "10.244.3.1";

/// prod: a1 {app: web}, a2 {app: db}; dev (team=x): b1 {app: web}; kube-system: c1 {k8s-app: kube-dns}.
fn cluster() -> String {
    [
        namespace("dev", "{team: x}"),
        pod("prod", "a1", "{app: web}", A1, "n1"),
        pod("prod", "a2", "{app: db}", A2, "n1"),
        pod("dev", "b1", "{app: web}", B1, "n1"),
        pod("kube-system", "c1", "{k8s-app: kube-dns}", C1, "n1"),
    ]
    .concat()
}

#[test]
fn no_policy_allows_everything_and_plans_no_entries() {
    let plan = plan_of(&cluster());
    assert!(plan.policy.is_empty());
    assert_eq!(plan.ipcache.len(), 4);
    assert_eq!(plan.endpoints.len(), 4);
    assert_matrix(&plan, &[A1, A2, B1, C1], TCP, 80, &["1111"; 4]);
}

#[test]
fn node_addresses_are_the_host_identity_but_pods_keep_theirs() {
    let state = state(&cluster());
    let node_addrs: Vec<IpAddr> = ["169.254.1.1", "fd00:250::1", A1]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &BTreeMap::new(),
        node_addrs: &node_addrs,
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state, &IdentityIds::default(), &ctx).expect("plan");
    assert_eq!(identity_of(&plan, "169.254.1.1"), IDENTITY_HOST);
    assert_eq!(identity_of(&plan, "fd00:250::1"), IDENTITY_HOST);
    // A1 is a pod's address too: the pod's identity wins.
    assert!(identity_of(&plan, A1) >= mesh_common::policy::IDENTITY_FIRST_ALLOCATED);
}

/// The flags of the IPCACHE entry holding exactly `ip`.
fn flags_of(plan: &PolicyPlan, ip: &str) -> Option<u32> {
    let bits = trie_bits(ip.parse().expect("ip"));
    plan.ipcache
        .iter()
        .find(|(k, _)| k.prefixlen == 128 && trie_bits(IpAddr::from(k.addr)) == bits)
        .map(|(_, v)| v.flags)
}

#[test]
fn local_pods_and_node_addresses_are_marked_local_for_sockmap() {
    let yaml = cluster() + &pod("prod", "far", "{app: web}", "10.244.9.9", "n2");
    let node_addrs: Vec<IpAddr> = vec!["169.254.1.1".parse().expect("ip")];
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &BTreeMap::new(),
        node_addrs: &node_addrs,
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state(&yaml), &IdentityIds::default(), &ctx).expect("plan");
    for local in [A1, B1, "169.254.1.1"] {
        assert_eq!(
            flags_of(&plan, local),
            Some(IPCACHE_REDIRECT | IPCACHE_LOCAL),
            "{local}"
        );
    }
    assert_eq!(
        flags_of(&plan, "10.244.9.9"),
        Some(0),
        "a pod on another node"
    );
}

/// The plan of node n1 for `yaml`, where A1, A2, B1 and C1 are local pods with netns
/// cookies 1 to 4.
fn plan_local_four(yaml: &str) -> PolicyPlan {
    let local_netns: BTreeMap<IpAddr, u64> = [(A1, 1), (A2, 2), (B1, 3), (C1, 4)]
        .into_iter()
        .map(|(ip, cookie)| (ip.parse().expect("ip"), cookie))
        .collect();
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &local_netns,
        node_addrs: &[],
        capacities: PolicyCapacities::default(),
    };
    plan_policy(&state(yaml), &IdentityIds::default(), &ctx)
        .expect("plan")
        .0
}

#[test]
fn sockmap_opt_out_by_pod_or_namespace_annotation() {
    let annotated = |ns: &str, name: &str, ip: &str, value: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, \
             annotations: {{mesh.io/sockmap: '{value}'}}}}\nspec: {{nodeName: n1, containers: \
             [{{name: c}}]}}\nstatus: {{podIP: '{ip}'}}\n"
        )
    };
    let yaml = [
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: legacy, annotations: \
         {mesh.io/sockmap: 'false'}}\n"
            .to_owned(),
        pod("prod", "a1", "{app: web}", A1, "n1"),
        annotated("prod", "a2", A2, "false"),
        pod("legacy", "b1", "{app: web}", B1, "n1"),
        annotated("legacy", "c1", C1, "true"),
    ]
    .concat();
    let plan = plan_local_four(&yaml);
    // (address, netns cookie, may be redirected): a pod's annotation wins over its
    // namespace's; no annotation anywhere means yes.
    for (ip, cookie, allowed) in [(A1, 1, true), (A2, 2, false), (B1, 3, false), (C1, 4, true)] {
        let want = if allowed { IPCACHE_REDIRECT } else { 0 };
        assert_eq!(flags_of(&plan, ip), Some(want | IPCACHE_LOCAL), "{ip}");
        let want = if allowed { 0 } else { ENDPOINT_NO_SOCKMAP };
        assert_eq!(plan.endpoints[&cookie].flags, want, "{ip}");
    }
}

#[test]
fn ambient_enrollment_marks_endpoints_and_addresses() {
    let labelled = |ns: &str, name: &str, ip: &str, node: &str, mode: &str| {
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {ns}, \
             labels: {{istio.io/dataplane-mode: {mode}}}}}\nspec: {{nodeName: {node}, \
             containers: [{{name: c}}]}}\nstatus: {{podIP: '{ip}'}}\n"
        )
    };
    let yaml = [
        "---\napiVersion: v1\nkind: Namespace\nmetadata: {name: mesh, labels: \
         {istio.io/dataplane-mode: ambient}}\n"
            .to_owned(),
        pod("mesh", "in", "{app: web}", A1, "n1"),
        labelled("mesh", "out", A2, "n1", "none"),
        labelled("prod", "opted", B1, "n1", "ambient"),
        pod("prod", "plain", "{app: web}", C1, "n1"),
        pod("mesh", "far", "{app: web}", "10.244.9.9", "n2"),
    ]
    .concat();
    let plan = plan_local_four(&yaml);
    // The namespace label enrolls, a pod's `none` opts out, a pod's `ambient` opts in.
    for (ip, cookie, mesh) in [(A1, 1, true), (A2, 2, false), (B1, 3, true), (C1, 4, false)] {
        let flags = flags_of(&plan, ip).expect(ip);
        assert_eq!(flags & IPCACHE_MESH != 0, mesh, "{ip}");
        assert_ne!(flags & IPCACHE_LOCAL, 0, "{ip}");
        assert_eq!(
            plan.endpoints[&cookie].flags & ENDPOINT_MESH != 0,
            mesh,
            "{ip}"
        );
    }
    // An enrolled pod elsewhere: in the mesh, not local (connect4 tunnels to it).
    assert_eq!(flags_of(&plan, "10.244.9.9"), Some(IPCACHE_MESH));
}

#[test]
fn default_deny_ingress_is_the_marker_only() {
    let yaml = cluster()
        + &policy(
            "prod",
            "deny",
            "  podSelector: {}\n  policyTypes: [Ingress]",
        );
    let plan = plan_of(&yaml);
    let subjects: BTreeSet<u32> = plan.policy.keys().map(|k| k.subject).collect();
    assert_eq!(subjects.len(), 2, "a1 and a2");
    for (k, v) in &plan.policy {
        assert_eq!(
            (k.prefixlen, k.peer, k.direction, k.proto, k.port_be),
            (80, 0, DIR_INGRESS, 0, 0)
        );
        assert_eq!(
            *v,
            PolicyValue {
                flags: POLICY_ISOLATED,
                policy_id: 0
            }
        );
    }
    assert_matrix(
        &plan,
        &[A1, A2, B1, C1],
        TCP,
        80,
        &["0011", "0011", "0011", "0011"],
    );
    assert_eq!(
        plan.policies[0].to_string(),
        "#0 prod/deny [ingress] -> prod/a1, prod/a2"
    );
}

#[test]
fn peers_select_like_kubernetes() {
    let ips = [A1, A2, B1, C1];
    // Each case: the ingress rule's `from` for a policy selecting prod/a2 (app: db),
    // and who reaches a2 (the a2 column of the matrix, sources in `ips` order).
    let cases = [
        ("[{podSelector: {}}]", "1100"), // same namespace, a2 itself included
        ("[{podSelector: {matchLabels: {app: web}}}]", "1000"),
        ("[{namespaceSelector: {}}]", "1111"), // every pod of every namespace
        ("[{namespaceSelector: {matchLabels: {team: x}}}]", "0010"),
        // Namespaces not defined in the state have just their name label.
        (
            "[{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]",
            "0001",
        ),
        // AND in one peer, OR across peers.
        (
            "[{namespaceSelector: {matchLabels: {team: x}}, podSelector: {matchLabels: {app: db}}}]",
            "0000",
        ),
        (
            "[{namespaceSelector: {matchLabels: {team: x}}}, {podSelector: {matchLabels: {app: db}}}]",
            "0110",
        ),
        (
            "[{namespaceSelector: {}, podSelector: {matchExpressions: [{key: app, operator: In, values: [web]}]}}]",
            "1010",
        ),
        (
            "[{podSelector: {matchExpressions: [{key: app, operator: NotIn, values: [web]}]}}]",
            "0100",
        ),
        (
            "[{namespaceSelector: {}, podSelector: {matchExpressions: [{key: app, operator: DoesNotExist}]}}]",
            "0001",
        ),
        ("[]", "1111"), // no peers: everyone (world too)
    ];
    for (from, expected) in cases {
        let spec =
            format!("  podSelector: {{matchLabels: {{app: db}}}}\n  ingress: [{{from: {from}}}]");
        let plan = plan_of(&(cluster() + &policy("prod", "p", &spec)));
        let column: String = ips
            .iter()
            .map(|src| {
                if reach(&plan, src, A2, TCP, 80) {
                    '1'
                } else {
                    '0'
                }
            })
            .collect();
        assert_eq!(column, expected, "from: {from}");
        // Other pods are not isolated.
        assert!(reach(&plan, "192.0.2.1", A1, TCP, 80));
    }
}

#[test]
fn ip_blocks_resolve_by_longest_prefix() {
    let yaml = cluster()
        + &policy(
            "prod",
            "wide",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.2.0.0/16]}}]\n    ports: [{port: 443}]",
        )
        + &policy(
            "prod",
            "narrow",
            "  podSelector: {matchLabels: {app: web}}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.1.2.0/24}}, {ipBlock: {cidr: '2001:db8::/32'}}, {ipBlock: {cidr: '::/0', except: ['2001:db8::/32']}}]\n    ports: [{port: 443}]",
        );
    let plan = plan_of(&yaml);
    // Pods, then 10/8, 10.1/16, 10.2/16, 10.1.2/24, ::/0, 2001:db8::/32, and the IPv4
    // guard that keeps ::/0 from claiming IPv4 addresses.
    assert_eq!(plan.ipcache.len(), 4 + 6 + 1);
    let cidr_ids: Vec<String> = plan
        .identities
        .iter()
        .filter(|i| i.pods.is_empty())
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        cidr_ids,
        [
            "260 cidr 10.0.0.0/8",
            "261 cidr 10.1.0.0/16",
            "262 cidr 10.1.2.0/24",
            "263 cidr 10.2.0.0/16",
            "264 cidr ::/0",
            "265 cidr 2001:db8::/32"
        ]
    );
    for (dst, allowed) in [
        ("10.9.9.9", true),  // in 10/8, no except
        ("10.1.9.9", false), // in an except
        ("10.2.0.1", false), // in the other except
        ("10.1.2.3", true),  // in an except, but allowed by the narrow policy
        ("11.0.0.1", false), // world
        (A2, true),          // a pod inside 10/8 is in the block too
        ("2001:db8::1", true),
        ("2001:db9::1", true), // ::/0 minus 2001:db8::/32
        ("192.0.2.1", false),  // IPv4 world is not in ::/0
    ] {
        assert_eq!(reach(&plan, A1, dst, TCP, 443), allowed, "{dst}");
        assert!(
            !reach(&plan, A1, dst, TCP, 80),
            "{dst}: port 80 is not allowed"
        );
    }
    // b1 is in dev: not selected.
    assert!(reach(&plan, B1, "11.0.0.1", TCP, 80));
}

/// Addresses of [`split_cluster_yaml`]'s pods.
const X_A: &str = "10.244.1.10";
const X_B: &str = "10.244.2.10";
const Y_C: &str = "10.244.1.20";

/// x/a and x/b share labels (one identity) on two addresses; y/c is another pod.
fn split_cluster(policies: &str) -> PolicyPlan {
    plan_of(&split_cluster_yaml(policies))
}

#[test]
fn ip_block_of_one_pod_allows_that_pod_not_its_twin() {
    // Upstream e2e: "should allow egress access to server in CIDR block" (a /32 of the
    // server pod's IP), here against a pod that shares the server's labels.
    let plan = split_cluster(&policy(
        "y",
        "to-a",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.1.10/32}}]",
    ));
    let (c, a, b) = (Y_C, X_A, X_B);
    assert!(reach(&plan, c, a, TCP, 80), "the /32 allows x/a");
    assert!(
        !reach(&plan, c, b, TCP, 80),
        "x/b shares x/a's labels, not its address"
    );
    assert_ne!(identity_of(&plan, a), identity_of(&plan, b));
    assert_eq!(
        ipcache_of(&plan, a).owner,
        ipcache_of(&plan, b).owner,
        "both are still one identity as subjects"
    );
    assert_eq!(plan.split.identities, 1);
    let part = plan
        .identities
        .iter()
        .find(|i| matches!(i.key, IdentityKey::Part { .. }))
        .expect("a part identity");
    assert_eq!(
        part.to_string(),
        format!("{} x {{app=same}} within 10.244.1.10/32: x/a", part.id)
    );
}

#[test]
fn ip_block_except_applies_to_pod_addresses() {
    // Upstream e2e: "should enforce except clause while egress access to server in CIDR
    // block": the server's /32 is excepted from its /16.
    let plan = split_cluster(&policy(
        "y",
        "except-a",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.10/32]}}]",
    ));
    let (c, a, b) = (Y_C, X_A, X_B);
    assert!(!reach(&plan, c, a, TCP, 80), "x/a is excepted");
    assert!(reach(&plan, c, b, TCP, 80), "x/b is in the block");
    assert!(!reach(&plan, c, "10.245.0.1", TCP, 80), "outside the block");
    assert!(
        reach(&plan, c, "10.244.9.9", TCP, 80),
        "a non-pod address in the block"
    );
}

#[test]
fn ip_overlapping_cidr_and_except_is_allowed_by_another_peer() {
    // Upstream e2e: "should ensure an IP overlapping both IPBlock.CIDR and
    // IPBlock.Except is allowed": the peers of a rule are a union.
    let plan = split_cluster(&policy(
        "y",
        "union",
        "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.1.10/32]}}, {ipBlock: {cidr: 10.244.1.10/32}}]",
    ));
    let (c, a, b) = (Y_C, X_A, X_B);
    assert!(reach(&plan, c, a, TCP, 80));
    assert!(reach(&plan, c, b, TCP, 80));
}

#[test]
fn ingress_ip_block_judges_pod_sources() {
    // Ingress of y/c from 10.244.0.0/16 except x/b's /32.
    let plan = split_cluster(&policy(
        "y",
        "from-block",
        "  podSelector: {}\n  policyTypes: [Ingress]\n  ingress:\n  - from: [{ipBlock: {cidr: 10.244.0.0/16, except: [10.244.2.10/32]}}]\n    ports: [{port: 80}]",
    ));
    let (c, a, b) = (Y_C, X_A, X_B);
    assert!(reach(&plan, a, c, TCP, 80));
    assert!(!reach(&plan, b, c, TCP, 80));
    assert!(!reach(&plan, a, c, TCP, 81), "port 80 only");
}

#[test]
fn selector_rules_allow_every_part_of_their_peers() {
    // One policy splits x's pods by ipBlock; another selects them by label: both parts
    // stay reachable through the label rule, and the split is reported.
    let plan = split_cluster(
        &(policy(
            "y",
            "labels",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {ns: x}}}]\n    ports: [{port: http}]",
        ) + &policy(
            "x",
            "block",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{ipBlock: {cidr: 10.244.1.10/32}}]",
        )),
    );
    let (c, a, b) = (Y_C, X_A, X_B);
    assert!(reach(&plan, c, a, TCP, 8080), "named port resolved on x/a");
    assert!(reach(&plan, c, b, TCP, 8080), "and on x/b");
    assert!(!reach(&plan, c, b, TCP, 80));
    assert_eq!(plan.split.identities, 1);
    // y's label rule (named port) and x's own block rule name the part.
    assert_eq!(plan.split.entries, 2);
}

#[test]
fn ip_block_covers_the_node_but_the_node_stays_host() {
    let state = state(&split_cluster_yaml(&policy(
        "y",
        "to-node",
        "  podSelector: {}\n  policyTypes: [Egress, Ingress]\n  egress:\n  - to: [{ipBlock: {cidr: 169.254.1.1/32}}]",
    )));
    let node_addrs: Vec<IpAddr> = ["169.254.1.1", "169.254.2.1"]
        .iter()
        .map(|a| a.parse().expect("ip"))
        .collect();
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &BTreeMap::new(),
        node_addrs: &node_addrs,
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state, &IdentityIds::default(), &ctx).expect("plan");
    let c = Y_C;
    assert!(
        reach(&plan, c, "169.254.1.1", TCP, 80),
        "the node address in the block"
    );
    assert!(
        !reach(&plan, c, "169.254.2.1", TCP, 80),
        "the other node address"
    );
    for node in ["169.254.1.1", "169.254.2.1"] {
        assert_eq!(ipcache_of(&plan, node).owner, IDENTITY_HOST, "{node}");
    }
}

fn split_cluster_yaml(policies: &str) -> String {
    [
        namespace("x", "{ns: x}"),
        namespace("y", "{ns: y}"),
        pod("x", "a", "{app: same}", X_A, "n1"),
        pod("x", "b", "{app: same}", X_B, "n2"),
        pod("y", "c", "{app: c}", Y_C, "n1"),
        policies.to_owned(),
    ]
    .concat()
}

#[test]
fn named_ports_resolve_per_direction() {
    // a2 declares `http` as 9090; a1 as 8080 (the fixture default).
    let yaml = cluster().replace("name: http, containerPort: 8080}, {name: dns, containerPort: 5353, protocol: UDP}]\nstatus: {podIP: '10.244.1.2'", "name: http, containerPort: 9090}]\nstatus: {podIP: '10.244.1.2'")
        + &policy("prod", "in", "  podSelector: {matchLabels: {app: db}}\n  ingress: [{ports: [{port: http}]}]")
        + &policy(
            "dev",
            "out",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {}, podSelector: {matchLabels: {app: web}}}]\n    ports: [{port: http}]\n  - ports: [{port: dns, protocol: UDP}]",
        );
    let plan = plan_of(&yaml);
    // Ingress: a2's own `http`, 9090, from anyone.
    assert!(reach(&plan, A1, A2, TCP, 9090));
    assert!(reach(&plan, "192.0.2.1", A2, TCP, 9090));
    assert!(!reach(&plan, A1, A2, TCP, 8080));
    // Egress from b1: `http` of each web pod (a1: 8080; b1 itself: 8080); not a2.
    assert!(reach(&plan, B1, A1, TCP, 8080));
    assert!(!reach(&plan, B1, A1, TCP, 9090));
    assert!(!reach(&plan, B1, A2, TCP, 9090), "a2 is not app=web");
    // Peer-less rule with a named port: every pod identity declaring `dns`/UDP.
    assert!(reach(&plan, B1, C1, UDP, 5353));
    assert!(!reach(&plan, B1, A2, UDP, 5353), "a2 declares no dns port");
    assert!(
        !reach(&plan, B1, "192.0.2.1", UDP, 5353),
        "world has no named ports"
    );
}

#[test]
fn egress_deny_all_but_dns() {
    let yaml = cluster()
        + &policy(
            "prod",
            "dns-only",
            "  podSelector: {}\n  policyTypes: [Egress]\n  egress:\n  - to: [{namespaceSelector: {matchLabels: {kubernetes.io/metadata.name: kube-system}}}]\n    ports: [{port: 53, protocol: UDP}, {port: 53, protocol: TCP}]",
        );
    let plan = plan_of(&yaml);
    for proto in [UDP, TCP] {
        assert_matrix(
            &plan,
            &[A1, A2, B1, C1],
            proto,
            53,
            &["0001", "0001", "1111", "1111"],
        );
    }
    assert_matrix(
        &plan,
        &[A1, A2, B1, C1],
        UDP,
        54,
        &["0000", "0000", "1111", "1111"],
    );
    assert!(!reach(&plan, A1, "8.8.8.8", UDP, 53));
    // Per subject: marker + UDP 53 + TCP 53 to the one kube-system identity.
    assert_eq!(plan.policy.len(), 2 * 3);
}

#[test]
fn port_ranges_become_aligned_prefixes() {
    // (first port, last port, expected blocks)
    type Case = (u16, u16, &'static [(u16, u8)]);
    let cases: [Case; 6] = [
        (80, 80, &[(80, 16)]),
        (32000, 32768, &[(32000, 8), (32256, 7), (32768, 16)]),
        (0, 65535, &[(0, 0)]),
        (
            1,
            65535,
            &[
                (1, 16),
                (2, 15),
                (4, 14),
                (8, 13),
                (16, 12),
                (32, 11),
                (64, 10),
                (128, 9),
                (256, 8),
                (512, 7),
                (1024, 6),
                (2048, 5),
                (4096, 4),
                (8192, 3),
                (16384, 2),
                (32768, 1),
            ],
        ),
        (8, 15, &[(8, 13)]),
        (65535, 65535, &[(65535, 16)]),
    ];
    for (start, end, expected) in cases {
        let got = port_prefixes(start, end);
        assert_eq!(got, expected, "{start}..={end}");
        // The blocks cover the range exactly.
        let covered: u32 = got.iter().map(|&(_, bits)| 1u32 << (16 - bits)).sum();
        assert_eq!(covered, u32::from(end - start) + 1);
    }
    // The worst case stays within 32 entries.
    assert!(port_prefixes(1, 65534).len() <= 32);

    let yaml = cluster()
        + &policy(
            "prod",
            "range",
            "  podSelector: {}\n  ingress: [{ports: [{port: 32000, endPort: 32768}]}]",
        );
    let plan = plan_of(&yaml);
    for (port, allowed) in [
        (31999, false),
        (32000, true),
        (32500, true),
        (32768, true),
        (32769, false),
    ] {
        assert_eq!(reach(&plan, B1, A1, TCP, port), allowed, "{port}");
    }
}

#[test]
fn identities_follow_namespace_and_labels() {
    let yaml = [
        pod("prod", "a1", "{app: web, tier: f}", A1, "n1"),
        pod("prod", "a2", "{tier: f, app: web}", A2, "n2"),
        pod("dev", "b1", "{app: web, tier: f}", B1, "n1"),
        pod("prod", "x", "{app: web}", "fd00::1", "n2"),
    ]
    .concat();
    let plan = plan_of(&yaml);
    let lines: Vec<String> = plan.identities.iter().map(ToString::to_string).collect();
    assert_eq!(
        lines,
        [
            "256 dev {app=web,tier=f}: dev/b1",
            "257 prod {app=web}: prod/x",
            "258 prod {app=web,tier=f}: prod/a1, prod/a2",
        ]
    );
    assert_eq!(identity_of(&plan, A1), identity_of(&plan, A2));
    assert_eq!(identity_of(&plan, "fd00::1"), 257);
    assert_eq!(identity_of(&plan, "fd00::2"), IDENTITY_WORLD);
}

#[test]
fn ids_are_stable_and_freed_ids_wait_a_plan() {
    let base = [
        pod("prod", "a1", "{app: a}", A1, "n1"),
        pod("prod", "b1", "{app: b}", A2, "n1"),
    ]
    .concat();
    let (_, ids1) =
        plan_with(&base, &IdentityIds::default(), PolicyCapacities::default()).expect("plan");
    // Remove app=a (256), add app=0 which sorts first: it must not take 256 yet.
    let next = [
        pod("prod", "z", "{app: '0'}", B1, "n1"),
        pod("prod", "b1", "{app: b}", A2, "n1"),
    ]
    .concat();
    let (plan2, ids2) = plan_with(&next, &ids1, PolicyCapacities::default()).expect("plan");
    assert_eq!(identity_of(&plan2, A2), 257, "kept");
    assert_eq!(identity_of(&plan2, B1), 258, "freed 256 not reused yet");
    let (plan3, _) = plan_with(
        &(next + &pod("prod", "c", "{app: c}", C1, "n1")),
        &ids2,
        PolicyCapacities::default(),
    )
    .expect("plan");
    assert_eq!(identity_of(&plan3, C1), 256, "reused one plan later");
}

#[test]
fn only_local_subjects_get_policy_entries() {
    let yaml = [
        pod("prod", "a1", "{app: web}", A1, "n1"),
        pod("prod", "a2", "{app: db}", A2, "n2"),
        pod("prod", "a3", "{app: web}", "10.244.1.3", "n2"),
        pod("prod", "dual", "{app: dual}", "10.244.1.4", "n1").replace(
            "status: {podIP: '10.244.1.4'",
            "status: {podIPs: [{ip: 10.244.1.4}, {ip: 'fd00::4'}], podIP: '10.244.1.4'",
        ),
        policy("prod", "deny", "  podSelector: {}"),
    ]
    .concat();
    let state = state(&yaml);
    // The agent found a1 and the dual-stack pod by its IPv6 address only, plus an
    // address that is no local pod's.
    let local_netns = BTreeMap::from([
        (A1.parse().expect("ip"), 11),
        ("fd00::4".parse().expect("ip"), 14),
        (A2.parse().expect("ip"), 12),
    ]);
    let ctx = PolicyContext {
        node: "n1",
        local_netns: &local_netns,
        node_addrs: &[],
        capacities: PolicyCapacities::default(),
    };
    let (plan, _) = plan_policy(&state, &IdentityIds::default(), &ctx).expect("plan");
    let (web, dual) = (identity_of(&plan, A1), identity_of(&plan, "10.244.1.4"));
    assert_eq!(identity_of(&plan, "fd00::4"), dual);
    assert_eq!(
        plan.endpoints,
        BTreeMap::from([
            (
                11,
                EndpointValue {
                    identity: web,
                    flags: 0
                }
            ),
            (
                14,
                EndpointValue {
                    identity: dual,
                    flags: 0
                }
            ),
        ]),
        "a2 runs on n2"
    );
    assert_eq!(plan.ipcache.len(), 5, "every pod address");
    let subjects: BTreeSet<u32> = plan.policy.keys().map(|k| k.subject).collect();
    assert_eq!(subjects, BTreeSet::from([web, dual]), "db has no local pod");
    assert_eq!(
        plan.policies[0].selected.len(),
        4,
        "selection is cluster-wide"
    );
}

#[test]
fn allow_all_rule_shares_the_marker_key() {
    // `ingress: [{}]` allows everything: its entry is the marker's key, with both flags.
    let plan = plan_of(&(cluster() + &policy("prod", "all", "  podSelector: {}\n  ingress: [{}]")));
    assert!(
        plan.policy
            .values()
            .all(|v| v.flags == POLICY_ISOLATED | POLICY_ALLOW)
    );
    assert_matrix(&plan, &[A1, A2, B1, C1], TCP, 80, &["1111"; 4]);
}

#[test]
fn capacity_overflow_names_the_map() {
    let yaml = cluster() + &policy("prod", "deny", "  podSelector: {}");
    let exact = PolicyCapacities {
        endpoints: 4,
        ipcache: 4,
        policy: 2,
    };
    assert!(plan_with(&yaml, &IdentityIds::default(), exact).is_ok());
    for (capacities, map) in [
        (
            PolicyCapacities {
                endpoints: 3,
                ..exact
            },
            maps::ENDPOINTS,
        ),
        (
            PolicyCapacities {
                ipcache: 3,
                ..exact
            },
            maps::IPCACHE,
        ),
        (PolicyCapacities { policy: 1, ..exact }, maps::POLICY),
    ] {
        let err = plan_with(&yaml, &IdentityIds::default(), capacities).expect_err("overflow");
        assert!(
            matches!(err, PlanError::PolicyCapacity { map: m, .. } if m == map),
            "{err}"
        );
    }
}

#[test]
fn inbound_capture_follows_peer_authentication_and_authorization_policy() {
    let ns = |name: &str| {
        format!(
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {name}, labels: \
             {{istio.io/dataplane-mode: ambient}}}}\n"
        )
    };
    let base = [
        ns("strict"),
        ns("authz"),
        ns("open"),
        pod("strict", "a", "{app: web}", A1, "n1"),
        pod("authz", "b", "{app: web}", A2, "n1"),
        pod("open", "c", "{app: web}", B1, "n1"),
        pod("default", "plain", "{app: web}", C1, "n1"),
        pod("strict", "far", "{app: web}", "10.244.9.9", "n2"),
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: \
         {name: p, namespace: strict}\nspec: {mtls: {mode: STRICT}}\n"
            .to_owned(),
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: \
         {name: deny, namespace: authz}\nspec: {action: DENY, rules: [{}]}\n"
            .to_owned(),
    ]
    .concat();
    let plan = plan_local_four(&base);
    // STRICT and an AuthorizationPolicy capture; PERMISSIVE without policy, pods
    // outside the mesh, and pods of other nodes (their node captures) do not.
    for (ip, captured) in [
        (A1, true),
        (A2, true),
        (B1, false),
        (C1, false),
        ("10.244.9.9", false),
    ] {
        let flags = flags_of(&plan, ip).expect(ip);
        assert_eq!(flags & IPCACHE_INBOUND != 0, captured, "{ip}");
    }
    // A port-level STRICT is enough.
    let port_level = base.replace(
        "spec: {mtls: {mode: STRICT}}",
        "spec: {selector: {matchLabels: {app: web}}, mtls: {mode: PERMISSIVE}, \
         portLevelMtls: {8080: {mode: STRICT}}}",
    );
    let plan = plan_local_four(&port_level);
    assert_ne!(flags_of(&plan, A1).unwrap() & IPCACHE_INBOUND, 0);
}
