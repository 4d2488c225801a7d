//! GAMMA: HTTPRoutes attached to Services, compiled into the node proxy's route tables
//! ([`mesh_common::l7::RouteTable`]), with the route status the Gateway API defines
//! (Accepted, ResolvedRefs) for `mesh-agent routes`.
//!
//! Pure: State in, tables and statuses out.
//!
//! What is supported, and why the rest is not:
//! - Parents: Services (`group: ""`, `kind: Service`) in the route's own namespace
//!   ("producer" routes: they apply to every client of the Service). A parentRef to a
//!   Service of another namespace ("consumer" route, which would apply only to clients
//!   in the route's namespace) is not accepted: the proxy keys its tables by Service
//!   port, not by client namespace. Gateways are other controllers' business: such a
//!   parent is reported not accepted and never compiled.
//! - `hostnames` are ignored: for a Service parent the Service itself (its cluster IP
//!   and port, the connection's original destination) already selects the route, and
//!   GAMMA gives hostnames no meaning there.
//! - backendRefs: Services of the route's namespace. ReferenceGrant is not supported,
//!   so a cross-namespace reference is `RefNotPermitted`.
//! - `sessionPersistence` is not supported: it is ignored, and the Accepted message
//!   says so.
//!
//! Precedence (Gateway API, HTTPRouteRule `matches`): the matches of every rule of
//! every route attached to one Service port are merged and ordered by
//! 1. path match type: Exact, then PathPrefix, then RegularExpression;
//! 2. longer path value first (a PathPrefix's trailing `/` does not count);
//! 3. a method match first;
//! 4. more header matches first; 5. more query parameter matches first;
//! 6. the oldest route (`metadata.creationTimestamp`; none counts as newest);
//! 7. route namespace/name alphabetically; 8. rule order; 9. match order.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Service;
use mesh_common::l7::{
    AppProtocol, BackendTarget, Filter, HeaderMatch, HeaderModifier, Mirror, ObjectRef, PathMatch,
    PathModifier, Redirect, RetryPolicy, Rewrite, RouteMatch, RouteTable, Rule, ServicePortRef,
    StringMatch, Timeouts, WeightedBackend,
};

use crate::state::httproute::{
    BackendObjectReference, GATEWAY_GROUP, HttpHeaderFilter, HttpHeaderMatch, HttpPathModifier,
    HttpRoute, HttpRouteFilter, HttpRouteMatch, HttpRouteRule, parse_duration,
};
use crate::state::{ObjectKey, State, protocol};

/// Retries after the first attempt when a `retry` stanza does not say: GEP-1731 leaves
/// it to the implementation; one retry is what asking for retries at least means
/// (Envoy's default too). `attempts: 0` disables retries, as the API requires.
pub const DEFAULT_RETRY_ATTEMPTS: u32 = 1;
/// Base backoff when `retry.backoff` is absent (implementation-specific; Envoy's 25ms).
pub const DEFAULT_RETRY_BACKOFF_MS: u64 = 25;
/// Redirect status when `statusCode` is absent (the CRD's default).
const DEFAULT_REDIRECT_STATUS: u16 = 302;
/// Mirrored share when neither `percent` nor `fraction` is given: all requests.
const ALL_PPM: u32 = 1_000_000;

/// Everything the routes of a state compile to.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CompiledRoutes {
    /// The merged route table of every Service port at least one accepted HTTPRoute is
    /// attached to.
    pub tables: BTreeMap<ServicePortRef, RouteTable>,
    /// Every Service port served by the node proxy (an attached route, or an
    /// appProtocol of http, kubernetes.io/h2c or grpc), with what it speaks.
    pub l7_ports: BTreeMap<ServicePortRef, AppProtocol>,
    /// The status of every HTTPRoute, in namespace/name order.
    pub statuses: Vec<RouteStatus>,
}

/// The status of one HTTPRoute: one entry per parentRef.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RouteStatus {
    /// The HTTPRoute.
    pub route: ObjectRef,
    /// One per `spec.parentRefs` entry, in order.
    pub parents: Vec<ParentStatus>,
}

