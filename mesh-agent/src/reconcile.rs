//! One reconcile: a state from the source → plans (load balancing, policy) → maps, then the
//! follow-ups of a change (stale affinity and counters purged, UDP sockets to removed
//! backends destroyed, health-check targets updated). Both plans are made before either
//! is applied, so a state that fails either is rejected whole; the last good state stays
//! in force and the problem is logged with the file, document and field involved. After
//! each apply, the names flows and the admin API show are swapped in ([`SharedView`]),
//! and the node proxy's configuration is rebuilt and published when it changed
//! ([`ProxyFeed`]); so it is when only the local pods' namespaces changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use aya::maps::{MapData, PerCpuHashMap};
use mesh_common::{AffinityKey, AffinityValue, LbMetricsKey, service::PROTO_UDP};
use tracing::{error, info, warn};

use crate::{
    datapath::{
        endpoints::{self, LocalNetns},
        inbound::InboundLinks,
        loader::{KernelPolicyMaps, KernelServiceMaps, MapSizes},
        sockdestroy,
        sync::KernelMap,
        sync::{MapStore as _, stale_affinity, stale_metrics},
    },
    flows::{SharedView, View},
    health::HealthChecker,
    plan::{
        self, BackendAddr, Capacities, Ids, Plan, PlanContext,
        policy::{IdentityIds, PolicyCapacities, PolicyContext, plan_policy},
        proxy::proxy_config,
        routes::CompiledRoutes,
    },
    proxyfeed::ProxyFeed,
    state::{State, StateError},
    telemetry::Telemetry,
};

/// Result of one reconcile.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The maps hold the state.
    Applied,
    /// The state was invalid; the last good one stays until the source changes again.
    Rejected,
    /// Writing the maps failed; worth retrying.
    Failed,
}

/// The maps a reconcile writes: [`crate::datapath::loader::DatapathMaps`] without the
/// ones the agent only reads (EVENTS) or sets once at startup (CONFIG).
pub struct ReconcileMaps {
    /// SERVICES, SVC_BACKENDS, BACKENDS.
    pub services: KernelServiceMaps,
    /// AFFINITY.
    pub affinity: KernelMap<AffinityKey, AffinityValue>,
    /// LB_METRICS.
    pub metrics: PerCpuHashMap<MapData, LbMetricsKey, u64>,
    /// ENDPOINTS, IPCACHE, POLICY.
    pub policy: KernelPolicyMaps,
    /// The real sizes of the maps.
    pub sizes: MapSizes,
    /// The inbound capture program's attachments to the local pods' namespaces.
    pub inbound: InboundLinks,
}

/// Where a reconciler makes what it applied known.
pub struct Outputs {
    /// Reconcile counters and readiness, for metrics and `/v1/status`.
    pub telemetry: Arc<Telemetry>,
    /// The names flows and the admin API show.
    pub view: SharedView,
    /// The node proxy's configuration.
    pub proxy: ProxyFeed,
}

/// Owns the maps and the memory of what was applied.
pub struct Reconciler {
    node: String,
    cgroup: PathBuf,
    /// `--trust-domain`: overrides MeshConfig's for identities.
    trust_domain: Option<String>,
    maps: ReconcileMaps,
    capacities: Capacities,
    ids: Ids,
    policy_capacities: PolicyCapacities,
    identity_ids: IdentityIds,
    /// Local pod IP → its network namespace cookie, from the last discovery.
    local_netns: BTreeMap<IpAddr, u64>,
    /// The namespaces of the last discovery, for the node proxy.
    found_netns: Vec<LocalNetns>,
    /// Counts the applies that changed the policy maps, for the node proxy.
    policy_epoch: u64,
    /// The node's own addresses, given the host identity in IPCACHE.
    node_addrs: Vec<IpAddr>,
    state: Option<State>,
    /// Whether `state` is the one in force (its plan applied): a rejected state must not
    /// reach the node proxy either.
    state_applied: bool,
    /// The routes of the state in force, compiled once per plan for the planner, the
    /// admin view and the node proxy.
    routes: Option<CompiledRoutes>,
    applied: Option<Plan>,
    health: Option<HealthChecker>,
    telemetry: Arc<Telemetry>,
    view: SharedView,
    proxy: ProxyFeed,
}

