//! Where the cluster state comes from: files (`--state`, the default for demos and
//! tests), etcd (`--etcd`) or the Kubernetes API. Every source delivers complete
//! candidate states ([`Update`]) built by the same decoding and validation
//! ([`crate::state`]); the reconcile loop neither knows nor cares which source runs.
//! A source also says whether it is stale (cut off from its store, the last good state
//! staying in force) and since when ([`SourceStatus`]), and learns which of its
//! revisions the datapath applied ([`Source::applied`]).

pub mod etcd;
pub mod files;
pub mod kubernetes;

use std::{path::PathBuf, time::SystemTime};

use serde::{Deserialize, Serialize};
use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};

use crate::state::{State, StateError};

/// Which source to read, from the command line.
#[derive(Debug, Clone)]
pub enum SourceConfig {
    /// A state file or a directory of them, watched for changes.
    Files(PathBuf),
    /// An etcd cluster.
    Etcd(etcd::EtcdConfig),
    /// The Kubernetes API server.
    Kubernetes(kubernetes::Connect),
}

/// Which kind of source runs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// YAML files.
    #[default]
    Files,
    /// An etcd cluster.
    Etcd,
    /// The Kubernetes API.
    Kubernetes,
}

impl SourceKind {
    /// The name metrics and status use.
    pub fn as_str(self) -> &'static str {
        match self {
            SourceKind::Files => "files",
            SourceKind::Etcd => "etcd",
            SourceKind::Kubernetes => "kubernetes",
        }
    }
}

/// What a source is doing, for `/v1/status`, `mesh-agent status` and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceStatus {
    /// The source.
    pub kind: SourceKind,
    /// Cut off from its store: the state in force may be behind.
    pub stale: bool,
    /// When it lost its store (Unix seconds), while stale.
    pub stale_since: Option<u64>,
    /// The newest revision delivered (etcd revision; a count of states delivered for
    /// files and Kubernetes).
    pub revision: u64,
    /// The newest revision the datapath applied.
    pub applied_revision: u64,
    /// Objects rejected by validation that are left out of the state (their last good
    /// version, if any, stays in force).
    pub rejected_objects: u64,
}

/// A candidate state from a source.
#[derive(Debug)]
pub struct Update {
    /// The state, or every problem that makes the source's objects unusable together.
    pub state: Result<State, StateError>,
    /// The source's revision of this state, for [`Source::applied`].
    pub revision: u64,
}

/// A running source: its updates, its status, and the acknowledgements of applied
/// revisions. Dropping it stops the source.
pub struct Source {
    updates: mpsc::Receiver<Update>,
    status: watch::Sender<SourceStatus>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The source's side of a [`Source`]: where it delivers updates and its status, and
/// where it learns what was applied.
pub struct Feed {
    updates: mpsc::Sender<Update>,
    status: watch::Sender<SourceStatus>,
    stop: watch::Receiver<bool>,
}

impl Feed {
    /// Delivers a state; false once the agent has stopped listening.
    pub async fn deliver(&self, update: Update) -> bool {
        let revision = update.revision;
        // Known as delivered before it can be acknowledged as applied.
        self.status
            .send_modify(|s| s.revision = s.revision.max(revision));
        self.updates.send(update).await.is_ok()
    }

    /// Marks the source stale from `since` (kept if it already was), or fresh.
    pub fn set_stale(&self, since: Option<SystemTime>) {
        self.status.send_if_modified(|s| {
            let before = *s;
            s.stale = since.is_some();
            s.stale_since = match (s.stale_since, since) {
                (Some(first), Some(_)) => Some(first),
                (None, Some(at)) => Some(unix_secs(at)),
                (_, None) => None,
            };
            *s != before
        });
    }

    /// Sets how many objects are rejected and left out.
    pub fn set_rejected(&self, count: usize) {
        self.status.send_if_modified(|s| {
            std::mem::replace(&mut s.rejected_objects, count as u64) != count as u64
        });
    }

    /// Follows the status, e.g. for the applied revision.
    pub fn status(&self) -> watch::Receiver<SourceStatus> {
        self.status.subscribe()
    }

    /// Resolves once the agent stops ([`Source::stop`]): time to leave cleanly (an
    /// etcd source gives up its node's registration).
    pub async fn stopping(&self) {
        let mut stop = self.stop.clone();
        let _ = stop.wait_for(|stop| *stop).await;
    }
}

fn unix_secs(at: SystemTime) -> u64 {
    at.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Source {
    /// Starts the source `config` describes for node `node`.
    ///
    /// # Errors
    /// When it cannot even start (a path that cannot be watched, bad TLS files).
    pub fn start(config: &SourceConfig, node: &str) -> anyhow::Result<Self> {
        let kind = match config {
            SourceConfig::Files(_) => SourceKind::Files,
            SourceConfig::Etcd(_) => SourceKind::Etcd,
            SourceConfig::Kubernetes(_) => SourceKind::Kubernetes,
        };
        // One update in flight: a source that gets ahead folds its changes into the next.
        let (updates_tx, updates) = mpsc::channel(1);
        let (status, _) = watch::channel(SourceStatus {
            kind,
            ..SourceStatus::default()
        });
        let (stop, stop_rx) = watch::channel(false);
        let feed = Feed {
            updates: updates_tx,
            status: status.clone(),
            stop: stop_rx,
        };
        let task = match config {
            SourceConfig::Files(path) => files::spawn(path.clone(), feed)?,
            SourceConfig::Etcd(config) => etcd::spawn(config.clone(), node.to_owned(), feed)?,
            SourceConfig::Kubernetes(connect) => kubernetes::spawn(connect.clone(), feed)?,
        };
        Ok(Self {
            updates,
            status,
            stop,
            task,
        })
    }

    /// The next candidate state; `None` when the source has ended.
    pub async fn next(&mut self) -> Option<Update> {
        self.updates.recv().await
    }

    /// Records that the datapath applied `revision`.
    pub fn applied(&self, revision: u64) {
        self.status
            .send_if_modified(|s| std::mem::replace(&mut s.applied_revision, revision) != revision);
    }

    /// Follows the source's status.
    pub fn status(&self) -> watch::Receiver<SourceStatus> {
        self.status.subscribe()
    }
}

impl Source {
    /// Stops the source, giving it [`STOP_GRACE`] to leave cleanly.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(STOP_GRACE, &mut self.task).await;
    }
}

/// How long a stopping source may take to leave cleanly.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for Source {
    fn drop(&mut self) {
        self.task.abort();
    }
}