/// A route's status towards one parent Service.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ParentStatus {
    /// The parent (namespace defaults to the route's); a Service unless `kind` says
    /// otherwise.
    pub service: ObjectRef,
    /// The parent's kind: `Service`, or `group/Kind` for anything else (a Gateway).
    pub kind: String,
    /// The parentRef's `port`, when set.
    pub port: Option<u16>,
    /// The Service ports the route is attached to through this parent (empty unless
    /// accepted).
    pub attached_ports: Vec<u16>,
    /// Condition Accepted.
    pub accepted: Condition,
    /// Condition ResolvedRefs.
    pub resolved_refs: Condition,
}

/// A status condition.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Condition {
    /// "True" or "False".
    pub status: bool,
    /// E.g. `Accepted`, `NoMatchingParent`, `ResolvedRefs`, `BackendNotFound`.
    pub reason: String,
    /// Human-readable detail.
    pub message: String,
}

impl Condition {
    fn new(status: bool, reason: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            reason: reason.to_owned(),
            message: message.into(),
        }
    }
}

/// Why a reference does not resolve: the ResolvedRefs reason and a message naming the
/// field.
#[derive(Clone, Debug, PartialEq, Eq)]
struct RefProblem {
    reason: &'static str,
    message: String,
}

/// Compiles every HTTPRoute of `state`.
pub fn compile(state: &State) -> CompiledRoutes {
    let mut compiled = CompiledRoutes::default();
    for (key, svc) in state.services() {
        for port in tcp_ports(svc) {
            let Some(protocol) = port.1.and_then(app_protocol) else {
                continue;
            };
            compiled
                .l7_ports
                .insert(service_port(key, port.0), protocol);
        }
    }

    // Which routes each Service port has, from the accepted parents.
    let mut attached: BTreeMap<ServicePortRef, Vec<(&ObjectKey, &HttpRoute)>> = BTreeMap::new();
    for (key, route) in state.http_routes() {
        let mut parents = Vec::with_capacity(route.spec.parent_refs.len());
        for i in 0..route.spec.parent_refs.len() {
            let status = parent_status(state, key, route, i);
            let svc_key = ObjectKey {
                namespace: status.service.namespace.clone(),
                name: status.service.name.clone(),
            };
            for &port in &status.attached_ports {
                let routes = attached.entry(service_port(&svc_key, port)).or_default();
                if !routes.iter().any(|(k, _)| *k == key) {
                    routes.push((key, route));
                }
            }
            parents.push(status);
        }
        compiled.statuses.push(RouteStatus {
            route: object_ref(key),
            parents,
        });
    }

    for (target, routes) in attached {
        let svc_key = ObjectKey {
            namespace: target.service.namespace.clone(),
            name: target.service.name.clone(),
        };
        let protocol = state
            .service(&svc_key)
            .and_then(|svc| tcp_ports(svc).find(|p| p.0 == target.port))
            .and_then(|p| p.1.and_then(app_protocol))
            .unwrap_or_default();
        compiled.l7_ports.entry(target.clone()).or_insert(protocol);
        let table = table(state, &svc_key, target.port, &routes);
        compiled.tables.insert(target, table);
    }
    compiled
}

