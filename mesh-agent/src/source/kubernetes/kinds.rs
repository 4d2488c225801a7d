//! The kinds the Kubernetes source watches: exactly those the state model reads (see
//! `crate::state`), at the API versions the API server serves them under. The
//! DaemonSet's ClusterRole grants get/list/watch on these and nothing else; a test
//! checks the two against each other.

use kube::core::{ApiResource, GroupVersionKind};

/// One watched kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WatchedKind {
    /// API group, "" for the core group.
    pub group: &'static str,
    /// API version inside the group.
    pub version: &'static str,
    /// `kind`.
    pub kind: &'static str,
    /// The resource's plural name: its URL path segment and its RBAC resource.
    pub plural: &'static str,
    /// Whether objects live in namespaces (Namespaces themselves do not).
    pub namespaced: bool,
    /// Only this one object (namespace, name) is read: the agent lists and watches it
    /// with a `metadata.name` field selector in its namespace, which RBAC
    /// `resourceNames` can authorize.
    pub only: Option<(&'static str, &'static str)>,
    /// Defined by a CustomResourceDefinition that a cluster may lack (Gateway API,
    /// Istio): "not found" then means "no such objects", not an unreachable source.
    pub optional: bool,
}

impl WatchedKind {
    /// `apiVersion` of the kind's objects.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// The kind as kube's dynamic API sees it.
    pub fn api_resource(&self) -> ApiResource {
        ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(self.group, self.version, self.kind),
            self.plural,
        )
    }
}

/// Every kind the agent watches, in the order the state model lists them.
pub const WATCHED: [WatchedKind; 9] = [
    core("Service", "services", true),
    core("Pod", "pods", true),
    WatchedKind {
        group: "discovery.k8s.io",
        ..core("EndpointSlice", "endpointslices", true)
    },
    core("Namespace", "namespaces", false),
    WatchedKind {
        group: "networking.k8s.io",
        ..core("NetworkPolicy", "networkpolicies", true)
    },
    WatchedKind {
        group: "gateway.networking.k8s.io",
        optional: true,
        ..core("HTTPRoute", "httproutes", true)
    },
    WatchedKind {
        group: "security.istio.io",
        optional: true,
        ..core("PeerAuthentication", "peerauthentications", true)
    },
    WatchedKind {
        group: "security.istio.io",
        optional: true,
        ..core("AuthorizationPolicy", "authorizationpolicies", true)
    },
    WatchedKind {
        only: Some((
            crate::state::istio::MESH_CONFIG_NAMESPACE,
            crate::state::istio::MESH_CONFIG_NAME,
        )),
        ..core("ConfigMap", "configmaps", true)
    },
];

/// A core-group (`v1`) kind; the others override the group.
const fn core(kind: &'static str, plural: &'static str, namespaced: bool) -> WatchedKind {
    WatchedKind {
        group: "",
        version: "v1",
        kind,
        plural,
        namespaced,
        only: None,
        optional: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_versions_and_resources() {
        let slice = WATCHED.iter().find(|k| k.kind == "EndpointSlice").unwrap();
        assert_eq!(slice.api_version(), "discovery.k8s.io/v1");
        assert_eq!(WATCHED[0].api_version(), "v1");
        let ar = slice.api_resource();
        assert_eq!(
            (
                ar.group.as_str(),
                ar.plural.as_str(),
                ar.api_version.as_str()
            ),
            ("discovery.k8s.io", "endpointslices", "discovery.k8s.io/v1")
        );
    }

    /// The state model decodes every watched kind at the version watched: an object of
    /// a kind it did not use would be refused as such, whatever its content.
    #[test]
    fn the_state_model_reads_every_watched_kind() {
        for kind in WATCHED {
            let (namespace, name) = kind.only.unwrap_or(("default", "x"));
            let json = serde_json::json!({
                "apiVersion": kind.api_version(),
                "kind": kind.kind,
                "metadata": {"name": name, "namespace": namespace},
            });
            let origin = crate::state::Origin::Api {
                kind: kind.kind.to_owned(),
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            };
            let mut objects = crate::state::Objects::default();
            // Validation may refuse a bare object, but never for its kind.
            if let Err(problems) = objects.upsert("x", origin, &json, None) {
                for problem in problems {
                    assert!(
                        !problem.message.contains("kind this agent uses"),
                        "{}: {problem}",
                        kind.kind
                    );
                }
            }
        }
    }
}
