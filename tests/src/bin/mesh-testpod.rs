//! `mesh-testpod`: the workload the test bed runs inside pods.
//!
//! - `serve`: a TCP server that announces its name (`NAME\n`) on every connection and
//!   then echoes; optionally also answers UDP datagrams with `NAME\n<payload>`. By
//!   default it listens on `[::]` with IPv4 accepted too, i.e. on both families.
//! - `connect`: N sequential connections; reports which backend answered each, the
//!   peer address the socket reports, and errors by errno name, as JSON
//!   ([`ConnectSummary`]).
//! - `udp-query`: N request/reply exchanges on ONE unconnected UDP socket
//!   (`sendto` + `recvfrom`), as a DNS stub resolver does ([`ConnectSummary`]).
//! - `udp-hold`: one datagram exchange per round on a connected UDP socket, one JSON
//!   line per round ([`UdpRound`]); a failed socket is replaced by a new one.
//! - `hold`: one long-lived TCP connection echoing a line per interval
//!   ([`HoldStarted`], then [`HoldReport`]).
//! - `bench`: N sequential connect/echo/close iterations; reports latency
//!   percentiles as JSON ([`BenchSummary`]).
//!
//! - `sink`: a TCP server that reads each connection to EOF while checksumming
//!   ([`Fnv64`]), optionally slowly (`--read-delay-ms`, `--read-chunk`), then replies
//!   `<bytes> <checksum>\n`; or echoes everything (`--echo`); or resets the
//!   connection after `--reset-after` bytes. One JSON line per connection
//!   ([`SinkConn`]).
//! - `stream`: one connection sending N bytes of a seeded [`Pattern`] by write,
//!   small writes, writev or sendfile, then half-closing and reading the sink's reply
//!   ([`StreamSummary`]); `--reset` aborts it with an RST halfway, `--bidir` reads the
//!   echo of a `sink --echo` concurrently.
//! - `churn`: N sequential short connections to a `sink --echo` (16 bytes and their
//!   echo each), as [`ConnectSummary`].
//! - `origdst-echo`: stands in for the node proxy's outbound listener: on 127.0.0.1 and
//!   [::1] (default port 15001) it announces each connection's original destination
//!   (`getsockopt(SO_ORIGINAL_DST)`) as `VIP:PORT\n` (`none\n` when the option fails)
//!   in place of `serve`'s name, then echoes until EOF, so `connect` reads it back.
//!
//! - `http-server`: HTTP/1.1 and h2c on one port, answering JSON about each request
//!   ([`mesh_tests::l7::HttpEcho`]) with behaviours by path (`/status/{code}`,
//!   `/delay/{ms}`, `/stream/{n}`, `/echo`, `/trailers`, `/reset`, `/stats`,
//!   `/upgrade`), a flaky mode (`--fail-every`, `--fail-first`) and a slow one
//!   (`--slow-first`).
//! - `grpc-server`, `grpc-client`: grpc.health.v1 Check and Watch, one JSON line per
//!   result ([`mesh_tests::l7::GrpcResult`]).
//! - `h2-rapid-reset`: HTTP/2 streams opened and reset at once on one h2c connection
//!   (CVE-2023-44487), reporting what the server did (JSON).
//!
//! Every network wait is bounded by a timeout, and client runs by a total time budget.
#![deny(unsafe_code)]

// The crate root is this file, so its modules live in `mesh-testpod/` only by `path`.
#[path = "mesh-testpod/grpc.rs"]
mod grpc;
#[path = "mesh-testpod/http_server.rs"]
mod http_server;
#[path = "mesh-testpod/l7_runtime.rs"]
mod l7_runtime;
#[path = "mesh-testpod/rapid_reset.rs"]
mod rapid_reset;

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, IoSlice, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, SocketAddrV6, TcpListener, TcpStream,
    UdpSocket,
};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mesh_tests::testpod::{
    BenchSummary, ConnectSummary, DEFAULT_TIMEOUT_MS, Fnv64, HoldReport, HoldStarted, Pattern,
    READY_LINE, SinkConn, StreamMode, StreamSummary, UdpRound, error_key,
};
use serde::Serialize;
use socket2::{Domain, SockRef, Socket, Type};

/// A server that idles longer than this on one connection gives up on it, so a stuck
/// client cannot pin a thread forever.
const SERVER_IDLE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Parser)]
#[command(about = "Test workload for mesh pods: echo server and measuring clients")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Accept TCP connections: send `NAME\n`, then echo until EOF.
    Serve(ServeArgs),
    /// Make N sequential connections and report who answered.
    Connect(ConnectArgs),
    /// Send N queries from one unconnected UDP socket and report who answered, and from
    /// which source address.
    UdpQuery(UdpQueryArgs),
    /// Exchange one datagram per round on a connected UDP socket, reconnecting after a
    /// failure; prints one JSON line per round.
    UdpHold(UdpHoldArgs),
    /// Hold one TCP connection and echo a line on it every interval.
    Hold(HoldArgs),
    /// Measure connect + echo + close latency over N sequential iterations.
    Bench(BenchArgs),
    /// Accept TCP connections and read each to EOF, checksumming; reply
    /// `<bytes> <checksum>` (or echo with --echo).
    Sink(SinkArgs),
    /// Send N bytes on one connection to a sink and report both checksums.
    Stream(StreamArgs),
    /// N sequential short connections to a `sink --echo`.
    Churn(ChurnArgs),
    /// Serve HTTP/1.1 and h2c, answering JSON about each request.
    HttpServer(http_server::HttpServerArgs),
    /// Serve the gRPC health service (grpc.health.v1).
    GrpcServer(grpc::GrpcServerArgs),
    /// Call the gRPC health service; one JSON line per result.
    GrpcClient(grpc::GrpcClientArgs),
    /// Open and at once reset N HTTP/2 streams on one h2c connection (rapid reset).
    H2RapidReset(rapid_reset::RapidResetArgs),
    /// Accept TCP connections on the netns loopback: send their original destination
    /// (`VIP:PORT\n`, or `none\n`), then echo until EOF.
    OrigdstEcho(OrigdstEchoArgs),
}

