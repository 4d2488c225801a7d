//! The load-balancing planner kept from one state to the next. It keeps the plan (each
//! Service's frontend rows tell what it takes in the maps) and re-plans only the
//! Services a change touches: those
//! that changed, those whose EndpointSlices changed, those whose selector picks (or
//! picked) a changed Pod, those with a backend whose health changed, and those with a
//! port that moved in or out of the node proxy. The rest of the plan stays as it is,
//! and the keys the change touched come back as a [`Delta`]: only they reach the maps.
//!
//! Planning and committing are separate steps ([`Planner::prepare`], [`Planner::commit`]),
//! so a change rejected later (by the policy planner) leaves the planner where it was.
//! From the same previous ids, the plan it keeps is the one [`super::plan`] makes from
//! scratch, id for id.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_common::Addr;
use mesh_common::l7::{AppProtocol, ServicePortRef};
use mesh_common::maps;
use mesh_common::service::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, BACKEND_UNHEALTHY, BackendSlotKey, PROTO_TCP,
    SVC_FLAG_AFFINITY, SVC_FLAG_L7, ServiceKey, ServiceValue,
};

use super::ids::IdPool;
use super::services::{self, BackendSources, Frontend, Selection};
use super::{
    BackendAddr, BackendInfo, Capacities, FrontendInfo, Ids, MapDiff, Plan, PlanContext, PlanCost,
    PlanError, routes,
};
use crate::state::{Changes, ObjectKey, State, service_selector};

/// A Service's frontends, each with the backends it may use and which get slots.
type Part = Vec<(Frontend, Selection)>;

/// More changed Pods in a namespace than this, and every Service of the namespace is
/// re-planned instead of matching each selector against each changed Pod.
const POD_MATCH_LIMIT: usize = 32;

/// Backend states by rank: the best (lowest) rank any Service gives a backend wins.
const STATES: [u8; 3] = [BACKEND_ACTIVE, BACKEND_TERMINATING, BACKEND_UNHEALTHY];

fn rank(state: u8) -> usize {
    STATES.iter().position(|&s| s == state).unwrap_or(2)
}

/// The plan of the last committed state, and what it takes to change it piecewise.
#[derive(Debug, Default)]
pub struct Planner {
    /// The state, node and capacities the plan was made for; `None` before the first.
    base: Option<Base>,
    /// The node proxy's ports and the unhealthy backends the plan was made with.
    l7_ports: BTreeMap<ServicePortRef, AppProtocol>,
    unhealthy: BTreeSet<BackendAddr>,
    /// EndpointSlices by the Service they belong to (namespace, name).
    slices: BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    service_ids: IdPool<ServiceKey>,
    backend_ids: IdPool<BackendAddr>,
    /// Every backend of the plan: how many Services give it each state, by rank.
    users: BTreeMap<BackendAddr, [u32; 3]>,
    /// Every cluster IP of the plan: how many frontends it has (its marker stays while
    /// any does).
    vips: BTreeMap<IpAddr, u32>,
    plan: Plan,
}

#[derive(Debug)]
struct Base {
    state: Arc<State>,
    node: String,
    capacities: Capacities,
}

/// A plan made but not committed: the re-planned Services and what they were planned
/// with.
#[derive(Debug)]
pub struct Pending {
    state: Arc<State>,
    node: String,
    capacities: Capacities,
    l7_ports: BTreeMap<ServicePortRef, AppProtocol>,
    unhealthy: BTreeSet<BackendAddr>,
    /// Re-planned Services and their new parts (empty: no frontend any more).
    parts: BTreeMap<ObjectKey, Part>,
    /// The state's changes since the committed plan; `None` when there was none (or it
    /// was made for another node or other map sizes): everything was planned.
    pub changes: Option<Changes>,
    /// What planning cost.
    pub cost: PlanCost,
}

impl Pending {
    /// The Services planned.
    pub fn services(&self) -> impl Iterator<Item = &ObjectKey> {
        self.parts.keys()
    }
}

