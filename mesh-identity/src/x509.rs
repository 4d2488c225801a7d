//! The facts this crate reads back from DER certificates (crate-private).
//!
//! Everything reported about a certificate (serial, validity, identity) is read from the
//! DER that was issued or received, not from the parameters it was made from, so what
//! the crate reports is what a peer will check.

use std::fmt::Write as _;

use rustls_pki_types::CertificateDer;
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use x509_parser::{certificate::X509Certificate, extensions::GeneralName};

/// A certificate that could not be read, or that fails a check the caller asked for.
#[derive(Debug, thiserror::Error)]
#[error("certificate {what}: {why}")]
pub struct CertError {
    /// The certificate: a file path, or its role ("root CA").
    what: String,
    /// What is wrong with it.
    why: String,
}

/// What the crate needs to know about one certificate.
#[derive(Debug, Clone)]
pub(crate) struct CertFacts {
    /// Serial number, lower-case hex without separators (as `openssl x509 -serial`).
    pub serial: String,
    /// Subject distinguished name, RFC 4514 style (`CN=..., O=...`).
    pub subject: String,
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
    /// `basicConstraints CA:true`.
    pub is_ca: bool,
    /// `keyUsage` allows signing certificates (or the extension is absent, which RFC 5280
    /// reads as "any usage").
    pub may_sign_certs: bool,
    /// The raw subject public key (the BIT STRING's contents).
    pub public_key: Vec<u8>,
    /// Every URI subject alternative name, in order.
    pub uri_sans: Vec<String>,
}

/// Parses `der`; `what` names the certificate in errors.
fn parse<'a>(what: &str, der: &'a [u8]) -> Result<X509Certificate<'a>, CertError> {
    let (rest, cert) = x509_parser::parse_x509_certificate(der).map_err(|err| CertError {
        what: what.to_owned(),
        why: format!("not a DER X.509 certificate: {err}"),
    })?;
    if !rest.is_empty() {
        return Err(CertError {
            what: what.to_owned(),
            why: format!("{} trailing bytes after the certificate", rest.len()),
        });
    }
    Ok(cert)
}

/// The facts of certificate `der`; `what` names it in errors.
pub(crate) fn facts(what: &str, der: &CertificateDer<'_>) -> Result<CertFacts, CertError> {
    let cert = parse(what, der)?;
    let bad = |why: String| CertError {
        what: what.to_owned(),
        why,
    };
    let key_usage = cert
        .key_usage()
        .map_err(|err| bad(format!("keyUsage: {err}")))?;
    let sans = cert
        .subject_alternative_name()
        .map_err(|err| bad(format!("subjectAltName: {err}")))?;
    let uri_sans = sans
        .map(|ext| {
            ext.value
                .general_names
                .iter()
                .filter_map(|name| match name {
                    GeneralName::URI(uri) => Some((*uri).to_owned()),
                    _ => None,
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(CertFacts {
        serial: hex(cert.raw_serial()),
        subject: cert.subject().to_string(),
        not_before: cert.validity().not_before.to_datetime(),
        not_after: cert.validity().not_after.to_datetime(),
        is_ca: cert.is_ca(),
        may_sign_certs: key_usage.is_none_or(|ku| ku.value.key_cert_sign()),
        public_key: cert.public_key().subject_public_key.data.to_vec(),
        uri_sans,
    })
}

/// Whether `child`'s signature verifies with `issuer`'s public key (names are not
/// compared: a chain check at handshake time does that; this catches a CA file set
/// whose parts do not belong together).
pub(crate) fn signed_by(
    child_what: &str,
    child: &CertificateDer<'_>,
    issuer_what: &str,
    issuer: &CertificateDer<'_>,
) -> Result<bool, CertError> {
    let child = parse(child_what, child)?;
    let issuer = parse(issuer_what, issuer)?;
    Ok(child.verify_signature(Some(issuer.public_key())).is_ok())
}

/// Lower-case hex of `bytes`, no separators.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut out, b| {
        let _ = write!(out, "{b:02x}");
        out
    })
}

/// `t` as RFC 3339 (`2030-06-01T00:00:00Z`), as listings and errors show times.
pub(crate) fn rfc3339(t: OffsetDateTime) -> String {
    // Only years past 9999 cannot be formatted; certificates cannot hold those.
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}
