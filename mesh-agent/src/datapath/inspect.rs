//! Reading the kernel's load-balancing table back from the pinned maps, for
//! `mesh-agent services`: what the datapath really holds, not what the agent meant.

use std::{collections::BTreeMap, fmt, net::Ipv4Addr, path::Path};

use aya::maps::{HashMap, Map, MapData};
use mesh_common::{
    Backend, BackendSlotKey, ServiceKey, ServiceValue, maps,
    service::{PROTO_TCP, PROTO_UDP},
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

/// The whole table: frontends first, then the cluster-IP markers.
#[derive(Debug, Clone, Default)]
pub struct ServiceTable {
    /// Frontends, sorted by address, port, protocol.
    pub frontends: Vec<FrontendRow>,
    /// Addresses (network byte order) marked as cluster IPs.
    pub vips: Vec<u32>,
}

fn open<K: aya::Pod, V: aya::Pod>(
    node_dir: &Path,
    name: &'static str,
) -> Result<KernelMap<K, V>, DatapathError> {
    let path = node_dir.join(name);
    let data = MapData::from_pin(&path).map_err(|e| match &e {
        aya::maps::MapError::SyscallError(s) if s.io_error.kind() == std::io::ErrorKind::NotFound => {
            DatapathError::NotPinned(node_dir.into())
        }
        _ => DatapathError::Map { name, source: Box::new(e) },
    })?;
    let map = HashMap::try_from(Map::HashMap(data))
        .map_err(|e| DatapathError::Map { name, source: Box::new(e) })?;
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
    for (key, value) in services {
        if key.is_vip_marker() {
            table.vips.push(key.addr);
            continue;
        }
        let backends = (1..=value.count)
            .map(|slot| {
                slots
                    .get(&BackendSlotKey { service_id: value.id, slot })
                    .and_then(|id| backends.get(id))
                    .copied()
            })
            .collect();
        table.frontends.push(FrontendRow { key: *key, value: *value, backends });
    }
    let order = |k: &ServiceKey| (u32::from_be(k.addr), u16::from_be(k.port), k.proto);
    table.frontends.sort_by_key(|r| order(&r.key));
    table.vips.sort_by_key(|a| u32::from_be(*a));
    table
}

fn proto_name(proto: u8) -> String {
    match proto {
        PROTO_TCP => "TCP".into(),
        PROTO_UDP => "UDP".into(),
        other => format!("proto{other}"),
    }
}

fn ip(addr_be: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from_be(addr_be))
}

impl fmt::Display for ServiceTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{:<24} {:>4}  BACKENDS", "FRONTEND", "ID")?;
        for row in &self.frontends {
            let frontend =
                format!("{}:{}/{}", ip(row.key.addr), u16::from_be(row.key.port), proto_name(row.key.proto));
            let backends = if row.backends.is_empty() {
                "(no ready backend: connect refused)".to_string()
            } else {
                row.backends
                    .iter()
                    .map(|b| match b {
                        Some(b) => format!("{}:{}", ip(b.addr), u16::from_be(b.port)),
                        None => "(missing)".into(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            writeln!(f, "{frontend:<24} {:>4}  {backends}", row.value.id)?;
        }
        for vip in &self.vips {
            writeln!(f, "{:<24} {:>4}  (cluster IP: other ports refused)", ip(*vip).to_string(), "-")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn joins_slots_and_backends_in_slot_order() {
        let vip = 0x0a60_000a;
        let services = BTreeMap::from([
            (ServiceKey::new(vip, 80, PROTO_TCP), ServiceValue { id: 4, count: 2 }),
            (ServiceKey::new(vip, 53, PROTO_UDP), ServiceValue { id: 5, count: 0 }),
            (ServiceKey::vip_marker(vip), ServiceValue { id: 0, count: 0 }),
        ]);
        let slots = BTreeMap::from([
            (BackendSlotKey { service_id: 4, slot: 1 }, 7),
            (BackendSlotKey { service_id: 4, slot: 2 }, 3),
        ]);
        let backends = BTreeMap::from([
            (3, Backend::new(0x0af4_0203, 8080, PROTO_TCP)),
            (7, Backend::new(0x0af4_0107, 8080, PROTO_TCP)),
        ]);
        let table = build_table(&services, &slots, &backends);
        assert_eq!(table.vips, vec![vip.to_be()]);
        let text = table.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[1].starts_with("10.96.0.10:53/UDP") && lines[1].contains("connect refused"));
        assert!(lines[2].starts_with("10.96.0.10:80/TCP"));
        assert!(lines[2].ends_with("10.244.1.7:8080 10.244.2.3:8080"), "{}", lines[2]);
        assert!(lines[3].starts_with("10.96.0.10 ") && lines[3].contains("cluster IP"));
    }

    #[test]
    fn missing_slot_is_shown_not_hidden() {
        let services =
            BTreeMap::from([(ServiceKey::new(1, 80, PROTO_TCP), ServiceValue { id: 1, count: 1 })]);
        let table = build_table(&services, &BTreeMap::new(), &BTreeMap::new());
        assert_eq!(table.frontends[0].backends, vec![None]);
        assert!(table.to_string().contains("(missing)"));
    }
}