/// The map keys a commit changed, with their new values, in the order
/// [`crate::datapath::sync`] writes them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Delta {
    /// SERVICES.
    pub services: MapDiff<ServiceKey, ServiceValue>,
    /// SERVICE_BACKENDS.
    pub slots: MapDiff<BackendSlotKey, u32>,
    /// BACKENDS.
    pub backends: MapDiff<u32, mesh_common::Backend>,
    /// Backends the plan no longer has.
    pub gone: Vec<BackendAddr>,
    /// The plan was made anew (the first one, or for another node or other map
    /// sizes): the diffs are empty, and the maps must be diffed whole against it.
    pub whole: bool,
}

impl Delta {
    /// No key changed.
    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        !self.whole && self.services.is_empty() && self.slots.is_empty() && self.backends.is_empty()
    }
}

/// Old values of the keys a commit touches, recorded before the first change to each
/// (unless the whole plan is made anew), and the backends it touches.
#[derive(Default)]
struct Touched {
    whole: bool,
    services: BTreeMap<ServiceKey, Option<ServiceValue>>,
    slots: BTreeMap<BackendSlotKey, Option<u32>>,
    backends: BTreeSet<BackendAddr>,
}

impl Touched {
    fn service(&mut self, map: &BTreeMap<ServiceKey, ServiceValue>, key: ServiceKey) {
        if !self.whole {
            record(&mut self.services, map, key);
        }
    }

    fn slot(&mut self, map: &BTreeMap<BackendSlotKey, u32>, key: BackendSlotKey) {
        if !self.whole {
            record(&mut self.slots, map, key);
        }
    }
}

impl Planner {
    /// A planner whose first plan keeps `ids` (those of the datapath it adopts).
    pub fn new(ids: Ids) -> Self {
        Self {
            service_ids: IdPool::new(ids.services, 1),
            backend_ids: IdPool::new(ids.backends, 1),
            ..Self::default()
        }
    }

    /// The committed plan: what the maps hold once its deltas are applied.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Whether a frontend of the committed plan has service id `id`.
    pub fn holds_service_id(&self, id: u32) -> bool {
        self.service_ids.holds(id)
    }

    /// The committed plan, taken.
    pub fn into_plan(self) -> Plan {
        self.plan
    }

    /// The committed plan's ids, as [`super::plan`] returns them.
    pub fn ids(&self) -> Ids {
        Ids {
            services: self.service_ids.ids().clone(),
            backends: self.backend_ids.ids().clone(),
        }
    }

    /// Plans `state` against the committed plan: re-plans the Services the change
    /// touches, or all of them the first time. Nothing changes until [`Planner::commit`].
    pub fn prepare(&self, state: &Arc<State>, ctx: &PlanContext<'_>) -> Result<Pending, PlanError> {
        let base = self
            .base
            .as_ref()
            .filter(|b| b.node == ctx.node && b.capacities == ctx.capacities);
        let changes = base.map(|b| Changes::between(&b.state, state));
        let dirty = match (&changes, base) {
            (Some(changes), Some(base)) => self.touched(&base.state, state, changes, ctx),
            _ => (self.plan.frontends.iter().map(|f| &f.service))
                .chain(state.services().map(|(k, _)| k))
                .cloned()
                .collect(),
        };
        let sources = match &changes {
            Some(changes) if 2 * dirty.len() <= state.services().len() => {
                self.sources_for(state, &dirty, &changes.endpoint_slices)
            }
            _ => BackendSources::new(state),
        };
        let mut parts = BTreeMap::new();
        for key in dirty {
            let part: Part = state
                .service(&key)
                .map(|svc| services::frontends_of(&sources, &key, svc))
                .unwrap_or_default()
                .into_iter()
                .map(|f| {
                    let selection = services::select(&f, ctx.node, ctx.unhealthy);
                    (f, selection)
                })
                .collect();
            parts.insert(key, part);
        }
        let pending = Pending {
            state: Arc::clone(state),
            node: ctx.node.to_owned(),
            capacities: ctx.capacities,
            l7_ports: ctx.l7_ports.clone(),
            unhealthy: ctx.unhealthy.clone(),
            cost: PlanCost {
                selector_candidates: sources.examined(),
                services: parts.len() as u64,
            },
            parts,
            changes,
        };
        self.check_capacity(&pending)?;
        Ok(pending)
    }

