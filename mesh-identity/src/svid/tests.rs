use std::time::Duration;

use time::{OffsetDateTime, Time};
use x509_parser::extensions::{GeneralName, ParsedExtension};

use crate::{RootCa, SpiffeId, rotation::Decision};

/// Midnight (UTC) starting tomorrow: a round time within a fresh node CA's validity.
fn tomorrow() -> OffsetDateTime {
    (OffsetDateTime::now_utc() + time::Duration::days(1)).replace_time(Time::MIDNIGHT)
}

fn minutes(m: i64) -> time::Duration {
    time::Duration::minutes(m)
}

fn seconds(s: i64) -> time::Duration {
    time::Duration::seconds(s)
}

fn id(text: &str) -> SpiffeId {
    text.parse().expect("SPIFFE ID")
}

#[test]
fn an_svid_names_its_spiffe_id_only_and_is_a_tls_leaf() {
    let root = RootCa::generate("cluster.local").expect("root");
    let node = root
        .issue_node("n1", Duration::from_secs(86400))
        .expect("node");
    let web = id("spiffe://cluster.local/ns/shop/sa/web");
    let before = OffsetDateTime::now_utc();
    let svid = node
        .issue_svid(&web, Duration::from_secs(3600))
        .expect("svid");
    assert_eq!(svid.id(), &web);
    assert_eq!(svid.chain().len(), 2);
    assert_eq!(&svid.chain()[1], node.cert());

    let (_, leaf) = x509_parser::parse_x509_certificate(&svid.chain()[0]).expect("parse");
    assert!(!leaf.is_ca());
    assert_eq!(leaf.subject().iter().count(), 0, "empty subject");
    let sans = leaf
        .subject_alternative_name()
        .expect("valid")
        .expect("present");
    assert!(sans.critical, "SAN of an empty subject is critical");
    assert_eq!(
        sans.value.general_names,
        [GeneralName::URI("spiffe://cluster.local/ns/shop/sa/web")]
    );
    let ku = leaf.key_usage().expect("valid").expect("present").value;
    assert!(ku.digital_signature() && ku.key_encipherment() && !ku.key_cert_sign());
    let eku = leaf
        .extended_key_usage()
        .expect("valid")
        .expect("present")
        .value;
    assert!(eku.server_auth && eku.client_auth);
    assert!(leaf.iter_extensions().any(|e| matches!(
        e.parsed_extension(),
        ParsedExtension::AuthorityKeyIdentifier(_)
    )));
    assert_eq!(svid.serial(), crate::x509::hex(leaf.raw_serial()));
    assert_eq!(svid.serial().len(), 32);

    // Backdated a minute for clock skew; one hour from issue.
    let skew = before - svid.not_before();
    assert!(
        skew >= time::Duration::seconds(59) && skew <= time::Duration::seconds(62),
        "{skew}"
    );
    let life = svid.not_after() - before;
    assert!(
        (life - time::Duration::hours(1)).abs() <= time::Duration::seconds(2),
        "{life}"
    );
}

#[test]
fn serials_differ_and_keys_are_fresh() {
    let root = RootCa::generate("td").expect("root");
    let node = root
        .issue_node("n1", Duration::from_secs(86400))
        .expect("node");
    let a = id("spiffe://td/ns/a/sa/b");
    let one = node.issue_svid(&a, Duration::from_secs(60)).expect("svid");
    let two = node.issue_svid(&a, Duration::from_secs(60)).expect("svid");
    assert_ne!(one.serial(), two.serial());
    assert_ne!(
        one.private_key().secret_der(),
        two.private_key().secret_der()
    );
}

#[test]
fn refresh_is_at_half_life() {
    let root = RootCa::generate("td").expect("root");
    let node = root
        .issue_node("n1", Duration::from_secs(365 * 86400))
        .expect("node");
    let now = tomorrow();
    let svid = node
        .issue_svid_at(
            &id("spiffe://td/ns/a/sa/b"),
            now,
            Duration::from_secs(24 * 3600),
        )
        .expect("svid");
    // Valid from a minute before `now` to a day after: 24h01m, half is 12h00m30s.
    assert_eq!(svid.not_before(), now - minutes(1));
    assert_eq!(svid.not_after(), now + minutes(24 * 60));
    assert_eq!(svid.refresh_at(), now + minutes(12 * 60) - seconds(30));
    assert_eq!(
        svid.decide(now + minutes(12 * 60 - 1)),
        Decision::Keep(Duration::from_secs(30))
    );
    assert_eq!(
        svid.decide(now + minutes(12 * 60) - seconds(30)),
        Decision::Reissue
    );
}

#[test]
fn an_svid_ends_with_its_node_ca() {
    let root = RootCa::generate("td").expect("root");
    let node = root
        .issue_node("n1", Duration::from_secs(3600))
        .expect("node");
    let svid = node
        .issue_svid(&id("spiffe://td/ns/a/sa/b"), Duration::from_secs(86400))
        .expect("svid");
    assert_eq!(svid.not_after(), node.not_after());
    // Issued after the node CA expired: refused, naming the identity.
    let late = OffsetDateTime::now_utc() + time::Duration::hours(2);
    let err = node
        .issue_svid_at(&id("spiffe://td/ns/a/sa/b"), late, Duration::from_secs(60))
        .expect_err("issuer expired");
    assert!(err.to_string().contains("spiffe://td/ns/a/sa/b"), "{err}");
}

#[test]
fn info_and_debug_never_show_the_key() {
    let root = RootCa::generate("td").expect("root");
    let node = root
        .issue_node("n1", Duration::from_secs(86400))
        .expect("node");
    let now = tomorrow();
    let svid = node
        .issue_svid_at(&id("spiffe://td/ns/a/sa/b"), now, Duration::from_secs(3600))
        .expect("svid");
    let info = svid.info();
    assert_eq!(info.identity, "spiffe://td/ns/a/sa/b");
    assert_eq!(info.serial, svid.serial());
    let day = now.date();
    assert_eq!(
        info.not_before,
        format!("{}T23:59:00Z", day.previous_day().expect("day"))
    );
    assert_eq!(info.not_after, format!("{day}T01:00:00Z"));
    assert_eq!(info.refresh_at, format!("{day}T00:29:30Z"));
    assert_eq!(info.chain_subjects, ["", "CN=mesh node CA n1"]);
    let json = serde_json::to_string(&info).expect("json");
    assert!(json.contains("\"chain_subjects\""), "{json}");

    let debug = format!("{svid:?} {node:?} {root:?}");
    assert!(debug.contains("[redacted]"), "{debug}");
    let key = crate::files::pem_block("PRIVATE KEY", svid.private_key().secret_der());
    let body = key.lines().nth(1).expect("base64 line");
    assert!(!debug.contains(body), "{debug}");
    assert!(!debug.to_lowercase().contains("private"), "{debug}");
}
