//! The kernel side seen from user space: mounts, loading/attaching/pinning the programs,
//! attaching inbound capture to pod namespaces, diff-applying plans to the maps, reading the maps back for operators, and destroying
//! sockets that point at removed backends.

pub mod endpoints;
pub mod inbound;
pub mod inspect;
pub mod loader;
pub mod mounts;
pub mod netns;
pub mod pins;
pub mod sizes;
pub mod sockdestroy;
pub mod sync;

use std::path::PathBuf;

/// Errors of the datapath layer, naming the object (path, map, program) involved.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount bpffs at {path}: {source} (the agent needs CAP_SYS_ADMIN)")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    #[error("no cgroup2 mount in /proc/self/mounts; pass --cgroup")]
    NoCgroup2,
    #[error(
        "this mesh-agent binary was built without its eBPF programs (AYA_BUILD_SKIP); \
         rebuild with `cargo xtask build`"
    )]
    NoObject,
    #[error("load eBPF object: {0}")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("eBPF object has no {kind} named {name}")]
    Missing {
        kind: &'static str,
        name: &'static str,
    },
    #[error("program {name}: {source}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("pin {path}: {source}")]
    Pin {
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error("map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("link {path}: {source}")]
    Link {
        path: PathBuf,
        #[source]
        source: Box<aya::programs::links::LinkError>,
    },
    #[error("no datapath pinned under {0} (is mesh-agent running on this node?)")]
    NotPinned(PathBuf),
    #[error("several nodes pinned under {dir} ({nodes}); pass --node")]
    AmbiguousNode { dir: PathBuf, nodes: String },
}
