//! Reading the kernel's load-balancing table back from the pinned maps, for
//! `mesh-agent services`: what the datapath really holds, not what the agent meant.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{HashMap, Map, MapData};
use mesh_common::{
    Addr, Backend, BackendSlotKey, ServiceKey, ServiceValue, maps,
    service::{BackendState, Protocol, SVC_FLAG_AFFINITY},
};

use super::{
    DatapathError,
    sync::{KernelMap, MapStore as _},
};

/// One frontend and the backends of its slots, in slot order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FrontendRow {
    /// Frontend key as stored.
    pub key: ServiceKey,
    /// Service id and backend count as stored.
    pub value: ServiceValue,
    /// `Some(backend)` per slot 1..=count; `None` for a slot or backend that is missing.
    pub backends: Vec<Option<Backend>>,
}

/// The whole table: frontends, the cluster-IP markers, and backends without a slot.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    /// Frontends, sorted by address, port, protocol.
    pub frontends: Vec<FrontendRow>,
    /// Addresses marked as cluster IPs.
    pub vips: Vec<Addr>,
    /// Backends in no slot (terminating, unhealthy, or not preferred), by id.
    pub idle_backends: Vec<(u32, Backend)>,
}

fn open<K: aya::Pod, V: aya::Pod>(
    node_dir: &Path,
    name: &'static str,
) -> Result<KernelMap<K, V>, DatapathError> {
    let path = node_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| match &e {
        aya::maps::MapError::SyscallError(s)
            if s.io_error.kind() == std::io::ErrorKind::NotFound =>
        {
            DatapathError::NotPinned(node_dir.into())
        }
        _ => DatapathError::Map {
            name,
            source: Box::new(e),
        },
    })?;
    let map = HashMap::try_from(Map::HashMap(data)).map_err(|e| DatapathError::Map {
        name,
        source: Box::new(e),
    })?;
    Ok(KernelMap::new(name, map))
}

/// Reads the table pinned under `node_dir`.
pub fn read_services(node_dir: &Path) -> Result<ServiceTable, DatapathError> {
    let services: KernelMap<ServiceKey, ServiceValue> = open(node_dir, maps::SERVICES)?;
    let slots: KernelMap<BackendSlotKey, u32> = open(node_dir, maps::SERVICE_BACKENDS)?;
    let backends: KernelMap<u32, Backend> = open(node_dir, maps::BACKENDS)?;
    let read = |e: super::sync::SyncError| DatapathError::Io {
        op: "read",
        path: node_dir.into(),
        source: std::io::Error::other(e.to_string()),
    };
    Ok(build_table(
        &services.entries().map_err(read)?,
        &slots.entries().map_err(read)?,
        &backends.entries().map_err(read)?,
    ))
}

/// Joins the three maps into rows (pure, so it is tested without a kernel).
fn build_table(
    services: &BTreeMap<ServiceKey, ServiceValue>,
    slots: &BTreeMap<BackendSlotKey, u32>,
    backends: &BTreeMap<u32, Backend>,
) -> ServiceTable {
    let mut table = ServiceTable::default();
    let in_slot: BTreeSet<u32> = slots.values().copied().collect();
    table.idle_backends = backends
        .iter()
        .filter(|(id, _)| !in_slot.contains(id))
        .map(|(id, b)| (*id, *b))
        .collect();
    for (key, value) in services {
        if key.is_vip_marker() {
            table.vips.push(key.addr);
            continue;
        }
        let backends = (1..=value.count)
            .map(|slot| {
                slots
                    .get(&BackendSlotKey {
                        service_id: value.id,
                        slot,
                    })
                    .and_then(|id| backends.get(id))
                    .copied()
            })
            .collect();
        table.frontends.push(FrontendRow {
            key: *key,
            value: *value,
            backends,
        });
    }
    let order = |k: &ServiceKey| (IpAddr::from(k.addr), u16::from_be(k.port), k.proto);
    table.frontends.sort_by_key(|r| order(&r.key));
    table.vips.sort_by_key(|a| IpAddr::from(*a));
    table
}

fn proto_name(proto: u8) -> String {
    Protocol::from_u8(proto).map_or_else(|| format!("proto{proto}"), |p| p.as_str().into())
}

fn socket(addr: Addr, port_be: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::from(addr), u16::from_be(port_be))
}

