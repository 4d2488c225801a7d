//! The metrics snapshot, read from the pinned maps at scrape time: per-CPU connection
//! counters joined with the last applied plan's names, policy verdict counters, map fill
//! levels and memory, which programs are attached, and the reconcile record.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd as _, AsRawFd as _},
    path::PathBuf,
    sync::{
        Arc, Mutex, OnceLock,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use aya::maps::{HashMap, Map, MapData, PerCpuArray, PerCpuHashMap};
use mesh_common::{
    LbMetricsKey,
    event::{Reason, Verdict, VerdictKey},
    maps::{self, programs},
    policy::Direction,
    redirect::counter,
    service::{BackendState, Protocol},
};
use serde::{Deserialize, Serialize};

use tokio::sync::watch;

use crate::{
    datapath::pins,
    metrics::{
        BackendCounter, MapFill, ServiceCounters, Snapshot, SnapshotSource, SockmapCounters,
        VerdictCount,
    },
    plan::FrontendInfo,
    source::SourceStatus,
};

/// What the reconcile loop shares with scrapes.
pub struct Telemetry {
    node_dir: PathBuf,
    frontends: Mutex<Vec<Arc<FrontendInfo>>>,
    reconcile_errors: AtomicU64,
    last_ok: AtomicBool,
    applied: AtomicU64,
    ready: AtomicBool,
    /// The cluster state source's status, once the agent follows one.
    source: OnceLock<watch::Receiver<SourceStatus>>,
    /// Duration of the last plan and of its map writes, in microseconds.
    last_plan_us: AtomicU64,
    last_apply_us: AtomicU64,
    /// Services the last plan re-planned, and map entries it wrote or removed.
    last_plan_services: AtomicU64,
    last_map_writes: AtomicU64,
}

/// What one plan and its map writes cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct PlanReport {
    /// Planning, the whole state to the desired map contents.
    pub plan: Duration,
    /// Writing the changed entries.
    pub apply: Duration,
    /// Services planned.
    pub services: u64,
    /// Map entries written or removed (service and policy maps).
    pub writes: u64,
}

/// `GET /v1/status` of the admin API: whether the agent is serving and what its
/// reconcile loop did, for readiness checks (a harness waits for `ready`, then for
/// `applied` to grow after it changed the state).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentStatus {
    /// The datapath is attached, with the first state already programmed (or rejected).
    pub ready: bool,
    /// States applied to the datapath since the agent started: one per successful
    /// reconcile.
    pub applied: u64,
    /// States rejected by validation plus failed applies since the agent started.
    pub reconcile_errors: u64,
    /// Whether the most recent reconcile applied its state.
    pub last_reconcile_ok: bool,
    /// The cluster state source: which, stale or not, revisions.
    #[serde(default)]
    pub source: SourceStatus,
    /// How long the last plan took (the whole state → map contents), in microseconds.
    #[serde(default)]
    pub last_plan_us: u64,
    /// How long writing the last plan's changes to the maps took, in microseconds.
    #[serde(default)]
    pub last_apply_us: u64,
    /// Services the last plan re-planned: all of them for the first state, then those
    /// the change touched.
    #[serde(default)]
    pub last_plan_services: u64,
    /// Map entries the last plan wrote or removed.
    #[serde(default)]
    pub last_map_writes: u64,
}

impl Telemetry {
    /// Telemetry of the datapath pinned in `node_dir`.
    pub fn new(node_dir: PathBuf) -> Self {
        Self {
            node_dir,
            frontends: Mutex::new(Vec::new()),
            reconcile_errors: AtomicU64::new(0),
            last_ok: AtomicBool::new(false),
            applied: AtomicU64::new(0),
            ready: AtomicBool::new(false),
            source: OnceLock::new(),
            last_plan_us: AtomicU64::new(0),
            last_apply_us: AtomicU64::new(0),
            last_plan_services: AtomicU64::new(0),
            last_map_writes: AtomicU64::new(0),
        }
    }

    /// Reports the status of the cluster state source from now on.
    pub fn follow_source(&self, status: watch::Receiver<SourceStatus>) {
        let _ = self.source.set(status);
    }

    /// Records what one plan and its map writes cost.
    pub fn planned(&self, report: PlanReport) {
        let micros = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.last_plan_us
            .store(micros(report.plan), Ordering::Relaxed);
        self.last_apply_us
            .store(micros(report.apply), Ordering::Relaxed);
        self.last_plan_services
            .store(report.services, Ordering::Relaxed);
        self.last_map_writes.store(report.writes, Ordering::Relaxed);
    }

