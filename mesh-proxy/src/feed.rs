//! The configuration feed: `GET /v1/proxy/config` on the agent's admin socket, an
//! NDJSON stream of complete [`ProxyConfig`] snapshots. Each valid line is published
//! on a watch channel; an invalid one is logged and skipped; when the agent goes away
//! the last good configuration keeps serving while the feed reconnects with capped
//! backoff.

use std::{path::PathBuf, sync::Arc, time::Duration};

use bytes::{Buf, BytesMut};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use mesh_common::l7::ProxyConfig;
use tokio::{net::UnixStream, sync::watch};

/// Longest accepted line: a snapshot larger than this is garbage, not a configuration.
pub const MAX_LINE: usize = 64 << 20;
const PATH: &str = "/v1/proxy/config";
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Errors of one feed session, naming the agent's socket.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// Connecting or talking HTTP failed.
    #[error("agent {socket}: {source}")]
    Io {
        socket: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The agent answered with something other than 200.
    #[error("agent {socket}: GET {PATH}: {status}")]
    Status {
        socket: PathBuf,
        status: http::StatusCode,
    },
    /// A line exceeded [`MAX_LINE`].
    #[error("agent {socket}: a configuration line is longer than {MAX_LINE} bytes")]
    LineTooLong { socket: PathBuf },
    /// The agent closed the stream.
    #[error("agent {socket}: stream ended")]
    Ended { socket: PathBuf },
}

/// A line grew past the splitter's bound.
#[derive(Debug, thiserror::Error)]
#[error("line too long")]
pub struct LineTooLong;

/// Splits a byte stream into lines, bounded by [`MAX_LINE`].
#[derive(Default)]
pub struct LineSplitter {
    buf: BytesMut,
    max: usize,
}

impl LineSplitter {
    /// A splitter refusing lines longer than `max` bytes.
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Adds `data`; returns the complete lines, or `Err` when a line grew past the bound.
    pub fn push(&mut self, mut data: impl Buf) -> Result<Vec<BytesMut>, LineTooLong> {
        let mut lines = Vec::new();
        while data.has_remaining() {
            let chunk = data.chunk();
            let n = chunk.len();
            match chunk.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.buf.extend_from_slice(&chunk[..i]);
                    data.advance(i + 1);
                    lines.push(std::mem::take(&mut self.buf));
                }
                None => {
                    self.buf.extend_from_slice(chunk);
                    data.advance(n);
                }
            }
            if self.buf.len() > self.max {
                return Err(LineTooLong);
            }
        }
        Ok(lines)
    }
}

/// Parses one line; `None` for a blank one.
pub fn parse_line(line: &[u8]) -> Option<Result<ProxyConfig, serde_json::Error>> {
    let trimmed = line.trim_ascii();
    if trimmed.is_empty() {
        return None;
    }
    Some(serde_json::from_slice(trimmed))
}

/// Follows the agent at `socket` forever, publishing configurations on `tx`.
pub async fn run(socket: PathBuf, tx: watch::Sender<Option<Arc<ProxyConfig>>>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let mut connected = false;
        let ended = session(&socket, &tx, &mut connected).await;
        if connected {
            // The agent was there: the next attempt starts fast again.
            backoff = BACKOFF_MIN;
        }
        match ended {
            Ok(()) => {}
            Err(e) => {
                let serving = tx.borrow().as_ref().map(|c| c.version);
                tracing::warn!(error = %e, ?serving, retry_in = ?backoff, "configuration feed interrupted");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
        if tx.is_closed() {
            return;
        }
    }
}

/// One connection to the agent: returns when it ends; `connected` tells whether the
/// agent answered 200.
async fn session(
    socket: &PathBuf,
    tx: &watch::Sender<Option<Arc<ProxyConfig>>>,
    connected: &mut bool,
) -> Result<(), FeedError> {
    let io_err = |e: Box<dyn std::error::Error + Send + Sync>| FeedError::Io {
        socket: socket.clone(),
        source: e,
    };
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| io_err(e.into()))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| io_err(e.into()))?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(PATH)
        .header(http::header::HOST, "mesh-agent")
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| io_err(e.into()))?;
    let resp = send.send_request(req).await.map_err(|e| io_err(e.into()))?;
    if resp.status() != http::StatusCode::OK {
        conn.abort();
        return Err(FeedError::Status {
            socket: socket.clone(),
            status: resp.status(),
        });
    }
    *connected = true;
    tracing::info!(agent = %socket.display(), "configuration feed connected");
    let mut body = resp.into_body();
    let mut lines = LineSplitter::new(MAX_LINE);
    let result = loop {
        let Some(frame) = body.frame().await else {
            break Err(FeedError::Ended {
                socket: socket.clone(),
            });
        };
        let frame = frame.map_err(|e| io_err(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        let Ok(complete) = lines.push(data) else {
            break Err(FeedError::LineTooLong {
                socket: socket.clone(),
            });
        };
        for line in complete {
            publish(socket, &line, tx);
        }
    };
    conn.abort();
    result
}

/// Publishes one line's configuration, or logs why it is skipped.
fn publish(socket: &std::path::Path, line: &[u8], tx: &watch::Sender<Option<Arc<ProxyConfig>>>) {
    match parse_line(line) {
        None => {}
        Some(Ok(config)) => {
            tracing::debug!(version = config.version, "configuration received");
            tx.send_replace(Some(Arc::new(config)));
        }
        Some(Err(e)) => {
            tracing::warn!(agent = %socket.display(), error = %e, "ignoring a configuration line that does not parse");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_line(version: u64) -> String {
        let c = ProxyConfig {
            version,
            node: "n1".into(),
            ..Default::default()
        };
        format!("{}\n", serde_json::to_string(&c).unwrap())
    }

    #[test]
    fn garbage_line_is_skipped_and_good_lines_parse() {
        let stream = format!("{}{{not json\n\n{}", config_line(1), config_line(2));
        let mut split = LineSplitter::new(MAX_LINE);
        // Fed in small pieces, as chunks arrive.
        let mut lines = Vec::new();
        for piece in stream.as_bytes().chunks(7) {
            lines.extend(split.push(piece).unwrap());
        }
        let parsed: Vec<_> = lines.iter().filter_map(|l| parse_line(l)).collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].as_ref().unwrap().version, 1);
        assert!(parsed[1].is_err());
        assert_eq!(parsed[2].as_ref().unwrap().version, 2);
    }

    #[test]
    fn long_line_is_refused() {
        let mut split = LineSplitter::new(16);
        assert!(split.push(&b"0123456789"[..]).unwrap().is_empty());
        assert!(split.push(&b"0123456789"[..]).is_err());
    }

    #[tokio::test]
    async fn feed_publishes_and_keeps_last_good() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = std::env::temp_dir().join(format!("mesh-proxy-feed-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.sock");
        let _ = std::fs::remove_file(&path);
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let body = format!("{}garbage\n{}", config_line(7), config_line(8));
        let server = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await.unwrap();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            s.write_all(head.as_bytes()).await.unwrap();
        });
        let (tx, mut rx) = watch::channel(None);
        let feed = tokio::spawn(run(path.clone(), tx));
        let got = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                rx.changed().await.unwrap();
                if let Some(c) = rx.borrow().clone()
                    && c.version == 8
                {
                    return c.version;
                }
            }
        })
        .await
        .unwrap();
        assert_eq!(got, 8);
        server.await.unwrap();
        // The agent is gone: the last good configuration stays.
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert_eq!(rx.borrow().as_ref().unwrap().version, 8);
        feed.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
