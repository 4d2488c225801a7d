use std::{fs, os::unix::fs::PermissionsExt as _, path::Path, time::Duration};

use time::OffsetDateTime;

use super::{
    CA_CERT_FILE, CA_KEY_FILE, CERT_CHAIN_FILE, CaError, DEFAULT_NODE_TTL, NodeCa, ROOT_CERT_FILE,
    ROOT_KEY_FILE, ROOT_TTL, RootCa,
};
use crate::{SpiffeId, files};

fn mode(path: &Path) -> u32 {
    fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

fn days(d: u64) -> Duration {
    Duration::from_secs(d * 24 * 3600)
}

/// Basic constraints of `der`: (CA, path length limit).
fn basic_constraints(der: &[u8]) -> (bool, Option<u32>) {
    let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parse");
    let bc = cert
        .basic_constraints()
        .expect("valid")
        .expect("present")
        .value;
    (bc.ca, bc.path_len_constraint)
}

#[test]
fn a_generated_root_is_a_ten_year_p256_ca_of_its_trust_domain() {
    let root = RootCa::generate("cluster.local").expect("root");
    assert_eq!(basic_constraints(root.cert()), (true, None));
    assert_eq!(root.subject(), "O=cluster.local, CN=mesh root CA");
    let facts = crate::x509::facts("root", root.cert()).expect("facts");
    assert_eq!(facts.uri_sans, ["spiffe://cluster.local"]);
    assert_eq!(facts.serial.len(), 32, "{}", facts.serial);
    let lifetime = root.not_after() - OffsetDateTime::now_utc();
    let ten_years = time::Duration::try_from(ROOT_TTL).expect("ttl");
    assert!(
        (lifetime - ten_years).abs() < time::Duration::minutes(1),
        "{lifetime}"
    );
    let fingerprint = root.fingerprint_sha256();
    assert_eq!(fingerprint.len(), 32 * 3 - 1, "{fingerprint}");
    assert!(fingerprint.split(':').all(|pair| {
        pair.len() == 2
            && pair
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_lowercase())
    }));
    let err = RootCa::generate("Cluster.Local").expect_err("bad trust domain");
    assert!(err.to_string().contains("\"Cluster.Local\""), "{err}");
}

#[test]
fn a_saved_root_loads_back_with_its_key_private() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("root");
    let root = RootCa::generate("cluster.local").expect("root");
    root.save(&dir, false).expect("save");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(ROOT_KEY_FILE)), 0o600);
    let names: Vec<_> = fs::read_dir(&dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().into_string().expect("utf-8"))
        .collect();
    assert_eq!(names.len(), 2, "temporary files left: {names:?}");

    let loaded = RootCa::load(&dir).expect("load");
    assert_eq!(loaded.cert(), root.cert());
    assert_eq!(loaded.fingerprint_sha256(), root.fingerprint_sha256());
    // The loaded key is the same key: what it signs verifies with the saved root.
    let node = loaded.issue_node("n1", days(1)).expect("node");
    assert!(crate::x509::signed_by("node", node.cert(), "root", root.cert()).expect("parse"));
}

#[test]
fn saving_over_an_existing_root_needs_force() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let first = RootCa::generate("cluster.local").expect("root");
    first.save(tmp.path(), false).expect("save");
    let second = RootCa::generate("cluster.local").expect("root");
    let err = second.save(tmp.path(), false).expect_err("refused");
    assert!(matches!(err, CaError::RootExists { .. }), "{err:?}");
    assert!(
        err.to_string().contains(&tmp.path().display().to_string()),
        "{err}"
    );
    assert_eq!(RootCa::load(tmp.path()).expect("load").cert(), first.cert());
    second.save(tmp.path(), true).expect("forced");
    assert_eq!(
        RootCa::load(tmp.path()).expect("load").cert(),
        second.cert()
    );
    assert_eq!(mode(&tmp.path().join(ROOT_KEY_FILE)), 0o600);
}

#[test]
fn importing_a_root_checks_the_key_and_the_ca_flag() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    RootCa::generate("cluster.local")
        .expect("root")
        .save(&a, false)
        .expect("save");
    RootCa::generate("cluster.local")
        .expect("root")
        .save(&b, false)
        .expect("save");

    let imported = RootCa::import(&a.join(ROOT_CERT_FILE), &a.join(ROOT_KEY_FILE));
    assert!(imported.is_ok(), "{imported:?}");

    let err = RootCa::import(&a.join(ROOT_CERT_FILE), &b.join(ROOT_KEY_FILE))
        .expect_err("mismatched key");
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
    let text = err.to_string();
    assert!(
        text.contains(&b.join(ROOT_KEY_FILE).display().to_string()),
        "{text}"
    );
    assert!(
        text.contains(&a.join(ROOT_CERT_FILE).display().to_string()),
        "{text}"
    );

    // A leaf certificate with its own key is not a CA.
    let node = RootCa::load(&a)
        .expect("load")
        .issue_node("n1", days(1))
        .expect("node");
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
    let svid = node
        .issue_svid(&id, Duration::from_secs(3600))
        .expect("svid");
    let leaf = tmp.path().join("leaf.pem");
    let leaf_key = tmp.path().join("leaf-key.pem");
    fs::write(&leaf, files::certs_pem(&svid.chain()[..1])).expect("write");
    fs::write(
        &leaf_key,
        files::pem_block("PRIVATE KEY", svid.private_key().secret_der()),
    )
    .expect("write");
    let err = RootCa::import(&leaf, &leaf_key).expect_err("not a CA");
    assert!(matches!(err, CaError::NotCa { .. }), "{err:?}");
    assert!(err.to_string().contains("leaf.pem"), "{err}");

    let err = RootCa::import(&tmp.path().join("missing.pem"), &leaf_key).expect_err("missing");
    assert!(err.to_string().contains("missing.pem"), "{err}");
    fs::write(&leaf, "not pem").expect("write");
    let err = RootCa::import(&leaf, &leaf_key).expect_err("no certificate");
    assert!(err.to_string().contains("no CERTIFICATE"), "{err}");
}

