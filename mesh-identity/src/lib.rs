//! `mesh-identity`: the mesh's workload identities and the mTLS built on them.
//!
//! Every enrolled pod is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! ([`spiffe`]). The operator makes one root CA; each node gets an intermediate CA of
//! its own ([`ca`]), with which the node proxy issues short-lived X.509 SVIDs to its
//! local pods only, keys in memory ([`svid`]), re-issued at half life ([`rotation`]).
//! Node proxies talk TLS 1.3 with client certificates, verifying each other by SPIFFE
//! ID ([`tls`]). Crypto is ring's throughout.
#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod ca;
mod files;
pub mod rotation;
pub mod spiffe;
pub mod svid;
pub mod tls;
mod x509;

pub use ca::{CaError, NodeCa, RootCa};
pub use files::FileError;
pub use spiffe::{SpiffeError, SpiffeId};
pub use svid::{Svid, SvidInfo};
pub use x509::CertError;
