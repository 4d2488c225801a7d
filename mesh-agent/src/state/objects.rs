//! The objects of a source that delivers them one at a time (etcd keys, Kubernetes API
//! objects): each is decoded and validated once, when it changes, and the state is
//! kept assembled, patched object by object, with the cross-object checks (one
//! definition per object, one Service per cluster IP) kept up to date the same way. So
//! one change among 10,000 objects costs one decode and a few map updates, not 10,000
//! decodes or a rebuild.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use serde_json::Value;

use super::model::{Kind, ObjectKey, State, cluster_ips};
use super::source::{Decoded, Object, decode, doc_error};
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

/// The last good version of each object of a keyed source, by the source's id for it,
/// and the state they make together.
#[derive(Debug, Default)]
pub struct Objects {
    entries: BTreeMap<String, Entry>,
    /// Each object's identity → the ids holding it; more than one is a duplicate.
    places: BTreeMap<(Kind, ObjectKey), BTreeSet<String>>,
    /// Identities held by more than one id.
    duplicates: BTreeSet<(Kind, ObjectKey)>,
    /// Each cluster IP of the state's Services → the Services claiming it.
    claims: BTreeMap<IpAddr, BTreeSet<ObjectKey>>,
    /// Cluster IPs claimed by more than one Service.
    conflicts: BTreeSet<IpAddr>,
    /// Every identity's object, from the first id (in id order) holding it.
    state: State,
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
        self.remove(id);
        let identity = (object.kind, object.key.clone());
        self.entries.insert(
            id.to_owned(),
            Entry {
                origin,
                decoded: object,
            },
        );
        let ids = self.places.entry(identity.clone()).or_default();
        ids.insert(id.to_owned());
        if ids.len() > 1 {
            self.duplicates.insert(identity.clone());
        }
        if ids.first().map(String::as_str) == Some(id) {
            self.show(&identity, Some(id));
        }
        Ok(())
    }

    /// Forgets the object `id`; false when there was none.
    pub fn remove(&mut self, id: &str) -> bool {
        let Some(entry) = self.entries.remove(id) else {
            return false;
        };
        let identity = (entry.decoded.kind, entry.decoded.key);
        let Some(ids) = self.places.get_mut(&identity) else {
            return true;
        };
        let shown = ids.first().map(String::as_str) == Some(id);
        ids.remove(id);
        if ids.len() < 2 {
            self.duplicates.remove(&identity);
        }
        let next = ids.first().cloned();
        if next.is_none() {
            self.places.remove(&identity);
        }
        if shown {
            self.show(&identity, next.as_deref());
        }
        true
    }

    /// Puts the object of `id` in the state as `identity`, replacing what was there, or
    /// takes `identity` out of it (`None`), keeping the cluster IP claims up to date.
    fn show(&mut self, identity: &(Kind, ObjectKey), id: Option<&str>) {
        let (kind, key) = identity;
        if *kind == Kind::Service
            && let Some(old) = self.state.service(key)
        {
            for ip in cluster_ips(old) {
                if let Some(claims) = self.claims.get_mut(&ip) {
                    claims.remove(key);
                    match claims.len() {
                        0 => _ = self.claims.remove(&ip),
                        1 => _ = self.conflicts.remove(&ip),
                        _ => {}
                    }
                }
            }
        }
        let object = id
            .and_then(|id| self.entries.get(id))
            .map(|e| e.decoded.object.clone());
        let Some(object) = object else {
            self.state.take(*kind, key);
            return;
        };
        if let Object::Service(svc) = &object {
            for ip in cluster_ips(svc) {
                let claims = self.claims.entry(ip).or_default();
                claims.insert(key.clone());
                if claims.len() > 1 {
                    self.conflicts.insert(ip);
                }
            }
        }
        self.state.put(key.clone(), object);
    }

    /// Where the object `id` came from.
    fn origin(&self, id: &str) -> Option<&Origin> {
        self.entries.get(id).map(|e| &e.origin)
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
        let mut errors = Vec::new();
        for identity @ (kind, key) in &self.duplicates {
            let ids = &self.places[identity];
            let Some(first) = ids.first().and_then(|id| self.origin(id)) else {
                continue;
            };
            let object = if key.namespace.is_empty() {
                format!("{kind} {}", key.name)
            } else {
                format!("{kind} {key}")
            };
            for origin in ids.iter().skip(1).filter_map(|id| self.origin(id)) {
                let message = format!("duplicate object, first defined in {}", first.place());
                errors.push(doc_error(origin, Some(&object), "metadata.name", message));
            }
        }
        let service_origin = |key: &ObjectKey| {
            let ids = self.places.get(&(Kind::Service, key.clone()))?;
            self.origin(ids.first()?)
        };
        for ip in &self.conflicts {
            let mut claims = self.claims[ip].iter();
            let Some(first) = claims.next() else {
                continue;
            };
            let first_place = service_origin(first).map(Origin::place).unwrap_or_default();
            for key in claims {
                let Some(origin) = service_origin(key) else {
                    continue;
                };
                let message =
                    format!("cluster IP {ip} is already used by Service {first} ({first_place})");
                let object = format!("Service {key}");
                errors.push(doc_error(origin, Some(&object), "spec.clusterIP", message));
            }
        }
        if errors.is_empty() {
            Ok(self.state.clone())
        } else {
            Err(StateError::Invalid(errors))
        }
    }
}

#[cfg(test)]
mod tests;