#[test]
fn a_node_ca_is_a_path_length_zero_ca_within_its_root() {
    let root = RootCa::generate("cluster.local").expect("root");
    let node = root.issue_node("worker-1", DEFAULT_NODE_TTL).expect("node");
    assert_eq!(basic_constraints(node.cert()), (true, Some(0)));
    assert_eq!(node.subject(), "CN=mesh node CA worker-1");
    assert_eq!(node.chain(), [node.cert().clone()]);
    assert_eq!(node.roots(), [root.cert().clone()]);
    assert!(node.not_after() < root.not_after());
    // Longer than the root lives: cut at the root's expiry.
    let long = root.issue_node("worker-1", days(20 * 365)).expect("node");
    assert_eq!(long.not_after(), root.not_after());
    for bad in ["", "a b", "tab\t"] {
        let err = root.issue_node(bad, days(1)).expect_err("bad name");
        assert!(matches!(err, CaError::NodeName { .. }), "{bad:?}: {err:?}");
    }
}

#[test]
fn a_node_ca_saves_and_loads_in_istio_cacerts_layout() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cacerts");
    let root = RootCa::generate("cluster.local").expect("root");
    let node = root.issue_node("n1", days(30)).expect("node");
    node.save(&dir).expect("save");
    assert_eq!(mode(&dir), 0o700);
    assert_eq!(mode(&dir.join(CA_KEY_FILE)), 0o600);
    let read = |name: &str| {
        let path = dir.join(name);
        files::certs(&path, &files::read(&path).expect("read")).expect("certs")
    };
    assert_eq!(read(CA_CERT_FILE), [node.cert().clone()]);
    assert_eq!(
        read(CERT_CHAIN_FILE),
        [node.cert().clone(), root.cert().clone()]
    );
    assert_eq!(read(ROOT_CERT_FILE), [root.cert().clone()]);

    let loaded = NodeCa::load(&dir).expect("load");
    assert_eq!(loaded.chain(), node.chain());
    assert_eq!(loaded.roots(), node.roots());
    assert_eq!(loaded.serial(), node.serial());
    // Saving again replaces the files (a node CA is re-issued at will).
    root.issue_node("n1", days(30))
        .expect("node")
        .save(&dir)
        .expect("save again");

    // Istio's cacerts may come without cert-chain.pem.
    fs::remove_file(dir.join(CERT_CHAIN_FILE)).expect("rm");
    let loaded = NodeCa::load(&dir).expect("load without chain");
    assert_eq!(loaded.chain().len(), 1);
    // A loaded node CA issues SVIDs that chain to the root.
    let id: SpiffeId = "spiffe://cluster.local/ns/a/sa/b".parse().expect("id");
    let svid = loaded.issue_svid(&id, days(1)).expect("svid");
    assert!(
        crate::x509::signed_by("svid", &svid.chain()[0], "node", loaded.cert()).expect("parse")
    );
}

#[test]
fn a_node_ca_of_another_root_or_key_is_refused_on_load() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().join("cacerts");
    let root = RootCa::generate("cluster.local").expect("root");
    root.issue_node("n1", days(30))
        .expect("node")
        .save(&dir)
        .expect("save");

    let foreign = RootCa::generate("cluster.local").expect("root");
    fs::write(dir.join(ROOT_CERT_FILE), foreign.cert_pem()).expect("write");
    fs::remove_file(dir.join(CERT_CHAIN_FILE)).expect("rm");
    let err = NodeCa::load(&dir).expect_err("foreign root");
    assert!(matches!(err, CaError::NotSigned { .. }), "{err:?}");
    assert!(err.to_string().contains(ROOT_CERT_FILE), "{err}");

    let other = tmp.path().join("other");
    root.issue_node("n2", days(30))
        .expect("node")
        .save(&other)
        .expect("save");
    fs::copy(other.join(CA_KEY_FILE), dir.join(CA_KEY_FILE)).expect("copy");
    let err = NodeCa::load(&dir).expect_err("other key");
    assert!(matches!(err, CaError::KeyMismatch { .. }), "{err:?}");
}
