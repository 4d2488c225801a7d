//! Diff-apply a [`Plan`] to the service maps: only changed keys are written, and in an
//! order that never lets a connect() miss during an update:
//!
//! 1. new/changed backends, 2. new/changed slots, 3. new/changed frontends (a growing
//!    service's slots exist before its count grows), then
//! 4. stale frontends, 5. stale slots (a shrinking service's count has already shrunk),
//!    6. stale backends (nothing references them any more).
//!
//! Map access goes through [`MapStore`], so the order and the diffing are unit-tested
//! against an in-memory map without root.

use std::{cell::RefCell, collections::BTreeMap, fmt::Debug};

use aya::{
    Pod,
    maps::{HashMap, LpmTrie, MapData, MapError, lpm_trie::Key as TrieKeyOf},
};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, EndpointValue, IpcacheKey,
    IpcacheValue, LbMetricsKey, PolicyKey, PolicyKeyData, PolicyValue, ServiceKey, ServiceValue,
    policy::POLICY_ISOLATED,
};

use crate::plan::{Delta, Ids, Plan, diff};

/// A failed map operation, naming the map and the key.
#[derive(Debug, thiserror::Error)]
#[error("{op} {map}[{key}]: {source}")]
pub struct SyncError {
    op: &'static str,
    map: &'static str,
    key: String,
    #[source]
    source: Box<MapError>,
}

impl SyncError {
    /// A failed `op` on `key` (formatted with Debug, or "*" for the whole map).
    fn new(op: &'static str, map: &'static str, key: impl Debug, source: MapError) -> Self {
        Self {
            op,
            map,
            key: format!("{key:?}"),
            source: Box::new(source),
        }
    }
}

/// Removal that treats an absent key as done.
fn removed(
    result: Result<(), MapError>,
    map: &'static str,
    key: impl Debug,
) -> Result<(), SyncError> {
    match result {
        Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
        Err(e) => Err(SyncError::new("delete", map, key, e)),
    }
}

/// A key/value map as the sync logic sees it.
pub trait MapStore<K, V> {
    /// Every entry the map holds now.
    fn entries(&self) -> Result<BTreeMap<K, V>, SyncError>;
    /// Inserts or replaces one entry.
    fn upsert(&mut self, key: &K, value: &V) -> Result<(), SyncError>;
    /// Removes one entry (absent is not an error).
    fn remove(&mut self, key: &K) -> Result<(), SyncError>;
}

/// A map only this agent writes, remembered after its first read: later applies diff
/// against memory instead of reading every entry back from the kernel (at 10,000
/// Services some 30,000 entries, over a hundred milliseconds of syscalls per change).
/// The first read takes what the kernel holds, so a datapath adopted from an earlier
/// agent is reconciled, not trusted; a failed write forgets the memory, so the next
/// apply reads the map again.
pub struct Mirrored<S, K, V> {
    store: S,
    mirror: RefCell<Option<BTreeMap<K, V>>>,
}

impl<S, K, V> Mirrored<S, K, V> {
    /// Remembers `store`'s contents from its first read on.
    pub fn new(store: S) -> Self {
        Self {
            store,
            mirror: RefCell::new(None),
        }
    }

    /// Runs a write; on failure the map's contents are unknown, so forgets them.
    fn write(
        &mut self,
        result: Result<(), SyncError>,
        remember: impl FnOnce(&mut BTreeMap<K, V>),
    ) -> Result<(), SyncError> {
        match (&result, self.mirror.get_mut()) {
            (Ok(()), Some(mirror)) => remember(mirror),
            (Err(_), mirror) => *mirror = None,
            (Ok(()), None) => {}
        }
        result
    }
}

impl<S: MapStore<K, V>, K: Ord + Clone, V: Clone> MapStore<K, V> for Mirrored<S, K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, SyncError> {
        if let Some(mirror) = self.mirror.borrow().as_ref() {
            return Ok(mirror.clone());
        }
        let read = self.store.entries()?;
        *self.mirror.borrow_mut() = Some(read.clone());
        Ok(read)
    }

    fn upsert(&mut self, key: &K, value: &V) -> Result<(), SyncError> {
        let result = self.store.upsert(key, value);
        self.write(result, |m| {
            m.insert(key.clone(), value.clone());
        })
    }

    fn remove(&mut self, key: &K) -> Result<(), SyncError> {
        let result = self.store.remove(key);
        self.write(result, |m| {
            m.remove(key);
        })
    }
}