#[derive(Args)]
struct OrigdstEchoArgs {
    /// Port to listen on, on 127.0.0.1 and [::1].
    #[arg(long, default_value_t = 15001)]
    port: u16,
}

#[derive(Args)]
struct SinkArgs {
    /// Port to listen on.
    #[arg(long)]
    port: u16,
    /// Address to bind; `::` (the default) accepts IPv4 too.
    #[arg(long, default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Echo everything back as it is read, instead of the reply line.
    #[arg(long)]
    echo: bool,
    /// Slow reader: sleep this long after each read.
    #[arg(long, default_value_t = 0)]
    read_delay_ms: u64,
    /// Bytes per read.
    #[arg(long, default_value_t = 64 * 1024)]
    read_chunk: usize,
    /// Reset the connection (SO_LINGER 0, close) once this many bytes were read.
    #[arg(long)]
    reset_after: Option<u64>,
    /// Timeout of each read and write, in milliseconds.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
    /// Count bytes but skip the checksum (reported as 0), for throughput benchmarks.
    #[arg(long)]
    unchecked: bool,
}

#[derive(Args)]
struct StreamArgs {
    /// Address and port of a `sink`.
    #[arg(long)]
    addr: SocketAddr,
    /// Bytes to send.
    #[arg(long)]
    bytes: u64,
    /// How to send them.
    #[arg(long, value_enum, default_value_t = StreamMode::Write)]
    mode: StreamMode,
    /// Bytes per send call (write: 1 MiB; small: 1..=64 varying; writev: per iovec,
    /// varying; sendfile: 1 MiB).
    #[arg(long)]
    chunk: Option<usize>,
    /// After half the bytes, close with SO_LINGER 0 (an RST) instead of finishing.
    #[arg(long)]
    reset: bool,
    /// Read the echo of a `sink --echo` concurrently and checksum it.
    #[arg(long)]
    bidir: bool,
    /// Seed of the byte pattern.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timeout of connect and of each send and read, in milliseconds; 0: no socket
    /// timeouts (plain blocking calls; connect bounded by 5 s, the run by --max-secs
    /// only between calls).
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
    /// Give up (reporting a timeout) after this many seconds in total.
    #[arg(long, default_value_t = 45)]
    max_secs: u64,
    /// Count bytes but skip the checksum (reported as 0), for throughput benchmarks
    /// against a `sink --unchecked`.
    #[arg(long)]
    unchecked: bool,
}

#[derive(Args)]
struct ChurnArgs {
    /// Address and port of a `sink --echo`.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of sequential connections.
    #[arg(long)]
    count: u32,
    /// Timeout of each step (connect, read, write) in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Stop early (reporting fewer attempts) after this many seconds.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Print the summary as JSON (always on; accepted for symmetry with `connect`).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServeArgs {
    /// Port to listen on (TCP, and UDP with --udp).
    #[arg(long)]
    port: u16,
    /// Name announced to clients (the backend name tests count by).
    #[arg(long)]
    name: String,
    /// Also answer UDP datagrams on the same port with `NAME\n<payload>`.
    #[arg(long)]
    udp: bool,
    /// Address to bind; `::` (the default) accepts IPv4 too.
    #[arg(long, default_value_t = IpAddr::V6(Ipv6Addr::UNSPECIFIED))]
    bind: IpAddr,
    /// Run only on this CPU (every thread).
    #[arg(long)]
    cpu: Option<usize>,
    /// Wait this many microseconds before echoing what each read brought (a service
    /// that takes time to answer).
    #[arg(long, default_value_t = 0)]
    delay_us: u64,
}

#[derive(Args)]
struct ConnectArgs {
    /// Destination (a pod IP or a service VIP) and port.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of sequential connections.
    #[arg(long)]
    count: u32,
    /// Timeout of each step (connect, read, write) in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Stop early (reporting fewer attempts) after this many seconds.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Use UDP: one connected socket and one datagram exchange per attempt.
    #[arg(long)]
    udp: bool,
    /// Dial an IPv4 `--addr` from an IPv6 socket, as `[::ffff:a.b.c.d]:port`.
    #[arg(long)]
    ipv6_socket: bool,
    /// Print the summary as JSON (what the test library parses) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct UdpQueryArgs {
    /// Destination (a pod IP or a service VIP) and port.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of sequential queries.
    #[arg(long)]
    count: u32,
    /// How long to wait for each reply, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Stop early (reporting fewer attempts) after this many seconds.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Print the summary as JSON (what the test library parses) instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct UdpHoldArgs {
    /// Destination (normally a service VIP) and port.
    #[arg(long)]
    addr: SocketAddr,
    /// Number of rounds; the program exits after the last one.
    #[arg(long)]
    rounds: u32,
    /// Pause between rounds in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// How long to wait for each reply, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
}

#[derive(Args)]
struct HoldArgs {
    /// Destination (normally a service VIP) and port of a `serve` instance.
    #[arg(long)]
    addr: SocketAddr,
    /// How long to hold the connection, in seconds.
    #[arg(long)]
    secs: u64,
    /// Pause between echoes in milliseconds.
    #[arg(long, default_value_t = 100)]
    interval_ms: u64,
    /// Timeout of connect and of each echo, in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
}

