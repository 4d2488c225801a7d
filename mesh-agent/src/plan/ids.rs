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

/// The ids of a plan kept from one change to the next ([`super::planner::Planner`]):
/// hands out ids exactly as [`IdAllocator`] would for the same previous ids, without
/// looking at every id in use. A key keeps its id until released; a new key gets the
/// lowest id from `first` on that no key holds. Released ids are held back until the
/// caller is done allocating for the change that released them (see [`IdPool::release`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct IdPool<K> {
    ids: BTreeMap<K, u32>,
    /// Ids from `first` to below `next` that no key holds.
    free: BTreeSet<u32>,
    /// The lowest id handed out.
    first: u32,
    /// One past the highest id ever held.
    next: u32,
}

impl<K> Default for IdPool<K> {
    fn default() -> Self {
        Self {
            ids: BTreeMap::new(),
            free: BTreeSet::new(),
            first: 1,
            next: 1,
        }
    }
}

impl<K: Ord + Clone> IdPool<K> {
    /// A pool continuing `ids`, handing out new ids from `first` on.
    pub(super) fn new(ids: BTreeMap<K, u32>, first: u32) -> Self {
        let used: BTreeSet<u32> = ids.values().copied().collect();
        let next = used.last().map_or(first, |&last| (last + 1).max(first));
        let free = (first..next).filter(|id| !used.contains(id)).collect();
        Self {
            ids,
            free,
            first,
            next,
        }
    }

    /// The id of `key`, if it holds one.
    pub(super) fn get(&self, key: &K) -> Option<u32> {
        self.ids.get(key).copied()
    }

    /// The id of `key`, allocated if it holds none.
    pub(super) fn id(&mut self, key: &K) -> u32 {
        if let Some(id) = self.get(key) {
            return id;
        }
        let id = self.free.pop_first().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        self.ids.insert(key.clone(), id);
        id
    }

    /// Frees the ids of `keys`. Call it once the change's allocations are done: an id
    /// freed by a plan is only handed out by a later one.
    pub(super) fn release<'k>(&mut self, keys: impl IntoIterator<Item = &'k K>)
    where
        K: 'k,
    {
        for key in keys {
            if let Some(id) = self.ids.remove(key) {
                self.free.insert(id);
            }
        }
    }

    /// Whether some key holds `id`.
    pub(super) fn holds(&self, id: u32) -> bool {
        (self.first..self.next).contains(&id) && !self.free.contains(&id)
    }

    /// Every key with its id.
    pub(super) fn ids(&self) -> &BTreeMap<K, u32> {
        &self.ids
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

    #[test]
    fn a_pool_hands_out_what_the_allocator_would() {
        let prev = BTreeMap::from([("a", 1), ("c", 4)]);
        let mut pool = IdPool::new(prev.clone(), 1);
        let mut alloc = IdAllocator::new(&prev, 1);
        for key in ["b", "c", "d", "e"] {
            assert_eq!(pool.id(&key), alloc.id(&key), "{key}");
        }
        assert_eq!(pool.get(&"e"), Some(5));
        assert!(pool.holds(5) && !pool.holds(6) && !pool.holds(0));
        pool.release([&"b", &"a"]);
        assert_eq!(
            pool.id(&"f"),
            1,
            "ids released by the last change are free now"
        );
        assert_eq!(pool.id(&"g"), 2);
        assert_eq!(pool.id(&"h"), 6);
    }
}
