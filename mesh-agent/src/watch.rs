//! File change notification for the state path. Editors and config-management tools
//! replace files by rename, so a single file is watched through its directory.

use std::path::{Path, PathBuf};

use notify::{RecommendedWatcher, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

/// Failure to set up watching, naming the path.
#[derive(Debug, thiserror::Error)]
#[error("watch {path}: {source}")]
pub struct WatchError {
    path: PathBuf,
    #[source]
    source: notify::Error,
}

/// Sends `()` on `changed` whenever the file or directory at `path` may have changed.
/// Notifications coalesce: a full channel already means "reload pending". Dropping the
/// returned watcher stops watching.
pub fn watch(path: &Path, changed: mpsc::Sender<()>) -> Result<RecommendedWatcher, WatchError> {
    let (dir, file_name) = if path.is_dir() {
        (path.to_path_buf(), None)
    } else {
        let dir = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        (dir, path.file_name().map(|n| n.to_os_string()))
    };
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let relevant = match (&event, &file_name) {
            // On a watcher error, reload anyway: re-reading is cheap and always safe.
            (Err(_), _) => true,
            // Our own reads show up as access events: reacting would reload forever.
            (Ok(ev), _) if ev.kind.is_access() => false,
            (Ok(_), None) => true,
            (Ok(ev), Some(name)) => ev
                .paths
                .iter()
                .any(|p| p.file_name() == Some(name.as_os_str())),
        };
        if relevant {
            let _ = changed.try_send(());
        }
    })
    .map_err(|source| WatchError {
        path: dir.clone(),
        source,
    })?;
    watcher
        .watch(&dir, RecursiveMode::NonRecursive)
        .map_err(|source| WatchError {
            path: dir.clone(),
            source,
        })?;
    Ok(watcher)
}
