//! The Kubernetes source against an in-process API server speaking the real list/watch
//! protocol (`mesh_tests::kubeapi`), without root: what the first list delivers, watch
//! events, resuming from a bookmark without listing again, listing again after `410
//! Gone` (as a watch event and as an HTTP reply) with objects deleted meanwhile gone, a
//! bad object rejected by kind/namespace/name while the last good state stays, stale
//! while the API server is unreachable, and clusters without the Gateway API or Istio
//! CRDs.

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mesh_agent::source::kubernetes::Connect;
use mesh_agent::source::{Source, SourceConfig, SourceStatus};
use mesh_agent::state::State;
use mesh_tests::kubeapi::{GoneStyle, KubeApi};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::time::timeout;

/// Bound on every wait: the source's first reconnect backoff is under a second, a few
/// failed attempts in a row stay well under this.
const WAIT: Duration = Duration::from_secs(30);

fn service(name: &str, ip: &str, port: u16) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": ip, "selector": {"app": name},
                 "ports": [{"name": "http", "port": port, "targetPort": 8080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {}},
    })
}

fn pod(name: &str, app: &str, ip: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "default", "labels": {"app": app}},
        "spec": {"containers": [{"name": "app", "image": "app"}], "nodeName": "node-1"},
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]},
    })
}

fn pod_names(state: &State) -> Vec<String> {
    state.pods().map(|(key, _)| key.name.clone()).collect()
}

fn service_port(state: &State, name: &str) -> Option<i32> {
    state
        .services()
        .find(|(key, _)| key.name == name)
        .and_then(|(_, svc)| svc.spec.as_ref()?.ports.as_ref()?.first().map(|p| p.port))
}

/// Everything the source logged (the tests run on one thread, where it runs too).
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);

impl Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

/// A fake API server and a Kubernetes source reading it through a kubeconfig.
struct Bed {
    source: Source,
    status: watch::Receiver<SourceStatus>,
    logs: Logs,
    _log_guard: tracing::subscriber::DefaultGuard,
    _dir: tempfile::TempDir,
    api: KubeApi,
}

impl Bed {
    fn new(api: KubeApi) -> Self {
        let logs = Logs::default();
        let writer = logs.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish();
        let log_guard = tracing::subscriber::set_default(subscriber);
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.write_kubeconfig(dir.path()).unwrap();
        let config = SourceConfig::Kubernetes(Connect::Kubeconfig(kubeconfig));
        let source = Source::start(&config, "node-1").unwrap();
        let status = source.status();
        Self {
            source,
            status,
            logs,
            _log_guard: log_guard,
            _dir: dir,
            api,
        }
    }

    /// The next state the source delivers.
    async fn next(&mut self) -> State {
        let update = timeout(WAIT, self.source.next())
            .await
            .unwrap_or_else(|_| panic!("no state within {WAIT:?}; log:\n{}", self.logs.text()))
            .expect("the source ended");
        update.state.expect("a valid state")
    }