/// The merged, ordered table of one Service port.
fn table(
    state: &State,
    svc: &ObjectKey,
    port: u16,
    routes: &[(&ObjectKey, &HttpRoute)],
) -> RouteTable {
    // The precedence of the module docs, criterion for criterion: path type, path
    // length, method, headers, query parameters, age (none is newest), name, rule, match.
    type Key<'a> = (
        u8,
        Reverse<usize>,
        bool,
        Reverse<usize>,
        Reverse<usize>,
        bool,
        Option<&'a k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
        &'a ObjectKey,
        usize,
        usize,
    );
    let mut entries: Vec<(Key<'_>, usize, RouteMatch)> = Vec::new();
    let mut rules: Vec<Rule> = Vec::new();
    for &(key, route) in routes {
        let created = route.metadata.creation_timestamp.as_ref();
        for (i, rule) in route.spec.effective_rules().iter().enumerate() {
            let mut ignored = Vec::new();
            let compiled = compile_rule(state, key, rule, i, Some((svc, port)), &mut ignored);
            let rule_slot = rules.len();
            rules.push(compiled);
            for (j, m) in rule.effective_matches().iter().enumerate() {
                let compiled = compile_match(m);
                let (kind, len) = match &compiled.path {
                    PathMatch::Exact(p) => (0, p.len()),
                    PathMatch::PathPrefix(p) => (1, p.trim_end_matches('/').len()),
                    PathMatch::RegularExpression(p) => (2, p.len()),
                };
                let order: Key<'_> = (
                    kind,
                    Reverse(len),
                    compiled.method.is_none(),
                    Reverse(compiled.headers.len()),
                    Reverse(compiled.query_params.len()),
                    created.is_none(),
                    created,
                    key,
                    i,
                    j,
                );
                entries.push((order, rule_slot, compiled));
            }
        }
    }
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    // Rules are listed in the order their first match appears.
    let mut index_of: Vec<Option<u32>> = vec![None; rules.len()];
    let mut table = RouteTable::default();
    for (_, slot, mut m) in entries {
        m.rule = match index_of[slot] {
            Some(index) => index,
            None => {
                let index = u32::try_from(table.rules.len()).unwrap_or(u32::MAX);
                table.rules.push(rules[slot].clone());
                index_of[slot] = Some(index);
                index
            }
        };
        table.matches.push(m);
    }
    table
}

/// The status of `route`'s parentRef `i`, with the ports it attaches to.
fn parent_status(state: &State, key: &ObjectKey, route: &HttpRoute, i: usize) -> ParentStatus {
    let parent = &route.spec.parent_refs[i];
    let group = parent.group.as_deref().unwrap_or(GATEWAY_GROUP);
    let kind = parent.kind.as_deref().unwrap_or("Gateway");
    let namespace = parent.namespace.clone().unwrap_or(key.namespace.clone());
    let svc_key = ObjectKey {
        namespace,
        name: parent.name.clone(),
    };
    let is_service = is_core(group) && kind == "Service";
    let port = parent.port.and_then(|p| u16::try_from(p).ok());
    let mut status = ParentStatus {
        service: object_ref(&svc_key),
        kind: if is_service {
            "Service".to_owned()
        } else {
            format!("{group}/{kind}")
        },
        port,
        attached_ports: Vec::new(),
        accepted: Condition::new(true, "Accepted", ""),
        resolved_refs: Condition::new(true, "ResolvedRefs", "all references resolved"),
    };
    let refused = |reason: &str, message: String| Condition::new(false, reason, message);
    let svc = state.service(&svc_key);
    let ports: Vec<u16> = svc
        .map(|s| tcp_ports(s).map(|p| p.0).collect())
        .unwrap_or_default();
    status.accepted = if !is_service {
        refused(
            "UnsupportedValue",
            format!(
                "parent {group}/{kind} {svc_key} is not a Service: the mesh serves only Service parents (GAMMA); Gateways are left to their controller"
            ),
        )
    } else if svc_key.namespace != key.namespace {
        refused(
            "UnsupportedValue",
            format!(
                "Service {svc_key} is in another namespace: consumer routes are not supported; create the route in namespace {}",
                svc_key.namespace
            ),
        )
    } else if let Some(section) = &parent.section_name {
        refused(
            "UnsupportedValue",
            format!("sectionName {section:?} is not defined for Service parents; use port"),
        )
    } else if svc.is_none() {
        refused("NoMatchingParent", format!("Service {svc_key} not found"))
    } else if let Some(p) = parent.port
        && !port.is_some_and(|p| ports.contains(&p))
    {
        refused(
            "NoMatchingParent",
            format!("Service {svc_key} has no TCP port {p}"),
        )
    } else if ports.is_empty() {
        refused(
            "NoMatchingParent",
            format!("Service {svc_key} has no TCP port"),
        )
    } else {
        status.attached_ports = port.map_or(ports, |p| vec![p]);
        let mut message = format!(
            "attached to port{} {}",
            if status.attached_ports.len() == 1 {
                ""
            } else {
                "s"
            },
            join(&status.attached_ports)
        );
        if route
            .spec
            .rules
            .iter()
            .flatten()
            .any(|r| r.session_persistence.is_some())
        {
            message.push_str("; sessionPersistence is not supported and ignored");
        }
        Condition::new(true, "Accepted", message)
    };

    // References are judged as the table of each attached port would resolve them (a
    // backendRef without a port takes the parent's); an unattached parent has none.
    let contexts: Vec<Option<(&ObjectKey, u16)>> = if status.attached_ports.is_empty() {
        vec![None]
    } else {
        status
            .attached_ports
            .iter()
            .map(|&p| Some((&svc_key, p)))
            .collect()
    };
    let mut problems = Vec::new();
    for parent in contexts {
        for (r, rule) in route.spec.effective_rules().iter().enumerate() {
            compile_rule(state, key, rule, r, parent, &mut problems);
        }
    }
    let mut seen = BTreeSet::new();
    problems.retain(|p| seen.insert(p.message.clone()));
    if let Some(first) = problems.first() {
        let message = problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        status.resolved_refs = Condition::new(false, first.reason, message);
    }
    status
}