    /// Makes `pending` the committed plan and returns the map keys that changed.
    pub fn commit(&mut self, pending: Pending) -> Delta {
        let Pending {
            state,
            node,
            capacities,
            l7_ports,
            unhealthy,
            parts,
            changes,
            cost,
        } = pending;
        let full = changes.is_none();
        if let (Some(changes), Some(base)) = (&changes, &self.base) {
            index_slices(
                &mut self.slices,
                &base.state,
                &state,
                &changes.endpoint_slices,
            );
        } else {
            self.slices.clear();
            for (key, slice) in state.endpoint_slices() {
                if let Some(service) = services::slice_owner(key, slice) {
                    self.slices.entry(service).or_default().insert(key.clone());
                }
            }
        }
        self.base = Some(Base {
            state,
            node,
            capacities,
        });
        self.l7_ports = l7_ports;
        self.unhealthy = unhealthy;
        self.plan.cost = cost;

        // Made anew, the plan is diffed whole against the maps: no key needs recording.
        let mut touched = Touched {
            whole: full,
            ..Touched::default()
        };
        for key in parts.keys() {
            self.unlink(key, &mut touched);
        }
        // New keys are numbered in key order, so equal states give equal plans.
        let new_keys: BTreeSet<ServiceKey> = parts
            .values()
            .flatten()
            .map(|(f, _)| frontend_key(f))
            .collect();
        for key in &new_keys {
            self.service_ids.id(key);
        }
        let new_backends: BTreeSet<BackendAddr> = parts
            .values()
            .flat_map(|part| Usage::of_part(part).backends.into_keys())
            .collect();
        for addr in &new_backends {
            self.backend_ids.id(addr);
        }
        for (key, part) in parts {
            if !part.is_empty() {
                self.link(&key, &part, &mut touched);
            }
        }
        if full {
            // Ids carried in from before (an adopted datapath, the caller's previous
            // plan) that nothing holds now are free from the next plan on.
            let stale: Vec<ServiceKey> = (self.service_ids.ids().keys())
                .filter(|k| !self.plan.services.contains_key(k))
                .copied()
                .collect();
            self.service_ids.release(&stale);
            let stale: Vec<BackendAddr> = (self.backend_ids.ids().keys())
                .filter(|a| !self.users.contains_key(a))
                .copied()
                .collect();
            self.backend_ids.release(&stale);
        }
        self.settle(touched)
    }

