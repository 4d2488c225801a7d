//! Map capacities: what each map of the registry ([`mesh_common::maps::REGISTRY`]) is
//! created with.
//!
//! The kernel charges a hash map without preallocation only for its buckets and the
//! entries it holds, so the maps the agent fills from the cluster state keep generous
//! capacities (a flag each). LRU maps cannot skip preallocation: the maps that hold
//! per-connection state (reverse translation, affinity, UDP peers, sockmap sockets) are
//! charged in full when created. Those are sized as Cilium sizes its connection-tracking
//! maps (`bpf-map-dynamic-size-ratio`): together they may take a fraction of the node's
//! memory (`--map-size-ratio`), each a share in proportion to its registry capacity,
//! clamped to its `min` and that capacity. An explicit `--map-size-*` flag wins.

use std::collections::BTreeMap;

use mesh_common::maps::{self, MapSpec, REGISTRY, Sizing};

use crate::plan::{Capacities, policy::PolicyCapacities};

/// Cilium's default `bpf-map-dynamic-size-ratio`: 0.25 % of the node's memory.
pub const DEFAULT_RATIO: f64 = 0.0025;

/// Capacities from node memory are rounded down to a multiple of this, so that `status`
/// shows round numbers.
const GRANULE: u32 = 1024;

/// Capacity (entries; bytes for a ring buffer) of every map of the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapSizes {
    entries: [u32; REGISTRY.len()],
}

impl Default for MapSizes {
    /// The registry's capacities: the ceilings of the maps sized by node memory.
    fn default() -> Self {
        Self {
            entries: REGISTRY.map(|spec| spec.capacity),
        }
    }
}

impl MapSizes {
    /// The capacities for a node with `node_memory` bytes of memory: maps sized by a
    /// flag get their registry capacity, maps sized by node memory a share of `ratio`
    /// of it (a ratio of 0 gives them their ceiling); `explicit` (flag without dashes →
    /// entries) wins over both. Maps sharing a flag get one size.
    pub fn for_node(node_memory: u64, ratio: f64, explicit: &BTreeMap<&str, u32>) -> Self {
        let ceiling_bytes: f64 = REGISTRY
            .iter()
            .filter(|spec| matches!(spec.sizing, Sizing::NodeMemory { .. }))
            .map(|spec| f64::from(spec.capacity) * entry_bytes(spec) as f64)
            .sum();
        let budget = node_memory as f64 * ratio;
        // The same fraction of every ceiling: the shares keep the registry's proportions.
        let scale = if ratio > 0.0 && ceiling_bytes > 0.0 {
            (budget / ceiling_bytes).min(1.0)
        } else {
            1.0
        };
        let entries = REGISTRY.map(|spec| {
            if let Some(&n) = spec.sizing.flag().and_then(|flag| explicit.get(flag)) {
                return n;
            }
            match spec.sizing {
                Sizing::NodeMemory { min, .. } => {
                    let share = (f64::from(spec.capacity) * scale) as u32;
                    (share / GRANULE * GRANULE).clamp(min, spec.capacity)
                }
                Sizing::Fixed | Sizing::Flag(_) => spec.capacity,
            }
        });
        Self { entries }
    }

    /// Capacity of map `name` (a registry name; any other has none: 0).
    pub fn get(&self, name: &str) -> u32 {
        REGISTRY
            .iter()
            .position(|spec| spec.name == name)
            .map_or(0, |i| self.entries[i])
    }

    /// Records the real capacity of map `name` (an adopted map keeps its own).
    pub fn set(&mut self, name: &str, entries: u32) {
        if let Some(i) = REGISTRY.iter().position(|spec| spec.name == name) {
            self.entries[i] = entries;
        }
    }

    /// The capacities the service planner checks a state against.
    pub fn capacities(&self) -> Capacities {
        Capacities {
            services: self.get(maps::SERVICES),
            slots: self.get(maps::SERVICE_BACKENDS),
            backends: self.get(maps::BACKENDS),
        }
    }

    /// The capacities the policy planner checks a state against.
    pub fn policy_capacities(&self) -> PolicyCapacities {
        PolicyCapacities {
            endpoints: self.get(maps::ENDPOINTS),
            ipcache: self.get(maps::IPCACHE),
            policy: self.get(maps::POLICY),
        }
    }

    /// Every map with its capacity, in registry order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static MapSpec, u32)> + '_ {
        REGISTRY.iter().zip(self.entries.iter().copied())
    }

    /// Estimated kernel memory of the maps sized by node memory, in bytes: what
    /// `--map-size-ratio` budgets.
    pub fn per_connection_bytes(&self) -> u64 {
        self.iter()
            .filter(|(spec, _)| matches!(spec.sizing, Sizing::NodeMemory { .. }))
            .map(|(spec, n)| u64::from(n) * entry_bytes(spec))
            .sum()
    }
}

