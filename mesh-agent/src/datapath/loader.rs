//! Loading the embedded eBPF object, attaching its programs to a cgroup, pinning maps,
//! programs and links under `<bpffs>/mesh/<node>/`, and removing all of it again.
//!
//! Pins make the datapath outlive the agent: with `--keep-datapath` (or after SIGKILL)
//! the programs stay attached and keep translating with the last maps; the next agent
//! reuses the pinned maps and swaps in its programs link by link, each new link attached
//! before the old one is released, so no call goes untranslated in between. Adopted
//! maps keep their capacity and flags; every map's kind, sizes, capacity and flags come
//! from the registry (`mesh_common::maps::REGISTRY`).

use std::{
    collections::BTreeSet,
    fs::File,
    os::fd::AsFd as _,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{Array, HashMap, LpmTrie, Map, MapData, PerCpuHashMap, RingBuf, SockHash},
    programs::{
        CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, CgroupSockopt, Program,
        SkLookup, SkMsg, SockOps,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::{
    Addr, AffinityKey, AffinityValue, Backend, BackendSlotKey, EndpointValue, IpcacheKey,
    IpcacheValue, LbMetricsKey, PolicyKey, PolicyKeyData, PolicyValue, ServiceKey, ServiceValue,
    SockKey,
    maps::{self, Sizing, programs},
};

use super::{
    DatapathError, inbound, mounts, pins,
    sync::{KernelMap, KernelTrie, Mirrored, PolicyMaps, ServiceMaps},
};

/// `BPF_CGROUP_GETSOCKOPT` of `enum bpf_attach_type`.
const BPF_CGROUP_GETSOCKOPT: u32 = 21;

/// The eBPF object built from `mesh-ebpf` by build.rs; the agent is one binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// The kernel maps of service load balancing, remembered between applies.
pub type KernelServiceMaps = ServiceMaps<
    Mirrored<KernelMap<ServiceKey, ServiceValue>, ServiceKey, ServiceValue>,
    Mirrored<KernelMap<BackendSlotKey, u32>, BackendSlotKey, u32>,
    Mirrored<KernelMap<u32, Backend>, u32, Backend>,
>;

/// The kernel maps of network policy, remembered between applies.
pub type KernelPolicyMaps = PolicyMaps<
    Mirrored<KernelMap<u64, EndpointValue>, u64, EndpointValue>,
    Mirrored<KernelTrie<IpcacheKey, IpcacheValue>, IpcacheKey, IpcacheValue>,
    Mirrored<KernelTrie<PolicyKey, PolicyValue>, PolicyKey, PolicyValue>,
>;

pub use super::sizes::MapSizes;

/// The maps the agent writes, taken out of the loaded object.
pub struct DatapathMaps {
    /// SERVICES, SVC_BACKENDS, BACKENDS.
    pub services: KernelServiceMaps,
    /// AFFINITY (purged of entries whose backend left the service).
    pub affinity: KernelMap<AffinityKey, AffinityValue>,
    /// LB_METRICS (purged of entries of vanished services and backends).
    pub metrics: PerCpuHashMap<MapData, LbMetricsKey, u64>,
    /// ENDPOINTS, IPCACHE, POLICY.
    pub policy: KernelPolicyMaps,
    /// EVENTS: flow events to read.
    pub events: RingBuf<MapData>,
    /// CONFIG: datapath settings (policy audit mode).
    pub config: Array<MapData, u32>,
    /// The real capacities of the maps, adopted ones included.
    pub sizes: MapSizes,
}

/// A loaded datapath: programs in the kernel, maps pinned, links pinned once attached.
pub struct Datapath {
    // Keeps the programs (and aya's own map handles) alive while we run.
    ebpf: Ebpf,
    node_dir: PathBuf,
    links: Vec<PinnedLink>,
    adopted: bool,
}

impl Datapath {
    /// Mounts bpffs when needed, loads the programs and opens (or creates) the node's
    /// pinned maps. Maps pinned by an earlier agent are reused with their contents, so
    /// they stay in force until the first apply reconciles them.
    pub fn load(bpffs: &Path, node: &str, sizes: &MapSizes) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        mounts::ensure_bpffs(bpffs)?;
        let node_dir = pins::node_dir(bpffs, node);
        let adopted = node_dir.join(maps::SERVICES).exists();
        std::fs::create_dir_all(&node_dir).map_err(|source| DatapathError::Io {
            op: "create",
            path: node_dir.clone(),
            source,
        })?;
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(&node_dir);
        // Fixed maps keep the object's capacity; an adopted map keeps its own whatever
        // is asked here (aya reuses a pin as it is).
        for (spec, entries) in sizes.iter() {
            if spec.sizing != Sizing::Fixed {
                loader.map_max_entries(spec.name, entries);
            }
        }
        let mut ebpf = loader
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        for name in programs::SOCK_ADDR {
            sock_addr(&mut ebpf, name)?
                .load()
                .map_err(|e| program_error(name, e))?;
        }
        skb(&mut ebpf, programs::INGRESS)?
            .load()
            .map_err(|e| program_error(programs::INGRESS, e))?;
        for name in [programs::SOCKOPS, programs::ORIG_DST_OPS] {
            sock_ops(&mut ebpf, name)?
                .load()
                .map_err(|e| program_error(name, e))?;
        }
        sockopt(&mut ebpf, programs::GETSOCKOPT)?
            .load()
            .map_err(|e| program_error(programs::GETSOCKOPT, e))?;
        sk_msg(&mut ebpf)?
            .load()
            .map_err(|e| program_error(programs::SK_MSG, e))?;
        let lookup: &mut SkLookup = program(&mut ebpf, programs::INBOUND)?
            .try_into()
            .map_err(|e| program_error(programs::INBOUND, e))?;
        lookup
            .load()
            .map_err(|e| program_error(programs::INBOUND, e))?;
        // Pinned for [`InboundLinks`], which attaches it namespace by namespace; links of
        // an earlier agent keep its program until their namespaces go.
        let inbound = node_dir.join(programs::INBOUND);
        remove_if_exists(&inbound)?;
        lookup.pin(&inbound).map_err(|e| DatapathError::Pin {
            path: inbound,
            source: Box::new(e),
        })?;
        Ok(Self {
            ebpf,
            node_dir,
            links: Vec::new(),
            adopted,
        })
    }

    /// Whether the maps were adopted from an earlier agent rather than created.
    pub fn adopted(&self) -> bool {
        self.adopted
    }

    /// Takes the maps the agent writes out of the object.
    pub fn maps(&mut self) -> Result<DatapathMaps, DatapathError> {
        let services: HashMap<_, ServiceKey, ServiceValue> =
            open_map(&mut self.ebpf, maps::SERVICES)?;
        let slots: HashMap<_, BackendSlotKey, u32> =
            open_map(&mut self.ebpf, maps::SERVICE_BACKENDS)?;
        let backends: HashMap<_, u32, Backend> = open_map(&mut self.ebpf, maps::BACKENDS)?;
        let affinity: HashMap<_, AffinityKey, AffinityValue> =
            open_map(&mut self.ebpf, maps::AFFINITY)?;
        let metrics: PerCpuHashMap<_, LbMetricsKey, u64> =
            open_map(&mut self.ebpf, maps::LB_METRICS)?;
        let endpoints: HashMap<_, u64, EndpointValue> = open_map(&mut self.ebpf, maps::ENDPOINTS)?;
        let ipcache: LpmTrie<_, Addr, IpcacheValue> = open_map(&mut self.ebpf, maps::IPCACHE)?;
        let policy: LpmTrie<_, PolicyKeyData, PolicyValue> =
            open_map(&mut self.ebpf, maps::POLICY)?;
        let events: RingBuf<_> = open_map(&mut self.ebpf, maps::EVENTS)?;
        let config: Array<_, u32> = open_map(&mut self.ebpf, maps::CONFIG)?;
        let sizes = pinned_sizes(&self.node_dir)?;
        Ok(DatapathMaps {
            services: ServiceMaps {
                services: Mirrored::new(KernelMap::new(maps::SERVICES, services)),
                slots: Mirrored::new(KernelMap::new(maps::SERVICE_BACKENDS, slots)),
                backends: Mirrored::new(KernelMap::new(maps::BACKENDS, backends)),
            },
            affinity: KernelMap::new(maps::AFFINITY, affinity),
            metrics,
            policy: PolicyMaps {
                endpoints: Mirrored::new(KernelMap::new(maps::ENDPOINTS, endpoints)),
                ipcache: Mirrored::new(KernelTrie::new(maps::IPCACHE, ipcache)),
                policy: Mirrored::new(KernelTrie::new(maps::POLICY, policy)),
            },
            events,
            config,
            sizes,
        })
    }

    /// Attaches every program to `cgroup` and pins the links, replacing the links of an
    /// earlier agent only once the new ones are attached; then removes pins this version
    /// (or this configuration) does not use. With `sockmap`, also same-node socket
    /// redirection: sk_msg on the SOCKS map, then sock_ops on the cgroup. The node
    /// proxy's original-destination programs (a sock_ops one of their own, and
    /// getsockopt) are attached either way.
    pub fn attach(&mut self, cgroup: &Path, sockmap: bool) -> Result<(), DatapathError> {
        let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Io {
            op: "open cgroup",
            path: cgroup.into(),
            source,
        })?;
        for name in programs::ALL {
            let pinned = self.attach_one(name, &cgroup_file)?;
            self.links.push(pinned);
        }
        if sockmap {
            self.attach_sk_msg()?;
            let pinned = self.attach_one(programs::SOCKOPS, &cgroup_file)?;
            self.links.push(pinned);
        }
        self.remove_foreign_pins(sockmap)?;
        tracing::info!(cgroup = %cgroup.display(), sockmap, "attached");
        Ok(())
    }

    /// Attaches sk_msg to SOCKS. The attachment belongs to the map (pinned), not to this
    /// process: it must outlive the agent like the pinned links do, so the link handle
    /// is forgotten instead of dropped (dropping it would detach the program).
    fn attach_sk_msg(&mut self) -> Result<(), DatapathError> {
        let name = maps::SOCKS;
        let map: &Map = self
            .ebpf
            .map(name)
            .ok_or(DatapathError::Missing { kind: "map", name })?;
        let socks = SockHash::<_, SockKey>::try_from(map).map_err(|e| DatapathError::Map {
            name,
            source: Box::new(e),
        })?;
        let fd = socks.fd().try_clone().map_err(|e| DatapathError::Map {
            name,
            source: Box::new(e.into()),
        })?;
        let prog = sk_msg(&mut self.ebpf)?;
        let id = prog
            .attach(&fd)
            .map_err(|e| program_error(programs::SK_MSG, e))?;
        let link = prog
            .take_link(id)
            .map_err(|e| program_error(programs::SK_MSG, e))?;
        std::mem::forget(link);
        Ok(())
    }

    fn attach_one(
        &mut self,
        name: &'static str,
        cgroup: &File,
    ) -> Result<PinnedLink, DatapathError> {
        let link_path = pins::link_pin(&self.node_dir, name);
        let stale = PinnedLink::from_pin(&link_path).ok();
        let link_error = |e| DatapathError::Link {
            path: link_path.clone(),
            source: Box::new(e),
        };
        // bpf_link attachments to a cgroup always coexist with others (multi semantics);
        // the kernel rejects any attach flag on them, so the mode must be `Single` (0).
        let link = if name == programs::SOCKOPS || name == programs::ORIG_DST_OPS {
            let prog = sock_ops(&mut self.ebpf, name)?;
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, e))?;
            FdLink::try_from(prog.take_link(id).map_err(|e| program_error(name, e))?)
                .map_err(link_error)?
        } else if name == programs::GETSOCKOPT {
            self.getsockopt_link(name, cgroup, &link_path)?
        } else if name == programs::INGRESS {
            let prog = skb(&mut self.ebpf, name)?;
            let id = prog
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(|e| program_error(name, e))?;
            FdLink::try_from(prog.take_link(id).map_err(|e| program_error(name, e))?)
                .map_err(link_error)?
        } else {
            let prog = sock_addr(&mut self.ebpf, name)?;
            let id = prog
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(|e| program_error(name, e))?;
            FdLink::try_from(prog.take_link(id).map_err(|e| program_error(name, e))?)
                .map_err(link_error)?
        };
        if let Some(stale) = stale {
            // Dropping the unpinned FdLink detaches the earlier agent's program.
            drop(stale.unpin().map_err(|source| DatapathError::Io {
                op: "unpin earlier link",
                path: link_path.clone(),
                source,
            })?);
            tracing::info!(link = %link_path.display(), "replaced the link of an earlier agent");
        }
        let pinned = link.pin(&link_path).map_err(|e| DatapathError::Pin {
            path: link_path.clone(),
            source: Box::new(e),
        })?;
        let prog_path = self.node_dir.join(name);
        remove_if_exists(&prog_path)?;
        program(&mut self.ebpf, name)?
            .pin(&prog_path)
            .map_err(|e| DatapathError::Pin {
                path: prog_path,
                source: Box::new(e),
            })?;
        Ok(pinned)
    }

    /// Attaches the cgroup getsockopt program with a bpf_link of our own making: aya
    /// 0.14 cannot turn its CgroupSockopt link into a pinnable `FdLink`. The new link
    /// is pinned beside `link_path` for a moment, to come back as an `FdLink` that the
    /// caller pins like every other.
    fn getsockopt_link(
        &mut self,
        name: &'static str,
        cgroup: &File,
        link_path: &Path,
    ) -> Result<FdLink, DatapathError> {
        let prog = sockopt(&mut self.ebpf, name)?;
        let prog_fd = prog.fd().map_err(|e| program_error(name, e))?;
        let fd =
            crate::sys::bpf_link_create(prog_fd.as_fd(), cgroup.as_fd(), BPF_CGROUP_GETSOCKOPT)
                .map_err(|source| DatapathError::Io {
                    op: "attach getsockopt program to cgroup",
                    path: link_path.into(),
                    source,
                })?;
        // bpffs rejects names with a dot.
        let fresh = pins::link_pin(&self.node_dir, "mesh_getsockopt_new");
        remove_if_exists(&fresh)?;
        crate::sys::bpf_obj_pin(fd.as_fd(), &fresh).map_err(|source| DatapathError::Io {
            op: "pin new link",
            path: fresh.clone(),
            source,
        })?;
        let pinned = PinnedLink::from_pin(&fresh).map_err(|e| DatapathError::Link {
            path: fresh.clone(),
            source: Box::new(e),
        });
        // The link lives on through the fds (ours and the reopened one) either way.
        remove_if_exists(&fresh)?;
        Ok(FdLink::from(pinned?))
    }

    fn remove_foreign_pins(&self, sockmap: bool) -> Result<(), DatapathError> {
        let sockops = sockmap.then_some(programs::SOCKOPS);
        let ours: BTreeSet<String> = programs::ALL
            .iter()
            .copied()
            .chain(sockops)
            .flat_map(|p| [p.to_string(), format!("{p}_link")])
            .chain([programs::INBOUND.to_string()])
            .chain(maps::REGISTRY.iter().map(|m| m.name.to_string()))
            .collect();
        for name in pins::entries(&self.node_dir)? {
            if !ours.contains(&name) && !inbound::is_link_pin(&name) {
                tracing::info!(pin = %name, "removing a pin of an earlier datapath version");
                remove_if_exists(&self.node_dir.join(&name))?;
            }
        }
        Ok(())
    }

    /// Leaves the datapath running: programs stay attached through their pinned links
    /// and keep translating with the pinned maps; the next agent adopts them.
    pub fn keep(self) {
        tracing::info!(pins = %self.node_dir.display(), "datapath left attached (--keep-datapath)");
    }

    /// Detaches every program and removes every pin of this node.
    pub fn remove(self) -> Result<(), DatapathError> {
        let Self {
            ebpf,
            node_dir,
            links,
            ..
        } = self;
        for link in links {
            drop(link.unpin().map_err(|source| DatapathError::Io {
                op: "unpin",
                path: node_dir.clone(),
                source,
            })?);
        }
        drop(ebpf);
        uninstall_node(&node_dir)
    }
}

