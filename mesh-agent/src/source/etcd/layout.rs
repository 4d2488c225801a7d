//! Where objects and nodes live in etcd: `<prefix><group>/<kind>/<namespace>/<name>`
//! holding the object's JSON (`<prefix><group>/<kind>/<name>` for cluster-scoped
//! kinds), and `<prefix>nodes/<node>` holding a [`NodeRecord`] under the agent's lease.
//! The group is the API group, `core` for the core group (`v1` kinds): e.g.
//! `/mesh/core/Service/shop/web`, `/mesh/networking.k8s.io/NetworkPolicy/shop/deny`,
//! `/mesh/core/Namespace/shop`. A group never equals `nodes`: API groups have a dot.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::state::{Expected, Kind, ObjectKey};

/// The group segment of core kinds.
pub const CORE_GROUP: &str = "core";
/// The segment under the prefix where nodes register.
const NODES: &str = "nodes";

/// The key layout under one prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    prefix: String,
}

/// What a key under the prefix is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// An object's key, naming it.
    Object(Expected),
    /// A node's registration.
    Node(String),
    /// Neither: a key this layout does not define.
    Unknown,
}

/// A problem with `--etcd-prefix`.
#[derive(Debug, thiserror::Error)]
#[error("etcd prefix {0:?}: must start with '/' and not be \"/\" alone")]
pub struct PrefixError(String);

impl Layout {
    /// The layout under `prefix` (`/mesh/` by default); a missing trailing '/' is added.
    pub fn new(prefix: &str) -> Result<Self, PrefixError> {
        if !prefix.starts_with('/') || prefix.trim_end_matches('/').is_empty() {
            return Err(PrefixError(prefix.to_owned()));
        }
        let mut prefix = prefix.to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self { prefix })
    }

    /// The prefix, ending in '/'.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The group segment of `kind`.
    fn group(kind: Kind) -> &'static str {
        match kind.group() {
            "" => CORE_GROUP,
            group => group,
        }
    }

    /// The key of every object of `kind`, up to its namespace.
    pub fn kind_prefix(&self, kind: Kind) -> String {
        format!("{}{}/{kind}/", self.prefix, Self::group(kind))
    }

    /// The key of one object.
    pub fn object_key(&self, kind: Kind, key: &ObjectKey) -> String {
        if kind.cluster_scoped() {
            format!("{}{}", self.kind_prefix(kind), key.name)
        } else {
            format!("{}{}/{}", self.kind_prefix(kind), key.namespace, key.name)
        }
    }

    /// Where nodes register.
    pub fn nodes_prefix(&self) -> String {
        format!("{}{NODES}/", self.prefix)
    }

    /// The registration key of `node`.
    pub fn node_key(&self, node: &str) -> String {
        format!("{}{node}", self.nodes_prefix())
    }

    /// What `key` (a full key under the prefix) is.
    pub fn parse(&self, key: &str) -> KeyKind {
        let Some(rest) = key.strip_prefix(&self.prefix) else {
            return KeyKind::Unknown;
        };
        let parts: Vec<&str> = rest.split('/').collect();
        if let [NODES, node] = parts[..] {
            return if node.is_empty() {
                KeyKind::Unknown
            } else {
                KeyKind::Node(node.to_owned())
            };
        }
        let (group, kind_name, namespace, name) = match parts[..] {
            [group, kind, namespace, name] => (group, kind, namespace, name),
            [group, kind, name] => (group, kind, "", name),
            _ => return KeyKind::Unknown,
        };
        let Some(kind) = Kind::ALL.into_iter().find(|k| k.to_string() == kind_name) else {
            return KeyKind::Unknown;
        };
        let scoped_right = kind.cluster_scoped() == namespace.is_empty();
        if Self::group(kind) != group || !scoped_right || name.is_empty() {
            return KeyKind::Unknown;
        }
        KeyKind::Object(Expected {
            kind,
            key: ObjectKey {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
            },
        })
    }

    /// How a key this layout does not define should look, for messages.
    pub fn expected_shape(&self) -> String {
        format!(
            "{0}<group>/<kind>/<namespace>/<name> (group `{CORE_GROUP}` for v1 kinds), or {0}nodes/<node>",
            self.prefix
        )
    }
}

/// What an agent registers under `<prefix>nodes/<node>`, bound to its lease: the key
/// vanishes when the agent stops refreshing it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    /// The node's name (`run --node`).
    pub node: String,
    /// The node's addresses.
    pub addresses: Vec<IpAddr>,
    /// The agent's version.
    pub agent_version: String,
    /// The newest etcd revision whose state the node's datapath holds.
    pub applied_revision: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(namespace: &str, name: &str) -> ObjectKey {
        ObjectKey {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    #[test]
    fn keys_round_trip_for_every_kind() {
        let layout = Layout::new("/mesh").expect("prefix");
        assert_eq!(layout.prefix(), "/mesh/");
        for kind in Kind::ALL {
            let object = if kind.cluster_scoped() {
                key("", "n")
            } else {
                key("shop", "n")
            };
            let k = layout.object_key(kind, &object);
            assert_eq!(
                layout.parse(&k),
                KeyKind::Object(Expected { kind, key: object }),
                "{k}"
            );
        }
        assert_eq!(
            layout.object_key(Kind::Service, &key("shop", "web")),
            "/mesh/core/Service/shop/web"
        );
        assert_eq!(
            layout.object_key(Kind::NetworkPolicy, &key("shop", "deny")),
            "/mesh/networking.k8s.io/NetworkPolicy/shop/deny"
        );
        assert_eq!(
            layout.object_key(Kind::Namespace, &key("", "shop")),
            "/mesh/core/Namespace/shop"
        );
        assert_eq!(
            layout.object_key(Kind::HttpRoute, &key("shop", "r")),
            "/mesh/gateway.networking.k8s.io/HTTPRoute/shop/r"
        );
    }

    #[test]
    fn nodes_and_foreign_keys_are_told_apart() {
        let layout = Layout::new("/mesh/").expect("prefix");
        assert_eq!(layout.node_key("n1"), "/mesh/nodes/n1");
        assert_eq!(layout.parse("/mesh/nodes/n1"), KeyKind::Node("n1".into()));
        for foreign in [
            "/other/core/Service/shop/web",
            "/mesh/core/Service/web",
            "/mesh/core/Namespace/x/shop",
            "/mesh/discovery.k8s.io/Service/shop/web",
            "/mesh/core/Deployment/shop/web",
            "/mesh/core/Service/shop/web/extra",
            "/mesh/core/Service/shop/",
            "/mesh/nodes/",
        ] {
            assert_eq!(layout.parse(foreign), KeyKind::Unknown, "{foreign}");
        }
    }

    #[test]
    fn prefixes_must_be_absolute() {
        assert!(Layout::new("mesh/").is_err());
        assert!(Layout::new("/").is_err());
        assert!(Layout::new("").is_err());
        assert_eq!(Layout::new("/a/b").expect("ok").prefix(), "/a/b/");
    }
}
