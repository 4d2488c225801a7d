//! `mesh-agent run`: load the datapath, program it from the state, attach it, then follow
//! state changes until SIGINT/SIGTERM, and finally detach and unpin.

use std::{path::Path, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{error, info, warn};

use crate::{
    cli::RunArgs,
    datapath::{
        loader::{Datapath, KernelServiceMaps},
        mounts,
    },
    plan::{self, Ids},
    state, watch,
};

/// How long to wait after a change notification for the burst of writes to settle.
const SETTLE: Duration = Duration::from_millis(100);
/// How soon a failed map update is retried (a rejected state waits for the next change).
const RETRY: Duration = Duration::from_secs(1);

/// Result of one reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    /// The maps hold the state.
    Applied,
    /// The state was invalid; the last good one stays until the files change again.
    Rejected,
    /// Writing the maps failed; retried after [`RETRY`].
    Failed,
}

/// Runs the agent until a termination signal.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let cgroup = match &args.cgroup {
        Some(dir) => dir.clone(),
        None => mounts::cgroup2_root()?,
    };
    let mut datapath = Datapath::load(&args.bpffs, &args.node)
        .with_context(|| format!("loading the datapath for node {}", args.node))?;
    let result = serve(&args, &cgroup, &mut datapath).await;
    let removed = datapath.remove().context("removing the datapath");
    result.and(removed)
}

async fn serve(args: &RunArgs, cgroup: &Path, datapath: &mut Datapath) -> anyhow::Result<()> {
    let mut maps = datapath.service_maps()?;
    // Keep the ids of a datapath an earlier agent left pinned, so adopting it does not
    // renumber entries that live connections are being translated with.
    let mut ids = maps.ids()?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    // Watch before the first read, so a change racing startup is not missed.
    let (changed_tx, mut changed) = mpsc::channel(1);
    let _watcher = watch::watch(&args.state, changed_tx)?;

    // Program the maps before attaching, so the first connect() already sees the table.
    let mut outcome = reconcile(&args.state, &mut maps, &mut ids);
    datapath.attach(cgroup)?;
    info!(node = %args.node, cgroup = %cgroup.display(), "datapath ready");

    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            Some(()) = changed.recv() => {
                tokio::time::sleep(SETTLE).await;
                // Drain what arrived while settling: one reload covers them all.
                while changed.try_recv().is_ok() {}
                outcome = reconcile(&args.state, &mut maps, &mut ids);
            }
            () = tokio::time::sleep(RETRY), if outcome == Outcome::Failed => {
                outcome = reconcile(&args.state, &mut maps, &mut ids);
            }
        }
    }
    Ok(())
}

/// Reads, plans and applies the state. Any failure keeps the last good state in force
/// and is logged with the file, document and field involved.
fn reconcile(path: &Path, maps: &mut KernelServiceMaps, ids: &mut Ids) -> Outcome {
    let state = match state::load(path) {
        Ok(state) => state,
        Err(err) => {
            for line in err.to_string().lines() {
                error!(state = %path.display(), problem = line, "state rejected; keeping the last good state");
            }
            return Outcome::Rejected;
        }
    };
    let (plan, next_ids) = match plan::plan(&state, ids) {
        Ok(planned) => planned,
        Err(err) => {
            error!(state = %path.display(), %err, "state rejected; keeping the last good state");
            return Outcome::Rejected;
        }
    };
    match maps.apply(&plan) {
        Ok(stats) => {
            *ids = next_ids;
            info!(
                frontends = plan.frontends.len(),
                backends = plan.backends.len(),
                written = stats.written,
                removed = stats.removed,
                "state applied"
            );
            Outcome::Applied
        }
        Err(err) => {
            warn!(%err, retry_in = ?RETRY, "applying the state failed");
            Outcome::Failed
        }
    }
}
