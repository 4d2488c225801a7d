//! `mesh-agent run`: load the datapath (or adopt a pinned one), program it from the
//! state, attach it, serve metrics and the admin API, read flow events, then follow
//! state and health changes until SIGINT/SIGTERM; finally detach and unpin, or with
//! `--keep-datapath` leave it running.

use std::{path::Path, sync::Arc, time::Duration};

use anyhow::Context as _;
use tokio::{
    signal::unix::{SignalKind, signal},
    sync::mpsc,
};
use tracing::{info, warn};

use aya::maps::{Array, MapData};
use mesh_common::event::config;

use crate::{
    admin,
    cli::RunArgs,
    datapath::{
        DatapathError,
        inbound::InboundLinks,
        loader::{self, Datapath, DatapathMaps},
        mounts, pins,
    },
    flows::{self, FlowLog, SharedView},
    health::HealthChecker,
    metrics,
    proxyfeed::ProxyFeed,
    reconcile::{Outcome, Outputs, ReconcileMaps, Reconciler},
    source::{Source, Update},
    telemetry::Telemetry,
};

/// How long the first state may take before the datapath is attached without it: an
/// unreachable store must not keep an adopted datapath's agent from serving, and the
/// state follows when the store answers.
const FIRST_STATE: Duration = Duration::from_secs(10);
/// How soon a failed map update is retried (a rejected state waits for the next change).
const RETRY: Duration = Duration::from_secs(1);
/// How often local pods' network namespaces are looked for again: a new pod's egress
/// policy applies from its first discovery.
const REDISCOVER: Duration = Duration::from_secs(1);

/// Runs the agent until a termination signal.
pub async fn run(args: RunArgs) -> anyhow::Result<()> {
    let node_dir = pins::node_dir(&args.bpffs, &args.node);
    if args.cleanup {
        return loader::uninstall_node(&node_dir)
            .with_context(|| format!("removing the datapath of node {}", args.node));
    }
    let cgroup = match &args.cgroup {
        Some(dir) => dir.clone(),
        None => mounts::cgroup2_root()?,
    };
    let mut datapath = Datapath::load(&args.bpffs, &args.node, &args.map_sizes.sizes())
        .with_context(|| format!("loading the datapath for node {}", args.node))?;
    if datapath.adopted() {
        info!(pins = %node_dir.display(), "adopting the datapath pinned by an earlier agent");
    }
    let result = serve(&args, &cgroup, &mut datapath).await;
    if args.keep_datapath {
        datapath.keep();
        result
    } else {
        let removed = datapath.remove().context("removing the datapath");
        result.and(removed)
    }
}

