//! rustls configurations for mTLS between node proxies: TLS 1.3 only, ring, client
//! certificates required, peers verified by SPIFFE ID instead of host name.
//!
//! Verification of a peer, on both sides: the chain must lead to one of the roots
//! (webpki: signatures, validity at the time of the handshake, basic constraints, the
//! EKU of the side), then the leaf must carry exactly one URI SAN, a mesh SPIFFE ID of
//! our trust domain; a client that names the peer it expects also requires that ID.
//! The TLS `ServerName` is never checked against the certificate.
//!
//! Which SVID a server presents (SNI scheme): a node proxy serves several local pods,
//! each with its own identity. The client puts [`server_name`] of the destination's
//! SPIFFE ID into SNI (a hash, so the ClientHello does not reveal which workload is
//! dialled, and always a valid DNS name), and [`ServerSvids`] picks the SVID stored for
//! that name. A ClientHello without SNI, or for an identity the server does not hold,
//! gets no certificate and the handshake fails.
//!
//! Rotation: [`ServerSvids::insert`] and [`ClientSvid::replace`] swap certificates
//! behind the configurations; the next handshake presents the new SVID, and
//! established connections keep theirs. Session resumption is off on both sides, so
//! every connection presents, and verifies, the current certificates.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{Arc, PoisonError, RwLock},
};

use rustls::{
    ClientConfig, CommonState, DigitallySignedStruct, DistinguishedName, RootCertStore,
    ServerConfig, SignatureScheme,
    client::{
        ResolvesClientCert, Resumption,
        danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    },
    crypto::{CryptoProvider, WebPkiSupportedAlgorithms},
    pki_types::{CertificateDer, DnsName, ServerName, UnixTime},
    server::{
        ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
        danger::{ClientCertVerified, ClientCertVerifier},
    },
    sign::CertifiedKey,
};

use crate::{
    spiffe::{self, SpiffeError, SpiffeId},
    svid::Svid,
    x509,
};

/// Why a TLS configuration or resolver could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// No root to verify peers against.
    #[error("no root certificates to verify peers against")]
    NoRoots,
    /// A root certificate that rustls refuses as a trust anchor.
    #[error("root certificate #{index}: {source}")]
    Root {
        /// Its position (from 1).
        index: usize,
        /// rustls's error.
        source: rustls::Error,
    },
    /// The trust domain is not valid.
    #[error(transparent)]
    TrustDomain(#[from] SpiffeError),
    /// The private key of an SVID is unusable with the ring provider.
    #[error("SVID of {id} (serial {serial}): {source}")]
    Key {
        /// The SVID's identity.
        id: String,
        /// The SVID's serial.
        serial: String,
        /// rustls's error.
        source: rustls::Error,
    },
    /// A client resolver is given an SVID of another identity.
    #[error("this client resolver presents {ours}: refusing an SVID of {given}")]
    OtherIdentity {
        /// The identity the resolver presents.
        ours: String,
        /// The identity of the SVID given.
        given: String,
    },
    /// rustls refused the configuration.
    #[error("building the TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// rustls refused the client certificate verifier.
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
}

/// Why a peer's certificate is refused after its chain verified. Carried to the
/// handshake error as `CertificateError::Other`.
#[derive(Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    /// The leaf does not have exactly one URI SAN.
    #[error("peer certificate (serial {serial}) has {count} URI SANs, an SVID has exactly one")]
    UriSans {
        /// The leaf's serial.
        serial: String,
        /// How many it has.
        count: usize,
    },
    /// The URI SAN is not a mesh SPIFFE ID.
    #[error("peer certificate (serial {serial}): URI SAN {uri:?} is not a mesh SPIFFE ID: {why}")]
    NotSpiffe {
        /// The leaf's serial.
        serial: String,
        /// The URI.
        uri: String,
        /// Why it does not parse.
        why: SpiffeError,
    },
    /// The SPIFFE ID is of another trust domain.
    #[error("peer {id} (serial {serial}) is not of our trust domain {ours}")]
    TrustDomain {
        /// The peer's identity.
        id: String,
        /// The leaf's serial.
        serial: String,
        /// Our trust domain.
        ours: String,
    },
    /// The SPIFFE ID is not the one the client expects.
    #[error("peer {id} (serial {serial}) is not the expected {expected}")]
    Unexpected {
        /// The peer's identity.
        id: String,
        /// The leaf's serial.
        serial: String,
        /// The identity expected.
        expected: String,
    },
    /// The leaf cannot be parsed (webpki accepted it, x509-parser did not).
    #[error("{0}")]
    Unreadable(String),
}

impl fmt::Debug for PeerError {
    // rustls prints `CertificateError::Other` with `{:?}`: the message is what an
    // operator needs to read in a handshake error, not the variant's fields.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl From<PeerError> for rustls::Error {
    fn from(err: PeerError) -> Self {
        rustls::CertificateError::Other(rustls::OtherError(Arc::new(err))).into()
    }
}

