//! Handshakes between a client and a server configuration over an in-memory pipe.

use std::{sync::Arc, time::Duration};

use rustls::{ClientConfig, ServerConfig, pki_types::ServerName};
use time::OffsetDateTime;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _, DuplexStream};
use tokio_rustls::{TlsAcceptor, TlsConnector, client, server};

use super::{
    ClientSvid, ServerSvids, ServerVerifier, TlsError, client_config, peer_identity, server_config,
    server_name,
};
use crate::{NodeCa, RootCa, SpiffeId, Svid, x509};

const TD: &str = "cluster.local";
const HOUR: Duration = Duration::from_secs(3600);

fn id(text: &str) -> SpiffeId {
    text.parse().expect("SPIFFE ID")
}

fn web() -> SpiffeId {
    id("spiffe://cluster.local/ns/shop/sa/web")
}

fn api() -> SpiffeId {
    id("spiffe://cluster.local/ns/shop/sa/api")
}

/// A root and one node CA under it.
struct Ca {
    root: RootCa,
    node: NodeCa,
}

impl Ca {
    fn new() -> Self {
        let root = RootCa::generate(TD).expect("root");
        let node = root.issue_node("n1", 24 * HOUR).expect("node");
        Self { root, node }
    }

    fn svid(&self, id: &SpiffeId) -> Svid {
        self.node.issue_svid(id, HOUR).expect("svid")
    }

    /// A server presenting `svids`, trusting this root.
    fn server(&self, svids: &[&Svid]) -> (Arc<ServerSvids>, Arc<ServerConfig>) {
        let resolver = Arc::new(ServerSvids::new());
        for svid in svids {
            resolver.insert(svid).expect("insert");
        }
        let config =
            server_config(Arc::clone(&resolver), &[self.root.cert().clone()], TD).expect("config");
        (resolver, config)
    }

    /// A client presenting `svid`, trusting this root, expecting `expected`.
    fn client(
        &self,
        svid: &Svid,
        expected: Option<SpiffeId>,
    ) -> (Arc<ClientSvid>, Arc<ClientConfig>) {
        let resolver = Arc::new(ClientSvid::new(svid).expect("client svid"));
        let config = client_config(
            Arc::clone(&resolver),
            &[self.root.cert().clone()],
            TD,
            expected,
        )
        .expect("config");
        (resolver, config)
    }
}

type Pair = (
    Result<client::TlsStream<DuplexStream>, String>,
    Result<server::TlsStream<DuplexStream>, String>,
);

/// Client and server handshakes, concurrently, the client sending SNI `sni`. In TLS
/// 1.3 the client finishes before the server has checked its certificate, so a
/// refused client shows on the server side (and on the client's first read).
async fn handshake(
    client: Arc<ClientConfig>,
    server: Arc<ServerConfig>,
    sni: ServerName<'static>,
) -> Pair {
    let (a, b) = tokio::io::duplex(64 * 1024);
    let (c, s) = tokio::join!(
        TlsConnector::from(client).connect(sni, a),
        TlsAcceptor::from(server).accept(b),
    );
    (c.map_err(|e| e.to_string()), s.map_err(|e| e.to_string()))
}

fn serial_of_peer(conn: &rustls::CommonState) -> String {
    let leaf = &conn.peer_certificates().expect("peer certificates")[0];
    x509::facts("peer", leaf).expect("facts").serial
}

/// Sends `msg` from `from` and reads it on `to`, concurrently (a message larger than
/// the pipe's buffer needs its reader running).
async fn echo(
    from: &mut (impl tokio::io::AsyncWrite + Unpin),
    to: &mut (impl tokio::io::AsyncRead + Unpin),
    msg: &[u8],
) {
    let mut got = vec![0; msg.len()];
    let send = async {
        from.write_all(msg).await.expect("write");
        from.flush().await.expect("flush");
    };
    let (_, read) = tokio::join!(send, to.read_exact(&mut got));
    read.expect("read");
    assert_eq!(got, msg);
}

/// The handshake failed with an error that says each of `why`.
fn assert_refused(result: Result<impl Sized, String>, why: &[&str]) {
    match result {
        Ok(_) => panic!("handshake succeeded, expected: {why:?}"),
        Err(err) => {
            for why in why {
                assert!(err.contains(why), "error {err:?} does not say {why:?}");
            }
        }
    }
}

