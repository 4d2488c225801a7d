//! Packet capture in a node's network namespace (an `AF_PACKET` socket on all its
//! links), for tests that must show what crosses the wire between nodes: whether a
//! known plaintext marker appears in it or not.

use std::{
    mem::MaybeUninit,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};
use socket2::{Domain, Protocol, Socket, Type};

use crate::{sys, topology::Node};

/// Most bytes kept: enough for a test's traffic, bounded whatever happens.
const MAX_BYTES: usize = 64 << 20;
/// Longest a capture runs, whatever the test does.
const MAX_DURATION: Duration = Duration::from_secs(120);

/// A running capture; [`Capture::finish`] returns every frame seen, concatenated.
pub struct Capture {
    stop: Arc<AtomicBool>,
    reader: Option<JoinHandle<Vec<u8>>>,
}

impl Capture {
    /// Starts capturing every frame on every link of `node`'s namespace.
    pub fn start(node: &Node) -> Result<Self> {
        let path = node.netns_path();
        // The socket keeps the namespace it was made in: only its creation happens there.
        let socket = sys::in_netns(&path, || {
            let all = i32::from((libc::ETH_P_ALL as u16).to_be());
            let s = Socket::new(Domain::PACKET, Type::RAW, Some(Protocol::from(all)))?;
            s.set_read_timeout(Some(Duration::from_millis(50)))?;
            Ok::<_, std::io::Error>(s)
        })
        .with_context(|| format!("enter netns of node {}", node.name()))?
        .with_context(|| format!("packet socket in node {}", node.name()))?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let reader = std::thread::spawn(move || {
            let started = Instant::now();
            let mut seen = Vec::new();
            let mut buf = vec![MaybeUninit::<u8>::uninit(); 65536];
            while !flag.load(Ordering::Acquire) && started.elapsed() < MAX_DURATION {
                match socket.recv(&mut buf) {
                    Ok(n) if seen.len() + n <= MAX_BYTES => {
                        // SAFETY: recv initialised the first n bytes.
                        seen.extend(buf[..n].iter().map(|b| unsafe { b.assume_init() }));
                    }
                    Ok(_) | Err(_) => {}
                }
            }
            seen
        });
        Ok(Self {
            stop,
            reader: Some(reader),
        })
    }

    /// Stops and returns the frames seen.
    pub fn finish(mut self) -> Vec<u8> {
        self.stop.store(true, Ordering::Release);
        self.reader
            .take()
            .and_then(|r| r.join().ok())
            .unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty() && haystack.windows(needle.len()).any(|w| w == needle)
}
