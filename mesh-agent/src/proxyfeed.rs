//! The node proxy's configuration feed: the current [`ProxyConfig`] in a
//! `tokio::sync::watch` channel. The reconciler publishes after every applied state and
//! every change of the local pods' namespaces; the admin API streams it
//! (`GET /v1/proxy/config`).
//!
//! Only changes are published, each with the next version, so a proxy sees a new line
//! only when something it serves changed. Watch semantics bound what a slow reader
//! costs: only the latest snapshot is kept, whatever it missed in between is skipped.

use std::sync::Arc;

use hyper::body::Bytes;
use mesh_common::l7::ProxyConfig;
use tokio::sync::watch;
use tracing::{error, info};

/// One published configuration, serialized once for every subscriber.
#[derive(Debug)]
pub struct Snapshot {
    /// The configuration.
    pub config: ProxyConfig,
    /// It as one JSON line (newline included), as the admin API sends it.
    pub line: Bytes,
}

/// What subscribers watch: `None` until the first state is applied, so that a proxy
/// connecting early waits rather than taking an empty configuration for the truth.
pub type Subscription = watch::Receiver<Option<Arc<Snapshot>>>;

/// The publishing end.
#[derive(Debug)]
pub struct ProxyFeed {
    tx: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Default for ProxyFeed {
    fn default() -> Self {
        Self {
            tx: watch::Sender::new(None),
        }
    }
}

impl ProxyFeed {
    /// A receiver of the current snapshot and every later one.
    pub fn subscribe(&self) -> Subscription {
        self.tx.subscribe()
    }

    /// Publishes `config` when its content (all but `version`) differs from the current
    /// snapshot's, with the next version (the first is 1). Returns the version published,
    /// `None` when nothing changed.
    pub fn publish(&self, mut config: ProxyConfig) -> Option<u64> {
        let version = {
            let current = self.tx.borrow();
            let last = current.as_ref().map_or(0, |s| s.config.version);
            config.version = last;
            if current.as_ref().is_some_and(|s| s.config == config) {
                return None;
            }
            last + 1
        };
        config.version = version;
        let mut line = match serde_json::to_vec(&config) {
            Ok(line) => line,
            Err(err) => {
                // Only maps with non-string keys fail, and the schema has none.
                error!(component = "proxyfeed", %err, "serializing the proxy configuration failed; not published");
                return None;
            }
        };
        line.push(b'\n');
        info!(
            component = "proxyfeed",
            version,
            pods = config.pods.len(),
            frontends = config.frontends.len(),
            services = config.services.len(),
            "proxy configuration published"
        );
        self.tx.send_replace(Some(Arc::new(Snapshot {
            config,
            line: Bytes::from(line),
        })));
        Some(version)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(node: &str) -> ProxyConfig {
        ProxyConfig {
            node: node.into(),
            ..ProxyConfig::default()
        }
    }

    #[test]
    fn only_changes_are_published_each_with_the_next_version() {
        let feed = ProxyFeed::default();
        let mut rx = feed.subscribe();
        assert!(rx.borrow_and_update().is_none(), "nothing before the first");
        assert_eq!(feed.publish(config("n1")), Some(1));
        assert!(rx.has_changed().expect("open"));
        let first = rx.borrow_and_update().clone().expect("snapshot");
        assert_eq!(first.config.version, 1);
        let parsed: ProxyConfig = serde_json::from_slice(&first.line).expect("JSON line");
        assert_eq!(parsed, first.config);
        assert!(first.line.ends_with(b"\n"));

        // The same content, whatever version the caller put in, is not a change.
        let mut same = config("n1");
        same.version = 42;
        assert_eq!(feed.publish(same), None);
        assert!(!rx.has_changed().expect("open"));

        assert_eq!(feed.publish(config("n2")), Some(2));
        let second = rx.borrow_and_update().clone().expect("snapshot");
        assert_eq!(second.config.version, 2);
        assert_eq!(second.config.node, "n2");
    }
}
