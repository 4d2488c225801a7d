//! State → desired datapath contents. Pure: no I/O, no kernel; unit-tested without root.
//!
//! [`plan`] computes the full desired contents of the service maps; [`diff`] turns
//! current and desired contents into the minimal set of writes.

mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::SocketAddrV4;

use mesh_common::maps;
use mesh_common::service::{
    Backend, BackendSlotKey, PROTO_TCP, PROTO_UDP, ServiceKey, ServiceValue,
};

use crate::state::{ObjectKey, State};

/// Desired contents of the SERVICES, SERVICE_BACKENDS and BACKENDS maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Frontends, plus one VIP marker (`id: 0, count: 0`) per cluster IP.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// (service id, slot 1..=count) → backend id.
    pub slots: BTreeMap<BackendSlotKey, u32>,
    /// Backend id → backend, one per distinct (address, port, protocol).
    pub backends: BTreeMap<u32, Backend>,
    /// The same frontends in readable form, for logs and status; ordered by Service
    /// (namespace/name), cluster IP and port.
    pub frontends: Vec<FrontendInfo>,
}

/// A frontend as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendInfo {
    /// The Service.
    pub service: ObjectKey,
    /// `spec.ports[].name`, "" when unnamed.
    pub port_name: String,
    /// Cluster IP and Service port.
    pub addr: SocketAddrV4,
    /// [`PROTO_TCP`] or [`PROTO_UDP`].
    pub proto: u8,
    /// Service id in the maps.
    pub id: u32,
    /// Ready backends in slot order (slot = index + 1).
    pub backends: Vec<BackendInfo>,
}

/// A backend as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Pod address and target port.
    pub addr: SocketAddrV4,
    /// The Pod, when known (selected by label, or named by an EndpointSlice's targetRef).
    pub pod: Option<ObjectKey>,
    /// Backend id in the maps.
    pub id: u32,
}

impl fmt::Display for FrontendInfo {
    /// `default/web:http 10.96.0.10:80/TCP -> 10.244.1.5:8080 (default/web-1), …`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let proto = match self.proto {
            PROTO_TCP => "TCP",
            PROTO_UDP => "UDP",
            _ => "?",
        };
        write!(
            f,
            "{}:{} {}/{proto} ->",
            self.service, self.port_name, self.addr
        )?;
        if self.backends.is_empty() {
            return f.write_str(" (no ready backend)");
        }
        for (i, b) in self.backends.iter().enumerate() {
            f.write_str(if i == 0 { " " } else { ", " })?;
            write!(f, "{}", b.addr)?;
            if let Some(pod) = &b.pod {
                write!(f, " ({pod})")?;
            }
        }
        Ok(())
    }
}

/// Service and backend ids, carried from one plan to the next so that unchanged
/// frontends and backends keep their ids and their map entries are not rewritten.
///
/// Pass the `Ids` of the plan that was last applied to the maps: an id freed by a plan
/// is only handed out again by a later one, because until the datapath has applied the
/// plan, stale entries may still name the freed id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// Frontend → service id.
    services: BTreeMap<ServiceKey, u32>,
    /// Backend (address, port, protocol) → backend id.
    backends: BTreeMap<Backend, u32>,
}

impl Ids {
    /// The ids a datapath already uses (an earlier agent's maps, adopted at startup), so
    /// the first plan keeps them instead of renumbering live entries.
    pub fn from_datapath(
        services: &BTreeMap<ServiceKey, ServiceValue>,
        backends: &BTreeMap<u32, Backend>,
    ) -> Self {
        Self {
            services: services
                .iter()
                .filter(|(k, _)| !k.is_vip_marker())
                .map(|(k, v)| (*k, v.id))
                .collect(),
            backends: backends.iter().map(|(id, b)| (*b, *id)).collect(),
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The state needs more entries than a map holds; nothing was planned.
    #[error(
        "Service {service} does not fit in map {map} (capacity {capacity} entries); remove Services or endpoints"
    )]
    Capacity {
        /// The first Service (in namespace/name order) that did not fit.
        service: ObjectKey,
        /// Map name, as pinned.
        map: &'static str,
        /// Capacity of that map.
        capacity: u32,
    },
}

