//! What the etcd source knows of the keys under its prefix: the last good object of
//! each key, the revision of each key's value as last seen (good or rejected), and the
//! keys whose current value is rejected. Fed with keys, values and revisions, so the
//! revision handling is tested without etcd.

use std::collections::{BTreeMap, BTreeSet};

use tracing::error;

use super::layout::{KeyKind, Layout};
use crate::state::{DocError, Objects, Origin, State, StateError};

/// The keys under one prefix, decoded.
#[derive(Debug)]
pub struct Catalog {
    layout: Layout,
    /// The last good version of each object key.
    objects: Objects,
    /// Each object key's mod revision as last seen: a relist decodes only keys whose
    /// revision differs.
    known: BTreeMap<String, i64>,
    /// Keys whose current value is rejected.
    rejected: BTreeSet<String>,
}

impl Catalog {
    /// An empty catalog of the keys of `layout`.
    pub fn new(layout: Layout) -> Self {
        Self {
            layout,
            objects: Objects::default(),
            known: BTreeMap::new(),
            rejected: BTreeSet::new(),
        }
    }

    /// Takes in `value` of `key`, written at `revision`; whether the objects changed.
    /// Node registrations are not objects; a bad value is rejected (logged, naming the
    /// key) and the key's last good object, if any, stays.
    pub fn put(&mut self, key: &str, value: &[u8], revision: i64) -> bool {
        let expected = match self.layout.parse(key) {
            KeyKind::Node(_) => return false,
            KeyKind::Object(expected) => expected,
            KeyKind::Unknown => {
                error!(
                    key,
                    expected = self.layout.expected_shape(),
                    "object rejected: etcd key outside the mesh's layout"
                );
                self.known.insert(key.to_owned(), revision);
                self.rejected.insert(key.to_owned());
                return self.objects.remove(key);
            }
        };
        self.known.insert(key.to_owned(), revision);
        let origin = Origin::Etcd {
            key: key.to_owned(),
        };
        let result = match serde_json::from_slice(value) {
            Ok(json) => self.objects.upsert(key, origin, &json, Some(&expected)),
            Err(e) => Err(vec![DocError {
                origin,
                line: Some(e.line()),
                object: None,
                field: None,
                message: format!("not JSON: {e}"),
            }]),
        };
        match result {
            Ok(()) => {
                self.rejected.remove(key);
                true
            }
            Err(problems) => {
                for problem in &problems {
                    error!(
                        %problem,
                        "object rejected; its last good version, if any, stays in force"
                    );
                }
                self.rejected.insert(key.to_owned());
                false
            }
        }
    }

    /// Takes in the deletion of `key`; whether the objects changed.
    pub fn delete(&mut self, key: &str) -> bool {
        self.known.remove(key);
        self.rejected.remove(key);
        self.objects.remove(key)
    }

    /// Takes in a complete listing of the prefix (key, value, mod revision): decodes
    /// only keys whose revision changed, forgets keys that are gone. Returns how many
    /// keys were decoded and removed.
    pub fn relist<'a>(
        &mut self,
        listing: impl IntoIterator<Item = (&'a str, &'a [u8], i64)>,
    ) -> (usize, usize) {
        let mut seen = BTreeSet::new();
        let mut decoded = 0;
        for (key, value, revision) in listing {
            if matches!(self.layout.parse(key), KeyKind::Node(_)) {
                continue;
            }
            seen.insert(key.to_owned());
            if self.known.get(key) != Some(&revision) {
                decoded += 1;
                self.put(key, value, revision);
            }
        }
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in &gone {
            self.delete(key);
        }
        (decoded, gone.len())
    }

    /// How many keys hold a rejected value.
    pub fn rejected(&self) -> usize {
        self.rejected.len()
    }

    /// How many objects are in force.
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Whether no object is in force.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// The state of the objects in force.
    pub fn state(&self) -> Result<State, StateError> {
        self.objects.state()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str, port: u32) -> Vec<u8> {
        format!(
            r#"{{"apiVersion":"v1","kind":"Service","metadata":{{"name":"{name}","namespace":"shop"}},"spec":{{"clusterIP":"10.96.0.{}","ports":[{{"port":{port}}}]}}}}"#,
            name.len()
        )
        .into_bytes()
    }

    fn ports(catalog: &Catalog) -> Vec<(String, i32)> {
        let state = catalog.state().expect("state");
        state
            .services()
            .map(|(k, s)| {
                let port = s
                    .spec
                    .as_ref()
                    .and_then(|s| s.ports.as_ref())
                    .map_or(0, |p| p[0].port);
                (k.name.clone(), port)
            })
            .collect()
    }

    fn catalog() -> Catalog {
        Catalog::new(Layout::new("/mesh/").expect("prefix"))
    }

    const A: &str = "/mesh/core/Service/shop/a";
    const BB: &str = "/mesh/core/Service/shop/bb";

    #[test]
    fn a_relist_decodes_only_what_changed_and_forgets_what_is_gone() {
        let mut c = catalog();
        let (a, bb) = (service("a", 80), service("bb", 80));
        assert_eq!(c.relist([(A, &a[..], 5), (BB, &bb[..], 6)]), (2, 0));
        assert_eq!(ports(&c), [("a".into(), 80), ("bb".into(), 80)]);
        // bb unchanged (same revision), a changed, a node key and a new key.
        let a2 = service("a", 81);
        let node = b"{}".to_vec();
        let (decoded, removed) = c.relist([
            (A, &a2[..], 9),
            (BB, &bb[..], 6),
            ("/mesh/nodes/n1", &node[..], 10),
        ]);
        assert_eq!((decoded, removed), (1, 0));
        assert_eq!(ports(&c), [("a".into(), 81), ("bb".into(), 80)]);
        // a gone.
        assert_eq!(c.relist([(BB, &bb[..], 6)]), (0, 1));
        assert_eq!(ports(&c), [("bb".into(), 80)]);
    }

    #[test]
    fn a_rejected_value_keeps_the_last_good_object_until_fixed_or_deleted() {
        let mut c = catalog();
        assert!(c.put(A, &service("a", 80), 2));
        assert!(!c.put(A, &service("a", 70000), 3), "rejected");
        assert_eq!(c.rejected(), 1);
        assert_eq!(ports(&c), [("a".into(), 80)], "the last good version stays");
        assert!(!c.put(A, b"{not json", 4));
        assert_eq!(c.rejected(), 1);
        // The rejected revision is remembered: relisting it does not decode it again.
        let bad = b"{not json".to_vec();
        assert_eq!(c.relist([(A, &bad[..], 4)]), (0, 0));
        assert!(c.put(A, &service("a", 81), 5));
        assert_eq!((c.rejected(), ports(&c)), (0, vec![("a".into(), 81)]));
        assert!(!c.put(A, &service("a", 70000), 6));
        assert!(c.delete(A));
        assert_eq!((c.rejected(), c.len()), (0, 0));
    }

    #[test]
    fn keys_outside_the_layout_and_mismatched_objects_are_rejected() {
        let mut c = catalog();
        assert!(!c.put("/mesh/core/Deployment/shop/a", &service("a", 80), 2));
        assert!(!c.put("/mesh/core/Service/other/a", &service("a", 80), 3));
        assert_eq!((c.rejected(), c.len()), (2, 0));
        assert!(!c.put("/mesh/nodes/n1", b"{}", 4), "nodes are not objects");
        assert_eq!(c.rejected(), 2);
    }
}
