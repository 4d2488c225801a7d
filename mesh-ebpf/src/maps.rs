//! Every map of the datapath, one place. Names and capacities come from
//! `mesh_common::maps` (the `name` literals below must equal those constants; the agent
//! checks it when loading). Maps are pinned by name so that `bpftool map dump pinned
//! <bpffs>/mesh/<node>/<NAME>` reads them.

use aya_ebpf::{macros::map, maps::HashMap};
use mesh_common::{
    Backend, BackendSlotKey, ServiceKey, ServiceValue,
    maps::{BACKENDS_CAPACITY, SERVICE_BACKENDS_CAPACITY, SERVICES_CAPACITY},
};

/// Frontends (VIP, port, proto) → service id and backend count; plus VIP markers.
#[map(name = "SERVICES_V1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(SERVICES_CAPACITY, 0);

/// (service id, slot) → backend id.
#[map(name = "SVC_BACKENDS_V1")]
pub static SERVICE_BACKENDS: HashMap<BackendSlotKey, u32> =
    HashMap::pinned(SERVICE_BACKENDS_CAPACITY, 0);

/// Backend id → backend address.
#[map(name = "BACKENDS_V1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(BACKENDS_CAPACITY, 0);
