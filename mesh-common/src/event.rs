//! Flow events: what the datapath reports through the EVENTS ring buffer for each
//! policy verdict worth telling (drops, audits), the way Hubble shows flows.

use crate::{Addr, wire::wire_enum};

wire_enum! {
    /// [`FlowEvent::verdict`]: what policy decided about a flow.
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
    #[cfg_attr(feature = "user", serde(rename_all = "SCREAMING_SNAKE_CASE"))]
    pub enum Verdict {
        /// Dropped (ingress) or refused (egress: connect()/sendmsg() fail with EPERM).
        Dropped = 1 => "dropped",
        /// Policy would have denied it, but audit mode let it pass.
        Audit = 2 => "audit",
        /// Allowed (only reported when allowed flows are traced).
        Forwarded = 3 => "forwarded",
    }
}

/// [`FlowEvent::verdict`]: [`Verdict::Dropped`].
pub const VERDICT_DROPPED: u8 = Verdict::Dropped as u8;
/// [`FlowEvent::verdict`]: [`Verdict::Audit`].
pub const VERDICT_AUDIT: u8 = Verdict::Audit as u8;
/// [`FlowEvent::verdict`]: [`Verdict::Forwarded`].
pub const VERDICT_FORWARDED: u8 = Verdict::Forwarded as u8;

wire_enum! {
    /// [`FlowEvent::reason`]: why policy decided so.
    #[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
    #[cfg_attr(feature = "user", serde(rename_all = "kebab-case"))]
    pub enum Reason {
        /// No policy rule allows the flow.
        PolicyDenied = 1 => "policy-denied",
        /// An Istio AuthorizationPolicy refused it (the node proxy, on a tunnelled
        /// stream or request).
        AuthorizationDenied = 2 => "authorization-denied",
    }
}

/// [`FlowEvent::reason`]: [`Reason::PolicyDenied`].
pub const REASON_POLICY_DENIED: u8 = Reason::PolicyDenied as u8;

/// One flow verdict.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FlowEvent {
    /// `bpf_ktime_get_ns` when it happened.
    pub timestamp_ns: u64,
    /// Source address (IPv4 mapped), network byte order.
    pub src: Addr,
    /// Destination address (IPv4 mapped), network byte order.
    pub dst: Addr,
    /// Identity of the source, host byte order ([`crate::policy::IDENTITY_WORLD`] when
    /// unknown).
    pub src_identity: u32,
    /// Identity of the destination, host byte order.
    pub dst_identity: u32,
    /// Source port, network byte order (0 when not yet bound, e.g. at connect()).
    pub src_port: u16,
    /// Destination port, network byte order.
    pub dst_port: u16,
    /// [`crate::service::Protocol`] code.
    pub proto: u8,
    /// [`crate::policy::Direction`] code.
    pub direction: u8,
    /// [`Verdict`] code.
    pub verdict: u8,
    /// [`Reason`] code.
    pub reason: u8,
    /// Explicit padding, always 0.
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<FlowEvent>() == 64);

/// Index of [`CONFIG`](crate::maps::CONFIG) entries (u32 values).
pub mod config {
    /// 1: policy audit mode (report denials as audit, let the traffic pass).
    pub const POLICY_AUDIT: u32 = 0;
    /// Number of entries.
    pub const LEN: u32 = 1;
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: plain-old-data, repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::FlowEvent {}
}

/// Key of POLICY_METRICS (per-CPU u64 counts).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VerdictKey {
    /// [`crate::policy::Direction`] code.
    pub direction: u8,
    /// [`Verdict`] code.
    pub verdict: u8,
    /// [`Reason`] code (0 for forwarded).
    pub reason: u8,
    /// Explicit padding, always 0.
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<VerdictKey>() == 4);

#[cfg(feature = "user")]
mod pod_key {
    // SAFETY: plain-old-data, repr(C), explicit padding, every bit pattern valid.
    unsafe impl aya::Pod for super::VerdictKey {}
}
