//! Inbound capture's attachments: the sk_lookup program (`mesh_inbound`) attached to the
//! network namespace of every local pod, one link per namespace, pinned as
//! `mesh_inbound_link_<netns cookie>` so that, like the cgroup links, it outlives an
//! agent restart. The program acts only on addresses IPCACHE flags for capture, so
//! attaching it everywhere costs a lookup per new inbound connection and nothing else.

use std::{
    collections::BTreeSet,
    fs::File,
    path::{Path, PathBuf},
};

use aya::programs::{SkLookup, links::FdLink};
use mesh_common::maps::programs;
use tracing::{debug, info, warn};

use super::{DatapathError, endpoints::LocalNetns};

/// Pin name prefix of the per-namespace links.
const LINK_PREFIX: &str = "mesh_inbound_link_";

/// Whether `name` (an entry of the node's pin directory) is one of these links.
pub fn is_link_pin(name: &str) -> bool {
    name.strip_prefix(LINK_PREFIX)
        .is_some_and(|cookie| cookie.parse::<u64>().is_ok())
}

/// The sk_lookup program and the namespaces it is attached to.
pub struct InboundLinks {
    program: SkLookup,
    node_dir: PathBuf,
    /// Cookies of the namespaces with a pinned link.
    attached: BTreeSet<u64>,
}

impl InboundLinks {
    /// Opens the program pinned at `<node_dir>/mesh_inbound` and takes over the links
    /// pinned there (by an earlier agent, or before a restart).
    pub fn open(node_dir: &Path) -> Result<Self, DatapathError> {
        let path = node_dir.join(programs::INBOUND);
        let program = SkLookup::from_pin(&path).map_err(|e| DatapathError::Program {
            name: programs::INBOUND,
            source: Box::new(e),
        })?;
        let attached = super::pins::entries(node_dir)?
            .iter()
            .filter_map(|name| name.strip_prefix(LINK_PREFIX)?.parse().ok())
            .collect();
        Ok(Self {
            program,
            node_dir: node_dir.to_owned(),
            attached,
        })
    }

    /// Attaches the program to every namespace of `found` that lacks it and unpins the
    /// links of namespaces gone (the kernel detaches a link when its namespace dies,
    /// the pin would only keep the link object). A namespace that cannot be attached is
    /// logged and tried again at the next discovery.
    pub fn sync(&mut self, found: &[LocalNetns]) {
        let current: BTreeSet<u64> = found.iter().map(|n| n.cookie).collect();
        for netns in found {
            if self.attached.contains(&netns.cookie) {
                continue;
            }
            match self.attach(netns) {
                Ok(()) => {
                    debug!(
                        cookie = netns.cookie,
                        pid = netns.pid,
                        "inbound capture attached"
                    );
                    self.attached.insert(netns.cookie);
                }
                Err(err) => warn!(cookie = netns.cookie, %err, "attaching inbound capture failed"),
            }
        }
        let gone: Vec<u64> = self.attached.difference(&current).copied().collect();
        for cookie in gone {
            let path = self.link_path(cookie);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    warn!(path = %path.display(), error = %e, "unpinning an inbound link failed");
                    continue;
                }
            }
            info!(cookie, "pod namespace gone: inbound capture link removed");
            self.attached.remove(&cookie);
        }
    }

    fn link_path(&self, cookie: u64) -> PathBuf {
        self.node_dir.join(format!("{LINK_PREFIX}{cookie}"))
    }

    fn attach(&mut self, netns: &LocalNetns) -> Result<(), DatapathError> {
        let ns_path = PathBuf::from(format!("/proc/{}/ns/net", netns.pid));
        let file = File::open(&ns_path).map_err(|source| DatapathError::Io {
            op: "open",
            path: ns_path.clone(),
            source,
        })?;
        // The pid may have exited and been reused since discovery: attach only to the
        // namespace discovery saw.
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().map_err(|source| {
            DatapathError::Io {
                op: "stat",
                path: ns_path.clone(),
                source,
            }
        })?);
        if inode != netns.inode {
            return Err(DatapathError::Io {
                op: "attach to",
                path: ns_path,
                source: std::io::Error::other("the process left the namespace discovery saw"),
            });
        }
        let program_error = |e| DatapathError::Program {
            name: programs::INBOUND,
            source: Box::new(e),
        };
        let id = self.program.attach(&file).map_err(program_error)?;
        let link = FdLink::from(self.program.take_link(id).map_err(program_error)?);
        let path = self.link_path(netns.cookie);
        link.pin(&path).map_err(|e| DatapathError::Pin {
            path,
            source: Box::new(e),
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::is_link_pin;

    #[test]
    fn link_pins_are_told_from_other_pins() {
        assert!(is_link_pin("mesh_inbound_link_4026532001"));
        assert!(!is_link_pin("mesh_inbound_link_"));
        assert!(!is_link_pin("mesh_inbound_link_x"));
        assert!(!is_link_pin("mesh_inbound"));
        assert!(!is_link_pin("mesh_connect4_link"));
    }
}