/// A pinned kernel hash map, named for errors.
pub struct KernelMap<K, V> {
    name: &'static str,
    map: HashMap<MapData, K, V>,
}

impl<K: Pod, V: Pod> KernelMap<K, V> {
    /// Wraps an open kernel map.
    pub fn new(name: &'static str, map: HashMap<MapData, K, V>) -> Self {
        Self { name, map }
    }
}

impl<K: Pod + Ord + Debug, V: Pod> MapStore<K, V> for KernelMap<K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, SyncError> {
        self.map
            .iter()
            .map(|r| r.map_err(|e| SyncError::new("iterate", self.name, "*", e)))
            .collect()
    }

    fn upsert(&mut self, key: &K, value: &V) -> Result<(), SyncError> {
        self.map
            .insert(key, value, 0)
            .map_err(|e| SyncError::new("update", self.name, key, e))
    }

    fn remove(&mut self, key: &K) -> Result<(), SyncError> {
        removed(self.map.remove(key), self.name, key)
    }
}

/// A key of an LPM trie map, as the planner holds it (prefix length and data in one
/// ordered value) and as aya's `lpm_trie::Key` splits it.
pub trait TrieKey: Ord + Copy + Debug {
    /// The data after the prefix length.
    type Data: Pod;
    /// Prefix length and data.
    fn split(&self) -> (u32, Self::Data);
    /// The inverse of [`TrieKey::split`].
    fn join(prefixlen: u32, data: Self::Data) -> Self;
}

impl TrieKey for IpcacheKey {
    type Data = Addr;
    fn split(&self) -> (u32, Addr) {
        (self.prefixlen, self.addr)
    }
    fn join(prefixlen: u32, addr: Addr) -> Self {
        Self { prefixlen, addr }
    }
}

impl TrieKey for PolicyKey {
    type Data = PolicyKeyData;
    fn split(&self) -> (u32, PolicyKeyData) {
        (self.prefixlen, self.data())
    }
    fn join(prefixlen: u32, data: PolicyKeyData) -> Self {
        Self::from_parts(prefixlen, data)
    }
}

/// A pinned kernel LPM trie, named for errors.
pub struct KernelTrie<K: TrieKey, V> {
    name: &'static str,
    map: LpmTrie<MapData, K::Data, V>,
}

impl<K: TrieKey, V: Pod> KernelTrie<K, V> {
    /// Wraps an open kernel trie.
    pub fn new(name: &'static str, map: LpmTrie<MapData, K::Data, V>) -> Self {
        Self { name, map }
    }
}

impl<K: TrieKey, V: Pod> MapStore<K, V> for KernelTrie<K, V> {
    fn entries(&self) -> Result<BTreeMap<K, V>, SyncError> {
        self.map
            .iter()
            .map(|r| {
                r.map(|(k, v)| (K::join(k.prefix_len(), k.data()), v))
                    .map_err(|e| SyncError::new("iterate", self.name, "*", e))
            })
            .collect()
    }

    fn upsert(&mut self, key: &K, value: &V) -> Result<(), SyncError> {
        let (len, data) = key.split();
        self.map
            .insert(&TrieKeyOf::new(len, data), value, 0)
            .map_err(|e| SyncError::new("update", self.name, key, e))
    }

    fn remove(&mut self, key: &K) -> Result<(), SyncError> {
        let (len, data) = key.split();
        removed(self.map.remove(&TrieKeyOf::new(len, data)), self.name, key)
    }
}

/// The policy maps.
pub struct PolicyMaps<E, I, P> {
    /// ENDPOINTS: netns cookie → identity.
    pub endpoints: E,
    /// IPCACHE: prefix → identity.
    pub ipcache: I,
    /// POLICY: compiled rules and isolation markers.
    pub policy: P,
}

