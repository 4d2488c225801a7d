//! The mesh's certificate authorities: one root per mesh (made by the operator, offline),
//! and one intermediate per node, which that node's proxy uses to issue the SVIDs of its
//! own pods. A node CA's files follow Istio's `cacerts` layout, so an operator's Istio
//! plug-in CA directory loads as a node CA too.

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType, SerialNumber,
};
use ring::rand::SecureRandom as _;
use rustls_pki_types::CertificateDer;
use time::OffsetDateTime;

use crate::{
    files::{self, CERT_MODE, FileError, KEY_MODE},
    spiffe::{self, SpiffeError},
    x509::{self, CertError, CertFacts, rfc3339},
};

/// Root certificate file (PEM; several roots during a root rotation).
pub const ROOT_CERT_FILE: &str = "root-cert.pem";
/// Root private key file (PKCS#8 PEM, mode 0600). Only in the operator's root directory.
pub const ROOT_KEY_FILE: &str = "root-key.pem";
/// Node CA certificate file (Istio `cacerts`).
pub const CA_CERT_FILE: &str = "ca-cert.pem";
/// Node CA private key file (Istio `cacerts`; PKCS#8 PEM, mode 0600).
pub const CA_KEY_FILE: &str = "ca-key.pem";
/// Node CA certificate followed by the certificates up to and including its root
/// (Istio `cacerts`).
pub const CERT_CHAIN_FILE: &str = "cert-chain.pem";

/// Lifetime of a generated root CA: 10 years.
pub const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Default lifetime of a node CA: 1 year.
pub const DEFAULT_NODE_TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far before "now" certificates start to be valid, so a peer whose clock is a
/// little behind does not refuse a certificate that was just issued.
pub(crate) const BACKDATE: time::Duration = time::Duration::seconds(60);

/// Why a CA could not be made, loaded, saved or used.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error(transparent)]
    File(#[from] FileError),
    /// A certificate could not be parsed.
    #[error(transparent)]
    Cert(#[from] CertError),
    /// The trust domain is not valid.
    #[error(transparent)]
    TrustDomain(#[from] SpiffeError),
    /// `save` would replace an existing root CA.
    #[error(
        "{} already holds a root CA ({ROOT_CERT_FILE}, {ROOT_KEY_FILE}): refusing to replace it (force to overwrite)",
        dir.display()
    )]
    RootExists {
        /// The directory.
        dir: PathBuf,
    },
    /// A certificate meant to sign others is not a CA certificate.
    #[error("certificate {what} is not a CA: {why}")]
    NotCa {
        /// The certificate (file path or role).
        what: String,
        /// Which requirement it fails.
        why: &'static str,
    },
    /// A private key could not be parsed.
    #[error(
        "private key {what}: {source} (use an unencrypted PKCS#8 \"PRIVATE KEY\" PEM, e.g. from `openssl pkcs8 -topk8 -nocrypt`)"
    )]
    Key {
        /// The key (file path or role).
        what: String,
        /// The parser's error.
        source: rcgen::Error,
    },
    /// A private key is not the key of the certificate it comes with.
    #[error("private key {key} does not belong to certificate {cert}")]
    KeyMismatch {
        /// The certificate.
        cert: String,
        /// The key.
        key: String,
    },
    /// A certificate of a node CA's chain is not signed by the next one, or the chain
    /// does not end at one of the roots.
    #[error("certificate {what} (serial {serial}) is not signed by {issuer}")]
    NotSigned {
        /// The certificate.
        what: String,
        /// Its serial number.
        serial: String,
        /// What should have signed it.
        issuer: String,
    },
    /// rcgen could not make a certificate.
    #[error("issuing {what}: {source}")]
    Issue {
        /// The certificate being issued.
        what: String,
        /// rcgen's error.
        source: rcgen::Error,
    },
    /// A validity period that cannot be represented, or that ends before it starts
    /// (its issuer expires first).
    #[error("issuing {what}: {why}")]
    Validity {
        /// The certificate being issued.
        what: String,
        /// What is wrong with the period.
        why: String,
    },
    /// A node name that cannot go into a certificate subject.
    #[error("node name {node:?}: use 1-253 printable ASCII characters")]
    NodeName {
        /// The rejected name.
        node: String,
    },
    /// The random number generator failed.
    #[error("system random number generator failed")]
    Random,
}