/// Estimated kernel bytes per entry of a map sized by node memory (all hash maps), after
/// the kernel's `htab_map_mem_usage` for a preallocated one: a hash element (48-byte
/// header, key and value each rounded up to 8 bytes) and its 16-byte bucket (a
/// power-of-two count, so one per entry at the registry's capacities). A sockhash
/// allocates its elements with the sockets, but is counted alike, so that SOCKS and
/// SOCK_PATHS, which hold the same sockets, weigh alike.
fn entry_bytes(spec: &MapSpec) -> u64 {
    let round8 = |n: u32| u64::from(n.div_ceil(8) * 8);
    48 + 16 + round8(spec.key_size) + round8(spec.value_size)
}

/// The node's memory (`MemTotal` of /proc/meminfo), in bytes.
pub fn node_memory() -> std::io::Result<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")?;
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|kib| kib.trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| std::io::Error::other("no MemTotal in /proc/meminfo"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn node_memory_maps() -> impl Iterator<Item = (&'static MapSpec, u32)> {
        REGISTRY.iter().filter_map(|spec| match spec.sizing {
            Sizing::NodeMemory { min, .. } => Some((spec, min)),
            _ => None,
        })
    }

    #[test]
    fn maps_filled_from_the_state_keep_their_registry_capacity() {
        for memory in [GIB / 4, 2 * GIB, 64 * GIB] {
            let sizes = MapSizes::for_node(memory, DEFAULT_RATIO, &BTreeMap::new());
            for spec in REGISTRY
                .iter()
                .filter(|s| !matches!(s.sizing, Sizing::NodeMemory { .. }))
            {
                assert_eq!(
                    sizes.get(spec.name),
                    spec.capacity,
                    "{} at {memory}",
                    spec.name
                );
            }
        }
    }

    #[test]
    fn per_connection_maps_take_a_share_of_node_memory_within_their_clamps() {
        // (node memory, ratio, expected REV_NAT entries): the ceiling on a big node, the
        // floor on a small one, in between a share of the budget.
        let rev_nat_ceiling = maps::spec(maps::REV_NAT).capacity;
        for (memory, ratio, rev_nat) in [
            (64 * GIB, DEFAULT_RATIO, rev_nat_ceiling),
            (24 * GIB, DEFAULT_RATIO, 229_376),
            (4 * GIB, DEFAULT_RATIO, 37_888),
            (GIB / 4, DEFAULT_RATIO, 16_384),
            (GIB / 4, 0.0, rev_nat_ceiling),
        ] {
            let sizes = MapSizes::for_node(memory, ratio, &BTreeMap::new());
            assert_eq!(
                sizes.get(maps::REV_NAT),
                rev_nat,
                "{memory} bytes, ratio {ratio}"
            );
            for (spec, min) in node_memory_maps() {
                let n = sizes.get(spec.name);
                assert!(
                    (min..=spec.capacity).contains(&n) && n.is_multiple_of(GRANULE),
                    "{}: {n} at {memory} bytes",
                    spec.name
                );
            }
            let dynamic = sizes.per_connection_bytes();
            let floor: u64 = node_memory_maps()
                .map(|(spec, min)| u64::from(min) * entry_bytes(spec))
                .sum();
            if ratio > 0.0 {
                assert!(
                    dynamic as f64 <= (memory as f64 * ratio).max(floor as f64),
                    "{dynamic} bytes over the budget of {memory} x {ratio}"
                );
            }
        }
    }

    #[test]
    fn an_explicit_flag_wins_and_sizes_every_map_sharing_it() {
        let explicit = BTreeMap::from([
            ("map-size-rev-nat", 1_000),
            ("map-size-socks", 2_000),
            ("map-size-services", 100),
        ]);
        let sizes = MapSizes::for_node(GIB / 4, DEFAULT_RATIO, &explicit);
        assert_eq!(
            sizes.get(maps::REV_NAT),
            1_000,
            "below the floor: the operator decides"
        );
        assert_eq!(sizes.get(maps::SOCKS), 2_000);
        assert_eq!(sizes.get(maps::SOCK_PATHS), 2_000);
        assert_eq!(sizes.capacities().services, 100);
        assert_eq!(
            sizes.get(maps::AFFINITY),
            4_096,
            "the others as the node gives"
        );
    }

    #[test]
    fn recorded_sizes_replace_the_requested_ones() {
        let mut sizes = MapSizes::default();
        sizes.set(maps::POLICY, 10);
        sizes.set("NOT_A_MAP", 10);
        assert_eq!(sizes.policy_capacities().policy, 10);
        assert_eq!(sizes.get("NOT_A_MAP"), 0);
        assert_eq!(sizes.iter().count(), REGISTRY.len());
    }

    #[test]
    fn the_estimate_matches_what_the_kernel_charged_before_no_prealloc() {
        // Measured with `bpftool map show` (memlock) on kernel 6.18 for the registry's
        // capacities, all preallocated then.
        for (name, memlock) in [
            (maps::REV_NAT, 31_458_240),
            (maps::SOCK_PATHS, 7_340_992),
            (maps::AFFINITY, 6_292_416),
            (maps::SERVICE_BACKENDS, 20_972_624),
        ] {
            let spec = maps::spec(name);
            let estimate = u64::from(spec.capacity) * entry_bytes(&spec);
            let off = estimate.abs_diff(memlock) as f64 / memlock as f64;
            assert!(off < 0.01, "{name}: estimate {estimate}, kernel {memlock}");
        }
    }
}