impl<E, I, P> PolicyMaps<E, I, P>
where
    E: MapStore<u64, EndpointValue>,
    I: MapStore<IpcacheKey, IpcacheValue>,
    P: MapStore<PolicyKey, PolicyValue>,
{
    /// Brings the maps to the desired contents without a window that wrongly allows or
    /// denies: allow entries go in before the isolation markers that make them matter,
    /// and markers go out before the allow entries they guarded; identities (IPCACHE,
    /// ENDPOINTS) are written after the rules that name them and removed last.
    pub fn apply(
        &mut self,
        endpoints: &BTreeMap<u64, EndpointValue>,
        ipcache: &BTreeMap<IpcacheKey, IpcacheValue>,
        policy: &BTreeMap<PolicyKey, PolicyValue>,
    ) -> Result<ApplyStats, SyncError> {
        let e = diff(&self.endpoints.entries()?, endpoints);
        let i = diff(&self.ipcache.entries()?, ipcache);
        let current_policy = self.policy.entries()?;
        let p = diff(&current_policy, policy);
        let is_marker = |v: &PolicyValue| v.flags & POLICY_ISOLATED != 0;
        let (markers, allows): (Vec<_>, Vec<_>) = p.upserts.iter().partition(|(_, v)| is_marker(v));
        for (k, v) in allows.iter().chain(&markers) {
            self.policy.upsert(k, v)?;
        }
        for (k, v) in &i.upserts {
            self.ipcache.upsert(k, v)?;
        }
        for (k, v) in &e.upserts {
            self.endpoints.upsert(k, v)?;
        }
        // Removed keys are absent from the desired set, so the upserts above did not
        // touch them: their values are still the ones read before.
        let (stale_markers, stale_allows): (Vec<_>, Vec<_>) = p
            .removals
            .iter()
            .partition(|k| current_policy.get(k).is_some_and(is_marker));
        for k in stale_markers.iter().chain(&stale_allows) {
            self.policy.remove(k)?;
        }
        for k in &e.removals {
            self.endpoints.remove(k)?;
        }
        for k in &i.removals {
            self.ipcache.remove(k)?;
        }
        Ok(ApplyStats {
            written: e.upserts.len() + i.upserts.len() + p.upserts.len(),
            removed: e.removals.len() + i.removals.len() + p.removals.len(),
        })
    }
}

/// The three service load-balancing maps.
pub struct ServiceMaps<S, L, B> {
    /// SERVICES: frontends and VIP markers.
    pub services: S,
    /// SERVICE_BACKENDS: (service id, slot) → backend id.
    pub slots: L,
    /// BACKENDS: backend id → address.
    pub backends: B,
}

/// What one apply changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ApplyStats {
    /// Entries written (new or changed).
    pub written: usize,
    /// Stale entries removed.
    pub removed: usize,
}

impl<S, L, B> ServiceMaps<S, L, B>
where
    S: MapStore<ServiceKey, ServiceValue>,
    L: MapStore<BackendSlotKey, u32>,
    B: MapStore<u32, Backend>,
{
    /// The ids the maps use now, for planning against an adopted datapath.
    pub fn ids(&self) -> Result<Ids, SyncError> {
        Ok(Ids::from_datapath(
            &self.services.entries()?,
            &self.backends.entries()?,
        ))
    }

    /// Brings the maps to the plan's contents, reading what they hold now first (so a
    /// datapath left by an earlier agent is reconciled, not trusted).
    pub fn apply(&mut self, plan: &Plan) -> Result<ApplyStats, SyncError> {
        let delta = Delta {
            backends: diff(&self.backends.entries()?, &plan.backends),
            slots: diff(&self.slots.entries()?, &plan.slots),
            services: diff(&self.services.entries()?, &plan.services),
            ..Delta::default()
        };
        self.write(&delta)
    }

    /// Writes the keys a [`crate::plan::Planner`] commit changed, when the maps hold
    /// the plan it changed: nothing else is read or written.
    pub fn write(&mut self, delta: &Delta) -> Result<ApplyStats, SyncError> {
        let Delta {
            services,
            slots,
            backends,
            ..
        } = delta;
        for (k, v) in &backends.upserts {
            self.backends.upsert(k, v)?;
        }
        for (k, v) in &slots.upserts {
            self.slots.upsert(k, v)?;
        }
        for (k, v) in &services.upserts {
            self.services.upsert(k, v)?;
        }
        for k in &services.removals {
            self.services.remove(k)?;
        }
        for k in &slots.removals {
            self.slots.remove(k)?;
        }
        for k in &backends.removals {
            self.backends.remove(k)?;
        }
        Ok(ApplyStats {
            written: backends.upserts.len() + slots.upserts.len() + services.upserts.len(),
            removed: backends.removals.len() + slots.removals.len() + services.removals.len(),
        })
    }
}

