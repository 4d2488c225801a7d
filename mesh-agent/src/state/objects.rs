//! The objects of a source that delivers them one at a time (etcd keys, Kubernetes API
//! objects): each is decoded and validated once, when it changes, and the state is
//! assembled from the decoded objects, so one change among 10,000 objects costs one
//! decode plus the cross-object checks, not 10,000 decodes.

use std::collections::BTreeMap;

use serde_json::Value;

use super::model::{Kind, ObjectKey, State};
use super::source::{Builder, Decoded, decode, doc_error};
use super::{DocError, Origin, StateError};

/// The identity a source's key implies for its object: an etcd key
/// `<prefix><group>/<kind>/<namespace>/<name>` must hold exactly that object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Expected {
    /// The kind.
    pub kind: Kind,
    /// Namespace ("" for cluster-scoped kinds) and name.
    pub key: ObjectKey,
}

/// The last good version of each object of a keyed source, by the source's id for it.
#[derive(Debug, Default)]
pub struct Objects {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Entry {
    origin: Origin,
    decoded: Decoded,
}

impl Objects {
    /// Decodes and validates `json` as the object `id` (from `origin`); on success it
    /// replaces the previous version. On error the previous version, if any, stays in
    /// force and every problem is returned, naming `origin`. A value must hold exactly
    /// one object of a kind the agent uses, and the one `expected` names when given.
    pub fn upsert(
        &mut self,
        id: &str,
        origin: Origin,
        json: &Value,
        expected: Option<&Expected>,
    ) -> Result<(), Vec<DocError>> {
        let mut decoded = Vec::new();
        let mut errors = Vec::new();
        decode(&origin, "", json, false, &mut decoded, &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut decoded = decoded.into_iter();
        let (Some(object), None) = (decoded.next(), decoded.next()) else {
            let message = "must hold exactly one object of a kind this agent uses (not a List)";
            return Err(vec![doc_error(&origin, None, "", message.to_owned())]);
        };
        if let Some(expected) = expected
            && (object.kind != expected.kind || object.key != expected.key)
        {
            let describe = |kind: Kind, key: &ObjectKey| {
                if key.namespace.is_empty() {
                    format!("{kind} {}", key.name)
                } else {
                    format!("{kind} {key}")
                }
            };
            let message = format!(
                "the key names {}, but the value is {}",
                describe(expected.kind, &expected.key),
                describe(object.kind, &object.key)
            );
            let object = describe(object.kind, &object.key);
            return Err(vec![doc_error(&origin, Some(&object), "metadata", message)]);
        }
        self.entries.insert(
            id.to_owned(),
            Entry {
                origin,
                decoded: object,
            },
        );
        Ok(())
    }

    /// Forgets the object `id`; false when there was none.
    pub fn remove(&mut self, id: &str) -> bool {
        self.entries.remove(id).is_some()
    }

    /// How many objects are held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no object is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The state of all objects held, after the checks that span objects (names unique
    /// per kind, no cluster IP used twice); problems name the origins involved.
    pub fn state(&self) -> Result<State, StateError> {
        let mut builder = Builder::default();
        for entry in self.entries.values() {
            builder.insert(&entry.origin, entry.decoded.clone());
        }
        builder.finish()
    }
}

#[cfg(test)]
mod tests;