/// The mesh's root CA: a certificate and its private key.
pub struct RootCa {
    cert: CertificateDer<'static>,
    /// The signing side: subject, key identifier and the private key, parsed once.
    issuer: Issuer<'static, KeyPair>,
    facts: CertFacts,
}

impl fmt::Debug for RootCa {
    // Manual: the key is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootCa")
            .field("subject", &self.facts.subject)
            .field("serial", &self.facts.serial)
            .field("not_after", &self.facts.not_after)
            .finish_non_exhaustive()
    }
}

impl RootCa {
    /// A new self-signed root for `trust_domain`: ECDSA P-256, valid 10 years, CA
    /// without path length limit, URI SAN `spiffe://<trust-domain>`.
    pub fn generate(trust_domain: &str) -> Result<Self, CaError> {
        spiffe::check_trust_domain(trust_domain)?;
        let what = format!("the root CA of {trust_domain}");
        let key = new_key(&what)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&[
            (DnType::OrganizationName, trust_domain),
            (DnType::CommonName, "mesh root CA"),
        ]);
        (params.not_before, params.not_after) =
            validity(&what, OffsetDateTime::now_utc(), ROOT_TTL, None)?;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![SanType::URI(
            format!("spiffe://{trust_domain}")
                .try_into()
                .map_err(|source| issue_error(&what, source))?,
        )];
        let cert = params
            .self_signed(&key)
            .map_err(|source| issue_error(&what, source))?;
        Self::from_parts(&what, cert.der().clone(), &what, key)
    }

    /// Imports an operator's root: `cert` (one PEM certificate) and its PKCS#8 `key`.
    /// The certificate must be a CA allowed to sign certificates, and the key its own.
    pub fn import(cert: &Path, key: &Path) -> Result<Self, CaError> {
        let certs = files::certs(cert, &files::read(cert)?)?;
        let [root] = <[_; 1]>::try_from(certs).map_err(|certs| FileError::Pem {
            path: cert.to_owned(),
            why: format!("{} certificates, expected the root alone", certs.len()),
        })?;
        let key_what = key.display().to_string();
        let key = parse_key(&key_what, &files::read(key)?)?;
        Self::from_parts(&cert.display().to_string(), root, &key_what, key)
    }

    /// Loads the root saved in `dir` (`root-cert.pem`, `root-key.pem`).
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        Self::import(&dir.join(ROOT_CERT_FILE), &dir.join(ROOT_KEY_FILE))
    }

    /// Saves the root into `dir` (created with mode 0700 when missing): `root-cert.pem`
    /// and `root-key.pem` (mode 0600). Refuses to replace an existing root unless
    /// `overwrite`: losing a root key orphans every node CA it signed.
    pub fn save(&self, dir: &Path, overwrite: bool) -> Result<(), CaError> {
        let cert_path = dir.join(ROOT_CERT_FILE);
        let key_path = dir.join(ROOT_KEY_FILE);
        if !overwrite && (cert_path.exists() || key_path.exists()) {
            return Err(CaError::RootExists {
                dir: dir.to_owned(),
            });
        }
        files::create_private_dir(dir)?;
        files::write_atomic(
            &key_path,
            self.issuer.key().serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        files::write_atomic(&cert_path, self.cert_pem().as_bytes(), CERT_MODE)?;
        Ok(())
    }

    /// Issues the intermediate CA of node `node`: ECDSA P-256, CA with path length 0
    /// (it signs SVIDs only), valid `ttl` (cut at the root's own expiry).
    pub fn issue_node(&self, node: &str, ttl: Duration) -> Result<NodeCa, CaError> {
        let valid_name =
            !node.is_empty() && node.len() <= 253 && node.bytes().all(|b| b.is_ascii_graphic());
        if !valid_name {
            return Err(CaError::NodeName {
                node: node.to_owned(),
            });
        }
        let what = format!("the node CA of {node}");
        let key = new_key(&what)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&[(DnType::CommonName, &format!("mesh node CA {node}"))]);
        (params.not_before, params.not_after) = validity(
            &what,
            OffsetDateTime::now_utc(),
            ttl,
            Some(self.facts.not_after),
        )?;
        params.serial_number = Some(random_serial()?);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.use_authority_key_identifier_extension = true;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| issue_error(&what, source))?;
        let cert = cert.der().clone();
        let facts = x509::facts(&what, &cert)?;
        Ok(NodeCa {
            issuer: issuer(&what, &cert, key)?,
            chain: vec![cert],
            facts,
            issuing_root: self.cert.clone(),
            roots: vec![self.cert.clone()],
        })
    }

    /// The root certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.cert
    }

    /// The root certificate as PEM.
    pub fn cert_pem(&self) -> String {
        files::pem_block("CERTIFICATE", &self.cert)
    }

    /// SHA-256 fingerprint of the certificate, as `openssl x509 -fingerprint -sha256`
    /// prints it (upper-case hex pairs joined by ':').
    pub fn fingerprint_sha256(&self) -> String {
        fingerprint_sha256(&self.cert)
    }

    /// End of the root's validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.facts.not_after
    }

    /// The root's subject (`CN=mesh root CA, O=cluster.local`).
    pub fn subject(&self) -> &str {
        &self.facts.subject
    }

    /// A root from its certificate and key, checked: a CA that may sign certificates,
    /// with this key.
    fn from_parts(
        cert_what: &str,
        cert: CertificateDer<'static>,
        key_what: &str,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let facts = check_ca(cert_what, &cert, key_what, &key)?;
        Ok(Self {
            issuer: issuer(cert_what, &cert, key)?,
            cert,
            facts,
        })
    }
}

