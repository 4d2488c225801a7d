//! The etcd source: every object under the prefix, listed at one revision and then
//! watched from that revision on, so no change is missed. A lost connection is retried
//! with backoff while the datapath keeps the last good state (the source says it is
//! stale, and since when); the new connection resumes the watch at the last revision
//! taken in, and when etcd compacted past it meanwhile, starts over with a clean
//! relist. Each key is decoded once per change, and a bad value is rejected naming its
//! key while its last good object stays ([`catalog::Catalog`]). The agent registers
//! its node under a lease
//! (`<prefix>nodes/<node>`) with the revision its datapath applied, which
//! `mesh-agent apply --wait` and `mesh-agent nodes` read.

pub mod catalog;
pub mod connect;
pub mod layout;

use std::time::{Duration, Instant, SystemTime};

use etcd_client::{Client, ConnectOptions, EventType, KeyValue, PutOptions, WatchOptions};
use tokio::task::JoinHandle;
use tracing::{debug, error, info, warn};

use catalog::Catalog;
pub use connect::EtcdConfig;
use layout::{Layout, NodeRecord};

use super::{Feed, Update};
use crate::datapath::endpoints;

/// Lifetime of the node's registration without keepalives.
const LEASE_TTL: i64 = 15;
/// How often the lease is kept alive.
const KEEPALIVE: Duration = Duration::from_secs(5);
/// Pause before the second, third, ... reconnection attempt (the first is immediate, so
/// that losing one member of several goes unnoticed), doubling up to the maximum.
const BACKOFF_MIN: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long revoking the node's lease may take when the agent stops.
const LEAVE_TIMEOUT: Duration = Duration::from_secs(1);
/// How long etcd may be out of reach before the source reports itself stale.
const STALE_AFTER: Duration = Duration::from_secs(2);

