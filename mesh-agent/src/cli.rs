//! Command line: `run`, `validate`, `services`, `observe`, `policy`, `routes`,
//! `uninstall`, `ca`, and against etcd `apply`, `delete`, `get`, `nodes`.

use std::{
    collections::BTreeMap, net::SocketAddr, path::PathBuf, process::ExitCode, time::Duration,
};

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use mesh_common::maps::{MapSpec, REGISTRY, Sizing};

use crate::{
    admin::{self, FlowQuery, client},
    app, ca, certs,
    datapath::{
        self,
        sizes::{self, MapSizes},
    },
    etcdctl::{self, Store},
    health::HealthConfig,
    metrics::SnapshotSource as _,
    plan::routes::{self, RouteStatus},
    report::{FlowFilter, Verdict},
    source::{
        SourceConfig,
        etcd::{EtcdConfig, layout::Layout},
    },
    state::{self, Kind},
    status,
    telemetry::Telemetry,
};

/// Default bpffs mount point (mounted by the agent when missing, as Cilium does).
pub const DEFAULT_BPFFS: &str = "/sys/fs/bpf";

/// Node agent of the kernel-native service mesh.
#[derive(Debug, Parser)]
#[command(name = "mesh-agent", version, about)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the datapath, program it from the state, follow state changes.
    // Boxed: the run flags outweigh every other command's.
    Run(Box<RunArgs>),
    /// Check a state file or directory; print every problem and exit non-zero if any.
    /// Also plans the datapath (Services, and NetworkPolicy for `--node`), so a state
    /// that does not fit the default map sizes is reported too.
    Validate {
        /// State file (multi-document YAML) or directory of them.
        path: PathBuf,
        /// Plan network policy as the agent of this node would (its pods are the
        /// subjects); without it, only identities and addresses are planned.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// The capacities to check the plan against, as `run` would create the maps.
        #[command(flatten)]
        map_sizes: MapSizeArgs,
    },
    /// Print the load-balancing table the kernel holds (read from the pinned maps).
    Services {
        /// Node whose datapath to read; may be omitted when exactly one is pinned.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// bpffs mount point.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print a node's datapath status from its pins: attached programs, same-node
    /// socket redirection (sockets, redirected messages and bytes), policy verdicts and
    /// map fill levels.
    Status {
        /// Node whose datapath to read; may be omitted when exactly one is pinned.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// bpffs mount point.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
        /// Directory of the agents' admin sockets: the cluster state source and the
        /// planner's cost are shown when the node's agent answers there.
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Print the policy verdicts (drops, audits) the kernel reported, as Hubble does.
    Observe {
        /// Node whose agent to ask; may be omitted when one agent runs on this host.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// Keep printing new flows until interrupted.
        #[arg(long, short)]
        follow: bool,
        /// One JSON object per line instead of text.
        #[arg(long)]
        json: bool,
        /// Only flows with this verdict.
        #[arg(long, value_enum)]
        verdict: Option<VerdictArg>,
        /// Only flows from or to this pod.
        #[arg(long, value_name = "NAMESPACE/NAME", value_parser = pod_name)]
        pod: Option<String>,
        /// Directory of the agents' admin sockets (`<run-dir>/<node>/agent.sock`).
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Show the policies selecting a pod and the POLICY entries the kernel holds for it
    /// (every local pod when --pod is omitted).
    Policy {
        /// Node whose agent to ask; may be omitted when one agent runs on this host.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// The pod.
        #[arg(long, value_name = "NAMESPACE/NAME", value_parser = pod_name)]
        pod: Option<String>,
        /// Directory of the agents' admin sockets.
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// bpffs mount point (the POLICY map is read from the node's pins).
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
    /// Print the configuration the agent streams to the node proxy (pretty JSON); waits
    /// until the agent has applied a state.
    ProxyConfig {
        /// Node whose agent to ask; may be omitted when one agent runs on this host.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// Directory of the agents' admin sockets.
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Show each HTTPRoute's status towards each parent Service (Accepted, ResolvedRefs),
    /// as the running agent applied it, or compiled from state files with --state.
    Routes {
        /// Node whose agent to ask; may be omitted when one agent runs on this host.
        #[arg(long, value_parser = node_name, conflicts_with = "state")]
        node: Option<String>,
        /// Only the parentRefs naming this Service.
        #[arg(long, value_name = "NAMESPACE/NAME", value_parser = pod_name)]
        service: Option<String>,
        /// JSON (a list of route statuses) instead of text.
        #[arg(long)]
        json: bool,
        /// Directory of the agents' admin sockets.
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
        /// Compile the routes of this state file or directory instead of asking an
        /// agent (offline).
        #[arg(long)]
        state: Option<PathBuf>,
    },
    /// The workload certificates (SVIDs) the node's proxy issued: identity, serial,
    /// validity, chain (read from `<run-dir>/<node>/certs.json`; never keys).
    Certs {
        /// Node whose certificates to show; may be omitted when one agent runs on this
        /// host.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Directory of the agents' and proxies' run files.
        #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
        run_dir: PathBuf,
    },
    /// Certificate authorities of the mesh's mTLS: the root, and each node's intermediate.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Validate the objects of a file or directory alone and together with those in
    /// etcd, then write them to etcd in one transaction (all or nothing).
    Apply {
        /// State file (multi-document YAML) or directory of them.
        #[arg(short = 'f', long = "filename")]
        file: PathBuf,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Delete one object from etcd.
    Delete {
        /// Its kind (`Service`, `services`, `svc`, ...).
        #[arg(value_parser = kind)]
        kind: Kind,
        /// NAMESPACE/NAME (NAME for Namespaces).
        name: String,
        #[command(flatten)]
        wait: WaitArgs,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Show the objects of a kind in etcd, or one object's JSON.
    Get {
        /// The kind (`Service`, `services`, `svc`, ...).
        #[arg(value_parser = kind)]
        kind: Kind,
        /// NAMESPACE/NAME (NAME for Namespaces): print this object.
        name: Option<String>,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// The live nodes registered in etcd and the revision each has applied.
    Nodes {
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Detach and unpin the datapath of a node (every node when --node is omitted),
    /// e.g. one left behind with --keep-datapath.
    Uninstall {
        /// Node whose datapath to remove.
        #[arg(long, value_parser = node_name)]
        node: Option<String>,
        /// bpffs mount point.
        #[arg(long, default_value = DEFAULT_BPFFS)]
        bpffs: PathBuf,
    },
}

/// `mesh-agent ca` subcommands.
#[derive(Debug, Subcommand)]
enum CaCommand {
    /// Create the mesh's root CA (ECDSA P-256, 10 years), or import the operator's, into
    /// DIR (`root-cert.pem`, `root-key.pem` mode 0600); print its SHA-256 fingerprint and
    /// expiry. Keep DIR offline: it only serves `ca node`.
    Init {
        /// Directory of the root (created mode 0700 when missing).
        #[arg(long)]
        dir: PathBuf,
        /// SPIFFE trust domain of the generated root.
        #[arg(long, default_value = ca::DEFAULT_TRUST_DOMAIN, conflicts_with = "root_cert")]
        trust_domain: String,
        /// Import this root certificate (PEM, a CA) instead of generating one.
        #[arg(long, requires = "root_key")]
        root_cert: Option<PathBuf>,
        /// The imported root's private key (unencrypted PKCS#8 PEM).
        #[arg(long, requires = "root_cert")]
        root_key: Option<PathBuf>,
        /// Replace a root already in DIR (every node CA it signed stops being trusted).
        #[arg(long)]
        force: bool,
    },
    /// Issue the intermediate CA of one node with the root of DIR, into OUT in Istio's
    /// `cacerts` layout (`ca-cert.pem`, `ca-key.pem` mode 0600, `cert-chain.pem`,
    /// `root-cert.pem`), replacing a previous one.
    Node {
        /// Directory of the root (`ca init --dir`).
        #[arg(long)]
        dir: PathBuf,
        /// The node's name.
        #[arg(long, value_parser = node_name)]
        node: String,
        /// Output directory (created mode 0700 when missing).
        #[arg(long)]
        out: PathBuf,
        /// Lifetime (GEP-2257 duration: 8760h, 720h, 90m), cut at the root's expiry.
        #[arg(long, default_value = "8760h", value_parser = ca_ttl)]
        ttl: Duration,
    },
}

/// A CA lifetime: a non-zero GEP-2257 duration, as HTTPRoute timeouts are written.
fn ca_ttl(value: &str) -> Result<Duration, String> {
    match state::httproute::parse_duration(value)? {
        0 => Err(format!("{value:?}: a CA needs a lifetime above zero")),
        ms => Ok(Duration::from_millis(ms)),
    }
}

/// Arguments of `mesh-agent run`.
#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// This node's name (pins live under `<bpffs>/mesh/<node>/`).
    #[arg(long, value_parser = node_name)]
    pub node: String,
    /// Where the cluster state comes from.
    #[command(flatten)]
    pub source: SourceArgs,
    /// cgroup2 directory to attach to [default: the cgroup2 root from /proc/self/mounts].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs mount point; mounted when missing.
    #[arg(long, default_value = DEFAULT_BPFFS)]
    pub bpffs: PathBuf,
    /// On exit, leave programs attached and maps pinned: traffic keeps flowing with the
    /// last applied state, and the next agent adopts the datapath without a gap.
    #[arg(long)]
    pub keep_datapath: bool,
    /// Remove this node's datapath (as `mesh-agent uninstall --node`) and exit.
    #[arg(long)]
    pub cleanup: bool,
    /// Address of the Prometheus endpoint (/metrics, /healthz).
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// Policy audit mode: report what policy would deny (verdict AUDIT) but let it pass.
    /// Without the flag, audit mode is switched off, also in an adopted datapath.
    #[arg(long)]
    pub policy_audit: bool,
    /// Directory of the admin socket (`<run-dir>/<node>/agent.sock`, directory mode
    /// 0700), which serves flows and policy to `mesh-agent observe` and `policy`.
    #[arg(long, default_value = admin::DEFAULT_RUN_DIR)]
    pub run_dir: PathBuf,
    /// Same-node socket redirection with sockmap: established TCP connections whose
    /// both ends are on this node hand data socket to socket, bypassing the TCP/IP
    /// stack. Off by default: on the kernels we know (up to 6.18), a *blocking* read on
    /// a redirected socket can return EAGAIN when the socket gets a wakeup that brings
    /// no data (its own FIN acknowledged, a reset); applications on non-blocking
    /// sockets (epoll/poll: Go, Java NIO, Node, Envoy, tokio) retry and are unaffected.
    /// A pod or namespace opts out with the annotation `mesh.io/sockmap: "false"`.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    pub sockmap: bool,
    /// Probe TCP backends and take failing ones out of load balancing.
    #[arg(long)]
    pub health_checks: bool,
    /// Interval between health-check rounds, in milliseconds.
    #[arg(long, default_value_t = 2000, value_parser = clap::value_parser!(u64).range(10..))]
    pub health_interval_ms: u64,
    /// Timeout of one probe, in milliseconds.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(10..))]
    pub health_timeout_ms: u64,
    /// Consecutive failed probes that make a backend unhealthy.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_unhealthy_threshold: u32,
    /// Consecutive successful probes that make it healthy again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub health_healthy_threshold: u32,
    /// SPIFFE trust domain of the mesh's identities [default: MeshConfig `trustDomain`
    /// of the istio-system/istio ConfigMap, else cluster.local].
    #[arg(long, value_parser = trust_domain)]
    pub trust_domain: Option<String>,
    #[command(flatten)]
    pub map_sizes: MapSizeArgs,
}

/// The cluster state source of `run`: exactly one of `--state` (files), `--etcd` and
/// `--kubernetes`/`--kubeconfig`.
#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// State file (multi-document YAML) or directory of them; watched for changes.
    #[arg(
        long,
        required_unless_present_any = ["etcd", "kubernetes", "kubeconfig"],
        conflicts_with_all = ["etcd", "kubernetes", "kubeconfig"]
    )]
    pub state: Option<PathBuf>,
    /// Read the state from etcd instead: member URLs, comma-separated
    /// (`http://10.0.0.1:2379,http://10.0.0.2:2379`; `https://` with --etcd-ca).
    #[arg(long, value_delimiter = ',', value_name = "URL[,URL...]")]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub etcd_options: EtcdOptions,
    /// Read the state from the Kubernetes API server, with the in-cluster configuration
    /// (the pod's ServiceAccount; see deploy/kubernetes).
    #[arg(long, conflicts_with_all = ["etcd", "kubeconfig"])]
    pub kubernetes: bool,
    /// Read the state from the Kubernetes API server named by this kubeconfig file (its
    /// current context).
    #[arg(long, value_name = "PATH", conflicts_with = "etcd")]
    pub kubeconfig: Option<PathBuf>,
}

impl SourceArgs {
    /// The source to start.
    pub fn config(&self) -> anyhow::Result<SourceConfig> {
        use crate::source::kubernetes::Connect;
        match (&self.state, self.kubernetes, &self.kubeconfig) {
            (Some(path), _, _) => Ok(SourceConfig::Files(path.clone())),
            (_, _, Some(path)) => Ok(SourceConfig::Kubernetes(Connect::Kubeconfig(path.clone()))),
            (_, true, None) => Ok(SourceConfig::Kubernetes(Connect::InCluster)),
            (None, false, None) => Ok(SourceConfig::Etcd(self.etcd_options.config(&self.etcd)?)),
        }
    }
}

/// Where the mesh's keys live in etcd, and TLS towards it (for `run --etcd` and the
/// commands that read and write etcd).
#[derive(Debug, clap::Args)]
pub struct EtcdOptions {
    /// Key prefix of the mesh's objects and nodes in etcd.
    #[arg(long, default_value = "/mesh/")]
    pub etcd_prefix: String,
    /// CA certificate (PEM) of the etcd members' certificates.
    #[arg(long)]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate (PEM), for etcd's TLS client authentication.
    #[arg(long, requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// The client certificate's private key (PEM).
    #[arg(long, requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdOptions {
    /// The etcd configuration for `endpoints`.
    pub fn config(&self, endpoints: &[String]) -> anyhow::Result<EtcdConfig> {
        anyhow::ensure!(!endpoints.is_empty(), "no etcd endpoint given (--etcd)");
        Ok(EtcdConfig {
            endpoints: endpoints.to_vec(),
            layout: Layout::new(&self.etcd_prefix)?,
            ca: self.etcd_ca.clone(),
            identity: self.etcd_cert.clone().zip(self.etcd_key.clone()),
        })
    }
}

/// `--wait` of `apply` and `delete`.
#[derive(Debug, clap::Args)]
pub struct WaitArgs {
    /// Return only once every live node has applied the change.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits.
    #[arg(long, default_value = "60s", value_parser = duration)]
    timeout: Duration,
}

/// The etcd cluster of `apply`, `delete`, `get` and `nodes`.
#[derive(Debug, clap::Args)]
pub struct EtcdArgs {
    /// etcd member URLs, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "URL[,URL...]",
        env = "MESH_ETCD_ENDPOINTS",
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd: Vec<String>,
    #[command(flatten)]
    pub options: EtcdOptions,
}

/// A kind, as kubectl spells it (`Service`, `services`, `svc`).
fn kind(name: &str) -> Result<Kind, String> {
    Kind::parse(name).ok_or_else(|| {
        let known: Vec<String> = Kind::ALL.iter().map(ToString::to_string).collect();
        format!("{name:?}: not a kind the mesh uses ({})", known.join(", "))
    })
}

/// A duration such as `60s`, `2m`, `500ms`.
fn duration(value: &str) -> Result<Duration, String> {
    state::httproute::parse_duration(value).map(Duration::from_millis)
}

/// `--trust-domain`: as the SPIFFE ID specification allows.
fn trust_domain(value: &str) -> Result<String, String> {
    state::istio::check_trust_domain(value).map(|()| value.to_owned())
}

impl RunArgs {
    /// Health-check settings from the flags.
    pub fn health_config(&self) -> HealthConfig {
        HealthConfig {
            interval: Duration::from_millis(self.health_interval_ms),
            timeout: Duration::from_millis(self.health_timeout_ms),
            unhealthy_threshold: self.health_unhealthy_threshold,
            healthy_threshold: self.health_healthy_threshold,
        }
    }
}

/// `--map-size-ratio`.
const RATIO_FLAG: &str = "map-size-ratio";

/// Map capacities: `--map-size-ratio` and one `--map-size-*` flag per resizable map of
/// the registry ([`mesh_common::maps::REGISTRY`]). They apply when the maps are created;
/// a datapath adopted from an earlier agent keeps its capacities until `uninstall`.
#[derive(Debug, Clone, PartialEq)]
pub struct MapSizeArgs {
    /// Fraction of the node's memory the maps sized by node memory may take together.
    pub ratio: f64,
    /// Capacities given on the command line, by flag (without its dashes).
    pub explicit: BTreeMap<&'static str, u32>,
}

impl MapSizeArgs {
    /// The capacities to create the maps with on this node. When the node's memory
    /// cannot be read, the maps sized by it get their ceilings.
    pub fn sizes(&self) -> MapSizes {
        let (memory, ratio) = match sizes::node_memory() {
            Ok(memory) => (memory, self.ratio),
            Err(err) => {
                tracing::warn!(%err, "node memory unknown: per-connection maps get their ceilings");
                (0, 0.0)
            }
        };
        let sizes = MapSizes::for_node(memory, ratio, &self.explicit);
        tracing::info!(
            node_memory_mib = memory >> 20,
            ratio,
            per_connection_maps_mib = sizes.per_connection_bytes() >> 20,
            "map sizes chosen"
        );
        sizes
    }
}

/// The `--map-size-*` flags, in registry order, each with the maps it sizes.
fn size_flags() -> Vec<(&'static str, Vec<&'static MapSpec>)> {
    let mut flags: Vec<(&'static str, Vec<&'static MapSpec>)> = Vec::new();
    for spec in &REGISTRY {
        let Some(flag) = spec.sizing.flag() else {
            continue;
        };
        match flags.iter_mut().find(|(f, _)| *f == flag) {
            Some((_, specs)) => specs.push(spec),
            None => flags.push((flag, vec![spec])),
        }
    }
    flags
}

/// `--help` of one `--map-size-*` flag: the maps, what an entry is, the default.
fn size_flag_help(specs: &[&MapSpec]) -> String {
    let names: Vec<&str> = specs.iter().map(|s| s.name).collect();
    let Some(spec) = specs.first() else {
        return String::new();
    };
    let default = match spec.sizing {
        Sizing::NodeMemory { min, .. } => {
            format!("from --{RATIO_FLAG}, {min} to {}", spec.capacity)
        }
        Sizing::Fixed | Sizing::Flag(_) => spec.capacity.to_string(),
    };
    format!(
        "{}: {} [default: {default}]",
        names.join(", "),
        spec.purpose
    )
}

fn ratio(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(r) if (0.0..=1.0).contains(&r) => Ok(r),
        _ => Err(format!("{value:?}: use a fraction from 0 to 1")),
    }
}

impl clap::FromArgMatches for MapSizeArgs {
    fn from_arg_matches(matches: &clap::ArgMatches) -> Result<Self, clap::Error> {
        let mut args = Self {
            ratio: sizes::DEFAULT_RATIO,
            explicit: BTreeMap::new(),
        };
        args.update_from_arg_matches(matches)?;
        Ok(args)
    }

    fn update_from_arg_matches(&mut self, matches: &clap::ArgMatches) -> Result<(), clap::Error> {
        if let Some(&ratio) = matches.get_one::<f64>(RATIO_FLAG) {
            self.ratio = ratio;
        }
        for (flag, _) in size_flags() {
            if let Some(&entries) = matches.get_one::<u32>(flag) {
                self.explicit.insert(flag, entries);
            }
        }
        Ok(())
    }
}

impl clap::Args for MapSizeArgs {
    fn augment_args(cmd: clap::Command) -> clap::Command {
        const HEADING: &str = "Map sizes";
        let ratio = clap::Arg::new(RATIO_FLAG)
            .long(RATIO_FLAG)
            .value_name("FRACTION")
            .value_parser(ratio)
            .help_heading(HEADING)
            .help(format!(
                "Fraction of the node's memory the per-connection maps may take [default: {}]",
                sizes::DEFAULT_RATIO
            ))
            .long_help(format!(
                "Fraction of the node's memory (MemTotal) the per-connection maps \
                 (AFFINITY, REV_NAT, UDP_PEERS, SOCK_PATHS: LRU maps, which the kernel \
                 preallocates whole; SOCKS, sized with SOCK_PATHS) may take together, as \
                 Cilium's bpf-map-dynamic-size-ratio; each gets a share in proportion to \
                 its ceiling, between its floor and that ceiling (see their flags); 0 \
                 gives them their ceilings. The maps \
                 filled from the cluster state are not preallocated: they cost their hash \
                 buckets (about 12 MiB at the default capacities) and then grow with the \
                 Services, backends, pods and policies. Default footprint of an empty \
                 node: 62 MiB with 24 GiB of memory (the per-connection maps at their \
                 ceilings), 21 MiB with 4 GiB, 15 MiB with 1 GiB or less (at their \
                 floors); 10,000 Services of 10 backends add about 17 MiB. \
                 `mesh-agent status` shows every map's capacity and memory [default: {}]",
                sizes::DEFAULT_RATIO
            ));
        size_flags()
            .into_iter()
            .fold(cmd.arg(ratio), |cmd, (flag, specs)| {
                cmd.arg(
                    clap::Arg::new(flag)
                        .long(flag)
                        .value_name("ENTRIES")
                        .value_parser(clap::value_parser!(u32).range(1..))
                        .help_heading(HEADING)
                        .help(size_flag_help(&specs)),
                )
            })
    }

    fn augment_args_for_update(cmd: clap::Command) -> clap::Command {
        Self::augment_args(cmd)
    }
}

/// `--verdict` values.
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum VerdictArg {
    /// Denied flows.
    Dropped,
    /// Flows audit mode let pass.
    Audit,
}

/// `NAMESPACE/NAME`, both parts non-empty.
fn pod_name(name: &str) -> Result<String, String> {
    match name.split_once('/') {
        Some((ns, pod)) if !ns.is_empty() && !pod.is_empty() && !pod.contains('/') => {
            Ok(name.to_owned())
        }
        _ => Err(format!("{name:?}: use NAMESPACE/NAME")),
    }
}

/// A node name usable as a bpffs directory: bpffs refuses names containing '.', so
/// only letters, digits, '-' and '_' are allowed (at most 64).
fn node_name(name: &str) -> Result<String, String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if valid {
        Ok(name.to_owned())
    } else {
        Err(format!(
            "{name:?}: use 1-64 letters, digits, '-' or '_' (bpffs refuses '.' in pin names)"
        ))
    }
}

impl Cli {
    /// Runs the chosen command.
    pub fn run(self) -> anyhow::Result<ExitCode> {
        match self.command {
            Command::Run(args) => {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .context("starting the async runtime")?;
                rt.block_on(app::run(*args))?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Validate {
                path,
                node,
                map_sizes,
            } => Ok(validate(
                &path,
                node.as_deref().unwrap_or_default(),
                &map_sizes.sizes(),
            )),
            Command::Services { node, bpffs } => {
                let node = match node {
                    Some(node) => node,
                    None => datapath::pins::only_node(&bpffs)?,
                };
                let table =
                    datapath::inspect::read_services(&datapath::pins::node_dir(&bpffs, &node))
                        .with_context(|| format!("reading the datapath of node {node}"))?;
                print!("{table}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Status {
                node,
                bpffs,
                run_dir,
            } => {
                let node = match node {
                    Some(node) => node,
                    None => datapath::pins::only_node(&bpffs)?,
                };
                let node_dir = datapath::pins::node_dir(&bpffs, &node);
                anyhow::ensure!(
                    node_dir.is_dir(),
                    "no datapath of node {node} is pinned under {}",
                    node_dir.display()
                );
                let mut snapshot = Telemetry::new(node_dir).snapshot();
                // The datapath is read from pins with or without an agent; the source
                // only a running agent knows.
                snapshot.agent = client::agent_socket(&run_dir, Some(&node))
                    .ok()
                    .and_then(|(_, socket)| client::agent_status(&socket).ok());
                print!("{}", status::render(&node, &snapshot));
                Ok(ExitCode::SUCCESS)
            }
            Command::Observe {
                node,
                follow,
                json,
                verdict,
                pod,
                run_dir,
            } => {
                let (_, socket) = client::agent_socket(&run_dir, node.as_deref())?;
                let verdict = verdict.map(|v| match v {
                    VerdictArg::Dropped => Verdict::Dropped,
                    VerdictArg::Audit => Verdict::Audit,
                });
                let query = FlowQuery {
                    follow,
                    filter: FlowFilter { verdict, pod },
                };
                client::observe(&socket, &query, json)?;
                Ok(ExitCode::SUCCESS)
            }
            Command::Policy {
                node,
                pod,
                run_dir,
                bpffs,
            } => {
                let (node, socket) = client::agent_socket(&run_dir, node.as_deref())?;
                let report = client::policy_report(&socket)?;
                let pods: Vec<String> = match pod {
                    Some(pod) => vec![pod],
                    None => report.local_pods.iter().map(|p| p.pod.clone()).collect(),
                };
                let node_dir = datapath::pins::node_dir(&bpffs, &node);
                let split = report.ipblock_split;
                if split.identities > 0 {
                    println!(
                        "ipBlocks over pod or node addresses: {} identities split off, {} POLICY entries name them",
                        split.identities, split.entries
                    );
                }
                for pod in pods {
                    let Some(local) = report.local_pods.iter().find(|p| p.pod == pod) else {
                        let known = report
                            .local_pods
                            .iter()
                            .map(|p| p.pod.as_str())
                            .collect::<Vec<_>>()
                            .join(", ");
                        return Err(client::ClientError::UnknownPod { pod, node, known }.into());
                    };
                    let entries = client::kernel_policy(&node_dir, local.identity)?;
                    print!("{}", client::render_pod_policy(&report, &pod, &entries));
                }
                Ok(ExitCode::SUCCESS)
            }
            Command::ProxyConfig { node, run_dir } => {
                let (_, socket) = client::agent_socket(&run_dir, node.as_deref())?;
                let config = client::proxy_config(&socket)?;
                println!(
                    "{}",
                    serde_json::to_string_pretty(&config).context("printing the configuration")?
                );
                Ok(ExitCode::SUCCESS)
            }
            Command::Routes {
                node,
                service,
                json,
                run_dir,
                state,
            } => {
                let statuses = match state {
                    Some(path) => {
                        let state = state::load(&path)
                            .with_context(|| format!("loading the state {}", path.display()))?;
                        routes::compile(&state).statuses
                    }
                    None => {
                        let (_, socket) = client::agent_socket(&run_dir, node.as_deref())?;
                        client::route_statuses(&socket)?
                    }
                };
                let statuses = routes_of_service(statuses, service.as_deref());
                let text = if json {
                    serde_json::to_string_pretty(&statuses)? + "\n"
                } else {
                    render_routes(&statuses, service.as_deref())
                };
                // A closed stdout (`routes --json | head`) ends the command quietly.
                let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), text.as_bytes());
                Ok(ExitCode::SUCCESS)
            }
            Command::Certs {
                node,
                json,
                run_dir,
            } => {
                let node = match node {
                    Some(node) => node,
                    None => client::agent_socket(&run_dir, None)?.0,
                };
                let list = certs::read(&run_dir, &node)?;
                let text = if json {
                    serde_json::to_string_pretty(&list)? + "\n"
                } else {
                    certs::render(&node, &list)
                };
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Ca { command } => {
                let text = match command {
                    CaCommand::Init {
                        dir,
                        trust_domain,
                        root_cert,
                        root_key,
                        force,
                    } => {
                        let source = match (&root_cert, &root_key) {
                            (Some(cert), Some(key)) => ca::RootSource::Import { cert, key },
                            _ => ca::RootSource::Generate {
                                trust_domain: &trust_domain,
                            },
                        };
                        ca::init(&dir, &source, force)?
                    }
                    CaCommand::Node {
                        dir,
                        node,
                        out,
                        ttl,
                    } => ca::node(&dir, &node, &out, ttl)?,
                };
                print!("{text}");
                Ok(ExitCode::SUCCESS)
            }
            Command::Apply { file, wait, etcd } => etcd_command(&etcd, async |store| {
                let applied = store.apply(&file).await?;
                for line in &applied.lines {
                    println!("{line}");
                }
                println!("revision {}", applied.revision);
                wait_for_nodes(store, applied.revision, &wait).await
            }),
            Command::Delete {
                kind,
                name,
                wait,
                etcd,
            } => {
                let key = etcdctl::object_key(kind, &name)?;
                etcd_command(&etcd, async |store| {
                    let revision = store.delete(kind, &key).await?;
                    println!("{kind} {name} deleted\nrevision {revision}");
                    wait_for_nodes(store, revision, &wait).await
                })
            }
            Command::Get { kind, name, etcd } => {
                let key = name
                    .as_deref()
                    .map(|n| etcdctl::object_key(kind, n))
                    .transpose()?;
                etcd_command(&etcd, async |store| {
                    print!("{}", store.get(kind, key.as_ref()).await?);
                    Ok(())
                })
            }
            Command::Nodes { etcd } => etcd_command(&etcd, async |store| {
                let (nodes, revision) = store.nodes().await?;
                print!("{}", etcdctl::render_nodes(&nodes, revision));
                Ok(())
            }),
            Command::Uninstall { node, bpffs } => {
                let nodes = match node {
                    Some(node) => vec![node],
                    None => datapath::pins::nodes(&bpffs)?,
                };
                for node in nodes {
                    datapath::loader::uninstall_node(&datapath::pins::node_dir(&bpffs, &node))
                        .with_context(|| format!("removing the datapath of node {node}"))?;
                    println!("removed the datapath of node {node}");
                }
                Ok(ExitCode::SUCCESS)
            }
        }
    }
}

/// Runs `command` against the etcd cluster of `args`.
fn etcd_command(
    args: &EtcdArgs,
    command: impl AsyncFn(&mut Store) -> anyhow::Result<()>,
) -> anyhow::Result<ExitCode> {
    let config = args.options.config(&args.etcd)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async {
        // A member lost or a leader changing fails a request for a moment: the whole
        // command is tried again on another member (every command may be repeated:
        // `apply` writes only what differs, guarded by the revisions it read).
        let deadline = std::time::Instant::now() + ETCD_RETRY_FOR;
        let mut attempt = 0;
        loop {
            let result = async {
                let mut store = Store::connect(&config, attempt).await?;
                command(&mut store).await
            }
            .await;
            match result {
                Err(err) if etcdctl::transient(&err) && std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %format!("{err:#}"), "etcd unavailable; trying again");
                    attempt += 1;
                    tokio::time::sleep(ETCD_RETRY_PAUSE).await;
                }
                other => return other,
            }
        }
    })?;
    Ok(ExitCode::SUCCESS)
}