    fn source_status(&self) -> SourceStatus {
        self.source.get().map(|s| *s.borrow()).unwrap_or_default()
    }

    /// Records a successful apply of `frontends`.
    pub fn applied(&self, frontends: &[Arc<FrontendInfo>]) {
        *self.frontends.lock().unwrap_or_else(|e| e.into_inner()) = frontends.to_vec();
        self.last_ok.store(true, Ordering::Relaxed);
        self.applied.fetch_add(1, Ordering::Relaxed);
    }

    /// Records that the datapath is attached: the agent is ready.
    pub fn attached(&self) {
        self.ready.store(true, Ordering::Relaxed);
    }

    /// Readiness and the reconcile record.
    pub fn status(&self) -> AgentStatus {
        AgentStatus {
            ready: self.ready.load(Ordering::Relaxed),
            applied: self.applied.load(Ordering::Relaxed),
            reconcile_errors: self.reconcile_errors.load(Ordering::Relaxed),
            last_reconcile_ok: self.last_ok.load(Ordering::Relaxed),
            source: self.source_status(),
            last_plan_us: self.last_plan_us.load(Ordering::Relaxed),
            last_apply_us: self.last_apply_us.load(Ordering::Relaxed),
            last_plan_services: self.last_plan_services.load(Ordering::Relaxed),
            last_map_writes: self.last_map_writes.load(Ordering::Relaxed),
        }
    }

    /// Records a rejected state or a failed apply.
    pub fn failed(&self) {
        self.reconcile_errors.fetch_add(1, Ordering::Relaxed);
        self.last_ok.store(false, Ordering::Relaxed);
    }

    /// Every entry of the pinned per-CPU hash map `name`, summed over CPUs; empty when it
    /// cannot be read (no datapath yet).
    fn per_cpu_totals<K: aya::Pod>(&self, name: &str) -> Vec<(K, u64)> {
        let Ok(data) = MapData::from_pin(self.node_dir.join(name)) else {
            return Vec::new();
        };
        let Ok(map) = PerCpuHashMap::<_, K, u64>::try_from(Map::PerCpuHashMap(data)) else {
            return Vec::new();
        };
        map.iter()
            .filter_map(Result::ok)
            .map(|(k, per_cpu)| (k, per_cpu.iter().sum()))
            .collect()
    }

    /// POLICY_METRICS summed over CPUs; empty when it cannot be read (no datapath yet).
    fn verdicts(&self) -> Vec<VerdictCount> {
        self.per_cpu_totals::<VerdictKey>(maps::POLICY_METRICS)
            .into_iter()
            .filter_map(|(k, count)| {
                // Forwarded flows are not counted by this datapath.
                let verdict = Verdict::from_u8(k.verdict).filter(|v| *v != Verdict::Forwarded)?;
                Some(VerdictCount {
                    direction: Direction::from_u8(k.direction).map_or("unknown", Direction::as_str),
                    verdict: verdict.as_str(),
                    reason: Reason::from_u8(k.reason).map_or("unknown", Reason::as_str),
                    count,
                })
            })
            .collect()
    }

    /// SOCKMAP_METRICS summed over CPUs, and the sockets in SOCKS (from `maps`, the
    /// fill levels already read); zeros when they cannot be read (no datapath yet).
    fn sockmap(&self, maps: &[MapFill]) -> SockmapCounters {
        let array = MapData::from_pin(self.node_dir.join(maps::SOCKMAP_METRICS))
            .ok()
            .and_then(|data| PerCpuArray::<_, u64>::try_from(Map::PerCpuArray(data)).ok());
        let sum = |index: u32| -> u64 {
            array
                .as_ref()
                .and_then(|a| a.get(&index, 0).ok())
                .map_or(0, |per_cpu| per_cpu.iter().sum())
        };
        SockmapCounters {
            enabled: pins::link_pin(&self.node_dir, programs::SOCKOPS).exists(),
            sockets: maps
                .iter()
                .find(|m| m.name == maps::SOCKS)
                .map_or(0, |m| m.entries),
            redirected_messages: sum(counter::REDIRECTED_MSGS),
            redirected_bytes: sum(counter::REDIRECTED_BYTES),
            stack_messages: sum(counter::STACK_MSGS),
        }
    }