/// Affinity entries to drop after an apply: those whose backend no longer has a slot in
/// their service (removed, terminating, unhealthy, or moved out by topology), so a client
/// is re-balanced at once instead of when its entry would time out.
pub fn stale_affinity(
    entries: &BTreeMap<AffinityKey, AffinityValue>,
    active: impl Fn(u32, u32) -> bool,
) -> Vec<AffinityKey> {
    entries
        .iter()
        .filter(|(k, v)| !active(k.service_id, v.backend_id))
        .map(|(k, _)| *k)
        .collect()
}

/// Counter keys to drop after an apply: those of services or backends that no longer
/// exist (by id: `service` and `backend` tell which still do). Ids are reused later,
/// and a new service must not inherit an old count.
pub fn stale_metrics(
    keys: &[LbMetricsKey],
    service: impl Fn(u32) -> bool,
    backend: impl Fn(u32) -> bool,
) -> Vec<LbMetricsKey> {
    keys.iter()
        .filter(|k| !service(k.service_id) || (k.backend_id != 0 && !backend(k.backend_id)))
        .copied()
        .collect()
}

#[cfg(test)]
mod tests {
    use std::{cell::RefCell, rc::Rc};

    use mesh_common::Addr;

    use std::collections::BTreeSet;

    use super::*;

    /// In-memory map that logs every write into a log shared by all maps.
    struct FakeMap<K, V> {
        name: &'static str,
        data: BTreeMap<K, V>,
        log: Rc<RefCell<Vec<String>>>,
    }

    impl<K: Ord + Clone + Debug, V: Clone + Debug> MapStore<K, V> for FakeMap<K, V> {
        fn entries(&self) -> Result<BTreeMap<K, V>, SyncError> {
            Ok(self.data.clone())
        }
        fn upsert(&mut self, key: &K, value: &V) -> Result<(), SyncError> {
            self.log
                .borrow_mut()
                .push(format!("put {} {key:?}={value:?}", self.name));
            self.data.insert(key.clone(), value.clone());
            Ok(())
        }
        fn remove(&mut self, key: &K) -> Result<(), SyncError> {
            self.log
                .borrow_mut()
                .push(format!("del {} {key:?}", self.name));
            self.data.remove(key);
            Ok(())
        }
    }

    /// A store that counts its reads and fails writes of key 13.
    #[derive(Default)]
    struct Counting {
        data: BTreeMap<u32, u32>,
        reads: Rc<RefCell<usize>>,
    }

    impl MapStore<u32, u32> for Counting {
        fn entries(&self) -> Result<BTreeMap<u32, u32>, SyncError> {
            *self.reads.borrow_mut() += 1;
            Ok(self.data.clone())
        }
        fn upsert(&mut self, key: &u32, value: &u32) -> Result<(), SyncError> {
            if *key == 13 {
                return Err(SyncError::new("update", "T", key, MapError::KeyNotFound));
            }
            self.data.insert(*key, *value);
            Ok(())
        }
        fn remove(&mut self, key: &u32) -> Result<(), SyncError> {
            self.data.remove(key);
            Ok(())
        }
    }

    #[test]
    fn mirrored_reads_the_map_once_and_again_after_a_failed_write() {
        let reads = Rc::new(RefCell::new(0));
        let mut store = Counting {
            reads: Rc::clone(&reads),
            ..Counting::default()
        };
        store.data.insert(1, 10); // left by an earlier agent
        let mut m = Mirrored::new(store);
        assert_eq!(m.entries().unwrap(), BTreeMap::from([(1, 10)]));
        m.upsert(&2, &20).unwrap();
        m.remove(&1).unwrap();
        assert_eq!(m.entries().unwrap(), BTreeMap::from([(2, 20)]));
        assert_eq!(*reads.borrow(), 1, "later applies diff against memory");
        assert!(m.upsert(&13, &0).is_err());
        assert_eq!(m.entries().unwrap(), BTreeMap::from([(2, 20)]));
        assert_eq!(
            *reads.borrow(),
            2,
            "after a failed write the map is read again"
        );
    }

    type Fake = ServiceMaps<
        FakeMap<ServiceKey, ServiceValue>,
        FakeMap<BackendSlotKey, u32>,
        FakeMap<u32, Backend>,
    >;

