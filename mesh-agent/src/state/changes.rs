//! What changed between two states, object by object, so that a planner re-plans only
//! what a change touches. Objects a keyed source did not touch are the same `Arc` in
//! both states, so most are told apart by a pointer comparison; others (a file source
//! decodes everything again) are compared by value.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::model::{ObjectKey, State};

/// The objects that differ between an older and a newer state, by kind.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services added, changed or removed.
    pub services: Vec<ObjectKey>,
    /// Pods added, changed or removed.
    pub pods: Vec<ObjectKey>,
    /// EndpointSlices added, changed or removed.
    pub endpoint_slices: Vec<ObjectKey>,
    /// Namespaces added, changed or removed.
    pub namespaces: Vec<ObjectKey>,
    /// NetworkPolicies added, changed or removed.
    pub network_policies: Vec<ObjectKey>,
    /// HTTPRoutes added, changed or removed.
    pub http_routes: Vec<ObjectKey>,
    /// PeerAuthentications added, changed or removed.
    pub peer_authentications: Vec<ObjectKey>,
    /// AuthorizationPolicies added, changed or removed.
    pub authorization_policies: Vec<ObjectKey>,
    /// Istio's MeshConfig settings changed.
    pub mesh_config: bool,
}

impl Changes {
    /// The changes from `old` to `new`.
    pub fn between(old: &State, new: &State) -> Self {
        Self {
            services: changed(&old.services, &new.services),
            pods: changed(&old.pods, &new.pods),
            endpoint_slices: changed(&old.endpoint_slices, &new.endpoint_slices),
            namespaces: changed(&old.namespaces, &new.namespaces),
            network_policies: changed(&old.network_policies, &new.network_policies),
            http_routes: changed(&old.http_routes, &new.http_routes),
            peer_authentications: changed(&old.peer_authentications, &new.peer_authentications),
            authorization_policies: changed(
                &old.authorization_policies,
                &new.authorization_policies,
            ),
            mesh_config: old.mesh_config != new.mesh_config,
        }
    }

    /// Nothing changed.
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Whether the network and security policy of the state may differ: everything but
    /// Services, EndpointSlices and HTTPRoutes feeds it, and Services do when an
    /// AuthorizationPolicy of `new` names Services by targetRefs.
    pub fn touch_policy(&self, new: &State) -> bool {
        let targets_services = || {
            new.authorization_policies()
                .any(|(_, ap)| ap.spec.target_ref.is_some() || !ap.spec.target_refs.is_empty())
        };
        self.touch_workloads()
            || !self.network_policies.is_empty()
            || (!self.services.is_empty() && targets_services())
    }

    /// Whether what the mesh knows of its workloads may differ: the Pods, their
    /// Namespaces (enrollment), Istio's security kinds and MeshConfig (identities, mTLS
    /// modes, authorization).
    pub fn touch_workloads(&self) -> bool {
        !self.pods.is_empty()
            || !self.namespaces.is_empty()
            || !self.peer_authentications.is_empty()
            || !self.authorization_policies.is_empty()
            || self.mesh_config
    }
}

/// Keys whose object was added, removed, or differs, in key order: one merge walk over
/// both maps.
fn changed<T: PartialEq>(
    old: &BTreeMap<ObjectKey, Arc<T>>,
    new: &BTreeMap<ObjectKey, Arc<T>>,
) -> Vec<ObjectKey> {
    let mut out = Vec::new();
    let (mut a, mut b) = (old.iter().peekable(), new.iter().peekable());
    loop {
        match (a.peek(), b.peek()) {
            (None, None) => return out,
            (Some((ka, _)), None) => {
                out.push((*ka).clone());
                a.next();
            }
            (None, Some((kb, _))) => {
                out.push((*kb).clone());
                b.next();
            }
            (Some((ka, va)), Some((kb, vb))) => match ka.cmp(kb) {
                std::cmp::Ordering::Less => {
                    out.push((*ka).clone());
                    a.next();
                }
                std::cmp::Ordering::Greater => {
                    out.push((*kb).clone());
                    b.next();
                }
                std::cmp::Ordering::Equal => {
                    if !Arc::ptr_eq(va, vb) && va != vb {
                        out.push((*ka).clone());
                    }
                    a.next();
                    b.next();
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::parse_str;

    const BASE: &str = "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec: {clusterIP: 10.96.0.10, selector: {app: web}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: db, namespace: default}
spec: {clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Pod
metadata: {name: web-1, namespace: default, labels: {app: web}}
status: {podIP: 10.244.0.5}
";

    fn key(name: &str) -> ObjectKey {
        ObjectKey {
            namespace: "default".into(),
            name: name.into(),
        }
    }

    #[test]
    fn equal_states_decoded_twice_have_no_changes() {
        let a = parse_str("a.yaml", BASE).unwrap();
        let b = parse_str("b.yaml", BASE).unwrap();
        assert!(Changes::between(&a, &b).is_empty());
    }

    #[test]
    fn added_changed_and_removed_objects_are_named_by_kind() {
        let a = parse_str("a.yaml", BASE).unwrap();
        let edited = BASE
            .replace("ports: [{port: 5432}]", "ports: [{port: 5433}]")
            .replace("name: web-1", "name: web-2");
        let b = parse_str("b.yaml", &edited).unwrap();
        let changes = Changes::between(&a, &b);
        assert_eq!(changes.services, vec![key("db")]);
        assert_eq!(changes.pods, vec![key("web-1"), key("web-2")]);
        assert!(changes.endpoint_slices.is_empty() && !changes.mesh_config);
        assert!(changes.touch_policy(&b), "pods feed network policy");
    }

    #[test]
    fn services_touch_policy_only_through_authorization_target_refs() {
        let a = parse_str("a.yaml", BASE).unwrap();
        let b = parse_str("b.yaml", &BASE.replace("5432", "5433")).unwrap();
        assert!(!Changes::between(&a, &b).touch_policy(&b));
        let policy = "
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: db, namespace: default}
spec: {targetRefs: [{kind: Service, group: '', name: db}], action: DENY, rules: [{}]}
";
        let a = parse_str("a.yaml", &format!("{BASE}{policy}")).unwrap();
        let b = parse_str(
            "b.yaml",
            &format!("{}{policy}", BASE.replace("5432", "5433")),
        )
        .unwrap();
        let changes = Changes::between(&a, &b);
        assert_eq!(changes.services, vec![key("db")]);
        assert!(changes.touch_policy(&b));
    }
}
