//! The Kubernetes source (`mesh-agent run --kubernetes`, or `--kubeconfig PATH`): the
//! cluster state read from the API server, as a DaemonSet's agent does.
//!
//! `kinds` lists what is watched (exactly what the state model reads; the ClusterRole
//! in `deploy/kubernetes` grants exactly that), `client` connects and notes whether the
//! API server answers, `store` turns watcher events into changes of single objects. One
//! kube-runtime watcher per kind lists, then watches from the list's resourceVersion
//! with bookmarks, so a reconnect resumes from the newest version seen (a bookmark's
//! included) without listing again; an expired version (`410 Gone`) makes it list
//! again, and the relist is compared with what was known, so objects deleted meanwhile
//! go. Failures are retried with backoff while the last good state stays in force and
//! the source reports itself stale.
//!
//! Each object is decoded and validated alone when it changes ([`state::Objects`]),
//! named `API Kind namespace/name`; a bad one is rejected and its last good version, if
//! any, stays. No state is delivered before every kind has been listed once.

pub mod client;
pub mod kinds;
pub mod store;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures::StreamExt as _;
use kube::core::DynamicObject;
use kube::runtime::{WatchStreamExt as _, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

pub use client::Connect;

use self::client::{Prepared, Reachability};
use self::kinds::WATCHED;
use self::store::{Change, ObjectRef, Store};
use super::{Feed, Update};
use crate::state::{self, Origin};

/// Least time between two fresh starts of one kind's watcher, so an API server that
/// keeps refusing a resumed watch does not get a list in a tight loop; also the pause
/// between attempts to build the client.
const RESTART_PAUSE: Duration = Duration::from_secs(1);

/// What a kind's watcher reports.
enum KindEvent {
    Watch(Box<watcher::Event<DynamicObject>>),
    /// The kind is not served (CRD not installed).
    Absent,
}

/// Starts the source: reads the connection settings now (so a missing kubeconfig or
/// in-cluster environment fails the start), then watches in a task.
///
/// # Errors
/// When the kubeconfig file, or the in-cluster configuration, is unusable.
pub fn spawn(connect: Connect, feed: Feed) -> anyhow::Result<JoinHandle<()>> {
    let prepared = client::prepare(&connect)?;
    Ok(tokio::spawn(run(prepared, feed)))
}

async fn run(prepared: Prepared, feed: Feed) {
    let (reach_tx, mut reach_rx) = watch::channel(None);
    let reach = Arc::new(Reachability::new(reach_tx));
    let client = loop {
        match client::client(&prepared, reach.clone()).await {
            Ok(client) => break client,
            Err(err) => {
                let err = format!("{:#}", anyhow::Error::new(err));
                error!(%err, "cannot build the Kubernetes API client; retrying");
                feed.set_stale(Some(SystemTime::now()));
                tokio::time::sleep(RESTART_PAUSE).await;
            }
        }
    };
    let (events_tx, mut events) = mpsc::channel(1024);
    // Owned here: stopping the source (aborting this task) aborts the watchers.
    let mut watchers = JoinSet::new();
    for index in 0..WATCHED.len() {
        watchers.spawn(watch_kind(client.clone(), index, events_tx.clone()));
    }
    drop(events_tx);
    let mut store = Store::default();
    let mut objects = state::Objects::default();
    let mut rejected = BTreeSet::new();
    let mut revision = 0;
    let mut dirty = false;
    let mut announced = false;
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(first) = event else { return };
                // Everything already queued goes into one state.
                let mut batch = vec![first];
                while let Ok(more) = events.try_recv() {
                    batch.push(more);
                }
                for (index, event) in batch {
                    let changes = match event {
                        KindEvent::Watch(event) => store.apply(index, *event),
                        KindEvent::Absent => store.absent(index),
                    };
                    for change in changes {
                        dirty |= apply(&mut objects, &mut rejected, change);
                    }
                }
                feed.set_rejected(rejected.len());
                if !store.synced() {
                    continue;
                }
                // The first complete list is a state even when it is empty: an empty
                // cluster must clear what an earlier agent left in the maps.
                let first = !announced;
                if first {
                    let (count, bad) = (objects.len(), rejected.len());
                    info!(objects = count, rejected = bad, "Kubernetes API listed");
                    announced = true;
                }
                if dirty || first {
                    dirty = false;
                    revision += 1;
                    if !feed.deliver(Update { state: objects.state(), revision }).await {
                        return;
                    }
                }
            }
            Ok(()) = reach_rx.changed() => {
                let since = *reach_rx.borrow_and_update();
                feed.set_stale(since);
            }
        }
    }
}

/// Applies one object change to the decoded objects; returns whether they changed. A
/// rejected object is logged with every problem and counted, its last good version
/// staying in force.
fn apply(objects: &mut state::Objects, rejected: &mut BTreeSet<String>, change: Change) -> bool {
    match change {
        Change::Upsert(object, json) => {
            let id = object.id();
            match objects.upsert(&id, origin(&object), &json, None) {
                Ok(()) => {
                    rejected.remove(&id);
                    true
                }
                Err(problems) => {
                    for problem in problems {
                        error!(
                            %problem,
                            "object rejected; its last good version, if any, stays in force"
                        );
                    }
                    rejected.insert(id);
                    false
                }
            }
        }
        Change::Remove(object) => {
            let id = object.id();
            rejected.remove(&id);
            objects.remove(&id)
        }
    }
}

fn origin(object: &ObjectRef) -> Origin {
    Origin::Api {
        kind: object.kind.kind.to_owned(),
        namespace: object.namespace.clone(),
        name: object.name.clone(),
    }
}

/// Runs the watcher of `WATCHED[index]` until the source stops listening.
async fn watch_kind(client: Client, index: usize, events: mpsc::Sender<(usize, KindEvent)>) {
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
        let mut stream = watcher(api.clone(), config.clone())
            .default_backoff()
            .boxed();
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => {
                    absent = false;
                    KindEvent::Watch(Box::new(event))
                }
                Err(watcher::Error::InitialListFailed(kube::Error::Api(status)))
                    if kind.optional && status.code == 404 =>
                {
                    if !absent {
                        info!(
                            kind = kind.kind,
                            api_version = %kind.api_version(),
                            "not served (CRD not installed?): no such objects"
                        );
                        absent = true;
                    }
                    KindEvent::Absent
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
                    continue;
                }
                Err(err) => {
                    warn!(kind = kind.kind, %err, "watching the Kubernetes API failed; retrying");
                    continue;
                }
            };
            if events.send((index, event)).await.is_err() {
                return;
            }
        }
        if let Some(rest) = RESTART_PAUSE.checked_sub(started.elapsed()) {
            tokio::time::sleep(rest).await;
        }
    }
}