#[derive(Args)]
struct BenchArgs {
    /// Destination and port of a `serve` instance (directly or through a VIP).
    #[arg(long)]
    addr: SocketAddr,
    /// Measured iterations.
    #[arg(long)]
    count: u32,
    /// Unmeasured iterations first (fill caches, warm up the datapath).
    #[arg(long, default_value_t = 10)]
    warmup: u32,
    /// Bytes sent and echoed per iteration.
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Timeout of each step in milliseconds.
    #[arg(long, default_value_t = DEFAULT_TIMEOUT_MS)]
    timeout_ms: u64,
    /// Stop early after this many seconds in total.
    #[arg(long, default_value_t = 60)]
    max_secs: u64,
    /// Request/response on ONE connection instead of a new connection per iteration:
    /// measures the established path, not connection setup.
    #[arg(long)]
    persistent: bool,
    /// Run only on this CPU.
    #[arg(long)]
    cpu: Option<usize>,
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Serve(args) => serve(&args),
        Cmd::Connect(args) => connect(&args),
        Cmd::UdpQuery(args) => udp_query(&args),
        Cmd::UdpHold(args) => udp_hold(&args),
        Cmd::Hold(args) => hold(&args),
        Cmd::Bench(args) => bench(&args),
        Cmd::Sink(args) => sink(&args),
        Cmd::Stream(args) => stream(&args),
        Cmd::Churn(args) => churn(&args),
        Cmd::HttpServer(args) => http_server::run(&args),
        Cmd::GrpcServer(args) => grpc::serve(&args),
        Cmd::GrpcClient(args) => grpc::client(&args),
        Cmd::H2RapidReset(args) => rapid_reset::run(&args),
        Cmd::OrigdstEcho(args) => origdst_echo(&args),
    }
}

fn origdst_echo(args: &OrigdstEchoArgs) -> Result<()> {
    let listeners = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .map(|ip| {
        let addr = SocketAddr::new(ip, args.port);
        bind(addr, Type::STREAM)
            .and_then(|s| s.listen(1024).map(|()| TcpListener::from(s)))
            .with_context(|| format!("bind tcp {addr}"))
    });
    let [v4, v6] = listeners;
    let (v4, v6) = (v4?, v6?);
    let v6 = std::thread::spawn(move || accept_origdst(&v6));
    println!("{READY_LINE}");
    io::stdout().flush()?;
    accept_origdst(&v4);
    let _ = v6.join();
    Ok(())
}

