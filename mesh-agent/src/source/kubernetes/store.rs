//! What the API server has said, per watched kind, turned into changes of single
//! objects. A list (the first one, or one after `410 Gone`) is collected aside and
//! compared with what was known once complete, so objects deleted while the agent was
//! disconnected are removed, unchanged ones cost nothing, and a half-done list is never
//! seen. Objects are compared by resourceVersion, which the API server changes with
//! every write.

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use kube::runtime::watcher::Event;
use serde_json::Value;

use super::kinds::{WATCHED, WatchedKind};

/// `(namespace, name)`; namespace "" for cluster-scoped objects.
type Key = (String, String);

/// One object of one watched kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectRef {
    /// The kind.
    pub kind: &'static WatchedKind,
    /// Its namespace, "" for cluster-scoped kinds.
    pub namespace: String,
    /// Its name.
    pub name: String,
}

impl ObjectRef {
    /// A key unique among all watched objects: `Kind/namespace/name`.
    pub fn id(&self) -> String {
        format!("{}/{}/{}", self.kind.kind, self.namespace, self.name)
    }
}

/// A change of one object.
#[derive(Clone, Debug, PartialEq)]
pub enum Change {
    /// New or changed: its JSON as a state document (`apiVersion` and `kind` set).
    Upsert(ObjectRef, Value),
    /// Gone.
    Remove(ObjectRef),
}

#[derive(Debug, Default)]
struct KindObjects {
    /// The resourceVersion of each known object.
    current: BTreeMap<Key, Option<String>>,
    /// A list in progress: the objects listed so far.
    relist: Option<BTreeMap<Key, (Option<String>, Value)>>,
    /// Listed completely at least once (or found not installed).
    synced: bool,
}

/// The objects of every watched kind ([`WATCHED`], by index).
#[derive(Debug)]
pub struct Store {
    kinds: Vec<KindObjects>,
}

impl Default for Store {
    fn default() -> Self {
        Self {
            kinds: WATCHED.iter().map(|_| KindObjects::default()).collect(),
        }
    }
}

impl Store {
    /// Applies one watcher event of the kind `WATCHED[index]` and returns the object
    /// changes it makes (none while a list is in progress; all of them when it
    /// completes).
    pub fn apply(&mut self, index: usize, event: Event<DynamicObject>) -> Vec<Change> {
        let kind = &WATCHED[index];
        let objects = &mut self.kinds[index];
        match event {
            Event::Init => {
                objects.relist = Some(BTreeMap::new());
                Vec::new()
            }
            Event::InitApply(object) => {
                if let Some((key, version, json)) = to_json(kind, object) {
                    objects
                        .relist
                        .get_or_insert_default()
                        .insert(key, (version, json));
                }
                Vec::new()
            }
            Event::InitDone => {
                let listed = objects.relist.take().unwrap_or_default();
                objects.synced = true;
                let mut changes: Vec<Change> = objects
                    .current
                    .keys()
                    .filter(|key| !listed.contains_key(*key))
                    .map(|key| Change::Remove(object_ref(kind, key)))
                    .collect();
                let mut current = BTreeMap::new();
                for (key, (version, json)) in listed {
                    if !unchanged(objects.current.get(&key), &version) {
                        changes.push(Change::Upsert(object_ref(kind, &key), json));
                    }
                    current.insert(key, version);
                }
                objects.current = current;
                changes
            }
            Event::Apply(object) => {
                let Some((key, version, json)) = to_json(kind, object) else {
                    return Vec::new();
                };
                if unchanged(objects.current.get(&key), &version) {
                    // A resync brings the same version again.
                    return Vec::new();
                }
                let change = Change::Upsert(object_ref(kind, &key), json);
                objects.current.insert(key, version);
                vec![change]
            }
            Event::Delete(object) => {
                let Some((key, _, _)) = to_json(kind, object) else {
                    return Vec::new();
                };
                match objects.current.remove(&key) {
                    Some(_) => vec![Change::Remove(object_ref(kind, &key))],
                    None => Vec::new(),
                }
            }
        }
    }

