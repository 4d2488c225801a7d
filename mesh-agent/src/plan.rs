//! State → desired datapath contents. Pure: no I/O, no kernel; unit-tested without root.
//!
//! [`plan`] computes the full desired contents of the service maps; [`diff`] turns
//! current and desired contents into the minimal set of writes.
//!
//! The plan follows kube-proxy: every cluster IP of both families is a frontend whose
//! backends are the ready endpoints of its family; terminating endpoints keep a backend
//! entry (so their connections and affinity entries are recognisable) but get no slot;
//! ClientIP session affinity and `trafficDistribution` are honoured. On top of that,
//! backends a health checker reports unhealthy lose their slots, failing open when a
//! whole frontend would be left without one (see `services::select`).

mod identity;
mod ids;
mod planner;
pub mod policy;
pub mod proxy;
pub mod routes;
pub mod security;
mod selector;
mod services;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_common::Addr;
use mesh_common::l7::{AppProtocol, ServicePortRef};
use mesh_common::maps;
use mesh_common::service::{
    BACKEND_ACTIVE, BACKEND_TERMINATING, BACKEND_UNHEALTHY, Backend, BackendSlotKey, PROTO_TCP,
    Protocol, ServiceKey, ServiceValue,
};

use crate::state::{ObjectKey, State};
pub use planner::{Delta, Pending, Planner};

/// What a plan depends on besides the cluster state.
#[derive(Clone, Copy, Debug)]
pub struct PlanContext<'a> {
    /// This agent's node name, as Pods' `spec.nodeName` and EndpointSlice endpoints'
    /// `nodeName` give it; for topology-aware routing. "" matches no backend.
    pub node: &'a str,
    /// Backends the health checker found unhealthy.
    pub unhealthy: &'a BTreeSet<BackendAddr>,
    /// Entries the service maps hold.
    pub capacities: Capacities,
    /// Service ports the node proxy serves ([`routes::CompiledRoutes::l7_ports`]): their
    /// TCP frontends get [`SVC_FLAG_L7`], so connect() sends clients to the proxy.
    pub l7_ports: &'a BTreeMap<ServicePortRef, AppProtocol>,
}

/// Entries the service maps hold, as the datapath created them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacities {
    /// SERVICES: frontends plus one VIP marker per cluster IP.
    pub services: u32,
    /// SERVICE_BACKENDS: slots of all frontends.
    pub slots: u32,
    /// BACKENDS: distinct backends.
    pub backends: u32,
}

impl Default for Capacities {
    /// The default map sizes of [`mesh_common::maps`].
    fn default() -> Self {
        Self {
            services: maps::spec(maps::SERVICES).capacity,
            slots: maps::spec(maps::SERVICE_BACKENDS).capacity,
            backends: maps::spec(maps::BACKENDS).capacity,
        }
    }
}

/// A backend's address, port and protocol: what identifies it in the maps and to a
/// health checker. IPv4 backends are `SocketAddr::V4`, never IPv4-mapped V6.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BackendAddr {
    /// Pod address and target port.
    pub addr: SocketAddr,
    /// [`Protocol`] code: [`PROTO_TCP`] or UDP.
    pub proto: u8,
}

impl BackendAddr {
    /// The backend `addr/proto`.
    pub const fn new(addr: SocketAddr, proto: u8) -> Self {
        Self { addr, proto }
    }

    /// The map value for this backend in `state` (`BACKEND_*`).
    pub fn to_backend(self, state: u8) -> Backend {
        Backend {
            state,
            ..Backend::new(Addr::from(self.addr.ip()), self.addr.port(), self.proto)
        }
    }
}

impl From<&Backend> for BackendAddr {
    fn from(b: &Backend) -> Self {
        Self {
            addr: SocketAddr::new(IpAddr::from(b.addr), u16::from_be(b.port)),
            proto: b.proto,
        }
    }
}

impl fmt::Display for BackendAddr {
    /// `10.244.0.1:8080/TCP`, `[fd00::1]:53/UDP`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, proto_name(self.proto))
    }
}

fn proto_name(proto: u8) -> &'static str {
    Protocol::from_u8(proto).map_or("?", Protocol::as_str)
}