/// Starts following etcd for node `node`.
///
/// # Errors
/// When the TLS files cannot be read.
pub fn spawn(config: EtcdConfig, node: String, feed: Feed) -> anyhow::Result<JoinHandle<()>> {
    let options = config.options()?;
    Ok(tokio::spawn(async move {
        let mut watcher = Watcher {
            catalog: Catalog::new(config.layout.clone()),
            config,
            options,
            node,
            feed,
            revision: None,
            attempt: 0,
        };
        watcher.run().await;
    }))
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    /// The agent stopped listening.
    #[error("the agent stopped")]
    Closed,
    /// The watch fell behind a compaction: relist.
    #[error("revision {0} was compacted")]
    Compacted(i64),
    /// Anything else: connection lost, member without leader, lease lost.
    #[error(transparent)]
    Etcd(#[from] anyhow::Error),
}

impl From<etcd_client::Error> for SessionError {
    fn from(e: etcd_client::Error) -> Self {
        SessionError::Etcd(e.into())
    }
}

/// The source's memory across sessions.
struct Watcher {
    config: EtcdConfig,
    options: ConnectOptions,
    node: String,
    feed: Feed,
    /// The objects of the keys under the prefix.
    catalog: Catalog,
    /// The revision up to which every change is taken in; `None` until the first list
    /// and after a compaction, when the next session lists.
    revision: Option<i64>,
    /// Sessions started, to rotate the first member tried.
    attempt: usize,
}

impl Watcher {
    async fn run(&mut self) {
        let mut lost: Option<SystemTime> = None;
        let mut failures = 0u32;
        loop {
            let result = self.session(&mut lost, &mut failures).await;
            match result {
                Err(SessionError::Closed) => return,
                Err(SessionError::Compacted(revision)) => {
                    info!(
                        compacted = revision,
                        "etcd compacted the revisions the watch needed: relisting"
                    );
                    self.revision = None;
                }
                Err(SessionError::Etcd(err)) => {
                    let since = *lost.get_or_insert_with(SystemTime::now);
                    failures += 1;
                    // A leader election or one member's loss passes within a second or
                    // two; longer, and the store is gone: say so, from when it went.
                    if since.elapsed().unwrap_or_default() >= STALE_AFTER {
                        self.feed.set_stale(Some(since));
                    }
                    let pause = if failures == 1 {
                        Duration::ZERO
                    } else {
                        BACKOFF_MIN
                            .saturating_mul(1 << (failures - 2).min(8))
                            .min(BACKOFF_MAX)
                    };
                    warn!(
                        error = %format!("{err:#}"),
                        retry_in = ?pause,
                        "etcd unreachable; the datapath keeps the last good state"
                    );
                    tokio::select! {
                        () = tokio::time::sleep(pause) => {}
                        () = self.feed.stopping() => return,
                    }
                }
                Ok(()) => return,
            }
        }
    }

    /// One connection: list, register, watch until something breaks.
    async fn session(
        &mut self,
        lost: &mut Option<SystemTime>,
        failures: &mut u32,
    ) -> Result<(), SessionError> {
        let layout = self.config.layout.clone();
        let prefix = layout.prefix().to_owned();
        // Each new session starts with the member after the last one tried.
        self.attempt += 1;
        let mut client = self.config.connect(&self.options, self.attempt).await?;
        // The watch starts AT the revision already taken in, not after it: etcd
        // refuses a start below its compaction revision, and a start equal to it can
        // silently miss deletions made at it (compaction drops their tombstones), so
        // starting one early makes any compaction past what was seen a refusal, and
        // thus a relist. Events at that revision itself were taken in and are skipped.
        let seen = match self.revision {
            Some(revision) => revision,
            None => {
                let started = Instant::now();
                let (listing, revision) = connect::list(&mut client, &prefix).await?;
                let (decoded, removed) =
                    self.catalog.relist(listing.iter().filter_map(|kv| {
                        Some((kv.key_str().ok()?, kv.value(), kv.mod_revision()))
                    }));
                self.feed.set_rejected(self.catalog.rejected());
                info!(
                    revision,
                    objects = self.catalog.len(),
                    decoded,
                    removed,
                    rejected = self.catalog.rejected(),
                    took_ms = started.elapsed().as_millis() as u64,
                    "listed etcd"
                );
                self.revision = Some(revision);
                self.deliver().await?;
                revision
            }
        };
        let mut watch = client
            .watch_client()
            .max_decoding_message_size(connect::MAX_WATCH_MESSAGE)
            .watch(
                prefix.as_str(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(seen)
                        .with_progress_notify(),
                ),
            )
            .await?;
        let lease = client.lease_grant(LEASE_TTL, None).await?.id();
        let (mut keeper, mut keepalives) = client.lease_keep_alive(lease).await?;
        let mut status = self.feed.status();
        let mut registered = None;
        self.register(&mut client, &layout, lease, &mut registered)
            .await?;
        if lost.is_some() {
            info!(after = seen, "etcd reachable again; following changes");
        }
        *lost = None;
        *failures = 0;
        self.feed.set_stale(None);

        let mut keepalive = tokio::time::interval(KEEPALIVE);
        loop {
            tokio::select! {
                message = watch.message() => {
                    let mut response = message?
                        .ok_or_else(|| anyhow::anyhow!("the etcd watch stream ended"))?;
                    let mut changed = 0usize;
                    // Fold what is already waiting into one state.
                    loop {
                        if response.compact_revision() > 0 {
                            return Err(SessionError::Compacted(response.compact_revision()));
                        }
                        if response.canceled() {
                            return Err(anyhow::anyhow!(
                                "etcd canceled the watch: {}",
                                response.cancel_reason()
                            )
                            .into());
                        }
                        if response.events().is_empty() && !response.created() {
                            // Progress: every change up to the header's revision is in.
                            // (Not the creation's header: the catch-up from `seen` on
                            // is still to come.)
                            let progress = response.header().map_or(0, |h| h.revision());
                            self.revision = self.revision.max(Some(progress));
                        }
                        for event in response.events() {
                            let Some(kv) = event.kv().filter(|kv| kv.mod_revision() > seen) else {
                                continue;
                            };
                            self.revision = self.revision.max(Some(kv.mod_revision()));
                            changed += usize::from(self.event(event.event_type(), kv));
                        }
                        match tokio::time::timeout(Duration::ZERO, watch.message()).await {
                            Ok(next) => {
                                response = next?.ok_or_else(|| {
                                    anyhow::anyhow!("the etcd watch stream ended")
                                })?;
                            }
                            Err(_) => {
                                if changed > 0 {
                                    debug!(changed, "etcd objects changed");
                                    self.deliver().await?;
                                }
                                break;
                            }
                        }
                    }
                }
                _ = status.changed() => {
                    self.register(&mut client, &layout, lease, &mut registered).await?;
                }
                _ = keepalive.tick() => keeper.keep_alive().await?,
                () = self.feed.stopping() => {
                    // Leave: the registration goes with the lease, so `nodes` and
                    // `apply --wait` stop counting this node at once.
                    let _ = tokio::time::timeout(LEAVE_TIMEOUT, client.lease_revoke(lease)).await;
                    info!(node = %self.node, "left etcd: registration removed");
                    return Err(SessionError::Closed);
                }
                answer = keepalives.message() => {
                    let answer = answer?
                        .ok_or_else(|| anyhow::anyhow!("the etcd lease keepalive stream ended"))?;
                    if answer.ttl() <= 0 {
                        return Err(anyhow::anyhow!("the node's etcd lease {lease:x} expired").into());
                    }
                }
            }
        }
    }

    /// Takes in one watch event; whether the objects changed.
    fn event(&mut self, event: EventType, kv: &KeyValue) -> bool {
        let Ok(key) = kv.key_str() else {
            error!(key = ?kv.key(), "etcd key is not UTF-8; ignored");
            return false;
        };
        let changed = match event {
            EventType::Put => self.catalog.put(key, kv.value(), kv.mod_revision()),
            EventType::Delete => self.catalog.delete(key),
        };
        self.feed.set_rejected(self.catalog.rejected());
        changed
    }

    /// Assembles and delivers the state at the revision taken in.
    async fn deliver(&mut self) -> Result<(), SessionError> {
        let revision = self.revision.unwrap_or(0);
        let started = Instant::now();
        // Assembling clones every object (about 10 ms per 1,000): off the async workers.
        let state = tokio::task::block_in_place(|| self.catalog.state());
        info!(
            revision,
            objects = self.catalog.len(),
            assemble_ms = started.elapsed().as_secs_f64() * 1e3,
            "etcd state assembled"
        );
        let update = Update {
            state,
            revision: u64::try_from(revision).unwrap_or(0),
        };
        if self.feed.deliver(update).await {
            Ok(())
        } else {
            Err(SessionError::Closed)
        }
    }

    /// Writes the node's registration when what it says changed.
    async fn register(
        &self,
        client: &mut Client,
        layout: &Layout,
        lease: i64,
        registered: &mut Option<NodeRecord>,
    ) -> Result<(), SessionError> {
        let applied_revision = self.feed.status().borrow().applied_revision;
        let record = NodeRecord {
            node: self.node.clone(),
            addresses: endpoints::node_addrs().unwrap_or_default(),
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            applied_revision,
        };
        if registered.as_ref() == Some(&record) {
            return Ok(());
        }
        let value = serde_json::to_vec(&record).map_err(anyhow::Error::from)?;
        client
            .put(
                layout.node_key(&self.node),
                value,
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
        *registered = Some(record);
        Ok(())
    }
}
