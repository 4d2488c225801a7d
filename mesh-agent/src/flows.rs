//! The flow log: policy verdicts the datapath reports on the EVENTS ring buffer, decoded
//! and named (pods, identities, labels) the way Hubble shows flows, kept in memory (the
//! last [`FLOW_CAPACITY`]) and fanned out to followers of `GET /v1/flows?follow=true`.
//!
//! Names come from a [`View`] of the last applied state, which the reconciler swaps in
//! whole after each successful apply ([`SharedView`]), so a flow is always named from
//! one consistent state. The kernel only knows identities and addresses: an egress event
//! has no source address (it is judged at connect(), before the socket is bound), so its
//! source pod is taken from the source identity when exactly one pod has it.
//!
//! Times are RFC 3339 in UTC with nanoseconds (`2026-11-26T08:20:01.123456789Z`): the
//! kernel stamps events with CLOCK_MONOTONIC, converted here with the offset between the
//! two clocks at decode time (so a wall clock step moves later flows, not earlier ones).

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    net::IpAddr,
    sync::{Arc, Mutex, RwLock},
};

use aya::maps::{MapData, RingBuf};
use mesh_common::{
    FlowEvent,
    l7::{ProxyDenial, ProxyFlow},
    policy::IDENTITY_WORLD,
    service::Protocol,
};
use tokio::sync::broadcast;
use tracing::{debug, warn};

use crate::{
    plan::{
        policy::{IdentityKey, PolicyPlan},
        routes::RouteStatus,
    },
    report::{
        Direction, Flow, IdentityReport, LocalPodReport, Peer, PolicyReport, PolicyRuleReport,
        Reason, SplitReport, Verdict,
    },
    state::{ObjectKey, State, pod_ips},
    sys,
};

/// Flows kept in memory for `GET /v1/flows` (as many as the EVENTS ring buffer holds).
pub const FLOW_CAPACITY: usize = 4096;
/// Flows a slow follower may fall behind by before it skips ahead.
const FOLLOW_BACKLOG: usize = 1024;

/// A pod as flows name it.
#[derive(Clone, Debug, PartialEq, Eq)]
struct PodName {
    name: String,
    ips: Vec<IpAddr>,
}

/// What an identity is called and who has it.
#[derive(Debug)]
struct IdentityNames {
    /// `namespace {labels}` or `cidr PREFIX`.
    name: String,
    labels: BTreeMap<String, String>,
    pods: Vec<PodName>,
}

/// Names for the identities and addresses of the last applied state.
#[derive(Debug, Default)]
pub struct View {
    identities: HashMap<u32, IdentityNames>,
    /// Pod address → pod name.
    pods_by_ip: HashMap<IpAddr, String>,
    /// What `GET /v1/policy` serves.
    report: PolicyReport,
    /// What `GET /v1/routes` serves: the HTTPRoute statuses of the applied state.
    routes: Vec<RouteStatus>,
}

impl View {
    /// Names from a validated state and the policy plan applied from it. `local_netns`
    /// tells which local pods the agent has found a network namespace for.
    pub fn new(
        state: &State,
        plan: &PolicyPlan,
        node: &str,
        local_netns: &BTreeMap<IpAddr, u64>,
    ) -> Self {
        let pods: BTreeMap<&ObjectKey, Vec<IpAddr>> =
            state.pods().map(|(key, pod)| (key, pod_ips(pod))).collect();
        let pod_nodes: BTreeMap<&ObjectKey, Option<&str>> = state
            .pods()
            .map(|(key, pod)| (key, pod.spec.as_ref().and_then(|s| s.node_name.as_deref())))
            .collect();
        let mut view = Self::default();
        for info in &plan.identities {
            let (name, labels) = (info.key.to_string(), info.key.labels());
            let mut members = Vec::with_capacity(info.pods.len());
            for key in &info.pods {
                let pod = PodName {
                    name: key.to_string(),
                    ips: pods.get(key).cloned().unwrap_or_default(),
                };
                for &ip in &pod.ips {
                    view.pods_by_ip
                        .entry(ip)
                        .or_insert_with(|| pod.name.clone());
                }
                let local = pod_nodes
                    .get(key)
                    .copied()
                    .flatten()
                    .is_some_and(|n| !node.is_empty() && n == node);
                // A part (ipBlock split) lists its pods again; their own identity is
                // the one they are reported with.
                let part = matches!(info.key, IdentityKey::Part { .. });
                if local && !part {
                    view.report.local_pods.push(LocalPodReport {
                        pod: pod.name.clone(),
                        ips: pod.ips.clone(),
                        identity: info.id,
                        discovered: pod.ips.iter().any(|ip| local_netns.contains_key(ip)),
                    });
                }
                members.push(pod);
            }
            view.report.identities.push(IdentityReport {
                id: info.id,
                name: name.clone(),
                labels: labels.clone(),
                pods: members.iter().map(|p| p.name.clone()).collect(),
            });
            view.identities.insert(
                info.id,
                IdentityNames {
                    name,
                    labels,
                    pods: members,
                },
            );
        }
        view.report.local_pods.sort_by(|a, b| a.pod.cmp(&b.pod));
        view.report.ipblock_split = SplitReport {
            identities: plan.split.identities,
            entries: plan.split.entries,
        };
        view.report.policies = plan
            .policies
            .iter()
            .map(|p| PolicyRuleReport {
                id: p.id,
                name: p.policy.to_string(),
                ingress: p.ingress,
                egress: p.egress,
                selects: p.selected.iter().map(ToString::to_string).collect(),
            })
            .collect();
        view
    }

