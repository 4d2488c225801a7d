//! What the API server has said, per watched kind: the objects of the last complete
//! list, kept up to date by watch events. A relist (the first list, or one after a
//! `410 Gone`) is collected aside and swapped in whole once complete, so objects
//! deleted while the agent was disconnected disappear, and a half-done list is never
//! seen.

use std::collections::BTreeMap;

use kube::core::DynamicObject;
use kube::runtime::watcher::Event;
use serde_json::Value;

use super::kinds::{WATCHED, WatchedKind};

/// `(namespace, name)`; namespace "" for cluster-scoped objects.
type Key = (String, String);

/// One object as the state parser takes it: its JSON, and where it came from.
#[derive(Clone, Debug, PartialEq)]
pub struct SourcedObject {
    /// `Kind namespace/name (kubernetes)`, or `Kind name (kubernetes)` when
    /// cluster-scoped: how problems with it are reported.
    pub origin: String,
    /// The object, with `apiVersion` and `kind` set (list items come without them).
    pub json: Value,
}

#[derive(Debug, Default)]
struct KindObjects {
    current: BTreeMap<Key, Value>,
    /// A list in progress: the objects listed so far.
    relist: Option<BTreeMap<Key, Value>>,
    /// Listed completely at least once (or found not installed).
    synced: bool,
}

/// The objects of every watched kind ([`WATCHED`], by index).
#[derive(Debug)]
pub struct Objects {
    kinds: Vec<KindObjects>,
}

impl Default for Objects {
    fn default() -> Self {
        Self {
            kinds: WATCHED.iter().map(|_| KindObjects::default()).collect(),
        }
    }
}

impl Objects {
    /// Applies one watcher event of the kind `WATCHED[index]`; returns whether what
    /// [`Objects::snapshot`] shows changed (a completed list that brought nothing new
    /// did not change it).
    pub fn apply(&mut self, index: usize, event: Event<DynamicObject>) -> bool {
        let kind = &WATCHED[index];
        let objects = &mut self.kinds[index];
        match event {
            Event::Init => {
                objects.relist = Some(BTreeMap::new());
                false
            }
            Event::InitApply(object) => {
                let Some((key, json)) = to_json(kind, object) else {
                    return false;
                };
                objects.relist.get_or_insert_default().insert(key, json);
                false
            }
            Event::InitDone => {
                let listed = objects.relist.take().unwrap_or_default();
                let changed = !objects.synced || listed != objects.current;
                objects.current = listed;
                objects.synced = true;
                changed
            }
            Event::Apply(object) => {
                let Some((key, json)) = to_json(kind, object) else {
                    return false;
                };
                // A resync or a no-op update brings the same object again.
                objects.current.insert(key, json.clone()) != Some(json)
            }
            Event::Delete(object) => {
                let Some((key, _)) = to_json(kind, object) else {
                    return false;
                };
                objects.current.remove(&key).is_some()
            }
        }
    }