/// One rule for the table of the Service port `parent` (or for status only, `None`).
/// Unresolvable references are kept as [`BackendTarget::Invalid`] (their share of
/// requests gets 500) and reported in `problems`.
fn compile_rule(
    state: &State,
    key: &ObjectKey,
    rule: &HttpRouteRule,
    index: usize,
    parent: Option<(&ObjectKey, u16)>,
    problems: &mut Vec<RefProblem>,
) -> Rule {
    let at = format!("spec.rules[{index}]");
    let mut compiled = Rule {
        route: object_ref(key),
        index: u32::try_from(index).unwrap_or(u32::MAX),
        filters: compile_filters(
            state,
            key,
            &format!("{at}.filters"),
            &rule.filters,
            parent,
            problems,
        ),
        backends: Vec::with_capacity(rule.backend_refs.len()),
        timeouts: timeouts(rule),
        retry: retry(rule),
    };
    for (k, backend) in rule.backend_refs.iter().enumerate() {
        let field = format!("{at}.backendRefs[{k}]");
        let target = match resolve(state, key, &field, &backend.object(), parent) {
            Ok(target) => BackendTarget::Service(target),
            Err(problem) => {
                let reason = problem.reason.to_owned();
                problems.push(problem);
                BackendTarget::Invalid { reason }
            }
        };
        let filters_at = format!("{field}.filters");
        let filters = compile_filters(state, key, &filters_at, &backend.filters, parent, problems);
        let target = if has_extension(&backend.filters) {
            BackendTarget::Invalid {
                reason: "InvalidKind".to_owned(),
            }
        } else {
            target
        };
        compiled.backends.push(WeightedBackend {
            weight: backend
                .weight
                .and_then(|w| u32::try_from(w).ok())
                .unwrap_or(1),
            target,
            filters,
        });
    }
    // An extension filter cannot be resolved (none is supported), and the API forbids
    // skipping it: the rule answers 500 (no backends, no redirect).
    if has_extension(&rule.filters) {
        compiled.filters.clear();
        compiled.backends.clear();
    }
    compiled
}

fn has_extension(filters: &[HttpRouteFilter]) -> bool {
    filters.iter().any(|f| f.extension_ref.is_some())
}

/// Filters map one to one; a mirror whose target does not resolve is left out (the API
/// says not to configure it), an extension filter is reported.
fn compile_filters(
    state: &State,
    key: &ObjectKey,
    at: &str,
    filters: &[HttpRouteFilter],
    parent: Option<(&ObjectKey, u16)>,
    problems: &mut Vec<RefProblem>,
) -> Vec<Filter> {
    let mut out = Vec::with_capacity(filters.len());
    for (k, f) in filters.iter().enumerate() {
        if let Some(h) = &f.request_header_modifier {
            out.push(Filter::RequestHeaderModifier(header_modifier(h)));
        }
        if let Some(h) = &f.response_header_modifier {
            out.push(Filter::ResponseHeaderModifier(header_modifier(h)));
        }
        if let Some(r) = &f.request_redirect {
            out.push(Filter::RequestRedirect(Redirect {
                scheme: r.scheme.clone(),
                hostname: r.hostname.clone(),
                port: r.port.and_then(|p| u16::try_from(p).ok()),
                path: r.path.as_ref().map(path_modifier),
                status: r
                    .status_code
                    .and_then(|c| u16::try_from(c).ok())
                    .unwrap_or(DEFAULT_REDIRECT_STATUS),
            }));
        }
        if let Some(r) = &f.url_rewrite {
            out.push(Filter::UrlRewrite(Rewrite {
                hostname: r.hostname.clone(),
                path: r.path.as_ref().map(path_modifier),
            }));
        }
        if let Some(m) = &f.request_mirror {
            let field = format!("{at}[{k}].requestMirror.backendRef");
            match resolve(state, key, &field, &m.backend_ref, parent) {
                Ok(target) => out.push(Filter::RequestMirror(Mirror {
                    target: BackendTarget::Service(target),
                    fraction_ppm: mirror_ppm(m.percent, m.fraction.as_ref()),
                })),
                Err(problem) => problems.push(problem),
            }
        }
        if let Some(e) = &f.extension_ref {
            problems.push(RefProblem {
                reason: "InvalidKind",
                message: format!(
                    "{at}[{k}].extensionRef: {}/{} {}: extension filters are not supported (requests it applies to get 500)",
                    e.group, e.kind, e.name
                ),
            });
        }
    }
    out
}