impl Reconciler {
    /// A reconciler for the maps of one node. Ids already in the maps (a datapath an
    /// earlier agent left pinned) are kept, so adopting it renumbers nothing.
    pub fn new(
        node: &str,
        cgroup: &Path,
        trust_domain: Option<String>,
        maps: ReconcileMaps,
        health: Option<HealthChecker>,
        outputs: Outputs,
    ) -> Result<Self, crate::datapath::sync::SyncError> {
        let Outputs {
            telemetry,
            view,
            proxy,
        } = outputs;
        let ids = maps.services.ids()?;
        let capacities = maps.sizes.capacities();
        let policy_capacities = maps.sizes.policy_capacities();
        Ok(Self {
            node: node.into(),
            cgroup: cgroup.into(),
            trust_domain,
            maps,
            capacities,
            ids,
            policy_capacities,
            identity_ids: IdentityIds::default(),
            local_netns: BTreeMap::new(),
            found_netns: Vec::new(),
            policy_epoch: 0,
            node_addrs: Vec::new(),
            state: None,
            state_applied: false,
            routes: None,
            applied: None,
            health,
            telemetry,
            view,
            proxy,
        })
    }

    /// Looks for the network namespaces of local pods again (pods start and stop between
    /// state changes); replans when they changed. Returns None when nothing changed.
    pub fn rediscover(&mut self) -> Option<Outcome> {
        let node_addrs = match endpoints::node_addrs() {
            Ok(addrs) => addrs,
            Err(err) => {
                warn!(%err, "listing the node's addresses failed");
                self.node_addrs.clone()
            }
        };
        let node_changed = node_addrs != self.node_addrs;
        self.node_addrs = node_addrs;
        let cgroup = self.cgroup.clone();
        // Entering namespaces blocks this worker briefly; let the runtime move other tasks.
        let found = tokio::task::block_in_place(|| endpoints::discover(&cgroup));
        let found = match found {
            Ok(found) => found,
            Err(err) => {
                warn!(%err, "discovering local pods failed");
                return None;
            }
        };
        self.maps.inbound.sync(&found);
        let local = endpoints::by_ip(&found);
        let found_changed = found != self.found_netns;
        self.found_netns = found;
        if local == self.local_netns && !node_changed {
            // The datapath is unchanged, but the proxy may reach a namespace through
            // another process now.
            if found_changed {
                self.publish_proxy_config();
            }
            return None;
        }
        self.local_netns = local;
        Some(self.replan())
    }

    /// Applies a new state from the source; a rejected one (its problems name their
    /// origins) leaves the last good state in force.
    pub fn reload(&mut self, state: Result<State, StateError>) -> Outcome {
        let _ = self.rediscover();
        match state {
            Ok(state) => {
                self.state = Some(state);
                self.state_applied = false;
                self.replan()
            }
            Err(err) => {
                for line in err.to_string().lines() {
                    error!(
                        problem = line,
                        "state rejected; keeping the last good state"
                    );
                }
                self.telemetry.failed();
                Outcome::Rejected
            }
        }
    }