/// Removes a node's datapath without loading anything (`mesh-agent uninstall`, `run
/// --cleanup`): unlinking the link pins detaches the programs once no agent holds them.
pub fn uninstall_node(node_dir: &Path) -> Result<(), DatapathError> {
    if !node_dir.exists() {
        return Ok(());
    }
    std::fs::remove_dir_all(node_dir).map_err(|source| DatapathError::Io {
        op: "remove",
        path: node_dir.into(),
        source,
    })?;
    // Other nodes' agents may share the mesh directory: remove it only when empty.
    if let Some(mesh_dir) = node_dir.parent() {
        let _ = std::fs::remove_dir(mesh_dir);
    }
    tracing::info!(pins = %node_dir.display(), "datapath detached and unpinned");
    Ok(())
}

fn program<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut Program, DatapathError> {
    ebpf.program_mut(name).ok_or(DatapathError::Missing {
        kind: "program",
        name,
    })
}

fn sock_addr<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, DatapathError> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn sock_ops<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SockOps, DatapathError> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn sockopt<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockopt, DatapathError> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn sk_msg(ebpf: &mut Ebpf) -> Result<&mut SkMsg, DatapathError> {
    program(ebpf, programs::SK_MSG)?
        .try_into()
        .map_err(|e| program_error(programs::SK_MSG, e))
}

