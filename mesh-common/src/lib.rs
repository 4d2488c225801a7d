//! Map layouts shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every type here is a binary interface: `#[repr(C)]`, explicit padding, no `bool`, the
//! byte order of each field stated, and a compile-time size assertion. When a layout
//! changes, the map's name gets a new version suffix (see [`maps`]).
#![no_std]

#[cfg(feature = "user")]
extern crate std;

pub mod addr;
pub mod event;
#[cfg(feature = "user")]
pub mod l7;
pub mod maps;
pub mod origdst;
pub mod policy;
pub mod redirect;
#[cfg(feature = "user")]
pub mod security;
pub mod service;
mod wire;

pub use addr::Addr;
pub use event::FlowEvent;
pub use origdst::{OrigDstKey, OrigDstValue};
pub use policy::{EndpointValue, IpcacheKey, IpcacheValue, PolicyKey, PolicyKeyData, PolicyValue};
pub use redirect::SockKey;
pub use service::{
    AffinityKey, AffinityValue, Backend, BackendSlotKey, LbMetricsKey, RevNatKey, RevNatValue,
    ServiceKey, ServiceValue,
};
