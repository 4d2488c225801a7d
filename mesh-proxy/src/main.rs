//! `mesh-proxy`: the node proxy binary. Follows the agent's configuration feed, keeps
//! listeners in every local pod, serves metrics, and drains on SIGTERM.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context as _;
use clap::Parser as _;
use mesh_common::l7::ProxyConfig;
use mesh_proxy::{
    cli::Args,
    feed,
    flowreport::FlowReporter,
    forward::{MAX_MIRRORS, Proxy, Snapshot},
    hbone::outbound::Tunnels,
    identities::Identities,
    listeners::Listeners,
    mesh::Mesh,
    metrics::{self, ProxyMetrics},
    server::{Drain, Limits},
    upstream::Settings,
};
use tokio::{
    net::{TcpListener, TcpSocket},
    signal::unix::{SignalKind, signal},
    sync::{Semaphore, watch},
};

/// mimalloc: under load, allocation took ~9% of the proxy's CPU with glibc's malloc
/// and ~2.5% with mimalloc (per-request headers, bodies, tasks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Logs go to stderr, as the agent's (where the test bed collects them).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&args.log)
                .with_context(|| format!("--log {:?}", args.log))?,
        )
        // Logs go to stderr, as the agent's: stdout is no log (journald takes both).
        .with_writer(std::io::stderr)
        .init();
    // One worker: the current-thread runtime, where a request's tasks (client
    // connection, backend connection) wake each other without crossing threads.
    let workers = args.workers();
    let mut builder = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers);
        b
    };
    let runtime = builder
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    tracing::info!(workers, "runtime started");
    runtime.block_on(run(args))
}

/// How long a starting proxy waits for the agent's first configuration before it binds
/// the metrics address anyway (no agent: nothing to serve yet, but metrics to show).
const FIRST_CONFIG_WAIT: Duration = Duration::from_secs(5);