    /// The kind `WATCHED[index]` is not served (its CustomResourceDefinition is not
    /// installed): it has no objects.
    pub fn absent(&mut self, index: usize) -> Vec<Change> {
        let kind = &WATCHED[index];
        let objects = &mut self.kinds[index];
        objects.synced = true;
        objects.relist = None;
        std::mem::take(&mut objects.current)
            .into_keys()
            .map(|key| Change::Remove(object_ref(kind, &key)))
            .collect()
    }

    /// Whether every kind has been listed completely: before that a state would miss
    /// objects (Services without their endpoints), so none is made.
    pub fn synced(&self) -> bool {
        self.kinds.iter().all(|k| k.synced)
    }

    /// The kinds not listed completely yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        WATCHED
            .iter()
            .zip(&self.kinds)
            .filter(|(_, k)| !k.synced)
            .map(|(kind, _)| kind.kind)
            .collect()
    }
}

/// Whether an object at `version` is the one already known.
fn unchanged(known: Option<&Option<String>>, version: &Option<String>) -> bool {
    matches!((known, version), (Some(Some(known)), Some(version)) if known == version)
}

fn object_ref(kind: &'static WatchedKind, (namespace, name): &Key) -> ObjectRef {
    ObjectRef {
        kind,
        namespace: namespace.clone(),
        name: name.clone(),
    }
}

