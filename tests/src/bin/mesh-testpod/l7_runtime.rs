//! What the L7 subcommands (`http-server`, `grpc-server`, `grpc-client`) share: a small
//! tokio runtime and a dual-stack listener.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use socket2::Type;

/// A two-worker runtime: the workload shares two cores with the mesh under test.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

/// A listening TCP socket on `addr` (an IPv6 address accepts IPv4 too), registered with
/// the current runtime.
pub fn listen(addr: SocketAddr) -> Result<tokio::net::TcpListener> {
    let socket = crate::bind(addr, Type::STREAM).with_context(|| format!("bind {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("listen on {addr}"))?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
        .with_context(|| format!("register listener {addr}"))
}