/// How long commands against etcd retry while members are unavailable.
const ETCD_RETRY_FOR: Duration = Duration::from_secs(15);
const ETCD_RETRY_PAUSE: Duration = Duration::from_millis(300);

/// With `--wait`: returns once every live node has applied `revision`, and says which.
async fn wait_for_nodes(store: &mut Store, revision: i64, wait: &WaitArgs) -> anyhow::Result<()> {
    if !wait.wait {
        return Ok(());
    }
    let nodes = store.wait(revision, wait.timeout).await?;
    if nodes.is_empty() {
        println!("no live nodes to wait for");
    } else {
        println!("applied on {} nodes: {}", nodes.len(), nodes.join(", "));
    }
    Ok(())
}

/// The statuses with only the parents naming Service `service` (`NAMESPACE/NAME`), and
/// only the routes left with one; all of them when `service` is `None`.
fn routes_of_service(statuses: Vec<RouteStatus>, service: Option<&str>) -> Vec<RouteStatus> {
    let Some(service) = service else {
        return statuses;
    };
    statuses
        .into_iter()
        .filter_map(|mut status| {
            status.parents.retain(|p| {
                p.kind == "Service"
                    && format!("{}/{}", p.service.namespace, p.service.name) == service
            });
            (!status.parents.is_empty()).then_some(status)
        })
        .collect()
}

