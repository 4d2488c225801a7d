//! Loading the embedded eBPF object, attaching its programs to a cgroup, pinning maps,
//! programs and links under `<bpffs>/mesh/<node>/`, and removing all of it again.

use std::{
    fs::File,
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData},
    programs::{
        CgroupAttachMode, CgroupSockAddr,
        links::{FdLink, PinnedLink},
    },
};
use mesh_common::maps::{self, programs};

use super::{
    DatapathError, mounts, pins,
    sync::{KernelMap, ServiceMaps},
};

/// The eBPF object built from `mesh-ebpf` by build.rs; the agent is one binary.
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));

/// The kernel maps of service load balancing.
pub type KernelServiceMaps = ServiceMaps<
    KernelMap<mesh_common::ServiceKey, mesh_common::ServiceValue>,
    KernelMap<mesh_common::BackendSlotKey, u32>,
    KernelMap<u32, mesh_common::Backend>,
>;

/// A loaded datapath: programs in the kernel, maps pinned, links pinned once attached.
pub struct Datapath {
    // Keeps the programs (and aya's own map handles) alive while we run.
    ebpf: Ebpf,
    node_dir: PathBuf,
    links: Vec<PinnedLink>,
}

impl Datapath {
    /// Mounts bpffs when needed, loads the programs and opens (or creates) the node's
    /// pinned maps. Maps pinned by an earlier agent are reused, so their contents stay
    /// in force until the first apply reconciles them.
    pub fn load(bpffs: &Path, node: &str) -> Result<Self, DatapathError> {
        if OBJECT.is_empty() {
            return Err(DatapathError::NoObject);
        }
        mounts::ensure_bpffs(bpffs)?;
        let node_dir = pins::node_dir(bpffs, node);
        std::fs::create_dir_all(&node_dir).map_err(|source| DatapathError::Io {
            op: "create",
            path: node_dir.clone(),
            source,
        })?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(&node_dir)
            .load(OBJECT)
            .map_err(|e| DatapathError::Load(Box::new(e)))?;
        let prog = connect4(&mut ebpf)?;
        prog.load().map_err(|e| program_error(programs::CONNECT4, e))?;
        Ok(Self { ebpf, node_dir, links: Vec::new() })
    }

    /// Opens the service maps for writing.
    pub fn service_maps(&mut self) -> Result<KernelServiceMaps, DatapathError> {
        Ok(ServiceMaps {
            services: KernelMap::new(maps::SERVICES, open_map(&mut self.ebpf, maps::SERVICES)?),
            slots: KernelMap::new(
                maps::SERVICE_BACKENDS,
                open_map(&mut self.ebpf, maps::SERVICE_BACKENDS)?,
            ),
            backends: KernelMap::new(maps::BACKENDS, open_map(&mut self.ebpf, maps::BACKENDS)?),
        })
    }

    /// Attaches the programs to `cgroup` and pins the links. A link pinned by an earlier
    /// agent is replaced only after the new one is attached, so no connect() goes
    /// untranslated in between.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), DatapathError> {
        let cgroup_file = File::open(cgroup).map_err(|source| DatapathError::Io {
            op: "open cgroup",
            path: cgroup.into(),
            source,
        })?;
        let link_path = pins::link_pin(&self.node_dir, programs::CONNECT4);
        let stale = PinnedLink::from_pin(&link_path).ok();
        let prog = connect4(&mut self.ebpf)?;
        // bpf_link attachments to a cgroup always coexist with others (multi semantics);
        // the kernel rejects any attach flag on them, so the mode must be `Single` (0).
        let link_id = prog
            .attach(&cgroup_file, CgroupAttachMode::Single)
            .map_err(|e| program_error(programs::CONNECT4, e))?;
        let link = prog.take_link(link_id).map_err(|e| program_error(programs::CONNECT4, e))?;
        let link = FdLink::try_from(link).map_err(|e| DatapathError::Link {
            path: link_path.clone(),
            source: Box::new(e),
        })?;
        if let Some(stale) = stale {
            // Dropping the unpinned FdLink detaches the old program.
            drop(stale.unpin().map_err(|source| DatapathError::Io {
                op: "unpin stale link",
                path: link_path.clone(),
                source,
            })?);
            tracing::info!(link = %link_path.display(), "replaced the link of an earlier agent");
        }
        let pinned = link
            .pin(&link_path)
            .map_err(|e| DatapathError::Pin { path: link_path.clone(), source: Box::new(e) })?;
        self.links.push(pinned);

        let prog_path = self.node_dir.join(programs::CONNECT4);
        remove_if_exists(&prog_path)?;
        connect4(&mut self.ebpf)?
            .pin(&prog_path)
            .map_err(|e| DatapathError::Pin { path: prog_path, source: Box::new(e) })?;
        tracing::info!(cgroup = %cgroup.display(), program = programs::CONNECT4, "attached");
        Ok(())
    }

    /// Detaches every program and removes every pin of this node.
    pub fn remove(self) -> Result<(), DatapathError> {
        let Self { ebpf, node_dir, links } = self;
        for link in links {
            let path = pins::link_pin(&node_dir, programs::CONNECT4);
            drop(link.unpin().map_err(|source| DatapathError::Io { op: "unpin", path, source })?);
        }
        drop(ebpf);
        for name in [programs::CONNECT4, maps::SERVICES, maps::SERVICE_BACKENDS, maps::BACKENDS] {
            remove_if_exists(&node_dir.join(name))?;
        }
        std::fs::remove_dir(&node_dir).map_err(|source| DatapathError::Io {
            op: "remove",
            path: node_dir.clone(),
            source,
        })?;
        // Other nodes' agents may share the mesh directory: remove it only when empty.
        if let Some(mesh_dir) = node_dir.parent() {
            let _ = std::fs::remove_dir(mesh_dir);
        }
        tracing::info!(pins = %node_dir.display(), "datapath detached and unpinned");
        Ok(())
    }
}

fn connect4(ebpf: &mut Ebpf) -> Result<&mut CgroupSockAddr, DatapathError> {
    ebpf.program_mut(programs::CONNECT4)
        .ok_or(DatapathError::Missing { kind: "program", name: programs::CONNECT4 })?
        .try_into()
        .map_err(|e| program_error(programs::CONNECT4, e))
}

fn program_error(name: &'static str, e: aya::programs::ProgramError) -> DatapathError {
    DatapathError::Program { name, source: Box::new(e) }
}

fn open_map<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<HashMap<MapData, K, V>, DatapathError> {
    let map: Map = ebpf.take_map(name).ok_or(DatapathError::Missing { kind: "map", name })?;
    HashMap::try_from(map).map_err(|e| DatapathError::Map { name, source: Box::new(e) })
}

fn remove_if_exists(path: &Path) -> Result<(), DatapathError> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(DatapathError::Io { op: "remove", path: path.into(), source }),
    }
}
