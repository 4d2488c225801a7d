//! One reconcile: a state from the source → plans (load balancing, policy) → maps, then the
//! follow-ups of a change (stale affinity and counters purged, UDP sockets to removed
//! backends destroyed, health-check targets updated). Both plans are made before either
//! is applied, so a state that fails either is rejected whole; the last good state stays
//! in force and the problem is logged with the file, document and field involved.
//!
//! A change costs what it touches: the load-balancing planner ([`Planner`]) re-plans
//! only the Services it touches and returns the changed keys, which are all that is
//! written; the policy is re-planned only when its inputs changed. After an apply, the
//! names flows and the admin API show are swapped in ([`SharedView`]) when the policy
//! or the routes changed, and the node proxy's configuration is rebuilt and published
//! ([`ProxyFeed`]) when what it is built from changed, the local pods' namespaces
//! included.

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
        sync::{ApplyStats, KernelMap, MapStore as _, stale_affinity, stale_metrics},
    },
    flows::{SharedView, View},
    health::HealthChecker,
    plan::{
        self, BackendAddr, Capacities, Delta, PlanContext, PlanError, Planner,
        policy::{IdentityIds, PolicyCapacities, PolicyContext, PolicyPlan, plan_policy},
        proxy::{proxy_config, served_services},
        routes::CompiledRoutes,
    },
    proxyfeed::ProxyFeed,
    state::{Changes, ObjectKey, State, StateError},
    telemetry::{PlanReport, Telemetry},
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

/// A policy plan applied, with the local pods' namespaces and the node's addresses it
/// was made for.
struct PolicyInForce {
    plan: PolicyPlan,
    local_netns: BTreeMap<IpAddr, u64>,
    node_addrs: Vec<IpAddr>,
}

