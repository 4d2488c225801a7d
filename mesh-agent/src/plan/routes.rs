//! GAMMA: HTTPRoutes attached to Services, compiled into the node proxy's route tables
//! ([`mesh_common::l7::RouteTable`]), with the route status the Gateway API defines
//! (Accepted, ResolvedRefs) for `mesh-agent routes`.
//!
//! Pure: State in, tables and statuses out.

use std::collections::BTreeMap;

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
    let mut compiled = CompiledRoutes::default();
    for (key, svc) in state.services() {
        let ports = svc.spec.iter().flat_map(|spec| spec.ports.iter().flatten());
        for port in ports {
            let Some(protocol) = port.app_protocol.as_deref().and_then(app_protocol) else {
                continue;
            };
            if port.protocol.as_deref().is_some_and(|p| p != "TCP") {
                continue;
            }
            let Ok(number) = u16::try_from(port.port) else {
                continue;
            };
            compiled.l7_ports.insert(
                ServicePortRef {
                    service: object_ref(key),
                    port: number,
                },
                protocol,
            );
        }
    }
    compiled
}

/// The L7 protocol an `appProtocol` value declares, if any.
pub fn app_protocol(value: &str) -> Option<AppProtocol> {
    match value {
        "http" => Some(AppProtocol::Http),
        "kubernetes.io/h2c" => Some(AppProtocol::H2c),
        "grpc" => Some(AppProtocol::Grpc),
        _ => None,
    }
}

/// The schema's name for an object key.
pub fn object_ref(key: &ObjectKey) -> ObjectRef {
    ObjectRef {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}