/// The SNI name a client sends to reach the workload `id` (see the module docs):
/// `<first 16 bytes of SHA-256 of the SPIFFE ID, hex>.svid.mesh`.
pub fn server_name(id: &SpiffeId) -> ServerName<'static> {
    let digest = ring::digest::digest(&ring::digest::SHA256, id.to_string().as_bytes());
    let name = format!("{}.svid.mesh", x509::hex(&digest.as_ref()[..16]));
    // 32 hex digits and two fixed labels always form a valid DNS name.
    let name = DnsName::try_from(name).expect("a hex label and fixed labels are a DNS name");
    ServerName::DnsName(name)
}

/// The ring crypto provider every configuration of this crate uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// `svid` as rustls presents it: its chain and its key loaded by `provider`.
fn certified_key(provider: &CryptoProvider, svid: &Svid) -> Result<Arc<CertifiedKey>, TlsError> {
    let key = provider
        .key_provider
        .load_private_key(svid.private_key())
        .map_err(|source| TlsError::Key {
            id: svid.id().to_string(),
            serial: svid.serial().to_owned(),
            source,
        })?;
    Ok(Arc::new(CertifiedKey::new(svid.chain().to_vec(), key)))
}

/// The SVIDs a server presents, one per local identity, chosen by SNI
/// ([`server_name`]). Shared with the [`ServerConfig`]; updates apply to the next
/// handshake.
pub struct ServerSvids {
    provider: Arc<CryptoProvider>,
    /// By SNI name: the identity and what to present.
    by_sni: RwLock<BTreeMap<String, (SpiffeId, Arc<CertifiedKey>)>>,
}

impl fmt::Debug for ServerSvids {
    // Manual: lists identities and serials, never keys.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let map = self.by_sni.read().unwrap_or_else(PoisonError::into_inner);
        f.debug_list()
            .entries(map.values().map(|(id, _)| id.to_string()))
            .finish()
    }
}

impl Default for ServerSvids {
    fn default() -> Self {
        Self::new()
    }
}

impl ServerSvids {
    /// No SVIDs yet.
    pub fn new() -> Self {
        Self {
            provider: provider(),
            by_sni: RwLock::new(BTreeMap::new()),
        }
    }

    /// Presents `svid` for its identity from the next handshake on, replacing the one
    /// presented so far (rotation).
    pub fn insert(&self, svid: &Svid) -> Result<(), TlsError> {
        let key = certified_key(&self.provider, svid)?;
        let sni = sni(svid.id());
        // A poisoned lock only means a writer panicked between two whole-map states.
        self.by_sni
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sni, (svid.id().clone(), key));
        Ok(())
    }

    /// Stops presenting an SVID for `id` (the last local pod of it left); whether one
    /// was presented.
    pub fn remove(&self, id: &SpiffeId) -> bool {
        self.by_sni
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&sni(id))
            .is_some()
    }
}

/// The SNI of `id`, as a ClientHello carries it.
fn sni(id: &SpiffeId) -> String {
    server_name(id).to_str().into_owned()
}

impl ResolvesServerCert for ServerSvids {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let name = client_hello.server_name()?;
        let map = self.by_sni.read().unwrap_or_else(PoisonError::into_inner);
        map.get(name).map(|(_, key)| Arc::clone(key))
    }
}

/// The SVID a client presents: one identity, its current certificate swapped on
/// rotation. Shared with the [`ClientConfig`]s that use it.
pub struct ClientSvid {
    provider: Arc<CryptoProvider>,
    id: SpiffeId,
    current: RwLock<Arc<CertifiedKey>>,
}

impl fmt::Debug for ClientSvid {
    // Manual: the identity, never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSvid")
            .field("id", &self.id.to_string())
            .finish_non_exhaustive()
    }
}

impl ClientSvid {
    /// Presents `svid` (and, after [`replace`](Self::replace), its successors).
    pub fn new(svid: &Svid) -> Result<Self, TlsError> {
        let provider = provider();
        Ok(Self {
            current: RwLock::new(certified_key(&provider, svid)?),
            provider,
            id: svid.id().clone(),
        })
    }

    /// The identity presented.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// Presents `svid` from the next handshake on. Refuses an SVID of another identity:
    /// configurations made for one identity must not silently start presenting another.
    pub fn replace(&self, svid: &Svid) -> Result<(), TlsError> {
        if svid.id() != &self.id {
            return Err(TlsError::OtherIdentity {
                ours: self.id.to_string(),
                given: svid.id().to_string(),
            });
        }
        let key = certified_key(&self.provider, svid)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        Ok(())
    }
}

impl ResolvesClientCert for ClientSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(
            &self.current.read().unwrap_or_else(PoisonError::into_inner),
        ))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// A server configuration presenting the SVIDs of `svids` (by SNI), requiring client