impl fmt::Display for ServiceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<32} {:>5}  BACKENDS", "FRONTEND", "ID")?;
        for row in &self.frontends {
            let mut frontend = format!(
                "{}/{}",
                socket(row.key.addr, row.key.port),
                proto_name(row.key.proto)
            );
            if row.value.flags & SVC_FLAG_AFFINITY != 0 {
                frontend.push_str(&format!(" affinity={}s", row.value.affinity_timeout_s));
            }
            let backends = if row.backends.is_empty() {
                "(no ready backend: connect refused)".to_string()
            } else {
                row.backends
                    .iter()
                    .map(|b| match b {
                        Some(b) => socket(b.addr, b.port).to_string(),
                        None => "(missing)".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(f, "{frontend:<32} {:>5}  {backends}", row.value.id)?;
        }
        for vip in &self.vips {
            writeln!(
                f,
                "{:<32} {:>5}  (cluster IP: other ports refused)",
                IpAddr::from(*vip).to_string(),
                "-"
            )?;
        }
        for (id, b) in &self.idle_backends {
            let backend = format!("{}/{}", socket(b.addr, b.port), proto_name(b.proto));
            writeln!(
                f,
                "{:<32} {id:>5}  (backend in no slot: {})",
                backend,
                BackendState::name_of(b.state)
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use mesh_common::service::{BACKEND_TERMINATING, PROTO_TCP, PROTO_UDP};

    use super::*;

    fn addr(s: &str) -> Addr {
        Addr::from(s.parse::<IpAddr>().unwrap())
    }

    fn value(id: u32, count: u32) -> ServiceValue {
        ServiceValue {
            id,
            count,
            flags: 0,
            affinity_timeout_s: 0,
        }
    }

    #[test]
    fn joins_slots_and_backends_in_slot_order() {
        let vip = addr("10.96.0.10");
        let vip6 = addr("fd00::10");
        let services = BTreeMap::from([
            (ServiceKey::new(vip, 80, PROTO_TCP), value(4, 2)),
            (ServiceKey::new(vip, 53, PROTO_UDP), value(5, 0)),
            (
                ServiceKey::new(vip6, 80, PROTO_TCP),
                ServiceValue {
                    id: 6,
                    count: 1,
                    flags: SVC_FLAG_AFFINITY,
                    affinity_timeout_s: 30,
                },
            ),
            (ServiceKey::vip_marker(vip), ServiceValue::MARKER),
        ]);
        let slots = BTreeMap::from([
            (
                BackendSlotKey {
                    service_id: 4,
                    slot: 1,
                },
                7,
            ),
            (
                BackendSlotKey {
                    service_id: 4,
                    slot: 2,
                },
                3,
            ),
            (
                BackendSlotKey {
                    service_id: 6,
                    slot: 1,
                },
                8,
            ),
        ]);
        let mut terminating = Backend::new(addr("10.244.2.4"), 8080, PROTO_TCP);
        terminating.state = BACKEND_TERMINATING;
        let backends = BTreeMap::from([
            (3, Backend::new(addr("10.244.2.3"), 8080, PROTO_TCP)),
            (7, Backend::new(addr("10.244.1.7"), 8080, PROTO_TCP)),
            (8, Backend::new(addr("fd00:244::8"), 8080, PROTO_TCP)),
            (9, terminating),
        ]);
        let table = build_table(&services, &slots, &backends);
        assert_eq!(table.vips, vec![vip]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 6, "{text}");
        assert!(lines[1].starts_with("10.96.0.10:53/UDP") && lines[1].contains("connect refused"));
        assert!(lines[2].starts_with("10.96.0.10:80/TCP"));
        assert!(
            lines[2].ends_with("10.244.1.7:8080 10.244.2.3:8080"),
            "{}",
            lines[2]
        );
        assert!(
            lines[3].starts_with("[fd00::10]:80/TCP affinity=30s"),
            "{}",
            lines[3]
        );
        assert!(lines[3].ends_with("[fd00:244::8]:8080"), "{}", lines[3]);
        assert!(lines[4].starts_with("10.96.0.10 ") && lines[4].contains("cluster IP"));
        assert!(
            lines[5].starts_with("10.244.2.4:8080/TCP") && lines[5].contains("terminating"),
            "{}",
            lines[5]
        );
    }

    #[test]
    fn missing_slot_is_shown_not_hidden() {
        let services = BTreeMap::from([(
            ServiceKey::new(addr("10.96.0.1"), 80, PROTO_TCP),
            value(1, 1),
        )]);
        let table = build_table(&services, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(table.frontends[0].backends, vec![None]);
        assert!(table.to_string().contains("(missing)"));
    }
}
