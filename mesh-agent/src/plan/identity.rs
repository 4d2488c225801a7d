//! Security identities: what pods (by namespace and labels) and ipBlock prefixes are
//! called in the policy maps, kept stable from one plan to the next.

use std::collections::BTreeMap;
use std::fmt;

use mesh_common::policy::IDENTITY_FIRST_ALLOCATED;

use super::ids::IdAllocator;
use crate::state::Cidr;

/// What an identity stands for.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum IdentityKey {
    /// The node's own addresses ([`mesh_common::policy::IDENTITY_HOST`], reserved,
    /// never allocated); only ever the owner of a [`IdentityKey::Part`].
    Host,
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
    /// The addresses of `owner` (pods sharing an identity, or the node) that lie in
    /// exactly the ipBlock prefixes `within`, when ipBlock bounds split the owner's
    /// addresses into several such sets (the first set keeps the owner's identity): a
    /// peer identity only, so an ipBlock can allow some of those addresses and not
    /// others.
    Part {
        /// Whose addresses.
        owner: Box<IdentityKey>,
        /// The ipBlock prefixes every address of the part lies in, sorted.
        within: Vec<Cidr>,
    },
}

impl IdentityKey {
    /// The labels of its pods (a part's owner's); empty for CIDRs and the host.
    pub fn labels(&self) -> BTreeMap<String, String> {
        match self {
            IdentityKey::Pods { labels, .. } => labels.clone(),
            IdentityKey::Part { owner, .. } => owner.labels(),
            IdentityKey::Host | IdentityKey::Cidr(_) => BTreeMap::new(),
        }
    }
}

impl fmt::Display for IdentityKey {
    /// `shop {app=web,tier=front}`, `cidr 10.0.0.0/8`, `host`,
    /// `shop {app=web} within 10.0.0.0/8,10.244.1.5/32`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityKey::Host => f.write_str("host"),
            IdentityKey::Pods { namespace, labels } => {
                write!(f, "{namespace} {{")?;
                for (i, (k, v)) in labels.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{k}={v}")?;
                }
                f.write_str("}")
            }
            IdentityKey::Cidr(cidr) => write!(f, "cidr {cidr}"),
            IdentityKey::Part { owner, within } => {
                write!(f, "{owner} within ")?;
                for (i, cidr) in within.iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{cidr}")?;
                }
                Ok(())
            }
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
    /// An allocator continuing these ids, handing out new ones from
    /// [`IDENTITY_FIRST_ALLOCATED`] on.
    pub(super) fn allocator(&self) -> IdAllocator<'_, IdentityKey> {
        IdAllocator::new(&self.ids, IDENTITY_FIRST_ALLOCATED)
    }

    /// The ids an allocator handed out, for the next plan.
    pub(super) fn from_allocator(ids: IdAllocator<'_, IdentityKey>) -> Self {
        Self {
            ids: ids.into_ids(),
        }
    }

    /// Every (key, id), ordered by key.
    pub(super) fn iter(&self) -> impl Iterator<Item = (&IdentityKey, u32)> {
        self.ids.iter().map(|(k, &id)| (k, id))
    }
}
