//! The node proxy: one per node, its own process. It serves the L7 Service ports of the
//! node's pods (HTTP/1.1, h2c, gRPC), routed by GAMMA HTTPRoutes, from listeners and
//! outbound sockets it opens inside each pod's own network namespace, so the pod's
//! NetworkPolicy and identity still apply to every connection it makes.
//!
//! Reading order: [`feed`] (configuration from the agent) → [`listeners`] (in-pod
//! sockets) → [`server`] (HTTP) → [`router`] and [`filters`] (HTTPRoute) → [`forward`]
//! (timeouts, retries) → [`balance`] and [`upstream`] (endpoint choice, pooled
//! connections, circuit breaking) → [`metrics`] and [`trace`].
#![deny(unsafe_code)]

pub mod authz;
pub mod balance;
pub mod capture;
pub mod cli;
pub mod feed;
pub mod filters;
pub mod flowreport;
pub mod forward;
pub mod gate;
pub mod hbone;
pub mod identities;
pub mod inpod;
pub mod l4;
pub mod listeners;
pub mod mesh;
pub mod metrics;
pub mod netpol;
pub mod plaintext;
pub mod retry;
pub mod router;
pub mod server;
pub mod sys;
pub mod throttle;
pub mod trace;
pub mod transport;
pub mod upstream;
