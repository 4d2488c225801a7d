//! `mesh-agent apply`, `delete`, `get` and `nodes`: the mesh's objects and the live
//! nodes in etcd (layout: [`crate::source::etcd::layout`]). `apply` validates every
//! object alone and together with what etcd already holds before it writes anything,
//! then writes them in one transaction: all or nothing.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use etcd_client::{Client, Compare, CompareOp, GetOptions, Txn, TxnOp};

use crate::{
    source::etcd::{
        EtcdConfig,
        connect::{self, NoMember},
        layout::{KeyKind, Layout, NodeRecord},
    },
    state::{self, Kind, ObjectKey},
};

/// How often `--wait` looks at the nodes again.
const WAIT_POLL: Duration = Duration::from_millis(200);

/// A connected client and the layout.
pub struct Store {
    client: Client,
    layout: Layout,
}

/// What `apply` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Applied {
    /// One line per object: `Service shop/web created`.
    pub lines: Vec<String>,
    /// The revision that holds every object, for `--wait`.
    pub revision: i64,
}

impl Store {
    /// Connects to the cluster `config` names, trying its members from the
    /// `start`th.
    pub async fn connect(config: &EtcdConfig, start: usize) -> anyhow::Result<Self> {
        let options = config.options()?;
        Ok(Self {
            client: config.connect(&options, start).await?,
            layout: config.layout.clone(),
        })
    }

    /// `apply -f PATH`: validates the objects of the files at `path` alone and together
    /// (as `--state` would), checks that their cluster IPs are not taken by Services
    /// already in etcd, then writes the new and changed ones in one transaction that
    /// fails if any of their keys changed since they were read. Reads only the kinds
    /// being written, and decodes none of what etcd holds but those Services' cluster
    /// IPs: the cost follows what is applied more than what is stored.
    pub async fn apply(&mut self, path: &Path) -> anyhow::Result<Applied> {
        let objects = state::read_objects(path).map_err(|e| anyhow::anyhow!("{e}"))?;
        let kinds: BTreeSet<Kind> = objects.iter().map(|o| o.kind).collect();
        let mut current: BTreeMap<String, (Vec<u8>, i64)> = BTreeMap::new();
        for kind in kinds {
            let prefix = self.layout.kind_prefix(kind);
            let (listing, _) = connect::list(&mut self.client, &prefix)
                .await
                .with_context(|| format!("reading {prefix}"))?;
            for kv in listing {
                if let Ok(key) = kv.key_str() {
                    current.insert(key.to_owned(), (kv.value().to_vec(), kv.mod_revision()));
                }
            }
        }
        let mut writes = Vec::new();
        let mut lines = Vec::new();
        let mut newest_unchanged = 0;
        let mut taken = BTreeMap::new();
        for object in &objects {
            let key = self.layout.object_key(object.kind, &object.key);
            let name = describe(object.kind, &object.key);
            let stored = current.get(&key);
            let verb = match stored {
                Some((value, revision)) if same_json(value, &object.json) => {
                    newest_unchanged = newest_unchanged.max(*revision);
                    "unchanged"
                }
                Some(_) => "configured",
                None => "created",
            };
            lines.push(format!("{name} {verb}"));
            if object.kind == Kind::Service {
                for ip in json_cluster_ips(&object.json) {
                    taken.insert(ip, object);
                }
            }
            if verb != "unchanged" {
                let value = serde_json::to_vec(&object.json).context("encoding an object")?;
                writes.push((key, value, stored.map(|(_, revision)| *revision)));
            }
        }
        let applied: BTreeSet<String> = objects
            .iter()
            .map(|o| self.layout.object_key(o.kind, &o.key))
            .collect();
        let mut conflicts = Vec::new();
        let service_prefix = self.layout.kind_prefix(Kind::Service);
        for (key, (value, _)) in current.range(service_prefix.clone()..) {
            if !key.starts_with(&service_prefix) {
                break;
            }
            let Ok(json) = serde_json::from_slice::<serde_json::Value>(value) else {
                continue;
            };
            for ip in json_cluster_ips(&json) {
                // A Service this apply rewrites gives up its old cluster IPs.
                if let Some(object) = taken.get(&ip)
                    && !applied.contains(key)
                {
                    let field = |pointer| {
                        json.pointer(pointer)
                            .and_then(serde_json::Value::as_str)
                            .unwrap_or_default()
                    };
                    let owner = format!(
                        "{}/{}",
                        field("/metadata/namespace"),
                        field("/metadata/name")
                    );
                    conflicts.push(state::DocError {
                        origin: object.origin.clone(),
                        line: None,
                        object: Some(describe(object.kind, &object.key)),
                        field: Some("spec.clusterIP".into()),
                        message: format!(
                            "cluster IP {ip} is already used by Service {owner} (etcd key {key})"
                        ),
                    });
                }
            }
        }
        if !conflicts.is_empty() {
            let lines: Vec<String> = conflicts.iter().map(ToString::to_string).collect();
            bail!(
                "{}\nnothing was written: the objects conflict with those in etcd",
                lines.join("\n")
            );
        }
        if writes.is_empty() {
            return Ok(Applied {
                lines,
                revision: newest_unchanged,
            });
        }
        // Each key as it was read: the same revision, or still absent.
        let compares: Vec<Compare> = writes
            .iter()
            .map(|(key, _, read)| match read {
                Some(revision) => Compare::mod_revision(key.as_str(), CompareOp::Equal, *revision),
                None => Compare::version(key.as_str(), CompareOp::Equal, 0),
            })
            .collect();
        let puts: Vec<TxnOp> = writes
            .into_iter()
            .map(|(key, value, _)| TxnOp::put(key, value, None))
            .collect();
        let count = puts.len();
        let response = self
            .client
            .txn(Txn::new().when(compares).and_then(puts))
            .await
            .with_context(|| {
                format!(
                    "writing {count} objects in one etcd transaction (a member's --max-txn-ops \
                     and --max-request-bytes bound one transaction)"
                )
            })?;
        if !response.succeeded() {
            bail!(
                "objects changed in etcd while they were validated; nothing was written: apply again"
            );
        }
        Ok(Applied {
            lines,
            revision: response.header().map_or(0, |h| h.revision()),
        })
    }

