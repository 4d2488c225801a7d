//! The destination side's decision on each tunnelled stream and each captured plaintext
//! connection: the destination pod's ingress NetworkPolicy for the port (with the
//! kernel's own maps and rules), for plaintext the pod's PeerAuthentication mode
//! (STRICT refuses it), then the AuthorizationPolicies that apply to the pod, on the
//! client's proven identity (a plaintext client has none). All must allow. Settings are read from the configuration in force at
//! each stream, so a policy change applies to the next stream of an open tunnel.

use std::{
    sync::Arc,
    time::{SystemTime, UNIX_EPOCH},
};

use http::request::Parts;
use mesh_common::{
    l7::{ProxyDenial, ProxyFlow},
    security::{MtlsMode, WorkloadSecurity},
};
use mesh_identity::SpiffeId;

use crate::{
    authz::{self, HttpRequest, RequestContext},
    forward::Proxy,
    hbone::inbound::{Admission, Gate, InboundPod, Refusal, StreamRequest},
};

/// [`Refusal::reason`] of a NetworkPolicy denial.
const NETWORK_POLICY: &str = "network_policy";
/// [`Refusal::reason`] of an AuthorizationPolicy denial.
const AUTHORIZATION: &str = "authorization";
/// [`Refusal::reason`] of plaintext refused by PeerAuthentication STRICT.
const MTLS_STRICT: &str = "mtls_strict";

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
        self.decide(pod, stream)
            .inspect_err(|refusal| self.report(pod, stream, refusal))
    }

    fn check_request(
        &self,
        pod: &InboundPod,
        stream: &StreamRequest<'_>,
        parts: &Parts,
    ) -> Result<(), Refusal> {
        self.decide_request(pod, stream, parts)
            .inspect_err(|refusal| self.report(pod, stream, refusal))
    }
}

impl MeshGate {
    /// Reports a policy denial to the agent's flow log.
    fn report(&self, pod: &InboundPod, stream: &StreamRequest<'_>, refusal: &Refusal) {
        if let (Some(mesh), Some(flow)) = (&self.proxy.mesh, flow(pod, stream, refusal)) {
            mesh.flows.report(flow);
        }
    }

    fn decide(&self, pod: &InboundPod, stream: &StreamRequest<'_>) -> Result<Admission, Refusal> {
        let Some(mesh) = &self.proxy.mesh else {
            return Err(Refusal {
                reason: NETWORK_POLICY,
                detail: "the proxy runs without the mesh".into(),
                policy: None,
            });
        };
        let Some(netpol) = mesh.netpol() else {
            return Err(Refusal {
                reason: NETWORK_POLICY,
                detail: "policy maps unavailable".into(),
                policy: None,
            });
        };
        let (src, dst) = (stream.peer.ip(), stream.target.ip());
        if !netpol.ingress_allowed(src, dst, stream.target.port()) {
            return Err(Refusal {
                reason: NETWORK_POLICY,
                detail: format!("ingress from {src} to port {} denied", stream.target.port()),
                policy: None,
            });
        }
        self.with_security(pod, |security| {
            let port = stream.target.port();
            if stream.principal.is_none()
                && authz::peer_auth_mode(security, port) == MtlsMode::Strict
            {
                return Err(Refusal {
                    reason: MTLS_STRICT,
                    detail: format!("plaintext to port {port}: PeerAuthentication mode STRICT"),
                    policy: None,
                });
            }
            if security.http_ports.contains(&port) {
                // An HTTP port: AuthorizationPolicy judges each request, HTTP fields
                // and all.
                return Ok(Admission::PerRequest);
            }
            authorize(pod, security, stream, None)?;
            Ok(Admission::Bytes)
        })
    }

    fn decide_request(
        &self,
        pod: &InboundPod,
        stream: &StreamRequest<'_>,
        parts: &Parts,
    ) -> Result<(), Refusal> {
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
        self.with_security(pod, |security| {
            authorize(pod, security, stream, Some(request))
        })
    }

    /// Runs `decide` on the pod's security settings in the configuration in force
    /// (borrowed from it, not copied per stream).
    fn with_security<T>(
        &self,
        pod: &InboundPod,
        decide: impl FnOnce(&WorkloadSecurity) -> Result<T, Refusal>,
    ) -> Result<T, Refusal> {
        let snapshot = Arc::clone(&self.proxy.snapshot.borrow());
        let security = snapshot
            .config
            .pods
            .iter()
            .find(|p| p.pod == pod.key)
            .and_then(|p| p.security.as_ref())
            .ok_or_else(|| Refusal {
                reason: AUTHORIZATION,
                detail: "the pod is no longer in the mesh".into(),
                policy: None,
            })?;
        decide(security)
    }
}

/// AuthorizationPolicy for one stream (`http: None`) or one request in it.
fn authorize(
    pod: &InboundPod,
    security: &WorkloadSecurity,
    stream: &StreamRequest<'_>,
    http: Option<HttpRequest<'_>>,
) -> Result<(), Refusal> {
    let principal = stream.principal.map(ToString::to_string);
    let ctx = RequestContext {
        source_principal: principal.as_deref(),
        source_namespace: stream.principal.map(SpiffeId::namespace),
        source_ip: stream.peer.ip(),
        remote_ip: stream.peer.ip(),
        destination_ip: stream.target.ip(),
        destination_port: stream.target.port(),
        http,
    };
    let decision = authz::evaluate(&security.policies, &ctx);
    if let Some(audit) = &decision.audit {
        tracing::info!(
            pod = %pod.name, principal = principal.as_deref().unwrap_or("none (plaintext)"),
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
        reason: AUTHORIZATION,
        detail,
        policy: decision
            .by
            .map(|by| format!("{}/{}", by.policy.namespace, by.policy.name)),
    })
}

/// The refusal as the agent's flow log takes it, for the policy denials.
fn flow(pod: &InboundPod, stream: &StreamRequest<'_>, refusal: &Refusal) -> Option<ProxyFlow> {
    let denial = match refusal.reason {
        NETWORK_POLICY => ProxyDenial::NetworkPolicy,
        // Istio counts a STRICT refusal as the connection's authorization failing.
        AUTHORIZATION | MTLS_STRICT => ProxyDenial::Authorization,
        _ => return None,
    };
    let time_unix_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    Some(ProxyFlow {
        time_unix_ns,
        src: stream.peer,
        dst: stream.target,
        source_principal: stream.principal.map(ToString::to_string),
        destination_principal: Some(pod.identity.clone()),
        denial,
        policy: refusal.policy.clone(),
    })
}