/// certificates that chain to one of `roots` and name a SPIFFE ID of `trust_domain`.
/// TLS 1.3 only, no session resumption, no ALPN (clone the configuration to set one).
pub fn server_config(
    svids: Arc<ServerSvids>,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
) -> Result<Arc<ServerConfig>, TlsError> {
    spiffe::check_trust_domain(trust_domain)?;
    let provider = provider();
    let roots = root_store(roots)?;
    let inner =
        WebPkiClientVerifier::builder_with_provider(roots, Arc::clone(&provider)).build()?;
    let verifier = Arc::new(ClientVerifier {
        inner,
        trust_domain: trust_domain.to_owned(),
    });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(svids);
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// A client configuration presenting `svid`, accepting servers whose certificates
/// chain to one of `roots` and name a SPIFFE ID of `trust_domain`, and `expected`
/// only when given. Connect with [`server_name`] of the destination's identity as the
/// `ServerName`, so the server picks the right SVID. TLS 1.3 only, no resumption.
pub fn client_config(
    svid: Arc<ClientSvid>,
    roots: &[CertificateDer<'static>],
    trust_domain: &str,
    expected: Option<SpiffeId>,
) -> Result<Arc<ClientConfig>, TlsError> {
    spiffe::check_trust_domain(trust_domain)?;
    let provider = provider();
    let verifier = Arc::new(ServerVerifier {
        roots: root_store(roots)?,
        algorithms: provider.signature_verification_algorithms,
        trust_domain: trust_domain.to_owned(),
        expected,
    });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(svid);
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// The SPIFFE ID of the peer of an established connection (verified during the
/// handshake by the configurations of this module); `None` before the handshake
/// completed or when the peer presented no certificate.
pub fn peer_identity(conn: &CommonState) -> Option<SpiffeId> {
    let leaf = conn.peer_certificates()?.first()?;
    identity(leaf).ok().map(|(id, _)| id)
}

fn root_store(roots: &[CertificateDer<'static>]) -> Result<Arc<RootCertStore>, TlsError> {
    if roots.is_empty() {
        return Err(TlsError::NoRoots);
    }
    let mut store = RootCertStore::empty();
    for (i, root) in roots.iter().enumerate() {
        store.add(root.clone()).map_err(|source| TlsError::Root {
            index: i + 1,
            source,
        })?;
    }
    Ok(Arc::new(store))
}

/// The SPIFFE ID of leaf certificate `leaf` (its one URI SAN), and its serial.
fn identity(leaf: &CertificateDer<'_>) -> Result<(SpiffeId, String), PeerError> {
    let facts =
        x509::facts("of the peer", leaf).map_err(|err| PeerError::Unreadable(err.to_string()))?;
    match facts.uri_sans.as_slice() {
        [uri] => match uri.parse() {
            Ok(id) => Ok((id, facts.serial)),
            Err(why) => Err(PeerError::NotSpiffe {
                serial: facts.serial.clone(),
                uri: uri.clone(),
                why,
            }),
        },
        sans => Err(PeerError::UriSans {
            serial: facts.serial.clone(),
            count: sans.len(),
        }),
    }
}

/// Checks the identity of a peer whose chain verified: one SPIFFE ID, of
/// `trust_domain`, and `expected` when given.
fn check_peer(
    leaf: &CertificateDer<'_>,
    trust_domain: &str,
    expected: Option<&SpiffeId>,
) -> Result<SpiffeId, PeerError> {
    let (id, serial) = identity(leaf)?;
    if id.trust_domain() != trust_domain {
        return Err(PeerError::TrustDomain {
            id: id.to_string(),
            serial,
            ours: trust_domain.to_owned(),
        });
    }
    if let Some(expected) = expected
        && &id != expected
    {
        return Err(PeerError::Unexpected {
            id: id.to_string(),
            serial,
            expected: expected.to_string(),
        });
    }
    Ok(id)
}

/// Verifies servers (on the client side): chain to the roots, then SPIFFE ID.
#[derive(Debug)]
struct ServerVerifier {
    roots: Arc<RootCertStore>,
    algorithms: WebPkiSupportedAlgorithms,
    trust_domain: String,
    expected: Option<SpiffeId>,
}

impl ServerCertVerifier for ServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        // Not checked: the SPIFFE ID replaces host names (see the module docs).
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let cert = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &cert,
            &self.roots,
            intermediates,
            now,
            self.algorithms.all,
        )?;
        check_peer(end_entity, &self.trust_domain, self.expected.as_ref())?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        // Unreachable with TLS 1.3 only, but the trait wants an answer: the real one.
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// Verifies clients (on the server side): webpki's client verifier for the chain
/// (client certificates mandatory), then SPIFFE ID.
#[derive(Debug)]
struct ClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    trust_domain: String,
}

impl ClientCertVerifier for ClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)?;
        check_peer(end_entity, &self.trust_domain, None)?;
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

#[cfg(test)]
mod tests;