/// `mesh-agent routes` as text: each route, each parent, its two conditions.
fn render_routes(statuses: &[RouteStatus], service: Option<&str>) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    if statuses.is_empty() {
        let _ = match service {
            Some(service) => writeln!(out, "no HTTPRoute names Service {service} as parent"),
            None => writeln!(out, "no HTTPRoutes"),
        };
        return out;
    }
    for status in statuses {
        let _ = writeln!(
            out,
            "HTTPRoute {}/{}",
            status.route.namespace, status.route.name
        );
        if status.parents.is_empty() {
            let _ = writeln!(out, "  no parentRefs: attached to nothing");
        }
        for p in &status.parents {
            let port = p.port.map(|p| format!(" port {p}")).unwrap_or_default();
            let _ = writeln!(
                out,
                "  parent {} {}/{}{port}",
                p.kind, p.service.namespace, p.service.name
            );
            for (name, c) in [
                ("Accepted", &p.accepted),
                ("ResolvedRefs", &p.resolved_refs),
            ] {
                let _ = writeln!(
                    out,
                    "    {name:<13} {:<6} {:<17} {}",
                    if c.status { "True" } else { "False" },
                    c.reason,
                    c.message
                );
            }
        }
    }
    out
}

/// Planning context for `validate`: default capacities, no node preference, all healthy.
/// `validate`: load, check, and plan as node `node` would with maps of `sizes`.
fn validate(path: &std::path::Path, node: &str, sizes: &MapSizes) -> ExitCode {
    let state = match state::load(path) {
        Ok(state) => state,
        Err(err) => {
            eprintln!("{err}");
            return ExitCode::FAILURE;
        }
    };
    let all_healthy = std::collections::BTreeSet::new();
    let routes = crate::plan::routes::compile(&state);
    let ctx = crate::plan::PlanContext {
        node,
        unhealthy: &all_healthy,
        capacities: sizes.capacities(),
        l7_ports: &routes.l7_ports,
    };
    let services = crate::plan::plan(&state, &crate::plan::Ids::default(), &ctx);
    let no_netns = std::collections::BTreeMap::new();
    let policy_ctx = crate::plan::policy::PolicyContext {
        node,
        local_netns: &no_netns,
        node_addrs: &[],
        capacities: sizes.policy_capacities(),
    };
    let prev = crate::plan::policy::IdentityIds::default();
    let policy = crate::plan::policy::plan_policy(&state, &prev, &policy_ctx);
    match (services, policy) {
        (Ok((plan, _)), Ok((policy, _))) => {
            println!(
                "{}: valid ({} frontends, {} backends; {} identities, {} policy entries{}; {} selector candidates checked)",
                path.display(),
                plan.frontends.len(),
                plan.backends.len(),
                policy.identities.len(),
                policy.policy.len(),
                if node.is_empty() { "" } else { " on this node" },
                plan.cost.selector_candidates + policy.cost.selector_candidates,
            );
            ExitCode::SUCCESS
        }
        (Err(err), _) | (_, Err(err)) => {
            eprintln!("{}: {err}", path.display());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{
        CaCommand, Cli, Command, MapSizeArgs, REGISTRY, Sizing, node_name, pod_name, render_routes,
        routes_of_service, sizes,
    };
    use clap::{CommandFactory as _, Parser as _};
    use std::time::Duration;

    fn run_args(extra: &[&str]) -> Result<MapSizeArgs, clap::Error> {
        let args = ["mesh-agent", "run", "--node", "n1", "--state", "s.yaml"];
        match Cli::try_parse_from(args.iter().chain(extra))?.command {
            Command::Run(run) => Ok(run.map_sizes),
            _ => unreachable!("parsed as run"),
        }
    }

    #[test]
    fn every_resizable_map_of_the_registry_has_its_flag() {
        let mut cli = Cli::command();
        let help = cli
            .find_subcommand_mut("run")
            .expect("run")
            .render_long_help()
            .to_string();
        for spec in &REGISTRY {
            match spec.sizing.flag() {
                Some(flag) => {
                    let line = help
                        .lines()
                        .find(|l| l.contains(&format!("--{flag} <ENTRIES>")))
                        .unwrap_or_else(|| panic!("--{flag} missing:\n{help}"));
                    let text = help
                        .split(&format!("--{flag} <ENTRIES>"))
                        .nth(1)
                        .and_then(|rest| rest.split("--map-size").next())
                        .unwrap_or_default();
                    assert!(
                        text.contains(spec.name),
                        "{flag} does not name {}: {line}",
                        spec.name
                    );
                }
                None => assert_eq!(spec.sizing, Sizing::Fixed),
            }
        }
        assert!(help.contains("--map-size-ratio <FRACTION>"), "{help}");
    }

    #[test]
    fn map_size_flags_are_explicit_capacities_and_the_ratio_a_fraction() {
        let defaults = run_args(&[]).expect("parse");
        assert_eq!(defaults.ratio, sizes::DEFAULT_RATIO);
        assert!(defaults.explicit.is_empty());
        let set = run_args(&[
            "--map-size-services",
            "100",
            "--map-size-socks",
            "2048",
            "--map-size-ratio",
            "0",
        ])
        .expect("parse");
        assert_eq!(set.ratio, 0.0);
        assert_eq!(
            set.explicit.into_iter().collect::<Vec<_>>(),
            [("map-size-services", 100), ("map-size-socks", 2048)]
        );
        for bad in [
            &["--map-size-ratio", "1.5"][..],
            &["--map-size-ratio", "-0.1"],
            &["--map-size-services", "0"],
            &["--map-size-config", "4"],
        ] {
            assert!(run_args(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn sockmap_is_opt_in() {
        let sockmap = |extra: &[&str]| {
            let args = ["mesh-agent", "run", "--node", "n1", "--state", "s.yaml"];
            match Cli::try_parse_from(args.iter().chain(extra))
                .expect("parse")
                .command
            {
                Command::Run(run) => run.sockmap,
                _ => unreachable!("parsed as run"),
            }
        };
        assert!(!sockmap(&[]));
        assert!(sockmap(&["--sockmap=true"]));
        assert!(!sockmap(&["--sockmap=false"]));
    }

    #[test]
    fn pod_names_are_namespace_slash_name() {
        assert_eq!(pod_name("prod/web-1").as_deref(), Ok("prod/web-1"));
        for bad in ["web-1", "/web", "prod/", "a/b/c"] {
            assert!(pod_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn routes_render_per_parent_and_filter_by_service() {
        let state = crate::state::parse_str(
            "t.yaml",
            "
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: split, namespace: shop}
spec:
  parentRefs:
  - {group: '', kind: Service, name: web, port: 80}
  - {group: '', kind: Service, name: api}
  rules: [{backendRefs: [{name: gone, port: 80}]}]
",
        )
        .expect("state");
        let statuses = super::routes::compile(&state).statuses;
        let text = render_routes(&statuses, None);
        assert_eq!(
            text,
            "HTTPRoute shop/split
  parent Service shop/web port 80
    Accepted      True   Accepted          attached to port 80
    ResolvedRefs  False  BackendNotFound   spec.rules[0].backendRefs[0]: Service shop/gone not found
  parent Service shop/api
    Accepted      False  NoMatchingParent  Service shop/api not found
    ResolvedRefs  False  BackendNotFound   spec.rules[0].backendRefs[0]: Service shop/gone not found
"
        );
        let web = routes_of_service(statuses.clone(), Some("shop/web"));
        assert_eq!(web.len(), 1);
        assert_eq!(web[0].parents.len(), 1);
        assert_eq!(web[0].parents[0].service.name, "web");
        let none = routes_of_service(statuses, Some("shop/db"));
        assert!(none.is_empty());
        assert_eq!(
            render_routes(&none, Some("shop/db")),
            "no HTTPRoute names Service shop/db as parent\n"
        );
    }

    #[test]
    fn routes_takes_a_state_or_an_agent_not_both() {
        let parse =
            |args: &[&str]| Cli::try_parse_from(["mesh-agent", "routes"].iter().chain(args));
        assert!(parse(&["--state", "s.yaml", "--service", "shop/web", "--json"]).is_ok());
        assert!(parse(&["--node", "n1"]).is_ok());
        assert!(parse(&["--node", "n1", "--state", "s.yaml"]).is_err());
        assert!(parse(&["--service", "web"]).is_err());
    }

    #[test]
    fn ca_flags_default_to_cluster_local_and_a_year() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(["mesh-agent", "ca"].iter().chain(args)).map(|cli| cli.command)
        };
        match parse(&["init", "--dir", "d"]).expect("init") {
            Command::Ca {
                command:
                    CaCommand::Init {
                        trust_domain,
                        root_cert: None,
                        force: false,
                        ..
                    },
            } => assert_eq!(trust_domain, "cluster.local"),
            other => panic!("{other:?}"),
        }
        match parse(&["node", "--dir", "d", "--node", "n1", "--out", "o"]).expect("node") {
            Command::Ca {
                command: CaCommand::Node { ttl, .. },
            } => assert_eq!(ttl, Duration::from_secs(365 * 24 * 3600)),
            other => panic!("{other:?}"),
        }
        for bad in [
            &["init", "--dir", "d", "--root-cert", "c.pem"][..],
            &["init", "--dir", "d", "--root-key", "k.pem"],
            &[
                "init",
                "--dir",
                "d",
                "--root-cert",
                "c",
                "--root-key",
                "k",
                "--trust-domain",
                "td",
            ],
            &[
                "node", "--dir", "d", "--node", "n1", "--out", "o", "--ttl", "0s",
            ],
            &[
                "node", "--dir", "d", "--node", "n1", "--out", "o", "--ttl", "1d",
            ],
            &["node", "--dir", "d", "--node", "a.b", "--out", "o"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn node_names_must_be_valid_bpffs_names() {
        for ok in ["n1", "worker-2", "node_a", "ip-10-0-0-1"] {
            assert_eq!(node_name(ok).as_deref(), Ok(ok));
        }
        for bad in ["", "node.example.com", "a/b", "x y", &"n".repeat(65)] {
            assert!(node_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