/// A node's intermediate CA: it issues the SVIDs of the node's own pods.
pub struct NodeCa {
    /// The node CA certificate first, then any intermediates above it (never a root).
    chain: Vec<CertificateDer<'static>>,
    /// The signing side of `chain[0]`, parsed once.
    issuer: Issuer<'static, KeyPair>,
    /// Facts of `chain[0]`.
    facts: CertFacts,
    /// The root that signed the top of `chain`.
    issuing_root: CertificateDer<'static>,
    /// Every root peers are verified against.
    roots: Vec<CertificateDer<'static>>,
}

impl fmt::Debug for NodeCa {
    // Manual: the key is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NodeCa")
            .field("subject", &self.facts.subject)
            .field("serial", &self.facts.serial)
            .field("not_after", &self.facts.not_after)
            .field("chain_len", &self.chain.len())
            .field("roots", &self.roots.len())
            .finish_non_exhaustive()
    }
}

impl NodeCa {
    /// Loads a node CA from `dir` in Istio's `cacerts` layout: `ca-cert.pem`,
    /// `ca-key.pem`, `root-cert.pem` and, when present, `cert-chain.pem` (the CA
    /// certificate, any intermediates, then the root). Checks that the key is the CA
    /// certificate's, and that each certificate of the chain is signed by the next and
    /// the last by one of the roots.
    pub fn load(dir: &Path) -> Result<Self, CaError> {
        let cert_path = dir.join(CA_CERT_FILE);
        let key_path = dir.join(CA_KEY_FILE);
        let roots_path = dir.join(ROOT_CERT_FILE);
        let chain_path = dir.join(CERT_CHAIN_FILE);
        let cert_what = cert_path.display().to_string();
        let certs = files::certs(&cert_path, &files::read(&cert_path)?)?;
        let [cert] = <[_; 1]>::try_from(certs).map_err(|certs| FileError::Pem {
            path: cert_path.clone(),
            why: format!("{} certificates, expected the node CA alone", certs.len()),
        })?;
        let key_what = key_path.display().to_string();
        let key = parse_key(&key_what, &files::read(&key_path)?)?;
        let facts = check_ca(&cert_what, &cert, &key_what, &key)?;
        let roots = files::certs(&roots_path, &files::read(&roots_path)?)?;
        // cert-chain.pem repeats the CA certificate and ends with the root; the chain
        // kept is what an SVID carries above its leaf: no root (peers have it).
        let chain = if chain_path.exists() {
            let mut chain = files::certs(&chain_path, &files::read(&chain_path)?)?;
            if chain.first() != Some(&cert) {
                return Err(FileError::Pem {
                    path: chain_path,
                    why: format!("does not start with the certificate of {CA_CERT_FILE}"),
                }
                .into());
            }
            let above = chain.split_off(1);
            chain.extend(above.into_iter().filter(|c| !roots.contains(c)));
            chain
        } else {
            vec![cert]
        };
        let chain_what = |i: usize| match i {
            0 => cert_what.clone(),
            _ => format!("#{} of {}", i + 1, chain_path.display()),
        };
        let issuing_root = check_chain(chain_what, &chain, &roots_path, &roots)?;
        Ok(Self {
            issuer: issuer(&cert_what, &chain[0], key)?,
            chain,
            facts,
            issuing_root,
            roots,
        })
    }

