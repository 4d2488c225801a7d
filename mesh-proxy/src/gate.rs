//! The destination side's decision on each tunnelled stream: the destination pod's
//! ingress NetworkPolicy for the stream's port (with the kernel's own maps and rules),
//! then the AuthorizationPolicies that apply to the pod, on the client's proven
//! identity. Both must allow. Settings are read from the configuration in force at
//! each stream, so a policy change applies to the next stream of an open tunnel.

use std::sync::Arc;

use crate::{
    authz::{self, RequestContext},
    forward::Proxy,
    hbone::inbound::{Gate, InboundPod, Refusal, StreamRequest},
};

/// [`Gate`] of the mesh.
pub struct MeshGate {
    proxy: Arc<Proxy>,
}

impl MeshGate {
    /// A gate reading `proxy`'s configuration and policy maps.
    pub fn new(proxy: Arc<Proxy>) -> Self {
        Self { proxy }
    }
}

impl Gate for MeshGate {
    fn check(&self, pod: &InboundPod, stream: &StreamRequest<'_>) -> Result<(), Refusal> {
        let Some(mesh) = &self.proxy.mesh else {
            return Err(Refusal {
                reason: "network_policy",
                detail: "the proxy runs without the mesh".into(),
            });
        };
        let Some(netpol) = mesh.netpol() else {
            return Err(Refusal {
                reason: "network_policy",
                detail: "policy maps unavailable".into(),
            });
        };
        let (src, dst) = (stream.peer.ip(), stream.target.ip());
        if !netpol.ingress_allowed(src, dst, stream.target.port()) {
            return Err(Refusal {
                reason: "network_policy",
                detail: format!("ingress from {src} to port {} denied", stream.target.port()),
            });
        }
        let snapshot = Arc::clone(&self.proxy.snapshot.borrow());
        let security = snapshot
            .config
            .pods
            .iter()
            .find(|p| p.pod == pod.key)
            .and_then(|p| p.security.as_ref());
        let Some(security) = security else {
            return Err(Refusal {
                reason: "authorization",
                detail: "the pod is no longer in the mesh".into(),
            });
        };
        let principal = stream.principal.to_string();
        let ctx = RequestContext {
            source_principal: Some(&principal),
            source_namespace: Some(stream.principal.namespace()),
            source_ip: src,
            remote_ip: src,
            destination_ip: dst,
            destination_port: stream.target.port(),
            http: None,
        };
        let decision = authz::evaluate(&security.policies, &ctx);
        if let Some(audit) = &decision.audit {
            tracing::info!(
                pod = %pod.name, %principal, policy = %format!("{}/{}", audit.policy.namespace, audit.policy.name),
                rule = audit.rule, allowed = decision.allowed, "AUDIT authorization"
            );
        }
        if decision.allowed {
            return Ok(());
        }
        let detail = match &decision.by {
            Some(by) => format!(
                "denied by AuthorizationPolicy {}/{} rule {}",
                by.policy.namespace, by.policy.name, by.rule
            ),
            None => "no ALLOW AuthorizationPolicy matches".into(),
        };
        Err(Refusal {
            reason: "authorization",
            detail,
        })
    }
}