    fn fake() -> (Fake, Rc<RefCell<Vec<String>>>) {
        let log = Rc::new(RefCell::new(Vec::new()));
        let maps = ServiceMaps {
            services: FakeMap {
                name: "svc",
                data: BTreeMap::new(),
                log: log.clone(),
            },
            slots: FakeMap {
                name: "slot",
                data: BTreeMap::new(),
                log: log.clone(),
            },
            backends: FakeMap {
                name: "be",
                data: BTreeMap::new(),
                log: log.clone(),
            },
        };
        (maps, log)
    }

    /// One service 10.96.0.1:80/TCP (id 1) with backends 10.244.1.{1..=n}:8080 (ids 1..=n).
    fn v4(a: u32) -> Addr {
        Addr::from(std::net::Ipv4Addr::from(a))
    }

    fn plan_with(n: u32) -> Plan {
        let mut plan = Plan::default();
        plan.services.insert(
            ServiceKey::vip_marker(v4(0x0a60_0001)),
            ServiceValue::MARKER,
        );
        plan.services.insert(
            ServiceKey::new(v4(0x0a60_0001), 80, 6),
            ServiceValue {
                id: 1,
                count: n,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        for i in 1..=n {
            plan.backends
                .insert(i, Backend::new(v4(0x0af4_0100 + i), 8080, 6));
            plan.slots.insert(
                BackendSlotKey {
                    service_id: 1,
                    slot: i,
                },
                i,
            );
        }
        plan
    }

    fn position(log: &[String], prefix: &str) -> usize {
        log.iter()
            .position(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("{prefix} not in {log:?}"))
    }

    #[test]
    fn first_apply_writes_everything_and_second_nothing() {
        let (mut maps, log) = fake();
        let plan = plan_with(3);
        let stats = maps.apply(&plan).unwrap();
        assert_eq!(
            stats,
            ApplyStats {
                written: 2 + 3 + 3,
                removed: 0
            }
        );
        assert_eq!(maps.services.data, plan.services);
        assert_eq!(maps.slots.data, plan.slots);
        assert_eq!(maps.backends.data, plan.backends);
        log.borrow_mut().clear();
        assert_eq!(maps.apply(&plan).unwrap(), ApplyStats::default());
        assert!(
            log.borrow().is_empty(),
            "idempotent apply wrote {:?}",
            log.borrow()
        );
    }

    #[test]
    fn growing_writes_slots_before_count() {
        let (mut maps, log) = fake();
        maps.apply(&plan_with(2)).unwrap();
        log.borrow_mut().clear();
        maps.apply(&plan_with(3)).unwrap();
        let log = log.borrow();
        assert_eq!(log.len(), 3, "{log:?}");
        assert!(position(&log, "put be 3") < position(&log, "put slot"));
        assert!(position(&log, "put slot") < position(&log, "put svc"));
    }

    #[test]
    fn shrinking_lowers_count_before_removing_slot_and_backend() {
        let (mut maps, log) = fake();
        maps.apply(&plan_with(3)).unwrap();
        log.borrow_mut().clear();
        let stats = maps.apply(&plan_with(2)).unwrap();
        assert_eq!(
            stats,
            ApplyStats {
                written: 1,
                removed: 2
            }
        );
        let log = log.borrow();
        assert!(position(&log, "put svc") < position(&log, "del slot"));
        assert!(position(&log, "del slot") < position(&log, "del be 3"));
        assert_eq!(maps.backends.data.len(), 2);
    }

    #[test]
    fn stale_entries_from_an_earlier_agent_are_removed() {
        let (mut maps, _log) = fake();
        maps.services.data.insert(
            ServiceKey::new(v4(0x0a60_0063), 53, 17),
            ServiceValue {
                id: 9,
                count: 1,
                flags: 0,
                affinity_timeout_s: 0,
            },
        );
        maps.slots.data.insert(
            BackendSlotKey {
                service_id: 9,
                slot: 1,
            },
            9,
        );
        maps.backends
            .data
            .insert(9, Backend::new(v4(0x0af4_0909), 53, 17));
        let plan = plan_with(1);
        maps.apply(&plan).unwrap();
        assert_eq!(maps.services.data, plan.services);
        assert_eq!(maps.slots.data, plan.slots);
        assert_eq!(maps.backends.data, plan.backends);
    }

    #[test]
    fn affinity_to_a_backend_without_slot_is_stale() {
        let key = |netns_cookie, service_id| AffinityKey {
            netns_cookie,
            service_id,
            _pad: 0,
        };
        let val = |backend_id| AffinityValue {
            backend_id,
            _pad: 0,
            last_used_ns: 1,
        };
        let entries = BTreeMap::from([
            (key(1, 1), val(1)), // still in a slot of service 1
            (key(2, 1), val(3)), // backend 3 left service 1
            (key(3, 2), val(1)), // service 2 is gone
        ]);
        let active = BTreeSet::from([(1, 1), (1, 2)]);
        assert_eq!(
            stale_affinity(&entries, |s, b| active.contains(&(s, b))),
            vec![key(2, 1), key(3, 2)]
        );
    }

    #[test]
    fn counters_of_vanished_services_and_backends_are_stale() {
        let plan = plan_with(2);
        let key = |service_id, backend_id| LbMetricsKey {
            service_id,
            backend_id,
        };
        let keys = [
            key(1, 0),
            key(1, 1),
            key(1, 2),
            key(1, 3),
            key(7, 1),
            key(7, 0),
        ];
        let services: BTreeSet<u32> = plan.services.values().map(|v| v.id).collect();
        assert_eq!(
            stale_metrics(
                &keys,
                |id| services.contains(&id),
                |id| plan.backends.contains_key(&id)
            ),
            vec![key(1, 3), key(7, 1), key(7, 0)]
        );
    }

    fn pkey(subject: u32, peer: u32, port: u16) -> PolicyKey {
        PolicyKey {
            prefixlen: if port == 0 { 80 } else { 96 },
            subject,
            peer,
            direction: mesh_common::policy::DIR_EGRESS,
            proto: if port == 0 { 0 } else { 6 },
            port_be: port.to_be(),
        }
    }

    fn policy_maps(
        log: &Rc<RefCell<Vec<String>>>,
    ) -> PolicyMaps<
        FakeMap<u64, EndpointValue>,
        FakeMap<IpcacheKey, IpcacheValue>,
        FakeMap<PolicyKey, PolicyValue>,
    > {
        PolicyMaps {
            endpoints: FakeMap {
                name: "ep",
                data: BTreeMap::new(),
                log: log.clone(),
            },
            ipcache: FakeMap {
                name: "ipc",
                data: BTreeMap::new(),
                log: log.clone(),
            },
            policy: FakeMap {
                name: "pol",
                data: BTreeMap::new(),
                log: log.clone(),
            },
        }
    }

    #[test]
    fn isolation_marker_goes_in_after_and_out_before_the_allows() {
        use mesh_common::policy::{POLICY_ALLOW, POLICY_ISOLATED};
        let log = Rc::new(RefCell::new(Vec::new()));
        let mut maps = policy_maps(&log);
        let marker = pkey(300, 0, 0);
        let allow = pkey(300, 301, 80);
        let policy = BTreeMap::from([
            (
                marker,
                PolicyValue {
                    flags: POLICY_ISOLATED,
                    policy_id: 0,
                },
            ),
            (
                allow,
                PolicyValue {
                    flags: POLICY_ALLOW,
                    policy_id: 0,
                },
            ),
        ]);
        let endpoints = BTreeMap::from([(
            7,
            EndpointValue {
                identity: 300,
                flags: 0,
            },
        )]);
        let ipcache = BTreeMap::new();
        maps.apply(&endpoints, &ipcache, &policy).unwrap();
        {
            let log = log.borrow();
            let put = |k: &PolicyKey| position(&log, &format!("put pol {k:?}"));
            assert!(put(&allow) < put(&marker), "{log:?}");
            assert!(put(&marker) < position(&log, "put ep"), "{log:?}");
        }
        log.borrow_mut().clear();
        maps.apply(&BTreeMap::new(), &ipcache, &BTreeMap::new())
            .unwrap();
        let log = log.borrow();
        let del = |k: &PolicyKey| position(&log, &format!("del pol {k:?}"));
        assert!(del(&marker) < del(&allow), "{log:?}");
        assert!(maps.policy.data.is_empty() && maps.endpoints.data.is_empty());
    }
}