    /// The Services `changes` (from `old` to `new`) and the context touch.
    fn touched(
        &self,
        old: &State,
        new: &State,
        changes: &Changes,
        ctx: &PlanContext<'_>,
    ) -> BTreeSet<ObjectKey> {
        let mut dirty: BTreeSet<ObjectKey> = changes.services.iter().cloned().collect();
        for key in &changes.endpoint_slices {
            dirty.extend(owner_in(old, key));
            dirty.extend(owner_in(new, key));
        }
        let mut pods_by_namespace: BTreeMap<&str, Vec<&ObjectKey>> = BTreeMap::new();
        for key in &changes.pods {
            pods_by_namespace
                .entry(&key.namespace)
                .or_default()
                .push(key);
        }
        for (namespace, pods) in pods_by_namespace {
            let labels: Vec<&BTreeMap<String, String>> = pods
                .iter()
                .flat_map(|key| [old.pod(key), new.pod(key)])
                .flatten()
                .filter_map(|pod| pod.metadata.labels.as_ref())
                .collect();
            for (key, svc) in new.services_in(namespace) {
                let Some(selector) = service_selector(svc) else {
                    continue;
                };
                let picks = |l: &&BTreeMap<String, String>| {
                    selector.iter().all(|(k, v)| l.get(k) == Some(v))
                };
                if pods.len() > POD_MATCH_LIMIT || labels.iter().any(picks) {
                    dirty.insert(key.clone());
                }
            }
        }
        let health: BTreeSet<&BackendAddr> =
            self.unhealthy.symmetric_difference(ctx.unhealthy).collect();
        if !health.is_empty() {
            for f in &self.plan.frontends {
                let uses = |b: &BackendInfo| health.contains(&BackendAddr::new(b.addr, f.proto));
                if f.backends.iter().any(uses) {
                    dirty.insert(f.service.clone());
                }
            }
        }
        let l7 = |a: &BTreeMap<ServicePortRef, AppProtocol>,
                  b: &BTreeMap<ServicePortRef, AppProtocol>| {
            a.keys()
                .filter(|k| !b.contains_key(*k))
                .map(|k| ObjectKey {
                    namespace: k.service.namespace.clone(),
                    name: k.service.name.clone(),
                })
                .collect::<Vec<_>>()
        };
        dirty.extend(l7(&self.l7_ports, ctx.l7_ports));
        dirty.extend(l7(ctx.l7_ports, &self.l7_ports));
        dirty
    }

