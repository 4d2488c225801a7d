//! Cluster state the integration tests share, as the YAML they apply.

use std::{fmt::Write as _, net::Ipv4Addr};

/// The `web` Service (`vip`:`port` → `target_port`/TCP, selector `app: web`, namespace
/// default) and one Pod per backend `(name, address)`, labelled `app: web`.
pub fn web_state(
    vip: Ipv4Addr,
    port: u16,
    target_port: u16,
    backends: &[(&str, Ipv4Addr)],
) -> String {
    let mut yaml = format!(
        "apiVersion: v1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  clusterIP: {vip}
  selector: {{app: web}}
  ports:
    - {{name: http, port: {port}, targetPort: {target_port}, protocol: TCP}}
"
    );
    for (name, ip) in backends {
        let _ = write!(
            yaml,
            "---
apiVersion: v1
kind: Pod
metadata: {{name: {name}, namespace: default, labels: {{app: web}}}}
spec: {{containers: [{{name: web, image: web}}]}}
status: {{podIP: {ip}}}
"
        );
    }
    yaml
}