/// `percent` or `fraction` in parts per million; neither is all requests.
fn mirror_ppm(percent: Option<i32>, fraction: Option<&crate::state::httproute::Fraction>) -> u32 {
    let ppm = match (percent, fraction) {
        (Some(p), _) => i64::from(p) * 10_000,
        (None, Some(f)) => {
            let d = i64::from(f.denominator.unwrap_or(100).max(1));
            i64::from(f.numerator) * i64::from(ALL_PPM) / d
        }
        (None, None) => i64::from(ALL_PPM),
    };
    u32::try_from(ppm.clamp(0, i64::from(ALL_PPM))).unwrap_or(ALL_PPM)
}

fn header_modifier(h: &HttpHeaderFilter) -> HeaderModifier {
    let pairs = |list: &[crate::state::httproute::HttpHeader]| {
        list.iter()
            .map(|x| (x.name.to_ascii_lowercase(), x.value.clone()))
            .collect()
    };
    HeaderModifier {
        set: pairs(&h.set),
        add: pairs(&h.add),
        remove: h.remove.iter().map(|n| n.to_ascii_lowercase()).collect(),
    }
}

fn path_modifier(p: &HttpPathModifier) -> PathModifier {
    match (&p.replace_full_path, &p.replace_prefix_match) {
        (Some(full), _) => PathModifier::ReplaceFullPath(full.clone()),
        (None, prefix) => PathModifier::ReplacePrefixMatch(prefix.clone().unwrap_or_default()),
    }
}

/// Durations in milliseconds; `0s` (no timeout) becomes `None`.
fn timeouts(rule: &HttpRouteRule) -> Timeouts {
    let ms = |d: Option<&String>| d.and_then(|d| parse_duration(d).ok()).filter(|&ms| ms > 0);
    let t = rule.timeouts.as_ref();
    Timeouts {
        request_ms: ms(t.and_then(|t| t.request.as_ref())),
        backend_request_ms: ms(t.and_then(|t| t.backend_request.as_ref())),
    }
}

fn retry(rule: &HttpRouteRule) -> Option<RetryPolicy> {
    let retry = rule.retry.as_ref()?;
    let attempts = retry
        .attempts
        .map_or(DEFAULT_RETRY_ATTEMPTS, |a| u32::try_from(a).unwrap_or(0));
    (attempts > 0).then(|| RetryPolicy {
        attempts,
        codes: retry
            .codes
            .iter()
            .filter_map(|&c| u16::try_from(c).ok())
            .collect(),
        backoff_ms: retry
            .backoff
            .as_deref()
            .and_then(|b| parse_duration(b).ok())
            .unwrap_or(DEFAULT_RETRY_BACKOFF_MS),
    })
}

/// One match, defaulted. Header names are lowercased and, like query parameter names,
/// only the first condition on a name counts (as the API specifies).
fn compile_match(m: &HttpRouteMatch) -> RouteMatch {
    let (kind, value) = m.path();
    let path = match kind {
        "Exact" => PathMatch::Exact(value.to_owned()),
        "RegularExpression" => PathMatch::RegularExpression(value.to_owned()),
        _ => PathMatch::PathPrefix(value.to_owned()),
    };
    RouteMatch {
        path,
        headers: value_matches(&m.headers, true),
        query_params: value_matches(&m.query_params, false),
        method: m.method.clone(),
        rule: 0,
    }
}

