//! The node proxy's configuration ([`ProxyConfig`]): the L7 frontends with their
//! compiled route tables, every Service port they send to with its ready endpoints and
//! resilience settings, the local pods the proxy listens in with their identities and
//! security settings, and the pods of the mesh (see [`super::security`]).
//!
//! Pure: State, compiled routes and the discovered namespaces in, a snapshot out.
//! Everything is sorted, so equal inputs give equal snapshots (the feed publishes only
//! changes).

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use k8s_openapi::api::core::v1::{Pod, Service, ServicePort};
use mesh_common::l7::{
    AppProtocol, BackendTarget, Endpoint, Filter, Frontend, LocalPod, NetnsRef, ObjectRef,
    ProxyConfig, RouteTable, ServicePortRef, ServiceTarget,
};

use super::routes::{CompiledRoutes, app_protocol, object_ref};
use super::security::MeshSecurity;
use super::services::{BackendSources, slice_owner};
use crate::datapath::endpoints::LocalNetns;
use crate::state::{ObjectKey, State, cluster_ips, pod_ips, protocol, resilience::resilience};

/// Workload of an endpoint whose pod is not known.
pub const UNKNOWN_WORKLOAD: &str = "unknown";

/// The proxy configuration of node `node` for `state`, whose routes compiled to
/// `routes`, with the local pod namespaces `local` (from discovery), the snapshot
/// number `version`, and the trust domain the agent was given (`--trust-domain`), if
/// any.
pub fn proxy_config(
    state: &State,
    node: &str,
    routes: &CompiledRoutes,
    local: &[LocalNetns],
    version: u64,
    trust_domain: Option<&str>,
) -> ProxyConfig {
    let pods: BTreeMap<&ObjectKey, &Pod> = state.pods().collect();

    let mut frontends = Vec::new();
    let mut targets = BTreeSet::new();
    for (port_ref, &protocol) in &routes.l7_ports {
        let Some(svc) = state.service(&object_key(&port_ref.service)) else {
            continue;
        };
        // Headless: nothing to redirect, so nothing to serve.
        let addrs = cluster_ips(svc);
        if addrs.is_empty() {
            continue;
        }
        let table = routes.tables.get(port_ref);
        match table {
            Some(table) => targets.extend(table_targets(table)),
            None => {
                targets.insert(port_ref.clone());
            }
        }
        for addr in addrs {
            frontends.push(Frontend {
                addr,
                port: port_ref.port,
                service: port_ref.service.clone(),
                protocol,
                routes: table.cloned(),
            });
        }
    }

    // Only the served Services' slices: the proxy's configuration costs what the routes
    // serve, not what the cluster holds.
    let served = served_services(routes);
    let slices = state
        .endpoint_slices()
        .filter(|(key, slice)| slice_owner(key, slice).is_some_and(|svc| served.contains(&svc)));
    let sources = BackendSources::of(slices, state.pods());
    let services: Vec<ServiceTarget> = targets
        .into_iter()
        .filter_map(|target| {
            let key = object_key(&target.service);
            let svc = state.service(&key)?;
            service_target(&sources, &pods, &key, svc, target)
        })
        .collect();

    let security = MeshSecurity::new(state, trust_domain);
    let mut local = local_pods(&pods, node, local, &security);
    mark_http_ports(&mut local, &services);
    ProxyConfig {
        version,
        node: node.to_owned(),
        pods: local,
        frontends,
        services,
        policy_epoch: 0,
        trust_domain: security.trust_domain().to_owned(),
        mesh: security.mesh_endpoints(),
    }
}

/// Records, in each enrolled local pod's security settings, the container ports that
/// L7 Service ports send to: HTTP ports, where authorization is judged per request.
fn mark_http_ports(pods: &mut [LocalPod], services: &[ServiceTarget]) {
    let mut ports: BTreeMap<&ObjectRef, BTreeSet<u16>> = BTreeMap::new();
    for endpoint in services.iter().flat_map(|s| &s.endpoints) {
        if let Some(pod) = &endpoint.pod {
            ports.entry(pod).or_default().insert(endpoint.port);
        }
    }
    for pod in pods {
        if let (Some(security), Some(ports)) = (pod.security.as_mut(), ports.get(&pod.pod)) {
            security.http_ports = ports.iter().copied().collect();
        }
    }
}

/// Every Service the node proxy serves, or sends requests (or copies of them) to,
/// under `routes`: the configuration depends on these and no other Service.
pub fn served_services(routes: &CompiledRoutes) -> BTreeSet<ObjectKey> {
    let tables = routes.tables.values().flat_map(table_targets);
    (routes.l7_ports.keys().cloned())
        .chain(tables)
        .map(|port| object_key(&port.service))
        .collect()
}