    /// Fill level of the registry's map at `index`; `None` when it cannot be read (no
    /// datapath yet).
    fn map_fill(&self, index: usize) -> Option<MapFill> {
        let spec = maps::REGISTRY.get(index)?;
        let data = MapData::from_pin(self.node_dir.join(spec.name)).ok()?;
        let capacity = data.info().ok()?.max_entries();
        let memory_bytes = memlock(&data).unwrap_or(0);
        let entries = if spec.kind.fixed_fill() {
            // Every index of an array exists from creation, and a ring buffer is all
            // reserved: both report their capacity (slots, bytes) as their fill.
            capacity as usize
        } else {
            KEY_COUNTERS.get(index)?(data)?
        };
        Some(MapFill {
            name: spec.name.to_owned(),
            entries: entries as u64,
            capacity: u64::from(capacity),
            memory_bytes,
        })
    }
}

/// Counts the keys of a map whose keys are `K` bytes and values `V` bytes long, by
/// walking them (O(entries), acceptable at scrape intervals). The walk only asks the
/// kernel for the next key, which works alike for every keyed kind (hash, LRU, per-CPU,
/// LPM trie, sockhash), so aya's plain hash-map view serves them all; it checks both
/// sizes against the kernel's before any key is copied.
fn count_keys<const K: usize, const V: usize>(data: MapData) -> Option<usize> {
    HashMap::<_, [u8; K], [u8; V]>::try_from(Map::HashMap(data))
        .ok()
        .map(|m| m.keys().count())
}

/// [`count_keys`] for every entry of the registry, with that map's key and value sizes
/// (known per entry at compile time; a registry entry without a counter here does not
/// build).
macro_rules! key_counters {
    ($($i:literal)*) => {
        [$(count_keys::<
            { maps::REGISTRY[$i].key_size as usize },
            { maps::REGISTRY[$i].value_size as usize },
        >),*]
    };
}
const KEY_COUNTERS: [fn(MapData) -> Option<usize>; maps::REGISTRY.len()] =
    key_counters!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18);

/// Locked memory of a map, from /proc/self/fdinfo (what `bpftool map show` reports).
fn memlock(map: &MapData) -> Option<u64> {
    let fd = map.fd().as_fd().as_raw_fd();
    let info = std::fs::read_to_string(format!("/proc/self/fdinfo/{fd}")).ok()?;
    info.lines()
        .find_map(|l| l.strip_prefix("memlock:"))
        .and_then(|v| v.trim().parse().ok())
}

fn frontend_name(f: &FrontendInfo) -> String {
    match Protocol::from_u8(f.proto) {
        Some(proto) => format!("{}/{proto}", f.addr),
        None => format!("{}/{}", f.addr, f.proto),
    }
}

impl SnapshotSource for Telemetry {
    fn snapshot(&self) -> Snapshot {
        let counters: BTreeMap<LbMetricsKey, u64> =
            self.per_cpu_totals(maps::LB_METRICS).into_iter().collect();
        let fills: Vec<MapFill> = (0..maps::REGISTRY.len())
            .filter_map(|i| self.map_fill(i))
            .collect();
        let count = |service_id, backend_id| {
            counters
                .get(&LbMetricsKey {
                    service_id,
                    backend_id,
                })
                .copied()
                .unwrap_or(0)
        };
        let frontends = self
            .frontends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let services = frontends
            .iter()
            .map(|f| ServiceCounters {
                service: f.service.to_string(),
                frontend: frontend_name(f),
                refused: count(f.id, 0),
                backends: f
                    .backends
                    .iter()
                    .map(|b| BackendCounter {
                        backend: b.addr.to_string(),
                        state: BackendState::name_of(b.state),
                        connections: count(f.id, b.id),
                    })
                    .collect(),
            })
            .collect();
        Snapshot {
            services,
            programs_attached: programs::ALL
                .iter()
                .chain([&programs::SOCKOPS])
                .map(|p| (p.to_string(), pins::link_pin(&self.node_dir, p).exists()))
                .collect(),
            sockmap: self.sockmap(&fills),
            maps: fills,
            reconcile_errors: self.reconcile_errors.load(Ordering::Relaxed),
            last_reconcile_ok: self.last_ok.load(Ordering::Relaxed),
            policy_verdicts: self.verdicts(),
            agent: self.source.get().is_some().then(|| self.status()),
        }
    }
}