    /// Saves the node CA into `dir` (created with mode 0700 when missing) in Istio's
    /// `cacerts` layout: `ca-cert.pem`, `ca-key.pem` (mode 0600), `cert-chain.pem`
    /// (the chain and its root) and `root-cert.pem` (every root). Existing files are
    /// replaced: a node CA is re-issued from the root at will.
    pub fn save(&self, dir: &Path) -> Result<(), CaError> {
        files::create_private_dir(dir)?;
        files::write_atomic(
            &dir.join(CA_KEY_FILE),
            self.issuer.key().serialize_pem().as_bytes(),
            KEY_MODE,
        )?;
        files::write_atomic(
            &dir.join(CA_CERT_FILE),
            files::certs_pem(&self.chain[..1]).as_bytes(),
            CERT_MODE,
        )?;
        let mut chain = self.chain.clone();
        chain.push(self.issuing_root.clone());
        files::write_atomic(
            &dir.join(CERT_CHAIN_FILE),
            files::certs_pem(&chain).as_bytes(),
            CERT_MODE,
        )?;
        files::write_atomic(
            &dir.join(ROOT_CERT_FILE),
            files::certs_pem(&self.roots).as_bytes(),
            CERT_MODE,
        )?;
        Ok(())
    }

    /// The node CA certificate.
    pub fn cert(&self) -> &CertificateDer<'static> {
        &self.chain[0]
    }

    /// The certificates an SVID carries above its leaf: the node CA first, then any
    /// intermediates up to (not including) the root.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The roots peers' certificates are verified against.
    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// The node CA's subject.
    pub fn subject(&self) -> &str {
        &self.facts.subject
    }

    /// The node CA's serial number (hex).
    pub fn serial(&self) -> &str {
        &self.facts.serial
    }

    /// End of the node CA's validity; SVIDs it issues end no later.
    pub fn not_after(&self) -> OffsetDateTime {
        self.facts.not_after
    }

    /// The issuer of the SVIDs.
    pub(crate) fn issuer(&self) -> &Issuer<'static, KeyPair> {
        &self.issuer
    }

    /// Facts of the node CA certificate.
    pub(crate) fn facts(&self) -> &CertFacts {
        &self.facts
    }
}

/// SHA-256 fingerprint of `cert` as `openssl x509 -fingerprint -sha256` prints it.
pub fn fingerprint_sha256(cert: &CertificateDer<'_>) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, cert);
    digest
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A fresh ECDSA P-256 key, for `what`.
pub(crate) fn new_key(what: &str) -> Result<KeyPair, CaError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|source| issue_error(what, source))
}

pub(crate) fn issue_error(what: &str, source: rcgen::Error) -> CaError {
    CaError::Issue {
        what: what.to_owned(),
        source,
    }
}

/// A random positive 128-bit serial number. The first byte is kept in 0x01..=0x7f so
/// the DER INTEGER is positive and exactly 16 bytes long (no sign or padding byte),
/// so every serial prints as 32 hex digits.
pub(crate) fn random_serial() -> Result<SerialNumber, CaError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CaError::Random)?;
    bytes[0] = (bytes[0] & 0x7f).max(1);
    Ok(SerialNumber::from_slice(&bytes))
}

