//! The destination side's decision on each tunnelled stream: the destination pod's
//! ingress NetworkPolicy for the stream's port (with the kernel's own maps and rules),
//! then the AuthorizationPolicies that apply to the pod, on the client's proven
//! identity. Both must allow. Settings are read from the configuration in force at
//! each stream, so a policy change applies to the next stream of an open tunnel.

use std::sync::Arc;

use http::request::Parts;
use mesh_common::security::WorkloadSecurity;

use crate::{
    authz::{self, HttpRequest, RequestContext},
    forward::Proxy,
    hbone::inbound::{Admission, Gate, InboundPod, Refusal, StreamRequest},
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
    fn check(&self, pod: &InboundPod, stream: &StreamRequest<'_>) -> Result<Admission, Refusal> {
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
        let security = self.security(pod)?;
        if security.http_ports.contains(&stream.target.port()) {
            // An HTTP port: AuthorizationPolicy judges each request, HTTP fields and all.
            return Ok(Admission::PerRequest);
        }
        authorize(pod, &security, stream, None)?;
        Ok(Admission::Bytes)
    }

    fn check_request(
        &self,
        pod: &InboundPod,
        stream: &StreamRequest<'_>,
        parts: &Parts,
    ) -> Result<(), Refusal> {
        let security = self.security(pod)?;
        let host = parts
            .headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| parts.uri.authority().map(|a| a.as_str()))
            .unwrap_or("");
        let request = HttpRequest {
            method: parts.method.as_str(),
            path: parts.uri.path(),
            host,
            headers: &parts.headers,
        };
        authorize(pod, &security, stream, Some(request))
    }
}

impl MeshGate {
    /// The pod's security settings in the configuration in force.
    fn security(&self, pod: &InboundPod) -> Result<WorkloadSecurity, Refusal> {
        let snapshot = Arc::clone(&self.proxy.snapshot.borrow());
        snapshot
            .config
            .pods
            .iter()
            .find(|p| p.pod == pod.key)
            .and_then(|p| p.security.clone())
            .ok_or_else(|| Refusal {
                reason: "authorization",
                detail: "the pod is no longer in the mesh".into(),
            })
    }
}

/// AuthorizationPolicy for one stream (`http: None`) or one request in it.
fn authorize(
    pod: &InboundPod,
    security: &WorkloadSecurity,
    stream: &StreamRequest<'_>,
    http: Option<HttpRequest<'_>>,
) -> Result<(), Refusal> {
    let principal = stream.principal.to_string();
    let ctx = RequestContext {
        source_principal: Some(&principal),
        source_namespace: Some(stream.principal.namespace()),
        source_ip: stream.peer.ip(),
        remote_ip: stream.peer.ip(),
        destination_ip: stream.target.ip(),
        destination_port: stream.target.port(),
        http,
    };
    let decision = authz::evaluate(&security.policies, &ctx);
    if let Some(audit) = &decision.audit {
        tracing::info!(
            pod = %pod.name, %principal,
            policy = %format!("{}/{}", audit.policy.namespace, audit.policy.name),
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