/// Every Service port a table sends requests (or copies of them) to.
fn table_targets(table: &RouteTable) -> impl Iterator<Item = ServicePortRef> + '_ {
    table.rules.iter().flat_map(|rule| {
        let backend_filters = rule.backends.iter().flat_map(|b| &b.filters);
        let mirrors = rule
            .filters
            .iter()
            .chain(backend_filters)
            .filter_map(|f| match f {
                Filter::RequestMirror(mirror) => Some(&mirror.target),
                _ => None,
            });
        rule.backends
            .iter()
            .map(|b| &b.target)
            .chain(mirrors)
            .filter_map(|target| match target {
                BackendTarget::Service(port) => Some(port.clone()),
                BackendTarget::Invalid { .. } => None,
            })
    })
}

/// The Service port `target` with its ready endpoints, or `None` when `svc` has no such
/// TCP port (the route compiler reports such a backendRef as unresolved).
fn service_target(
    sources: &BackendSources<'_>,
    pods: &BTreeMap<&ObjectKey, &Pod>,
    key: &ObjectKey,
    svc: &Service,
    target: ServicePortRef,
) -> Option<ServiceTarget> {
    let port: &ServicePort = svc
        .spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .find(|p| p.port == i32::from(target.port) && protocol(p.protocol.as_ref()) == "TCP")?;
    let backends = sources
        .backends(key, svc, &[port])
        .pop()
        .unwrap_or_default();
    let endpoints = backends
        .into_iter()
        .filter(|b| !b.terminating)
        .map(|b| {
            let pod = b.pod.as_ref();
            let workload = pod
                .and_then(|key| Some(workload(pods.get(key)?, &key.name)))
                .unwrap_or_else(|| UNKNOWN_WORKLOAD.to_owned());
            Endpoint {
                addr: b.addr.ip(),
                port: b.addr.port(),
                pod: pod.map(object_ref),
                workload,
            }
        })
        .collect();
    let protocol = port
        .app_protocol
        .as_deref()
        .and_then(app_protocol)
        .unwrap_or(AppProtocol::Http);
    // Validation has rejected states with bad values: there are no problems left here.
    let (resilience, _) = resilience(svc.metadata.annotations.as_ref());
    Some(ServiceTarget {
        host: format!("{}.{}.svc.cluster.local", key.name, key.namespace),
        target,
        protocol,
        endpoints,
        resilience,
    })
}

/// The pods of `node` found in the namespaces `local`, by address, sorted by pod. A
/// namespace whose addresses match no pod, or several, is left out, and so is a pod
/// matched by several namespaces: guessing would let the proxy speak for the wrong pod.
fn local_pods(
    pods: &BTreeMap<&ObjectKey, &Pod>,
    node: &str,
    local: &[LocalNetns],
    security: &MeshSecurity<'_>,
) -> Vec<LocalPod> {
    let mut by_ip: BTreeMap<IpAddr, BTreeSet<&ObjectKey>> = BTreeMap::new();
    for (&key, pod) in pods {
        let on_node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node);
        if on_node {
            for ip in pod_ips(pod) {
                by_ip.entry(ip).or_default().insert(key);
            }
        }
    }
    let mut found: BTreeMap<&ObjectKey, Vec<&LocalNetns>> = BTreeMap::new();
    for netns in local {
        let matched: BTreeSet<&ObjectKey> = netns
            .addrs
            .iter()
            .filter_map(|ip| by_ip.get(ip))
            .flatten()
            .copied()
            .collect();
        if let [key] = Vec::from_iter(matched).as_slice() {
            found.entry(key).or_default().push(netns);
        }
    }
    found
        .into_iter()
        .filter_map(|(key, netns)| {
            let [netns] = netns.as_slice() else {
                return None;
            };
            let pod = pods.get(key)?;
            let (identity, security) = security.workload(key, pod).unzip();
            Some(LocalPod {
                pod: object_ref(key),
                workload: workload(pod, &key.name),
                addrs: pod_ips(pod),
                netns: NetnsRef {
                    pid: netns.pid,
                    inode: netns.inode,
                    cookie: netns.cookie,
                },
                identity,
                security,
            })
        })
        .collect()
}

/// A pod's workload name: label `app.kubernetes.io/name`, else `app`, else its name.
pub(super) fn workload(pod: &Pod, name: &str) -> String {
    let labels = pod.metadata.labels.as_ref();
    ["app.kubernetes.io/name", "app"]
        .iter()
        .find_map(|label| labels?.get(*label))
        .map_or_else(|| name.to_owned(), Clone::clone)
}

fn object_key(r: &ObjectRef) -> ObjectKey {
    ObjectKey {
        namespace: r.namespace.clone(),
        name: r.name.clone(),
    }
}

#[cfg(test)]
mod tests;
