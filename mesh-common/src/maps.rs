//! Map names and capacities: the contract between the kernel programs, the agent and
//! anyone reading `<bpffs>/mesh/<node>/` with bpftool.
//!
//! A name is also the file name of the map's pin. A layout change bumps the suffix.

/// Frontends: (VIP, port, protocol) → service id and backend count.
pub const SERVICES: &str = "SERVICES_V1";
/// Backend slots: (service id, slot 1..=count) → backend id.
pub const SERVICE_BACKENDS: &str = "SVC_BACKENDS_V1";
/// Backends: backend id → address, port, protocol.
pub const BACKENDS: &str = "BACKENDS_V1";

/// Capacity of [`SERVICES`] (frontends, plus one VIP marker per cluster IP).
pub const SERVICES_CAPACITY: u32 = 65_536;
/// Capacity of [`SERVICE_BACKENDS`] (sum of all frontends' backend counts).
pub const SERVICE_BACKENDS_CAPACITY: u32 = 262_144;
/// Capacity of [`BACKENDS`] (distinct backend address/port/protocol triples).
pub const BACKENDS_CAPACITY: u32 = 131_072;

/// Names of the attached programs, as pinned under `<bpffs>/mesh/<node>/`.
pub mod programs {
    /// cgroup/connect4: service translation for IPv4 connect().
    pub const CONNECT4: &str = "mesh_connect4";
}
