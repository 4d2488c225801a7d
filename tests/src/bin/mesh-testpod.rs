//! `mesh-testpod`: the workload the test bed runs inside pods.
//!
//! - `serve`: a TCP server that announces its name (`NAME\n`) on every connection and
//!   then echoes; optionally also answers UDP datagrams with `NAME\n<payload>`.
//! - `connect`: N sequential connections; reports which backend answered each, and
//!   errors by errno name, as JSON ([`ConnectSummary`]).
//! - `bench`: N sequential connect/echo/close iterations; reports latency
//!   percentiles as JSON ([`BenchSummary`]).
//!
//! Every network wait is bounded by a timeout, and client runs by a total time budget.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use mesh_tests::testpod::{
    BenchSummary, ConnectSummary, DEFAULT_TIMEOUT_MS, READY_LINE, error_key,
};

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
    /// Measure connect + echo + close latency over N sequential iterations.
    Bench(BenchArgs),
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
    /// Address to bind.
    #[arg(long, default_value_t = IpAddr::V4(Ipv4Addr::UNSPECIFIED))]
    bind: IpAddr,
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
    /// Print the summary as JSON (what the test library parses) instead of text.
    #[arg(long)]
    json: bool,
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
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Serve(args) => serve(&args),
        Cmd::Connect(args) => connect(&args),
        Cmd::Bench(args) => bench(&args),
    }
}

fn serve(args: &ServeArgs) -> Result<()> {
    let addr = SocketAddr::new(args.bind, args.port);
    let listener = TcpListener::bind(addr).with_context(|| format!("bind tcp {addr}"))?;
    if args.udp {
        let socket = UdpSocket::bind(addr).with_context(|| format!("bind udp {addr}"))?;
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
                std::thread::spawn(move || {
                    if let Err(e) = serve_tcp(&stream, &name) {
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

fn serve_tcp(stream: &TcpStream, name: &str) -> io::Result<()> {
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    stream.set_write_timeout(Some(SERVER_IDLE_TIMEOUT))?;
    let mut writer = stream;
    writer.write_all(format!("{name}\n").as_bytes())?;
    io::copy(&mut &*stream, &mut writer)?;
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
    let mut summary = ConnectSummary::default();
    for i in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        let result = if args.udp {
            udp_exchange(args.addr, timeout, i)
        } else {
            tcp_exchange(args.addr, timeout, i)
        };
        match result {
            Ok(backend) => summary.record_ok(&backend),
            Err((step, err)) => summary.record_error(step, &err),
        }
    }
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        println!(
            "attempts={} ok={} by_backend={:?} errors={:?} first_error={}",
            summary.attempts,
            summary.ok,
            summary.by_backend,
            summary.errors,
            summary.first_error.as_deref().unwrap_or("-")
        );
    }
    Ok(())
}

/// One TCP exchange: connect, read the backend's name line, send a request, read its
/// echo, half-close and wait for the server's close. Returns the backend name.
fn tcp_exchange(addr: SocketAddr, timeout: Duration, attempt: u32) -> Result<String, StepError> {
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| ("connect", e))?;
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
        0 => Ok(backend),
        _ => Err((
            "read eof",
            io::Error::new(io::ErrorKind::InvalidData, "data after the echo"),
        )),
    }
}

/// One UDP exchange on a fresh connected socket. Returns the backend name.
fn udp_exchange(addr: SocketAddr, timeout: Duration, attempt: u32) -> Result<String, StepError> {
    let local: IpAddr = if addr.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind((local, 0)).map_err(|e| ("bind", e))?;
    socket.connect(addr).map_err(|e| ("connect", e))?;
    socket
        .set_read_timeout(Some(timeout))
        .map_err(|e| ("setsockopt", e))?;
    let request = format!("ping {attempt}");
    socket.send(request.as_bytes()).map_err(|e| ("send", e))?;
    let mut buf = vec![0u8; 65536];
    // ECONNREFUSED here means an ICMP port unreachable came back.
    let n = socket.recv(&mut buf).map_err(|e| ("recv", e))?;
    let reply = &buf[..n];
    let newline = reply.iter().position(|&b| b == b'\n');
    match newline {
        Some(at) if &reply[at + 1..] == request.as_bytes() => {
            Ok(String::from_utf8_lossy(&reply[..at]).into_owned())
        }
        _ => Err(("recv", bad_echo(&request, reply))),
    }
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
    let timeout = Duration::from_millis(args.timeout_ms);
    let budget = Duration::from_secs(args.max_secs);
    let payload = vec![b'x'; args.payload];
    let start = Instant::now();
    for _ in 0..args.warmup {
        if start.elapsed() > budget {
            break;
        }
        // Warm-up failures show up again in the measured phase; no need to count them.
        let _ = bench_iteration(args.addr, timeout, &payload);
    }
    let mut latencies = Vec::with_capacity(args.count as usize);
    let mut errors = BTreeMap::new();
    let measured = Instant::now();
    for _ in 0..args.count {
        if start.elapsed() > budget {
            break;
        }
        let begin = Instant::now();
        match bench_iteration(args.addr, timeout, &payload) {
            Ok(()) => latencies.push(u64::try_from(begin.elapsed().as_nanos()).unwrap_or(u64::MAX)),
            Err(e) => *errors.entry(error_key(&e)).or_default() += 1,
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
