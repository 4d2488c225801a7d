//! The file source: a state file or a directory of them, read whole on every change
//! (all or nothing: a bad document rejects the update, see [`crate::state::load`]).

use std::{path::PathBuf, time::Duration};

use tokio::{sync::mpsc, task::JoinHandle};

use super::{Feed, Update};
use crate::{state, watch};

/// How long to wait after a change notification for the burst of writes to settle.
const SETTLE: Duration = Duration::from_millis(100);

/// Starts reading `path`: once now, then after each change.
///
/// # Errors
/// When `path` cannot be watched.
pub fn spawn(path: PathBuf, feed: Feed) -> anyhow::Result<JoinHandle<()>> {
    // Watch before the first read, so a change racing startup is not missed.
    let (changed_tx, mut changed) = mpsc::channel(1);
    let watcher = watch::watch(&path, changed_tx)?;
    Ok(tokio::spawn(async move {
        let _watcher = watcher;
        let mut revision = 0;
        loop {
            revision += 1;
            let read = path.clone();
            let state = tokio::task::spawn_blocking(move || state::load(&read))
                .await
                .unwrap_or_else(|e| {
                    Err(state::StateError::Io {
                        path: path.clone(),
                        source: std::io::Error::other(e),
                    })
                });
            if !feed.deliver(Update { state, revision }).await {
                return;
            }
            if changed.recv().await.is_none() {
                return;
            }
            tokio::time::sleep(SETTLE).await;
            // Drain what arrived while settling: one read covers them all.
            while changed.try_recv().is_ok() {}
        }
    }))
}