#[tokio::test]
async fn both_sides_see_the_peers_spiffe_id_and_bytes_arrive_intact() {
    let ca = Ca::new();
    let (web_svid, api_svid) = (ca.svid(&web()), ca.svid(&api()));
    let (_, server) = ca.server(&[&web_svid]);
    let (_, client) = ca.client(&api_svid, Some(web()));
    let (c, s) = handshake(client, server, server_name(&web())).await;
    let (mut c, mut s) = (c.expect("client"), s.expect("server"));

    assert_eq!(peer_identity(c.get_ref().1), Some(web()));
    assert_eq!(peer_identity(s.get_ref().1), Some(api()));
    assert_eq!(
        c.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(serial_of_peer(c.get_ref().1), web_svid.serial());
    assert_eq!(serial_of_peer(s.get_ref().1), api_svid.serial());
    // The server presented its chain: leaf and node CA.
    assert_eq!(c.get_ref().1.peer_certificates().expect("certs").len(), 2);

    let big: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    echo(&mut c, &mut s, b"GET / HTTP/1.1\r\n\r\n").await;
    echo(&mut s, &mut c, &big).await;
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let ca = Ca::new();
    let two_days_ago = OffsetDateTime::now_utc() - time::Duration::days(2);
    let expired = ca
        .node
        .issue_svid_at(&web(), two_days_ago, HOUR)
        .expect("svid");
    let fresh = ca.svid(&api());

    // Server with an expired SVID: the client refuses it.
    let (_, server) = ca.server(&[&expired]);
    let (_, client) = ca.client(&fresh, Some(web()));
    let (c, s) = handshake(client, server, server_name(&web())).await;
    assert_refused(c, &["certificate expired"]);
    assert!(s.is_err());

    // Client with an expired SVID: the server refuses it.
    let expired_client = ca
        .node
        .issue_svid_at(&api(), two_days_ago, HOUR)
        .expect("svid");
    let (_, server) = ca.server(&[&ca.svid(&web())]);
    let (_, client) = ca.client(&expired_client, Some(web()));
    let (_, s) = handshake(client, server, server_name(&web())).await;
    assert_refused(s, &["certificate expired"]);
}

#[tokio::test]
async fn a_certificate_not_yet_valid_is_refused() {
    let ca = Ca::new();
    let in_an_hour = OffsetDateTime::now_utc() + time::Duration::hours(1);
    let early = ca
        .node
        .issue_svid_at(&web(), in_an_hour, HOUR)
        .expect("svid");
    let (_, server) = ca.server(&[&early]);
    let (_, client) = ca.client(&ca.svid(&api()), Some(web()));
    let (c, _) = handshake(client, server, server_name(&web())).await;
    assert_refused(c, &["certificate not valid yet"]);
}

#[tokio::test]
async fn a_certificate_of_a_foreign_root_is_refused() {
    // Two roots of one trust domain have the same subject names, so webpki finds the
    // foreign node CA's "issuer" among our roots and the signature check fails.
    let (ours, foreign) = (Ca::new(), Ca::new());
    // Server of the foreign root, same trust domain: the client refuses it.
    let (_, server) = foreign.server(&[&foreign.svid(&web())]);
    let (_, client) = ours.client(&ours.svid(&api()), Some(web()));
    let (c, _) = handshake(client, server, server_name(&web())).await;
    assert_refused(c, &["invalid peer certificate: BadSignature"]);

    // Client of the foreign root: the server refuses it.
    let (_, server) = ours.server(&[&ours.svid(&web())]);
    let foreign_client = Arc::new(ClientSvid::new(&foreign.svid(&api())).expect("svid"));
    let client =
        client_config(foreign_client, &[ours.root.cert().clone()], TD, None).expect("config");
    let (_, s) = handshake(client, server, server_name(&web())).await;
    assert_refused(s, &["invalid peer certificate: BadSignature"]);
}

#[tokio::test]
async fn a_server_that_is_not_the_expected_peer_is_refused() {
    let ca = Ca::new();
    let db = id("spiffe://cluster.local/ns/shop/sa/db");
    let (_, server) = ca.server(&[&ca.svid(&web())]);
    let (_, client) = ca.client(&ca.svid(&api()), Some(db));
    let (c, _) = handshake(client, server, server_name(&web())).await;
    assert_refused(
        c,
        &[
            "peer spiffe://cluster.local/ns/shop/sa/web (serial ",
            "is not the expected spiffe://cluster.local/ns/shop/sa/db",
        ],
    );
}

#[tokio::test]
async fn a_peer_of_another_trust_domain_is_refused() {
    let ca = Ca::new();
    // Same root, but the SVIDs name another trust domain.
    let foreign_web = id("spiffe://other.example/ns/shop/sa/web");
    let (_, server) = ca.server(&[&ca.svid(&foreign_web)]);
    let (_, client) = ca.client(&ca.svid(&api()), None);
    let (c, _) = handshake(client, server, server_name(&foreign_web)).await;
    assert_refused(
        c,
        &[
            "peer spiffe://other.example/ns/shop/sa/web (serial ",
            "is not of our trust domain cluster.local",
        ],
    );

    let foreign_api = id("spiffe://other.example/ns/shop/sa/api");
    let (_, server) = ca.server(&[&ca.svid(&web())]);
    let (_, client) = ca.client(&ca.svid(&foreign_api), Some(web()));
    let (_, s) = handshake(client, server, server_name(&web())).await;
    assert_refused(s, &["peer spiffe://other.example/ns/shop/sa/api"]);
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    let ca = Ca::new();
    let (_, server) = ca.server(&[&ca.svid(&web())]);
    // Same verification of the server, but no client certificate to present.
    let provider = super::provider();
    let verifier = Arc::new(ServerVerifier {
        roots: super::root_store(&[ca.root.cert().clone()]).expect("roots"),
        algorithms: provider.signature_verification_algorithms,
        trust_domain: TD.into(),
        expected: Some(web()),
    });
    let client = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_no_client_auth();
    let (_, s) = handshake(Arc::new(client), server, server_name(&web())).await;
    assert_refused(s, &["peer sent no certificates"]);
}

#[tokio::test]
async fn a_server_without_an_svid_for_the_sni_fails_the_handshake() {
    let ca = Ca::new();
    let (_, server) = ca.server(&[&ca.svid(&web())]);
    let (_, client) = ca.client(&ca.svid(&api()), None);
    let (c, s) = handshake(client, server, server_name(&api())).await;
    assert!(c.is_err() && s.is_err(), "{c:?} {s:?}");
}

#[tokio::test]
async fn rotation_changes_the_next_handshake_not_established_connections() {
    let ca = Ca::new();
    let (web1, api1) = (ca.svid(&web()), ca.svid(&api()));
    let (server_svids, server) = ca.server(&[&web1]);
    let (client_svid, client) = ca.client(&api1, Some(web()));
    let (c1, s1) = handshake(
        Arc::clone(&client),
        Arc::clone(&server),
        server_name(&web()),
    )
    .await;
    let (mut c1, mut s1) = (c1.expect("client"), s1.expect("server"));
    assert_eq!(serial_of_peer(c1.get_ref().1), web1.serial());
    assert_eq!(serial_of_peer(s1.get_ref().1), api1.serial());

    let (web2, api2) = (ca.svid(&web()), ca.svid(&api()));
    server_svids.insert(&web2).expect("rotate server");
    client_svid.replace(&api2).expect("rotate client");

    let (c2, s2) = handshake(client, server, server_name(&web())).await;
    let (mut c2, mut s2) = (c2.expect("client"), s2.expect("server"));
    assert_eq!(serial_of_peer(c2.get_ref().1), web2.serial());
    assert_eq!(serial_of_peer(s2.get_ref().1), api2.serial());
    echo(&mut c2, &mut s2, b"new").await;

    // The first connection keeps its certificates and keeps working.
    assert_eq!(serial_of_peer(c1.get_ref().1), web1.serial());
    echo(&mut c1, &mut s1, b"still here").await;
    echo(&mut s1, &mut c1, b"and back").await;

    // A removed identity is no longer served.
    assert!(server_svids.remove(&web()));
    assert!(!server_svids.remove(&web()));
}

#[test]
fn a_client_resolver_keeps_its_identity() {
    let ca = Ca::new();
    let resolver = ClientSvid::new(&ca.svid(&api())).expect("svid");
    assert_eq!(resolver.id(), &api());
    let err = resolver
        .replace(&ca.svid(&web()))
        .expect_err("other identity");
    assert!(matches!(err, TlsError::OtherIdentity { .. }), "{err:?}");
    assert!(err.to_string().contains("sa/web"), "{err}");
}

#[test]
fn configurations_need_roots_and_a_valid_trust_domain() {
    let ca = Ca::new();
    let svids = Arc::new(ServerSvids::new());
    assert!(matches!(
        server_config(Arc::clone(&svids), &[], TD),
        Err(TlsError::NoRoots)
    ));
    assert!(matches!(
        server_config(svids, &[ca.root.cert().clone()], "Bad TD"),
        Err(TlsError::TrustDomain(_))
    ));
    let client = Arc::new(ClientSvid::new(&ca.svid(&api())).expect("svid"));
    assert!(matches!(
        client_config(client, &[], TD, None),
        Err(TlsError::NoRoots)
    ));
}

#[test]
fn server_names_are_per_identity_dns_names() {
    let name = server_name(&web());
    let text = name.to_str();
    assert_eq!(text.len(), 32 + ".svid.mesh".len(), "{text}");
    assert!(text.ends_with(".svid.mesh"));
    assert_eq!(server_name(&web()), name);
    assert_ne!(server_name(&api()), name);
    assert_ne!(
        server_name(&id("spiffe://other.example/ns/shop/sa/web")),
        name
    );
}