fn accept_origdst(listener: &TcpListener) {
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                std::thread::spawn(move || {
                    let line = match original_dst(&stream) {
                        Ok(addr) => addr.to_string(),
                        Err(_) => "none".to_owned(),
                    };
                    if let Err(e) = serve_tcp(&stream, &line, Duration::ZERO) {
                        eprintln!("mesh-testpod origdst-echo: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("mesh-testpod origdst-echo: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// `SO_ORIGINAL_DST` (IPv4 socket) or `IP6T_SO_ORIGINAL_DST` (IPv6 socket).
fn original_dst(stream: &TcpStream) -> io::Result<SocketAddr> {
    let socket = SockRef::from(stream);
    let addr = if stream.local_addr()?.is_ipv4() {
        socket.original_dst_v4()?
    } else {
        socket.original_dst_v6()?
    };
    addr.as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP address"))
}

/// Restricts this thread, and the threads it starts later, to `cpu`.
#[allow(unsafe_code)]
fn pin_to_cpu(cpu: Option<usize>) -> Result<()> {
    let Some(cpu) = cpu else {
        return Ok(());
    };
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it (bounds checked by the
    // macro); sched_setaffinity reads it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc != 0 {
        return Err(io::Error::last_os_error()).with_context(|| format!("pin to CPU {cpu}"));
    }
    Ok(())
}

fn serve(args: &ServeArgs) -> Result<()> {
    pin_to_cpu(args.cpu)?;
    let addr = SocketAddr::new(args.bind, args.port);
    let listener: TcpListener = bind(addr, Type::STREAM)
        .and_then(|s| s.listen(1024).map(|()| s))
        .with_context(|| format!("bind tcp {addr}"))?
        .into();
    if args.udp {
        let socket: UdpSocket = bind(addr, Type::DGRAM)
            .with_context(|| format!("bind udp {addr}"))?
            .into();
        let name = args.name.clone();
        std::thread::spawn(move || serve_udp(&socket, &name));
    }
    // Tests wait for this line instead of sleeping or polling the port.
    println!("{READY_LINE}");
    io::stdout().flush()?;
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let name = args.name.clone();
                let delay = Duration::from_micros(args.delay_us);
                std::thread::spawn(move || {
                    if let Err(e) = serve_tcp(&stream, &name, delay) {
                        eprintln!("mesh-testpod serve: connection: {e}");
                    }
                });
            }
            // E.g. EMFILE or a connection reset before accept: keep serving, but don't spin.
            Err(e) => {
                eprintln!("mesh-testpod serve: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

/// A socket bound to `addr`; on an IPv6 address it accepts IPv4 too (IPV6_V6ONLY off,
/// set explicitly rather than left to the `net.ipv6.bindv6only` sysctl).
fn bind(addr: SocketAddr, kind: Type) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), kind, None)?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // As std's TcpListener::bind: a restarted server must not wait out TIME_WAIT.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    Ok(socket)
}

fn serve_tcp(stream: &TcpStream, name: &str, delay: Duration) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    let mut writer = stream;
    writer.write_all(format!("{name}\n").as_bytes())?;
    if delay.is_zero() {
        io::copy(&mut &*stream, &mut writer)?;
    } else {
        let mut buf = vec![0; 64 << 10];
        loop {
            let n = (&*stream).read(&mut buf)?;
            if n == 0 {
                break;
            }
            std::thread::sleep(delay);
            writer.write_all(&buf[..n])?;
        }
    }
    stream.shutdown(Shutdown::Both)
}

fn serve_udp(socket: &UdpSocket, name: &str) {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((n, peer)) => {
                let mut reply = format!("{name}\n").into_bytes();
                reply.extend_from_slice(&buf[..n]);
                if let Err(e) = socket.send_to(&reply, peer) {
                    eprintln!("mesh-testpod serve: udp reply to {peer}: {e}");
                }
            }
            Err(e) => {
                eprintln!("mesh-testpod serve: udp: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
}

/// A failed exchange: the step that failed and why.
type StepError = (&'static str, io::Error);

fn connect(args: &ConnectArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let budget = Duration::from_secs(args.max_secs);
    let start = Instant::now();
    let addr = if args.ipv6_socket {
        ipv4_mapped(args.addr)
    } else {
        args.addr
    };
    let mut summary = ConnectSummary::default();
    for i in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        let result = if args.udp {
            udp_exchange(addr, timeout, i)
        } else {
            tcp_exchange(addr, timeout, i)
        };
        match result {
            Ok((backend, peer)) => {
                summary.record_ok(&backend);
                summary.record_peer(peer);
            }
            Err((step, err)) => summary.record_error(step, &err),
        }
    }
    print_summary(&summary, args.json)
}

/// `addr` with an IPv4 address in its IPv4-mapped IPv6 form; an IPv6 `addr` unchanged.
/// Dialing the result makes std create an `AF_INET6` socket.
fn ipv4_mapped(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V4(v4) => SocketAddrV6::new(v4.ip().to_ipv6_mapped(), v4.port(), 0, 0).into(),
        v6 @ SocketAddr::V6(_) => v6,
    }
}

fn print_summary(summary: &ConnectSummary, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string(summary)?);
    } else {
        println!(
            "attempts={} ok={} by_backend={:?} peers={:?} errors={:?} first_error={}",
            summary.attempts,
            summary.ok,
            summary.by_backend,
            summary.peers,
            summary.errors,
            summary.first_error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// Prints one JSON line and flushes it, so a test reading the pipe sees it at once.
fn emit(line: &impl Serialize) -> Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer(&mut out, line)?;
    out.write_all(b"\n")?;
    out.flush()?;
    Ok(())
}

/// One TCP exchange: connect, read the backend's name line, send a request, read its
/// echo, half-close and wait for the server's close. Returns the backend name and the
/// socket's peer address (getpeername).
fn tcp_exchange(
    addr: SocketAddr,
    timeout: Duration,
    attempt: u32,
) -> Result<(String, SocketAddr), StepError> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
    let peer = stream.peer_addr().map_err(|e| ("getpeername", e))?;
    let setup = || -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    };
    setup().map_err(|e| ("setsockopt", e))?;
    let mut reader = BufReader::new(&stream);
    let backend = read_name_line(&mut reader).map_err(|e| ("read name", e))?;
    let request = format!("ping {attempt}\n");
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| ("write", e))?;
    let mut echo = vec![0u8; request.len()];
    reader.read_exact(&mut echo).map_err(|e| ("read echo", e))?;
    if echo != request.as_bytes() {
        return Err(("read echo", bad_echo(&request, &echo)));
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| ("shutdown", e))?;
    // The server closes after our EOF; anything else it sends is a protocol error.
    let mut rest = [0u8; 1];
    match reader.read(&mut rest).map_err(|e| ("read eof", e))? {
        0 => Ok((backend, peer)),
        _ => Err((
            "read eof",
            io::Error::new(io::ErrorKind::InvalidData, "data after the echo"),
        )),
    }
}

/// One UDP exchange on a fresh connected socket. Returns the backend name and the
/// socket's peer address (getpeername).
fn udp_exchange(
    addr: SocketAddr,
    timeout: Duration,
    attempt: u32,
) -> Result<(String, SocketAddr), StepError> {
    let socket = udp_connect(addr, timeout)?;
    let peer = socket.peer_addr().map_err(|e| ("getpeername", e))?;
    let backend = udp_round_trip(&socket, &format!("ping {attempt}"))?;
    Ok((backend, peer))
}

/// A UDP socket of `addr`'s family, connected to `addr`, with a receive timeout.
fn udp_connect(addr: SocketAddr, timeout: Duration) -> Result<UdpSocket, StepError> {
    let socket = udp_socket(addr, timeout)?;
    socket.connect(addr).map_err(|e| ("connect", e))?;
    Ok(socket)
}

/// An unconnected UDP socket of `addr`'s family, bound to an ephemeral port, with a
/// receive timeout.
fn udp_socket(addr: SocketAddr, timeout: Duration) -> Result<UdpSocket, StepError> {
    let local: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((local, 0)).map_err(|e| ("bind", e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| ("setsockopt", e))?;
    Ok(socket)
}

/// Sends `request` on a connected UDP socket and returns the name of the backend
/// whose reply echoes it.
fn udp_round_trip(socket: &UdpSocket, request: &str) -> Result<String, StepError> {
    socket.send(request.as_bytes()).map_err(|e| ("send", e))?;
    let mut buf = vec![0u8; 65536];
    // ECONNREFUSED here means an ICMP port unreachable came back.
    let n = socket.recv(&mut buf).map_err(|e| ("recv", e))?;
    parse_reply(&buf[..n], request).ok_or_else(|| ("recv", bad_echo(request, &buf[..n])))
}

/// The backend name of a `NAME\n<request>` reply; `None` if it does not echo `request`.
fn parse_reply(reply: &[u8], request: &str) -> Option<String> {
    let at = reply.iter().position(|&b| b == b'\n')?;
    (&reply[at + 1..] == request.as_bytes())
        .then(|| String::from_utf8_lossy(&reply[..at]).into_owned())
}

fn udp_query(args: &UdpQueryArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let budget = Duration::from_secs(args.max_secs);
    let start = Instant::now();
    let mut summary = ConnectSummary::default();
    let socket = match udp_socket(args.addr, timeout) {
        Ok(socket) => socket,
        Err((step, err)) => anyhow::bail!("{step}: {err}"),
    };
    for i in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        match query(&socket, args.addr, timeout, &format!("query {i}")) {
            Ok((backend, source)) => {
                summary.record_ok(&backend);
                summary.record_peer(source);
            }
            Err((step, err)) => summary.record_error(step, &err),
        }
    }
    print_summary(&summary, args.json)
}

/// One `sendto(addr)` and the `recvfrom()` of its reply on an unconnected socket.
/// Returns the backend name and the reply's source address. Late replies to earlier
/// queries (that timed out) are skipped rather than taken for this one's.
fn query(
    socket: &UdpSocket,
    addr: SocketAddr,
    timeout: Duration,
    request: &str,
) -> Result<(String, SocketAddr), StepError> {
    socket
        .send_to(request.as_bytes(), addr)
        .map_err(|e| ("sendto", e))?;
    let deadline = Instant::now() + timeout;
    let mut buf = vec![0u8; 65536];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(("recvfrom", io::ErrorKind::TimedOut.into()));
        }
        socket
            .set_read_timeout(Some(left))
            .map_err(|e| ("setsockopt", e))?;
        let (n, source) = socket.recv_from(&mut buf).map_err(|e| ("recvfrom", e))?;
        if let Some(backend) = parse_reply(&buf[..n], request) {
            return Ok((backend, source));
        }
        if !buf[..n]
            .windows(b"\nquery ".len())
            .any(|w| w == b"\nquery ")
        {
            return Err(("recvfrom", bad_echo(request, &buf[..n])));
        }
    }
}