    /// Waits for a state that satisfies `want`.
    async fn until(&mut self, what: &str, want: impl Fn(&State) -> bool) -> State {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let next = tokio::time::timeout_at(deadline, self.source.next()).await;
            let Ok(Some(update)) = next else {
                panic!(
                    "no state with {what} within {WAIT:?}; log:\n{}",
                    self.logs.text()
                );
            };
            if let Ok(state) = update.state
                && want(&state)
            {
                return state;
            }
        }
    }

    /// Waits for a source status that satisfies `want`.
    async fn status_until(
        &mut self,
        what: &str,
        want: impl Fn(&SourceStatus) -> bool,
    ) -> SourceStatus {
        let found = match timeout(WAIT, self.status.wait_for(want)).await {
            Ok(Ok(status)) => Some(*status),
            _ => None,
        };
        found.unwrap_or_else(|| {
            panic!(
                "status never {what}: {:?}; log:\n{}",
                *self.status.borrow(),
                self.logs.text()
            )
        })
    }

    /// Waits until `resource` has `count` open watches on the server.
    async fn watching(&self, resource: &str, count: usize) {
        let deadline = tokio::time::Instant::now() + WAIT;
        while self.api.open_watches(resource) != count {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{resource}: {} open watches, not {count}; requests {:?}",
                self.api.open_watches(resource),
                self.api.requests()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// A server with the `web` Service and pods `web-1`, `web-2`.
fn api_with_web() -> KubeApi {
    let api = KubeApi::start().unwrap();
    api.apply(service("web", "10.96.0.10", 80)).unwrap();
    api.apply(pod("web-1", "web", "10.244.1.11")).unwrap();
    api.apply(pod("web-2", "web", "10.244.1.12")).unwrap();
    api
}

#[tokio::test]
async fn lists_every_kind_then_follows_watch_events() {
    let api = api_with_web();
    api.apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}}))
        .unwrap();
    let listed_at = api.version().to_string();
    let mut bed = Bed::new(api);
    let state = bed.next().await;
    assert_eq!(pod_names(&state), ["web-1", "web-2"]);
    assert_eq!(service_port(&state, "web"), Some(80));

    // One list per kind, then a watch from that list's version, asking for bookmarks.
    for resource in [
        "services",
        "pods",
        "endpointslices",
        "namespaces",
        "networkpolicies",
        "httproutes",
        "peerauthentications",
        "authorizationpolicies",
        "configmaps",
    ] {
        bed.watching(resource, 1).await;
        assert_eq!(bed.api.lists(resource), 1, "{resource}");
        assert_eq!(
            bed.api.watches(resource),
            [Some(listed_at.clone())],
            "{resource}"
        );
    }

    bed.api.apply(pod("web-3", "web", "10.244.1.13")).unwrap();
    let state = bed.until("web-3", |s| pod_names(s).len() == 3).await;
    assert_eq!(pod_names(&state), ["web-1", "web-2", "web-3"]);
    bed.api.apply(service("web", "10.96.0.10", 81)).unwrap();
    bed.until("port 81", |s| service_port(s, "web") == Some(81))
        .await;
    assert!(bed.api.delete("v1", "Pod", "default", "web-1").unwrap());
    let state = bed.until("web-1 gone", |s| pod_names(s).len() == 2).await;
    assert_eq!(pod_names(&state), ["web-2", "web-3"]);
    let status = *bed.status.borrow();
    assert!(!status.stale, "{status:?}");
    assert!(status.revision >= 4, "{status:?}");
    // Nothing but the first list: every change came by watch.
    assert_eq!(bed.api.lists("pods"), 1);
}

#[tokio::test]
async fn a_bookmark_lets_a_reconnect_resume_without_listing_again() {
    let mut bed = Bed::new(api_with_web());
    bed.next().await;
    bed.watching("pods", 1).await;
    bed.watching("services", 1).await;
    // Versions move on through another kind: only a bookmark tells the Pod and Service
    // watches where the store is now.
    bed.api
        .apply(json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}))
        .unwrap();
    bed.next().await;
    bed.api.bookmark();
    let bookmarked = bed.api.version().to_string();
    // History before the bookmark is gone: resuming from an older version would be
    // refused and force a list.
    bed.api.compact();
    bed.api.end_watches();
    bed.watching("pods", 1).await;
    bed.api.apply(pod("web-3", "web", "10.244.1.13")).unwrap();
    bed.until("web-3", |s| pod_names(s).len() == 3).await;

    assert_eq!(
        bed.api.lists("pods"),
        1,
        "resumed without a list: {:?}",
        bed.api.requests()
    );
    assert_eq!(bed.api.lists("services"), 1);
    assert_eq!(
        bed.api.watches("pods").last().cloned().flatten(),
        Some(bookmarked)
    );
}

#[tokio::test]
async fn gone_lists_again_and_drops_objects_deleted_while_away() {
    let mut bed = Bed::new(api_with_web());
    bed.next().await;
    bed.watching("pods", 1).await;

    // The API server goes away: the state in force stays, the source says it is stale.
    bed.api.set_reachable(false);
    let status = bed.status_until("stale", |s| s.stale).await;
    assert!(status.stale_since.is_some(), "{status:?}");
    // Meanwhile web-1 is deleted and web-3 created, and that history is compacted.
    assert!(bed.api.delete("v1", "Pod", "default", "web-1").unwrap());
    bed.api.apply(pod("web-3", "web", "10.244.1.13")).unwrap();
    bed.api.compact();
    bed.api.set_reachable(true);

    let state = bed
        .until("web-1 gone, web-3 there", |s| {
            pod_names(s) == ["web-2", "web-3"]
        })
        .await;
    assert_eq!(service_port(&state, "web"), Some(80));
    assert_eq!(bed.api.lists("pods"), 2, "410 Gone made it list again");
    let status = bed.status_until("fresh", |s| !s.stale).await;
    assert_eq!(status.stale_since, None);
    let log = bed.logs.text();
    assert!(log.contains("410 Gone"), "{log}");
}