    /// Backend sources for the Services `dirty`: their EndpointSlices, and the Pods of
    /// the namespaces where one of them selects Pods.
    fn sources_for<'a>(
        &self,
        state: &'a State,
        dirty: &BTreeSet<ObjectKey>,
        changed_slices: &[ObjectKey],
    ) -> BackendSources<'a> {
        let mut slices = BTreeSet::new();
        let mut namespaces = BTreeSet::new();
        for key in dirty {
            // Slices known before this change, and any slice now naming the Service
            // (a changed one may be new to it).
            let known = self.slices.get(key);
            slices.extend(known.into_iter().flatten().cloned());
            if state.service(key).and_then(service_selector).is_some() {
                namespaces.insert(key.namespace.as_str());
            }
        }
        slices.extend(changed_slices.iter().cloned());
        BackendSources::of(
            slices
                .iter()
                .filter_map(|key| state.endpoint_slice_entry(key)),
            namespaces.into_iter().flat_map(|ns| state.pods_in(ns)),
        )
    }

    /// Takes the part of Service `key` out of the plan.
    fn unlink(&mut self, key: &ObjectKey, touched: &mut Touched) {
        let rows = self.frontend_rows(key);
        let rows: Vec<Arc<FrontendInfo>> = self.plan.frontends.drain(rows).collect();
        for f in &rows {
            let vip = f.addr.ip();
            let skey = ServiceKey::new(Addr::from(vip), f.addr.port(), f.proto);
            touched.service(&self.plan.services, skey);
            if let Some(value) = self.plan.services.remove(&skey) {
                for slot in 1..=value.count {
                    let slot = BackendSlotKey {
                        service_id: value.id,
                        slot,
                    };
                    touched.slot(&self.plan.slots, slot);
                    self.plan.slots.remove(&slot);
                }
            }
            let marker = ServiceKey::vip_marker(Addr::from(vip));
            if let Some(count) = self.vips.get_mut(&vip) {
                *count -= 1;
                if *count == 0 {
                    self.vips.remove(&vip);
                    touched.service(&self.plan.services, marker);
                    self.plan.services.remove(&marker);
                }
            }
        }
        for (addr, state) in Usage::of_rows(&rows).backends {
            if let Some(counts) = self.users.get_mut(&addr) {
                counts[rank(state)] -= 1;
            }
            touched.backends.insert(addr);
        }
    }

    /// Puts the part of Service `key` into the plan; every key and backend of it has an
    /// id already.
    fn link(&mut self, key: &ObjectKey, part: &Part, touched: &mut Touched) {
        let mut rows = Vec::with_capacity(part.len());
        for (f, selection) in part {
            let skey = frontend_key(f);
            let id = self.service_ids.id(&skey);
            // Backends with slots first, in slot order, then the others.
            let mut infos: Vec<BackendInfo> = f
                .backends
                .iter()
                .zip(selection.states.iter().zip(&selection.in_slot))
                .map(|(b, (&state, &in_slot))| BackendInfo {
                    addr: b.addr,
                    pod: b.pod.clone(),
                    id: self.backend_ids.id(&BackendAddr::new(b.addr, f.proto)),
                    state,
                    node: b.node.clone(),
                    in_slot,
                })
                .collect();
            infos.sort_by_key(|b| !b.in_slot);
            let in_slots = infos.iter().take_while(|b| b.in_slot);
            let mut count = 0;
            for (slot, b) in (1..).zip(in_slots) {
                let slot = BackendSlotKey {
                    service_id: id,
                    slot,
                };
                touched.slot(&self.plan.slots, slot);
                self.plan.slots.insert(slot, b.id);
                count += 1;
            }
            let marker = ServiceKey::vip_marker(Addr::from(f.vip));
            *self.vips.entry(f.vip).or_default() += 1;
            touched.service(&self.plan.services, marker);
            self.plan.services.insert(marker, ServiceValue::MARKER);
            let l7 = f.proto == PROTO_TCP
                && self.l7_ports.contains_key(&ServicePortRef {
                    service: routes::object_ref(&f.service),
                    port: f.port,
                });
            let mut flags = 0;
            if f.affinity_timeout_s.is_some() {
                flags |= SVC_FLAG_AFFINITY;
            }
            if l7 {
                flags |= SVC_FLAG_L7;
            }
            touched.service(&self.plan.services, skey);
            self.plan.services.insert(
                skey,
                ServiceValue {
                    id,
                    count,
                    flags,
                    affinity_timeout_s: f.affinity_timeout_s.unwrap_or(0),
                },
            );
            rows.push(Arc::new(FrontendInfo {
                service: f.service.clone(),
                port_name: f.port_name.clone(),
                addr: SocketAddr::new(f.vip, f.port),
                proto: f.proto,
                id,
                affinity_timeout_s: f.affinity_timeout_s,
                prefer_close: f.prefer_close,
                health_panic: selection.health_panic,
                l7,
                backends: infos,
            }));
        }
        let at = self.frontend_rows(key).start;
        self.plan.frontends.splice(at..at, rows);
        for (addr, state) in Usage::of_part(part).backends {
            self.users.entry(addr).or_default()[rank(state)] += 1;
            touched.backends.insert(addr);
        }
    }

    /// The rows of Service `key` in the plan's frontends (ordered by Service).
    fn frontend_rows(&self, key: &ObjectKey) -> std::ops::Range<usize> {
        let rows = &self.plan.frontends;
        rows.partition_point(|f| f.service < *key)..rows.partition_point(|f| f.service <= *key)
    }

    /// Gives the touched backends their state (or takes them out), frees the ids no key
    /// holds any more, and returns what changed.
    fn settle(&mut self, touched: Touched) -> Delta {
        let mut delta = Delta {
            whole: touched.whole,
            ..Delta::default()
        };
        let mut backends: BTreeMap<u32, Option<mesh_common::Backend>> = BTreeMap::new();
        for addr in &touched.backends {
            let Some(id) = self.backend_ids.get(addr) else {
                continue;
            };
            if !touched.whole {
                backends.insert(id, self.plan.backends.get(&id).copied());
            }
            let best = self
                .users
                .get(addr)
                .and_then(|counts| counts.iter().position(|&n| n > 0));
            match best {
                Some(best) => {
                    self.plan.backends.insert(id, addr.to_backend(STATES[best]));
                }
                None => {
                    self.users.remove(addr);
                    self.plan.backends.remove(&id);
                    delta.gone.push(*addr);
                }
            }
        }
        self.backend_ids.release(&delta.gone);
        let freed: Vec<ServiceKey> = touched
            .services
            .keys()
            .filter(|k| !k.is_vip_marker() && !self.plan.services.contains_key(k))
            .copied()
            .collect();
        self.service_ids.release(&freed);
        delta.services = changes(touched.services, &self.plan.services);
        delta.slots = changes(touched.slots, &self.plan.slots);
        delta.backends = changes(backends, &self.plan.backends);
        delta
    }

    /// Fails when the plan with `pending` committed would overflow a map, naming the
    /// first Service (in namespace/name order) that does not fit.
    fn check_capacity(&self, pending: &Pending) -> Result<(), PlanError> {
        // Counts after the change, from those of the committed plan and the differences
        // the re-planned Services make.
        let mut frontends = self.plan.services.len() - self.vips.len();
        let mut slots = self.plan.slots.len();
        let mut vips: BTreeMap<IpAddr, i64> = BTreeMap::new();
        let mut users: BTreeMap<BackendAddr, i64> = BTreeMap::new();
        for (key, new) in &pending.parts {
            let old = Usage::of_rows(&self.plan.frontends[self.frontend_rows(key)]);
            let new = Usage::of_part(new);
            for (usage, sign) in [(&old, -1), (&new, 1)] {
                for &(vip, used) in &usage.frontends {
                    if sign < 0 {
                        frontends -= 1;
                        slots -= used;
                    } else {
                        frontends += 1;
                        slots += used;
                    }
                    *vips.entry(vip).or_default() += sign;
                }
                for addr in usage.backends.keys() {
                    *users.entry(*addr).or_default() += sign;
                }
            }
        }
        let distinct = |before: usize, changes: &mut dyn Iterator<Item = (i64, i64)>| {
            changes.fold(before, |n, (was, change)| {
                match (was > 0, was + change > 0) {
                    (false, true) => n + 1,
                    (true, false) => n - 1,
                    _ => n,
                }
            })
        };
        let markers = distinct(
            self.vips.len(),
            &mut vips
                .iter()
                .map(|(vip, &d)| (self.vips.get(vip).map_or(0, |&n| i64::from(n)), d)),
        );
        let backends = distinct(
            self.users.len(),
            &mut users.iter().map(|(addr, &d)| {
                let was = self
                    .users
                    .get(addr)
                    .map_or(0, |c| c.iter().map(|&n| i64::from(n)).sum());
                (was, d)
            }),
        );
        let entries = frontends + markers;
        let c = pending.capacities;
        let fits = entries <= c.services as usize
            && slots <= c.slots as usize
            && backends <= c.backends as usize;
        if fits {
            return Ok(());
        }
        // Rare: find the Service that overflows, in order, over the whole plan.
        let mut all: BTreeMap<&ObjectKey, Usage> = (self.plan.frontends)
            .chunk_by(|a, b| a.service == b.service)
            .map(|rows| (&rows[0].service, Usage::of_rows(rows)))
            .collect();
        for (key, part) in &pending.parts {
            all.insert(key, Usage::of_part(part));
        }
        overflow(all, c)
    }
}

