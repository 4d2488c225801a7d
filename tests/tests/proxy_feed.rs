//! The node proxy's configuration end to end (root only): the real agent finds its
//! local pods' network namespaces in their cgroups, and `mesh-agent proxy-config` (the
//! first line of `GET /v1/proxy/config` on the admin socket) shows them, each with a pid
//! that leads into the pod's namespace, beside the L7 Service's frontend and endpoints;
//! a state change is a new snapshot with the next version.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use anyhow::{Context as _, Result, ensure};
use mesh_tests::{
    Agent, eventually, require_root,
    scenario::{Bed, CONVERGE, PodDef, pod},
};
use serde_json::{Value, json};

const PODS: &[PodDef] = &[
    pod("n1", "prod", "client", "10.244.1.10", "app: client", &[]),
    pod(
        "n1",
        "prod",
        "web-1",
        "10.244.1.11",
        "app.kubernetes.io/name: storefront, app: web",
        &[("http", 8080, "TCP")],
    ),
    pod(
        "n2",
        "prod",
        "web-2",
        "10.244.2.11",
        "app: web",
        &[("http", 8080, "TCP")],
    ),
];

/// `web` speaks HTTP (appProtocol), with `max_connections` set by annotation.
fn service(max_connections: u32) -> String {
    format!(
        "---
apiVersion: v1
kind: Service
metadata:
  name: web
  namespace: prod
  annotations: {{mesh.io/max-connections: '{max_connections}'}}
spec:
  clusterIP: 10.96.0.10
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: http, appProtocol: http}}]
"
    )
}

/// `mesh-agent proxy-config --node <agent's node>`, parsed.
fn proxy_config(agent: &Agent) -> Result<Value> {
    let out = agent.cli(&["proxy-config", "--node", agent.pin_name()])?;
    ensure!(
        out.status.success(),
        "mesh-agent proxy-config failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).context("proxy-config JSON")
}

/// The snapshot once `ready` holds for it.
fn wait_config(agent: &Agent, what: &str, ready: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    let held = eventually(CONVERGE, || {
        last = proxy_config(agent).unwrap_or_else(|e| panic!("{e:#}\nlog:\n{}", agent.log()));
        ready(&last)
    });
    assert!(
        held,
        "{what}: last snapshot {last:#}\nlog:\n{}",
        agent.log()
    );
    last
}

fn inode(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .ino()
}

#[test]
fn proxy_config_names_local_pods_frontends_and_endpoints() {
    if !require_root() {
        return;
    }
    let mut bed = Bed::new("pxf", &["n1", "n2"], PODS).expect("bed");
    bed.anchor_idle_pods().expect("anchors");
    bed.state
        .write("pods.yaml", &bed.pods_yaml())
        .expect("pods");
    bed.state.write("svc.yaml", &service(50)).expect("service");
    let agent = bed.start_agent("n1", &[]).expect("agent");

    // Both n1 pods have processes: their namespaces are found (not n2's web-2).
    let config = wait_config(&agent, "both local pods found", |c| {
        c["pods"].as_array().is_some_and(|p| p.len() == 2)
    });
    assert_eq!(config["node"], agent.pin_name());
    let pods = config["pods"].as_array().expect("pods");
    let names: Vec<&str> = pods
        .iter()
        .filter_map(|p| p["pod"]["name"].as_str())
        .collect();
    assert_eq!(names, ["client", "web-1"]);
    assert_eq!(pods[1]["workload"], "storefront");
    assert_eq!(pods[1]["addrs"], json!(["10.244.1.11"]));
    for p in pods {
        let name = p["pod"]["name"].as_str().expect("name");
        let netns = &p["netns"];
        let pid = netns["pid"].as_u64().expect("pid");
        let want = inode(&bed.pod(name).netns_path());
        assert_eq!(netns["inode"].as_u64(), Some(want), "{name}: {p}");
        assert_eq!(
            inode(Path::new(&format!("/proc/{pid}/ns/net"))),
            want,
            "{name}: pid {pid}"
        );
        assert_ne!(netns["cookie"].as_u64(), Some(0), "{name}");
    }

    assert_eq!(
        config["frontends"],
        json!([{
            "addr": "10.96.0.10",
            "port": 80,
            "service": {"namespace": "prod", "name": "web"},
            "protocol": "http",
            "routes": null,
        }])
    );
    let services = config["services"].as_array().expect("services");
    assert_eq!(services.len(), 1, "{config:#}");
    let web = &services[0];
    assert_eq!(web["host"], "web.prod.svc.cluster.local");
    assert_eq!(web["resilience"]["maxConnections"], 50);
    let endpoints: Vec<(String, String)> = web["endpoints"]
        .as_array()
        .expect("endpoints")
        .iter()
        .map(|e| {
            (
                format!("{}:{}", e["addr"].as_str().unwrap_or("?"), e["port"]),
                e["workload"].as_str().unwrap_or("?").to_owned(),
            )
        })
        .collect();
    assert_eq!(
        endpoints,
        [
            ("10.244.1.11:8080".to_owned(), "storefront".to_owned()),
            ("10.244.2.11:8080".to_owned(), "web".to_owned()),
        ]
    );

    // A change is the next snapshot.
    let version = config["version"].as_u64().expect("version");
    bed.state.write("svc.yaml", &service(60)).expect("service");
    let changed = wait_config(&agent, "the new annotation applied", |c| {
        c["services"][0]["resilience"]["maxConnections"] == 60
    });
    assert!(
        changed["version"].as_u64().expect("version") > version,
        "{changed:#}"
    );

    agent.stop().expect("agent stops");
}
