//! The client side of HTTP: one hyper connection per accepted socket (HTTP/1.1 and
//! HTTP/2 prior knowledge for `http`, HTTP/2 only for `h2c` and `grpc`), with the
//! limits that keep a bad client from holding memory or streams: head size, head read
//! time (slowloris), concurrent streams, pending accept resets (HTTP/2 rapid reset),
//! keepalive pings. Also the hop-by-hop header rules both directions share.

use std::{sync::Arc, time::Duration};

use http::{HeaderMap, HeaderName, HeaderValue, header};
use hyper::service::service_fn;
use hyper_util::{
    rt::{TokioExecutor, TokioIo, TokioTimer},
    server::conn::auto,
};
use mesh_common::l7::AppProtocol;
use tokio::{net::TcpStream, sync::watch};

use crate::forward::Conn;

/// Client-facing limits.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Largest request head, bytes.
    pub max_header_bytes: u32,
    /// Time to send a complete HTTP/1.1 head.
    pub header_read_timeout: Duration,
    /// Concurrent HTTP/2 streams per connection.
    pub max_concurrent_streams: u32,
    /// HTTP/2 keepalive ping interval.
    pub idle_timeout: Duration,
}

/// Streams a client may reset before the server has answered them, per connection
/// (HTTP/2 rapid reset, CVE-2023-44487): past this the connection is closed.
const MAX_PENDING_ACCEPT_RESETS: usize = 20;
/// Streams the server may reset for a client's protocol errors before closing.
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// The hyper builder for a frontend speaking `protocol`.
pub fn builder(limits: &Limits, protocol: AppProtocol) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(limits.header_read_timeout)
        // hyper's floor for its read buffer is 8 KiB.
        .max_buf_size((limits.max_header_bytes as usize).max(8192));
    b.http2()
        .timer(TokioTimer::new())
        .max_header_list_size(limits.max_header_bytes)
        .max_concurrent_streams(limits.max_concurrent_streams)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .max_local_error_reset_streams(MAX_LOCAL_ERROR_RESETS)
        .keep_alive_interval(limits.idle_timeout)
        .keep_alive_timeout(Duration::from_secs(20));
    match protocol {
        AppProtocol::Http => b,
        AppProtocol::H2c | AppProtocol::Grpc => b.http2_only(),
    }
}

/// The drain of client connections on shutdown: every connection holds a [`Watcher`];
/// [`Drain::shutdown`] tells them all to finish (HTTP/1.1 `Connection: close`, HTTP/2
/// GOAWAY) and returns once every one has ended.
///
/// hyper-util's `GracefulShutdown` is not used because it drops a connection whose first
/// bytes (which choose HTTP/1.1 or HTTP/2) were not read yet, i.e. a request the client
/// already sent to a connection accepted just before the shutdown.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

/// One connection's handle on the [`Drain`].
#[derive(Debug)]
pub struct Watcher {
    rx: watch::Receiver<bool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// Nothing draining yet.
    pub fn new() -> Self {
        Self {
            tx: watch::Sender::new(false),
        }
    }

    /// A handle for one more connection (the drain waits for it).
    pub fn watcher(&self) -> Watcher {
        Watcher {
            rx: self.tx.subscribe(),
        }
    }

    /// Tells every connection to finish, and waits until all have ended.
    pub async fn shutdown(self) {
        self.tx.send_replace(true);
        self.tx.closed().await;
    }
}

/// Serves one client connection until it ends (or drains, on shutdown).
pub async fn serve(
    stream: TcpStream,
    conn: Arc<Conn>,
    protocol: AppProtocol,
    limits: Limits,
    mut watcher: Watcher,
) {
    // The connection's first bytes are read before a shutdown may ask it to finish (see
    // [`Drain`]); a client that sends nothing in time is closed.
    if tokio::time::timeout(limits.header_read_timeout, stream.readable())
        .await
        .is_err()
    {
        tracing::debug!("client sent nothing; closing");
        return;
    }
    let builder = builder(&limits, protocol);
    let svc = service_fn(move |req| {
        let conn = Arc::clone(&conn);
        async move { conn.handle(req).await }
    });
    let mut served =
        std::pin::pin!(builder.serve_connection_with_upgrades(TokioIo::new(stream), svc));
    // Biased: the connection is polled (and reads what the client sent) before the
    // shutdown signal is looked at.
    let draining = async {
        // The guard `wait_for` returns must not live across an await.
        let _ = watcher.rx.wait_for(|draining| *draining).await;
    };
    let ended = tokio::select! {
        biased;
        ended = served.as_mut() => ended,
        () = draining => {
            served.as_mut().graceful_shutdown();
            served.await
        }
    };
    if let Err(e) = ended {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

/// Whether a request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_names(headers).any(|n| n == "upgrade")
}

fn connection_names(headers: &HeaderMap) -> impl Iterator<Item = String> + '_ {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|n| n.trim().to_ascii_lowercase())
        .filter(|n| !n.is_empty())
}

/// `Keep-Alive`, named once: a `&str` name would be parsed again on every removal.
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
/// `Proxy-Connection`, likewise.
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Removes hop-by-hop headers (RFC 9110 §7.6.1): `Connection` and every header it
/// names, `Keep-Alive`, `Proxy-Connection`, `Transfer-Encoding`, `TE` (but `TE:
/// trailers`, which gRPC needs, is kept), and `Upgrade` unless `upgrading` (then
/// `Connection: upgrade` is set again for the next hop).
pub fn strip_hop_by_hop(headers: &mut HeaderMap, upgrading: bool) {
    // Most requests carry no `Connection` header: no names to collect, no allocation.
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<String> = connection_names(headers).collect();
        for name in named {
            if upgrading && name == "upgrade" {
                continue;
            }
            if let Ok(n) = HeaderName::from_bytes(name.as_bytes())
                && n != header::TE
            {
                headers.remove(n);
            }
        }
        headers.remove(header::CONNECTION);
    }
    headers.remove(&KEEP_ALIVE);
    headers.remove(&PROXY_CONNECTION);
    headers.remove(header::TRANSFER_ENCODING);
    if headers.contains_key(header::TE) {
        let trailers = headers
            .get_all(header::TE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("trailers"));
        headers.remove(header::TE);
        if trailers {
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
    }
    if upgrading {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        h
    }

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = headers(&[
            ("connection", "keep-alive, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("proxy-connection", "keep-alive"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("upgrade", "websocket"),
            ("host", "web"),
            ("x-kept", "y"),
        ]);
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_owned()).collect();
        names.sort();
        assert_eq!(names, ["host", "te", "x-kept"]);
        assert_eq!(h[header::TE], "trailers");
    }

    #[test]
    fn te_without_trailers_goes() {
        let mut h = headers(&[("te", "gzip")]);
        strip_hop_by_hop(&mut h, false);
        assert!(h.is_empty());
    }

    #[test]
    fn upgrade_is_kept_when_upgrading() {
        let mut h = headers(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
        assert!(!wants_upgrade(&headers(&[("upgrade", "websocket")])));
    }
}
