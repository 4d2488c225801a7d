//! What the L7 subcommands (`http-server`, `grpc-server`, `grpc-client`) share: a small
//! tokio runtime and a dual-stack listener.

use std::net::SocketAddr;

use anyhow::{Context, Result};
use socket2::{Domain, Socket, Type};

/// A two-worker runtime: the workload shares two cores with the mesh under test.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("start the tokio runtime")
}

/// A listening TCP socket on `addr` (an IPv6 address accepts IPv4 too), registered with
/// the current runtime. With `reuse_port`, a successor process can bind the same
/// address before this one exits (a restart without refused connections).
pub fn listen(addr: SocketAddr, reuse_port: bool) -> Result<tokio::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)
        .with_context(|| format!("socket for {addr}"))?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // As std's TcpListener::bind: a restarted server must not wait out TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(reuse_port)?;
    socket
        .bind(&addr.into())
        .with_context(|| format!("bind {addr}"))?;
    socket
        .listen(1024)
        .with_context(|| format!("listen on {addr}"))?;
    socket.set_nonblocking(true)?;
    tokio::net::TcpListener::from_std(socket.into())
        .with_context(|| format!("register listener {addr}"))
}
