//! The running Kubernetes source: one kube-runtime watcher per watched kind, feeding
//! one [`Objects`] store. Watchers list, then watch from the list's resourceVersion
//! with bookmarks, so a reconnect resumes from the newest version seen (a bookmark
//! included) without listing again; an expired version (`410 Gone`) makes them list
//! again; failures are retried with backoff while the last good state stays in force.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use kube::core::DynamicObject;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::client::{self, Connect, ConnectError, Reachability};
use super::kinds::WATCHED;
use super::store::{Objects, SourcedObject};

/// Least time between two fresh starts of one kind's watcher, so an API server that
/// keeps refusing a resumed watch does not get a list in a tight loop.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// Watches the API server until dropped.
pub struct Watchers {
    objects: Arc<Mutex<Objects>>,
    reach: Arc<Reachability>,
    tasks: Vec<JoinHandle<()>>,
}

impl Watchers {
    /// Builds the client for `connect` and starts watching every kind. `changed` gets
    /// a `()` whenever the objects changed once every kind has been listed (the first
    /// time included); notifications coalesce in a full channel.
    pub async fn start(connect: &Connect, changed: mpsc::Sender<()>) -> Result<Self, ConnectError> {
        let reach = Arc::new(Reachability::default());
        let client = client::client(connect, reach.clone()).await?;
        let objects = Arc::new(Mutex::new(Objects::default()));
        let tasks = (0..WATCHED.len())
            .map(|index| {
                tokio::spawn(watch_kind(
                    client.clone(),
                    index,
                    objects.clone(),
                    changed.clone(),
                ))
            })
            .collect();
        Ok(Self {
            objects,
            reach,
            tasks,
        })
    }

    /// Every object, once every kind has been listed; None before.
    pub fn snapshot(&self) -> Option<Vec<SourcedObject>> {
        let objects = lock(&self.objects);
        objects.synced().then(|| objects.snapshot())
    }

    /// The kinds not listed yet.
    pub fn unsynced(&self) -> Vec<&'static str> {
        lock(&self.objects).unsynced()
    }

    /// Since when the API server does not answer, if it does not.
    pub fn failing_since(&self) -> Option<SystemTime> {
        self.reach.failing_since()
    }
}

impl Drop for Watchers {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

fn lock(objects: &Mutex<Objects>) -> MutexGuard<'_, Objects> {
    objects.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs the watcher of `WATCHED[index]` forever.
async fn watch_kind(
    client: Client,
    index: usize,
    objects: Arc<Mutex<Objects>>,
    changed: mpsc::Sender<()>,
) {
    let kind = &WATCHED[index];
    let resource = kind.api_resource();
    let (api, config) = match kind.only {
        Some((namespace, name)) => (
            Api::<DynamicObject>::namespaced_with(client, namespace, &resource),
            watcher::Config::default().fields(&format!("metadata.name={name}")),
        ),
        None => (
            Api::<DynamicObject>::all_with(client, &resource),
            watcher::Config::default(),
        ),
    };
    let mut absent = false;
    loop {
        let started = Instant::now();
        let mut events = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        while let Some(event) = events.next().await {
            let mut objects = lock(&objects);
            let changes = match event {
                Ok(event) => {
                    absent = false;
                    objects.apply(index, event)
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if kind.optional && status.code == 404 =>
                {
                    if !absent {
                        info!(kind = kind.kind, api_version = %kind.api_version(), "not served (CRD not installed?): no such objects");
                        absent = true;
                    }
                    objects.absent(index)
                }
                Err(watcher::Error::WatchStartFailed(kube::Error::Api(status)))
                    if status.code == 410 =>
                {
                    // The watcher would retry the expired version forever: start over
                    // with a fresh list.
                    info!(
                        kind = kind.kind,
                        "resource version expired (410 Gone): listing again"
                    );
                    break;
                }
                Err(watcher::Error::WatchError(status)) if status.code == 410 => {
                    // The watcher lists again by itself.
                    info!(
                        kind = kind.kind,
                        "resource version expired (410 Gone): listing again"
                    );
                    false
                }
                Err(err) => {
                    warn!(kind = kind.kind, %err, "watching the Kubernetes API failed; retrying");
                    false
                }
            };
            if changes && objects.synced() {
                // A full channel already means "reload pending".
                let _ = changed.try_send(());
            }
        }
        if let Some(rest) = RESTART_PAUSE.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}
