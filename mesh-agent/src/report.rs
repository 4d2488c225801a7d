//! What the admin API serves and its client reads: flow records ([`Flow`]) and the
//! policy report ([`PolicyReport`]).
//!
//! These are plain serialisable values. `flows` builds them from kernel events and the
//! applied state, `admin` serves them and its client prints them; both depend on this
//! module and neither on the other's internals.

use std::{collections::BTreeMap, net::IpAddr};

use mesh_common::policy::IDENTITY_WORLD;
pub use mesh_common::{
    event::{Reason, Verdict},
    policy::Direction,
};
use serde::{Deserialize, Serialize};

/// One side of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Peer {
    /// Address; `None` when the kernel did not know it (the source of an egress flow
    /// whose pod is ambiguous).
    pub ip: Option<IpAddr>,
    /// Port; 0 when not bound yet (the source of an egress flow).
    pub port: u16,
    /// Security identity.
    pub identity: u32,
    /// What the identity stands for: `prod {app=web}`, `cidr 10.0.0.0/8`, `world`.
    pub identity_name: String,
    /// The pod, as `namespace/name`, when known.
    pub pod: Option<String>,
    /// The identity's labels (empty for CIDR identities and the world).
    pub labels: BTreeMap<String, String>,
}

/// One flow record, as `GET /v1/flows` serves it (one JSON object per line). Verdict
/// and direction are upper case (`DROPPED`, `EGRESS`), as Hubble writes them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the kernel decided, RFC 3339 UTC with nanoseconds.
    pub time: String,
    /// The decision.
    pub verdict: Verdict,
    /// The direction of the policy that decided.
    pub direction: Direction,
    /// Why; `None` (JSON `null`) for a reason code this agent does not know (a newer
    /// datapath).
    pub reason: Option<Reason>,
    /// `TCP`, `UDP`, `SCTP`, or the protocol number.
    pub proto: String,
    /// Who sent.
    pub source: Peer,
    /// Who was sent to.
    pub destination: Peer,
    /// The NetworkPolicies that isolate the judged pod (the source for egress, the
    /// destination for ingress) in this direction: the ones whose rules did not allow
    /// the flow. Empty when unknown.
    #[serde(default)]
    pub policies: Vec<String>,
    /// The source's SPIFFE identity, when the node proxy judged the flow in the mesh.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_principal: Option<String>,
    /// The destination's SPIFFE identity, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_principal: Option<String>,
}

impl Flow {
    /// One Hubble-like line: `2026-11-26T08:20:01.123Z prod/client (ID:256) ->
    /// prod/db:8081 (ID:258) EGRESS DROPPED TCP policy-denied`.
    pub fn line(&self) -> String {
        // Milliseconds are enough to read; the JSON keeps nanoseconds.
        let time = match self.time.get(..23) {
            Some(ms) if self.time.len() > 23 => format!("{ms}Z"),
            _ => self.time.clone(),
        };
        let mut line = format!(
            "{time} {} -> {} {} {} {} {}",
            peer_text(&self.source),
            peer_text(&self.destination),
            self.direction.as_str().to_ascii_uppercase(),
            self.verdict.as_str().to_ascii_uppercase(),
            self.proto,
            self.reason.map_or("unknown", Reason::as_str),
        );
        if !self.policies.is_empty() {
            line.push_str(&format!(" (isolated by {})", self.policies.join(", ")));
        }
        if let (Some(src), Some(dst)) = (&self.source_principal, &self.destination_principal) {
            line.push_str(&format!(" [mTLS {src} -> {dst}]"));
        }
        line
    }
}

fn peer_text(p: &Peer) -> String {
    let who = match (&p.pod, p.ip) {
        (Some(pod), _) => pod.clone(),
        (None, Some(IpAddr::V6(ip))) if p.port != 0 => format!("[{ip}]"),
        (None, Some(ip)) => ip.to_string(),
        (None, None) => p.identity_name.clone(),
    };
    let port = if p.port == 0 {
        String::new()
    } else {
        format!(":{}", p.port)
    };
    let id = if p.identity == IDENTITY_WORLD {
        "world".to_owned()
    } else {
        format!("ID:{}", p.identity)
    };
    format!("{who}{port} ({id})")
}

/// Which flows a reader wants.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FlowFilter {
    /// Only flows with this verdict.
    pub verdict: Option<Verdict>,
    /// Only flows from or to this pod (`namespace/name`).
    pub pod: Option<String>,
}

impl FlowFilter {
    /// Whether `flow` passes.
    pub fn matches(&self, flow: &Flow) -> bool {
        self.verdict.is_none_or(|v| v == flow.verdict)
            && self.pod.as_ref().is_none_or(|pod| {
                flow.source.pod.as_ref() == Some(pod) || flow.destination.pod.as_ref() == Some(pod)
            })
    }
}

/// `GET /v1/policy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReport {
    /// Every NetworkPolicy, by id (the `policy_id` of the POLICY entries it produced).
    pub policies: Vec<PolicyRuleReport>,
    /// Every identity, by id.
    pub identities: Vec<IdentityReport>,
    /// The pods scheduled on this node that policy applies to, by name.
    pub local_pods: Vec<LocalPodReport>,
    /// Peer identities split off pods' (or the node's) identities because ipBlock
    /// bounds cut through their addresses, and the POLICY entries naming them: the
    /// cost of ipBlocks that select pod addresses.
    #[serde(default)]
    pub ipblock_split: SplitReport,
}

/// What ipBlocks over pod and node addresses added to the plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SplitReport {
    /// Peer identities split off.
    pub identities: usize,
    /// POLICY entries whose peer is one of them (on this node).
    pub entries: usize,
}

/// A NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRuleReport {
    /// `policy_id` of its POLICY entries.
    pub id: u32,
    /// `namespace/name`.
    pub name: String,
    /// It isolates the pods it selects for ingress.
    pub ingress: bool,
    /// It isolates the pods it selects for egress.
    pub egress: bool,
    /// The pods it selects, cluster-wide, as `namespace/name`.
    pub selects: Vec<String>,
}

/// A security identity.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityReport {
    /// Its number in the maps.
    pub id: u32,
    /// `namespace {labels}`, `cidr PREFIX`, or a part: `namespace {labels} within PREFIXES`.
    pub name: String,
    /// The labels of its pods (empty for CIDR identities).
    pub labels: BTreeMap<String, String>,
    /// The pods that have it, as `namespace/name`.
    pub pods: Vec<String>,
}

/// A pod of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalPodReport {
    /// `namespace/name`.
    pub pod: String,
    /// Its addresses.
    pub ips: Vec<IpAddr>,
    /// Its identity.
    pub identity: u32,
    /// Whether the agent found its network namespace (only then does egress policy
    /// apply to its sockets).
    pub discovered: bool,
}