/// Desired contents of the SERVICES, SERVICE_BACKENDS and BACKENDS maps.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Frontends, plus one VIP marker ([`ServiceValue::MARKER`]) per cluster IP.
    pub services: BTreeMap<ServiceKey, ServiceValue>,
    /// (service id, slot 1..=count) → backend id.
    pub slots: BTreeMap<BackendSlotKey, u32>,
    /// Backend id → backend, one per distinct (address, port, protocol), with its state.
    ///
    /// A backend may serve several frontends, and its state is the best any of them
    /// gives it: `BACKEND_ACTIVE` if it is ready and not left out for health by some
    /// frontend (whether or not topology gives it a slot there), otherwise
    /// `BACKEND_TERMINATING` if it is terminating, otherwise `BACKEND_UNHEALTHY`.
    pub backends: BTreeMap<u32, Backend>,
    /// The same frontends in readable form, for logs and status; ordered by Service
    /// (namespace/name), cluster IP (primary family first) and port. Shared, so a
    /// snapshot of them costs no copy of each.
    pub frontends: Vec<Arc<FrontendInfo>>,
    /// What computing the plan cost.
    pub cost: PlanCost,
}

/// The work a plan took, in units that do not depend on the machine: label selection
/// goes through an index, so this grows with the objects and the matches, not with
/// Services × Pods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PlanCost {
    /// Objects (Pods, or groups of Pods sharing labels) checked against a selector.
    pub selector_candidates: u64,
    /// Services planned: all of them the first time, then those a change touched.
    pub services: u64,
}

impl Plan {
    /// The backends a health checker should probe: every TCP backend that is active or
    /// unhealthy (terminating ones are on their way out).
    pub fn probe_targets(&self) -> BTreeSet<BackendAddr> {
        self.backends
            .values()
            .filter(|b| b.proto == PROTO_TCP && b.state != BACKEND_TERMINATING)
            .map(BackendAddr::from)
            .collect()
    }

    /// Every backend of the plan, whatever its state.
    pub fn backend_addrs(&self) -> BTreeSet<BackendAddr> {
        self.backends.values().map(BackendAddr::from).collect()
    }

    /// Whether backend `backend_id` has a slot of service `service_id`: the pairs a
    /// session affinity entry may still name; affinity entries for any other pair are
    /// stale.
    pub fn slotted(&self, service_id: u32, backend_id: u32) -> bool {
        let first = BackendSlotKey {
            service_id,
            slot: 0,
        };
        self.slots
            .range(first..)
            .take_while(|(k, _)| k.service_id == service_id)
            .any(|(_, &b)| b == backend_id)
    }
}

/// A frontend as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendInfo {
    /// The Service.
    pub service: ObjectKey,
    /// `spec.ports[].name`, "" when unnamed.
    pub port_name: String,
    /// Cluster IP (either family) and Service port.
    pub addr: SocketAddr,
    /// [`Protocol`] code: [`PROTO_TCP`] or UDP.
    pub proto: u8,
    /// Service id in the maps.
    pub id: u32,
    /// ClientIP session affinity timeout, when the Service asks for affinity.
    pub affinity_timeout_s: Option<u32>,
    /// `spec.trafficDistribution` prefers close endpoints.
    pub prefer_close: bool,
    /// Every ready backend is unhealthy: all of them keep their slots (fail open).
    pub health_panic: bool,
    /// Served by the node proxy (L7): connect() goes to the proxy in the client's pod,
    /// which picks the backend per request.
    pub l7: bool,
    /// All backends of the frontend: those in slots first, in slot order (slot =
    /// index + 1), then the others (terminating, unhealthy, or left out by topology)
    /// by address.
    pub backends: Vec<BackendInfo>,
}

/// A backend as an operator reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendInfo {
    /// Pod address and target port.
    pub addr: SocketAddr,
    /// The Pod, when known (selected by label, or named by an EndpointSlice's targetRef).
    pub pod: Option<ObjectKey>,
    /// Backend id in the maps.
    pub id: u32,
    /// `BACKEND_*` state as this frontend sees it (the map holds the best state any
    /// frontend gives it, see [`Plan::backends`]).
    pub state: u8,
    /// The node it runs on, when known.
    pub node: Option<String>,
    /// Whether it has a slot of this frontend.
    pub in_slot: bool,
}