    /// What `GET /v1/policy` serves.
    pub fn report(&self) -> &PolicyReport {
        &self.report
    }

    /// The view with the HTTPRoute statuses compiled from the same state.
    pub fn with_routes(mut self, routes: Vec<RouteStatus>) -> Self {
        self.routes = routes;
        self
    }

    /// What `GET /v1/routes` serves.
    pub fn routes(&self) -> &[RouteStatus] {
        &self.routes
    }

    fn identity_name(&self, id: u32) -> String {
        match self.identities.get(&id) {
            Some(names) => names.name.clone(),
            None if id == IDENTITY_WORLD => "world".to_owned(),
            None => "unknown".to_owned(),
        }
    }

    /// Names one side of a flow. `ip` is `None` when the kernel did not report it;
    /// then the pod comes from the identity when exactly one pod has it.
    fn peer(
        &self,
        ip: Option<IpAddr>,
        port: u16,
        identity: u32,
        family_of: Option<IpAddr>,
    ) -> Peer {
        let labels = self
            .identities
            .get(&identity)
            .map(|n| n.labels.clone())
            .unwrap_or_default();
        let (ip, pod) = match ip {
            Some(ip) => (Some(ip), self.pods_by_ip.get(&ip).cloned()),
            None => match self.identities.get(&identity).map(|n| n.pods.as_slice()) {
                Some([only]) => {
                    // The address the pod most likely used: one of the peer's family.
                    let same_family = only
                        .ips
                        .iter()
                        .find(|a| family_of.is_none_or(|f| f.is_ipv4() == a.is_ipv4()))
                        .copied();
                    (same_family, Some(only.name.clone()))
                }
                _ => (None, None),
            },
        };
        Peer {
            ip,
            port,
            identity,
            identity_name: self.identity_name(identity),
            pod,
            labels,
        }
    }

    /// Decodes and names one event; `time` is its RFC 3339 timestamp.
    pub fn flow(&self, event: &FlowEvent, time: String) -> Flow {
        let addr = |a: mesh_common::Addr| {
            let ip = IpAddr::from(a);
            // The unspecified address means "not known" (egress events carry no source).
            (!ip.is_unspecified()).then_some(ip)
        };
        let (src, dst) = (addr(event.src), addr(event.dst));
        let src_port = u16::from_be(event.src_port);
        let dst_port = u16::from_be(event.dst_port);
        let source = self.peer(src, src_port, event.src_identity, dst);
        let destination = self.peer(dst, dst_port, event.dst_identity, src);
        // A direction code of a newer datapath reads as egress, as judged at the source.
        let direction = Direction::from_u8(event.direction).unwrap_or(Direction::Egress);
        let ingress = direction == Direction::Ingress;
        let judged = if ingress {
            destination.pod.as_deref()
        } else {
            source.pod.as_deref()
        };
        let policies = judged.map_or_else(Vec::new, |pod| {
            self.report
                .policies
                .iter()
                .filter(|p| if ingress { p.ingress } else { p.egress })
                .filter(|p| p.selects.iter().any(|s| s == pod))
                .map(|p| p.name.clone())
                .collect()
        });
        Flow {
            source_principal: None,
            destination_principal: None,
            time,
            // A verdict code of a newer datapath reads as the stricter outcome.
            verdict: Verdict::from_u8(event.verdict).unwrap_or(Verdict::Dropped),
            direction,
            reason: Reason::from_u8(event.reason),
            proto: Protocol::from_u8(event.proto)
                .map_or_else(|| event.proto.to_string(), |p| p.as_str().to_owned()),
            source,
            destination,
            policies,
        }
    }
}

