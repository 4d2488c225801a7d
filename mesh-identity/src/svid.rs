//! X.509 SVIDs: the short-lived certificates a node CA issues to its own pods'
//! identities. Their keys live in memory only: nothing here writes them anywhere.

use std::{fmt, time::Duration};

use rcgen::{
    CertificateParams, DistinguishedName, ExtendedKeyUsagePurpose, IsCa, KeyUsagePurpose, SanType,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use crate::{
    ca::{self, CaError, NodeCa},
    rotation::{self, Decision},
    spiffe::SpiffeId,
    x509::{self, rfc3339},
};

/// An X.509 SVID: a certificate chain naming one SPIFFE ID, and its private key.
pub struct Svid {
    id: SpiffeId,
    /// Leaf first, then the node CA and any intermediates (no root).
    chain: Vec<CertificateDer<'static>>,
    key: PrivatePkcs8KeyDer<'static>,
    serial: String,
    not_before: OffsetDateTime,
    not_after: OffsetDateTime,
    /// Subjects of `chain`, in order (the leaf's is empty: its name is the URI SAN).
    subjects: Vec<String>,
}

impl fmt::Debug for Svid {
    // Manual: the private key is never printed.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_before", &self.not_before)
            .field("not_after", &self.not_after)
            .field("key", &"[redacted]")
            .finish_non_exhaustive()
    }
}

/// What `certs` listings show of an SVID: everything but the key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SvidInfo {
    /// The SPIFFE ID.
    pub identity: String,
    /// Serial number (hex).
    pub serial: String,
    /// Start of validity (RFC 3339).
    pub not_before: String,
    /// End of validity (RFC 3339).
    pub not_after: String,
    /// When it is due for re-issue (RFC 3339).
    pub refresh_at: String,
    /// Subjects of the chain, leaf first (the leaf's is empty).
    pub chain_subjects: Vec<String>,
}

impl Svid {
    /// The SPIFFE ID it names.
    pub fn id(&self) -> &SpiffeId {
        &self.id
    }

    /// The chain to present: leaf first, then the node CA and any intermediates.
    pub fn chain(&self) -> &[CertificateDer<'static>] {
        &self.chain
    }

    /// The private key of the leaf.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(self.key.clone_key())
    }

    /// The leaf's serial number (32 hex digits).
    pub fn serial(&self) -> &str {
        &self.serial
    }

    /// Start of validity (backdated a little for clock skew).
    pub fn not_before(&self) -> OffsetDateTime {
        self.not_before
    }

    /// End of validity.
    pub fn not_after(&self) -> OffsetDateTime {
        self.not_after
    }

    /// When to re-issue: half-way through the validity.
    pub fn refresh_at(&self) -> OffsetDateTime {
        rotation::refresh_at(self.not_before, self.not_after)
    }

    /// Whether to re-issue at `now` (see [`rotation::decide`]).
    pub fn decide(&self, now: OffsetDateTime) -> Decision {
        rotation::decide(self.not_before, self.not_after, now)
    }

    /// A summary without the key, for listings.
    pub fn info(&self) -> SvidInfo {
        SvidInfo {
            identity: self.id.to_string(),
            serial: self.serial.clone(),
            not_before: rfc3339(self.not_before),
            not_after: rfc3339(self.not_after),
            refresh_at: rfc3339(self.refresh_at()),
            chain_subjects: self.subjects.clone(),
        }
    }
}

impl NodeCa {
    /// Issues an SVID for `id`, valid `ttl` from now (cut at the node CA's expiry).
    pub fn issue_svid(&self, id: &SpiffeId, ttl: Duration) -> Result<Svid, CaError> {
        self.issue_svid_at(id, OffsetDateTime::now_utc(), ttl)
    }

    /// Issues an SVID for `id` as if the time were `now`: valid from `now` less a
    /// minute to `now + ttl` (cut at the node CA's expiry). A fresh P-256 key, the SPIFFE
    /// ID as the only name (URI SAN, empty subject), not a CA, digitalSignature and
    /// keyEncipherment, serverAuth and clientAuth, a random 128-bit serial.
    pub fn issue_svid_at(
        &self,
        id: &SpiffeId,
        now: OffsetDateTime,
        ttl: Duration,
    ) -> Result<Svid, CaError> {
        let what = format!("an SVID for {id}");
        let key = ca::new_key(&what)?;
        let mut params = CertificateParams::default();
        // Empty subject: the SPIFFE ID is the certificate's only name (rcgen then marks
        // the SAN extension critical, as RFC 5280 requires).
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(
            id.to_string()
                .try_into()
                .map_err(|source| ca::issue_error(&what, source))?,
        )];
        (params.not_before, params.not_after) =
            ca::validity(&what, now, ttl, Some(self.not_after()))?;
        params.serial_number = Some(ca::random_serial()?);
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        let leaf = params
            .signed_by(&key, self.issuer())
            .map_err(|source| ca::issue_error(&what, source))?;
        let leaf = leaf.der().clone();
        let facts = x509::facts(&what, &leaf)?;
        let mut subjects = vec![facts.subject];
        subjects.push(self.facts().subject.clone());
        for (i, cert) in self.chain().iter().enumerate().skip(1) {
            subjects.push(x509::facts(&format!("#{} of the node CA chain", i + 1), cert)?.subject);
        }
        let mut chain = vec![leaf];
        chain.extend(self.chain().iter().cloned());
        Ok(Svid {
            id: id.clone(),
            chain,
            key: PrivatePkcs8KeyDer::from(key.serialize_der()),
            serial: facts.serial,
            not_before: facts.not_before,
            not_after: facts.not_after,
            subjects,
        })
    }
}

#[cfg(test)]
mod tests;