/// Updates the index of slices by Service for the slices `keys`, changed from `old` to
/// `new`.
fn index_slices(
    index: &mut BTreeMap<ObjectKey, BTreeSet<ObjectKey>>,
    old: &State,
    new: &State,
    keys: &[ObjectKey],
) {
    for key in keys {
        if let Some(service) = owner_in(old, key)
            && let Some(set) = index.get_mut(&service)
        {
            set.remove(key);
            if set.is_empty() {
                index.remove(&service);
            }
        }
        if let Some(service) = owner_in(new, key) {
            index.entry(service).or_default().insert(key.clone());
        }
    }
}

/// The Service the EndpointSlice `key` of `state` belongs to.
fn owner_in(state: &State, key: &ObjectKey) -> Option<ObjectKey> {
    services::slice_owner(key, state.endpoint_slice(key)?)
}

/// The map key of a frontend.
fn frontend_key(f: &Frontend) -> ServiceKey {
    ServiceKey::new(Addr::from(f.vip), f.port, f.proto)
}

/// What a Service takes in the maps: each frontend's cluster IP and slots, and its
/// backends with the best state any of its frontends gives each.
#[derive(Debug, Default)]
struct Usage {
    frontends: Vec<(IpAddr, usize)>,
    backends: BTreeMap<BackendAddr, u8>,
}

