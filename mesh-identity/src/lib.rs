//! `mesh-identity`: the mesh's workload identities and the mTLS built on them.
//!
//! Every enrolled pod is `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`
//! ([`spiffe`]); SVIDs are re-issued at half life ([`rotation`]).
#![deny(unsafe_code)]

pub mod rotation;
pub mod spiffe;

pub use spiffe::{SpiffeError, SpiffeId};