fn skb<'a>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut CgroupSkb, DatapathError> {
    program(ebpf, name)?
        .try_into()
        .map_err(|e| program_error(name, e))
}

fn program_error(name: &'static str, e: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program {
        name,
        source: Box::new(e),
    }
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<Map, DatapathError> {
    ebpf.take_map(name)
        .ok_or(DatapathError::Missing { kind: "map", name })
}

/// Takes map `name` out of `ebpf` as the typed map `T` (a hash map, trie, array...).
fn open_map<T: TryFrom<Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DatapathError> {
    T::try_from(take(ebpf, name)?).map_err(|e| DatapathError::Map {
        name,
        source: Box::new(e),
    })
}

/// The capacities of the maps pinned in `node_dir`: what this agent created, or what an
/// earlier one did. An adopted map also keeps its creation flags: aya reuses a pin as it
/// is, and the programs work alike on a preallocated map or not, so an upgrade keeps
/// serving (and keeps its affinity and reverse-translation state) instead of renaming
/// the maps; the smaller footprint comes with the next fresh datapath.
fn pinned_sizes(node_dir: &Path) -> Result<MapSizes, DatapathError> {
    let mut sizes = MapSizes::default();
    for spec in &maps::REGISTRY {
        let name = spec.name;
        let map_error = |e| DatapathError::Map {
            name,
            source: Box::new(e),
        };
        let info = MapData::from_pin(node_dir.join(name))
            .and_then(|map| map.info())
            .map_err(map_error)?;
        if info.map_flags() != spec.flags {
            tracing::warn!(
                map = name,
                flags = info.map_flags(),
                registry_flags = spec.flags,
                "map adopted with the flags of an earlier version (e.g. preallocated); \
                 `mesh-agent uninstall` and a restart recreate it"
            );
        }
        sizes.set(name, info.max_entries());
    }
    Ok(sizes)
}

