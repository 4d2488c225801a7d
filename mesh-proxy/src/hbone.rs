//! HBONE, Istio ambient's tunnel: TCP streams carried as HTTP/2 CONNECT requests over
//! mutual TLS 1.3 between node proxies, on port 15008 of the destination pod.
//!
//! Both ends stay in the pods' own network namespaces (the in-pod pattern): the source
//! side dials from the client pod's namespace, so the tunnel leaves with the client's
//! address, and the destination side listens on the server pod's address, so it ends
//! there. One TLS connection per (source identity, destination pod) carries every
//! stream between them: one handshake per tunnel, not per connection.
//!
//! [`outbound`] opens streams (the client side), [`inbound`] accepts and authorizes
//! them and connects to the application (the server side).

pub mod http;
pub mod inbound;
pub mod outbound;

use std::time::Duration;

/// The HBONE port, as in Istio ambient.
pub const HBONE_PORT: u16 = mesh_common::l7::HBONE_PORT;

/// HTTP/2 flow-control windows of tunnel connections. A stream carries a whole TCP
/// connection, so the default 64 KiB window would cap bulk throughput at one window
/// per round trip; these let a stream fill a fast link.
pub const STREAM_WINDOW: u32 = 4 << 20;
/// Connection-level window: several streams at full speed at once.
pub const CONNECTION_WINDOW: u32 = 16 << 20;
/// Buffer of each direction when a stream is joined to a TCP connection: large reads
/// make large HTTP/2 frames and TLS records (the default 8 KiB halves bulk throughput).
pub const COPY_BUFFER: usize = 64 << 10;
/// Most concurrent streams a destination accepts on one tunnel connection.
pub const MAX_STREAMS: u32 = 1000;
/// Longest a TLS handshake may take before the connection is dropped (a client that
/// stalls its handshake holds nothing longer than this).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