    /// Plans the last good state again (health changed, or a retry) and applies it.
    pub fn replan(&mut self) -> Outcome {
        let Some(state) = &self.state else {
            return Outcome::Rejected;
        };
        let unhealthy: BTreeSet<BackendAddr> = self
            .health
            .as_ref()
            .map(|h| {
                h.unhealthy()
                    .into_iter()
                    .map(|(addr, proto)| BackendAddr { addr, proto })
                    .collect()
            })
            .unwrap_or_default();
        // The planner's cost per change, reported: it plans the whole state each time.
        let planning = Instant::now();
        let routes = plan::routes::compile(state);
        let ctx = PlanContext {
            node: &self.node,
            unhealthy: &unhealthy,
            capacities: self.capacities,
            l7_ports: &routes.l7_ports,
        };
        let pctx = PolicyContext {
            node: &self.node,
            local_netns: &self.local_netns,
            node_addrs: &self.node_addrs,
            capacities: self.policy_capacities,
        };
        let planned = plan::plan(state, &self.ids, &ctx)
            .and_then(|lb| Ok((lb, plan_policy(state, &self.identity_ids, &pctx)?)));
        let ((plan, next_ids), (policy, next_identity_ids)) = match planned {
            Ok(planned) => planned,
            Err(err) => {
                error!(%err, "state rejected; keeping the last good state");
                self.telemetry.failed();
                self.state_applied = false;
                return Outcome::Rejected;
            }
        };
        let plan_time = planning.elapsed();
        let applying = Instant::now();
        let applied = self.maps.services.apply(&plan).and_then(|lb| {
            let p = self
                .maps
                .policy
                .apply(&policy.endpoints, &policy.ipcache, &policy.policy)?;
            Ok((lb, p))
        });
        let (stats, policy_stats) = match applied {
            Ok(stats) => stats,
            Err(err) => {
                warn!(%err, "applying the state failed");
                self.telemetry.failed();
                return Outcome::Failed;
            }
        };
        let apply_time = applying.elapsed();
        self.telemetry.planned(plan_time, apply_time);
        self.ids = next_ids;
        self.identity_ids = next_identity_ids;
        if policy_stats.written > 0 || policy_stats.removed > 0 {
            self.policy_epoch += 1;
        }
        if let Some(state) = &self.state {
            let view = View::new(state, &policy, &self.node, &self.local_netns)
                .with_routes(routes.statuses.clone());
            self.view.publish(view);
        }
        self.routes = Some(routes);
        self.after_apply(&plan);
        info!(
            frontends = plan.frontends.len(),
            backends = plan.backends.len(),
            unhealthy = unhealthy.len(),
            written = stats.written,
            removed = stats.removed,
            local_pods = policy.endpoints.len(),
            policy_entries = policy.policy.len(),
            policy_written = policy_stats.written,
            policy_removed = policy_stats.removed,
            plan_ms = plan_time.as_secs_f64() * 1e3,
            apply_ms = apply_time.as_secs_f64() * 1e3,
            "state applied"
        );
        self.telemetry.applied(&plan.frontends);
        self.applied = Some(plan);
        self.state_applied = true;
        self.publish_proxy_config();
        Outcome::Applied
    }

    /// Rebuilds the node proxy's configuration from the state in force and the last
    /// discovery; the feed publishes it only if it changed.
    fn publish_proxy_config(&self) {
        let (Some(state), Some(routes)) = (
            self.state.as_ref().filter(|_| self.state_applied),
            &self.routes,
        ) else {
            return;
        };
        let mut config = proxy_config(
            state,
            &self.node,
            routes,
            &self.found_netns,
            0,
            self.trust_domain.as_deref(),
        );
        config.policy_epoch = self.policy_epoch;
        self.proxy.publish(config);
    }

    /// Follow-ups whose failure does not undo the apply: each is logged and retried by
    /// the next reconcile.
    fn after_apply(&mut self, plan: &Plan) {
        match self.maps.affinity.entries() {
            Ok(entries) => {
                for key in stale_affinity(&entries, &plan.active_pairs()) {
                    if let Err(err) = self.maps.affinity.remove(&key) {
                        warn!(%err, "dropping a stale affinity entry failed");
                    }
                }
            }
            Err(err) => warn!(%err, "reading affinity entries failed"),
        }
        let keys: Vec<_> = self.maps.metrics.keys().filter_map(Result::ok).collect();
        for key in stale_metrics(&keys, plan) {
            // A counter that vanished meanwhile is fine.
            let _ = self.maps.metrics.remove(&key);
        }
        if let Some(previous) = &self.applied {
            let gone: Vec<_> = previous
                .backend_addrs()
                .difference(&plan.backend_addrs())
                .filter(|b| b.proto == PROTO_UDP)
                .map(|b| b.addr)
                .collect();
            if !gone.is_empty() {
                let cgroup = self.cgroup.clone();
                // Entering pod namespaces blocks: keep it off the async workers.
                tokio::task::spawn_blocking(move || {
                    match sockdestroy::destroy_udp_sockets_to(&cgroup, &gone) {
                        Ok(report) => info!(
                            backends = ?gone,
                            namespaces = report.namespaces,
                            destroyed = report.destroyed,
                            "destroyed UDP sockets connected to removed backends"
                        ),
                        Err(err) => {
                            warn!(%err, "destroying UDP sockets of removed backends failed")
                        }
                    }
                });
            }
        }
        if let Some(health) = &self.health {
            health.set_targets(
                plan.probe_targets()
                    .into_iter()
                    .map(|b| (b.addr, b.proto))
                    .collect(),
            );
        }
    }
}