/// Takeover without resets: the successor applies its first configuration (every pod's
/// listener open, sharing the port with the predecessor's through SO_REUSEPORT) BEFORE it
/// binds the metrics address, so "the successor listens on the metrics address" means it
/// serves; only then may the predecessor get SIGTERM. On SIGTERM the listeners close first
/// (queued connections migrate to the successor: `tcp_migrate_req`), then the
/// connections in flight drain (HTTP/1.1 `Connection: close`, HTTP/2 GOAWAY) for up to
/// `--drain-timeout`, then the process exits.
async fn run(args: Args) -> anyhow::Result<()> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let metrics = Arc::new(ProxyMetrics::new());

    let (config_tx, mut config_rx) = watch::channel(None);
    let socket = args.agent_socket();
    tracing::info!(node = %args.node, agent = %socket.display(), "following the agent's configuration");
    let feed = tokio::spawn(feed::run(socket, config_tx));

    let settings = Settings {
        connect_timeout: args.connect_timeout,
        idle_timeout: args.idle_timeout,
    };
    let limits = Limits {
        max_header_bytes: args.max_header_bytes,
        header_read_timeout: args.header_read_timeout,
        max_concurrent_streams: args.max_concurrent_streams,
        idle_timeout: args.idle_timeout,
    };
    let mesh = match &args.ca_dir {
        Some(dir) => {
            let identities = Identities::load(dir, args.svid_ttl)
                .with_context(|| format!("--ca-dir {}", dir.display()))?;
            let node_dir = args.bpffs.join("mesh").join(&args.node);
            Some(Arc::new(Mesh::new(
                Arc::new(identities),
                Tunnels::new(args.connect_timeout),
                FlowReporter::start(args.agent_socket()),
                node_dir,
            )))
        }
        None => None,
    };
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::empty()));
    let proxy = Arc::new(Proxy {
        snapshot: snapshot_rx,
        metrics: Arc::clone(&metrics),
        mirrors: Arc::new(Semaphore::new(MAX_MIRRORS)),
        mesh: mesh.clone(),
    });
    let certs_file = args.certs_file();
    let drain = Arc::new(Drain::new());
    let mut listeners = Listeners::new(proxy, limits, Arc::clone(&drain));
    let mut sweep = tokio::time::interval((args.idle_timeout / 2).max(Duration::from_secs(1)));
    let mut apply = async |config: Option<Arc<ProxyConfig>>| {
        let Some(config) = config else { return };
        if config.node != args.node {
            tracing::warn!(config_node = %config.node, node = %args.node, "configuration is for another node; ignored");
            return;
        }
        let prev = snapshot_tx.borrow().clone();
        let snapshot = Snapshot::build(Arc::clone(&config), Some(&prev), settings);
        if config.policy_epoch != prev.config.policy_epoch {
            // Pooled connections were judged by the old policy.
            for t in snapshot.targets.values() {
                t.pool.flush();
            }
        }
        snapshot_tx.send_replace(Arc::new(snapshot));
        if let Some(mesh) = &mesh {
            // Before the listeners: enrolled pods need their SVIDs to listen for HBONE.
            mesh.update(&config);
            publish_certs(&mesh.identities, &certs_file);
        }
        metrics.set_config_version(config.version);
        listeners.reconcile(&config).await;
        tracing::info!(
            version = config.version,
            pods = config.pods.len(),
            frontends = config.frontends.len(),
            "configuration applied"
        );
    };

    if let Ok(Ok(())) = tokio::time::timeout(FIRST_CONFIG_WAIT, config_rx.changed()).await {
        let config = config_rx.borrow_and_update().clone();
        apply(config).await;
    } else {
        tracing::warn!(wait = ?FIRST_CONFIG_WAIT, "no configuration from the agent yet; serving metrics meanwhile");
    }
    let metrics_listener = bind_shared(args.metrics_addr)
        .with_context(|| format!("binding the metrics address {}", args.metrics_addr))?;
    let (stop_metrics, metrics_stopped) = tokio::sync::oneshot::channel::<()>();
    let metrics_server = tokio::spawn(metrics::serve(
        metrics_listener,
        Arc::clone(&metrics),
        async {
            let _ = metrics_stopped.await;
        },
    ));

    let mut rotate_in = Duration::from_secs(1);
    loop {
        tokio::select! {
            changed = config_rx.changed() => {
                if changed.is_err() {
                    break;
                }
                let config = config_rx.borrow_and_update().clone();
                apply(config).await;
            }
            _ = sweep.tick() => {
                for t in snapshot_tx.borrow().targets.values() {
                    t.pool.sweep();
                }
                if let Some(mesh) = &mesh {
                    mesh.tunnels.sweep();
                }
            }
            () = tokio::time::sleep(rotate_in), if mesh.is_some() => {
                if let Some(mesh) = &mesh {
                    rotate_in = mesh.identities.rotate();
                    publish_certs(&mesh.identities, &certs_file);
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
        }
    }

    tracing::info!(drain_timeout = ?args.drain_timeout, "shutting down: no new connections, draining");
    feed.abort();
    listeners.close_all().await;
    drop(listeners);
    match Arc::try_unwrap(drain) {
        Ok(g) => {
            if tokio::time::timeout(args.drain_timeout, g.shutdown())
                .await
                .is_err()
            {
                tracing::warn!("drain timeout reached; closing the remaining connections");
            }
        }
        Err(_) => tracing::warn!("listeners still referenced; not draining"),
    }
    let _ = stop_metrics.send(());
    let _ = metrics_server.await;
    Ok(())
}

/// Lists the SVIDs for `mesh-agent certs`; a failure is logged (the mesh works on).
fn publish_certs(identities: &Identities, path: &std::path::Path) {
    if let Err(e) = identities.publish(path) {
        tracing::warn!(path = %path.display(), error = %e, "cannot write the certificate list");
    }
}

/// A listener on `addr` with SO_REUSEPORT (and SO_REUSEADDR), so that a successor can
/// bind the metrics address while its predecessor still serves it.
fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}
