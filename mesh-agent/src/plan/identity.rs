//! Security identities: what pods (by namespace and labels) and ipBlock prefixes are
//! called in the policy maps, kept stable from one plan to the next.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use mesh_common::policy::IDENTITY_FIRST_ALLOCATED;

use crate::state::Cidr;

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKey {
    /// The pods of `namespace` with exactly these labels. Policies select pods by
    /// namespace and labels only, so such pods are indistinguishable to them.
    Pods {
        /// The pods' namespace.
        namespace: String,
        /// The pods' labels, sorted.
        labels: BTreeMap<String, String>,
    },
    /// The addresses of an ipBlock `cidr` or `except` prefix that no pod and no longer
    /// prefix claims (IPCACHE is matched by longest prefix).
    Cidr(Cidr),
}

impl fmt::Display for IdentityKey {
    /// `shop {app=web,tier=front}`, `cidr 10.0.0.0/8`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityKey::Pods { namespace, labels } => {
                write!(f, "{namespace} {{")?;
                for (i, (k, v)) in labels.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{k}={v}")?;
                }
                f.write_str("}")
            }
            IdentityKey::Cidr(cidr) => write!(f, "cidr {cidr}"),
        }
    }
}

/// Identities, carried from one plan to the next so that unchanged pods and prefixes
/// keep their numbers and their map entries are not rewritten.
///
/// Pass the `IdentityIds` of the plan last applied to the maps: an id freed by a plan
/// is only handed out again by a later one, because until the datapath has applied the
/// plan, stale ENDPOINTS, IPCACHE or POLICY entries may still name it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct IdentityIds {
    ids: BTreeMap<IdentityKey, u32>,
}

impl IdentityIds {
    /// Ids for `wanted` keys: a key of `prev` keeps its id; a new key gets the lowest id
    /// from [`IDENTITY_FIRST_ALLOCATED`] on that `prev` does not use.
    pub(super) fn allocate(prev: &Self, wanted: impl IntoIterator<Item = IdentityKey>) -> Self {
        let taken: BTreeSet<u32> = prev.ids.values().copied().collect();
        let mut next = IDENTITY_FIRST_ALLOCATED;
        let mut ids = BTreeMap::new();
        for key in wanted.into_iter().collect::<BTreeSet<_>>() {
            let id = prev.ids.get(&key).copied().unwrap_or_else(|| {
                while taken.contains(&next) {
                    next += 1;
                }
                next += 1;
                next - 1
            });
            ids.insert(key, id);
        }
        Self { ids }
    }

    /// The id of a key passed to [`IdentityIds::allocate`].
    pub(super) fn get(&self, key: &IdentityKey) -> u32 {
        self.ids[key]
    }

    /// Every (key, id), ordered by key.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&IdentityKey, u32)> {
        self.ids.iter().map(|(k, &id)| (k, id))
    }
}