    /// The kind `WATCHED[index]` is not served (its CustomResourceDefinition is not
    /// installed): it has no objects. Returns whether that changed anything.
    pub fn absent(&mut self, index: usize) -> bool {
        let objects = &mut self.kinds[index];
        let changed = !objects.synced || !objects.current.is_empty();
        objects.current.clear();
        objects.relist = None;
        objects.synced = true;
        changed
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

    /// Every object, by kind (in [`WATCHED`] order), namespace and name.
    pub fn snapshot(&self) -> Vec<SourcedObject> {
        WATCHED
            .iter()
            .zip(&self.kinds)
            .flat_map(|(kind, objects)| {
                objects
                    .current
                    .iter()
                    .map(|((namespace, name), json)| SourcedObject {
                        origin: origin(kind, namespace, name),
                        json: json.clone(),
                    })
            })
            .collect()
    }

    /// Number of objects of every kind.
    pub fn len(&self) -> usize {
        self.kinds.iter().map(|k| k.current.len()).sum()
    }

    /// Whether there are no objects at all.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How an object is named in messages: `Kind namespace/name (kubernetes)`.
pub fn origin(kind: &WatchedKind, namespace: &str, name: &str) -> String {
    if kind.namespaced {
        format!("{} {namespace}/{name} (kubernetes)", kind.kind)
    } else {
        format!("{} {name} (kubernetes)", kind.kind)
    }
}

/// The object's key and JSON as a state document: `apiVersion` and `kind` filled in,
/// and `metadata.managedFields` dropped (server-side apply bookkeeping, often larger
/// than the object, and never read). None for an object without a name, which the API
/// server never sends.
fn to_json(kind: &WatchedKind, mut object: DynamicObject) -> Option<(Key, Value)> {
    let name = object.metadata.name.clone().filter(|n| !n.is_empty())?;
    let namespace = if kind.namespaced {
        object.metadata.namespace.clone().unwrap_or_default()
    } else {
        String::new()
    };
    object.metadata.managed_fields = None;
    let mut json = serde_json::to_value(&object).ok()?;
    let map = json.as_object_mut()?;
    map.insert("apiVersion".into(), Value::String(kind.api_version()));
    map.insert("kind".into(), Value::String(kind.kind.to_owned()));
    Some(((namespace, name), json))
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

    fn service(name: &str, ip: &str) -> DynamicObject {
        object(json!({
            "metadata": {"name": name, "namespace": "default", "resourceVersion": "7",
                         "managedFields": [{"manager": "kubectl"}]},
            "spec": {"clusterIP": ip},
        }))
    }

    fn names(objects: &Objects) -> Vec<String> {
        objects.snapshot().into_iter().map(|o| o.origin).collect()
    }

    /// Marks every kind but Service listed (empty), as if their lists came back.
    fn others_synced(objects: &mut Objects) {
        for i in 1..WATCHED.len() {
            objects.apply(i, Event::Init);
            objects.apply(i, Event::InitDone);
        }
    }

    #[test]
    fn list_then_watch_events() {
        let mut objects = Objects::default();
        others_synced(&mut objects);
        assert!(!objects.synced());
        assert_eq!(objects.unsynced(), ["Service"]);
        assert!(!objects.apply(SERVICE, Event::Init));
        assert!(!objects.apply(SERVICE, Event::InitApply(service("a", "10.96.0.1"))));
        assert!(
            objects.snapshot().is_empty(),
            "a list in progress is not shown"
        );
        assert!(objects.apply(SERVICE, Event::InitDone));
        assert!(objects.synced());
        let snapshot = objects.snapshot();
        assert_eq!(snapshot[0].origin, "Service default/a (kubernetes)");
        assert_eq!(snapshot[0].json["apiVersion"], "v1");
        assert_eq!(snapshot[0].json["kind"], "Service");
        assert_eq!(snapshot[0].json["spec"]["clusterIP"], "10.96.0.1");
        assert_eq!(snapshot[0].json["metadata"]["resourceVersion"], "7");
        assert!(snapshot[0].json["metadata"].get("managedFields").is_none());

        assert!(objects.apply(SERVICE, Event::Apply(service("b", "10.96.0.2"))));
        assert!(!objects.apply(SERVICE, Event::Apply(service("b", "10.96.0.2"))));
        assert!(objects.apply(SERVICE, Event::Apply(service("b", "10.96.0.3"))));
        assert!(objects.apply(SERVICE, Event::Delete(service("a", "10.96.0.1"))));
        assert!(!objects.apply(SERVICE, Event::Delete(service("a", "10.96.0.1"))));
        assert_eq!(names(&objects), ["Service default/b (kubernetes)"]);
    }

    #[test]
    fn relist_replaces_whole_and_drops_what_was_deleted_meanwhile() {
        let mut objects = Objects::default();
        others_synced(&mut objects);
        objects.apply(SERVICE, Event::Init);
        objects.apply(SERVICE, Event::InitApply(service("a", "10.96.0.1")));
        objects.apply(SERVICE, Event::InitApply(service("b", "10.96.0.2")));
        objects.apply(SERVICE, Event::InitDone);
        // A relist after 410 Gone: "a" was deleted while the watch was down.
        objects.apply(SERVICE, Event::Init);
        objects.apply(SERVICE, Event::InitApply(service("b", "10.96.0.2")));
        assert_eq!(
            objects.len(),
            2,
            "the old objects stay until the list is complete"
        );
        assert!(objects.apply(SERVICE, Event::InitDone));
        assert_eq!(names(&objects), ["Service default/b (kubernetes)"]);
        // The same list again changes nothing.
        objects.apply(SERVICE, Event::Init);
        objects.apply(SERVICE, Event::InitApply(service("b", "10.96.0.2")));
        assert!(!objects.apply(SERVICE, Event::InitDone));
        // A failed list restarts with a new Init: the partial one is thrown away.
        objects.apply(SERVICE, Event::Init);
        objects.apply(SERVICE, Event::InitApply(service("c", "10.96.0.3")));
        objects.apply(SERVICE, Event::Init);
        objects.apply(SERVICE, Event::InitApply(service("b", "10.96.0.2")));
        assert!(!objects.apply(SERVICE, Event::InitDone));
        assert_eq!(names(&objects), ["Service default/b (kubernetes)"]);
    }

    #[test]
    fn cluster_scoped_and_absent_kinds() {
        let mut objects = Objects::default();
        objects.apply(NAMESPACE, Event::Init);
        objects.apply(
            NAMESPACE,
            Event::InitApply(object(json!({"metadata": {"name": "prod"}}))),
        );
        objects.apply(NAMESPACE, Event::InitDone);
        assert_eq!(names(&objects), ["Namespace prod (kubernetes)"]);
        let route = WATCHED.iter().position(|k| k.kind == "HTTPRoute").unwrap();
        assert!(objects.absent(route));
        assert!(!objects.absent(route), "still absent: nothing changed");
        assert!(!objects.unsynced().contains(&"HTTPRoute"));
        // Nameless objects are ignored rather than keyed by "".
        assert!(!objects.apply(NAMESPACE, Event::Apply(object(json!({"metadata": {}})))));
    }
}