#[tokio::test]
async fn gone_as_an_http_reply_to_a_watch_lists_again_too() {
    let mut bed = Bed::new(api_with_web());
    bed.next().await;
    bed.watching("pods", 1).await;
    bed.api.set_gone_style(GoneStyle::Http);
    bed.api.set_reachable(false);
    assert!(bed.api.delete("v1", "Pod", "default", "web-2").unwrap());
    bed.api.compact();
    bed.api.set_reachable(true);
    let state = bed.until("web-2 gone", |s| pod_names(s) == ["web-1"]).await;
    assert_eq!(service_port(&state, "web"), Some(80));
    assert_eq!(bed.api.lists("pods"), 2, "{:?}", bed.api.requests());
}

#[tokio::test]
async fn a_bad_object_is_rejected_by_name_and_the_last_good_state_stays() {
    let mut bed = Bed::new(api_with_web());
    bed.next().await;

    // A new Service with an invalid port, and a bad version of a good one.
    bed.api.apply(service("bad", "10.96.0.11", 0)).unwrap();
    let mut broken = service("web", "10.96.0.10", 80);
    broken["spec"]["sessionAffinity"] = json!("Sometimes");
    bed.api.apply(broken).unwrap();
    bed.status_until("two rejected", |s| s.rejected_objects == 2)
        .await;
    let log = bed.logs.text();
    assert!(log.contains("API Service default/bad"), "{log}");
    assert!(log.contains("API Service default/web"), "{log}");
    assert!(log.contains("spec.sessionAffinity"), "{log}");

    // Later changes still apply, with the last good web and without bad.
    bed.api.apply(pod("web-3", "web", "10.244.1.13")).unwrap();
    let state = bed.until("web-3", |s| pod_names(s).len() == 3).await;
    assert_eq!(service_port(&state, "web"), Some(80));
    assert_eq!(service_port(&state, "bad"), None);

    // Fixed: accepted again.
    bed.api.apply(service("web", "10.96.0.10", 82)).unwrap();
    bed.until("port 82", |s| service_port(s, "web") == Some(82))
        .await;
    assert!(bed.api.delete("v1", "Service", "default", "bad").unwrap());
    bed.status_until("none rejected", |s| s.rejected_objects == 0)
        .await;
}

#[tokio::test]
async fn clusters_without_gateway_api_or_istio_crds_are_served() {
    let api = api_with_web();
    for resource in ["httproutes", "peerauthentications", "authorizationpolicies"] {
        api.remove_resource(resource);
    }
    let mut bed = Bed::new(api);
    let state = bed.next().await;
    assert_eq!(pod_names(&state), ["web-1", "web-2"]);
    assert!(!bed.status.borrow().stale);
}

#[tokio::test]
async fn an_empty_cluster_is_a_state_too() {
    let mut bed = Bed::new(KubeApi::start().unwrap());
    let state = bed.next().await;
    assert_eq!(state.services().len() + state.pods().len(), 0);
    bed.api.apply(service("web", "10.96.0.10", 80)).unwrap();
    bed.until("web", |s| service_port(s, "web") == Some(80))
        .await;
}