impl Usage {
    /// The usage of a part about to be planned.
    fn of_part(part: &[(Frontend, Selection)]) -> Self {
        let frontends = part
            .iter()
            .map(|(f, selection)| (f.vip, selection.slot_count()));
        let backends = part.iter().flat_map(|(f, selection)| {
            (f.backends.iter().zip(&selection.states))
                .map(|(b, &state)| (BackendAddr::new(b.addr, f.proto), state))
        });
        Self::of(frontends, backends)
    }

    /// The usage of a Service's rows in the plan.
    fn of_rows(rows: &[Arc<FrontendInfo>]) -> Self {
        let frontends = rows
            .iter()
            .map(|f| (f.addr.ip(), f.backends.iter().filter(|b| b.in_slot).count()));
        let backends = rows.iter().flat_map(|f| {
            (f.backends.iter()).map(|b| (BackendAddr::new(b.addr, f.proto), b.state))
        });
        Self::of(frontends, backends)
    }

    fn of(
        frontends: impl Iterator<Item = (IpAddr, usize)>,
        backends: impl Iterator<Item = (BackendAddr, u8)>,
    ) -> Self {
        let mut usage = Self {
            frontends: frontends.collect(),
            backends: BTreeMap::new(),
        };
        for (addr, state) in backends {
            let known = usage.backends.entry(addr).or_insert(state);
            if rank(state) < rank(*known) {
                *known = state;
            }
        }
        usage
    }
}

/// Records `key`'s value in `map` as its old one, unless already recorded.
fn record<K: Ord + Copy, V: Copy>(log: &mut BTreeMap<K, Option<V>>, map: &BTreeMap<K, V>, key: K) {
    log.entry(key).or_insert_with(|| map.get(&key).copied());
}

/// The writes that take the touched keys from their old values to those in `now`.
fn changes<K: Ord + Copy, V: PartialEq + Copy>(
    old: BTreeMap<K, Option<V>>,
    now: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    let mut diff = MapDiff::default();
    for (key, before) in old {
        match (before, now.get(&key)) {
            (before, Some(&value)) if before != Some(value) => diff.upserts.push((key, value)),
            (Some(_), None) => diff.removals.push(key),
            _ => {}
        }
    }
    diff
}

/// The first Service (in order) whose entries overflow a map: SERVICES holds a
/// frontend plus one marker per cluster IP, SERVICE_BACKENDS the slots, BACKENDS every
/// distinct backend (terminating and unhealthy ones too).
fn overflow(
    services: BTreeMap<&ObjectKey, Usage>,
    capacities: Capacities,
) -> Result<(), PlanError> {
    let (mut vips, mut backends) = (BTreeSet::new(), BTreeSet::new());
    let (mut entries, mut slots) = (0usize, 0usize);
    for (key, usage) in services {
        for (vip, used) in usage.frontends {
            entries += 1 + usize::from(vips.insert(vip));
            slots += used;
        }
        backends.extend(usage.backends.into_keys());
        let full = [
            (entries, maps::SERVICES, capacities.services),
            (slots, maps::SERVICE_BACKENDS, capacities.slots),
            (backends.len(), maps::BACKENDS, capacities.backends),
        ]
        .into_iter()
        .find(|&(used, _, capacity)| used > capacity as usize);
        if let Some((_, map, capacity)) = full {
            return Err(PlanError::Capacity {
                service: key.clone(),
                map,
                capacity,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