fn udp_hold(args: &UdpHoldArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let interval = Duration::from_millis(args.interval_ms);
    // Like a resolver: a socket that failed once is dropped and a new one connected,
    // which re-runs the VIP translation and so picks a live backend.
    let mut socket: Option<UdpSocket> = None;
    for round in 0..args.rounds {
        if round > 0 {
            std::thread::sleep(interval);
        }
        let result = match socket.take() {
            Some(s) => Ok(s),
            None => udp_connect(args.addr, timeout),
        }
        .and_then(|s| match udp_round_trip(&s, &format!("round {round}")) {
            Ok(backend) => Ok((s, backend)),
            Err((step, err)) => match pending_error(&s) {
                Some(cause) => {
                    eprintln!("mesh-testpod udp-hold: round {round}: {step}: {err}");
                    Err(("pending socket error", cause))
                }
                None => Err((step, err)),
            },
        });
        let line = match result {
            Ok((s, backend)) => {
                socket = Some(s);
                UdpRound {
                    round,
                    ok: true,
                    backend: Some(backend),
                    error: None,
                }
            }
            Err((step, err)) => {
                eprintln!("mesh-testpod udp-hold: round {round}: {step}: {err}");
                UdpRound {
                    round,
                    ok: false,
                    backend: None,
                    error: Some(error_key(&err)),
                }
            }
        };
        emit(&line)?;
    }
    Ok(())
}

/// The error the kernel recorded on `socket` (SO_ERROR), if any: the cause of a failed
/// call. An aborted socket (sock_diag SOCK_DESTROY) has ECONNABORTED here and is also
/// disconnected, so a send() that comes first fails with the less telling EDESTADDRREQ
/// while recv() or poll() would report ECONNABORTED.
fn pending_error(socket: &UdpSocket) -> Option<io::Error> {
    socket.take_error().ok().flatten()
}

fn hold(args: &HoldArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let interval = Duration::from_millis(args.interval_ms);
    let deadline = Instant::now() + Duration::from_secs(args.secs);
    let mut report = HoldReport::default();
    if let Err((step, err)) = hold_connection(args.addr, timeout, interval, deadline, &mut report) {
        report.errors += 1;
        report.first_error = Some(format!("{step}: {err}"));
    }
    emit(&report)
}

/// Connects, announces the backend, then echoes one line per `interval` until
/// `deadline`, counting successes in `report`. Returns at the first failure: after a
/// timeout a late echo could be misread as the next one, so the connection is done.
fn hold_connection(
    addr: SocketAddr,
    timeout: Duration,
    interval: Duration,
    deadline: Instant,
    report: &mut HoldReport,
) -> Result<(), StepError> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
    let setup = || -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    };
    setup().map_err(|e| ("setsockopt", e))?;
    let mut reader = BufReader::new(&stream);
    let backend = read_name_line(&mut reader).map_err(|e| ("read name", e))?;
    emit(&HoldStarted { backend }).map_err(|e| ("print", io::Error::other(e)))?;
    for i in 0u64.. {
        let now = Instant::now();
        if now >= deadline {
            break;
        }
        std::thread::sleep(interval.min(deadline - now));
        let request = format!("hold {i}\n");
        (&stream)
            .write_all(request.as_bytes())
            .map_err(|e| ("write", e))?;
        let mut echo = vec![0u8; request.len()];
        reader.read_exact(&mut echo).map_err(|e| ("read echo", e))?;
        if echo != request.as_bytes() {
            return Err(("read echo", bad_echo(&request, &echo)));
        }
        report.echoes_ok += 1;
    }
    Ok(())
}

fn read_name_line(reader: &mut impl BufRead) -> io::Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    match line.strip_suffix('\n') {
        Some(name) => Ok(name.to_owned()),
        None => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection closed before the name line",
        )),
    }
}

fn bad_echo(sent: &str, got: &[u8]) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("sent {sent:?}, got back {:?}", String::from_utf8_lossy(got)),
    )
}

fn bench(args: &BenchArgs) -> Result<()> {
    pin_to_cpu(args.cpu)?;
    if args.persistent {
        return bench_persistent(args);
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let payload = vec![b'x'; args.payload];
    measure(args, Instant::now(), false, || {
        bench_iteration(args.addr, timeout, &payload)
    })
}

/// One connection; each iteration writes the payload and reads its echo.
fn bench_persistent(args: &BenchArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let payload = vec![b'x'; args.payload];
    let start = Instant::now();
    let stream = TcpStream::connect_timeout(&args.addr, timeout).context("connect")?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(&stream);
    read_name_line(&mut reader).context("read the server's name")?;
    let mut echo = vec![0u8; payload.len()];
    measure(args, start, true, || {
        (&stream).write_all(&payload)?;
        reader.read_exact(&mut echo)?;
        if echo != payload {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "echo differs from payload",
            ));
        }
        Ok(())
    })
}