/// Owns the maps and the memory of what was applied.
pub struct Reconciler {
    node: String,
    cgroup: PathBuf,
    /// `--trust-domain`: overrides MeshConfig's for identities.
    trust_domain: Option<String>,
    maps: ReconcileMaps,
    capacities: Capacities,
    /// The load-balancing plan, kept between states so a change re-plans only what it
    /// touches.
    planner: Planner,
    /// Whether the maps hold the planner's plan and `policy`: false until the first
    /// apply and after a failed one, when the next apply diffs every map instead of
    /// writing only the changed keys.
    in_sync: bool,
    /// The policy plan in force; re-planned only when its inputs change.
    policy: Option<PolicyInForce>,
    policy_capacities: PolicyCapacities,
    identity_ids: IdentityIds,
    /// Local pod IP → its network namespace cookie, from the last discovery.
    local_netns: BTreeMap<IpAddr, u64>,
    /// The namespaces of the last discovery, for the node proxy.
    found_netns: Vec<LocalNetns>,
    /// The last discovery changed what the node proxy's configuration was built from.
    proxy_stale: bool,
    /// Counts the applies that changed the policy maps, for the node proxy.
    policy_epoch: u64,
    /// The node's own addresses, given the host identity in IPCACHE.
    node_addrs: Vec<IpAddr>,
    state: Option<Arc<State>>,
    /// Whether `state` is the one in force (its plan applied): a rejected state must not
    /// reach the node proxy either.
    state_applied: bool,
    /// The routes of the state in force, compiled once per plan for the planner, the
    /// admin view and the node proxy.
    routes: Option<CompiledRoutes>,
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
            planner: Planner::new(ids),
            in_sync: false,
            policy: None,
            policy_capacities,
            identity_ids: IdentityIds::default(),
            local_netns: BTreeMap::new(),
            found_netns: Vec::new(),
            proxy_stale: false,
            policy_epoch: 0,
            node_addrs: Vec::new(),
            state: None,
            state_applied: false,
            routes: None,
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
        self.proxy_stale |= found_changed;
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
                self.state = Some(Arc::new(state));
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
    /// Only what changed since the last plan is re-planned and written: the Services a
    /// change touches, the policy when its inputs changed.
    pub fn replan(&mut self) -> Outcome {
        let Some(state) = self.state.clone() else {
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
        let planning = Instant::now();
        let routes = plan::routes::compile(&state);
        let ctx = PlanContext {
            node: &self.node,
            unhealthy: &unhealthy,
            capacities: self.capacities,
            l7_ports: &routes.l7_ports,
        };
        let planned = self.planner.prepare(&state, &ctx).and_then(|lb| {
            let policy = self.plan_policy(&state, lb.changes.as_ref())?;
            Ok((lb, policy))
        });
        let (pending, policy) = match planned {
            Ok(planned) => planned,
            Err(err) => {
                error!(%err, "state rejected; keeping the last good state");
                self.telemetry.failed();
                self.state_applied = false;
                return Outcome::Rejected;
            }
        };
        let cost = pending.cost;
        let proxy_changed =
            self.proxy_inputs_changed(&routes, pending.changes.as_ref(), pending.services());
        let delta = self.planner.commit(pending);
        let plan_time = planning.elapsed();
        let applying = Instant::now();
        let in_sync = std::mem::replace(&mut self.in_sync, false) && !delta.whole;
        let lb = if in_sync {
            self.maps.services.write(&delta)
        } else {
            self.maps.services.apply(self.planner.plan())
        };
        let applied = lb.and_then(|lb| {
            let p = match &policy {
                Some((p, _)) => self
                    .maps
                    .policy
                    .apply(&p.endpoints, &p.ipcache, &p.policy)?,
                None => ApplyStats::default(),
            };
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
        self.in_sync = true;
        let apply_time = applying.elapsed();
        self.telemetry.planned(PlanReport {
            plan: plan_time,
            apply: apply_time,
            services: cost.services,
            writes: (stats.written + stats.removed + policy_stats.written + policy_stats.removed)
                as u64,
        });
        if policy_stats != ApplyStats::default() {
            self.policy_epoch += 1;
        }
        let routes_changed = self
            .routes
            .as_ref()
            .is_none_or(|r| r.statuses != routes.statuses);
        let policy_replanned = policy.is_some();
        if let Some((policy, next_ids)) = policy {
            self.identity_ids = next_ids;
            self.policy = Some(PolicyInForce {
                plan: policy,
                local_netns: self.local_netns.clone(),
                node_addrs: self.node_addrs.clone(),
            });
        }
        if let Some(PolicyInForce { plan: policy, .. }) = &self.policy
            && (policy_replanned || routes_changed)
        {
            let view = View::new(&state, policy, &self.node, &self.local_netns)
                .with_routes(routes.statuses.clone());
            self.view.publish(view);
        }
        self.routes = Some(routes);
        self.after_apply(&delta, !in_sync);
        let plan = self.planner.plan();
        info!(
            frontends = plan.frontends.len(),
            backends = plan.backends.len(),
            unhealthy = unhealthy.len(),
            replanned = cost.services,
            written = stats.written,
            removed = stats.removed,
            local_pods = self.policy.as_ref().map_or(0, |p| p.plan.endpoints.len()),
            policy_replanned,
            policy_written = policy_stats.written,
            policy_removed = policy_stats.removed,
            plan_ms = plan_time.as_secs_f64() * 1e3,
            apply_ms = apply_time.as_secs_f64() * 1e3,
            "state applied"
        );
        self.telemetry.applied(&plan.frontends);
        self.state_applied = true;
        let policy_changed = policy_stats != ApplyStats::default();
        if proxy_changed || policy_changed || self.proxy_stale || !in_sync {
            self.publish_proxy_config();
        }
        Outcome::Applied
    }

    /// The policy plan for `state`, or `None` when the one in force still holds: the
    /// maps are in sync, and neither the state (`changes` since the last plan) nor the
    /// local pods' namespaces nor the node's addresses changed what it depends on.
    fn plan_policy(
        &self,
        state: &State,
        changes: Option<&Changes>,
    ) -> Result<Option<(PolicyPlan, IdentityIds)>, PlanError> {
        let current = self.policy.as_ref().filter(|p| {
            self.in_sync && p.local_netns == self.local_netns && p.node_addrs == self.node_addrs
        });
        let unchanged = changes.is_some_and(|c| !c.touch_policy(state));
        if current.is_some() && unchanged {
            return Ok(None);
        }
        let pctx = PolicyContext {
            node: &self.node,
            local_netns: &self.local_netns,
            node_addrs: &self.node_addrs,
            capacities: self.policy_capacities,
        };
        plan_policy(state, &self.identity_ids, &pctx).map(Some)
    }

    /// Rebuilds the node proxy's configuration from the state in force and the last
    /// discovery; the feed publishes it only if it changed.
    fn publish_proxy_config(&mut self) {
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
        self.proxy_stale = false;
    }

    /// Whether the node proxy's configuration may change with this plan: it reads the
    /// Pods, Namespaces, Istio's security kinds and MeshConfig, the compiled routes, and
    /// the Services (and their EndpointSlices) the routes serve; `replanned` are the
    /// Services whose load balancing this plan re-planned (their slices included).
    fn proxy_inputs_changed<'k>(
        &self,
        routes: &CompiledRoutes,
        changes: Option<&Changes>,
        mut replanned: impl Iterator<Item = &'k ObjectKey>,
    ) -> bool {
        let Some(c) = changes else {
            return true;
        };
        if self.routes.as_ref() != Some(routes) || c.touch_workloads() {
            return true;
        }
        let served = served_services(routes);
        replanned.any(|key| served.contains(key))
    }

    /// Follow-ups whose failure does not undo the apply: each is logged and retried by
    /// the next reconcile. `full`: the maps were diffed whole, so the follow-ups look at
    /// the whole plan instead of the keys `delta` changed.
    fn after_apply(&mut self, delta: &Delta, full: bool) {
        let plan = self.planner.plan();
        if full || !delta.slots.is_empty() || !delta.services.removals.is_empty() {
            match self.maps.affinity.entries() {
                Ok(entries) => {
                    for key in stale_affinity(&entries, |s, b| plan.slotted(s, b)) {
                        if let Err(err) = self.maps.affinity.remove(&key) {
                            warn!(%err, "dropping a stale affinity entry failed");
                        }
                    }
                }
                Err(err) => warn!(%err, "reading affinity entries failed"),
            }
        }
        if full || !delta.services.removals.is_empty() || !delta.backends.removals.is_empty() {
            let keys: Vec<_> = self.maps.metrics.keys().filter_map(Result::ok).collect();
            let live_service = |id| self.planner.holds_service_id(id);
            let live_backend = |id| plan.backends.contains_key(&id);
            for key in stale_metrics(&keys, live_service, live_backend) {
                // A counter that vanished meanwhile is fine.
                let _ = self.maps.metrics.remove(&key);
            }
        }
        let gone: Vec<_> = (delta.gone.iter())
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
        if let Some(health) = &self.health
            && (full || !delta.backends.is_empty())
        {
            health.set_targets(
                plan.probe_targets()
                    .into_iter()
                    .map(|b| (b.addr, b.proto))
                    .collect(),
            );
        }
    }
}