/// Computes the desired service maps for `state`, reusing the ids of `prev` where the
/// frontend or backend still exists. Returns the plan and the ids to pass next time.
///
/// Backends of a frontend are sorted by address and port before slots are numbered,
/// so the same state always gives the same plan.
pub fn plan(state: &State, prev: &Ids) -> Result<(Plan, Ids), PlanError> {
    let frontends = services::frontends(state);
    check_capacity(&frontends, &MAP_LIMITS)?;

    let ids = Ids {
        services: allocate(
            &prev.services,
            frontends
                .iter()
                .map(|f| ServiceKey::new(f.vip.into(), f.port, f.proto)),
        ),
        backends: allocate(
            &prev.backends,
            frontends
                .iter()
                .flat_map(|f| f.backends.iter().map(|b| backend(b.addr, f.proto))),
        ),
    };

    let mut plan = Plan::default();
    for f in frontends {
        let key = ServiceKey::new(f.vip.into(), f.port, f.proto);
        let id = ids.services[&key];
        let mut infos = Vec::with_capacity(f.backends.len());
        for (slot, b) in (1..).zip(f.backends) {
            let value = backend(b.addr, f.proto);
            let backend_id = ids.backends[&value];
            plan.slots.insert(
                BackendSlotKey {
                    service_id: id,
                    slot,
                },
                backend_id,
            );
            plan.backends.insert(backend_id, value);
            infos.push(BackendInfo {
                addr: b.addr,
                pod: b.pod,
                id: backend_id,
            });
        }
        let count = u32::try_from(infos.len()).expect("bounded by SERVICE_BACKENDS_CAPACITY");
        plan.services.insert(
            ServiceKey::vip_marker(f.vip.into()),
            ServiceValue { id: 0, count: 0 },
        );
        plan.services.insert(key, ServiceValue { id, count });
        plan.frontends.push(FrontendInfo {
            service: f.service,
            port_name: f.port_name,
            addr: SocketAddrV4::new(f.vip, f.port),
            proto: f.proto,
            id,
            backends: infos,
        });
    }
    Ok((plan, ids))
}

fn backend(addr: SocketAddrV4, proto: u8) -> Backend {
    Backend::new((*addr.ip()).into(), addr.port(), proto)
}

/// Capacity of each service map, as (name, entries).
struct Limits {
    services: (&'static str, u32),
    slots: (&'static str, u32),
    backends: (&'static str, u32),
}

/// The maps the datapath creates.
const MAP_LIMITS: Limits = Limits {
    services: (maps::SERVICES, maps::SERVICES_CAPACITY),
    slots: (maps::SERVICE_BACKENDS, maps::SERVICE_BACKENDS_CAPACITY),
    backends: (maps::BACKENDS, maps::BACKENDS_CAPACITY),
};

/// Fails on the first Service whose entries would overflow a map.
fn check_capacity(frontends: &[services::Frontend], limits: &Limits) -> Result<(), PlanError> {
    let (mut vips, mut backends) = (BTreeSet::new(), BTreeSet::new());
    let (mut entries, mut slots) = (0usize, 0usize);
    for f in frontends {
        entries += 1 + usize::from(vips.insert(f.vip));
        slots += f.backends.len();
        backends.extend(f.backends.iter().map(|b| (b.addr, f.proto)));
        let full = [
            (entries, limits.services),
            (slots, limits.slots),
            (backends.len(), limits.backends),
        ]
        .into_iter()
        .find(|&(used, (_, capacity))| used > capacity as usize);
        if let Some((_, (map, capacity))) = full {
            return Err(PlanError::Capacity {
                service: f.service.clone(),
                map,
                capacity,
            });
        }
    }
    Ok(())
}

/// Ids for `wanted` keys: a key of `prev` keeps its id; a new key gets the lowest id
/// (from 1: 0 means "none" in the maps) that `prev` does not use.
fn allocate<K: Ord + Clone>(
    prev: &BTreeMap<K, u32>,
    wanted: impl Iterator<Item = K>,
) -> BTreeMap<K, u32> {
    let taken: BTreeSet<u32> = prev.values().copied().collect();
    let mut next = 1;
    let mut ids = BTreeMap::new();
    for key in wanted.collect::<BTreeSet<_>>() {
        let id = prev.get(&key).copied().unwrap_or_else(|| {
            while taken.contains(&next) {
                next += 1;
            }
            next += 1;
            next - 1
        });
        ids.insert(key, id);
    }
    ids
}

/// The writes that turn a map's `current` contents into `desired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// Keys to insert or overwrite (new, or changed value), in key order.
    pub upserts: Vec<(K, V)>,
    /// Keys to delete (absent from `desired`), in key order.
    pub removals: Vec<K>,
}

/// Compares a map's current and desired contents; unchanged keys are left out.
pub fn diff<K: Ord + Clone, V: PartialEq + Clone>(
    current: &BTreeMap<K, V>,
    desired: &BTreeMap<K, V>,
) -> MapDiff<K, V> {
    MapDiff {
        upserts: desired
            .iter()
            .filter(|&(k, v)| current.get(k) != Some(v))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        removals: current
            .keys()
            .filter(|k| !desired.contains_key(k))
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests;