async fn serve(args: &RunArgs, cgroup: &Path, datapath: &mut Datapath) -> anyhow::Result<()> {
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut sigint = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut source = Source::start(&args.source.config()?, &args.node)
        .context("starting the cluster state source")?;
    let (health_tx, mut health_changed) = mpsc::channel(1);
    let health = args
        .health_checks
        .then(|| HealthChecker::spawn(args.health_config(), health_tx));
    let telemetry = Arc::new(Telemetry::new(pins::node_dir(&args.bpffs, &args.node)));
    telemetry.follow_source(source.status());
    let metrics_server = metrics::bind(args.metrics_addr).await?;
    info!(addr = %metrics_server.local_addr(), "serving metrics");
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_task = tokio::spawn(metrics_server.run(telemetry.clone(), async {
        let _ = metrics_stopped.await;
    }));

    let DatapathMaps {
        services,
        affinity,
        metrics,
        policy,
        events,
        mut config,
        sizes,
    } = datapath.maps()?;
    // Before attaching, and always written: an adopted datapath may still be in audit
    // mode from an agent run with the flag.
    set_audit(&mut config, args.policy_audit)?;
    info!(audit = args.policy_audit, "policy audit mode");
    let view = SharedView::default();
    let flow_log = Arc::new(FlowLog::default());
    let flow_reader = tokio::spawn({
        let (view, flow_log) = (view.clone(), flow_log.clone());
        async move {
            // Flows are for operators: losing them must not stop enforcement.
            if let Err(err) = flows::read_events(events, view, flow_log).await {
                warn!(%err, "reading flow events failed; no more flows are recorded");
            }
        }
    });
    let proxy_feed = ProxyFeed::default();
    let admin_server = admin::bind(&args.run_dir, &args.node)?;
    info!(path = %admin_server.path().display(), "serving the admin API");
    let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
    let admin_task = tokio::spawn(admin_server.run(
        view.clone(),
        flow_log,
        telemetry.clone(),
        proxy_feed.subscribe(),
        async {
            let _ = admin_stopped.await;
        },
    ));

    let maps = ReconcileMaps {
        services,
        affinity,
        metrics,
        policy,
        sizes,
        inbound: InboundLinks::open(&pins::node_dir(&args.bpffs, &args.node))?,
    };
    let mut reconciler = Reconciler::new(
        &args.node,
        cgroup,
        args.trust_domain.clone(),
        maps,
        health,
        Outputs {
            telemetry: telemetry.clone(),
            view,
            proxy: proxy_feed,
        },
    )?;
    // The revision of a state whose apply failed and is being retried.
    let mut pending = None;
    // Program the maps before attaching, so the first call already sees the table.
    let mut outcome = match tokio::time::timeout(FIRST_STATE, source.next()).await {
        Ok(Some(update)) => apply(&mut reconciler, &source, update, &mut pending),
        Ok(None) => anyhow::bail!("the cluster state source ended"),
        Err(_) => {
            warn!(
                waited = ?FIRST_STATE,
                "no cluster state yet; attaching with the maps as they are"
            );
            Outcome::Rejected
        }
    };
    datapath.attach(cgroup, args.sockmap)?;
    telemetry.attached();
    info!(node = %args.node, cgroup = %cgroup.display(), "datapath ready");

    let mut rediscover = tokio::time::interval(REDISCOVER);
    rediscover.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = sigterm.recv() => { info!("SIGTERM: shutting down"); break; }
            _ = sigint.recv() => { info!("SIGINT: shutting down"); break; }
            update = source.next() => match update {
                Some(update) => outcome = apply(&mut reconciler, &source, update, &mut pending),
                None => anyhow::bail!("the cluster state source ended"),
            },
            Some(()) = health_changed.recv() => outcome = reconciler.replan(),
            _ = rediscover.tick() => {
                if let Some(o) = reconciler.rediscover() {
                    outcome = o;
                }
            }
            () = tokio::time::sleep(RETRY), if outcome == Outcome::Failed => {
                outcome = reconciler.replan();
                if outcome == Outcome::Applied
                    && let Some(revision) = pending.take()
                {
                    source.applied(revision);
                }
            }
        }
    }
    source.stop().await;
    let _ = stop_metrics.send(());
    let _ = stop_admin.send(());
    flow_reader.abort();
    metrics_task.await.context("metrics server task")??;
    admin_task.await.context("admin server task")??;
    Ok(())
}

/// Applies a state from the source; tells the source which revision is in force, or
/// keeps it `pending` while a failed write is retried.
fn apply(
    reconciler: &mut Reconciler,
    source: &Source,
    update: Update,
    pending: &mut Option<u64>,
) -> Outcome {
    let outcome = reconciler.reload(update.state);
    *pending = None;
    match outcome {
        Outcome::Applied => source.applied(update.revision),
        Outcome::Failed => *pending = Some(update.revision),
        Outcome::Rejected => {}
    }
    outcome
}

/// Switches policy audit mode (CONFIG[POLICY_AUDIT]) on or off.
fn set_audit(config_map: &mut Array<MapData, u32>, audit: bool) -> Result<(), DatapathError> {
    config_map
        .set(config::POLICY_AUDIT, u32::from(audit), 0)
        .map_err(|e| DatapathError::Map {
            name: mesh_common::maps::CONFIG,
            source: Box::new(e),
        })
}