/// The validity of a certificate issued at `now` for `ttl`: from `now` less
/// [`BACKDATE`] to `now + ttl`, cut at `cap` (the issuer's expiry: a certificate cannot
/// outlive its issuer's, and the cut makes half-life rotation see the real lifetime).
pub(crate) fn validity(
    what: &str,
    now: OffsetDateTime,
    ttl: Duration,
    cap: Option<OffsetDateTime>,
) -> Result<(OffsetDateTime, OffsetDateTime), CaError> {
    let bad = |why: String| CaError::Validity {
        what: what.to_owned(),
        why,
    };
    let ttl_t = time::Duration::try_from(ttl).map_err(|_| bad(format!("{ttl:?} is too long")))?;
    let not_before = now
        .checked_sub(BACKDATE)
        .ok_or_else(|| bad(format!("{} is out of range", rfc3339(now))))?;
    let mut not_after = now
        .checked_add(ttl_t)
        .ok_or_else(|| bad(format!("{ttl:?} from {} is out of range", rfc3339(now))))?;
    if let Some(cap) = cap {
        not_after = not_after.min(cap);
    }
    if not_after <= now {
        return Err(bad(format!(
            "it would not be valid after {}: the issuer expires at {}",
            rfc3339(now),
            rfc3339(not_after)
        )));
    }
    Ok((not_before, not_after))
}

/// A distinguished name of `parts`, in order.
fn name(parts: &[(DnType, &str)]) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    for (ty, value) in parts {
        dn.push(ty.clone(), *value);
    }
    dn
}

/// The issuer of CA certificate `cert` (named `what`) signing with `key`.
fn issuer(
    what: &str,
    cert: &CertificateDer<'_>,
    key: KeyPair,
) -> Result<Issuer<'static, KeyPair>, CaError> {
    Issuer::from_ca_cert_der(cert, key).map_err(|source| CaError::Issue {
        what: format!("with {what}"),
        source,
    })
}

fn parse_key(what: &str, pem: &str) -> Result<KeyPair, CaError> {
    KeyPair::from_pem(pem).map_err(|source| CaError::Key {
        what: what.to_owned(),
        source,
    })
}

/// Checks that `cert` is a CA allowed to sign certificates and that `key` is its key.
fn check_ca(
    cert_what: &str,
    cert: &CertificateDer<'_>,
    key_what: &str,
    key: &KeyPair,
) -> Result<CertFacts, CaError> {
    let facts = x509::facts(cert_what, cert)?;
    let not_ca = |why| CaError::NotCa {
        what: cert_what.to_owned(),
        why,
    };
    if !facts.is_ca {
        return Err(not_ca("basicConstraints is not CA:TRUE"));
    }
    if !facts.may_sign_certs {
        return Err(not_ca("keyUsage lacks keyCertSign"));
    }
    if facts.public_key != key.public_key_raw() {
        return Err(CaError::KeyMismatch {
            cert: cert_what.to_owned(),
            key: key_what.to_owned(),
        });
    }
    Ok(facts)
}

/// Checks that each certificate of `chain` is signed by the next and the last by one of
/// `roots`; returns that root.
/// `chain_what(i)` names certificate `i` in errors.
fn check_chain(
    chain_what: impl Fn(usize) -> String,
    chain: &[CertificateDer<'static>],
    roots_path: &Path,
    roots: &[CertificateDer<'static>],
) -> Result<CertificateDer<'static>, CaError> {
    let not_signed = |what: String, cert: &CertificateDer<'_>, issuer: String| {
        Ok::<_, CaError>(CaError::NotSigned {
            serial: x509::facts(&what, cert)?.serial,
            what,
            issuer,
        })
    };
    for (i, pair) in chain.windows(2).enumerate() {
        if !x509::signed_by(&chain_what(i), &pair[0], &chain_what(i + 1), &pair[1])? {
            return Err(not_signed(chain_what(i), &pair[0], chain_what(i + 1))?);
        }
    }
    let top = chain.len() - 1;
    let roots_what = roots_path.display().to_string();
    for root in roots {
        if x509::signed_by(&chain_what(top), &chain[top], &roots_what, root)? {
            return Ok(root.clone());
        }
    }
    Err(not_signed(
        chain_what(top),
        &chain[top],
        format!("any root of {roots_what}"),
    )?)
}

#[cfg(test)]
mod tests;