    /// `delete KIND NAME`: removes one object; returns the revision of the deletion.
    pub async fn delete(&mut self, kind: Kind, key: &ObjectKey) -> anyhow::Result<i64> {
        let etcd_key = self.layout.object_key(kind, key);
        let response = self
            .client
            .delete(etcd_key.as_str(), None)
            .await
            .with_context(|| format!("deleting {etcd_key}"))?;
        if response.deleted() == 0 {
            bail!("{} not found (no key {etcd_key})", describe(kind, key));
        }
        Ok(response.header().map_or(0, |h| h.revision()))
    }

    /// `get KIND [NAME]`: one object's JSON, or one line per object of the kind.
    pub async fn get(&mut self, kind: Kind, key: Option<&ObjectKey>) -> anyhow::Result<String> {
        if let Some(key) = key {
            let etcd_key = self.layout.object_key(kind, key);
            let response = self
                .client
                .get(etcd_key.as_str(), None)
                .await
                .with_context(|| format!("reading {etcd_key}"))?;
            let Some(kv) = response.kvs().first() else {
                bail!("{} not found (no key {etcd_key})", describe(kind, key));
            };
            let json: serde_json::Value = serde_json::from_slice(kv.value())
                .with_context(|| format!("etcd key {etcd_key} does not hold JSON"))?;
            return Ok(serde_json::to_string_pretty(&json)? + "\n");
        }
        let prefix = self.layout.kind_prefix(kind);
        let response = self
            .client
            .get(
                prefix.as_str(),
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await
            .with_context(|| format!("reading {prefix}"))?;
        let mut out = String::new();
        if kind.cluster_scoped() {
            let _ = writeln!(out, "{:<40} {:>10}", "NAME", "REVISION");
        } else {
            let _ = writeln!(out, "{:<20} {:<40} {:>10}", "NAMESPACE", "NAME", "REVISION");
        }
        for kv in response.kvs() {
            let Ok(k) = kv.key_str() else { continue };
            let KeyKind::Object(found) = self.layout.parse(k) else {
                continue;
            };
            let (ns, name) = (&found.key.namespace, &found.key.name);
            if kind.cluster_scoped() {
                let _ = writeln!(out, "{name:<40} {:>10}", kv.mod_revision());
            } else {
                let _ = writeln!(out, "{ns:<20} {name:<40} {:>10}", kv.mod_revision());
            }
        }
        Ok(out)
    }

    /// The live nodes' registrations, by node, and the store's current revision.
    pub async fn nodes(&mut self) -> anyhow::Result<(BTreeMap<String, NodeRecord>, i64)> {
        let prefix = self.layout.nodes_prefix();
        let response = self
            .client
            .get(prefix.as_str(), Some(GetOptions::new().with_prefix()))
            .await
            .context("reading the nodes")?;
        let mut nodes = BTreeMap::new();
        for kv in response.kvs() {
            let Ok(key) = kv.key_str() else { continue };
            let KeyKind::Node(node) = self.layout.parse(key) else {
                continue;
            };
            match serde_json::from_slice::<NodeRecord>(kv.value()) {
                Ok(record) => _ = nodes.insert(node, record),
                Err(e) => tracing::warn!(key, %e, "unreadable node registration"),
            }
        }
        Ok((nodes, response.header().map_or(0, |h| h.revision())))
    }

    /// Waits until every live node applied `revision`; fails after `timeout` naming the
    /// nodes behind. Returns the nodes that were waited for.
    pub async fn wait(&mut self, revision: i64, timeout: Duration) -> anyhow::Result<Vec<String>> {
        let deadline = Instant::now() + timeout;
        let revision = u64::try_from(revision).unwrap_or(0);
        loop {
            let (nodes, _) = self.nodes().await?;
            let behind: Vec<String> = nodes
                .values()
                .filter(|n| n.applied_revision < revision)
                .map(|n| format!("{} (at {})", n.node, n.applied_revision))
                .collect();
            if behind.is_empty() {
                return Ok(nodes.into_keys().collect());
            }
            if Instant::now() >= deadline {
                bail!(
                    "not every node applied revision {revision} within {timeout:?}: {}",
                    behind.join(", ")
                );
            }
            tokio::time::sleep(WAIT_POLL).await;
        }
    }
}

/// Whether `err` is etcd being briefly unavailable (a member gone, a leader election),
/// worth trying again on another member.
pub fn transient(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<etcd_client::Error>() {
            return match e {
                etcd_client::Error::GRpcStatus(status) => matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::DeadlineExceeded
                ),
                etcd_client::Error::TransportError(_) => true,
                _ => false,
            };
        }
        cause.downcast_ref::<NoMember>().is_some()
    })
}

