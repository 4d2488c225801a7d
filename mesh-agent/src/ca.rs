//! `mesh-agent ca init` and `ca node`: the mesh's root CA (made or imported by the
//! operator, kept offline) and the intermediate CA of each node, in Istio's `cacerts`
//! layout, from which that node's proxy issues its pods' SVIDs.

use std::{fmt::Write as _, path::Path, time::Duration};

use mesh_identity::{CaError, RootCa};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};

/// Trust domain of `ca init` when none is given (Kubernetes' default cluster domain, as
/// Istio's).
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";

/// Where `ca init` gets the root from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootSource<'a> {
    /// A new self-signed root for this trust domain.
    Generate {
        /// The trust domain.
        trust_domain: &'a str,
    },
    /// The operator's root certificate and PKCS#8 key.
    Import {
        /// Root certificate (PEM).
        cert: &'a Path,
        /// Its private key (PEM).
        key: &'a Path,
    },
}

/// `ca init`: makes or imports the root and saves it into `dir` (`root-cert.pem`,
/// `root-key.pem` with mode 0600); refuses to replace an existing root unless `force`.
/// Returns what to print: where, the SHA-256 fingerprint and the expiry.
pub fn init(dir: &Path, source: &RootSource<'_>, force: bool) -> Result<String, CaError> {
    let (root, how) = match source {
        RootSource::Generate { trust_domain } => (
            RootCa::generate(trust_domain)?,
            format!("created for trust domain {trust_domain}"),
        ),
        RootSource::Import { cert, key } => (
            RootCa::import(cert, key)?,
            format!("imported from {}", cert.display()),
        ),
    };
    root.save(dir, force)?;
    let mut out = String::new();
    let _ = writeln!(out, "root CA {how}, saved in {}", dir.display());
    let _ = writeln!(out, "  subject:     {}", root.subject());
    let _ = writeln!(out, "  fingerprint: SHA256 {}", root.fingerprint_sha256());
    let _ = writeln!(out, "  not after:   {}", rfc3339(root.not_after()));
    Ok(out)
}

/// `ca node`: issues the intermediate CA of node `node`, valid `ttl` (cut at the root's
/// expiry), with the root of `root_dir`, into `out` in Istio's `cacerts` layout (keys
/// mode 0600, a new directory mode 0700). Returns what to print.
pub fn node(root_dir: &Path, node: &str, out: &Path, ttl: Duration) -> Result<String, CaError> {
    let root = RootCa::load(root_dir)?;
    let ca = root.issue_node(node, ttl)?;
    ca.save(out)?;
    let mut text = String::new();
    let _ = writeln!(text, "node CA of {node} saved in {}", out.display());
    let _ = writeln!(text, "  subject:     {}", ca.subject());
    let _ = writeln!(text, "  serial:      {}", ca.serial());
    let _ = writeln!(text, "  not after:   {}", rfc3339(ca.not_after()));
    let _ = writeln!(text, "  root:        SHA256 {}", root.fingerprint_sha256());
    Ok(text)
}

fn rfc3339(t: OffsetDateTime) -> String {
    // Only years past 9999 cannot be formatted; certificates cannot hold those.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use std::{fs, os::unix::fs::PermissionsExt as _, time::Duration};

    use mesh_identity::{CaError, NodeCa, RootCa, ca as files};

    use super::{RootSource, init, node};

    const GENERATE: RootSource<'static> = RootSource::Generate {
        trust_domain: "cluster.local",
    };

    fn mode(path: &std::path::Path) -> u32 {
        fs::metadata(path).expect("stat").permissions().mode() & 0o777
    }

    #[test]
    fn init_creates_a_root_once_and_prints_its_fingerprint() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = tmp.path().join("root");
        let out = init(&dir, &GENERATE, false).expect("init");
        let root = RootCa::load(&dir).expect("load");
        assert!(
            out.contains(&format!(
                "fingerprint: SHA256 {}",
                root.fingerprint_sha256()
            )),
            "{out}"
        );
        assert!(
            out.contains("created for trust domain cluster.local"),
            "{out}"
        );
        assert!(out.contains("not after:   20"), "{out}");
        assert_eq!(mode(&dir.join(files::ROOT_KEY_FILE)), 0o600);

        let err = init(&dir, &GENERATE, false).expect_err("second init");
        assert!(matches!(err, CaError::RootExists { .. }), "{err:?}");
        assert_eq!(RootCa::load(&dir).expect("load").cert(), root.cert());
        init(&dir, &GENERATE, true).expect("forced");
        assert_ne!(RootCa::load(&dir).expect("load").cert(), root.cert());
    }

    #[test]
    fn init_imports_an_operators_root() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let operator = tmp.path().join("operator");
        init(&operator, &GENERATE, false).expect("init");
        let dir = tmp.path().join("mesh");
        let source = RootSource::Import {
            cert: &operator.join(files::ROOT_CERT_FILE),
            key: &operator.join(files::ROOT_KEY_FILE),
        };
        let out = init(&dir, &source, false).expect("import");
        assert!(out.contains("imported from"), "{out}");
        assert_eq!(
            RootCa::load(&dir).expect("load").cert(),
            RootCa::load(&operator).expect("load").cert()
        );
    }

    #[test]
    fn node_issues_an_istio_cacerts_directory() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root_dir = tmp.path().join("root");
        init(&root_dir, &GENERATE, false).expect("init");
        let out = tmp.path().join("n1");
        let text = node(&root_dir, "n1", &out, Duration::from_secs(3600)).expect("node");
        assert!(text.contains("node CA of n1 saved in"), "{text}");
        assert_eq!(mode(&out), 0o700);
        assert_eq!(mode(&out.join(files::CA_KEY_FILE)), 0o600);
        for file in [
            files::CA_CERT_FILE,
            files::CERT_CHAIN_FILE,
            files::ROOT_CERT_FILE,
        ] {
            assert!(out.join(file).is_file(), "{file} missing");
        }
        let ca = NodeCa::load(&out).expect("load");
        assert_eq!(
            ca.roots(),
            [RootCa::load(&root_dir).expect("root").cert().clone()]
        );
        assert!(text.contains(ca.serial()), "{text}");

        let err = node(
            &tmp.path().join("none"),
            "n1",
            &out,
            Duration::from_secs(60),
        )
        .expect_err("no root");
        assert!(err.to_string().contains("none/root-cert.pem"), "{err}");
    }
}