impl fmt::Display for FrontendInfo {
    /// `default/web:http 10.96.0.10:80/TCP [affinity 10800s] [prefer-close] ->
    /// 10.244.0.5:8080 (default/web-1), 10.244.0.6:8080 (default/web-2) [terminating]`
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{} {}/{}",
            self.service,
            self.port_name,
            self.addr,
            proto_name(self.proto)
        )?;
        if let Some(timeout) = self.affinity_timeout_s {
            write!(f, " [affinity {timeout}s]")?;
        }
        if self.prefer_close {
            f.write_str(" [prefer-close]")?;
        }
        if self.health_panic {
            f.write_str(" [all unhealthy: failing open]")?;
        }
        if self.l7 {
            f.write_str(" [l7]")?;
        }
        f.write_str(" ->")?;
        if !self.backends.first().is_some_and(|b| b.in_slot) {
            f.write_str(" (no ready backend)")?;
        }
        for (i, b) in self.backends.iter().enumerate() {
            f.write_str(if i == 0 && b.in_slot { " " } else { ", " })?;
            write!(f, "{}", b.addr)?;
            if let Some(pod) = &b.pod {
                write!(f, " ({pod})")?;
            }
            match (b.state, b.in_slot) {
                (_, true) => {}
                (BACKEND_ACTIVE, false) => f.write_str(" [not preferred]")?,
                (BACKEND_TERMINATING, _) => f.write_str(" [terminating]")?,
                (BACKEND_UNHEALTHY, _) => f.write_str(" [unhealthy]")?,
                _ => f.write_str(" [?]")?,
            }
        }
        Ok(())
    }
}

/// Service and backend ids, carried from one plan to the next so that unchanged
/// frontends and backends keep their ids and their map entries are not rewritten.
/// A backend keeps its id through state changes (ready, terminating, unhealthy).
///
/// Pass the `Ids` of the plan that was last applied to the maps: an id freed by a plan
/// is only handed out again by a later one, because until the datapath has applied the
/// plan, stale entries may still name the freed id.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ids {
    /// Frontend → service id.
    services: BTreeMap<ServiceKey, u32>,
    /// Backend (address, port, protocol) → backend id.
    backends: BTreeMap<BackendAddr, u32>,
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
            backends: backends
                .iter()
                .map(|(id, b)| (BackendAddr::from(b), *id))
                .collect(),
        }
    }
}

/// Why no plan could be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    /// The state needs more entries than a map holds; nothing was planned.
    #[error(
        "Service {service} does not fit in map {map} (capacity {capacity} entries); remove Services or endpoints, or enlarge the map"
    )]
    Capacity {
        /// The first Service (in namespace/name order) that did not fit.
        service: ObjectKey,
        /// Map name, as pinned.
        map: &'static str,
        /// Capacity of that map.
        capacity: u32,
    },
    /// The network policies need more entries than a policy map holds; nothing was
    /// planned.
    #[error(
        "network policy needs {needed} entries in map {map} (capacity {capacity}); remove policies, rules or pods, or enlarge the map"
    )]
    PolicyCapacity {
        /// Map name, as pinned.
        map: &'static str,
        /// Capacity of that map.
        capacity: u32,
        /// Entries the plan needs there.
        needed: usize,
    },
}

/// Computes the desired service maps for `state`, reusing the ids of `prev` where the
/// frontend or backend still exists. Returns the plan and the ids to pass next time.
/// This is [`Planner`]'s first plan; the agent keeps a planner, which re-plans only what
/// a change touches.
///
/// Backends of a frontend are sorted by address and port before slots are numbered,
/// so the same state and context always give the same plan.
pub fn plan(state: &State, prev: &Ids, ctx: &PlanContext<'_>) -> Result<(Plan, Ids), PlanError> {
    let mut planner = Planner::new(prev.clone());
    let pending = planner.prepare(&Arc::new(state.clone()), ctx)?;
    planner.commit(pending);
    let ids = planner.ids();
    Ok((planner.into_plan(), ids))
}

/// The writes that turn a map's `current` contents into `desired`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDiff<K, V> {
    /// Keys to insert or overwrite (new, or changed value), in key order.
    pub upserts: Vec<(K, V)>,
    /// Keys to delete (absent from `desired`), in key order.
    pub removals: Vec<K>,
}

impl<K, V> MapDiff<K, V> {
    /// Nothing to write.
    pub fn is_empty(&self) -> bool {
        self.upserts.is_empty() && self.removals.is_empty()
    }
}

impl<K, V> Default for MapDiff<K, V> {
    fn default() -> Self {
        Self {
            upserts: Vec::new(),
            removals: Vec::new(),
        }
    }
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