/// The cluster IPs of a Service's JSON, as the state reads them
/// ([`state::cluster_ips`]); none when it does not parse.
fn json_cluster_ips(json: &serde_json::Value) -> Vec<std::net::IpAddr> {
    serde_json::from_value::<k8s_openapi::api::core::v1::Service>(json.clone())
        .map(|svc| state::cluster_ips(&svc))
        .unwrap_or_default()
}

/// `nodes` as a table.
pub fn render_nodes(nodes: &BTreeMap<String, NodeRecord>, revision: i64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "store revision {revision}, {} live nodes", nodes.len());
    let _ = writeln!(
        out,
        "{:<24} {:>16} {:<10} ADDRESSES",
        "NODE", "APPLIED-REVISION", "VERSION"
    );
    for n in nodes.values() {
        let addresses: Vec<String> = n.addresses.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "{:<24} {:>16} {:<10} {}",
            n.node,
            n.applied_revision,
            n.agent_version,
            addresses.join(",")
        );
    }
    out
}

/// `Service shop/web`, `Namespace shop`.
fn describe(kind: Kind, key: &ObjectKey) -> String {
    if kind.cluster_scoped() {
        format!("{kind} {}", key.name)
    } else {
        format!("{kind} {key}")
    }
}

/// Whether a stored value is the same JSON as `json`.
fn same_json(stored: &[u8], json: &serde_json::Value) -> bool {
    serde_json::from_slice::<serde_json::Value>(stored).is_ok_and(|s| &s == json)
}

/// `NAMESPACE/NAME` for namespaced kinds, `NAME` for cluster-scoped ones.
pub fn object_key(kind: Kind, name: &str) -> anyhow::Result<ObjectKey> {
    let parts: Vec<&str> = name.split('/').collect();
    match (kind.cluster_scoped(), parts.as_slice()) {
        (true, &[name]) if !name.is_empty() => Ok(ObjectKey {
            namespace: String::new(),
            name: name.to_owned(),
        }),
        (false, &[ns, name]) if !ns.is_empty() && !name.is_empty() => Ok(ObjectKey {
            namespace: ns.to_owned(),
            name: name.to_owned(),
        }),
        (true, _) => bail!("{name:?}: {kind} is cluster-scoped, use NAME"),
        (false, _) => bail!("{name:?}: use NAMESPACE/NAME"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_kind_scope() {
        assert_eq!(
            object_key(Kind::Service, "shop/web").expect("ok"),
            ObjectKey {
                namespace: "shop".into(),
                name: "web".into()
            }
        );
        assert!(object_key(Kind::Service, "web").is_err());
        assert!(object_key(Kind::Namespace, "shop/web").is_err());
        assert_eq!(
            object_key(Kind::Namespace, "shop").expect("ok").name,
            "shop"
        );
    }

    #[test]
    fn kinds_parse_as_kubectl_spells_them() {
        for (name, kind) in [
            ("Service", Kind::Service),
            ("services", Kind::Service),
            ("svc", Kind::Service),
            ("networkpolicies", Kind::NetworkPolicy),
            ("netpol", Kind::NetworkPolicy),
            ("httproute", Kind::HttpRoute),
            ("authorizationpolicies", Kind::AuthorizationPolicy),
            ("ns", Kind::Namespace),
            ("endpointslices", Kind::EndpointSlice),
        ] {
            assert_eq!(Kind::parse(name), Some(kind), "{name}");
        }
        assert_eq!(Kind::parse("deployment"), None);
    }

    #[test]
    fn the_nodes_table_shows_each_applied_revision() {
        let mut nodes = BTreeMap::new();
        nodes.insert(
            "n1".to_owned(),
            NodeRecord {
                node: "n1".into(),
                addresses: vec!["192.168.250.1".parse().expect("ip")],
                agent_version: "0.1.0".into(),
                applied_revision: 42,
            },
        );
        let text = render_nodes(&nodes, 43);
        assert!(
            text.starts_with("store revision 43, 1 live nodes\n"),
            "{text}"
        );
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>()
                    == ["n1", "42", "0.1.0", "192.168.250.1"]),
            "{text}"
        );
    }
}
