//! The one id allocator of the planner: service ids, backend ids and security
//! identities are all numbered the same way, carried from one plan to the next.

use std::collections::{BTreeMap, BTreeSet};

/// Hands out ids for keys: a key the previous plan numbered keeps its id; a new key gets
/// the lowest id from `first` on that the previous plan does not use, so an id freed by
/// a plan is only reused by a later one (until the datapath applied the plan, stale map
/// entries may still name it).
///
/// Lookups cannot fail: asking for a key allocates it.
#[derive(Debug)]
pub(super) struct IdAllocator<'p, K> {
    prev: &'p BTreeMap<K, u32>,
    taken: BTreeSet<u32>,
    next: u32,
    ids: BTreeMap<K, u32>,
}

impl<'p, K: Ord + Clone> IdAllocator<'p, K> {
    /// An allocator continuing `prev`, handing out new ids from `first` on.
    pub(super) fn new(prev: &'p BTreeMap<K, u32>, first: u32) -> Self {
        Self {
            prev,
            taken: prev.values().copied().collect(),
            next: first,
            ids: BTreeMap::new(),
        }
    }

    /// The id of `key`, allocated on first use.
    ///
    /// Which new key gets which free id depends on the order of first use; callers ask
    /// in a deterministic order (sorted keys), so equal states give equal plans.
    pub(super) fn id(&mut self, key: &K) -> u32 {
        if let Some(&id) = self.ids.get(key) {
            return id;
        }
        let id = match self.prev.get(key) {
            Some(&id) => id,
            None => {
                while self.taken.contains(&self.next) {
                    self.next += 1;
                }
                self.next += 1;
                self.next - 1
            }
        };
        self.ids.insert(key.clone(), id);
        id
    }

    /// Every key asked for, with its id: what the next plan continues from.
    pub(super) fn into_ids(self) -> BTreeMap<K, u32> {
        self.ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_previous_ids_and_skips_them_for_new_keys() {
        let prev = BTreeMap::from([("a", 1), ("c", 2)]);
        let mut ids = IdAllocator::new(&prev, 1);
        assert_eq!(
            ids.id(&"b"),
            3,
            "1 and 2 are still taken by the previous plan"
        );
        assert_eq!(ids.id(&"c"), 2);
        assert_eq!(ids.id(&"d"), 4);
        assert_eq!(ids.id(&"b"), 3, "asking twice gives the same id");
        assert_eq!(
            ids.into_ids(),
            BTreeMap::from([("b", 3), ("c", 2), ("d", 4)])
        );
    }

    #[test]
    fn freed_ids_are_reused_one_plan_later() {
        let first = BTreeMap::from([("a", 256)]);
        let mut second = IdAllocator::new(&first, 256);
        assert_eq!(
            second.id(&"b"),
            257,
            "a's id is freed now, not reusable yet"
        );
        let second = second.into_ids();
        let mut third = IdAllocator::new(&second, 256);
        assert_eq!(third.id(&"c"), 256);
    }
}