fn value_matches(list: &[HttpHeaderMatch], header: bool) -> Vec<HeaderMatch> {
    let mut out: Vec<HeaderMatch> = Vec::with_capacity(list.len());
    for m in list {
        let name = if header {
            m.name.to_ascii_lowercase()
        } else {
            m.name.clone()
        };
        if out.iter().any(|o| o.name == name) {
            continue;
        }
        let value = match m.type_.as_deref() {
            Some("RegularExpression") => StringMatch::RegularExpression(m.value.clone()),
            _ => StringMatch::Exact(m.value.clone()),
        };
        out.push(HeaderMatch { name, value });
    }
    out
}

/// Resolves a backendRef or mirror target of the route at `key` to a Service port.
/// Without a port, the parent's port is taken when the target is the parent Service.
fn resolve(
    state: &State,
    key: &ObjectKey,
    field: &str,
    r: &BackendObjectReference,
    parent: Option<(&ObjectKey, u16)>,
) -> Result<ServicePortRef, RefProblem> {
    let group = r.group.as_deref().unwrap_or("");
    let kind = r.kind.as_deref().unwrap_or("Service");
    let fail = |reason, message: String| {
        Err(RefProblem {
            reason,
            message: format!("{field}: {message}"),
        })
    };
    if !is_core(group) || kind != "Service" {
        let shown = if group.is_empty() {
            kind.to_owned()
        } else {
            format!("{group}/{kind}")
        };
        return fail(
            "InvalidKind",
            format!("{shown} is not supported (only Service)"),
        );
    }
    let target = ObjectKey {
        namespace: r.namespace.clone().unwrap_or(key.namespace.clone()),
        name: r.name.clone(),
    };
    if target.namespace != key.namespace {
        return fail(
            "RefNotPermitted",
            format!("Service {target} is in another namespace (ReferenceGrant is not supported)"),
        );
    }
    let Some(svc) = state.service(&target) else {
        return fail("BackendNotFound", format!("Service {target} not found"));
    };
    let port = match (r.port.and_then(|p| u16::try_from(p).ok()), parent) {
        (Some(p), _) => p,
        (None, Some((parent, p))) if *parent == target => p,
        (None, _) => {
            return fail(
                "BackendNotFound",
                format!("port is required (Service {target} is not an attached parent)"),
            );
        }
    };
    if !tcp_ports(svc).any(|p| p.0 == port) {
        return fail(
            "BackendNotFound",
            format!("Service {target} has no TCP port {port}"),
        );
    }
    Ok(service_port(&target, port))
}

/// `""` is the core group; `core` is accepted as its spelled-out name.
fn is_core(group: &str) -> bool {
    group.is_empty() || group == "core"
}

/// A Service's TCP ports, with their appProtocol.
fn tcp_ports(svc: &Service) -> impl Iterator<Item = (u16, Option<&str>)> {
    svc.spec
        .iter()
        .flat_map(|spec| spec.ports.iter().flatten())
        .filter(|p| protocol(p.protocol.as_ref()) == "TCP")
        .filter_map(|p| Some((u16::try_from(p.port).ok()?, p.app_protocol.as_deref())))
}

fn service_port(key: &ObjectKey, port: u16) -> ServicePortRef {
    ServicePortRef {
        service: object_ref(key),
        port,
    }
}

fn join(ports: &[u16]) -> String {
    ports
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The L7 protocol an `appProtocol` value declares, if any.
pub fn app_protocol(value: &str) -> Option<AppProtocol> {
    match value {
        "http" => Some(AppProtocol::Http),
        "kubernetes.io/h2c" => Some(AppProtocol::H2c),
        "grpc" => Some(AppProtocol::Grpc),
        _ => None,
    }
}

/// The schema's name for an object key.
pub fn object_ref(key: &ObjectKey) -> ObjectRef {
    ObjectRef {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
    }
}

#[cfg(test)]
#[path = "routes_tests.rs"]
mod tests;