/// The object's key, resourceVersion and JSON as a state document: `apiVersion` and
/// `kind` filled in (list items come without them), and `metadata.managedFields`
/// dropped (server-side apply bookkeeping, often larger than the object, never read).
/// None for an object without a name, which the API server never sends.
fn to_json(kind: &WatchedKind, mut object: DynamicObject) -> Option<(Key, Option<String>, Value)> {
    let name = object.metadata.name.clone().filter(|n| !n.is_empty())?;
    let namespace = if kind.namespaced {
        object.metadata.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    let version = object.metadata.resource_version.clone();
    object.metadata.managed_fields = None;
    let mut json = serde_json::to_value(&object).ok()?;
    let map = json.as_object_mut()?;
    map.insert("apiVersion".into(), Value::String(kind.api_version()));
    map.insert("kind".into(), Value::String(kind.kind.to_owned()));
    Some(((namespace, name), version, json))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SERVICE: usize = 0;
    const NAMESPACE: usize = 3;

    fn object(value: Value) -> DynamicObject {
        serde_json::from_value(value).unwrap()
    }

    fn service(name: &str, version: &str) -> DynamicObject {
        object(json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": version,
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": "10.96.0.1"},
        }))
    }

    /// The changes as `+id@version` and `-id`.
    fn summary(changes: &[Change]) -> Vec<String> {
        changes
            .iter()
            .map(|c| match c {
                Change::Upsert(r, json) => {
                    format!("+{}@{}", r.id(), json["metadata"]["resourceVersion"])
                }
                Change::Remove(r) => format!("-{}", r.id()),
            })
            .collect()
    }

    /// Marks every kind but Service listed (empty), as if their lists came back.
    fn others_synced(store: &mut Store) {
        for i in 1..WATCHED.len() {
            store.apply(i, Event::Init);
            assert!(store.apply(i, Event::InitDone).is_empty());
        }
    }

    #[test]
    fn list_then_watch_events() {
        let mut store = Store::default();
        others_synced(&mut store);
        assert!(!store.synced());
        assert_eq!(store.unsynced(), ["Service"]);
        assert!(store.apply(SERVICE, Event::Init).is_empty());
        assert!(
            store
                .apply(SERVICE, Event::InitApply(service("a", "1")))
                .is_empty(),
            "a list in progress changes nothing yet"
        );
        let changes = store.apply(SERVICE, Event::InitDone);
        assert!(store.synced());
        let Change::Upsert(r, json) = &changes[0] else {
            panic!("{changes:?}")
        };
        assert_eq!(
            (r.kind.kind, r.namespace.as_str(), r.name.as_str()),
            ("Service", "default", "a")
        );
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["kind"], "Service");
        assert_eq!(json["spec"]["clusterIP"], "10.96.0.1");
        assert!(json["metadata"].get("managedFields").is_none());

        let apply = |store: &mut Store, e| summary(&store.apply(SERVICE, e));
        assert_eq!(
            apply(&mut store, Event::Apply(service("b", "2"))),
            ["+Service/default/b@\"2\""]
        );
        assert!(
            apply(&mut store, Event::Apply(service("b", "2"))).is_empty(),
            "same version"
        );
        assert_eq!(
            apply(&mut store, Event::Apply(service("b", "3"))),
            ["+Service/default/b@\"3\""]
        );
        assert_eq!(
            apply(&mut store, Event::Delete(service("a", "4"))),
            ["-Service/default/a"]
        );
        assert!(apply(&mut store, Event::Delete(service("a", "4"))).is_empty());
    }

    #[test]
    fn relist_yields_only_differences_and_removes_what_was_deleted_meanwhile() {
        let mut store = Store::default();
        others_synced(&mut store);
        store.apply(SERVICE, Event::Init);
        store.apply(SERVICE, Event::InitApply(service("a", "1")));
        store.apply(SERVICE, Event::InitApply(service("b", "2")));
        store.apply(SERVICE, Event::InitApply(service("c", "3")));
        assert_eq!(store.apply(SERVICE, Event::InitDone).len(), 3);
        // A relist after 410 Gone: "a" was deleted and "b" changed while the watch was
        // down; "c" is as it was.
        store.apply(SERVICE, Event::Init);
        store.apply(SERVICE, Event::InitApply(service("b", "5")));
        store.apply(SERVICE, Event::InitApply(service("c", "3")));
        store.apply(SERVICE, Event::InitApply(service("d", "6")));
        assert_eq!(
            summary(&store.apply(SERVICE, Event::InitDone)),
            [
                "-Service/default/a",
                "+Service/default/b@\"5\"",
                "+Service/default/d@\"6\""
            ]
        );
        // A failed list restarts with a new Init: the partial one is thrown away.
        store.apply(SERVICE, Event::Init);
        store.apply(SERVICE, Event::InitApply(service("x", "7")));
        store.apply(SERVICE, Event::Init);
        for (name, version) in [("b", "5"), ("c", "3"), ("d", "6")] {
            store.apply(SERVICE, Event::InitApply(service(name, version)));
        }
        assert!(store.apply(SERVICE, Event::InitDone).is_empty());
    }

    #[test]
    fn cluster_scoped_and_absent_kinds() {
        let mut store = Store::default();
        store.apply(NAMESPACE, Event::Init);
        store.apply(
            NAMESPACE,
            Event::InitApply(object(
                json!({"metadata": {"name": "prod", "resourceVersion": "1"}}),
            )),
        );
        assert_eq!(
            summary(&store.apply(NAMESPACE, Event::InitDone)),
            ["+Namespace//prod@\"1\""]
        );
        let route = WATCHED.iter().position(|k| k.kind == "HTTPRoute").unwrap();
        store.apply(
            route,
            Event::Apply(object(
                json!({"metadata": {"name": "r", "namespace": "a", "resourceVersion": "2"}}),
            )),
        );
        // The CRD was removed: its objects go.
        assert_eq!(summary(&store.absent(route)), ["-HTTPRoute/a/r"]);
        assert!(
            store.absent(route).is_empty(),
            "still absent: nothing changes"
        );
        assert!(!store.unsynced().contains(&"HTTPRoute"));
        // Nameless objects are ignored rather than keyed by "".
        assert!(
            store
                .apply(NAMESPACE, Event::Apply(object(json!({"metadata": {}}))))
                .is_empty()
        );
    }
}