/// Runs `--warmup` unmeasured and `--count` measured iterations of `op` within the
/// `--max-secs` budget counted from `start`, and prints the summary. On one connection
/// (`persistent`) a failure ends the run, since later iterations could only fail; with
/// a connection per iteration, failures are counted and the run goes on.
fn measure(
    args: &BenchArgs,
    start: Instant,
    persistent: bool,
    mut op: impl FnMut() -> io::Result<()>,
) -> Result<()> {
    let budget = Duration::from_secs(args.max_secs);
    for _ in 0..args.warmup {
        if start.elapsed() > budget {
            break;
        }
        match op() {
            Err(e) if persistent => return Err(e).context("warm-up"),
            // Warm-up failures show up again in the measured phase; no need to count them.
            _ => {}
        }
    }
    let mut latencies = Vec::with_capacity(args.count as usize);
    let mut errors = BTreeMap::new();
    let measured = Instant::now();
    for _ in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        let begin = Instant::now();
        match op() {
            Ok(()) => latencies.push(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => {
                *errors.entry(error_key(&e)).or_default() += 1;
                if persistent {
                    break;
                }
            }
        }
    }
    let summary = BenchSummary::from_latencies(latencies, measured.elapsed(), errors);
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

/// connect + write payload + read name line and echo + close.
fn bench_iteration(addr: SocketAddr, timeout: Duration, payload: &[u8]) -> io::Result<()> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    (&stream).write_all(payload)?;
    let mut reader = BufReader::new(&stream);
    read_name_line(&mut reader)?;
    let mut echo = vec![0u8; payload.len()];
    reader.read_exact(&mut echo)?;
    if echo != payload {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "echo differs from payload",
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// sink / stream / churn
// ---------------------------------------------------------------------------------

fn sink(args: &SinkArgs) -> Result<()> {
    let addr = SocketAddr::new(args.bind, args.port);
    let listener: TcpListener = bind(addr, Type::STREAM)
        .and_then(|s| s.listen(1024).map(|()| s))
        .with_context(|| format!("bind tcp {addr}"))?
        .into();
    println!("{READY_LINE}");
    io::stdout().flush()?;
    let opts = SinkOpts {
        echo: args.echo,
        delay: Duration::from_millis(args.read_delay_ms),
        chunk: args.read_chunk.max(1),
        reset_after: args.reset_after,
        timeout: Duration::from_millis(args.timeout_ms),
        unchecked: args.unchecked,
    };
    for stream in listener.incoming() {
        match stream {
            Ok(stream) => {
                let opts = opts.clone();
                std::thread::spawn(move || {
                    let conn = sink_conn(stream, &opts);
                    if let Err(e) = emit(&conn) {
                        eprintln!("mesh-testpod sink: report: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("mesh-testpod sink: accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    }
    Ok(())
}

#[derive(Clone)]
struct SinkOpts {
    echo: bool,
    delay: Duration,
    chunk: usize,
    reset_after: Option<u64>,
    timeout: Duration,
    unchecked: bool,
}

/// A stream's FNV-1a checksum, or none (0) when unchecked: byte-at-a-time hashing would
/// otherwise bound a throughput benchmark instead of the path it measures.
#[derive(Clone, Copy)]
struct Digest(Option<Fnv64>);

impl Digest {
    fn new(checked: bool) -> Self {
        Self(checked.then(Fnv64::default))
    }

    fn update(&mut self, bytes: &[u8]) {
        if let Some(h) = &mut self.0 {
            h.update(bytes);
        }
    }

    fn finish(&self) -> u64 {
        self.0.map_or(0, |h| h.finish())
    }
}

/// Serves one sink connection and describes what happened.
fn sink_conn(stream: TcpStream, opts: &SinkOpts) -> SinkConn {
    let start = Instant::now();
    let mut conn = SinkConn {
        peer: stream
            .peer_addr()
            .map(|p| p.to_string())
            .unwrap_or_default(),
        ..SinkConn::default()
    };
    let mut hash = Digest::new(!opts.unchecked);
    if let Err((step, err)) = sink_serve(&stream, opts, &mut conn, &mut hash) {
        conn.error = Some(format!("{step}: {err}"));
        conn.error_key = Some(error_key(&err));
    }
    conn.checksum = hash.finish();
    if conn.reset {
        // SO_LINGER 0 is set: this close sends an RST.
        drop(stream);
    }
    conn.elapsed_ns = nanos(start.elapsed());
    conn
}

fn sink_serve(
    stream: &TcpStream,
    opts: &SinkOpts,
    conn: &mut SinkConn,
    hash: &mut Digest,
) -> Result<(), StepError> {
    let setup = || -> io::Result<()> {
        stream.set_read_timeout(Some(opts.timeout))?;
        stream.set_write_timeout(Some(opts.timeout))
    };
    setup().map_err(|e| ("setsockopt", e))?;
    let mut buf = vec![0u8; opts.chunk];
    loop {
        let want = match opts.reset_after {
            Some(limit) if conn.bytes >= limit => {
                SockRef::from(stream)
                    .set_linger(Some(Duration::ZERO))
                    .map_err(|e| ("setsockopt linger", e))?;
                conn.reset = true;
                return Ok(());
            }
            Some(limit) => opts
                .chunk
                .min(usize::try_from(limit - conn.bytes).unwrap_or(usize::MAX)),
            None => opts.chunk,
        };
        let started = Instant::now();
        let n = match (&*stream).read(&mut buf[..want]) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            // A blocking read may only give EAGAIN once its timeout ran out: count the
            // others and retry (see StreamSummary::spurious_eagain).
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && started.elapsed() < opts.timeout => {
                conn.spurious_eagain += 1;
                std::thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(e) => return Err(("read", e)),
        };
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        conn.bytes += n as u64;
        if opts.echo {
            (&*stream).write_all(&buf[..n]).map_err(|e| ("echo", e))?;
            conn.echoed += n as u64;
        }
        if !opts.delay.is_zero() {
            std::thread::sleep(opts.delay);
        }
    }
    if !opts.echo {
        let reply = format!("{} {}\n", conn.bytes, hash.finish());
        (&*stream)
            .write_all(reply.as_bytes())
            .map_err(|e| ("reply", e))?;
        conn.replied = true;
    }
    stream
        .shutdown(Shutdown::Write)
        .map_err(|e| ("shutdown", e))
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// CPU time (user + system) this process has used so far.
#[allow(unsafe_code)]
fn cpu_time() -> Duration {
    // SAFETY: getrusage only writes the struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a rusage.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// What the sending half of `stream` tracks.
struct Sent {
    bytes: u64,
    writes: u64,
    hash: Digest,
}

fn stream(args: &StreamArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let deadline = Instant::now() + Duration::from_secs(args.max_secs);
    let start = Instant::now();
    let cpu_start = cpu_time();
    let mut summary = StreamSummary {
        mode: args.mode.as_str().to_owned(),
        ..StreamSummary::default()
    };
    let fail = |summary: &mut StreamSummary, (step, err): StepError| {
        if summary.error.is_none() {
            summary.error = Some(format!("{step}: {err}"));
            summary.error_key = Some(error_key(&err));
        }
    };
    // 0: blocking sockets without SO_RCVTIMEO/SO_SNDTIMEO (connect still bounded).
    let socket_timeout = (args.timeout_ms > 0).then_some(timeout);
    let connect_timeout = socket_timeout.unwrap_or(Duration::from_secs(5));
    let stream = TcpStream::connect_timeout(&args.addr, connect_timeout).context("connect")?;
    stream.set_read_timeout(socket_timeout)?;
    stream.set_write_timeout(socket_timeout)?;
    if args.mode == StreamMode::Small {
        stream.set_nodelay(true)?;
    }
    let pattern = Pattern::new(args.seed);
    let limit = if args.reset {
        args.bytes / 2
    } else {
        args.bytes
    };
    let mut sent = Sent {
        bytes: 0,
        writes: 0,
        hash: Digest::new(!args.unchecked),
    };
    std::thread::scope(|scope| {
        // --bidir: the echo is read while sending, else both sides' buffers fill up.
        let echo_reader = args.bidir.then(|| {
            let reader = &stream;
            scope.spawn(move || read_all_hashing(reader, socket_timeout, deadline))
        });
        let result = send_stream(&stream, args, &pattern, limit, deadline, &mut sent);
        summary.sent = sent.bytes;
        summary.writes = sent.writes;
        summary.sent_checksum = sent.hash.finish();
        if let Err(e) = result {
            fail(&mut summary, e);
        }
        if args.reset {
            if summary.error.is_none() {
                let linger = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                match linger {
                    // The close (when `stream` drops at the end) sends the RST.
                    Ok(()) => summary.reset = true,
                    Err(e) => fail(&mut summary, ("setsockopt linger", e)),
                }
            }
            if let Some(reader) = echo_reader {
                let _ = stream.shutdown(Shutdown::Read);
                let _ = reader.join();
            }
            return;
        }
        if let Err(e) = stream.shutdown(Shutdown::Write) {
            fail(&mut summary, ("shutdown", e));
        }
        if let Some(reader) = echo_reader {
            let (bytes, hash, err, spurious) = reader.join().expect("echo reader panicked");
            summary.spurious_eagain += spurious;
            summary.echoed = Some(bytes);
            summary.echo_checksum = Some(hash);
            if let Some(e) = err {
                fail(&mut summary, ("read echo", e));
            }
        } else {
            match read_reply(
                &stream,
                socket_timeout,
                deadline,
                &mut summary.spurious_eagain,
            ) {
                Ok((bytes, checksum)) => {
                    summary.received_by_server = Some(bytes);
                    summary.server_checksum = Some(checksum);
                }
                Err(e) => fail(&mut summary, ("read reply", e)),
            }
        }
    });
    drop(stream);
    // An echo sink sends no reply line: what came back stands for what it received.
    if args.bidir && !args.reset {
        summary.received_by_server = summary.echoed;
        summary.server_checksum = summary.echo_checksum;
    }
    summary.elapsed_ns = nanos(start.elapsed());
    summary.cpu_ns = nanos(cpu_time().saturating_sub(cpu_start));
    emit(&summary)
}

/// Reads until EOF (or an error, or the deadline), hashing: (bytes, checksum, error,
/// spurious EAGAINs retried as in [`read_reply`]).
fn read_all_hashing(
    mut stream: &TcpStream,
    timeout: Option<Duration>,
    deadline: Instant,
) -> (u64, u64, Option<io::Error>, u64) {
    let mut buf = vec![0u8; 256 * 1024];
    let mut hash = Fnv64::default();
    let mut bytes = 0u64;
    let mut spurious = 0u64;
    loop {
        if Instant::now() > deadline {
            let err = Some(io::ErrorKind::TimedOut.into());
            return (bytes, hash.finish(), err, spurious);
        }
        let started = Instant::now();
        match stream.read(&mut buf) {
            Ok(0) => return (bytes, hash.finish(), None, spurious),
            Ok(n) => {
                hash.update(&buf[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && timeout.is_none_or(|t| started.elapsed() < t) =>
            {
                spurious += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return (bytes, hash.finish(), Some(e), spurious),
        }
    }
}

/// Reads the sink's `<bytes> <checksum>\n` reply and its EOF. An EAGAIN before the
/// socket timeout `timeout` ran out (a blocking read must not return it) is counted in
/// `spurious` and the read retried, so the data can still be checked.
fn read_reply(
    mut stream: &TcpStream,
    timeout: Option<Duration>,
    deadline: Instant,
    spurious: &mut u64,
) -> io::Result<(u64, u64)> {
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let started = Instant::now();
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) if reply.len() + n <= 256 => reply.extend_from_slice(&buf[..n]),
            Ok(_) => return Err(io::Error::new(io::ErrorKind::InvalidData, "reply too long")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    && timeout.is_none_or(|t| started.elapsed() < t)
                    && Instant::now() < deadline =>
            {
                *spurious += 1;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    }
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let bad = || {
        io::Error::new(
            if reply.is_empty() {
                io::ErrorKind::UnexpectedEof
            } else {
                io::ErrorKind::InvalidData
            },
            format!("bad sink reply {reply:?}"),
        )
    };
    let line = reply.strip_suffix('\n').ok_or_else(bad)?;
    let (bytes, checksum) = line.split_once(' ').ok_or_else(bad)?;
    Ok((
        bytes.parse().map_err(|_| bad())?,
        checksum.parse().map_err(|_| bad())?,
    ))
}

/// Sends the first `limit` bytes of `pattern` in `args.mode`, recording them in `sent`.
fn send_stream(
    stream: &TcpStream,
    args: &StreamArgs,
    pattern: &Pattern,
    limit: u64,
    deadline: Instant,
    sent: &mut Sent,
) -> Result<(), StepError> {
    let over = || Instant::now() > deadline;
    let timed_out = || ("send", io::Error::from(io::ErrorKind::TimedOut));
    let left = |sent: &Sent| usize::try_from(limit - sent.bytes).unwrap_or(usize::MAX);
    let record = |sent: &mut Sent, chunk: &[u8]| {
        sent.hash.update(chunk);
        sent.bytes += chunk.len() as u64;
        sent.writes += 1;
    };
    let mut writer = stream;
    match args.mode {
        StreamMode::Write | StreamMode::Small => {
            let mut i = 0u64;
            while sent.bytes < limit {
                if over() {
                    return Err(timed_out());
                }
                let size = match (args.mode, args.chunk) {
                    (_, Some(c)) => c.max(1),
                    (StreamMode::Small, None) => 1 + ((i * 37) % 64) as usize,
                    _ => 1 << 20,
                };
                i += 1;
                let chunk = pattern.at(sent.bytes, size.min(left(sent)));
                match writer.write(chunk) {
                    Ok(n) => record(sent, &chunk[..n]),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(("write", e)),
                }
            }
        }
        StreamMode::Writev => {
            const SIZES: [usize; 8] = [1, 4096, 100, 65536, 7, 16384, 1000, 200_000];
            let mut round = 0usize;
            while sent.bytes < limit {
                if over() {
                    return Err(timed_out());
                }
                let mut slices = Vec::with_capacity(SIZES.len());
                let mut offset = sent.bytes;
                for k in 0..SIZES.len() {
                    let remaining = usize::try_from(limit - offset).unwrap_or(usize::MAX);
                    if remaining == 0 {
                        break;
                    }
                    let size = args.chunk.unwrap_or(SIZES[(k + round) % SIZES.len()]);
                    let s = pattern.at(offset, size.max(1).min(remaining));
                    offset += s.len() as u64;
                    slices.push(IoSlice::new(s));
                }
                round += 1;
                match writer.write_vectored(&slices) {
                    Ok(mut n) => {
                        sent.writes += 1;
                        for s in &slices {
                            let take = n.min(s.len());
                            sent.hash.update(&s[..take]);
                            sent.bytes += take as u64;
                            n -= take;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(("writev", e)),
                }
            }
        }
        StreamMode::Sendfile => {
            static FILE_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let path = std::env::temp_dir().join(format!(
                "mesh-testpod-sendfile-{}-{}",
                std::process::id(),
                FILE_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            ));
            let result = (|| {
                let mut file = std::fs::File::create(&path).map_err(|e| ("create file", e))?;
                let mut offset = 0u64;
                while offset < limit {
                    let remaining = usize::try_from(limit - offset).unwrap_or(usize::MAX);
                    let s = pattern.at(offset, remaining.min(1 << 20));
                    file.write_all(s).map_err(|e| ("write file", e))?;
                    offset += s.len() as u64;
                }
                drop(file);
                let file = std::fs::File::open(&path).map_err(|e| ("open file", e))?;
                let chunk = args.chunk.unwrap_or(1 << 20).max(1);
                while sent.bytes < limit {
                    if over() {
                        return Err(timed_out());
                    }
                    let at = sent.bytes;
                    match sendfile(stream, &file, at, chunk.min(left(sent))) {
                        Ok(0) => {
                            return Err((
                                "sendfile",
                                io::Error::new(io::ErrorKind::WriteZero, "sendfile sent nothing"),
                            ));
                        }
                        Ok(n) => {
                            // What the file holds at [at, at + n): the pattern.
                            let mut done = 0;
                            while done < n {
                                let s = pattern.at(at + done as u64, n - done);
                                sent.hash.update(s);
                                done += s.len();
                            }
                            sent.bytes += n as u64;
                            sent.writes += 1;
                        }
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(("sendfile", e)),
                    }
                }
                Ok(())
            })();
            let _ = std::fs::remove_file(&path);
            result?;
        }
    }
    Ok(())
}

/// One `sendfile(2)` of `len` bytes of `file` from `offset` to `socket`.
#[allow(unsafe_code)]
fn sendfile(
    socket: &TcpStream,
    file: &std::fs::File,
    offset: u64,
    len: usize,
) -> io::Result<usize> {
    use std::os::fd::AsRawFd as _;
    let mut off = libc::off_t::try_from(offset).map_err(io::Error::other)?;
    // SAFETY: both descriptors are open for the duration of the call; `off` is a valid
    // off_t the kernel updates.
    let n = unsafe { libc::sendfile(socket.as_raw_fd(), file.as_raw_fd(), &raw mut off, len) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn churn(args: &ChurnArgs) -> Result<()> {
    let timeout = Duration::from_millis(args.timeout_ms);
    let budget = Duration::from_secs(args.max_secs);
    let start = Instant::now();
    let mut summary = ConnectSummary::default();
    for i in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        match churn_once(args.addr, timeout, i) {
            Ok(peer) => {
                summary.record_ok("echo");
                summary.record_peer(peer);
            }
            Err((step, err)) => summary.record_error(step, &err),
        }
    }
    print_summary(&summary, args.json)
}

/// Connect, write 16 bytes, read their echo, close.
fn churn_once(addr: SocketAddr, timeout: Duration, i: u32) -> Result<SocketAddr, StepError> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
    let peer = stream.peer_addr().map_err(|e| ("getpeername", e))?;
    let setup = || -> io::Result<()> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))
    };
    setup().map_err(|e| ("setsockopt", e))?;
    let request = format!("churn{i:010}\n");
    debug_assert_eq!(request.len(), 16);
    (&stream)
        .write_all(request.as_bytes())
        .map_err(|e| ("write", e))?;
    let mut echo = [0u8; 16];
    (&stream)
        .read_exact(&mut echo)
        .map_err(|e| ("read echo", e))?;
    if echo != request.as_bytes() {
        return Err(("read echo", bad_echo(&request, &echo)));
    }
    Ok(peer)
}