fn remove_if_exists(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io {
            op: "remove",
            path: path.into(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aya_obj::{EbpfSectionKind, Object};
    use mesh_common::maps::REGISTRY;

    use super::OBJECT;

    /// The eBPF object defines exactly the registry's maps, each with the registry's kind,
    /// key and value sizes, capacity and flags. Parses the ELF only: no root needed.
    #[test]
    fn the_object_defines_the_registry_maps() {
        if OBJECT.is_empty() {
            // Built with AYA_BUILD_SKIP: there is no object to check.
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "no eBPF object embedded (AYA_BUILD_SKIP) under CI"
            );
            eprintln!("skipped: no eBPF object embedded (AYA_BUILD_SKIP)");
            return;
        }
        let object = Object::parse(OBJECT).expect("the embedded eBPF object parses");
        let defined: BTreeMap<&str, _> = object
            .maps
            .iter()
            .filter(|(_, m)| {
                matches!(
                    m.section_kind(),
                    EbpfSectionKind::Maps | EbpfSectionKind::BtfMaps
                )
            })
            .map(|(name, m)| {
                let def = (
                    m.map_type(),
                    m.key_size(),
                    m.value_size(),
                    m.max_entries(),
                    m.map_flags(),
                );
                (name.as_str(), def)
            })
            .collect();
        let registry: BTreeMap<&str, _> = REGISTRY
            .iter()
            .map(|s| {
                let def = (
                    s.kind.bpf_type(),
                    s.key_size,
                    s.value_size,
                    s.capacity,
                    s.flags,
                );
                (s.name, def)
            })
            .collect();
        for (name, def) in &defined {
            assert_eq!(
                registry.get(name),
                Some(def),
                "map {name} of the eBPF object (type, key size, value size, capacity, \
                 flags) differs from the registry"
            );
        }
        for name in registry.keys() {
            assert!(
                defined.contains_key(name),
                "registry map {name} is not defined by the eBPF object"
            );
        }
    }
}
