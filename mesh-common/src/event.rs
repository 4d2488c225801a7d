//! Flow events: what the datapath reports through the EVENTS ring buffer for each
//! policy verdict worth telling (drops, audits), the way Hubble shows flows.

use crate::Addr;

/// [`FlowEvent::verdict`]: the flow was dropped (ingress) or refused (egress, EPERM).
pub const VERDICT_DROPPED: u8 = 1;
/// [`FlowEvent::verdict`]: policy would have denied it, but audit mode let it pass.
pub const VERDICT_AUDIT: u8 = 2;
/// [`FlowEvent::verdict`]: allowed (only reported when allowed flows are traced).
pub const VERDICT_FORWARDED: u8 = 3;

/// [`FlowEvent::reason`]: no policy rule allows the flow.
pub const REASON_POLICY_DENIED: u8 = 1;

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
    /// IP protocol.
    pub proto: u8,
    /// `crate::policy::DIR_EGRESS` or `DIR_INGRESS`.
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*`.
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
    /// `crate::policy::DIR_*`.
    pub direction: u8,
    /// `VERDICT_*`.
    pub verdict: u8,
    /// `REASON_*` (0 for forwarded).
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
