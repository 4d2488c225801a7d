use std::path::PathBuf;

use super::*;

/// The problems of a rejected update, one rendered line each.
fn problems(file: &str, text: &str) -> Vec<String> {
    match parse_str(file, text) {
        Ok(_) => panic!("expected {file} to be rejected"),
        Err(StateError::Invalid(errors)) => errors.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn ok(text: &str) -> State {
    parse_str("t.yaml", text).unwrap_or_else(|e| panic!("expected success, got:\n{e}"))
}

/// A Service, Pod and EndpointSlice as `kubectl get -o yaml` prints them: every field
/// here exists in the schema, so strict parsing must accept all of it.
const REALISTIC: &str = r#"
apiVersion: v1
kind: Service
metadata:
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: |
      {"apiVersion":"v1","kind":"Service"}
  creationTimestamp: "2024-05-01T10:00:00Z"
  labels: {app: web, app.kubernetes.io/name: web}
  name: web
  namespace: shop
  resourceVersion: "12345"
  uid: 2f1c7a4e-1111-2222-3333-444455556666
  managedFields:
  - apiVersion: v1
    fieldsType: FieldsV1
    fieldsV1:
      f:spec:
        f:ports:
          .: {}
          k:{"port":80,"protocol":"TCP"}: {.: {}, f:name: {}}
    manager: kubectl-client-side-apply
    operation: Update
    time: "2024-05-01T10:00:00Z"
spec:
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  internalTrafficPolicy: Cluster
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  ports:
  - {name: http, port: 80, protocol: TCP, targetPort: http, appProtocol: http}
  - {name: metrics, port: 9090, protocol: TCP, targetPort: 9090}
  selector: {app: web}
  sessionAffinity: None
  trafficDistribution: PreferClose
  type: ClusterIP
status:
  loadBalancer: {}
---
apiVersion: v1
kind: Pod
metadata:
  creationTimestamp: "2024-05-01T10:00:00Z"
  generateName: web-7d4b9c-
  labels: {app: web, pod-template-hash: 7d4b9c}
  name: web-7d4b9c-abcde
  namespace: shop
  ownerReferences:
  - {apiVersion: apps/v1, blockOwnerDeletion: true, controller: true, kind: ReplicaSet, name: web-7d4b9c, uid: 0000-1}
spec:
  containers:
  - name: web
    image: nginx:1.27
    imagePullPolicy: IfNotPresent
    args: ["--port", "8080"]
    env:
    - {name: MODE, value: prod}
    - name: POD_IP
      valueFrom: {fieldRef: {apiVersion: v1, fieldPath: status.podIP}}
    ports:
    - {containerPort: 8080, name: http, protocol: TCP}
    readinessProbe:
      httpGet: {path: /healthz, port: http, scheme: HTTP}
      periodSeconds: 5
      failureThreshold: 3
    resources:
      limits: {cpu: 1, memory: 256Mi}
      requests: {cpu: 100m, memory: 64Mi}
    securityContext: {runAsNonRoot: true, allowPrivilegeEscalation: false, capabilities: {drop: [ALL]}}
    terminationMessagePath: /dev/termination-log
    terminationMessagePolicy: File
    volumeMounts:
    - {mountPath: /var/run/secrets/kubernetes.io/serviceaccount, name: kube-api-access, readOnly: true}
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: node-1
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: web
  serviceAccountName: web
  terminationGracePeriodSeconds: 30
  tolerations:
  - {effect: NoExecute, key: node.kubernetes.io/not-ready, operator: Exists, tolerationSeconds: 300}
  volumes:
  - name: kube-api-access
    projected:
      defaultMode: 420
      sources:
      - serviceAccountToken: {expirationSeconds: 3607, path: token}
      - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
status:
  conditions:
  - {lastProbeTime: null, lastTransitionTime: "2024-05-01T10:00:01Z", status: "True", type: Initialized}
  - {lastProbeTime: null, lastTransitionTime: "2024-05-01T10:00:05Z", status: "True", type: Ready}
  containerStatuses:
  - containerID: containerd://abc
    image: docker.io/library/nginx:1.27
    imageID: docker.io/library/nginx@sha256:0123
    lastState: {}
    name: web
    ready: true
    restartCount: 0
    started: true
    state: {running: {startedAt: "2024-05-01T10:00:02Z"}}
  hostIP: 192.168.250.1
  hostIPs: [{ip: 192.168.250.1}]
  phase: Running
  podIP: 10.244.1.5
  podIPs: [{ip: 10.244.1.5}]
  qosClass: Burstable
  startTime: "2024-05-01T10:00:00Z"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abc12
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
addressType: IPv4
endpoints:
- addresses: [10.244.1.5]
  conditions: {ready: true, serving: true, terminating: false}
  hints: {forNodes: [{name: node-1}], forZones: [{name: zone-a}]}
  nodeName: node-1
  zone: zone-a
  targetRef: {kind: Pod, name: web-7d4b9c-abcde, namespace: shop, uid: 0000-2}
ports:
- {name: http, port: 8080, protocol: TCP}
"#;

#[test]
fn realistic_manifests_have_no_false_unknown_fields() {
    let state = ok(REALISTIC);
    assert_eq!(state.services().len(), 1);
    assert_eq!(state.pods().len(), 1);
    assert_eq!(state.endpoint_slices().len(), 1);
    let (key, _) = state.pods().next().expect("pod in shop");
    assert_eq!(key.to_string(), "shop/web-7d4b9c-abcde");
}

#[test]
fn unknown_fields_are_rejected_with_their_path() {
    let text = "
apiVersion: v1
kind: Service
metadata: {name: web, labelz: {a: b}}
spec:
  portz: []
  selectr: {app: web}
  ports:
  - {port: 80, targetPortt: 8080}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
spec:
  containers:
  - name: c
    ports: [{containerPort: 80, nmae: http}]
";
    assert_eq!(
        problems("x.yaml", text),
        [
            "x.yaml: document 1 (Service default/web): metadata.labelz: unknown field",
            "x.yaml: document 1 (Service default/web): spec.ports[0].targetPortt: unknown field",
            "x.yaml: document 1 (Service default/web): spec.selectr: unknown field",
            "x.yaml: document 2 (Pod default/p): spec.containers[0].ports[0].nmae: unknown field",
        ]
    );
}

#[test]
fn null_and_empty_values_are_not_unknown_fields() {
    let state = ok("
apiVersion: v1
kind: Service
metadata: {name: web, namespace: '', labels: {}, annotations: null}
spec: {selector: null, ports: [], externalIPs: [], clusterIP: None}
status: {}
");
    // An empty namespace is absent, so the default applies.
    let (key, svc) = state.services().next().expect("one service");
    assert_eq!(key.namespace, "default");
    assert_eq!(svc.metadata.namespace.as_deref(), Some("default"));
}

#[test]
fn type_errors_name_file_document_object_and_field() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: shop}\nspec:\n  ports:\n  - {port: eighty}\n";
    assert_eq!(
        problems("deploy/x.yaml", text),
        [
            "deploy/x.yaml: document 2 (Service shop/web): spec.ports[0].port: invalid type: string \"eighty\", expected i32"
        ]
    );
}

#[test]
fn validation_problems_are_all_reported() {
    let service = |spec: &str| {
        format!("apiVersion: v1\nkind: Service\nmetadata: {{name: web}}\nspec: {spec}\n")
    };
    let slice = |body: &str| {
        format!("apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata: {{name: s{body}\n")
    };
    let cases = [
        (service("{ports: [{port: 70000}]}"), vec!["spec.ports[0].port: 70000 is not a valid port (1-65535)"]),
        (service("{clusterIP: 10.96.0.300}"), vec![r#"spec.clusterIP: "10.96.0.300" is not an IP address, "None" (headless) or empty"#]),
        (
            service("{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.2]}"),
            vec![r#"spec.clusterIPs[0]: "10.96.0.2" differs from spec.clusterIP "10.96.0.1""#],
        ),
        (service("{ports: [{port: 53, protocol: ICMP}]}"), vec![r#"spec.ports[0].protocol: "ICMP" is not one of TCP, UDP, SCTP"#]),
        (
            service("{ports: [{port: 80, targetPort: HTTP}]}"),
            vec![r#"spec.ports[0].targetPort: "HTTP" is not a valid port name: only lowercase letters, digits and '-' are allowed"#],
        ),
        (service("{ports: [{port: 80, targetPort: 0}, ]}"), vec![]), // 0 is defaulted to port, as by the API server
        (
            service("{ports: [{name: a, port: 80}, {name: b, port: 80}, {name: a, port: 53, protocol: UDP}, {port: 80, protocol: UDP}]}"),
            vec![
                "spec.ports[1].port: duplicate port 80/TCP (also spec.ports[0])",
                r#"spec.ports[2].name: duplicate port name "a" (also spec.ports[0])"#,
                "spec.ports[3].name: required when a Service has more than one port",
            ],
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.244.1, podIPs: [{ip: x}]}\n".to_owned(),
            vec![r#"status.podIP: "10.244.1" is not an IP address"#, r#"status.podIPs[0].ip: "x" is not an IP address"#],
        ),
        // Both families, and the family fields.
        (service("{clusterIPs: ['fd00::1'], ipFamilies: [IPv6], ipFamilyPolicy: SingleStack}"), vec![]),
        (
            service("{clusterIP: 10.96.0.1, clusterIPs: [10.96.0.1, 'fd00::1'], ipFamilies: [IPv4, IPv6], ipFamilyPolicy: RequireDualStack}"),
            vec![],
        ),
        (
            service("{clusterIP: '::ffff:10.96.0.1'}"),
            vec![r#"spec.clusterIP: "::ffff:10.96.0.1" is an IPv4-mapped IPv6 address; use the IPv4 form"#],
        ),
        (
            service("{clusterIPs: [10.96.0.1, 10.96.0.2]}"),
            vec!["spec.clusterIPs[1]: 10.96.0.2 is a second IPv4 address (the first is at index 0): at most one per family"],
        ),
        (
            service("{clusterIPs: [10.96.0.1, 'fd00::1', 'fd00::2']}"),
            vec![
                "spec.clusterIPs: 3 addresses: at most two (one per IP family)",
                "spec.clusterIPs[2]: fd00::2 is a second IPv6 address (the first is at index 1): at most one per family",
            ],
        ),
        (
            service("{clusterIPs: [None, 10.96.0.1]}"),
            vec![r#"spec.clusterIPs[1]: must not be set: spec.clusterIPs[0] is "None""#],
        ),
        (
            service("{clusterIPs: ['fd00::1', 10.96.0.1], ipFamilies: [IPv4, IPv6]}"),
            vec![
                "spec.clusterIPs[0]: fd00::1 is an IPv6 address, but spec.ipFamilies[0] is IPv4",
                "spec.clusterIPs[1]: 10.96.0.1 is an IPv4 address, but spec.ipFamilies[1] is IPv6",
            ],
        ),
        (
            service("{clusterIP: 'fd00::1', ipFamilies: [IPv4]}"),
            vec!["spec.clusterIP: fd00::1 is an IPv6 address, but spec.ipFamilies[0] is IPv4"],
        ),
        (
            service("{clusterIPs: [10.96.0.1, 'fd00::1'], ipFamilyPolicy: SingleStack}"),
            vec!["spec.clusterIPs: only one IP family is allowed when spec.ipFamilyPolicy is SingleStack"],
        ),
        (
            service("{ipFamilies: [IPv4, IPv4, IPv5], ipFamilyPolicy: DualStack}"),
            vec![
                r#"spec.ipFamilyPolicy: "DualStack" is not one of SingleStack, PreferDualStack, RequireDualStack"#,
                "spec.ipFamilies[1]: duplicate family IPv4",
                r#"spec.ipFamilies[2]: "IPv5" is not one of IPv4, IPv6"#,
                "spec.ipFamilies: 3 families: at most two",
            ],
        ),
        // Session affinity and traffic distribution.
        (service("{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86400}}}"), vec![]),
        (service("{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 1}}}"), vec![]),
        (
            service("{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}}"),
            vec!["spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is not in 1-86400 (seconds)"],
        ),
        (
            service("{sessionAffinity: ClientIP, sessionAffinityConfig: {clientIP: {timeoutSeconds: 86401}}}"),
            vec!["spec.sessionAffinityConfig.clientIP.timeoutSeconds: 86401 is not in 1-86400 (seconds)"],
        ),
        (
            service("{sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}}"),
            vec!["spec.sessionAffinityConfig: must not be set when spec.sessionAffinity is None"],
        ),
        (service("{sessionAffinity: Sticky}"), vec![r#"spec.sessionAffinity: "Sticky" is not one of None, ClientIP"#]),
        (service("{trafficDistribution: PreferSameNode}"), vec![]),
        (
            service("{trafficDistribution: Nearest}"),
            vec![r#"spec.trafficDistribution: "Nearest" is not one of PreferClose, PreferSameZone, PreferSameNode"#],
        ),
        // Pod addresses.
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 'fd00::1', podIPs: [{ip: 'fd00::1'}, {ip: 10.0.0.1}]}\n".to_owned(),
            vec![],
        ),
        (
            "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nstatus: {podIP: 10.0.0.1, podIPs: [{ip: 10.0.0.2}, {ip: 10.0.0.1}, {ip: '::ffff:10.0.0.3'}]}\n".to_owned(),
            vec![
                r#"status.podIPs[2].ip: "::ffff:10.0.0.3" is an IPv4-mapped IPv6 address; use the IPv4 form"#,
                r#"status.podIPs[0].ip: "10.0.0.2" differs from status.podIP "10.0.0.1""#,
                "status.podIPs[1].ip: 10.0.0.1 is a second IPv4 address (the first is at index 0): at most one per family",
            ],
        ),
        (
            slice(", labels: {kubernetes.io/service-name: web}}\naddressType: IPv6\nendpoints: [{addresses: ['fd00::1', '::ffff:10.0.0.1']}]"),
            vec![r#"endpoints[0].addresses[1]: "::ffff:10.0.0.1" is an IPv4-mapped IPv6 address; use the IPv4 form"#],
        ),
        (
            slice("}\naddressType: IPv5\nendpoints: []"),
            vec![
                "metadata.labels[kubernetes.io/service-name]: required: names the Service of this slice",
                r#"addressType: "IPv5" is not one of IPv4, IPv6, FQDN"#,
            ],
        ),
        (
            slice(", labels: {kubernetes.io/service-name: web}}\naddressType: IPv4\nendpoints: [{addresses: [10.0.0.1, fd00::1]}]\nports: [{port: 0}]"),
            vec![r#"endpoints[0].addresses[1]: "fd00::1" is not an IPv4 address"#, "ports[0].port: 0 is not a valid port (1-65535)"],
        ),
    ];
    for (text, expected) in cases {
        let got = match parse_str("v.yaml", &text) {
            Ok(_) => Vec::new(),
            Err(StateError::Invalid(errors)) => errors
                .into_iter()
                .map(|e| e.field.unwrap_or_default() + ": " + &e.message)
                .collect(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(got, expected, "for:\n{text}");
    }
}

#[test]
fn display_is_one_line_per_problem() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec: {ports: [{port: 70000}], clusterIP: x}\n";
    let err = parse_str("deploy/x.yaml", text)
        .map(|_| ())
        .expect_err("invalid");
    assert_eq!(
        err.to_string(),
        "deploy/x.yaml: document 2 (Service default/web): spec.clusterIP: \"x\" is not an IP address, \"None\" (headless) or empty\n\
         deploy/x.yaml: document 2 (Service default/web): spec.ports[0].port: 70000 is not a valid port (1-65535)"
    );
}

#[test]
fn malformed_yaml_names_the_line() {
    let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: [web\n";
    let err = parse_str("bad.yaml", text)
        .map(|_| ())
        .expect_err("malformed");
    let StateError::Invalid(errors) = err else {
        panic!("{err}")
    };
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_eq!(
        (&errors[0].origin, errors[0].line),
        (
            &crate::state::Origin::File {
                file: "bad.yaml".into(),
                document: 2
            },
            Some(9)
        ),
        "{}",
        errors[0]
    );
    assert!(
        errors[0]
            .to_string()
            .starts_with("bad.yaml: document 2, line 9: "),
        "{}",
        errors[0]
    );
}

#[test]
fn missing_kind_or_name_is_an_error() {
    assert_eq!(
        problems(
            "m.yaml",
            "metadata: {name: x}\n---\napiVersion: v1\nkind: Pod\nmetadata: {labels: {a: b}}\n"
        ),
        [
            "m.yaml: document 1: apiVersion and kind are required (strings)",
            "m.yaml: document 2 (Pod default/): metadata.name: required",
        ]
    );
}

#[test]
fn unknown_kinds_and_empty_documents_are_skipped() {
    let state = ok("
---
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec: {whatever: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: p}
---
");
    assert_eq!(state.pods().len(), 1);
    assert_eq!(state.services().len(), 0);
}

#[test]
fn list_items_are_objects_with_prefixed_paths() {
    let list = "
apiVersion: v1
kind: List
items:
- {apiVersion: v1, kind: Pod, metadata: {name: a}}
- {apiVersion: v1, kind: ConfigMap, metadata: {name: skipped}}
- {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {ports: [{port: 0}]}}
";
    assert_eq!(
        problems("l.yaml", list),
        [
            "l.yaml: document 1 (Service default/s): items[2].spec.ports[0].port: 0 is not a valid port (1-65535)"
        ]
    );
    assert_eq!(ok(&list.replace("port: 0", "port: 80")).pods().len(), 1);
}

#[test]
fn duplicate_cluster_ip_names_both_services() {
    let text = "
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.1}
---
apiVersion: v1
kind: Service
metadata: {name: b, namespace: other}
spec: {clusterIPs: [10.96.0.1]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None}
---
apiVersion: v1
kind: Service
metadata: {name: headless2}
spec: {clusterIP: None}
";
    assert_eq!(
        problems("c.yaml", text),
        [
            "c.yaml: document 2 (Service other/b): spec.clusterIP: cluster IP 10.96.0.1 is already used by Service default/a (c.yaml document 1)"
        ]
    );
}

/// A scratch directory removed on drop, even when the test fails.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("mesh-state-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        Self(dir)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).expect("write state file");
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn directory_load_skips_non_state_files_and_reports_duplicates_across_files() {
    let dir = TempDir::new("dir");
    let pod = |name: &str| format!("apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\n");
    dir.write("a.yaml", &pod("a"));
    dir.write("b.yml", &pod("b"));
    for skipped in [
        ".#a.yaml",
        ".a.yaml.swp",
        "a.yaml~",
        "notes.txt",
        ".hidden.yaml",
    ] {
        dir.write(skipped, "not: [valid");
    }
    std::fs::create_dir(dir.0.join("sub.yaml")).expect("mkdir");
    let state = load(&dir.0).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        state
            .pods()
            .map(|(k, _)| k.name.as_str())
            .collect::<Vec<_>>(),
        ["a", "b"]
    );

    dir.write("c.yaml", &format!("{}---\n{}", pod("c"), pod("a")));
    let Err(StateError::Invalid(errors)) = load(&dir.0) else {
        panic!("duplicate accepted")
    };
    let a = dir.0.join("a.yaml");
    let c = dir.0.join("c.yaml");
    assert_eq!(
        errors.iter().map(ToString::to_string).collect::<Vec<_>>(),
        [format!(
            "{}: document 2 (Pod default/a): metadata.name: duplicate object, first defined in {} document 1",
            c.display(),
            a.display()
        )]
    );
}

#[test]
fn missing_path_is_an_io_error() {
    let path = std::env::temp_dir().join("mesh-state-does-not-exist");
    assert!(matches!(load(&path), Err(StateError::Io { .. })));
}

#[test]
fn namespaces_are_cluster_scoped_and_carry_their_name_label() {
    let state = ok("
apiVersion: v1
kind: Namespace
metadata: {name: shop, namespace: ignored, labels: {team: x, kubernetes.io/metadata.name: wrong}}
status: {phase: Active}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny, namespace: shop}
spec: {podSelector: {}, policyTypes: [Ingress]}
");
    let (key, ns) = state.namespaces().next().expect("one namespace");
    assert_eq!((key.namespace.as_str(), key.name.as_str()), ("", "shop"));
    assert_eq!(ns.metadata.namespace, None);
    let labels = |pairs: &[(&str, &str)]| {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<std::collections::BTreeMap<_, _>>()
    };
    let expected = labels(&[("team", "x"), (model::NAMESPACE_NAME_LABEL, "shop")]);
    assert_eq!(ns.metadata.labels.as_ref(), Some(&expected));
    assert_eq!(state.namespace_labels("shop"), expected);
    // A namespace that is only referenced has just its name label.
    assert_eq!(
        state.namespace_labels("other"),
        labels(&[(model::NAMESPACE_NAME_LABEL, "other")])
    );
    let (key, _) = state.network_policies().next().expect("one policy");
    assert_eq!(key.to_string(), "shop/deny");
}

#[test]
fn namespace_and_policy_strictness() {
    let text = "
apiVersion: v1
kind: Namespace
metadata: {name: shop}
spec: {finalizers: [kubernetes], extra: 1}
---
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: p}
spec:
  podSelector: {matchLabel: {a: b}}
  ingress: [{form: [{podSelector: {}}]}]
";
    assert_eq!(
        problems("n.yaml", text),
        [
            "n.yaml: document 1 (Namespace shop): spec.extra: unknown field",
            "n.yaml: document 2 (Namespace shop): metadata.name: duplicate object, first defined in n.yaml document 1",
            "n.yaml: document 3 (NetworkPolicy default/p): spec.ingress[0].form: unknown field",
            "n.yaml: document 3 (NetworkPolicy default/p): spec.podSelector.matchLabel: unknown field",
        ]
    );
}

#[test]
fn network_policy_validation() {
    let policy = |spec: &str| {
        format!(
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: p}}\nspec: {spec}\n"
        )
    };
    let cases = [
        (policy("{podSelector: {}}"), vec![]),
        (policy("{}"), vec![]), // podSelector is optional: every pod
        (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: p}\n"
                .to_owned(),
            vec!["spec: required"],
        ),
        (
            policy("{policyTypes: [Ingress, Egress, Ingress, ingress]}"),
            vec![
                "spec.policyTypes[2]: duplicate policy type Ingress",
                r#"spec.policyTypes[3]: "ingress" is not one of Ingress, Egress"#,
            ],
        ),
        (
            policy(
                "{ingress: [{ports: [{port: 0}, {port: 53, protocol: ICMP}, {port: HTTP}, {port: http, endPort: 90}, {endPort: 90}, {port: 100, endPort: 99}, {port: 100, endPort: 70000}, {port: 1, endPort: 65535, protocol: SCTP}]}]}",
            ),
            vec![
                "spec.ingress[0].ports[0].port: 0 is not a valid port (1-65535)",
                r#"spec.ingress[0].ports[1].protocol: "ICMP" is not one of TCP, UDP, SCTP"#,
                r#"spec.ingress[0].ports[2].port: "HTTP" is not a valid port name: only lowercase letters, digits and '-' are allowed"#,
                "spec.ingress[0].ports[3].endPort: requires a numeric port",
                "spec.ingress[0].ports[4].endPort: requires a numeric port",
                "spec.ingress[0].ports[5].endPort: 99 is less than port 100",
                "spec.ingress[0].ports[6].endPort: 70000 is not a valid port (1-65535)",
            ],
        ),
        (
            policy(
                "{egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16, 10.0.0.0/8, 11.0.0.0/16, 'fd00::/64', 10.2.0.0/33]}}, {ipBlock: {cidr: '10.0.0.1/24'}}, {ipBlock: {cidr: 'fd00::/129'}}, {ipBlock: {cidr: '::ffff:10.0.0.0/104'}}, {ipBlock: {cidr: 10.0.0.0}}]}]}",
            ),
            vec![
                "spec.egress[0].to[0].ipBlock.except[1]: 10.0.0.0/8 is not strictly inside cidr 10.0.0.0/8",
                "spec.egress[0].to[0].ipBlock.except[2]: 11.0.0.0/16 is not strictly inside cidr 10.0.0.0/8",
                "spec.egress[0].to[0].ipBlock.except[3]: fd00::/64 is not strictly inside cidr 10.0.0.0/8",
                r#"spec.egress[0].to[0].ipBlock.except[4]: "10.2.0.0/33" is not a CIDR: prefix length must be 0-32"#,
                r#"spec.egress[0].to[2].ipBlock.cidr: "fd00::/129" is not a CIDR: prefix length must be 0-128"#,
                r#"spec.egress[0].to[3].ipBlock.cidr: "::ffff:10.0.0.0/104" is IPv4-mapped IPv6; use the IPv4 form"#,
                r#"spec.egress[0].to[4].ipBlock.cidr: "10.0.0.0" is not a CIDR (address/length)"#,
            ],
        ),
        (
            policy(
                "{ingress: [{from: [{ipBlock: {cidr: 10.0.0.0/8}, podSelector: {}}, {}, {namespaceSelector: {}, podSelector: {}}]}]}",
            ),
            vec![
                "spec.ingress[0].from[0].ipBlock: may not be combined with podSelector or namespaceSelector",
                "spec.ingress[0].from[1]: must specify podSelector, namespaceSelector or ipBlock",
            ],
        ),
        (
            policy(
                "{podSelector: {matchExpressions: [{key: a, operator: In}, {key: b, operator: Exists, values: [x]}, {key: c, operator: Gt, values: ['1']}, {key: d, operator: NotIn, values: [x]}, {key: e, operator: DoesNotExist}]}, egress: [{to: [{namespaceSelector: {matchExpressions: [{key: a, operator: NotIn, values: []}]}}]}]}",
            ),
            vec![
                "spec.podSelector.matchExpressions[0].values: must be non-empty for operator In",
                "spec.podSelector.matchExpressions[1].values: must be empty for operator Exists",
                r#"spec.podSelector.matchExpressions[2].operator: "Gt" is not one of In, NotIn, Exists, DoesNotExist"#,
                "spec.egress[0].to[0].namespaceSelector.matchExpressions[0].values: must be non-empty for operator NotIn",
            ],
        ),
    ];
    for (text, expected) in cases {
        let got = match parse_str("v.yaml", &text) {
            Ok(_) => Vec::new(),
            Err(StateError::Invalid(errors)) => errors
                .into_iter()
                .map(|e| e.field.unwrap_or_default() + ": " + &e.message)
                .collect(),
            Err(e) => panic!("{e}"),
        };
        assert_eq!(got, expected, "for:\n{text}");
    }
}

#[test]
fn cidrs_parse_and_nest() {
    let c = |s: &str| Cidr::parse(s).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c("10.1.2.3/16").to_string(), "10.1.0.0/16");
    assert_eq!(c("fd00::1/0").to_string(), "::/0");
    assert!(c("10.0.0.0/8").contains(&c("10.1.0.0/16")));
    assert!(c("10.0.0.0/8").contains(&c("10.0.0.0/8")));
    assert!(!c("10.1.0.0/16").contains(&c("10.0.0.0/8")));
    assert!(
        !c("::/0").contains(&c("10.0.0.0/8")),
        "families do not nest"
    );
    assert!(Cidr::parse("10.0.0.0/+8").is_err());
}

#[test]
fn sockmap_annotation_values_are_checked() {
    let text = "
apiVersion: v1
kind: Namespace
metadata: {name: shop, annotations: {mesh.io/sockmap: 'off'}}
---
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop, annotations: {mesh.io/sockmap: 'yes'}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, namespace: shop, annotations: {mesh.io/sockmap: 'false'}}
";
    assert_eq!(
        problems("s.yaml", text),
        [
            r#"s.yaml: document 1 (Namespace shop): metadata.annotations["mesh.io/sockmap"]: "off" is not "true" or "false""#,
            r#"s.yaml: document 2 (Pod shop/web): metadata.annotations["mesh.io/sockmap"]: "yes" is not "true" or "false""#,
        ]
    );
}

/// An HTTPRoute `shop/r` with `spec` (flow-style YAML).
fn http_route(spec: &str) -> String {
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {{name: r, namespace: shop}}\nspec: {spec}\n"
    )
}

#[test]
fn http_routes_load_in_both_versions_with_status_ignored() {
    let text = format!(
        "{}---\n{}",
        http_route("{parentRefs: [{group: '', kind: Service, name: web, port: 80}], rules: [{backendRefs: [{name: web, port: 80, weight: 2}]}]}"),
        "apiVersion: gateway.networking.k8s.io/v1beta1
kind: HTTPRoute
metadata: {name: old, namespace: shop, creationTimestamp: '2024-05-01T10:00:00Z'}
spec:
  parentRefs: [{group: '', kind: Service, name: web}]
  hostnames: [web.shop.svc.cluster.local]
  rules:
  - name: all
    matches:
    - path: {type: PathPrefix, value: /}
      headers: [{type: Exact, name: x-env, value: prod}]
      queryParams: [{type: RegularExpression, name: v, value: '[0-9]+'}]
      method: GET
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {group: '', kind: Service, name: web, namespace: shop, port: 80}, fraction: {numerator: 1, denominator: 10}}
    backendRefs: [{group: '', kind: Service, name: web, namespace: shop, port: 80, weight: 0}]
    timeouts: {request: 10s, backendRequest: 2s}
    retry: {codes: [503], attempts: 2, backoff: 50ms}
    sessionPersistence: {sessionName: s, type: Cookie, absoluteTimeout: 1h, cookieConfig: {lifetimeType: Session}}
status:
  parents:
  - parentRef: {name: web}
    controllerName: example.com/x
    conditions: [{type: Accepted, status: 'True'}]
"
    );
    let state = ok(&text);
    let routes: Vec<String> = state.http_routes().map(|(k, _)| k.to_string()).collect();
    assert_eq!(routes, ["shop/old", "shop/r"]);
    let (_, old) = state.http_routes().next().expect("route");
    assert_eq!(old.api_version, "gateway.networking.k8s.io/v1beta1");
    assert_eq!(old.metadata.namespace.as_deref(), Some("shop"));
}

#[test]
fn http_route_unknown_fields_and_duplicates_are_rejected() {
    let text = format!(
        "{}---\n{}",
        http_route(
            "{parentRefs: [{name: web, prot: 80}], rules: [{matchs: [], backendRefs: [{name: a, wieght: 1}], filters: [{type: CORS, cors: {}}]}]}"
        ),
        http_route("{}")
    );
    assert_eq!(
        problems("r.yaml", &text),
        [
            "r.yaml: document 1 (HTTPRoute shop/r): spec.parentRefs[0].prot: unknown field",
            "r.yaml: document 1 (HTTPRoute shop/r): spec.rules[0].backendRefs[0].wieght: unknown field",
            "r.yaml: document 1 (HTTPRoute shop/r): spec.rules[0].filters[0].type: CORS filters are not supported by this mesh",
            "r.yaml: document 2 (HTTPRoute shop/r): metadata.name: duplicate object, first defined in r.yaml document 1",
        ]
    );
}

#[test]
fn http_route_validation_names_every_field() {
    let rule = |body: &str| http_route(&format!("{{rules: [{body}]}}"));
    let filter = |f: &str| rule(&format!("{{filters: [{f}]}}"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (
            rule("{matches: [{path: {value: /ok}}, {path: {type: Exact, value: api}}]}"),
            vec!["spec.rules[0].matches[1].path.value: \"api\" must start with '/'"],
        ),
        (
            rule("{matches: [{path: {type: PathPrefix, value: '/a//b'}}]}"),
            vec!["spec.rules[0].matches[0].path.value: \"/a//b\" must not contain '//'"],
        ),
        (
            rule("{matches: [{path: {type: Prefix, value: /a}}]}"),
            vec![
                "spec.rules[0].matches[0].path.type: \"Prefix\" is not one of Exact, PathPrefix, RegularExpression",
            ],
        ),
        (
            rule("{matches: [{path: {type: RegularExpression, value: '/(a'}}]}"),
            vec![
                "spec.rules[0].matches[0].path.value: \"/(a\" is not a valid regular expression: error: unclosed group",
            ],
        ),
        (
            rule(
                "{matches: [{headers: [{name: 'x y', value: a}, {name: h, value: a}, {name: h, value: b}, {name: r, type: RegularExpression, value: '*'}, {name: e, value: ''}]}]}",
            ),
            vec![
                "spec.rules[0].matches[0].headers[0].name: \"x y\" is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)",
                "spec.rules[0].matches[0].headers[2].name: duplicate name \"h\" (also [1])",
                "spec.rules[0].matches[0].headers[3].value: \"*\" is not a valid regular expression: error: repetition operator missing expression",
                "spec.rules[0].matches[0].headers[4].value: must be 1-4096 bytes",
            ],
        ),
        (
            rule("{matches: [{queryParams: [{name: q, type: Prefix, value: a}], method: get}]}"),
            vec![
                "spec.rules[0].matches[0].queryParams[0].type: \"Prefix\" is not one of Exact, RegularExpression",
                "spec.rules[0].matches[0].method: \"get\" is not one of GET, HEAD, POST, PUT, DELETE, CONNECT, OPTIONS, TRACE, PATCH",
            ],
        ),
        (
            rule(
                "{backendRefs: [{name: a, port: 0, weight: 1000001}, {name: b, port: 80, weight: -1}, {name: '', port: 80}]}",
            ),
            vec![
                "spec.rules[0].backendRefs[0].port: 0 is not a valid port (1-65535)",
                "spec.rules[0].backendRefs[0].weight: 1000001 is not in 0-1000000",
                "spec.rules[0].backendRefs[1].weight: -1 is not in 0-1000000",
                "spec.rules[0].backendRefs[2].name: required",
            ],
        ),
        (
            http_route("{parentRefs: [{group: '', kind: Service, name: web, port: 70000}]}"),
            vec!["spec.parentRefs[0].port: 70000 is not a valid port (1-65535)"],
        ),
        (
            rule("{timeouts: {request: 1s, backendRequest: 2s}}"),
            vec!["spec.rules[0].timeouts.backendRequest: must not be longer than timeouts.request"],
        ),
        (
            rule(
                "{timeouts: {request: 1d, backendRequest: 1s1s}, retry: {codes: [200, 503, 503], attempts: -1, backoff: 1.5s}}",
            ),
            vec![
                "spec.rules[0].timeouts.request: \"1d\" is not a duration (units are h, m, s, ms; e.g. 10s, 500ms, 1m30s)",
                "spec.rules[0].timeouts.backendRequest: \"1s1s\" is not a duration (unit s given twice; e.g. 10s, 500ms, 1m30s)",
                "spec.rules[0].retry.codes[0]: 200 is not an HTTP status in 400-599",
                "spec.rules[0].retry.codes[2]: duplicate code 503",
                "spec.rules[0].retry.attempts: -1 is negative",
                "spec.rules[0].retry.backoff: \"1.5s\" is not a duration (units are h, m, s, ms; e.g. 10s, 500ms, 1m30s)",
            ],
        ),
        (
            rule("{timeouts: {request: 0s, backendRequest: 5s}}"),
            vec![],
        ),
        (
            filter(
                "{type: RequestRedirect, requestRedirect: {statusCode: 304, scheme: ftp, port: 0, hostname: Bad_Host}}",
            ),
            vec![
                "spec.rules[0].filters[0].requestRedirect.scheme: \"ftp\" is not one of http, https",
                "spec.rules[0].filters[0].requestRedirect.hostname: \"Bad_Host\" is not a lowercase RFC 1123 host name",
                "spec.rules[0].filters[0].requestRedirect.port: 0 is not a valid port (1-65535)",
                "spec.rules[0].filters[0].requestRedirect.statusCode: 304 is not 301, 302, 303, 307 or 308",
            ],
        ),
        (
            rule(
                "{matches: [{path: {type: PathPrefix, value: /a}}, {path: {type: Exact, value: /b}}], filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}}]}",
            ),
            vec![
                "spec.rules[0].filters[0].urlRewrite.path.type: ReplacePrefixMatch needs every match of the rule to be a PathPrefix (matches[1] is Exact)",
            ],
        ),
        (
            rule(
                "{filters: [{type: URLRewrite, urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /c}}}]}",
            ),
            vec![],
        ),
        (
            filter(
                "{type: URLRewrite, urlRewrite: {path: {type: ReplaceFullPath, replacePrefixMatch: /c}}}",
            ),
            vec![
                "spec.rules[0].filters[0].urlRewrite.path: replaceFullPath is required when type is ReplaceFullPath",
                "spec.rules[0].filters[0].urlRewrite.path.replacePrefixMatch: must not be set when type is ReplaceFullPath",
            ],
        ),
        (
            filter("{type: RequestHeaderModifier, responseHeaderModifier: {remove: [a]}}"),
            vec![
                "spec.rules[0].filters[0]: requestHeaderModifier is required when type is RequestHeaderModifier",
                "spec.rules[0].filters[0].responseHeaderModifier: must not be set when type is RequestHeaderModifier",
            ],
        ),
        (
            filter("{type: Rewrite}"),
            vec![
                "spec.rules[0].filters[0].type: \"Rewrite\" is not one of RequestHeaderModifier, ResponseHeaderModifier, RequestMirror, RequestRedirect, URLRewrite, ExtensionRef",
            ],
        ),
        (
            rule(
                "{filters: [{type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: RequestHeaderModifier, requestHeaderModifier: {}}, {type: ResponseHeaderModifier, responseHeaderModifier: {}}, {type: ResponseHeaderModifier, responseHeaderModifier: {}}]}",
            ),
            vec![
                "spec.rules[0].filters[1].type: RequestHeaderModifier may appear once per filter list (also [0])",
                "spec.rules[0].filters[3].type: ResponseHeaderModifier may appear once per filter list (also [2])",
            ],
        ),
        (
            rule(
                "{filters: [{type: RequestRedirect, requestRedirect: {}}, {type: URLRewrite, urlRewrite: {}}], backendRefs: [{name: a, port: 80}]}",
            ),
            vec![
                "spec.rules[0].filters[1].type: RequestRedirect and URLRewrite may not be combined (also [0] RequestRedirect)",
                "spec.rules[0].backendRefs: must be empty: the rule redirects (filters[0] is a RequestRedirect)",
            ],
        ),
        (
            filter(
                "{type: RequestHeaderModifier, requestHeaderModifier: {set: [{name: X-A, value: '1'}], add: [{name: x-a, value: '2'}, {name: 'b:', value: '3'}], remove: [X-A]}}",
            ),
            vec![
                "spec.rules[0].filters[0].requestHeaderModifier.add[0].name: header \"x-a\" is already modified by set[0]: one action per header",
                "spec.rules[0].filters[0].requestHeaderModifier.add[1].name: \"b:\" is not a valid header name (letters, digits and !#$%&'*+-.^_`|~)",
                "spec.rules[0].filters[0].requestHeaderModifier.remove[0]: header \"X-A\" is already modified by set[0]: one action per header",
            ],
        ),
        (
            filter(
                "{type: RequestMirror, requestMirror: {backendRef: {name: a, port: 80}, percent: 101, fraction: {numerator: 3, denominator: 2}}}",
            ),
            vec![
                "spec.rules[0].filters[0].requestMirror.percent: 101 is not in 0-100",
                "spec.rules[0].filters[0].requestMirror.fraction.numerator: 3 is not in 0-2 (the denominator)",
                "spec.rules[0].filters[0].requestMirror.fraction: only one of percent and fraction may be set",
            ],
        ),
        (
            rule(
                "{backendRefs: [{name: a, port: 80, filters: [{type: RequestRedirect, requestRedirect: {statusCode: 300}}]}]}",
            ),
            vec![
                "spec.rules[0].backendRefs[0].filters[0].requestRedirect.statusCode: 300 is not 301, 302, 303, 307 or 308",
            ],
        ),
        (
            http_route(
                "{rules: [{name: a}, {name: a}], hostnames: ['*.shop.example', '10.0.0.1']}",
            ),
            vec![
                "spec.hostnames[1]: \"10.0.0.1\" is an IP address, not a host name",
                "spec.rules[1].name: duplicate rule name \"a\" (also spec.rules[0])",
            ],
        ),
        (
            http_route(&format!("{{rules: [{}]}}", vec!["{}"; 17].join(", "))),
            vec!["spec.rules: 17 entries: at most 16"],
        ),
        (
            rule(&format!("{{matches: [{}]}}", vec!["{}"; 65].join(", "))),
            vec!["spec.rules[0].matches: 65 entries: at most 64"],
        ),
        (
            rule(&format!(
                "{{matches: [{{headers: [{}]}}]}}",
                (0..17)
                    .map(|i| format!("{{name: h{i}, value: v}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            vec!["spec.rules[0].matches[0].headers: 17 entries: at most 16"],
        ),
        (
            rule(&format!(
                "{{matches: [{{queryParams: [{}]}}]}}",
                (0..17)
                    .map(|i| format!("{{name: q{i}, value: v}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
            vec!["spec.rules[0].matches[0].queryParams: 17 entries: at most 16"],
        ),
        (
            http_route(&format!(
                "{{rules: [{}]}}",
                vec![format!("{{matches: [{}]}}", ["{}"; 9].join(", ")); 15].join(", ")
            )),
            vec!["spec.rules: 135 matches in all rules: at most 128"],
        ),
        (
            rule(
                "{sessionPersistence: {type: Query, idleTimeout: 5x, cookieConfig: {lifetimeType: Forever}}}",
            ),
            vec![
                "spec.rules[0].sessionPersistence.idleTimeout: \"5x\" is not a duration (units are h, m, s, ms; e.g. 10s, 500ms, 1m30s)",
                "spec.rules[0].sessionPersistence.type: \"Query\" is not one of Cookie, Header",
                "spec.rules[0].sessionPersistence.cookieConfig.lifetimeType: \"Forever\" is not one of Permanent, Session",
            ],
        ),
        (
            filter("{type: ExtensionRef, extensionRef: {group: '', kind: '', name: x}}"),
            vec!["spec.rules[0].filters[0].extensionRef.kind: required"],
        ),
        (
            http_route("{rules: []}"),
            vec!["spec.rules: must have at least one rule when given"],
        ),
    ];
    for (text, expected) in cases {
        let got: Vec<String> = match parse_str("r.yaml", &text) {
            Ok(_) => Vec::new(),
            Err(StateError::Invalid(errors)) => errors
                .iter()
                .map(|e| {
                    let prefix = "r.yaml: document 1 (HTTPRoute shop/r): ";
                    let line = e.to_string();
                    line.strip_prefix(prefix)
                        .map_or(line.clone(), str::to_owned)
                })
                .collect(),
            Err(e) => panic!("unexpected error: {e}"),
        };
        assert_eq!(got, expected, "for:\n{text}");
    }
}

/// A `security.istio.io/v1` object `shop/p` of `kind` with `spec` (flow-style YAML).
fn istio(kind: &str, spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: {kind}\nmetadata: {{name: p, namespace: shop}}\nspec: {spec}\n"
    )
}

/// The problems of one document, without their `file: document 1 (object): ` prefix.
fn doc_problems(text: &str, object: &str) -> Vec<String> {
    match parse_str("p.yaml", text) {
        Ok(_) => Vec::new(),
        Err(StateError::Invalid(errors)) => errors
            .iter()
            .map(|e| {
                let prefix = format!("p.yaml: document 1 ({object}): ");
                let line = e.to_string();
                line.strip_prefix(&prefix)
                    .map_or(line.clone(), str::to_owned)
            })
            .collect(),
        Err(e) => panic!("unexpected error: {e}"),
    }
}

#[test]
fn istio_security_kinds_load_in_both_versions() {
    let text = format!(
        "{}---\n{}---\n{}",
        istio(
            "PeerAuthentication",
            "{selector: {matchLabels: {app: web}}, mtls: {mode: STRICT}, portLevelMtls: {8080: {mode: DISABLE}}}"
        ),
        "apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: a, namespace: shop, creationTimestamp: '2024-05-01T10:00:00Z'}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from:
    - source: {principals: [cluster.local/ns/x/sa/y], notNamespaces: [prod], ipBlocks: [10.0.0.0/8, 10.1.2.3], notRemoteIpBlocks: ['fd00::/8']}
    to:
    - operation: {hosts: ['*.shop'], ports: ['8080'], notMethods: [GET], paths: ['/admin*']}
    when:
    - {key: 'request.headers[X-Token]', values: ['*']}
    - {key: destination.port, notValues: ['9090']}
status: {validationMessages: []}
",
        istio("AuthorizationPolicy", "{}"),
    );
    let state = ok(&text);
    let pas: Vec<String> = state
        .peer_authentications()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(pas, ["shop/p"]);
    let (_, pa) = state.peer_authentications().next().expect("pa");
    assert_eq!(
        pa.spec.port_level_mtls["8080"].mode.as_deref(),
        Some("DISABLE")
    );
    let aps: Vec<String> = state
        .authorization_policies()
        .map(|(k, _)| k.to_string())
        .collect();
    assert_eq!(aps, ["shop/a", "shop/p"]);
}

#[test]
fn istio_unknown_fields_and_duplicates_are_rejected() {
    let text = format!(
        "{}---\n{}",
        istio(
            "AuthorizationPolicy",
            "{rules: [{from: [{source: {principal: [a]}}], to: [{operation: {path: [/]}}]}], actoin: DENY}"
        ),
        istio("AuthorizationPolicy", "{}"),
    );
    assert_eq!(
        problems("p.yaml", &text),
        [
            "p.yaml: document 1 (AuthorizationPolicy shop/p): spec.actoin: unknown field",
            "p.yaml: document 1 (AuthorizationPolicy shop/p): spec.rules[0].from[0].source.principal: unknown field",
            "p.yaml: document 1 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation.path: unknown field",
            "p.yaml: document 1 (AuthorizationPolicy shop/p): spec.rules[0].from[0].source: must set at least one field",
            "p.yaml: document 1 (AuthorizationPolicy shop/p): spec.rules[0].to[0].operation: must set at least one field",
            "p.yaml: document 2 (AuthorizationPolicy shop/p): metadata.name: duplicate object, first defined in p.yaml document 1",
        ]
    );
}

#[test]
fn peer_authentication_validation() {
    let pa = |spec: &str| istio("PeerAuthentication", spec);
    let cases: Vec<(String, Vec<&str>)> = vec![
        (pa("{mtls: {mode: STRICT}}"), vec![]),
        (pa("{mtls: {}}"), vec![]),
        (
            pa("{mtls: {mode: strict}}"),
            vec!["spec.mtls.mode: \"strict\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT"],
        ),
        (
            pa(
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {8080: {mode: DISABLE}, 9090: {mode: UNSET}}}",
            ),
            vec![],
        ),
        (
            pa("{portLevelMtls: {8080: {mode: DISABLE}}}"),
            vec![
                "spec.portLevelMtls: requires a workload selector (spec.selector.matchLabels), as in Istio",
            ],
        ),
        (
            pa("{selector: {matchLabels: {}}, portLevelMtls: {8080: {mode: DISABLE}}}"),
            vec![
                "spec.portLevelMtls: requires a workload selector (spec.selector.matchLabels), as in Istio",
            ],
        ),
        (
            pa(
                "{selector: {matchLabels: {app: web}}, portLevelMtls: {0: {mode: STRICT}, http: {mode: OFF}}}",
            ),
            vec![
                "spec.portLevelMtls[0]: \"0\" is not a port number (1-65535)",
                "spec.portLevelMtls[http]: \"http\" is not a port number (1-65535)",
                "spec.portLevelMtls[http].mode: \"OFF\" is not one of UNSET, DISABLE, PERMISSIVE, STRICT",
            ],
        ),
        (
            pa("{selector: {matchLabels: {app: 'web*'}}}"),
            vec!["spec.selector.matchLabels[\"app\"]: wildcards are not supported in selectors"],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            doc_problems(&text, "PeerAuthentication shop/p"),
            expected,
            "for:\n{text}"
        );
    }
}

#[test]
fn authorization_policy_validation() {
    let ap = |spec: &str| istio("AuthorizationPolicy", spec);
    let rule = |body: &str| ap(&format!("{{rules: [{body}]}}"));
    let cases: Vec<(String, Vec<&str>)> = vec![
        (ap("{}"), vec![]),
        (ap("{action: DENY, rules: [{}]}"), vec![]),
        (ap("{action: AUDIT, rules: []}"), vec![]),
        (
            ap("{action: REJECT}"),
            vec!["spec.action: \"REJECT\" is not one of ALLOW, DENY, AUDIT, CUSTOM"],
        ),
        (
            ap("{action: CUSTOM, provider: {name: ext-authz}}"),
            vec![
                "spec.action: CUSTOM (external authorization through spec.provider) is not supported by this mesh",
            ],
        ),
        (
            ap("{action: DENY, provider: {name: ext-authz}}"),
            vec!["spec.provider: only allowed with action CUSTOM"],
        ),
        (
            ap(
                "{selector: {matchLabels: {app: web}}, targetRefs: [{kind: Service, group: '', name: web}]}",
            ),
            vec![
                "spec.targetRefs: only one of selector, targetRef and targetRefs may be set (selector is too)",
            ],
        ),
        (
            ap(
                "{targetRefs: [{kind: Service, group: '', name: web}, {kind: Gateway, group: gateway.networking.k8s.io, name: gw}]}",
            ),
            vec![],
        ),
        (
            ap("{targetRef: {kind: Service, name: web, namespace: shop}}"),
            vec![],
        ),
        (
            ap(
                "{targetRefs: [{kind: ServiceEntry, group: networking.istio.io, name: x}, {kind: Service, name: '', namespace: other}]}",
            ),
            vec![
                "spec.targetRefs[0].kind: ServiceEntry (group \"networking.istio.io\") is not supported: use Service (group \"\") or Gateway (group gateway.networking.k8s.io)",
                "spec.targetRefs[1].name: required",
                "spec.targetRefs[1].namespace: \"other\": cross-namespace references are not supported (must be \"shop\")",
            ],
        ),
        (
            rule("{from: [], to: []}"),
            vec![
                "spec.rules[0].from: must not be empty when given",
                "spec.rules[0].to: must not be empty when given",
            ],
        ),
        (
            rule("{from: [{}], to: [{}]}"),
            vec![
                "spec.rules[0].from[0].source: required",
                "spec.rules[0].to[0].operation: required",
            ],
        ),
        (
            rule("{from: [{source: {requestPrincipals: ['*'], principals: ['']}}]}"),
            vec![
                "spec.rules[0].from[0].source.principals[0]: empty value not allowed",
                "spec.rules[0].from[0].source.requestPrincipals: JWT (RequestAuthentication) is not supported by this mesh",
            ],
        ),
        (
            rule(
                "{from: [{source: {ipBlocks: [10.0.0.0/33, 'not-an-ip'], notRemoteIpBlocks: ['1.2.3.4/']}}]}",
            ),
            vec![
                "spec.rules[0].from[0].source.ipBlocks[0]: \"10.0.0.0/33\" is not a CIDR: prefix length must be 0-32",
                "spec.rules[0].from[0].source.ipBlocks[1]: \"not-an-ip\" is not an IP address or CIDR",
                "spec.rules[0].from[0].source.notRemoteIpBlocks[0]: \"1.2.3.4/\" is not a CIDR: prefix length must be 0-32",
            ],
        ),
        (
            rule(
                "{to: [{operation: {ports: ['0', '65536', http, '443'], notPorts: ['-1'], paths: ['/api/{*}']}}]}",
            ),
            vec![
                "spec.rules[0].to[0].operation.paths[0]: \"/api/{*}\": path templates ({*}, {**}) are not supported by this mesh",
                "spec.rules[0].to[0].operation.ports[0]: \"0\" is not a port number (1-65535)",
                "spec.rules[0].to[0].operation.ports[1]: \"65536\" is not a port number (1-65535)",
                "spec.rules[0].to[0].operation.ports[2]: \"http\" is not a port number (1-65535)",
                "spec.rules[0].to[0].operation.notPorts[0]: \"-1\" is not a port number (1-65535)",
            ],
        ),
        (
            rule(
                "{when: [{key: source.ip, values: [10.0.0.0/8]}, {key: destination.port, notValues: ['80']}, {key: 'request.headers[x-a]', values: [b]}, {key: source.principal, values: ['*']}]}",
            ),
            vec![],
        ),
        (
            rule(
                "{when: [{key: '', values: [a]}, {key: source.namespace}, {key: 'request.auth.claims[iss]', values: [a]}, {key: connection.sni, values: [a]}, {key: source.port, values: ['1']}, {key: 'request.headers[]', values: [a]}, {key: remote.ip, values: [x]}, {key: destination.port, values: ['99999']}]}",
            ),
            vec![
                "spec.rules[0].when[0].key: required",
                "spec.rules[0].when[1]: at least one of values or notValues must be set for key source.namespace",
                "spec.rules[0].when[2].key: request.auth.claims[iss]: JWT (RequestAuthentication) is not supported by this mesh",
                "spec.rules[0].when[3].key: \"connection.sni\" is not supported by this mesh",
                "spec.rules[0].when[4].key: \"source.port\" is not a supported key (source.principal, source.namespace, source.ip, remote.ip, destination.ip, destination.port, request.headers[NAME])",
                "spec.rules[0].when[5].key: \"request.headers[]\" is not a supported key (source.principal, source.namespace, source.ip, remote.ip, destination.ip, destination.port, request.headers[NAME])",
                "spec.rules[0].when[6].values[0]: \"x\" is not an IP address or CIDR",
                "spec.rules[0].when[7].values[0]: \"99999\" is not a port number (1-65535)",
            ],
        ),
    ];
    for (text, expected) in cases {
        assert_eq!(
            doc_problems(&text, "AuthorizationPolicy shop/p"),
            expected,
            "for:\n{text}"
        );
    }
}

/// A ConfigMap `namespace/name` with a `mesh` key.
fn config_map(namespace: &str, name: &str, mesh: &str) -> String {
    format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {{name: {name}, namespace: {namespace}}}\ndata:\n  mesh: {mesh:?}\n"
    )
}

#[test]
fn mesh_config_is_read_from_istio_system_istio_only() {
    let text = format!(
        "{}---\n{}",
        config_map(
            "istio-system",
            "istio",
            "trustDomain: example.org\nrootNamespace: mesh-root\ndefaultConfig: {discoveryAddress: istiod:15012}\nenableAutoMtls: true\n"
        ),
        // Not Istio's: never interpreted, so its nonsense is no error.
        config_map("shop", "istio", "[not, a, mesh, config"),
    );
    let mesh = ok(&text).mesh_config();
    assert_eq!(mesh.trust_domain.as_deref(), Some("example.org"));
    assert_eq!(mesh.root_namespace.as_deref(), Some("mesh-root"));
    assert_eq!(
        ok("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n").mesh_config(),
        Default::default()
    );

    let bad = |mesh: &str| {
        doc_problems(
            &config_map("istio-system", "istio", mesh),
            "ConfigMap istio-system/istio",
        )
    };
    assert_eq!(
        bad("trustDomain: Example.org"),
        [
            "data.mesh.trustDomain: \"Example.org\" is not a SPIFFE trust domain (1-255 lowercase letters, digits, '.', '-', '_')"
        ]
    );
    assert_eq!(
        bad("rootNamespace: 7"),
        ["data.mesh.rootNamespace: must be a string"]
    );
    assert_eq!(
        bad("rootNamespace: Root_NS"),
        [
            "data.mesh.rootNamespace: \"Root_NS\" is not a namespace name (a lowercase RFC 1123 label)"
        ]
    );
    assert_eq!(
        bad("- a list"),
        ["data.mesh: must be a YAML mapping (MeshConfig)"]
    );
    let text = format!(
        "{}---\n{}",
        config_map("istio-system", "istio", ""),
        config_map("istio-system", "istio", ""),
    );
    assert_eq!(
        problems("p.yaml", &text),
        [
            "p.yaml: document 2 (ConfigMap istio-system/istio): metadata.name: duplicate object, first defined in p.yaml document 1"
        ]
    );
}
