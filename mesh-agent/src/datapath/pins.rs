//! Where the datapath lives in bpffs: `<bpffs>/mesh/<node>/` holds one pin per map
//! (named as in `mesh_common::maps`), per program, and per link.

use std::path::{Path, PathBuf};

use super::DatapathError;

/// `<bpffs>/mesh`: the parent of every node's pins.
pub fn mesh_dir(bpffs: &Path) -> PathBuf {
    bpffs.join("mesh")
}

/// `<bpffs>/mesh/<node>`: one node's pins.
pub fn node_dir(bpffs: &Path, node: &str) -> PathBuf {
    mesh_dir(bpffs).join(node)
}

/// Pin path of the link that attaches `program` to its cgroup.
pub fn link_pin(node_dir: &Path, program: &str) -> PathBuf {
    node_dir.join(format!("{program}_link"))
}

/// The nodes pinned under `bpffs`, sorted.
pub fn nodes(bpffs: &Path) -> Result<Vec<String>, DatapathError> {
    let dir = mesh_dir(bpffs);
    let entries = std::fs::read_dir(&dir).map_err(|_| DatapathError::NotPinned(dir.clone()))?;
    let mut nodes: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    nodes.sort();
    Ok(nodes)
}

/// The one node pinned under `bpffs`, for commands run without `--node`.
pub fn only_node(bpffs: &Path) -> Result<String, DatapathError> {
    let dir = mesh_dir(bpffs);
    let mut nodes = nodes(bpffs)?;
    match nodes.len() {
        0 => Err(DatapathError::NotPinned(dir)),
        1 => Ok(nodes.remove(0)),
        _ => Err(DatapathError::AmbiguousNode {
            dir,
            nodes: nodes.join(", "),
        }),
    }
}

/// Names of the pins in a node directory.
pub fn entries(node_dir: &Path) -> Result<Vec<String>, DatapathError> {
    let io = |source| DatapathError::Io {
        op: "list",
        path: node_dir.into(),
        source,
    };
    let mut names = Vec::new();
    for entry in std::fs::read_dir(node_dir).map_err(io)? {
        if let Some(name) = entry.map_err(io)?.file_name().to_str() {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}