/// Objects as a real API server serves them (what `kubectl get -o yaml` shows: server
/// fields, defaults, status, managed fields) are accepted as they are.
#[tokio::test]
async fn objects_as_an_api_server_serves_them_are_accepted() {
    let api = KubeApi::start().unwrap();
    api.apply_yaml(
        r#"
apiVersion: v1
kind: Namespace
metadata:
  name: shop
  uid: 0b5c1c4e-1c57-4a43-9d4b-2d0f6f7f1a11
  creationTimestamp: "2026-01-05T10:00:00Z"
  labels: {kubernetes.io/metadata.name: shop, istio.io/dataplane-mode: ambient}
spec: {finalizers: [kubernetes]}
status: {phase: Active}
---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: shop
  uid: 6f1f5a8e-8f0e-4a5b-9a61-0c1d2e3f4a5b
  creationTimestamp: "2026-01-05T10:00:01Z"
  labels: {app: web}
  annotations:
    kubectl.kubernetes.io/last-applied-configuration: '{"apiVersion":"v1","kind":"Service"}'
  managedFields:
    - manager: kubectl-client-side-apply
      operation: Update
      apiVersion: v1
      time: "2026-01-05T10:00:01Z"
      fieldsType: FieldsV1
      fieldsV1: {"f:spec": {"f:ports": {}}}
spec:
  type: ClusterIP
  clusterIP: 10.96.0.10
  clusterIPs: [10.96.0.10]
  ipFamilies: [IPv4]
  ipFamilyPolicy: SingleStack
  internalTrafficPolicy: Cluster
  sessionAffinity: None
  selector: {app: web}
  ports:
    - {name: http, port: 80, protocol: TCP, targetPort: 8080}
status: {loadBalancer: {}}
---
apiVersion: v1
kind: Pod
metadata:
  name: web-7d4b9c-x2x9k
  generateName: web-7d4b9c-
  namespace: shop
  uid: 9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d
  creationTimestamp: "2026-01-05T10:00:02Z"
  labels: {app: web, pod-template-hash: 7d4b9c}
  ownerReferences:
    - {apiVersion: apps/v1, kind: ReplicaSet, name: web-7d4b9c, uid: 1a2b3c4d-5e6f-4a1b-9c2d-3e4f5a6b7c8d, controller: true, blockOwnerDeletion: true}
spec:
  containers:
    - name: web
      image: nginx:1.27
      imagePullPolicy: IfNotPresent
      ports: [{containerPort: 8080, protocol: TCP}]
      resources: {}
      terminationMessagePath: /dev/termination-log
      terminationMessagePolicy: File
      volumeMounts:
        - {name: kube-api-access-abcde, mountPath: /var/run/secrets/kubernetes.io/serviceaccount, readOnly: true}
  dnsPolicy: ClusterFirst
  enableServiceLinks: true
  nodeName: node-1
  preemptionPolicy: PreemptLowerPriority
  priority: 0
  restartPolicy: Always
  schedulerName: default-scheduler
  securityContext: {}
  serviceAccount: default
  serviceAccountName: default
  terminationGracePeriodSeconds: 30
  tolerations:
    - {key: node.kubernetes.io/not-ready, operator: Exists, effect: NoExecute, tolerationSeconds: 300}
  volumes:
    - name: kube-api-access-abcde
      projected:
        defaultMode: 420
        sources:
          - serviceAccountToken: {expirationSeconds: 3607, path: token}
          - configMap: {name: kube-root-ca.crt, items: [{key: ca.crt, path: ca.crt}]}
          - downwardAPI: {items: [{path: namespace, fieldRef: {apiVersion: v1, fieldPath: metadata.namespace}}]}
status:
  phase: Running
  qosClass: BestEffort
  hostIP: 192.168.1.10
  hostIPs: [{ip: 192.168.1.10}]
  podIP: 10.244.1.11
  podIPs: [{ip: 10.244.1.11}]
  startTime: "2026-01-05T10:00:02Z"
  conditions:
    - {type: Ready, status: "True", lastProbeTime: null, lastTransitionTime: "2026-01-05T10:00:04Z"}
  containerStatuses:
    - name: web
      image: docker.io/library/nginx:1.27
      imageID: docker.io/library/nginx@sha256:0000000000000000000000000000000000000000000000000000000000000000
      containerID: containerd://1111111111111111111111111111111111111111111111111111111111111111
      ready: true
      started: true
      restartCount: 0
      state: {running: {startedAt: "2026-01-05T10:00:03Z"}}
      lastState: {}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-abcde
  generateName: web-
  namespace: shop
  labels: {kubernetes.io/service-name: web, endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io}
  ownerReferences:
    - {apiVersion: v1, kind: Service, name: web, uid: 6f1f5a8e-8f0e-4a5b-9a61-0c1d2e3f4a5b, controller: true, blockOwnerDeletion: true}
addressType: IPv4
endpoints:
  - addresses: [10.244.1.11]
    conditions: {ready: true, serving: true, terminating: false}
    nodeName: node-1
    targetRef: {kind: Pod, name: web-7d4b9c-x2x9k, namespace: shop, uid: 9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d}
ports:
  - {name: http, port: 8080, protocol: TCP}
"#,
    )
    .unwrap();
    let mut bed = Bed::new(api);
    let state = bed.next().await;
    assert_eq!(pod_names(&state), ["web-7d4b9c-x2x9k"]);
    assert_eq!(service_port(&state, "web"), Some(80));
    assert_eq!(state.endpoint_slices().len(), 1);
    assert_eq!(
        bed.status.borrow().rejected_objects,
        0,
        "{}",
        bed.logs.text()
    );
}