impl View {
    /// Names a refusal the node proxy reported: an ingress decision at the server pod,
    /// with both SPIFFE identities.
    pub fn proxy_flow(&self, f: &ProxyFlow) -> Flow {
        let identity = |ip: IpAddr| {
            let pod = self.pods_by_ip.get(&ip);
            self.identities
                .iter()
                .find(|(_, n)| n.pods.iter().any(|p| Some(&p.name) == pod))
                .map_or(IDENTITY_WORLD, |(&id, _)| id)
        };
        let (src, dst) = (f.src.ip(), f.dst.ip());
        let source = self.peer(Some(src), f.src.port(), identity(src), Some(dst));
        let destination = self.peer(Some(dst), f.dst.port(), identity(dst), Some(src));
        let (reason, policies) = match f.denial {
            ProxyDenial::NetworkPolicy => {
                let pod = destination.pod.as_deref();
                let isolating = self
                    .report
                    .policies
                    .iter()
                    .filter(|p| p.ingress && p.selects.iter().any(|s| Some(s.as_str()) == pod))
                    .map(|p| p.name.clone())
                    .collect();
                (Reason::PolicyDenied, isolating)
            }
            ProxyDenial::Authorization => (
                Reason::AuthorizationDenied,
                f.policy.iter().cloned().collect(),
            ),
        };
        Flow {
            time: rfc3339(i128::from(f.time_unix_ns)),
            verdict: Verdict::Dropped,
            direction: Direction::Ingress,
            reason: Some(reason),
            proto: "TCP".to_owned(),
            source,
            destination,
            policies,
            source_principal: f.source_principal.clone(),
            destination_principal: f.destination_principal.clone(),
        }
    }
}

/// The view the reconciler publishes and the flow reader and admin API read; swapped
/// whole, so readers never see half an update.
#[derive(Clone, Default)]
pub struct SharedView(Arc<RwLock<Arc<View>>>);

impl SharedView {
    /// Replaces the view.
    pub fn publish(&self, view: View) {
        *self.0.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    /// The current view.
    pub fn get(&self) -> Arc<View> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The last [`FLOW_CAPACITY`] flows, and a channel of new ones for followers.
pub struct FlowLog {
    flows: Mutex<VecDeque<Arc<Flow>>>,
    new: broadcast::Sender<Arc<Flow>>,
}

impl Default for FlowLog {
    fn default() -> Self {
        Self {
            flows: Mutex::new(VecDeque::with_capacity(FLOW_CAPACITY)),
            new: broadcast::channel(FOLLOW_BACKLOG).0,
        }
    }
}

impl FlowLog {
    /// Stores a flow (dropping the oldest beyond capacity) and tells followers.
    pub fn push(&self, flow: Flow) {
        let flow = Arc::new(flow);
        let mut flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        if flows.len() == FLOW_CAPACITY {
            flows.pop_front();
        }
        flows.push_back(flow.clone());
        // Sent under the lock, so that `follow` sees every flow exactly once. No
        // follower is fine.
        let _ = self.new.send(flow);
    }

    /// The stored flows, oldest first.
    pub fn stored(&self) -> Vec<Arc<Flow>> {
        self.flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// The stored flows and a receiver of every later one, with no gap or overlap.
    pub fn follow(&self) -> (Vec<Arc<Flow>>, broadcast::Receiver<Arc<Flow>>) {
        let flows = self.flows.lock().unwrap_or_else(|e| e.into_inner());
        (flows.iter().cloned().collect(), self.new.subscribe())
    }
}

/// Reads EVENTS until the task is dropped: each event is decoded, named from the current
/// view and stored in `log`. Readiness comes from epoll on the ring buffer's fd (the
/// kernel wakes it when a consumer has caught up), as aya documents.
///
/// # Errors
/// Registering the fd with the runtime, or a failed wait on it.
pub async fn read_events(
    events: RingBuf<MapData>,
    view: SharedView,
    log: Arc<FlowLog>,
) -> std::io::Result<()> {
    let mut fd = sys::readable_ring_buf(events)?;
    loop {
        let mut guard = fd.readable_mut().await?;
        let ring = guard.get_inner_mut();
        let names = view.get();
        let offset = clock_offset_ns();
        while let Some(item) = ring.next() {
            let Some(event) = decode(&item) else {
                warn!(len = item.len(), "flow event of unexpected size; skipped");
                continue;
            };
            let time = rfc3339(i128::from(event.timestamp_ns) + offset);
            let flow = names.flow(&event, time);
            debug!(verdict = ?flow.verdict, direction = ?flow.direction, "flow");
            log.push(flow);
        }
        guard.clear_ready();
    }
}

/// A FlowEvent from ring buffer bytes (which need not be aligned for it); `None` when
/// the record is not exactly one event long.
pub fn decode(bytes: &[u8]) -> Option<FlowEvent> {
    sys::read_pod(bytes)
}

/// Nanoseconds to add to a CLOCK_MONOTONIC time (`bpf_ktime_get_ns`) to get Unix time.
fn clock_offset_ns() -> i128 {
    sys::clock_ns(libc::CLOCK_REALTIME) - sys::clock_ns(libc::CLOCK_MONOTONIC)
}

/// Unix time in nanoseconds as RFC 3339 UTC with nanoseconds.
pub fn rfc3339(unix_ns: i128) -> String {
    let secs = unix_ns.div_euclid(1_000_000_000);
    let nanos = unix_ns.rem_euclid(1_000_000_000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i128::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{nanos:09}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests;
