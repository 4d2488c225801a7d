//! `mesh-agent certs`: the workload certificates (SVIDs) a node's proxy holds, as it
//! lists them in `<run-dir>/<node>/certs.json` (identities, serials, validity, chain
//! subjects; never keys).

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use mesh_common::l7::CERTS_FILE;
use mesh_identity::svid::SvidInfo;

/// Why the list could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// No list: the node's proxy does not run with `--ca-dir`, or has not started.
    #[error("{}: {source} (is mesh-proxy running with --ca-dir on this node?)", path.display())]
    Read {
        /// The list's path.
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The list is not what the proxy writes.
    #[error("{}: {source}", path.display())]
    Parse {
        /// The list's path.
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the list of node `node` under `run_dir`.
pub fn read(run_dir: &Path, node: &str) -> Result<Vec<SvidInfo>, CertsError> {
    let path = run_dir.join(node).join(CERTS_FILE);
    let text = std::fs::read_to_string(&path).map_err(|source| CertsError::Read {
        path: path.clone(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| CertsError::Parse { path, source })
}

/// One block per SVID: identity, serial, validity, re-issue time and chain.
pub fn render(node: &str, certs: &[SvidInfo]) -> String {
    let mut out = String::new();
    if certs.is_empty() {
        let _ = writeln!(
            out,
            "node {node}: no workload certificates (no enrolled pod)"
        );
        return out;
    }
    let _ = writeln!(out, "node {node}: {} workload certificate(s)", certs.len());
    for c in certs {
        let _ = writeln!(out, "{}", c.identity);
        let _ = writeln!(out, "  serial      {}", c.serial);
        let _ = writeln!(out, "  not before  {}", c.not_before);
        let _ = writeln!(out, "  not after   {}", c.not_after);
        let _ = writeln!(out, "  re-issue at {}", c.refresh_at);
        for (i, subject) in c.chain_subjects.iter().enumerate() {
            let name = if i == 0 { "leaf" } else { "issuer" };
            let subject = if subject.is_empty() {
                "(no subject)"
            } else {
                subject
            };
            let _ = writeln!(out, "  chain[{i}]    {name}: {subject}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> SvidInfo {
        SvidInfo {
            identity: "spiffe://cluster.local/ns/mesh/sa/web".into(),
            serial: "0a1b".into(),
            not_before: "2026-12-02T10:00:00Z".into(),
            not_after: "2026-12-03T10:00:00Z".into(),
            refresh_at: "2026-12-02T22:00:00Z".into(),
            chain_subjects: vec![String::new(), "CN=n1 node CA".into()],
        }
    }

    #[test]
    fn reads_what_the_proxy_writes_and_renders_every_field() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("n1")).unwrap();
        let json = serde_json::to_string(&[info()]).unwrap();
        std::fs::write(dir.path().join("n1").join(CERTS_FILE), json).unwrap();
        let certs = read(dir.path(), "n1").unwrap();
        assert_eq!(certs, vec![info()]);
        let text = render("n1", &certs);
        for part in [
            "spiffe://cluster.local/ns/mesh/sa/web",
            "serial      0a1b",
            "not after   2026-12-03T10:00:00Z",
            "re-issue at 2026-12-02T22:00:00Z",
            "chain[0]    leaf: (no subject)",
            "chain[1]    issuer: CN=n1 node CA",
        ] {
            assert!(text.contains(part), "{part:?} in:\n{text}");
        }
    }

    #[test]
    fn a_missing_list_says_where_and_why() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path(), "n9").unwrap_err().to_string();
        assert!(err.contains("n9/certs.json"), "{err}");
        assert!(err.contains("--ca-dir"), "{err}");
    }
}
